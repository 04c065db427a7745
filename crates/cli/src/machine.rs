//! `isocell machine ...`: a managed VM (the `isocell-machine` crate) that gives hosts without
//! hardware virtualization cells at cell speed, and `isocell run` through it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use isocell_machine::{Machine, MachineConfig, State};
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};

use crate::client::{self, Daemon, ExecArgs, Failure};
use crate::exit;

/// Writes a line to stdout; a stdout that cannot be written is ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `isocell machine`.
#[derive(Args, Debug)]
pub struct MachineArgs {
    /// The machine's directory [default: $ISOCELL_MACHINE_DIR, else /var/lib/isocell-machine
    /// for root, else ~/.local/state/isocell/machine].
    #[arg(long, global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    command: MachineCmd,
}

/// What to do with the machine.
#[derive(Subcommand, Debug)]
pub enum MachineCmd {
    /// Create the machine (its state disk, TLS certificates and exec token); does not start it.
    Init(InitArgs),
    /// Boot it and wait until its isocelld answers. A machine that died or hung is replaced.
    Start,
    /// Stop it: its daemon and cells end, its disk is written out, it powers off.
    Stop,
    /// Whether it runs, hangs or died; its resources, ports and identity.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in the machine itself (not in a cell), for debugging; exits with its status.
    Exec {
        /// Forward standard input.
        #[arg(short, long)]
        interactive: bool,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Copy the machine's evidence (host profile and key, audit log, receipts) into DIR, for
    /// `isocell audit verify --state-dir DIR --public-key DIR/host.pub` on this host.
    Evidence {
        /// An empty or new directory.
        #[arg(value_name = "DIR")]
        into: PathBuf,
    },
    /// Remove the machine and its disk (its audit log and receipts with it).
    Rm {
        /// Also when it is running (it is stopped first).
        #[arg(short, long)]
        force: bool,
    },
    /// Inside the machine: serve `exec` and control requests (started by its init).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        token: PathBuf,
        #[arg(long)]
        daemon_socket: PathBuf,
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, default_value_t = isocell_machine::GUEST_API_PORT)]
        daemon_port: u16,
    },
}

/// `isocell machine init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// vCPUs (1-64). Under emulation (no hardware virtualization) one is the steadiest.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Memory (a size: 2G, 1536M); at least 768M.
    #[arg(long, value_name = "SIZE", default_value = "2G")]
    memory: String,
    /// The state disk (a size: 8G); sparse, so it takes only what is written.
    #[arg(long, value_name = "SIZE", default_value = "8G")]
    disk: String,
    /// The machine's legal jurisdiction, for its host profile.
    #[arg(long, default_value = "unspecified")]
    jurisdiction: String,
    /// Its zone or site.
    #[arg(long, default_value = "unspecified")]
    zone: String,
    /// Who operates it.
    #[arg(long, default_value = "unspecified")]
    operator: String,
    /// No network for the machine beyond the two ports this host reaches it by: its cells'
    /// egress and its image pulls then reach nothing. Without it, the machine reaches what this
    /// host reaches (this host's loopback as 10.0.2.2).
    #[arg(long)]
    isolated: bool,
}

fn mib(flag: &str, text: &str) -> Result<u64, String> {
    crate::parse_size(flag, text).map(|b| b >> 20)
}

/// Runs `isocell machine ...`; the exit status.
pub fn machine(args: MachineArgs) -> u8 {
    let m = Machine::at(args.dir.unwrap_or_else(isocell_machine::default_dir));
    match command(&m, args.command) {
        Ok(code) => code,
        Err(e) => exit::fail(&e),
    }
}

fn command(m: &Machine, cmd: MachineCmd) -> Result<u8, String> {
    let err = |e: isocell_machine::MachineError| e.to_string();
    match cmd {
        MachineCmd::Init(a) => {
            let config = MachineConfig {
                cpus: a.cpus,
                memory_mib: mib("--memory", &a.memory)?,
                disk_mib: mib("--disk", &a.disk)?,
                machine_id: isocell_machine::new_id().map_err(err)?,
                jurisdiction: a.jurisdiction,
                zone: a.zone,
                operator: a.operator,
                isolated: a.isolated,
            };
            m.init(&config).map_err(err)?;
            say!("created the isocell machine {} in {}", config.machine_id, m.dir().display());
            say!("start it with `isocell machine start`");
            Ok(0)
        }
        MachineCmd::Start => {
            let t = Instant::now();
            let mut notice = |line: &str| tell!("isocell: {line}");
            let run = m.start(&mut notice).map_err(err)?;
            let key = m.host_public_key().unwrap_or_default();
            say!(
                "the isocell machine runs ({}, QEMU pid {}), ready in {:.1} s; its isocelld is at https://127.0.0.1:{}",
                run.accelerator,
                run.pid,
                t.elapsed().as_secs_f64(),
                run.api_port
            );
            if !key.is_empty() {
                say!("its host key: {key}");
            }
            Ok(0)
        }
        MachineCmd::Stop => {
            match m.stop(Duration::from_secs(60)).map_err(err)? {
                Some((run, true)) => say!("stopped the isocell machine (QEMU pid {})", run.pid),
                Some((run, false)) => say!(
                    "the isocell machine (QEMU pid {}) had already died; its record is cleared",
                    run.pid
                ),
                None => say!("the isocell machine was not running"),
            }
            Ok(0)
        }
        MachineCmd::Status { json } => {
            let status = status(m).map_err(err)?;
            if json {
                say!("{}", serde_json::to_string_pretty(&status).unwrap_or_default());
            } else {
                for (k, v) in status.as_object().into_iter().flatten() {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Null => continue,
                        other => other.to_string(),
                    };
                    say!("{k:<14} {text}");
                }
            }
            Ok(0)
        }
        MachineCmd::Exec { interactive, command } => {
            let code = m.exec(&command, interactive).map_err(err)?;
            Ok(u8::try_from(code.rem_euclid(256)).unwrap_or(exit::ISOCELL_FAILED))
        }
        MachineCmd::Evidence { into: dir } => {
            m.export_evidence(&dir).map_err(err)?;
            say!(
                "verify it here: isocell audit verify --state-dir {0} --public-key {0}/host.pub",
                dir.display()
            );
            Ok(0)
        }
        MachineCmd::Rm { force } => {
            if !force {
                if let Ok((s @ (State::Running | State::Starting | State::Hung(_)), _)) = m.state()
                {
                    return Err(format!(
                        "the isocell machine is {}; stop it first, or give --force (its disk, audit log included, is deleted)",
                        s.name()
                    ));
                }
            }
            m.remove().map_err(err)?;
            say!("removed the isocell machine in {}", m.dir().display());
            Ok(0)
        }
        MachineCmd::Serve { listen, token, daemon_socket, state_dir, daemon_port } => {
            let c = isocell_machine::exec::ServeConfig {
                listen,
                token,
                daemon_socket,
                state_dir,
                daemon_port,
            };
            isocell_machine::exec::serve(&c)?;
            Ok(0)
        }
    }
}

/// What `status` reports.
fn status(m: &Machine) -> Result<Value, isocell_machine::MachineError> {
    let config = m.config()?;
    let (state, run) = m.state()?;
    let mut v = json!({
        "state": state.name(),
        "dir": m.dir().display().to_string(),
        "machine_id": config.machine_id,
        "cpus": config.cpus,
        "memory_mib": config.memory_mib,
        "disk_mib": config.disk_mib,
    });
    if let State::Hung(silent) = &state {
        v["problem"] = json!(format!(
            "no heartbeat for {} s: the machine is hung; `isocell machine start` replaces it",
            silent.as_secs()
        ));
    }
    if state == State::Died {
        v["problem"] = json!(
            "QEMU is gone without `stop`: the machine died; `isocell machine start` recovers it"
        );
        v["console_tail"] = json!(m.console_tail(10));
    }
    if let Some(run) = run.filter(|_| state != State::Died) {
        v["pid"] = json!(run.pid);
        v["accelerator"] = json!(run.accelerator);
        v["api"] = json!(format!("https://127.0.0.1:{}", run.api_port));
        v["exec_port"] = json!(run.exec_port);
        v["uptime_s"] = json!(m.uptime_secs(&run));
    }
    if let Some(key) = m.host_public_key() {
        v["host_key"] = json!(key);
    }
    Ok(v)
}

/// Whether `isocell run` goes through the machine: `None` where this host runs cells itself or
/// has no machine (the run stays here, where admission still decides and a missing KVM is
/// reported with what to do); else how to reach the machine's daemon, or what is wrong with it.
pub fn needed() -> Option<Result<isocell_machine::Api, String>> {
    let why = isocell_machine::hardware_virtualization().err()?;
    let m = Machine::at(isocell_machine::default_dir());
    if !m.exists() {
        return None;
    }
    Some(m.api().map_err(|e| format!("this host cannot run cells itself ({why}), and {e}")))
}

/// `name` as the machine reaches it: a registry on this host's loopback (127.0.0.1:PORT or
/// localhost:PORT) is this host's address on the machine's private network, where the machine's
/// daemon speaks plain HTTP to it. `None` when the name needs no change.
pub fn image_for_machine(name: &str) -> Option<String> {
    let rest = name.strip_prefix("127.0.0.1:").or_else(|| name.strip_prefix("localhost:"))?;
    let (port, path) = rest.split_once('/')?;
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !path.is_empty())
        .then(|| format!("{}:{rest}", isocell_machine::boot::OUTER_LOOPBACK))
}

/// A checked `isocell run` for the machine's daemon.
pub struct RemoteRun {
    /// The create request.
    pub create: Value,
    /// The command.
    pub argv: Vec<String>,
    /// Its environment, K=V.
    pub env: Vec<String>,
    /// Its working directory.
    pub workdir: Option<String>,
    /// Its user.
    pub user: Option<String>,
    /// Its time limit.
    pub timeout: Option<u64>,
    /// Forward stdin.
    pub interactive: bool,
    /// Files in: here, and the path in the cell.
    pub inputs: Vec<(PathBuf, String)>,
    /// Files out: the path in the cell, and here.
    pub outputs: Vec<(String, PathBuf)>,
}

/// Runs `r` in a fresh cell of the machine's daemon at `api` (from [`needed`]): create, copy
/// in, exec, copy out, delete.
pub fn run(r: RemoteRun, api: &isocell_machine::Api) -> u8 {
    tell!("isocell: no hardware virtualization here; running the cell in the isocell machine (https://127.0.0.1:{})", api.port);
    let daemon = match client::machine_daemon(api) {
        Ok(d) => d,
        Err(f) => return f.report(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return exit::fail(&format!("async runtime: {e}")),
    };
    runtime.block_on(async {
        // Ctrl-C (or SIGTERM, SIGHUP) while the cell is made ends the run; a cell made anyway
        // ends at the daemon's idle timeout. While the command runs, exec forwards Ctrl-C to it.
        let interrupted = async {
            let mut signals = Vec::new();
            for kind in [SignalKind::interrupt(), SignalKind::terminate(), SignalKind::hangup()] {
                if let Ok(s) = signal(kind) {
                    signals.push(s);
                }
            }
            if signals.is_empty() {
                std::future::pending::<()>().await;
            }
            let waits = signals.iter_mut().map(|s| Box::pin(async move { s.recv().await }));
            futures_util::future::select_all(waits).await;
        };
        let cell = tokio::select! {
            c = daemon.json(hyper::Method::POST, "/v1/cells", Some(&r.create), &[]) => match c {
                Ok(c) => c,
                Err(f) => return f.report(),
            },
            () = interrupted => return exit::ISOCELL_FAILED,
        };
        let id = cell["id"].as_str().unwrap_or_default().to_owned();
        let status = match in_cell(&daemon, &id, &r).await {
            Ok(s) => s,
            Err(f) => f.report(),
        };
        // The cell is ephemeral whatever happened: deleting it ends it and signs its exit receipt.
        if let Err(f) =
            daemon.json(hyper::Method::DELETE, &client::cell_path(&id, ""), None, &[]).await
        {
            let code = f.report();
            return if status == 0 { code } else { status };
        }
        status
    })
}

async fn in_cell(daemon: &Daemon, id: &str, r: &RemoteRun) -> Result<u8, Failure> {
    for (host, guest) in &r.inputs {
        let (dir, name) = split(guest);
        client::upload_as(daemon, host, Some(name), id, dir).await?;
    }
    let exec = ExecArgs {
        interactive: r.interactive,
        tty: false,
        env: r.env.clone(),
        workdir: r.workdir.clone(),
        user: r.user.clone(),
        timeout: r.timeout,
        id: id.to_owned(),
        command: r.argv.clone(),
    };
    let status = client::exec(daemon, exec).await?;
    for (guest, host) in &r.outputs {
        download_to(daemon, id, guest, host).await?;
    }
    Ok(status)
}

/// `/a/b/c` as (`/a/b`, `c`); `/c` as (`/`, `c`).
fn split(path: &str) -> (&str, &str) {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/", name),
        Some((dir, name)) => (dir, name),
        None => ("/", trimmed),
    }
}

/// Copies `guest` out to exactly `host`: into a private directory beside it, then renamed.
async fn download_to(daemon: &Daemon, id: &str, guest: &str, host: &Path) -> Result<(), Failure> {
    let parent = match host.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let stage = tempfile_dir(&parent)?;
    let copied = client::download(daemon, id, guest, &stage).await;
    let result = copied.and_then(|_| {
        let (_, name) = split(guest);
        std::fs::rename(stage.join(name), host).map_err(|e| {
            Failure::new(format!("--output {guest}: cannot put it at {}: {e}", host.display()))
        })
    });
    let _ = std::fs::remove_dir_all(&stage);
    result
}

fn tempfile_dir(parent: &Path) -> Result<PathBuf, Failure> {
    for n in 0..100u32 {
        let p = parent.join(format!(".isocell-output-{}-{n}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Failure::new(format!(
                    "cannot create a directory in {}: {e}",
                    parent.display()
                )))
            }
        }
    }
    Err(Failure::new(format!("cannot create a directory in {}", parent.display())))
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn loopback_registries_are_renamed_for_the_machine() {
        use super::image_for_machine as f;
        assert_eq!(
            f("127.0.0.1:5000/demo/python:latest").as_deref(),
            Some("10.0.2.2:5000/demo/python:latest")
        );
        assert_eq!(f("localhost:80/a").as_deref(), Some("10.0.2.2:80/a"));
        assert_eq!(f("debian:12"), None);
        assert_eq!(f("127.0.0.1:x/a"), None);
        assert_eq!(f("127.0.0.1:5000"), None);
    }

    #[test]
    fn paths_split_into_directory_and_name() {
        assert_eq!(split("/a/b/c"), ("/a/b", "c"));
        assert_eq!(split("/c"), ("/", "c"));
        assert_eq!(split("/a/b/"), ("/a", "b"));
    }
}
