//! One cell's host side: its private directory (vsock sockets, console log, VMM report), the
//! VMM process, and teardown. Dropping a [`Cell`] kills a VMM that is still running and removes
//! the directory, so no path out of `isocell run` leaves anything behind.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use isocell_proto::AGENT_PORT;
use isocell_spec::{ConsoleConfig, DriveConfig, VmConfig, VsockConfig};

/// The guest's vsock context id; each VMM has its own vsock namespace, so every cell uses 3.
const GUEST_CID: u64 = 3;

/// What a cell is built from.
pub struct CellSpec<'a> {
    /// Cell kernel.
    pub kernel: &'a Path,
    /// Root image, attached read-only.
    pub image: &'a Path,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Extra kernel arguments.
    pub kernel_args: &'a str,
    /// Hard limit on the VM's life.
    pub max_lifetime_secs: Option<u64>,
}

/// The directory of cell `id` under `run_dir`.
pub fn cell_dir(run_dir: &Path, id: &str) -> PathBuf {
    run_dir.join(id)
}

/// The exact VM configuration the VMM of cell `id` is started with.
pub fn vm_config(run_dir: &Path, id: &str, spec: &CellSpec) -> VmConfig {
    let dir = cell_dir(run_dir, id);
    let mut c = VmConfig::new(spec.kernel);
    c.vcpus = spec.cpus;
    c.memory_mib = spec.memory_mib;
    c.boot_args = format!("quiet {}", spec.kernel_args).trim_end().to_owned();
    c.console = ConsoleConfig::File(dir.join("console.log"));
    c.drives = vec![DriveConfig {
        id: "root".into(),
        path: spec.image.to_owned(),
        read_only: true,
        root: true,
        placement: None,
    }];
    c.vsock = Some(VsockConfig { guest_cid: GUEST_CID, uds_path: dir.join("vsock.sock") });
    c.max_lifetime_secs = spec.max_lifetime_secs;
    c
}

/// What the launch measurement sees of a configuration: per-cell paths (its sockets and
/// console under the cell's directory) become `{cell}/...`, so two launches of the same thing
/// measure the same.
pub fn measured_config(config: &VmConfig, run_dir: &Path, id: &str) -> serde_json::Value {
    let prefix = cell_dir(run_dir, id).to_string_lossy().into_owned();
    let mut v = serde_json::to_value(config).unwrap_or_default();
    fn walk(v: &mut serde_json::Value, prefix: &str) {
        match v {
            serde_json::Value::String(s) if s.starts_with(prefix) => {
                *s = format!("{{cell}}{}", &s[prefix.len()..]);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| walk(x, prefix)),
            serde_json::Value::Object(o) => o.values_mut().for_each(|x| walk(x, prefix)),
            _ => {}
        }
    }
    walk(&mut v, &prefix);
    v
}

/// Teardown facts, each checked rather than assumed.
#[derive(Debug, serde::Serialize)]
pub struct TeardownChecks {
    /// The VMM process has exited and was reaped (its pidfd reports it gone).
    pub vmm_process_gone: bool,
    /// The VMM's address space, and with it guest memory, is released (the pidfd no longer
    /// refers to a live or zombie process).
    pub guest_memory_released: bool,
    /// The cell's run directory (sockets, console log, VM config, reports) no longer exists.
    pub cell_files_removed: bool,
}

/// A running (or stopped) cell.
pub struct Cell {
    dir: PathBuf,
    vmm: Option<Child>,
    /// Readable when the VMM has exited (a pidfd), so waits block instead of polling: in the
    /// nested host every wake-up is paid for by the guest's vCPU.
    vmm_exited: Option<OwnedFd>,
    agent_listener: UnixListener,
    vmm_status: Option<ExitStatus>,
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

impl Cell {
    /// Creates the cell's directory under `run_dir`, listens for the agent and starts `vmm`
    /// with `config` (from [`vm_config`]).
    pub fn start(run_dir: &Path, id: &str, vmm: &Path, config: &VmConfig) -> Result<Cell, String> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(run_dir)
            .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
        let id = id.to_owned();
        let dir = cell_dir(run_dir, &id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // The agent dials host port AGENT_PORT; the VMM connects that to `vsock.sock_PORT`.
        let agent_path = dir.join(format!("vsock.sock_{AGENT_PORT}"));
        let cleanup = |e: String| {
            let _ = fs::remove_dir_all(&dir);
            e
        };
        let agent_listener = UnixListener::bind(&agent_path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| cleanup(format!("cannot listen on {}: {e}", agent_path.display())))?;
        let vmm_log = File::create(dir.join("vmm.log"))
            .map_err(|e| cleanup(format!("cannot create the VMM log: {e}")))?;

        let config_path = dir.join("vm.json");
        let json = serde_json::to_string_pretty(config).map_err(|e| cleanup(e.to_string()))?;
        fs::write(&config_path, json)
            .map_err(|e| cleanup(format!("cannot write {}: {e}", config_path.display())))?;
        let mut cmd = Command::new(vmm);
        cmd.arg("--config").arg(&config_path);
        cmd.arg("--report").arg(dir.join("vmm-report.json"));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(vmm_log);
        // Its own process group keeps a terminal's Ctrl-C for us (we tear the cell down in
        // order); the parent-death signal takes the VMM down if we die without tearing down.
        cmd.process_group(0);
        // SAFETY: the hook runs in the forked child before exec and only calls prctl, which is
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let vmm =
            cmd.spawn().map_err(|e| cleanup(format!("cannot start {}: {e}", vmm.display())))?;
        let vmm_exited = pidfd(vmm.id());
        Ok(Cell { dir, vmm: Some(vmm), vmm_exited, agent_listener, vmm_status: None })
    }

    /// Waits for the agent to connect, for at most `timeout`; `interrupted` is polled to give
    /// up early. A VMM that exits first, or silence past the timeout, is an error that carries
    /// the console's tail.
    pub fn wait_for_agent(
        &mut self,
        timeout: Duration,
        interrupted: impl Fn() -> bool,
    ) -> Result<UnixStream, String> {
        let start = Instant::now();
        loop {
            match self.agent_listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).map_err(|e| format!("agent socket: {e}"))?;
                    return Ok(s);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("waiting for the agent: {e}")),
            }
            if let Some(status) = self.try_wait_vmm() {
                return Err(format!(
                    "the cell stopped before its agent came up (VMM {status}){}",
                    self.diagnostics()
                ));
            }
            if interrupted() {
                return Err("interrupted while the cell was booting".into());
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(format!(
                    "the agent did not come up within {} s{}",
                    timeout.as_secs(),
                    self.diagnostics()
                ));
            }
            // Wake for the agent, the VMM's exit, or every 100 ms to look at `interrupted`.
            let mut fds = vec![self.agent_listener.as_raw_fd()];
            fds.extend(self.vmm_exited.as_ref().map(|f| f.as_raw_fd()));
            wait_readable(&fds, left.min(Duration::from_millis(100)));
        }
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
        if !vmm_log.trim().is_empty() {
            out.push_str("\n--- VMM ---\n");
            out.push_str(vmm_log.trim_end());
        }
        let console = tail(&self.dir.join("console.log"), 30);
        if !console.trim().is_empty() {
            out.push_str("\n--- console (last 30 lines) ---\n");
            out.push_str(console.trim_end());
        }
        out
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

    fn kill(&mut self) {
        if let Some(mut child) = self.vmm.take() {
            let _ = child.kill();
            self.vmm_status = child.wait().ok();
        }
    }

    /// The VMM's process id, while it runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.as_ref().map(Child::id)
    }

    /// Ends the cell (killing a VMM still running), removes its directory and checks both.
    pub fn teardown(mut self) -> TeardownChecks {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
        let (gone, released) = match &self.vmm_exited {
            Some(fd) => pidfd_checks(fd),
            None => (self.vmm_status.is_some(), self.vmm_status.is_some()),
        };
        TeardownChecks {
            vmm_process_gone: gone && self.vmm.is_none(),
            guest_memory_released: released,
            cell_files_removed: !self.dir.exists(),
        }
    }

    /// The VMM's run report (boot phases, memory), once it has exited.
    pub fn vmm_report(&self) -> Option<serde_json::Value> {
        let text = fs::read_to_string(self.dir.join("vmm-report.json")).ok()?;
        serde_json::from_str(&text).ok()
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The last `lines` lines of a file, reading at most its last 16 KiB.
fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map_or(0, |m| m.len());
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
