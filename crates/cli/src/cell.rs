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

/// The guest's vsock context id; each VMM has its own vsock namespace, so every cell uses 3.
const GUEST_CID: u64 = 3;

/// What a cell is built from.
pub struct CellSpec<'a> {
    /// The VMM binary.
    pub vmm: &'a Path,
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
    /// Hard limit on the VM's life, as a last resort.
    pub max_lifetime_secs: Option<u64>,
}

/// A running (or stopped) cell.
pub struct Cell {
    /// Random id, also the name of its directory.
    pub id: String,
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

fn random_id() -> String {
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
    /// Creates the cell's directory under `run_dir`, listens for the agent and starts the VMM.
    pub fn start(run_dir: &Path, spec: &CellSpec) -> Result<Cell, String> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(run_dir)
            .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
        let id = random_id();
        let dir = run_dir.join(&id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let vsock = dir.join("vsock.sock");
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

        let mut cmd = Command::new(spec.vmm);
        cmd.arg("--kernel").arg(spec.kernel);
        cmd.arg("--cpus").arg(spec.cpus.to_string());
        cmd.arg("--memory").arg(spec.memory_mib.to_string());
        cmd.arg("--drive").arg(format!("id=root,path={},ro,root", spec.image.display()));
        cmd.arg("--vsock").arg(format!("cid={GUEST_CID},uds={}", vsock.display()));
        cmd.arg("--console").arg(format!("file:{}", dir.join("console.log").display()));
        cmd.arg("--boot-args").arg(format!("quiet {}", spec.kernel_args).trim_end());
        cmd.arg("--report").arg(dir.join("vmm-report.json"));
        if let Some(secs) = spec.max_lifetime_secs {
            cmd.arg("--max-lifetime").arg(secs.to_string());
        }
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
        let vmm = cmd
            .spawn()
            .map_err(|e| cleanup(format!("cannot start {}: {e}", spec.vmm.display())))?;
        let vmm_exited = pidfd(vmm.id());
        Ok(Cell { id, dir, vmm: Some(vmm), vmm_exited, agent_listener, vmm_status: None })
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
