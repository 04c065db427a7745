//! The cell manager: creates cells through per-cell supervisors, deletes them, watches them
//! end, reattaches to them after a restart, and deletes idle ones.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use isocell_host::supervisor::{self, Reply, Request, StartEvent, SupervisorSpec};
use isocell_host::{CellImage, CellRequest, ContainerImage, HostConfig};
use isocell_image::{ImageRef, PullPolicy, RegistryOptions, Store};
use isocell_spec::{Constraints, MemorySize, Network};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::broadcast;

use crate::config::DaemonConfig;
use crate::db::{now_ms, CellRow, Claim, Claimed, Db};
use crate::error::ApiError;
use crate::metrics::{Decision, Metrics, Reason};

/// A request to create a cell.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCell {
    /// The image: a registry reference (`registry:5000/team/app:1.4`, `debian:12`,
    /// `app@sha256:...`), a stored image (`sha256:...`); for root clients also `oci:DIR`,
    /// `oci-archive:FILE`, `docker-archive:FILE`. Default: the host's base image.
    pub image: Option<String>,
    /// vCPUs, 1-32 (default 1).
    pub cpus: Option<u8>,
    /// Guest memory: MiB, or a size such as "512M" (default 256M).
    #[schema(value_type = Option<String>)]
    pub memory: Option<MemorySize>,
    /// The longest the cell may live, seconds (enforced by its VMM).
    pub max_lifetime_secs: Option<u64>,
    /// Delete the cell after this many seconds without API activity or running command
    /// (0: never; default from the daemon's configuration).
    pub idle_timeout_secs: Option<u64>,
    /// Admission constraints: jurisdictions, classification, allowed image digests.
    #[schema(value_type = Option<Object>)]
    pub constraints: Option<Constraints>,
    /// Where the cell may connect: `host:port`, `*.domain:port`, `a.b.c.d[/len]:port`
    /// (default: nowhere; the cell has no network).
    #[serde(default)]
    pub egress: Vec<String>,
    /// Host ports forwarded into the cell: `[host_ip:]host_port:guest_port`.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Start the cell from this snapshot (`isocell snapshot create`) instead of booting it: its
    /// image, vCPUs and memory are the snapshot's, it has no network, and its RNG is reseeded
    /// before it runs anything. Leave out image, cpus, memory, egress and publish.
    pub snapshot: Option<String>,
}

/// A lifecycle change, for the event stream.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Event {
    /// The cell.
    pub cell: String,
    /// Its new state.
    pub state: String,
    /// How it ended, for `ended`.
    pub outcome: Option<String>,
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// Who owns it (not shown; used to filter the stream).
    #[serde(skip)]
    pub owner: String,
}

/// Everything the handlers share.
pub struct App {
    /// Durable state.
    pub db: Db,
    /// The lifecycle's host configuration.
    pub host: HostConfig,
    /// The cell kernel.
    pub kernel: PathBuf,
    /// The base image, for creates that name none.
    pub base_image: PathBuf,
    /// `isocell-supervisor`.
    pub supervisor: PathBuf,
    /// The daemon's configuration.
    pub config: DaemonConfig,
    /// Metrics.
    pub metrics: Metrics,
    /// Lifecycle events.
    pub events: broadcast::Sender<Event>,
    /// The host's memory, MiB.
    pub host_memory_mib: u64,
    /// The host's CPUs.
    pub host_cpus: u64,
}

/// Longest duration a client may give, seconds (a year).
const MAX_SECS: u64 = 365 * 86_400;

/// Runs a blocking call (database, supervisor socket, image store) off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("task failed: {e}")))
}

/// The registries to speak plain HTTP to for `image`: the configured ones, and its registry if
/// a `HOST:*` entry names its host (an isocell machine's `10.0.2.2:*`: registries on the loopback
/// of the host the machine runs on, reached only over the machine's private network).
fn insecure_for(configured: &[String], image: &ImageRef) -> Vec<String> {
    let mut insecure = configured.to_vec();
    if let ImageRef::Registry(r) = image {
        let registry = r.registry();
        let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
        if configured.iter().any(|i| i.strip_suffix(":*") == Some(host)) {
            insecure.push(registry.to_owned());
        }
    }
    insecure
}

fn is_root(client: &str) -> bool {
    client == "unix:uid=0"
}

impl App {
    fn emit(&self, row: &CellRow) {
        let _ = self.events.send(Event {
            cell: row.id.clone(),
            state: row.state.clone(),
            outcome: row.outcome.clone(),
            at_ms: now_ms(),
            owner: row.owner.clone(),
        });
    }

    async fn emit_current(&self, id: &str) {
        let db = self.db.clone();
        let id = id.to_owned();
        if let Ok(Ok(Some(row))) = blocking(move || db.cell(&id)).await {
            self.emit(&row);
        }
    }

    /// Checks a create request and finds its image (pulling it if the store lacks it).
    async fn request(&self, client: &str, c: &CreateCell) -> Result<CellRequest, ApiError> {
        for (name, v) in
            [("max_lifetime_secs", c.max_lifetime_secs), ("idle_timeout_secs", c.idle_timeout_secs)]
        {
            if v.is_some_and(|s| s > MAX_SECS) {
                return Err(ApiError::bad_request(format!("{name}: at most {MAX_SECS} (a year)")));
            }
        }
        if c.max_lifetime_secs == Some(0) {
            return Err(ApiError::bad_request("max_lifetime_secs: give at least 1 second"));
        }
        let mut constraints = c.constraints.clone().unwrap_or_default();
        if c.max_lifetime_secs.is_some() {
            constraints.max_lifetime_secs = c.max_lifetime_secs;
        }
        for d in &constraints.image_digests {
            let ok = d
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "image digest {d:?}: expected sha256: and 64 hex digits"
                )));
            }
        }
        if let Some(name) = &c.snapshot {
            return self.snapshot_request(client, name, c, constraints).await;
        }
        let cpus = c.cpus.unwrap_or(1);
        if !(isocell_spec::vm::MIN_VCPUS..=isocell_spec::vm::MAX_VCPUS).contains(&cpus) {
            return Err(ApiError::bad_request(format!("cpus {cpus}: a cell has 1 to 32 vCPUs")));
        }
        // Checked before the image is looked at: a bad rule costs no pull.
        let network = Network::parse(&c.egress, &c.publish)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let image = match c.image.as_deref() {
            None => CellImage::Block(self.base_image.clone()),
            Some(name) => {
                // Before parsing: parsing looks at the named file, which would tell a client
                // what exists on this host.
                let local = ["oci:", "oci-archive:", "docker-archive:"];
                if !is_root(client) && local.iter().any(|p| name.starts_with(p)) {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        format!("image {name:?}: only root may name files on this host; push it to a registry"),
                    ));
                }
                let r = ImageRef::parse(name).map_err(ApiError::bad_request)?;
                if let ImageRef::Raw(_) = &r {
                    return Err(ApiError::bad_request(format!(
                        "image {name:?}: isocelld runs container images (registry references, \
                             sha256:DIGEST of a stored image), not block image files; leave image \
                             out for the host's base image"
                    )));
                }
                let state = self.host.state_dir.clone();
                let registry = RegistryOptions {
                    insecure: insecure_for(&self.config.insecure_registries, &r),
                    auth_file: None,
                    progress: false,
                };
                let pinned = r.pinned_digest().is_some();
                let resolved = blocking(move || {
                    let store = Store::open(&state)?;
                    isocell_image::resolve(
                        &store,
                        &r,
                        PullPolicy::Missing,
                        &registry,
                        &Default::default(),
                    )
                })
                .await?
                .map_err(|e| {
                    ApiError::new(StatusCode::BAD_GATEWAY, "image", format!("image {name}: {e}"))
                })?;
                CellImage::Container(Box::new(ContainerImage { resolved, pinned }))
            }
        };
        Ok(CellRequest {
            kernel: self.kernel.clone(),
            image,
            cpus,
            memory: c.memory.unwrap_or_default(),
            kernel_args: String::new(),
            max_lifetime_secs: constraints.max_lifetime_secs,
            constraints,
            network,
            snapshot: Default::default(),
            workload: None,
        })
    }

    /// The request for a cell started from snapshot `name` (its files checked against their
    /// digests), under the create's lifetime and `constraints` (already checked). Root's only,
    /// as snapshots are: a snapshot is the host's, taken by root.
    async fn snapshot_request(
        &self,
        client: &str,
        name: &str,
        c: &CreateCell,
        constraints: Constraints,
    ) -> Result<CellRequest, ApiError> {
        if !is_root(client) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "snapshot: only root may start cells from the host's snapshots",
            ));
        }
        let fixed = c.image.is_some()
            || c.cpus.is_some()
            || c.memory.is_some()
            || !c.egress.is_empty()
            || !c.publish.is_empty();
        if fixed {
            return Err(ApiError::bad_request(format!(
                "snapshot {name}: the cell's image, vCPUs, memory and network are the snapshot's; \
                 leave image, cpus, memory, egress and publish out"
            )));
        }
        let (host, owned) = (self.host.clone(), name.to_owned());
        let snap = blocking(move || isocell_host::snapshot::restore_request(&host, &owned))
            .await?
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(CellRequest { max_lifetime_secs: constraints.max_lifetime_secs, constraints, ..snap })
    }

    /// Creates a cell for `client` and waits until it runs (or failed).
    pub async fn create(
        self: &Arc<Self>,
        client: &str,
        create: CreateCell,
        idempotency_key: Option<String>,
    ) -> Result<(StatusCode, CellRow), ApiError> {
        if let Some(k) = &idempotency_key {
            if k.is_empty() || k.len() > 255 {
                return Err(ApiError::bad_request("Idempotency-Key: give 1 to 255 characters"));
            }
        }
        let request = self.request(client, &create).await?;
        let id = isocell_host::vmm_process::new_id();
        let now = now_ms();
        let row = CellRow {
            id: id.clone(),
            owner: client.to_owned(),
            state: "creating".into(),
            image: match (&create.snapshot, &create.image) {
                (Some(s), _) => format!("snapshot:{s}"),
                (None, Some(i)) => i.clone(),
                (None, None) => "base".into(),
            },
            cpus: request.cpus.into(),
            memory_mib: request.memory.mib(),
            idle_timeout_secs: create.idle_timeout_secs.unwrap_or(self.config.idle_timeout_secs),
            created_ms: now,
            last_active_ms: now,
            launch_digest: None,
            vmm_pid: None,
            boot_ms: None,
            outcome: None,
            exit_receipt: None,
            error: None,
            supervisor_pid: None,
            request: serde_json::to_string(&create).unwrap_or_default(),
        };
        let memory_limit_mib = self.config.memory_limit_mib(self.host_memory_mib);
        let cpu_limit = self.config.cpu_limit(self.host_cpus);
        let (db, r, key) = (self.db.clone(), row.clone(), idempotency_key.clone());
        let claimed = blocking(move || {
            db.claim(&Claim {
                row: &r,
                idempotency_key: key.as_deref(),
                memory_limit_mib,
                cpu_limit,
            })
        })
        .await??;
        match claimed {
            Claimed::Existing(row) => return Ok((StatusCode::OK, *row)),
            Claimed::Full(memory, cpus) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "capacity",
                    format!(
                        "this host cannot take a cell of {} MiB and {} vCPUs now: cells hold {memory} of \
                         {memory_limit_mib} MiB and {cpus} of {cpu_limit} vCPUs; delete a cell or try \
                         another host",
                        row.memory_mib, row.cpus
                    ),
                )
                .with_details(json!({
                    "requested": { "memory_mib": row.memory_mib, "cpus": row.cpus },
                    "in_use": { "memory_mib": memory, "cpus": cpus },
                    "limit": { "memory_mib": memory_limit_mib, "cpus": cpu_limit },
                })))
            }
            Claimed::New => {}
        }
        self.emit(&row);
        let started = std::time::Instant::now();
        let spec = SupervisorSpec {
            id: id.clone(),
            host: self.host.clone(),
            request,
            client: Some(client.to_owned()),
            policy_files: Vec::new(),
            boot_timeout_secs: self.config.boot_timeout_secs,
        };
        match self.start_supervisor(&spec).await {
            Ok((event, child)) => match event {
                StartEvent::Ready { launch_digest, vmm_pid, boot_ms } => {
                    self.metrics
                        .admissions
                        .get_or_create(&Decision { decision: "allow".into() })
                        .inc();
                    self.metrics.boot_seconds.observe(started.elapsed().as_secs_f64());
                    let pid = child.id();
                    let (db, i, d) = (self.db.clone(), id.clone(), launch_digest.clone());
                    blocking(move || db.set_running(&i, pid, vmm_pid, &d, boot_ms)).await??;
                    self.watch(id.clone(), Watched::Child(child));
                    self.emit_current(&id).await;
                }
                StartEvent::Failed { kind, message } => {
                    if kind == "denied" {
                        self.metrics
                            .admissions
                            .get_or_create(&Decision { decision: "deny".into() })
                            .inc();
                    }
                    let (db, i, m) = (self.db.clone(), id.clone(), message.clone());
                    blocking(move || db.set_failed(&i, &m)).await??;
                    self.emit_current(&id).await;
                    let (status, code) = match kind.as_str() {
                        "denied" => (StatusCode::FORBIDDEN, "denied"),
                        "invalid" => (StatusCode::BAD_REQUEST, "bad_request"),
                        "host" => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                        _ => (StatusCode::BAD_GATEWAY, "cell_failed"),
                    };
                    return Err(
                        ApiError::new(status, code, message).with_details(json!({ "cell": id }))
                    );
                }
            },
            Err(message) => {
                let host = self.host.clone();
                let i = id.clone();
                let _ = blocking(move || supervisor::reconcile_lost(&host, &i)).await;
                let (db, i, m) = (self.db.clone(), id.clone(), message.clone());
                blocking(move || db.set_failed(&i, &m)).await??;
                self.emit_current(&id).await;
                return Err(ApiError::internal(message).with_details(json!({ "cell": id })));
            }
        }
        let db = self.db.clone();
        let row = blocking(move || db.cell(&id))
            .await??
            .ok_or_else(|| ApiError::internal("cell vanished"))?;
        Ok((StatusCode::CREATED, row))
    }

    /// Starts the supervisor of `spec` and waits for it to say the cell is ready or failed.
    async fn start_supervisor(
        &self,
        spec: &SupervisorSpec,
    ) -> Result<(StartEvent, tokio::process::Child), String> {
        let dir = supervisor::private_dir(&self.host.run_dir).map_err(|e| {
            format!("cannot create {}/supervisors: {e}", self.host.run_dir.display())
        })?;
        let spec_path = dir.join(format!("{}.json", spec.id));
        let text = serde_json::to_vec(spec).map_err(|e| e.to_string())?;
        std::fs::write(&spec_path, text)
            .map_err(|e| format!("cannot write {}: {e}", spec_path.display()))?;
        let log = std::fs::File::create(dir.join(format!("{}.log", spec.id)))
            .map_err(|e| format!("cannot create the supervisor log: {e}"))?;
        let mut cmd = std::process::Command::new(&self.supervisor);
        cmd.arg(&spec_path).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        // Its own session: a signal to the daemon's group, or the daemon's death, leaves the
        // cell running.
        // SAFETY: setsid in the forked child before exec is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = tokio::process::Command::from(cmd)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.supervisor.display()))?;
        let (db, id, pid) = (self.db.clone(), spec.id.clone(), child.id());
        let _ = blocking(move || db.set_supervisor(&id, pid)).await;
        let stdout = child.stdout.take().ok_or("the supervisor has no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        // Admission, measurement and boot; the boot itself is bounded by the supervisor.
        let limit = Duration::from_secs(self.config.boot_timeout_secs + 300);
        let event = tokio::time::timeout(limit, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(e) = serde_json::from_str::<StartEvent>(&line) {
                    return Some(e);
                }
            }
            None
        })
        .await;
        let _ = std::fs::remove_file(&spec_path);
        match event {
            Ok(Some(e)) => Ok((e, child)),
            Ok(None) => Err(format!(
                "the cell's supervisor ended without starting it ({}); see {}",
                child.wait().await.map_or("unknown".into(), |s| s.to_string()),
                dir.join(format!("{}.log", spec.id)).display()
            )),
            Err(_) => {
                let _ = child.start_kill();
                Err("the cell did not start in time".into())
            }
        }
    }

    /// Watches a cell's supervisor until it exits, then records how the cell ended.
    fn watch(self: &Arc<Self>, id: String, what: Watched) {
        let app = self.clone();
        tokio::spawn(async move {
            match what {
                Watched::Child(mut child) => {
                    let _ = child.wait().await;
                }
                Watched::Pid(fd) => {
                    // SAFETY: `fd` is an open pidfd that the AsyncFd owns (and so keeps open and
                    // unchanged) for its whole life.
                    let registered = unsafe {
                        tokio::io::unix::AsyncFd::register_with_interest(
                            fd,
                            tokio::io::Interest::READABLE,
                        )
                    };
                    if let Ok(fd) = registered {
                        let _ = fd.readable().await;
                    }
                }
            }
            app.finish(&id).await;
        });
    }

    /// Records the end of cell `id`, whose supervisor is gone: from its exit receipt, or, if it
    /// signed none, after tearing down what it left.
    async fn finish(&self, id: &str) {
        let host = self.host.clone();
        let i = id.to_owned();
        let receipt = blocking(move || supervisor::reconcile_lost(&host, &i)).await;
        let (outcome, path) = match receipt {
            Ok(Ok(Some(path))) => {
                (receipt_outcome(&path).unwrap_or_else(|| "unknown".into()), Some(path))
            }
            Ok(Ok(None)) => ("supervisor_lost".to_owned(), None),
            Ok(Err(e)) => (format!("teardown_failed: {e}"), None),
            Err(e) => (format!("teardown_failed: {}", e.message), None),
        };
        let db = self.db.clone();
        let i = id.to_owned();
        let o = outcome.clone();
        let p = path.map(|p| p.display().to_string());
        if let Ok(Ok(true)) = blocking(move || db.set_ended(&i, &o, p.as_deref())).await {
            self.metrics.vmm_exits.get_or_create(&Reason { reason: outcome }).inc();
        }
        self.emit_current(id).await;
    }

    /// Deletes cell `id` (`reason`: `deleted` or `idle_timeout`) and returns its final row.
    pub async fn delete(self: &Arc<Self>, id: &str, reason: &str) -> Result<CellRow, ApiError> {
        let (db, i) = (self.db.clone(), id.to_owned());
        let changed = blocking(move || db.set_state(&i, "deleting")).await??;
        if changed {
            self.emit_current(id).await;
            let (run, i, r) = (self.host.run_dir.clone(), id.to_owned(), reason.to_owned());
            let reply = blocking(move || {
                supervisor::ask(&run, &i, &Request::Delete { reason: r }, Duration::from_secs(180))
            })
            .await?;
            match reply {
                Ok(Reply::Ended { outcome, exit_receipt, .. }) => {
                    let (db, i, o) = (self.db.clone(), id.to_owned(), outcome.clone());
                    let p = exit_receipt.display().to_string();
                    if blocking(move || db.set_ended(&i, &o, Some(&p))).await?? {
                        self.metrics.vmm_exits.get_or_create(&Reason { reason: outcome }).inc();
                    }
                    self.emit_current(id).await;
                }
                // The supervisor is gone (or broken): end the record from what is left.
                _ => self.finish(id).await,
            }
        }
        let (db, i) = (self.db.clone(), id.to_owned());
        blocking(move || db.cell(&i)).await??.ok_or_else(|| ApiError::no_cell(id))
    }

    /// After a restart: reattaches to every cell whose supervisor still runs, ends the records
    /// of the others, and finds the exit status of sessions that ended meanwhile.
    pub async fn reattach(self: &Arc<Self>) {
        let db = self.db.clone();
        let live = match blocking(move || db.cells_in(&["creating", "running", "deleting"])).await {
            Ok(Ok(rows)) => rows,
            _ => return,
        };
        for row in live {
            let (run, i) = (self.host.run_dir.clone(), row.id.clone());
            let status = blocking(move || {
                supervisor::ask(&run, &i, &Request::Status, Duration::from_secs(10))
            })
            .await;
            let alive = matches!(status, Ok(Ok(Reply::Running { .. })));
            let pidfd = row.supervisor_pid.and_then(pidfd);
            match (alive, pidfd) {
                (true, Some(fd)) => {
                    if row.state == "creating" {
                        let digest = launch_digest(&self.host, &row.id).unwrap_or_default();
                        let (db, i) = (self.db.clone(), row.id.clone());
                        let _ = blocking(move || {
                            db.set_running(&i, row.supervisor_pid, None, &digest, 0)
                        })
                        .await;
                    }
                    self.watch(row.id.clone(), Watched::Pid(fd));
                    if row.state == "deleting" {
                        let app = self.clone();
                        let id = row.id.clone();
                        tokio::spawn(async move {
                            let _ = app.delete_again(&id).await;
                        });
                    } else {
                        self.resume_sessions(&row.id).await;
                    }
                }
                _ => self.finish(&row.id).await,
            }
        }
    }

    /// A delete that a previous daemon started and did not see through.
    async fn delete_again(self: &Arc<Self>, id: &str) -> Result<CellRow, ApiError> {
        let (db, i) = (self.db.clone(), id.to_owned());
        blocking(move || db.set_state(&i, "running")).await??;
        self.delete(id, "deleted").await
    }

    /// Waits, in the background, for the exit status of every session of `cell` that was
    /// running when the daemon last looked.
    async fn resume_sessions(self: &Arc<Self>, cell: &str) {
        let (db, c) = (self.db.clone(), cell.to_owned());
        let Ok(Ok(sessions)) = blocking(move || db.sessions(Some(&c), Some("running"))).await
        else {
            return;
        };
        for s in sessions {
            crate::exec::await_session(self.clone(), cell.to_owned(), s.id);
        }
    }

    /// Deletes cells idle past their timeout, every few seconds, forever.
    pub async fn reap_idle(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let db = self.db.clone();
            let Ok(Ok(rows)) = blocking(move || db.cells_in(&["running"])).await else { continue };
            for row in rows {
                if row.idle_timeout_secs == 0
                    || now_ms().saturating_sub(row.last_active_ms) < row.idle_timeout_secs * 1000
                {
                    continue;
                }
                let (db, i) = (self.db.clone(), row.id.clone());
                if !matches!(blocking(move || db.running_sessions(&i)).await, Ok(Ok(0))) {
                    continue;
                }
                let app = self.clone();
                tokio::spawn(async move {
                    let _ = app.delete(&row.id, "idle_timeout").await;
                });
            }
        }
    }
}

/// What a watch waits on: our own child, or (after a restart) a pidfd.
enum Watched {
    Child(tokio::process::Child),
    Pid(OwnedFd),
}

/// A pidfd for `pid`, readable when it exits.
fn pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The outcome an exit receipt records.
fn receipt_outcome(path: &std::path::Path) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    doc["receipt"]["outcome"].as_str().map(str::to_owned)
}

/// The launch digest a cell's launch receipt records.
fn launch_digest(host: &HostConfig, id: &str) -> Option<String> {
    let path = host.state_dir.join("cells").join(id).join("launch.json");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    doc["receipt"]["launch_digest"].as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_host_wildcard_marks_every_port_of_that_host_insecure_and_no_other() {
        let configured = vec!["10.0.2.2:*".to_owned(), "reg.local:5000".to_owned()];
        let on = |name: &str| insecure_for(&configured, &ImageRef::parse(name).unwrap());
        assert!(on("10.0.2.2:5123/demo/app:1").contains(&"10.0.2.2:5123".to_owned()));
        assert!(!on("10.0.2.20:5123/demo/app:1").contains(&"10.0.2.20:5123".to_owned()));
        assert!(!on("evil.example/10.0.2.2:1").iter().any(|r| r.starts_with("evil")));
        assert_eq!(on("reg.local:5000/app:1"), configured);
        assert_eq!(
            insecure_for(&[], &ImageRef::parse("10.0.2.2:5123/app:1").unwrap()),
            Vec::<String>::new()
        );
    }
}
