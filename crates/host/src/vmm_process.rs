//! One cell's host side: its private directory (vsock sockets, console log, VMM report), the
//! VMM process (or the jailer whose child it is), and teardown. Dropping a [`Vmm`] kills a VMM
//! that is still running and removes the directory, so no early return leaves anything behind.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use isocell_jail::cgroup::{self, CellCgroup, CgroupError};
use isocell_proto::AGENT_PORT;
use isocell_spec::VmConfig;

use crate::confine::{host_dirs, JailPlan};
use crate::error::io;

/// Why a cell's VMM could not be set up and started, or did not bring its agent up.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A file system or process operation failed.
    #[error(transparent)]
    Io(#[from] crate::error::PathError),
    /// A directory of the run directory's path could not be looked at.
    #[error("{}: {source}", path.display())]
    Inspect {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The run directory could be changed by someone other than root.
    #[error(
        "the run directory {} is not safe for jailed cells: {} must be owned by root and \
         writable only by root (set ISOCELL_RUN_DIR to such a directory, default /run/isocell)",
        dir.display(),
        at.display()
    )]
    UnsafeRunDir {
        /// The run directory.
        dir: PathBuf,
        /// The directory on its path that is not root's alone.
        at: PathBuf,
    },
    /// The owner file could not be locked.
    #[error("cannot lock {}", path.display())]
    Lock {
        /// The owner file.
        path: PathBuf,
    },
    /// The VMM's log could not be created.
    #[error("cannot create the VMM log: {0}")]
    Log(#[source] std::io::Error),
    /// A path could not be given to the jail's user.
    #[error("cannot hand {} to the jail: {source}", path.display())]
    Chown {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The cell's cgroup could not be created.
    #[error("cannot create the cell's cgroup: {0}")]
    Cgroup(#[source] CgroupError),
    /// The VM configuration or jail spec could not be serialized.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// The cell was started without an agent socket.
    #[error("the cell has no agent socket")]
    NoAgentSocket,
    /// The agent's socket could not be set up.
    #[error("agent socket: {0}")]
    AgentSocket(#[source] std::io::Error),
    /// Accepting the agent's connection failed.
    #[error("waiting for the agent: {0}")]
    Accept(#[source] std::io::Error),
    /// The VMM exited before the agent connected.
    #[error("the cell stopped before its agent came up (VMM {status}){diagnostics}")]
    Stopped {
        /// The VMM's exit status.
        status: ExitStatus,
        /// The VMM's log and console tail ([`Vmm::diagnostics`]).
        diagnostics: String,
    },
    /// The wait was interrupted.
    #[error("interrupted while the cell was booting")]
    Interrupted,
    /// The agent did not connect in time.
    #[error("the agent did not come up within {secs} s{diagnostics}")]
    NoAgent {
        /// The boot timeout.
        secs: u64,
        /// The VMM's log and console tail ([`Vmm::diagnostics`]).
        diagnostics: String,
    },
    /// A cell's directory is still owned by a live process (see [`sweep_one`]).
    #[error("cell {0} still has a live owner")]
    LiveOwner(String),
}

/// Teardown facts, each checked rather than assumed.
#[derive(Debug, serde::Serialize)]
pub struct TeardownChecks {
    /// The VMM process has exited and was reaped: its pidfd reports it gone and, when jailed,
    /// its cgroup holds no process.
    pub vmm_process_gone: bool,
    /// The VMM's address space, and with it guest memory, is released (the pidfd no longer
    /// refers to a live or zombie process; the cell's cgroup is empty).
    pub guest_memory_released: bool,
    /// The cell's cgroup no longer exists (true when unjailed: there was none).
    pub cgroup_removed: bool,
    /// The cell's run directory (jail root, sockets, console log, VM config, reports) no
    /// longer exists.
    pub cell_files_removed: bool,
}

impl TeardownChecks {
    /// Whether every fact holds.
    pub fn all_hold(&self) -> bool {
        self.vmm_process_gone
            && self.guest_memory_released
            && self.cgroup_removed
            && self.cell_files_removed
    }
}

/// A cell's VMM process and host directory, running or stopped.
pub struct Vmm {
    /// The cell's host directory.
    dir: PathBuf,
    /// The directory shared with the VMM.
    shared: PathBuf,
    /// The VMM, or the jailer whose child it is.
    vmm: Option<Child>,
    /// Readable when the VMM has exited (a pidfd), so waits block instead of polling: in the
    /// nested host every wake-up is paid for by the guest's vCPU.
    vmm_exited: Option<OwnedFd>,
    /// A pidfd of the VMM itself (the jailer's child, when jailed), taken as soon as its pid
    /// is known: signals go through it, never to a pid that may have been reused.
    vmm_pidfd: Option<OwnedFd>,
    agent_listener: Option<UnixListener>,
    /// Host vsock ports the cell's services listen on (egress, DNS), bound before the VMM runs.
    host_listeners: Vec<(u32, UnixListener)>,
    vmm_status: Option<ExitStatus>,
    cgroup: Option<CellCgroup>,
    /// The locked owner file: while it is open, no sweep takes this cell for abandoned.
    owner: Option<File>,
    /// The jailer's standard output, on which it reports the VMM's pid once it has forked it.
    jailer_report: Option<std::process::ChildStdout>,
}

/// The file in a cell's directory naming the `isocell` process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// Removes what cells of `isocell` processes that no longer exist left behind (they were
/// killed before they could tear down): their cgroups and directories. Returns their ids.
pub fn sweep_stale(run_dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(dir) = fs::read_dir(run_dir) else { return removed };
    for entry in dir.flatten() {
        // The owner holds an exclusive lock on its owner file for the cell's whole life; a
        // directory without one is being created right now.
        let Ok(owner) = File::open(entry.path().join(OWNER_FILE)) else { continue };
        if !try_lock(&owner) {
            continue;
        }
        let id = entry.file_name().to_string_lossy().into_owned();
        let _ = cgroup::remove(&CellCgroup::path_for(&cgroup::root(), &id));
        if fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(id);
        }
    }
    removed
}

/// Removes what cell `id` left behind if its owner is gone (its cgroup, killing anything in it,
/// and its directory). Returns the teardown facts, or `None` if the cell's owner still lives.
pub fn sweep_one(run_dir: &Path, id: &str) -> Option<TeardownChecks> {
    let dir = run_dir.join(id);
    if let Ok(owner) = File::open(dir.join(OWNER_FILE)) {
        if !try_lock(&owner) {
            return None;
        }
    }
    let cg = CellCgroup::path_for(&cgroup::root(), id);
    let cgroup_removed = cgroup::remove(&cg).is_ok() && !cg.exists();
    let _ = fs::remove_dir_all(&dir);
    Some(TeardownChecks {
        // An emptied, removed cgroup held the VMM and all it made.
        vmm_process_gone: cgroup_removed,
        guest_memory_released: cgroup_removed,
        cgroup_removed,
        cell_files_removed: !dir.exists(),
    })
}

/// Takes an exclusive lock on `file` without waiting; false if someone holds it.
fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a descriptor we own; the lock goes when it is closed.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Creates the owner file of the cell in `dir`, locked for as long as the returned file is
/// open: created and locked under a temporary name, then renamed, so a sweep never sees it
/// unlocked.
fn own(dir: &Path) -> Result<File, VmmError> {
    let tmp = dir.join("owner.tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    if !try_lock(&f) {
        return Err(VmmError::Lock { path: tmp });
    }
    use std::io::Write;
    f.write_all(std::process::id().to_string().as_bytes())
        .and_then(|()| fs::rename(&tmp, dir.join(OWNER_FILE)))
        .map_err(io("write the owner of", dir))?;
    Ok(f)
}

/// Refuses a directory that anyone but root could change: `dir` and each directory above it
/// must be owned by root and not writable by group or others (unless sticky, like /tmp). The
/// jailer runs as root on what is written there.
fn check_root_only(dir: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::MetadataExt;
    let inspect = |path: &Path| {
        let path = path.to_owned();
        move |source| VmmError::Inspect { path, source }
    };
    let real = dir.canonicalize().map_err(inspect(dir))?;
    for d in real.ancestors() {
        let m = fs::metadata(d).map_err(inspect(d))?;
        let sticky = m.mode() & 0o1000 != 0;
        if m.uid() != 0 || (m.mode() & 0o022 != 0 && !(sticky && d != real)) {
            return Err(VmmError::UnsafeRunDir { dir: dir.to_owned(), at: d.to_owned() });
        }
    }
    Ok(())
}

/// Reads at most `max` bytes of a file the VMM could have written, refusing anything but a
/// plain file (a link, a FIFO or a device put there must not make us read or block on it).
fn read_cell_file(path: &Path, max: u64) -> Option<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut f = f;
    let _ = f.seek(SeekFrom::Start(meta.len().saturating_sub(max)));
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// The parent of process `pid` (field 4 of `/proc/PID/stat`, after the command's closing
/// parenthesis, which a command name may itself contain).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A pidfd for `pid`, readable once the process exits.
fn pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it touches
    // no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let fd = RawFd::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The two teardown facts about the VMM (process gone, address space released) as the kernel
/// reports them through its pidfd: signal 0
/// fails with ESRCH once the process has exited, and its fdinfo shows `Pid: -1` once it has been
/// reaped and its memory freed.
fn pidfd_checks(fd: &OwnedFd) -> (bool, bool) {
    // SAFETY: pidfd_send_signal with signal 0 only checks the target; null info is allowed.
    let r = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), 0, std::ptr::null::<u8>(), 0)
    };
    let gone = r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    let fdinfo =
        fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap_or_default();
    let released = fdinfo.lines().any(|l| l.split_whitespace().eq(["Pid:", "-1"]));
    (gone, released)
}

/// Waits until one of `fds` is readable or `timeout` passes; returns which were readable.
fn wait_readable(fds: &[RawFd], timeout: Duration) -> Vec<bool> {
    let mut polls: Vec<libc::pollfd> =
        fds.iter().map(|fd| libc::pollfd { fd: *fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `polls` is a valid array of `polls.len()` pollfd structs that outlives the call.
    let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    polls.iter().map(|p| p.revents != 0).collect()
}

/// A new random cell id (12 hex digits).
pub fn new_id() -> String {
    let mut bytes = [0u8; 6];
    if File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes.copy_from_slice(&(nanos as u64 ^ u64::from(std::process::id())).to_le_bytes()[..6]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Vmm {
    /// Creates the cell's directory under `run_dir`, listens for the agent and starts `vmm`
    /// with `config`, inside `jail` when given. `extra_args` go to the VMM as well (a snapshot
    /// to save or restore, the seccomp probe test aid of
    /// [`crate::HostConfig::seccomp_probe`]).
    ///
    /// The VMM (or its jailer) dies with the *thread* that calls this (the parent-death signal
    /// follows the forking thread): call it from a thread that lives as long as the cell.
    pub fn start(
        run_dir: &Path,
        id: &str,
        vmm: &Path,
        config: &VmConfig,
        jail: Option<&JailPlan>,
        host_ports: &[u32],
        extra_args: &[String],
    ) -> Result<Vmm, VmmError> {
        let mut probe: Vec<String> = extra_args.to_vec();
        // A developer's debugging aid: name a refused call (trap) or let it pass and log it.
        if let Ok(mode) = std::env::var("ISOCELL_VMM_SECCOMP") {
            probe.extend(["--seccomp".into(), mode]);
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(run_dir)
            .map_err(io("create", run_dir))?;
        let (dir, shared, root) = host_dirs(run_dir, id);
        if jail.is_some() {
            check_root_only(run_dir)?;
        }
        fs::DirBuilder::new().mode(0o700).create(&dir).map_err(io("create", &dir))?;
        let mut cell = Vmm {
            dir: dir.clone(),
            shared: shared.clone(),
            vmm: None,
            vmm_exited: None,
            vmm_pidfd: None,
            agent_listener: None,
            host_listeners: Vec::new(),
            owner: None,
            vmm_status: None,
            cgroup: None,
            jailer_report: None,
        };
        // From here on, dropping `cell` removes everything made so far.
        cell.owner = Some(own(&dir)?);
        fs::DirBuilder::new().mode(0o700).create(&shared).map_err(io("create", &shared))?;
        // The agent dials host port AGENT_PORT; the VMM connects that to `vsock.sock_PORT`.
        let agent_path = shared.join(format!("vsock.sock_{AGENT_PORT}"));
        let listener = UnixListener::bind(&agent_path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(io("listen on", &agent_path))?;
        // The cell's other host services (egress, DNS) listen the same way, before the VMM runs.
        let mut socket_paths = vec![agent_path.clone()];
        for &port in host_ports {
            let path = shared.join(format!("vsock.sock_{port}"));
            let l = UnixListener::bind(&path).map_err(io("listen on", &path))?;
            cell.host_listeners.push((port, l));
            socket_paths.push(path);
        }
        let config_path = shared.join("vm.json");
        let json = serde_json::to_string_pretty(config)?;
        fs::write(&config_path, json).map_err(io("write", &config_path))?;
        let vmm_log = File::create(dir.join("vmm.log")).map_err(VmmError::Log)?;

        let mut cmd = match jail {
            Some(j) => {
                // The jailed VMM owns the shared directory and may connect to the agent socket.
                let (uid, gid) = (Some(j.spec.uid), Some(j.spec.gid));
                for p in std::iter::once(&shared).chain(&socket_paths) {
                    std::os::unix::fs::chown(p, uid, gid)
                        .map_err(|source| VmmError::Chown { path: p.clone(), source })?;
                }
                fs::create_dir(&root).map_err(io("create", &root))?;
                let cg =
                    CellCgroup::create(&cgroup::root(), id, &j.limits).map_err(VmmError::Cgroup)?;
                let mut spec = j.spec.clone();
                spec.cgroup = Some(cg.path().to_owned());
                spec.parent = Some(std::process::id());
                spec.argv.extend(probe.iter().cloned());
                cell.cgroup = Some(cg);
                let spec_path = dir.join("jail.json");
                let text = serde_json::to_string_pretty(&spec)?;
                fs::write(&spec_path, text).map_err(io("write", &spec_path))?;
                let mut cmd = Command::new(&j.jailer);
                cmd.arg(&spec_path);
                cmd
            }
            None => {
                let mut cmd = Command::new(vmm);
                cmd.arg("--config").arg(&config_path);
                cmd.arg("--report").arg(shared.join("vmm-report.json"));
                cmd.args(&probe);
                cmd
            }
        };
        let stdout = if jail.is_some() { Stdio::piped() } else { Stdio::null() };
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(vmm_log);
        // Its own process group keeps a terminal's Ctrl-C for us (we tear the cell down in
        // order); the parent-death signal takes the VMM down if we die without tearing down
        // (or if the thread that started it ends: see `start`). The jailer sets that signal
        // itself (`JailSpec::parent`), so its start needs no hook in a forked child and the
        // standard library spawns it with posix_spawn, without copying this process's page
        // tables (milliseconds under emulation) and write-protecting its memory.
        cmd.process_group(0);
        if jail.is_none() {
            // SAFETY: the hook runs in the forked child before exec and only calls prctl,
            // which is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cell.agent_listener = Some(listener);
        let program = jail.map_or(vmm, |j| j.jailer.as_path()).to_owned();
        let mut child = cmd.spawn().map_err(io("start", &program))?;
        cell.jailer_report = child.stdout.take();
        cell.vmm_exited = pidfd(child.id());
        cell.vmm = Some(child);
        Ok(cell)
    }

    /// Waits for the agent to connect, for at most `timeout`; `interrupted` is polled to give
    /// up early. A VMM that exits first, or silence past the timeout, is an error that carries
    /// the console's tail.
    pub fn wait_for_agent(
        &mut self,
        timeout: Duration,
        interrupted: impl Fn() -> bool,
    ) -> Result<UnixStream, VmmError> {
        let start = Instant::now();
        let listener = self.agent_listener.take().ok_or(VmmError::NoAgentSocket)?;
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).map_err(VmmError::AgentSocket)?;
                    return Ok(s);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(VmmError::Accept(e)),
            }
            if let Some(status) = self.try_wait_vmm() {
                return Err(VmmError::Stopped { status, diagnostics: self.diagnostics() });
            }
            if interrupted() {
                return Err(VmmError::Interrupted);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(VmmError::NoAgent {
                    secs: timeout.as_secs(),
                    diagnostics: self.diagnostics(),
                });
            }
            // Wake for the agent, the VMM's exit, or every 100 ms to look at `interrupted`.
            let mut fds = vec![listener.as_raw_fd()];
            fds.extend(self.vmm_exited.as_ref().map(|f| f.as_raw_fd()));
            wait_readable(&fds, left.min(Duration::from_millis(100)));
        }
    }

    /// A descriptor that becomes readable when the VMM (or its jailer) exits.
    pub fn exit_fd(&self) -> Option<RawFd> {
        self.vmm_exited.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The VMM's exit status, once it has exited (never blocks).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.try_wait_vmm()
    }

    fn try_wait_vmm(&mut self) -> Option<ExitStatus> {
        if self.vmm_status.is_none() {
            if let Some(child) = &mut self.vmm {
                if let Ok(Some(s)) = child.try_wait() {
                    self.vmm_status = Some(s);
                    self.vmm = None;
                }
            }
        }
        self.vmm_status
    }

    /// The VMM's error log and the console's last lines, for error messages.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        let vmm_log = fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default();
        if let Some(why) = self.vmm_status.and_then(explain_status) {
            out.push('\n');
            out.push_str(&why);
        }
        if !vmm_log.trim().is_empty() {
            out.push_str("\n--- VMM ---\n");
            out.push_str(vmm_log.trim_end());
        }
        let console = tail(&self.shared.join("console.log"), 30);
        if !console.trim().is_empty() {
            out.push_str("\n--- console (last 30 lines) ---\n");
            out.push_str(console.trim_end());
        }
        out
    }

    /// The listener bound for host vsock port `port` (once).
    pub fn take_listener(&mut self, port: u32) -> Option<UnixListener> {
        let i = self.host_listeners.iter().position(|(p, _)| *p == port)?;
        Some(self.host_listeners.swap_remove(i).1)
    }

    /// The VMM's socket for host-initiated vsock connections (`CONNECT PORT`).
    pub fn vsock_path(&self) -> PathBuf {
        self.shared.join("vsock.sock")
    }

    /// Waits up to `grace` for the VMM to exit by itself, then kills it. Returns its status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_wait_vmm() {
                return Some(s);
            }
            let left = grace.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            match &self.vmm_exited {
                Some(fd) => {
                    wait_readable(&[fd.as_raw_fd()], left);
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        self.kill();
        self.vmm_status
    }

    /// Kills the VMM if it still runs. A jailer is asked first (SIGTERM): it kills the VMM and
    /// reaps it before it exits, so no orphan is left for the host's init to reap. Whatever
    /// is still there after a moment goes with everything in the cell's cgroup.
    fn kill(&mut self) {
        if let Some(mut child) = self.vmm.take() {
            if let (Some(_), Ok(pid)) = (&self.cgroup, libc::pid_t::try_from(child.id())) {
                // SAFETY: kill only sends a signal to our own child, which we have not reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                if let Some(fd) = &self.vmm_exited {
                    wait_readable(&[fd.as_raw_fd()], Duration::from_secs(2));
                }
            }
            if let Some(cg) = &self.cgroup {
                let _ = cg.kill_all();
            }
            let _ = child.kill();
            self.vmm_status = child.wait().ok();
        }
    }

    /// The VMM's process id as this host sees it, while it runs. A jailed VMM is the
    /// jailer's child: the jailer reports its pid once it has forked it (waited for up to
    /// `wait`).
    pub fn vmm_pid(&mut self, wait: Duration) -> Option<u32> {
        let Some(mut report) = self.jailer_report.take() else {
            let pid = self.vmm.as_ref().map(Child::id)?;
            self.vmm_pidfd = pidfd(pid);
            return Some(pid);
        };
        let mut line = Vec::new();
        let start = Instant::now();
        let mut buf = [0u8; 16];
        while !line.contains(&b'\n') && line.len() < 16 {
            let left = wait.saturating_sub(start.elapsed());
            if left.is_zero() || !wait_readable(&[report.as_raw_fd()], left)[0] {
                return None;
            }
            match report.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => line.extend_from_slice(&buf[..n]),
            }
        }
        let pid: u32 = std::str::from_utf8(&line).ok()?.trim().parse().ok()?;
        // The pid is the jailer's child's for as long as the jailer has not reaped it; a pidfd
        // taken now, and checked to be of that child, stays that process's.
        let jailer = self.vmm.as_ref().map(Child::id)?;
        let fd = pidfd(pid)?;
        if parent_of(pid) != Some(jailer) {
            return None;
        }
        self.vmm_pidfd = Some(fd);
        Some(pid)
    }

    /// Sends `signal` to the VMM through its pidfd (see [`Vmm::vmm_pid`], which takes it).
    pub fn signal_vmm(&self, signal: i32) -> std::io::Result<()> {
        let fd = self.vmm_pidfd.as_ref().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "the VMM's pid is not known")
        })?;
        // SAFETY: pidfd_send_signal takes a pidfd this struct owns, a signal number, no
        // siginfo and no flags; it touches no memory of ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Ends the cell (killing a VMM still running), removes its cgroup and directory, and
    /// checks that each is gone. Also returns how often the cell hit its memory limit.
    pub fn teardown(mut self) -> (TeardownChecks, u64) {
        self.kill();
        let (mut gone, mut released) = match &self.vmm_exited {
            Some(fd) => pidfd_checks(fd),
            None => (self.vmm_status.is_some(), self.vmm_status.is_some()),
        };
        gone &= self.vmm.is_none();
        let (mut cgroup_removed, mut oom_kills) = (true, 0);
        if let Some(cg) = self.cgroup.take() {
            oom_kills = cg.oom_kills();
            // Anything of the cell still in its cgroup (the VMM, if the jailer died first)
            // means the VMM was not gone; remove kills it.
            let empty = cg.wait_empty(Duration::from_secs(2));
            gone &= empty;
            released &= empty;
            let path = cg.path().to_owned();
            cgroup_removed = cg.destroy().is_ok() && !path.exists();
        }
        let _ = fs::remove_dir_all(&self.dir);
        let checks = TeardownChecks {
            vmm_process_gone: gone,
            guest_memory_released: released,
            cgroup_removed,
            cell_files_removed: !self.dir.exists(),
        };
        (checks, oom_kills)
    }

    /// The VMM's run report (boot phases, memory), once it has exited.
    pub fn vmm_report(&self) -> Option<serde_json::Value> {
        let bytes = read_cell_file(&self.shared.join("vmm-report.json"), 1 << 20)?;
        serde_json::from_slice(&bytes).ok()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.destroy();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What a VMM exit status means, when it is not one of the VMM's own (see `isocell-vmm --help`).
pub fn explain_status(status: ExitStatus) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (_, Some(libc::SIGSYS)) => Some(
            "the VMM was killed by SIGSYS: its seccomp filter stopped a system call it may not make"
                .into(),
        ),
        (_, Some(libc::SIGKILL)) => {
            Some("the VMM was killed by SIGKILL (by a person, isocell, or the OOM killer)".into())
        }
        (_, Some(sig)) => Some(format!("the VMM was killed by signal {sig}")),
        (Some(isocell_jail::EXIT_JAIL_FAILED), _) => {
            Some("the jail could not be set up (the VMM never ran); see the VMM log".into())
        }
        _ => None,
    }
}

/// The last `max` bytes of cell `id`'s console log (the guest wrote it: read as a plain file
/// only, bounded).
pub fn console_tail(run_dir: &Path, id: &str, max: u64) -> Option<Vec<u8>> {
    let (_, shared, _) = host_dirs(run_dir, id);
    read_cell_file(&shared.join("console.log"), max)
}

/// The last `lines` lines of a file, reading at most its last 16 KiB.
fn tail(path: &Path, lines: usize) -> String {
    let buf = read_cell_file(path, 16 * 1024).unwrap_or_default();
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_parent_comes_from_proc_stat() {
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() } as u32;
        assert_eq!(parent_of(std::process::id()), Some(parent));
        assert_eq!(parent_of(u32::MAX), None);
    }

    #[test]
    fn a_signal_needs_a_known_vmm() {
        // Never created; dropping the Vmm removes it if it were.
        let dir = std::env::temp_dir().join(format!("isocell-no-vmm-{}", std::process::id()));
        let vmm = Vmm {
            dir: dir.clone(),
            shared: dir,
            vmm: None,
            vmm_exited: None,
            vmm_pidfd: None,
            agent_listener: None,
            host_listeners: Vec::new(),
            vmm_status: None,
            cgroup: None,
            owner: None,
            jailer_report: None,
        };
        assert_eq!(vmm.signal_vmm(0).unwrap_err().kind(), std::io::ErrorKind::NotFound);
    }
}
