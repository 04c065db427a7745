//! Entering the jail (the work of `isocell-jailer`, which runs as root):
//!
//! 1. unshare new mount, PID, IPC, UTS and network namespaces;
//! 2. fork straight into the cell's cgroup leaf (`clone3` with `CLONE_INTO_CGROUP`), so
//!    everything the child does is counted and limited from its first instruction. The child
//!    is PID 1 of the new PID namespace and unshares a cgroup namespace rooted at its leaf.
//!    Moving a running process into a cgroup instead (a write to `cgroup.procs`) waits for an
//!    RCU grace period, milliseconds on every cell start; a kernel without it (before 5.7)
//!    still gets that: the jailer joins the leaf itself, then forks. The parent stays
//!    outside, waits for the child and exits with its status (re-raising a fatal signal such
//!    as SIGSYS), so `isocell` sees the VMM's own exit. The parent writes the child's pid (as
//!    the host sees it) on its stdout, for the cell's receipt; the child's stdout goes to its
//!    stderr (the VMM log);
//! 3. in the child: make every mount private, mount a small tmpfs as the new root, bind-mount
//!    the spec's files (read-only unless declared writable, no-exec except the VMM binary),
//!    create its device nodes owned by the jail's uid, mount a /proc that shows only the jail's
//!    own processes, pivot_root into it and detach the old root, make the root read-only;
//! 4. set rlimits, close every descriptor but 0-2, drop to the unprivileged uid/gid with only
//!    the spec's supplementary groups (none, or the snapshot readers' group for a VMM that
//!    restores a snapshot), set no_new_privs, and exec the VMM with an empty environment.
//!
//! Any failure before the exec ends the child with [`EXIT_JAIL_FAILED`] and a message on
//! stderr; nothing it made outlives its mount namespace.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{self, SigHandler, Signal};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{self, ForkResult, Gid, Pid, Uid};

use crate::{JailSpec, EXIT_JAIL_FAILED};

/// The child's pid, for the parent's signal forwarding.
static CHILD: AtomicI32 = AtomicI32::new(0);

/// A step of the jail setup that failed.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct EnterError {
    step: String,
    #[source]
    source: std::io::Error,
}

fn step<E: Into<std::io::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> EnterError {
    let step = what.into();
    move |e| EnterError { step, source: e.into() }
}

/// Sets up the jail and runs `spec.argv` in it; returns the status the jailer should exit
/// with (the VMM's).
pub fn run(spec: &JailSpec) -> i32 {
    if let Err(e) = spec.validate() {
        eprintln!("isocell-jailer: {e}");
        return EXIT_JAIL_FAILED;
    }
    match enter(spec) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("isocell-jailer: cannot set up the jail: {e}");
            EXIT_JAIL_FAILED
        }
    }
}

fn enter(spec: &JailSpec) -> Result<i32, EnterError> {
    if let Some(parent) = spec.parent {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(step("PR_SET_PDEATHSIG"))?;
        // Set after our start: a parent that died before it left us to init (or a subreaper).
        if u32::try_from(unistd::getppid().as_raw()).ok() != Some(parent) {
            return Err(step("the process that started the jailer")(std::io::Error::other(
                format!("{parent} is gone"),
            )));
        }
    }
    // Pinned files are cloned as detached mounts here, in the namespace whose mounts the
    // descriptors belong to; a bind from /proc/PID/fd/N after unshare would be refused.
    let trees = spec
        .mounts
        .iter()
        .map(|m| m.pinned.as_deref().map(clone_tree).transpose())
        .collect::<Result<Vec<_>, _>>()?;
    // No core dumps from here on, for the VMM and for this process re-raising its signal.
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(step("RLIMIT_CORE"))?;
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET,
    )
    .map_err(step("unshare"))?;
    // The child learns that this process died from the pipe's write end closing (its parent
    // is not visible to getppid from inside the new PID namespace).
    let (alive_r, alive_w) = unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(step("pipe"))?;
    match fork_into(spec.cgroup.as_deref())? {
        ForkResult::Child => {
            // Standard output is the parent's report channel (below); the VMM writes its own
            // standard output to the log with its standard error.
            // SAFETY: dup2 on the process's own standard descriptors.
            unsafe { libc::dup2(2, 1) };
            drop(alive_w);
            // In the leaf now: the VMM sees its own cgroup as the root.
            let e = match unshare(CloneFlags::CLONE_NEWCGROUP) {
                Ok(()) => confine_and_exec(spec, trees, alive_r),
                Err(e) => step("unshare the cgroup namespace")(e),
            };
            eprintln!("isocell-jailer: cannot set up the jail: {e}");
            // SAFETY: _exit ends the child without running the parent's destructors twice.
            unsafe { libc::_exit(EXIT_JAIL_FAILED) }
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            // The VMM's pid as the host sees it, for the cell's receipt (`isocell` reads it
            // from our standard output; nothing else is written there).
            {
                use std::io::Write as _;
                let mut out = std::io::stdout();
                let _ = writeln!(out, "{}", child.as_raw()).and_then(|()| out.flush());
            }
            let code = wait_for(child);
            drop(alive_w);
            Ok(code)
        }
    }
}

extern "C" fn forward(_: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe. PID 1 of a namespace ignores signals it has no
        // handler for, so stopping means SIGKILL.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Waits for the jailed child and mirrors its end: its exit code, or its fatal signal.
fn wait_for(child: Pid) -> i32 {
    CHILD.store(child.as_raw(), Ordering::SeqCst);
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: `forward` only reads an atomic and calls kill.
        let _ = unsafe { signal::signal(sig, SigHandler::Handler(forward)) };
    }
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                // SAFETY: restoring the default action and raising the signal ends this
                // process the way the VMM ended (core dumps are off).
                unsafe {
                    let _ = signal::signal(sig, SigHandler::SigDfl);
                }
                let _ = signal::raise(sig);
                return 128 + sig as i32;
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("isocell-jailer: waiting for the VMM: {e}");
                return EXIT_JAIL_FAILED;
            }
        }
    }
}

/// `CLONE_INTO_CGROUP` (include/uapi/linux/sched.h).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks a child that starts life in the cgroup leaf `cgroup`, when there is one: `clone3` with
/// `CLONE_INTO_CGROUP`, or, where the kernel has no `clone3` (ENOSYS, before 5.3) or no
/// `CLONE_INTO_CGROUP` (EINVAL, before 5.7), by joining the leaf first and forking after.
fn fork_into(cgroup: Option<&Path>) -> Result<ForkResult, EnterError> {
    if let Some(path) = cgroup {
        let leaf =
            fs::File::open(path).map_err(step(format!("opening the cgroup {}", path.display())))?;
        let mut args = libc::clone_args {
            flags: CLONE_INTO_CGROUP,
            pidfd: 0,
            child_tid: 0,
            parent_tid: 0,
            exit_signal: libc::SIGCHLD as u64,
            stack: 0,
            stack_size: 0,
            tls: 0,
            set_tid: 0,
            set_tid_size: 0,
            cgroup: leaf.as_raw_fd() as u64,
        };
        // SAFETY: clone3 reads the `clone_args` we pass (its size with it). Without CLONE_VM
        // or a stack it forks, as fork() does; the jailer is single-threaded here, so the
        // child may run any code.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                std::ptr::addr_of_mut!(args),
                std::mem::size_of::<libc::clone_args>(),
            )
        };
        match pid {
            0 => return Ok(ForkResult::Child),
            p if p > 0 => return Ok(ForkResult::Parent { child: Pid::from_raw(p as libc::pid_t) }),
            _ => {
                let e = std::io::Error::last_os_error();
                if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
                    return Err(step("forking into the cell's cgroup (clone3)")(e));
                }
            }
        }
        let procs = path.join("cgroup.procs");
        fs::write(&procs, "0").map_err(step(format!("joining {}", procs.display())))?;
    }
    // SAFETY: the jailer is single-threaded here, so the child may run any code.
    unsafe { unistd::fork() }.map_err(step("fork"))
}

/// In the child: builds the jail and execs; returns only on failure.
fn confine_and_exec(
    spec: &JailSpec,
    trees: Vec<Option<OwnedFd>>,
    parent_alive: OwnedFd,
) -> EnterError {
    match confine(spec, trees, parent_alive) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn in_root(root: &Path, jail_path: &Path) -> PathBuf {
    root.join(jail_path.strip_prefix("/").unwrap_or(jail_path))
}

fn mkdirs(path: &Path) -> Result<(), EnterError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(step(format!("creating {}", path.display())))
}

fn confine(
    spec: &JailSpec,
    trees: Vec<Option<OwnedFd>>,
    parent_alive: OwnedFd,
) -> Result<std::convert::Infallible, EnterError> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(step("PR_SET_PDEATHSIG"))?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(step("making mounts private"))?;
    let root = &spec.root;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("size=64k,nr_inodes=256,mode=0755"),
    )
    .map_err(step(format!("mounting the jail root on {}", root.display())))?;

    for (m, tree) in spec.mounts.iter().zip(trees) {
        let target = in_root(root, &m.jail);
        if let Some(parent) = target.parent() {
            mkdirs(parent)?;
        }
        let source = m.pinned.as_ref().unwrap_or(&m.host);
        let is_dir = fs::metadata(source).map_err(step(format!("{}", m.host.display())))?.is_dir();
        if is_dir {
            mkdirs(&target)?;
        } else {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&target)
                .map_err(step(format!("creating {}", target.display())))?;
        }
        match tree {
            Some(tree) => attach_tree(&tree, &target)
                .map_err(step(format!("mounting the measured {}", m.host.display())))?,
            None => mount(Some(source), &target, none, MsFlags::MS_BIND, none)
                .map_err(step(format!("bind-mounting {}", m.host.display())))?,
        }
        let mut flags =
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if !m.writable {
            flags |= MsFlags::MS_RDONLY;
        }
        if !m.exec {
            flags |= MsFlags::MS_NOEXEC;
        }
        mount(none, &target, none, flags, none)
            .map_err(step(format!("restricting {}", m.jail.display())))?;
    }

    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    for d in &spec.devices {
        let target = in_root(root, &d.path);
        if let Some(parent) = target.parent() {
            mkdirs(parent)?;
        }
        mknod(
            &target,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            makedev(u64::from(d.major), u64::from(d.minor)),
        )
        .map_err(step(format!("creating {}", d.path.display())))?;
        unistd::chown(&target, Some(uid), Some(gid))
            .map_err(step(format!("chown {}", d.path.display())))?;
    }

    // A /proc of this PID namespace, showing only the jail's own processes (the VMM reads its
    // own memory use from it).
    let proc = root.join("proc");
    mkdirs(&proc)?;
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("hidepid=invisible,subset=pid"),
    )
    .map_err(step("mounting /proc"))?;

    unistd::chdir(root).map_err(step("chdir to the jail root"))?;
    match unistd::pivot_root(".", ".") {
        // pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only
        // the jail.
        Ok(()) => umount2(".", MntFlags::MNT_DETACH).map_err(step("detaching the host's root"))?,
        // A host running from its initramfs has no root to pivot away from (EINVAL). Then the
        // jail is moved over "/" and entered with chroot, as switch_root does; the host's files
        // stay unreachable because the jail ends up with no capability to chroot out again.
        Err(nix::errno::Errno::EINVAL) => {
            mount(Some("."), "/", none, MsFlags::MS_MOVE, none)
                .map_err(step("moving the jail over /"))?;
            unistd::chroot(".").map_err(step("chroot"))?;
        }
        Err(e) => return Err(step("pivot_root")(e)),
    }
    unistd::chdir("/").map_err(step("chdir /"))?;
    mount(none, "/", none, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID, none)
        .map_err(step("making the jail root read-only"))?;
    unistd::sethostname("isocell-cell").map_err(step("sethostname"))?;

    let r = &spec.rlimits;
    setrlimit(Resource::RLIMIT_NOFILE, r.nofile, r.nofile).map_err(step("RLIMIT_NOFILE"))?;
    setrlimit(Resource::RLIMIT_FSIZE, r.fsize, r.fsize).map_err(step("RLIMIT_FSIZE"))?;
    setrlimit(Resource::RLIMIT_CORE, r.core, r.core).map_err(step("RLIMIT_CORE"))?;
    // SAFETY: umask only sets this process's file creation mask.
    unsafe { libc::umask(0o077) };

    drop_capabilities_for_good()?;
    let groups: Vec<Gid> = spec.groups.iter().map(|&g| Gid::from_raw(g)).collect();
    unistd::setgroups(&groups).map_err(step("setgroups"))?;
    unistd::setresgid(gid, gid, gid).map_err(step("setresgid"))?;
    unistd::setresuid(uid, uid, uid).map_err(step("setresuid"))?;
    if unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(step("dropping root")(std::io::Error::other("root could be regained")));
    }
    check_no_capabilities()?;
    nix::sys::prctl::set_no_new_privs().map_err(step("PR_SET_NO_NEW_PRIVS"))?;
    // Changing uid cleared the parent-death signal: arm it again, then make sure the parent
    // did not already die in between (its end of the pipe would be closed).
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(step("PR_SET_PDEATHSIG"))?;
    let mut poll = [libc::pollfd { fd: parent_alive.as_raw_fd(), events: 0, revents: 0 }];
    // SAFETY: poll reads and writes exactly the one pollfd we pass.
    let ready = unsafe { libc::poll(poll.as_mut_ptr(), 1, 0) };
    if ready != 0 {
        return Err(step("the jailer went away")(std::io::Error::other("parent exited")));
    }
    drop(parent_alive);
    for m in &spec.mounts {
        let mode = if m.exec { libc::R_OK | libc::X_OK } else { libc::R_OK };
        let mode = if m.writable { mode | libc::W_OK } else { mode };
        if unistd::access(&m.jail, nix::unistd::AccessFlags::from_bits_truncate(mode)).is_err() {
            return Err(step(format!(
                "the cell's uid {} may not {} {} (make it readable by others, e.g. chmod o+r)",
                spec.uid,
                if m.writable { "read and write" } else { "read" },
                m.host.display()
            ))(std::io::Error::from(std::io::ErrorKind::PermissionDenied)));
        }
    }
    // SAFETY: close_range only closes descriptors; everything of ours above 2 is meant to go.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } != 0 {
        return Err(step("closing inherited descriptors")(std::io::Error::last_os_error()));
    }

    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(step("argv contains a NUL byte"))?;
    let env: [CString; 0] = [];
    let e = match unistd::execve(&argv[0], &argv, &env) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    Err(step(format!("exec {}", spec.argv[0]))(e))
}

/// Empties the capability bounding and ambient sets and locks the securebits so that no uid
/// change or exec can ever grant a capability again.
fn drop_capabilities_for_good() -> Result<(), EnterError> {
    // SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP_LOCKED |
    // SECBIT_KEEP_CAPS_LOCKED: uid 0 gets no capabilities at exec, and the fixup that clears
    // capabilities when we leave uid 0 stays on.
    const SECUREBITS: libc::c_ulong = 0b10_1011;
    // SAFETY: these prctl calls take integer arguments only.
    unsafe {
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(step("PR_CAPBSET_DROP")(std::io::Error::last_os_error()));
            }
        }
        if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 {
            return Err(step("clearing ambient capabilities")(std::io::Error::last_os_error()));
        }
        if libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0) != 0 {
            return Err(step("PR_SET_SECUREBITS")(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Checks, from the kernel's own account, that every capability set is empty.
fn check_no_capabilities() -> Result<(), EnterError> {
    let status = fs::read_to_string("/proc/self/status").map_err(step("/proc/self/status"))?;
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        let value = status.lines().find_map(|l| l.strip_prefix(set)).map(str::trim);
        if value.and_then(|v| u64::from_str_radix(v, 16).ok()) != Some(0) {
            let what = format!("{set} {}", value.unwrap_or("missing"));
            return Err(step("dropping capabilities")(std::io::Error::other(what)));
        }
    }
    Ok(())
}

/// `open_tree(2)` flags: clone the mount (a detached bind of the file), close on exec.
const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `move_mount(2)` flag: the source is the descriptor itself.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// A detached bind mount of exactly the file `path` names (a held descriptor of `isocell`'s).
fn clone_tree(path: &Path) -> Result<OwnedFd, EnterError> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(step(format!("{} contains a NUL byte", path.display())))?;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    // SAFETY: open_tree reads the NUL-terminated path and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(step(format!("open_tree {}", path.display()))(std::io::Error::last_os_error()));
    }
    let fd = std::os::fd::RawFd::try_from(fd)
        .map_err(|_| step("open_tree")(std::io::Error::other("descriptor out of range")))?;
    // SAFETY: `fd` was just returned by open_tree and nothing else owns it.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Attaches a detached mount from [`clone_tree`] on `target`.
fn attach_tree(tree: &OwnedFd, target: &Path) -> std::io::Result<()> {
    let empty = c"";
    let to = CString::new(target.as_os_str().as_encoded_bytes())?;
    // SAFETY: move_mount reads two NUL-terminated paths and takes a descriptor we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
