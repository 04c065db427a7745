//! `isocelld`: the IsoCell host daemon. Clients create long-lived cells, run commands in them
//! and delete them through a versioned HTTP API on a Unix socket (`/run/isocell/isocelld.sock`,
//! root and the `isocell` group). Each cell is owned by its own supervisor process, so cells
//! keep running when the daemon stops, crashes or is upgraded; a restarted daemon reattaches to
//! them from its SQLite database.

mod api;
mod cells;
mod config;
mod db;
mod error;
mod exec;
mod files;
mod metrics;
mod tls;

use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use isocell_host::{locate, HostConfig};

use crate::cells::App;
use crate::config::DaemonConfig;

/// The IsoCell host daemon.
#[derive(Parser, Debug)]
#[command(name = "isocelld", version)]
struct Args {
    /// Configuration file.
    #[arg(long, default_value = "/etc/isocell/isocelld.toml")]
    config: PathBuf,
    /// The API socket (overrides the configuration).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    openapi: bool,
}

fn fail(message: &str) -> ! {
    eprintln!("isocelld: error: {message}");
    std::process::exit(1)
}

/// The host's memory (MiB) and CPUs.
fn host_resources() -> (u64, u64) {
    let memory = isocell_vmm_memory_mib().unwrap_or(0);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    (memory, cpus)
}

fn isocell_vmm_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The listener systemd passed (socket activation), if any.
fn activated() -> Option<std::os::unix::net::UnixListener> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds != 1 {
        return None;
    }
    // SAFETY: systemd passes the listening socket as descriptor 3 and nothing else owns it.
    Some(unsafe { std::os::unix::net::UnixListener::from_raw_fd(3) })
}

/// Binds the API socket: mode 0660, group `group` if it exists (else root only).
fn bind(path: &std::path::Path, group: &str) -> Result<std::os::unix::net::UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!("another isocelld answers on {}", path.display()));
    }
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // Read /etc/group itself: the static binary must not load NSS modules.
    let gid = std::fs::read_to_string("/etc/group").ok().and_then(|text| {
        text.lines().find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(group))
                .then(|| f.nth(1).and_then(|g| g.parse::<u32>().ok()))
                .flatten()
        })
    });
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(l)
}

fn main() {
    let args = Args::parse();
    if args.openapi {
        let doc = <api::ApiDoc as utoipa::OpenApi>::openapi();
        println!("{}", doc.to_pretty_json().unwrap_or_default());
        return;
    }
    let explicit = std::env::args().any(|a| a == "--config" || a.starts_with("--config="));
    let mut config = DaemonConfig::load(&args.config, explicit).unwrap_or_else(|e| fail(&e));
    if let Some(s) = args.socket {
        config.socket = s;
    }
    let mut host = HostConfig::discover(config.jail).unwrap_or_else(|e| fail(&e.to_string()));
    if let Some(d) = &config.state_dir {
        host.state_dir = d.clone();
    }
    if let Some(d) = &config.run_dir {
        host.run_dir = d.clone();
    }
    let kernel = locate::kernel(None).unwrap_or_else(|e| fail(&e.to_string()));
    let base_image = locate::image(None).unwrap_or_else(|e| fail(&e.to_string()));
    let supervisor = locate::supervisor().unwrap_or_else(|e| fail(&e.to_string()));
    std::fs::create_dir_all(&host.state_dir)
        .unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", host.state_dir.display())));
    let db_path = host.state_dir.join("isocelld.db");
    let db =
        db::Db::open(&db_path).unwrap_or_else(|e| fail(&format!("{}: {e}", db_path.display())));
    let (host_memory_mib, host_cpus) = host_resources();
    let listener = match activated() {
        Some(l) => l,
        None => bind(&config.socket, &config.socket_group).unwrap_or_else(|e| fail(&e)),
    };
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let app = Arc::new(App {
        db,
        host,
        kernel,
        base_image,
        supervisor,
        config,
        metrics: metrics::Metrics::new(),
        events,
        host_memory_mib,
        host_cpus,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("cannot start the runtime: {e}")));
    runtime.block_on(async move {
        app.reattach().await;
        tokio::spawn(app.clone().reap_idle());
        let _ = listener.set_nonblocking(true);
        let listener = tokio::net::UnixListener::from_std(listener)
            .unwrap_or_else(|e| fail(&format!("the API socket: {e}")));
        let tls = match &app.config.tls {
            Some(c) => Some(tls::TlsListener::bind(c).await.unwrap_or_else(|e| fail(&e))),
            None => None,
        };
        let router = api::router(app);
        // Stopping the daemon leaves every cell running: their supervisors own them.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.changed().await;
            }
        };
        let unix = axum::serve(
            listener,
            router.clone().into_make_service_with_connect_info::<api::Peer>(),
        )
        .with_graceful_shutdown(stopped());
        let tcp = async {
            match tls {
                Some(l) => {
                    eprintln!("isocelld: listening on {} (TLS, client certificates)", l.local);
                    axum::serve(l, router.into_make_service_with_connect_info::<api::Peer>())
                        .with_graceful_shutdown(stopped())
                        .await
                }
                None => Ok(()),
            }
        };
        eprintln!("isocelld: listening");
        let signals = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            let _ = stop_tx.send(());
        };
        let (served, tcp_served, ()) = tokio::join!(async { unix.await }, tcp, signals);
        if let Err(e) = served.and(tcp_served) {
            fail(&format!("serving: {e}"));
        }
    });
}
