//! Running the host's command: spawned directly (no shell), in its own process group, with its
//! output streamed back as it comes. As PID 1 the agent also reaps every orphan in the cell.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use isocell_proto::{ExecRequest, ExitStatus, Message, WindowSize, MAX_CHUNK};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::Link;

/// PATH for commands when the host gives none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Children whose exit someone waits for, by pid. Spawning and reaping both hold this lock, so
/// the reaper never takes a child that `Command::spawn` is still waiting on itself.
struct Reaper {
    waiting: Mutex<HashMap<i32, Sender<ExitStatus>>>,
    wake: Mutex<Option<Sender<()>>>,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| Reaper { waiting: Mutex::new(HashMap::new()), wake: Mutex::new(None) })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the thread that reaps every child and orphan of PID 1.
pub fn start_reaper() {
    let (tx, rx) = channel::<()>();
    *lock(&reaper().wake) = Some(tx);
    let _ = std::thread::Builder::new().name("reaper".into()).spawn(move || reap_forever(rx));
}

fn reap_forever(wake: Receiver<()>) {
    loop {
        // Wait for some child to become a zombie without reaping it yet.
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => {
                // No children at all: sleep until a spawn says there is one.
                if wake.recv().is_err() {
                    return;
                }
                continue;
            }
            Err(_) => continue,
        }
        let mut waiting = lock(&reaper().waiting);
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    if let Some(tx) = waiting.remove(&pid.as_raw()) {
                        let _ = tx.send(ExitStatus::Code(code));
                    }
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    if let Some(tx) = waiting.remove(&pid.as_raw()) {
                        let _ = tx.send(ExitStatus::Signal(sig as i32));
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// A running command.
pub struct Running {
    pid: i32,
    stdin: Option<Box<dyn Write + Send>>,
    /// The terminal's controlling side, when the command has one.
    terminal: Option<Arc<OwnedFd>>,
    finisher: Option<JoinHandle<()>>,
}

impl Running {
    /// Sends `signal` to the command's whole process group.
    pub fn signal(&self, signal: i32) {
        if let Ok(sig) = Signal::try_from(signal) {
            let _ = kill(Pid::from_raw(-self.pid), sig);
        }
    }

    /// The command's process id (and process group).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Resizes the command's terminal, if it has one.
    pub fn resize(&self, size: WindowSize) {
        if let Some(t) = &self.terminal {
            let ws =
                libc::winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
            // SAFETY: TIOCSWINSZ reads one winsize struct that lives across the call, on a
            // terminal descriptor we own.
            unsafe { libc::ioctl(t.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        }
    }

    /// Writes to the command's standard input (ignored once it is closed).
    pub fn write_stdin(&mut self, data: &[u8]) {
        if let Some(s) = &mut self.stdin {
            if s.write_all(data).is_err() {
                self.stdin = None;
            }
        }
    }

    /// Closes the command's standard input.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Whether the command has exited and everything about it was sent.
    pub fn finished(&self) -> bool {
        self.finisher.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Waits until everything about the command was sent.
    pub fn wait_sent(&mut self) {
        if let Some(h) = self.finisher.take() {
            let _ = h.join();
        }
    }
}

/// What is done with a command's exit status before `Exited` is sent (a session records it).
pub type OnExit = Box<dyn FnOnce(i32, ExitStatus) + Send>;

/// Spawns the command (on a new terminal of size `tty`, if given); on success `Started` has
/// been sent, and `Exited` follows after all of its output, once `on_exit` has seen the status.
/// If the host goes away the output is drained and dropped, so the command never blocks on
/// it. On failure the error is returned for an `ExecFailed` reply.
pub fn spawn(
    req: &ExecRequest,
    link: &Arc<Link>,
    tty: Option<WindowSize>,
    on_exit: Option<OnExit>,
) -> Result<Running, std::io::Error> {
    let Some(program) = req.argv.first() else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"));
    };
    crate::reseed::require_reseeded()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
    let cwd = req.cwd.as_deref().unwrap_or("/");
    let dir = std::path::Path::new(cwd);
    if !dir.is_dir() {
        // As `docker run` does for an image's WorkingDir: create it, for the command's user.
        let made = dir.is_absolute()
            && std::fs::create_dir_all(dir).is_ok()
            && std::os::unix::fs::chown(dir, Some(req.uid), Some(req.gid)).is_ok();
        if !made {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("working directory {cwd} does not exist in the cell and cannot be made"),
            ));
        }
    }
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..]).env_clear();
    if !req.env.iter().any(|(k, _)| k == "PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if !req.env.iter().any(|(k, _)| k == "HOME") {
        cmd.env("HOME", if req.uid == 0 { "/root" } else { "/" });
    }
    cmd.envs(req.env.iter().map(|(k, v)| (k, v)));
    if tty.is_some() && !req.env.iter().any(|(k, _)| k == "TERM") {
        cmd.env("TERM", "xterm");
    }
    let terminal = match tty {
        Some(size) => Some(on_terminal(&mut cmd, size)?),
        None => {
            // Its own process group, so a signal or the final kill reaches all it started.
            cmd.process_group(0);
            cmd.stdin(if req.stdin { Stdio::piped() } else { Stdio::null() });
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            None
        }
    };
    drop_privileges(&mut cmd, req, cwd)?;

    // Readable once the command has exited: the pumps then drain what is already written
    // and stop, even if a process outside the command's group still holds the pipes. Made
    // before the spawn, so no failure can come between a started command and its tracking.
    let (exited_r, exited_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (tx, rx) = channel();
    let mut child: Child = {
        let mut waiting = lock(&reaper().waiting);
        let child = cmd.spawn()?;
        waiting.insert(child.id() as i32, tx);
        child
    };
    if let Some(wake) = &*lock(&reaper().wake) {
        let _ = wake.send(());
    }
    let pid = child.id() as i32;
    link.send(&Message::Started { pid: child.id() });

    let exited_r = Arc::new(exited_r);
    let (out, err, stdin): (_, _, Option<Box<dyn Write + Send>>) = match &terminal {
        Some(t) => {
            // Everything the command writes comes out of the terminal; what the host sends
            // goes into it.
            let reader = std::fs::File::from(t.try_clone()?);
            let writer = std::fs::File::from(t.try_clone()?);
            let out = pump(reader, exited_r.clone(), link.clone(), Message::Stdout);
            (Some(out), None, req.stdin.then(|| Box::new(writer) as Box<dyn Write + Send>))
        }
        None => (
            child.stdout.take().map(|s| pump(s, exited_r.clone(), link.clone(), Message::Stdout)),
            child.stderr.take().map(|s| pump(s, exited_r.clone(), link.clone(), Message::Stderr)),
            child.stdin.take().map(|s: ChildStdin| Box::new(s) as Box<dyn Write + Send>),
        ),
    };
    let link = link.clone();
    let finisher = std::thread::Builder::new().name("finisher".into()).spawn(move || {
        // The reaper always answers; a dropped sender would mean no status is known, which
        // the host reports as a failure (an exit code outside 0-255).
        let status = rx.recv().unwrap_or(ExitStatus::Code(-1));
        // The command is gone; whatever it left running in its group goes with it.
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        let _ = nix::unistd::write(&exited_w, b"x");
        for h in [out, err].into_iter().flatten() {
            let _ = h.join();
        }
        if let Some(f) = on_exit {
            f(pid, status);
        }
        link.send(&Message::Exited(status));
    })?;
    // `child` is not waited on here: the reaper owns all waiting.
    drop(child);
    Ok(Running { pid, stdin, terminal: terminal.map(Arc::new), finisher: Some(finisher) })
}

/// Gives the command a new terminal of `size` as its standard input, output and error, in a
/// new session whose controlling terminal it is (so job control and ^C work as in a login
/// shell). Returns the terminal's controlling side.
fn on_terminal(cmd: &mut Command, size: WindowSize) -> std::io::Result<OwnedFd> {
    let ws = nix::pty::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(Some(&ws), None)?;
    nix::fcntl::fcntl(&pty.master, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
    cmd.stdin(Stdio::from(pty.slave.try_clone()?));
    cmd.stdout(Stdio::from(pty.slave.try_clone()?));
    cmd.stderr(Stdio::from(pty.slave));
    // SAFETY: the hook runs in the forked child before exec and makes only async-signal-safe
    // system calls (setsid, ioctl) on its own standard input.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(pty.master)
}

/// The highest capability number the running kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n: &u32| n < 64)
        .unwrap_or(40)
}

/// `capset(2)`'s header and data (`linux/capability.h`, version 3: two 32-bit halves).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `prctl(2)` with every argument a full `unsigned long`, as the kernel reads them (a
/// variadic `int` leaves the upper half of its register undefined).
///
/// # Safety
/// As `libc::prctl`: the options used here take numbers, not pointers.
unsafe fn prctl(option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> libc::c_int {
    // SAFETY: forwarded as the caller's contract says; the last two arguments are zero.
    unsafe { libc::prctl(option, arg2, arg3, 0 as libc::c_ulong, 0 as libc::c_ulong) }
}

/// Makes the child take the request's identity before it runs the command, in runc's order:
/// the bounding set is narrowed while the agent's capabilities still allow it; supplementary
/// groups, then the group, then the user (each needs the privilege the next one drops), with
/// the permitted set kept across the change of user; the working directory, entered as that
/// user; then the requested effective, permitted, inheritable and ambient sets and
/// `no_new_privs`. Not `Command::uid/gid`: std clears the supplementary groups and runs
/// `pre_exec` hooks only after it has changed the user.
fn drop_privileges(cmd: &mut Command, req: &ExecRequest, cwd: &str) -> std::io::Result<()> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    if req.groups.len() > isocell_proto::MAX_GROUPS {
        return Err(invalid("too many supplementary groups"));
    }
    let groups: Vec<libc::gid_t> = req.groups.clone();
    let cwd =
        std::ffi::CString::new(cwd).map_err(|_| invalid("working directory has a NUL byte"))?;
    let (uid, gid) = (req.uid, req.gid);
    // Read only when there are sets to apply (`isocell run`'s commands have none).
    let last = if req.privileges.is_some() { last_capability() } else { 0 };
    let known = if last >= 63 { u64::MAX } else { (1u64 << (last + 1)) - 1 };
    let caps = req.privileges.map(|mut p| {
        let (e, pm, i) = (p.effective & known, p.permitted & known, p.inheritable & known);
        // As runc: an ambient capability that is not both permitted and inheritable cannot be
        // raised; it is reported and left out rather than failing the command.
        let raisable = p.ambient & pm & i;
        if raisable != p.ambient & known {
            crate::log(&format!(
                "ambient capabilities {:#x} are not both permitted and inheritable; left out",
                p.ambient & known & !raisable
            ));
        }
        p.ambient = raisable;
        let half = |shift: u32| CapData {
            effective: (e >> shift) as u32,
            permitted: (pm >> shift) as u32,
            inheritable: (i >> shift) as u32,
        };
        (p, [half(0), half(32)])
    });
    // SAFETY: the hook runs in the forked child before exec; it allocates nothing and only
    // makes async-signal-safe system calls (setgroups, setgid, setuid, prctl, capset, chdir)
    // on data prepared (and kept alive by the closure) before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if let Some((p, _)) = &caps {
                for cap in 0..=last {
                    if p.bounding & (1 << cap) == 0
                        && prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0) != 0
                    {
                        return fail();
                    }
                }
                if prctl(libc::PR_SET_KEEPCAPS, 1, 0) != 0 {
                    return fail();
                }
            }
            // The working directory is entered as the user (root still has its capabilities
            // here, as runc's first try has them).
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
                || libc::chdir(cwd.as_ptr()) != 0
            {
                return fail();
            }
            if let Some((p, data)) = &caps {
                let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
                if prctl(libc::PR_SET_KEEPCAPS, 0, 0) != 0
                    || libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0
                    || prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as _, 0) != 0
                {
                    return fail();
                }
                for cap in 0..=last {
                    if p.ambient & (1 << cap) != 0
                        && prctl(
                            libc::PR_CAP_AMBIENT,
                            libc::PR_CAP_AMBIENT_RAISE as _,
                            libc::c_ulong::from(cap),
                        ) != 0
                    {
                        return fail();
                    }
                }
                if p.no_new_privs && prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0) != 0 {
                    return fail();
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// The most a pump forwards after the command exited: what was already in the pipe, plus
/// whatever a process still holding it manages to add meanwhile, up to this bound.
const DRAIN_AFTER_EXIT: usize = 1 << 20;

/// Forwards one output pipe of the command until it closes, or, once `exited` is readable,
/// until it is drained (bounded by [`DRAIN_AFTER_EXIT`]).
fn pump(
    mut source: impl Read + AsRawFd + Send + 'static,
    exited: Arc<OwnedFd>,
    link: Arc<Link>,
    wrap: fn(Vec<u8>) -> Message,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let fd = source.as_raw_fd();
        // SAFETY: fcntl on a pipe descriptor this thread owns.
        unsafe {
            libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK)
        };
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut draining: Option<usize> = None;
        // Once the host is gone, output is read and dropped: the command must not block on a
        // full pipe while nobody listens.
        let mut host_gone = false;
        loop {
            if draining.is_none() {
                let mut fds = [
                    libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
                    libc::pollfd { fd: exited.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                ];
                // SAFETY: `fds` is a valid array of two pollfd structs for the whole call.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                if n < 0 {
                    continue;
                }
                if fds[1].revents != 0 {
                    draining = Some(0);
                }
            }
            match source.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if !host_gone && !link.send(&wrap(buf[..n].to_vec())) {
                        host_gone = true;
                    }
                    if let Some(sent) = &mut draining {
                        *sent += n;
                        if *sent >= DRAIN_AFTER_EXIT {
                            return;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if draining.is_some() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    })
}

/// Turns a spawn error into the protocol's reply.
pub fn failure_message(err: &std::io::Error, program: &str) -> Message {
    let errno = err.raw_os_error().unwrap_or(match err.kind() {
        std::io::ErrorKind::NotADirectory => libc::ENOTDIR,
        _ => libc::EINVAL,
    });
    let message = match errno {
        libc::ENOENT => format!("{program}: command not found"),
        libc::EACCES => format!("{program}: permission denied"),
        libc::ENOTDIR if err.raw_os_error().is_none() => err.to_string(),
        _ => format!("{program}: {err}"),
    };
    Message::ExecFailed { errno, message }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use isocell_proto::Privileges;

    /// Runs `cat /proc/self/status` with `req`'s identity; returns the named fields.
    fn status_as(req: &ExecRequest) -> std::io::Result<Vec<(String, String)>> {
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/status");
        drop_privileges(&mut cmd, req, "/")?;
        let out = cmd.output()?;
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect())
    }

    fn text<'a>(status: &'a [(String, String)], key: &str) -> &'a str {
        &status.iter().find(|(k, _)| k == key).unwrap().1
    }

    /// A capability set (hexadecimal) or a flag.
    fn field(status: &[(String, String)], key: &str) -> u64 {
        u64::from_str_radix(text(status, key), 16).unwrap()
    }

    fn request(uid: u32, privileges: Option<Privileges>) -> ExecRequest {
        ExecRequest {
            argv: vec![],
            env: vec![],
            cwd: None,
            uid,
            gid: uid,
            groups: vec![],
            stdin: false,
            privileges,
        }
    }

    const CHOWN: u64 = 1 << 0;
    const KILL: u64 = 1 << 5;
    const NET_BIND_SERVICE: u64 = 1 << 10;
    const SYS_ADMIN: u64 = 1 << 21;

    // These run as root, as the agent does (and as the project's tests do).
    #[test]
    fn for_root_the_bounding_set_and_no_new_privs_hold_across_exec() {
        let set = CHOWN | KILL | NET_BIND_SERVICE;
        let p = Privileges {
            bounding: set,
            effective: set,
            permitted: set,
            inheritable: 0,
            ambient: 0,
            no_new_privs: true,
        };
        let s = status_as(&request(0, Some(p))).unwrap();
        assert_eq!(field(&s, "CapBnd"), set);
        assert_eq!(field(&s, "CapEff"), set);
        assert_eq!(field(&s, "CapEff") & SYS_ADMIN, 0, "no remounting a read-only volume");
        assert_eq!(field(&s, "NoNewPrivs"), 1);
    }

    #[test]
    fn ambient_capabilities_reach_a_user_other_than_root() {
        let p = Privileges {
            bounding: NET_BIND_SERVICE | KILL,
            effective: NET_BIND_SERVICE,
            permitted: NET_BIND_SERVICE,
            inheritable: NET_BIND_SERVICE,
            ambient: NET_BIND_SERVICE,
            no_new_privs: false,
        };
        let s = status_as(&request(1000, Some(p))).unwrap();
        assert_eq!(text(&s, "Uid").split_whitespace().collect::<Vec<_>>(), ["1000"; 4]);
        assert_eq!(field(&s, "CapEff"), NET_BIND_SERVICE);
        assert_eq!(field(&s, "CapAmb"), NET_BIND_SERVICE);
        assert_eq!(field(&s, "CapBnd"), NET_BIND_SERVICE | KILL);
        assert_eq!(field(&s, "NoNewPrivs"), 0);
    }

    #[test]
    fn without_privileges_root_keeps_every_capability_and_a_bad_set_is_refused() {
        let s = status_as(&request(0, None)).unwrap();
        assert!(field(&s, "CapEff") & SYS_ADMIN != 0);
        // An effective capability that is not permitted: capset refuses, the command never runs.
        let bad = Privileges { bounding: KILL, effective: KILL, ..Default::default() };
        assert!(status_as(&request(0, Some(bad))).is_err());
        // An ambient capability that is not inheritable is left out, as runc leaves it.
        let p = Privileges {
            bounding: KILL,
            effective: KILL,
            permitted: KILL,
            ambient: KILL,
            ..Default::default()
        };
        let s = status_as(&request(1000, Some(p))).unwrap();
        assert_eq!(field(&s, "CapAmb"), 0);
        assert_eq!(field(&s, "CapEff"), 0);
    }
}
