//! The per-cell supervisor: the small process that owns one long-lived cell for its whole life,
//! apart from whoever asked for it (as a containerd shim or conmon does). It admits and starts
//! the cell, holds the agent's control connection and the VMM (its child, which dies with it),
//! takes requests on a Unix socket, and when the cell is deleted or its VMM stops it tears the
//! cell down and signs the exit receipt. A daemon that restarts finds each live cell's
//! supervisor at its socket; [`reconcile_lost`] ends the record of one that is gone.
//!
//! Start-up is reported on stdout as JSON lines ([`StartEvent`]); afterwards requests are one
//! JSON line ([`Request`]) answered by one JSON line ([`Reply`]).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cell::{open_evidence, Admitted, Cell, PolicyLoad, Verdict};
use crate::evidence::{CellEvidence, EvidenceError};
use crate::state::Host;
use crate::vmm_process::{self, VmmError};
use crate::{Cancel, CellError, CellRequest, HostConfig, OutputSink};

/// Longest request line.
const MAX_REQUEST: u64 = 64 * 1024;

/// How long one request connection may take to send its line.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// What a supervisor is started with (a JSON file named on its command line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SupervisorSpec {
    /// The cell's id.
    pub id: String,
    /// The host side.
    pub host: HostConfig,
    /// The cell.
    pub request: CellRequest,
    /// Who asked for it (the Cedar principal of its admission).
    pub client: Option<String>,
    /// Policy files beyond the default and the state directory's.
    pub policy_files: Vec<PathBuf>,
    /// Limit on boot up to the agent's hello, seconds.
    pub boot_timeout_secs: u64,
}

/// What a supervisor says on stdout while it starts the cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StartEvent {
    /// The cell's agent is up; requests are taken at the socket from now on.
    Ready {
        /// The launch digest.
        launch_digest: String,
        /// The VMM's pid on this host.
        vmm_pid: Option<u32>,
        /// Milliseconds from the VMM's start to the agent's hello.
        boot_ms: u64,
    },
    /// The cell did not start; nothing of it is left.
    Failed {
        /// `denied`, `invalid`, `host`, `boot`, or `failed`.
        kind: String,
        /// What went wrong and what to do.
        message: String,
    },
}

/// A request to a running supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the cell still running?
    Status,
    /// Append an event to the cell's audit log (so all of a cell's entries come from one
    /// writer and its receipts name the latest).
    Log {
        /// Event kind.
        kind: String,
        /// Event data.
        data: Value,
    },
    /// End the cell; the reply comes once it is torn down and its exit receipt signed.
    Delete {
        /// Why: `deleted` (a client asked) or `idle_timeout`.
        reason: String,
    },
}

/// A supervisor's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The cell runs.
    Running {
        /// The VMM's pid on this host.
        vmm_pid: Option<u32>,
    },
    /// Done.
    Ok,
    /// The cell has ended.
    Ended {
        /// How it ended.
        outcome: String,
        /// Its signed exit receipt.
        exit_receipt: PathBuf,
        /// Whether every teardown check held.
        clean: bool,
    },
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// The directory of supervisor sockets, specs and logs, created private (0700): a socket there
/// deletes a cell, so only root (the daemon) may reach it.
pub fn private_dir(run_dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = run_dir.join("supervisors");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    // An older directory keeps its mode through create: make it private too.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// Where the supervisor of cell `id` takes requests.
pub fn socket_path(run_dir: &Path, id: &str) -> PathBuf {
    run_dir.join("supervisors").join(format!("{id}.sock"))
}

/// Why a request to a supervisor got no reply ([`ask`]).
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// Nothing listens at the supervisor's socket.
    #[error("the supervisor of cell {id} is not there ({}): {source}", path.display())]
    NotThere {
        /// The cell.
        id: String,
        /// The socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The connection could not be set up.
    #[error(transparent)]
    Socket(std::io::Error),
    /// The request could not be serialized.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// The request could not be sent.
    #[error("cell {id}'s supervisor: {source}")]
    Send {
        /// The cell.
        id: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No reply came.
    #[error("cell {id}'s supervisor did not answer: {source}")]
    NoAnswer {
        /// The cell.
        id: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The reply is not a [`Reply`].
    #[error("cell {id}'s supervisor answered {reply:?}: {source}")]
    BadReply {
        /// The cell.
        id: String,
        /// The line it sent.
        reply: String,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
}

/// Sends one request to the supervisor of cell `id` and waits up to `limit` for its reply.
pub fn ask(
    run_dir: &Path,
    id: &str,
    request: &Request,
    limit: Duration,
) -> Result<Reply, AskError> {
    let path = socket_path(run_dir, id);
    let id = id.to_owned();
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(source) => return Err(AskError::NotThere { id, path, source }),
    };
    s.set_read_timeout(Some(limit)).map_err(AskError::Socket)?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    if let Err(source) = s.write_all(line.as_bytes()) {
        return Err(AskError::Send { id, source });
    }
    let mut reply = String::new();
    if let Err(source) = BufReader::new(std::io::Read::take(s, MAX_REQUEST)).read_line(&mut reply) {
        return Err(AskError::NoAnswer { id, source });
    }
    serde_json::from_str(&reply).map_err(|source| AskError::BadReply { id, reply, source })
}

/// Warnings go to the supervisor's stderr (its log file).
struct Log;

impl OutputSink for Log {
    fn stdout(&mut self, _: &[u8]) {}
    fn stderr(&mut self, _: &[u8]) {}
    fn notice(&mut self, line: &str) {
        let _ = writeln!(std::io::stderr(), "isocell-supervisor: {line}");
    }
}

fn failure_kind(e: &CellError) -> &'static str {
    match e {
        CellError::Denied(_) => "denied",
        CellError::Plan(_) => "invalid",
        CellError::Host(_) => "host",
        CellError::Boot(_) | CellError::Agent(_) | CellError::Link(_) => "boot",
        _ => "failed",
    }
}

fn say(out: &mut dyn Write, event: &StartEvent) {
    if let Ok(line) = serde_json::to_string(event) {
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    }
}

/// Runs a supervisor: starts the cell, reports on `out`, serves requests until the cell ends.
/// `cancel` (SIGTERM) ends the cell as a delete would. Returns the process exit status.
pub fn supervise(spec: &SupervisorSpec, out: &mut dyn Write, cancel: &Cancel) -> i32 {
    let started = Instant::now();
    let mut cell = match start(spec, cancel) {
        Ok(c) => c,
        Err(e) => {
            say(out, &StartEvent::Failed { kind: failure_kind(&e).into(), message: e.to_string() });
            return 1;
        }
    };
    let dir = socket_path(&spec.host.run_dir, &spec.id);
    let listener = private_dir(&spec.host.run_dir).and_then(|_| {
        let _ = std::fs::remove_file(&dir);
        UnixListener::bind(&dir)
    });
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            let message = format!("cannot listen on {}: {e}", dir.display());
            let _ = cell.delete(&Verdict { exit_code: None, outcome: "failed" }, &mut Log);
            say(out, &StartEvent::Failed { kind: "failed".into(), message });
            return 1;
        }
    };
    say(
        out,
        &StartEvent::Ready {
            launch_digest: cell.launch_digest().to_owned(),
            vmm_pid: cell.vmm_pid(),
            boot_ms: started.elapsed().as_millis() as u64,
        },
    );
    let outcome = serve(&mut cell, &listener, cancel);
    let (verdict, mut waiting) = match outcome {
        Ended::Deleted(reason, stream) => {
            (Verdict { exit_code: None, outcome: reason }, Some(stream))
        }
        Ended::Cancelled => (Verdict { exit_code: None, outcome: "supervisor_terminated" }, None),
        Ended::VmmExited(status) => {
            (Verdict { exit_code: None, outcome: vmm_outcome(status) }, None)
        }
    };
    let reply = match cell.delete(&verdict, &mut Log) {
        Ok(ended) => Reply::Ended {
            outcome: verdict.outcome.into(),
            exit_receipt: ended.exit_receipt,
            clean: ended.checks.all_hold(),
        },
        Err(e) => Reply::Error { message: e.to_string() },
    };
    let _ = std::fs::remove_file(&dir);
    if let Some(s) = waiting.as_mut() {
        answer(s, &reply);
    }
    0
}

fn start(spec: &SupervisorSpec, cancel: &Cancel) -> Result<Cell, CellError> {
    let policies = PolicyLoad::start(&spec.host.state_dir, &spec.policy_files);
    let mut ev = open_evidence(&spec.host, &spec.id)?;
    if let Some(c) = &spec.client {
        ev.set_client(c);
    }
    let plan = crate::cell::plan(&spec.host, &spec.id, spec.request.clone(), &mut ev)?;
    let admitted = Admitted::new(plan, ev, policies, spec.client.as_deref())?;
    let mut cell = admitted.start(&spec.host, &[])?;
    if let Err(e) = cell.wait_ready(Duration::from_secs(spec.boot_timeout_secs), cancel) {
        let _ = cell.log("error", json!({ "message": e.to_string() }));
        let _ = cell.delete(&Verdict { exit_code: None, outcome: "failed" }, &mut Log);
        return Err(e);
    }
    Ok(cell)
}

/// Why serving ended.
enum Ended {
    /// A client asked (the connection waits for the final reply).
    Deleted(&'static str, UnixStream),
    /// The supervisor was told to stop.
    Cancelled,
    /// The VMM stopped by itself.
    VmmExited(ExitStatus),
}

/// What the exit receipt says of a VMM that stopped by itself (see `isocell-vmm --help`).
fn vmm_outcome(status: ExitStatus) -> &'static str {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => "guest_stopped",
        (Some(3), _) => "guest_panic",
        (Some(4), _) => "guest_crashed",
        (Some(6), _) => "lifetime_expired",
        (_, Some(libc::SIGSYS)) => "vmm_seccomp_violation",
        (_, Some(_)) => "vmm_killed",
        _ => "vmm_failed",
    }
}

fn serve(cell: &mut Cell, listener: &UnixListener, cancel: &Cancel) -> Ended {
    loop {
        if let Some(status) = cell.vmm_exited() {
            return Ended::VmmExited(status);
        }
        if cancel.is_cancelled() {
            return Ended::Cancelled;
        }
        let mut fds =
            vec![libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        if let Some(fd) = cell.vmm_exit_fd() {
            fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        }
        // Wake for a request, the VMM's exit, or every 200 ms to look at `cancel`.
        // SAFETY: `fds` is a valid array of pollfd structs for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
        if n <= 0 || fds[0].revents == 0 {
            continue;
        }
        let Ok((mut stream, _)) = listener.accept() else { continue };
        let _ = stream.set_read_timeout(Some(REQUEST_LIMIT));
        let mut line = String::new();
        let read = BufReader::new(std::io::Read::take(&stream, MAX_REQUEST)).read_line(&mut line);
        let request = read
            .map_err(BadRequest::Read)
            .and_then(|_| serde_json::from_str::<Request>(&line).map_err(BadRequest::Json));
        let reply = match request {
            Ok(Request::Status) => Reply::Running { vmm_pid: cell.vmm_pid() },
            Ok(Request::Log { kind, data }) => match cell.log(&kind, data) {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Error { message: e.to_string() },
            },
            Ok(Request::Delete { reason }) => {
                let reason = if reason == "idle_timeout" { "idle_timeout" } else { "deleted" };
                return Ended::Deleted(reason, stream);
            }
            Err(e) => Reply::Error { message: format!("bad request: {e}") },
        };
        answer(&mut stream, &reply);
    }
}

/// Why a request line could not be taken.
#[derive(Debug, thiserror::Error)]
enum BadRequest {
    #[error(transparent)]
    Read(std::io::Error),
    #[error(transparent)]
    Json(serde_json::Error),
}

fn answer(stream: &mut UnixStream, reply: &Reply) {
    if let Ok(mut line) = serde_json::to_string(reply) {
        line.push('\n');
        let _ = stream.write_all(line.as_bytes());
    }
}

/// Ends the record of cell `id` whose supervisor is gone: removes what it left (cgroup,
/// directory) and, unless it signed one, signs an exit receipt saying what was found. Returns
/// the exit receipt (`None` if the cell never launched), or `Err` if the supervisor is in fact
/// still there.
pub fn reconcile_lost(host: &HostConfig, id: &str) -> Result<Option<PathBuf>, CellError> {
    let state = Host::load_or_init(&host.state_dir).map_err(EvidenceError::from)?;
    let record = state.cell_record_dir(id).map_err(EvidenceError::from)?;
    let exit = record.join("exit.json");
    if exit.exists() {
        return Ok(Some(exit));
    }
    let checks = vmm_process::sweep_one(&host.run_dir, id)
        .ok_or_else(|| CellError::Start(VmmError::LiveOwner(id.to_owned())))?;
    let _ = std::fs::remove_file(socket_path(&host.run_dir, id));
    let Some(mut ev) = CellEvidence::resume(state, id)? else {
        return Ok(None);
    };
    let checks = serde_json::to_value(&checks).unwrap_or_default();
    ev.log(
        "error",
        json!({ "message": "the cell's supervisor was gone; its cell was torn down" }),
    )?;
    let path = ev.ended(None, "supervisor_lost", &checks, json!({}))?;
    Ok(Some(path))
}
