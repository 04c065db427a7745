//! One container as the shim keeps it: its cell (a pod's sandbox container has none: it needs
//! no process of its own), its processes (the container's own and its execs) and their states.
//! Everything here blocks (the cell lifecycle is synchronous); the task service calls it off the
//! async runtime.
//!
//! Each of the container's processes is one agent session in the cell: the container's own is
//! session 1, execs count up from 2. A process's output goes to the FIFOs containerd gave; its
//! exit is reported as runc reports it (the exit code, or 128 + the signal). When the
//! container's own process ends, the cell ends with it (its execs too, as in a PID namespace),
//! and its exit receipt is signed.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use isocell_host::cell::{self, Admitted};
use isocell_host::command;
use isocell_host::session::{SessionInput, SessionSocket};
use isocell_host::{
    Cancel, Cell, CellError, CellImage, CellRequest, ContainerImage, HostConfig, OutputSink,
    Termination, Verdict,
};
use isocell_image::runconfig::Process;
use isocell_image::{Limits, Resolved, Store};
use isocell_proto::WindowSize;
use serde_json::json;
use tokio::sync::watch;

use crate::events::{Event, Events};
use crate::oci::{self, Spec};
use crate::rootfs;

/// How long a cell's agent is given to come up.
const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// How long copying a volume into a cell may take.
const COPY_LIMIT: Duration = Duration::from_secs(120);

/// The exit status of a process killed with SIGKILL, or lost with its cell.
pub const KILLED: u32 = 128 + libc::SIGKILL as u32;

/// Where a process is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcState {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Ended with this status, at this time.
    Exited {
        /// runc's convention: the exit code, or 128 + the signal.
        status: u32,
        /// When.
        at: SystemTime,
    },
}

/// The FIFOs containerd gives a process (empty: none).
#[derive(Clone, Debug, Default)]
pub struct Stdio {
    /// Standard input.
    pub stdin: String,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Whether the process has a terminal (then output is all on `stdout`).
    pub terminal: bool,
}

/// One process of a container.
pub struct Proc {
    /// Empty for the container's own process.
    pub exec_id: String,
    /// The agent session that runs it.
    session: u64,
    /// What runs (`None` for a sandbox container).
    process: Option<Process>,
    /// Its FIFOs.
    pub stdio: Stdio,
    /// Its state; waiters watch it.
    pub state: watch::Sender<ProcState>,
    /// Its input, once started.
    input: Mutex<Option<SessionInput>>,
    /// The shim's own writer on the stdin FIFO, held (as runc's shim holds one) so that the
    /// client closing its end is not the end of input: CloseIO drops it, and the forwarder then
    /// drains what is buffered before it closes the process's stdin.
    stdin_keep: Mutex<Option<File>>,
}

impl Proc {
    fn new(exec_id: &str, session: u64, process: Option<Process>, stdio: Stdio) -> Arc<Proc> {
        Arc::new(Proc {
            exec_id: exec_id.to_owned(),
            session,
            process,
            stdio,
            state: watch::channel(ProcState::Created).0,
            input: Mutex::new(None),
            stdin_keep: Mutex::new(None),
        })
    }

    /// Its current state.
    pub fn now(&self) -> ProcState {
        *self.state.borrow()
    }

    /// Whether it has left the running state, or does within `patience`.
    fn ended_within(&self, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        while self.now() == ProcState::Running {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

/// A container's cell, while it runs.
struct CellSide {
    /// Taken by teardown.
    cell: Mutex<Option<Cell>>,
    sessions: SessionSocket,
    /// Set once the cell is gone.
    gone: watch::Sender<bool>,
}

/// One container.
pub struct Container {
    /// containerd's id.
    pub id: String,
    /// The bundle directory.
    pub bundle: PathBuf,
    /// The pid containerd is told: the cell's VMM, or this shim for a sandbox.
    pub pid: u32,
    /// The cell (none for a pod's sandbox).
    cell: Option<CellSide>,
    /// The container's own process.
    pub main: Arc<Proc>,
    /// Its execs, by id.
    execs: Mutex<BTreeMap<String, Arc<Proc>>>,
    next_session: AtomicU64,
    events: Events,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cell id for containerd's container `id` in `namespace`: cell ids are letters and digits,
/// at most 32, and must not collide between namespaces.
pub fn cell_id(namespace: &str, id: &str) -> String {
    let digest = isocell_evidence::canonical::sha256_hex(format!("{namespace}/{id}").as_bytes());
    format!("ctr{}", &digest[..29])
}

/// What creating a container needs.
pub struct CreateRequest {
    /// containerd's id.
    pub id: String,
    /// containerd namespace.
    pub namespace: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// The snapshotter's mounts for the root (empty: the root is already in the bundle).
    pub rootfs: Vec<rootfs::RootMount>,
    /// The process's FIFOs.
    pub stdio: Stdio,
}

impl Container {
    /// Creates the container: for a pod's sandbox, nothing runs; otherwise its root becomes a
    /// converted image, the cell is planned and admitted (a denial names its policy), started
    /// and booted, and the spec's volumes are copied in. Its process starts on [`Self::start`].
    pub fn create(
        host: &HostConfig,
        req: CreateRequest,
        events: Events,
    ) -> Result<Arc<Container>, String> {
        let spec = oci::read_spec(&req.bundle)?;
        if spec.is_sandbox() {
            let main = Proc::new("", 0, None, req.stdio);
            return Ok(Arc::new(Container {
                id: req.id,
                bundle: req.bundle,
                pid: std::process::id(),
                cell: None,
                main,
                execs: Mutex::new(BTreeMap::new()),
                next_session: AtomicU64::new(2),
                events,
            }));
        }
        let process = oci::process(spec.process.as_ref().ok_or("the spec has no process")?)?;
        let stdio = Stdio {
            terminal: spec.process.as_ref().is_some_and(|p| p.terminal),
            ..req.stdio.clone()
        };
        let (cpus, memory) = oci::resources(&spec)?;
        let (constraints, network) = oci::constraints(&spec.annotations)?;
        let copy_ins = oci::copy_ins(&spec)?;
        let cell_id = cell_id(&req.namespace, &req.id);
        let image = root_image(host, &req, &spec)?;
        let kernel = isocell_host::locate::kernel(None).map_err(|e| e.to_string())?;
        let request = CellRequest {
            kernel,
            image: CellImage::Container(Box::new(ContainerImage { resolved: image, pinned: true })),
            cpus,
            memory,
            kernel_args: String::new(),
            max_lifetime_secs: constraints.max_lifetime_secs,
            constraints,
            network,
            snapshot: Default::default(),
            workload: Some(oci::workload(&spec, &req.namespace, &req.id)),
        };
        let policies = cell::PolicyLoad::start(&host.state_dir, &[]);
        let mut ev = cell::open_evidence(host, &cell_id).map_err(|e| e.to_string())?;
        let plan = cell::plan(host, &cell_id, request, &mut ev).map_err(|e| e.to_string())?;
        let admitted = Admitted::new(plan, ev, policies, None).map_err(|e| match e {
            CellError::Denied(why) => format!("isocell admission denied the container: {why}"),
            e => e.to_string(),
        })?;
        let mut cell = admitted.start(host, &process.argv).map_err(|e| e.to_string())?;
        let booted = cell.wait_ready(BOOT_LIMIT, &Cancel::new()).map(|_| ()).and_then(|()| {
            for c in &copy_ins {
                cell.put(&c.source, &c.destination, cell::deadline(COPY_LIMIT))?;
                cell.log(
                    "volume",
                    json!({ "source": c.source, "destination": c.destination, "readonly": c.readonly }),
                )?;
            }
            // Only once all are in: a writable volume may lie inside a read-only one.
            for c in copy_ins.iter().filter(|c| c.readonly) {
                cell.make_read_only(&c.destination, COPY_LIMIT)?;
            }
            Ok(())
        });
        if let Err(e) = booted {
            let verdict = Verdict { exit_code: None, outcome: "failed" };
            let _ = cell.delete(&verdict, &mut Discard);
            return Err(e.to_string());
        }
        let pid = cell.vmm_pid().unwrap_or(0);
        let sessions = cell.sessions(host);
        Ok(Arc::new(Container {
            id: req.id,
            bundle: req.bundle,
            pid,
            cell: Some(CellSide {
                cell: Mutex::new(Some(cell)),
                sessions,
                gone: watch::channel(false).0,
            }),
            main: Proc::new("", 1, Some(process), stdio),
            execs: Mutex::new(BTreeMap::new()),
            next_session: AtomicU64::new(2),
            events,
        }))
    }

    /// The process `exec_id` names (empty: the container's own).
    pub fn process(&self, exec_id: &str) -> Option<Arc<Proc>> {
        if exec_id.is_empty() {
            Some(self.main.clone())
        } else {
            lock(&self.execs).get(exec_id).cloned()
        }
    }

    /// Adds exec `exec_id` running `spec` (an OCI process); it starts on [`Self::start`].
    pub fn add_exec(
        &self,
        exec_id: &str,
        spec: &oci::SpecProcess,
        stdio: Stdio,
    ) -> Result<(), String> {
        if self.cell.is_none() {
            return Err("a pod's sandbox container runs no processes".into());
        }
        if self.main.now() != ProcState::Running {
            return Err("the container is not running".into());
        }
        let process = oci::process(spec)?;
        let mut execs = lock(&self.execs);
        if execs.contains_key(exec_id) {
            return Err(format!("exec {exec_id:?} already exists"));
        }
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let stdio = Stdio { terminal: spec.terminal, ..stdio };
        execs.insert(exec_id.to_owned(), Proc::new(exec_id, session, Some(process), stdio));
        Ok(())
    }

    /// Starts process `p`: its agent session, its output to its FIFOs, its input from its FIFO.
    pub fn start(self: &Arc<Self>, p: &Arc<Proc>) -> Result<(), String> {
        if p.now() != ProcState::Created {
            return Err("the process was already started".into());
        }
        let (Some(side), Some(process)) = (&self.cell, &p.process) else {
            p.state.send_replace(ProcState::Running);
            return Ok(());
        };
        let tty = p.stdio.terminal.then_some(WindowSize { rows: 24, cols: 80 });
        let stdin = !p.stdio.stdin.is_empty();
        // Opened before the session starts, so a FIFO that cannot be opened fails the start.
        let fifo = match stdin {
            true => Some(
                StdinFifo::open(Path::new(&p.stdio.stdin))
                    .map_err(|e| format!("opening stdin FIFO {}: {e}", p.stdio.stdin))?,
            ),
            false => None,
        };
        let (mut link, input, _guest_pid) = match side.sessions.exec(p.session, process, tty, stdin)
        {
            Ok(started) => started,
            Err(e) => {
                // As runc: a command that cannot run ends the process with the shell's status.
                let status = match &e {
                    CellError::Exec { kind: isocell_host::ExecFailure::NotFound, .. } => 127,
                    CellError::Exec { .. } => 126,
                    _ => 128,
                };
                self.exited(p, status);
                return Err(format!("starting {:?} in the cell: {e}", process.argv[0]));
            }
        };
        *lock(&p.input) = Some(input.clone());
        p.state.send_replace(ProcState::Running);
        if let Some(StdinFifo { reader, keep }) = fifo {
            *lock(&p.stdin_keep) = Some(keep);
            let _ = std::thread::Builder::new().name("stdin".into()).spawn(move || {
                forward_stdin(
                    reader,
                    |b| input.stdin(b).is_ok(),
                    || {
                        let _ = input.close_stdin();
                    },
                )
            });
        }
        let (this, p) = (self.clone(), p.clone());
        std::thread::Builder::new()
            .name(format!("session-{}", p.session))
            .spawn(move || {
                let mut sink = FifoSink::open(&p.stdio);
                let status = match command::stream(&mut link, &mut sink, None, &Cancel::new()) {
                    Ok(Termination::Exited(s)) => s.shell_code().clamp(0, 255) as u32,
                    // The link broke: the cell was torn down or its VMM killed.
                    _ => KILLED,
                };
                // The session is over: its connection closes before the cell may be torn down.
                drop(sink);
                lock(&p.input).take();
                lock(&p.stdin_keep).take();
                drop(link);
                this.exited(&p, status);
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok(())
    }

    /// Records that `p` ended; the container's own process ends the cell.
    fn exited(&self, p: &Arc<Proc>, status: u32) {
        let at = SystemTime::now();
        let first = p.state.send_if_modified(|s| {
            if matches!(s, ProcState::Exited { .. }) {
                return false;
            }
            *s = ProcState::Exited { status, at };
            true
        });
        if !first {
            return;
        }
        self.events.send(Event::exit(&self.id, &p.exec_id, self.pid, status, at));
        if p.exec_id.is_empty() {
            self.teardown(Some(status));
        }
    }

    /// Ends the cell (once): every session with it, then the VMM; signs the exit receipt.
    fn teardown(&self, status: Option<u32>) {
        let Some(side) = &self.cell else { return };
        let cell = lock(&side.cell).take();
        if let Some(cell) = cell {
            let verdict = Verdict {
                exit_code: status.map(|s| s as i32),
                outcome: if status.is_some() { "exited" } else { "deleted" },
            };
            let _ = cell.delete(&verdict, &mut Discard);
        }
        side.gone.send_replace(true);
    }

    /// Sends `signal` to process `p` (with `all`, to every process of the container).
    pub fn kill(&self, p: &Arc<Proc>, signal: u32, all: bool) -> Result<(), KillError> {
        let signal = i32::try_from(signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or(KillError::Invalid(format!("{signal} is not a signal")))?;
        match p.now() {
            ProcState::Exited { .. } => return Err(KillError::Finished),
            ProcState::Created => {
                self.exited(p, 128 + signal as u32);
                return Ok(());
            }
            ProcState::Running => {}
        }
        let Some(side) = &self.cell else {
            self.exited(p, 128 + signal as u32);
            return Ok(());
        };
        let mut targets = vec![p.clone()];
        if all {
            targets.extend(lock(&self.execs).values().cloned());
        }
        let mut result = Ok(());
        for t in targets.iter().filter(|t| t.now() == ProcState::Running) {
            if let Err(e) = side.sessions.signal(t.session, signal) {
                result = Err(e);
            }
        }
        if let Err(e) = result {
            // The process may have ended (and its cell with it) while the signal was on its
            // way, the end not yet recorded: then there is nothing left to signal, as asked.
            if p.ended_within(Duration::from_secs(2)) {
                return Ok(());
            }
            if signal != libc::SIGKILL || !p.exec_id.is_empty() {
                return Err(KillError::Cell(e.to_string()));
            }
            // The agent does not answer: a SIGKILL still ends the container, with its VMM.
            if let Some(cell) = lock(&side.cell).as_ref() {
                let _ = cell.signal_vmm(libc::SIGKILL);
            }
        }
        Ok(())
    }

    /// Resizes process `p`'s terminal.
    pub fn resize(&self, p: &Proc, rows: u16, cols: u16) -> Result<(), String> {
        match lock(&p.input).as_ref() {
            Some(i) => i.resize(WindowSize { rows, cols }).map_err(|e| e.to_string()),
            None => Err("the process is not running".into()),
        }
    }

    /// Closes process `p`'s standard input: once what its FIFO holds has reached it.
    pub fn close_stdin(&self, p: &Proc) -> Result<(), String> {
        // Dropping the shim's writer lets the forwarder see the FIFO's end after the client's
        // last bytes; closing the session here could overtake them (ctr calls CloseIO right
        // after its last write).
        if !p.stdio.stdin.is_empty() {
            lock(&p.stdin_keep).take();
            return Ok(());
        }
        match lock(&p.input).as_ref() {
            Some(i) => i.close_stdin().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// Removes exec `exec_id`, which must have ended (or never started).
    pub fn remove_exec(&self, exec_id: &str) -> Result<(), String> {
        let mut execs = lock(&self.execs);
        match execs.get(exec_id).map(|p| p.now()) {
            Some(ProcState::Running) => Err(format!("exec {exec_id:?} is still running")),
            Some(_) => {
                execs.remove(exec_id);
                Ok(())
            }
            None => Err(format!("no exec {exec_id:?}")),
        }
    }

    /// Ends the container for good: a process that never started is ended; waits until the
    /// cell is gone, then unmounts the root containerd prepared.
    pub fn finish(&self) {
        if self.main.now() == ProcState::Created {
            self.exited(&self.main, KILLED);
        }
        if let Some(side) = &self.cell {
            let gone = side.gone.subscribe();
            while !*gone.borrow() {
                // Teardown runs on the process's thread; it takes seconds at most.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        rootfs::unmount(&self.bundle.join("rootfs"));
    }

    /// The cell's cgroup v2 figures (none for a sandbox).
    pub fn cgroup_dir(&self) -> Option<PathBuf> {
        (self.cell.is_some() && self.pid != 0).then(|| crate::stats::cgroup_of(self.pid)).flatten()
    }
}

/// Why a kill did nothing.
#[derive(Debug)]
pub enum KillError {
    /// Not a signal.
    Invalid(String),
    /// The process has ended.
    Finished,
    /// The cell could not deliver it.
    Cell(String),
}

/// The root containerd prepared, as an image in IsoCell's store: mounted, copied into one
/// layer and converted (or found converted: the same tree is the same image), then unmounted.
fn root_image(host: &HostConfig, req: &CreateRequest, spec: &Spec) -> Result<Resolved, String> {
    let target = match spec.root.as_ref().map(|r| r.path.as_str()) {
        Some(p) if !p.is_empty() && Path::new(p).is_absolute() => PathBuf::from(p),
        Some(p) if !p.is_empty() => req.bundle.join(p),
        _ => req.bundle.join("rootfs"),
    };
    rootfs::mount_all(&req.rootfs, &target)?;
    let started = Instant::now();
    let converted = (|| {
        let store = Store::open(&host.state_dir).map_err(|e| e.to_string())?;
        let _using = store.using().map_err(|e| e.to_string())?;
        let tree = isocell_image::tree::import_tree(&store, &target)
            .map_err(|e| format!("reading the container's root: {e}"))?;
        let (record, dir, converted) =
            store
                .ensure_converted(&tree.manifest, &Limits::default())
                .map_err(|e| format!("converting the container's root: {e}"))?;
        store.touch(&tree.manifest);
        let name = spec
            .annotations
            .get("io.kubernetes.cri.image-name")
            .cloned()
            .unwrap_or_else(|| format!("containerd:{}/{}", req.namespace, req.id));
        Ok::<_, String>(Resolved {
            name,
            convert_ms: if converted { record.convert_ms } else { 0 },
            record,
            dir,
            fetched: false,
            converted,
            fetch_ms: started.elapsed().as_millis() as u64,
        })
    })();
    // The cell boots the converted image; the tree is containerd's again.
    if !req.rootfs.is_empty() {
        rootfs::unmount(&target);
    }
    converted
}

/// Output to the FIFOs, each opened read-write so opening never blocks on a reader that has
/// gone; closed when the process ends, which is the readers' end of file.
struct FifoSink {
    out: Option<File>,
    err: Option<File>,
}

impl FifoSink {
    fn open(stdio: &Stdio) -> FifoSink {
        let open = |p: &str| {
            (!p.is_empty())
                .then(|| OpenOptions::new().read(true).write(true).open(p).ok())
                .flatten()
        };
        FifoSink { out: open(&stdio.stdout), err: open(&stdio.stderr) }
    }
}

impl OutputSink for FifoSink {
    fn stdout(&mut self, bytes: &[u8]) {
        if let Some(f) = &mut self.out {
            if f.write_all(bytes).is_err() {
                self.out = None;
            }
        }
    }
    fn stderr(&mut self, bytes: &[u8]) {
        if let Some(f) = &mut self.err {
            if f.write_all(bytes).is_err() {
                self.err = None;
            }
        }
    }
    fn notice(&mut self, _line: &str) {}
}

/// Drops everything (teardown notices go to the audit log already).
struct Discard;

impl OutputSink for Discard {
    fn stdout(&mut self, _: &[u8]) {}
    fn stderr(&mut self, _: &[u8]) {}
    fn notice(&mut self, line: &str) {
        log::warn!("{line}");
    }
}

/// A process's stdin FIFO, opened by the shim: a reader for the forwarder and a writer the shim
/// holds until CloseIO.
struct StdinFifo {
    reader: File,
    keep: File,
}

impl StdinFifo {
    /// Opens both ends without blocking, whether or not the client has opened its end yet.
    fn open(path: &Path) -> std::io::Result<StdinFifo> {
        use std::os::unix::fs::OpenOptionsExt;
        // A non-blocking reader first, so the writer's open finds a reader and does not block;
        // then a blocking reader (there is a writer now), and the first reader goes.
        let probe = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
        let keep = OpenOptions::new().write(true).open(path)?;
        let reader = File::open(path)?;
        drop(probe);
        Ok(StdinFifo { reader, keep })
    }
}

/// Copies the stdin FIFO into the process until every writer has closed it (the client's, and
/// the shim's at CloseIO), then closes the process's stdin. Stops early if `send` fails.
fn forward_stdin(mut fifo: File, mut send: impl FnMut(&[u8]) -> bool, close: impl FnOnce()) {
    let mut buf = vec![0u8; isocell_proto::MAX_CHUNK];
    loop {
        match fifo.read(&mut buf) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
            Ok(n) => {
                if !send(&buf[..n]) {
                    return;
                }
            }
        }
    }
    close();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::mpsc;

    fn fifo(dir: &Path) -> PathBuf {
        let path = dir.join("stdin");
        let made = std::process::Command::new("mkfifo").arg(&path).status().unwrap();
        assert!(made.success());
        path
    }

    /// Starts a forwarder; its channel gets each chunk, then `None` when it closes stdin.
    fn forwarder(reader: File) -> (std::thread::JoinHandle<()>, mpsc::Receiver<Option<Vec<u8>>>) {
        let (tx, rx) = mpsc::channel();
        let close = tx.clone();
        let handle = std::thread::spawn(move || {
            forward_stdin(
                reader,
                |b| tx.send(Some(b.to_vec())).is_ok(),
                move || {
                    close.send(None).unwrap();
                },
            )
        });
        (handle, rx)
    }

    fn written(rx: &mpsc::Receiver<Option<Vec<u8>>>) -> (Vec<u8>, bool) {
        let (mut data, mut closed) = (Vec::new(), false);
        while let Ok(m) = rx.try_recv() {
            match m {
                Some(b) => data.extend(b),
                None => closed = true,
            }
        }
        (data, closed)
    }

    #[test]
    fn close_io_right_after_the_last_write_loses_nothing() {
        for _ in 0..50 {
            let dir = tempfile::tempdir().unwrap();
            let path = fifo(dir.path());
            let StdinFifo { reader, keep } = StdinFifo::open(&path).unwrap();
            let (handle, rx) = forwarder(reader);
            // As ctr: write, then CloseIO at once, its own end closed after.
            let mut client = OpenOptions::new().write(true).open(&path).unwrap();
            client.write_all(b"piped\n").unwrap();
            drop(keep);
            drop(client);
            handle.join().unwrap();
            assert_eq!(written(&rx), (b"piped\n".to_vec(), true));
        }
    }

    #[test]
    fn a_client_closing_its_end_is_not_the_end_of_input_until_close_io() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path());
        let StdinFifo { reader, keep } = StdinFifo::open(&path).unwrap();
        let (handle, rx) = forwarder(reader);
        let mut first = OpenOptions::new().write(true).open(&path).unwrap();
        first.write_all(b"one ").unwrap();
        drop(first);
        std::thread::sleep(Duration::from_millis(200));
        assert!(!handle.is_finished(), "input ended when the client closed its end");
        // A client that attaches again is still heard.
        let mut second = OpenOptions::new().write(true).open(&path).unwrap();
        second.write_all(b"two").unwrap();
        drop(second);
        drop(keep);
        handle.join().unwrap();
        assert_eq!(written(&rx), (b"one two".to_vec(), true));
    }

    #[test]
    fn opening_a_missing_fifo_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        assert!(StdinFifo::open(&dir.path().join("absent")).is_err());
    }
}
