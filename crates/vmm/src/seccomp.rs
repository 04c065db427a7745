//! Seccomp allow-lists for the VMM's threads, one per kind of thread.
//!
//! [`allowed_syscalls`] is the single source of truth: [`compile`] turns it into a BPF program
//! and [`describe`] into the JSON published as part of the cell's attack surface. Anything not
//! on a thread's list kills the whole VMM with `SIGSYS`.
//!
//! Each thread installs its own filter ([`install`], no TSYNC), once its setup is done:
//! - [`ThreadKind::Vcpu`]: first thing on each vCPU thread, before the first `KVM_RUN`;
//! - [`ThreadKind::Vsock`]: first thing on the vsock event thread;
//! - [`ThreadKind::Main`]: on the main thread right after the vCPU threads are started, so it
//!   never needs `clone`. A filter is inherited by threads created later, so no thread may be
//!   spawned after it.
//!
//! glibc's malloc, when it shrinks a secondary arena, may open and read
//! `/proc/sys/vm/overcommit_memory` from whatever thread frees memory. [`prepare_process`] keeps
//! every thread on the main arena so that never happens; call it first thing in `main`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde_json::{json, Value};

/// The kinds of thread the VMM runs, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread, once the vCPUs run: waits for the exit, stops the vCPUs, cleans up,
    /// writes the report and exits.
    Main,
    /// A vCPU thread: `KVM_RUN` and the device emulation its exits trigger.
    Vcpu,
    /// The vsock device's event thread: host Unix sockets.
    Vsock,
}

impl ThreadKind {
    /// Every kind, in the order of their names.
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Vsock];

    /// Stable lowercase name, as used in [`describe`].
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vsock => "vsock",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Failure to build or install a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The allow-list breaks one of its own rules (a bug in this module).
    #[error("the {kind} seccomp allow-list is inconsistent: {detail}")]
    Rules {
        /// The thread kind.
        kind: ThreadKind,
        /// What is wrong.
        detail: String,
    },
    /// seccompiler refused the rules.
    #[error("cannot compile the {kind} seccomp filter")]
    Compile {
        /// The thread kind.
        kind: ThreadKind,
        /// seccompiler's reason.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter (or `PR_SET_NO_NEW_PRIVS`).
    #[error("cannot install the {kind} seccomp filter")]
    Install {
        /// The thread kind.
        kind: ThreadKind,
        /// seccompiler's reason.
        #[source]
        source: seccompiler::Error,
    },
    /// glibc refused to limit malloc to one arena.
    #[error("cannot limit malloc to one arena (mallopt failed)")]
    Mallopt,
}

/// How a syscall argument is compared. Every comparison is on the low 32 bits: all the
/// arguments checked here are C `int`s, which the kernel truncates to 32 bits anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ArgOp {
    /// The argument equals the value.
    Eq,
    /// The argument's bits under the mask equal the value.
    MaskedEq(u64),
}

/// One condition on one syscall argument.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ArgCheck {
    /// Argument index (0-5).
    pub index: u8,
    /// The comparison.
    pub op: ArgOp,
    /// The value compared with.
    pub value: u64,
    /// What the value means (`KVM_RUN`, `AF_UNIX`, ...).
    pub name: &'static str,
}

/// One allowed form of a syscall: allowed when every check in `args` holds (always, if
/// `args` is empty). A syscall listed several times is allowed when any of its forms match.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AllowedSyscall {
    /// The syscall's name.
    pub syscall: &'static str,
    /// Its x86_64 number.
    pub number: i64,
    /// Conditions on its arguments, all of which must hold.
    pub args: Vec<ArgCheck>,
}

/// Syscalls that are never allowed without an argument check.
const MUST_CHECK_ARGS: [i64; 6] = [
    libc::SYS_ioctl,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_tgkill,
];

// ioctl request encoding (include/uapi/asm-generic/ioctl.h).
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;
const IOC_NONE: u32 = 0;

/// `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u32, ty: u32, nr: u32, size: u32) -> u32 {
    (dir << IOC_DIRSHIFT) | (size << IOC_SIZESHIFT) | (ty << IOC_TYPESHIFT) | (nr << IOC_NRSHIFT)
}

/// `KVM_RUN`, `_IO(KVMIO, 0x80)` (kvm-ioctls does not export its request numbers).
pub const KVM_RUN: u32 = ioc(IOC_NONE, kvm_bindings::KVMIO, 0x80, 0);

fn any(syscall: &'static str, number: i64) -> AllowedSyscall {
    AllowedSyscall { syscall, number, args: Vec::new() }
}

fn when(syscall: &'static str, number: i64, args: Vec<ArgCheck>) -> AllowedSyscall {
    AllowedSyscall { syscall, number, args }
}

fn eq(index: u8, value: u64, name: &'static str) -> ArgCheck {
    ArgCheck { index, op: ArgOp::Eq, value, name }
}

fn ioctl(request: u32, name: &'static str) -> AllowedSyscall {
    when("ioctl", libc::SYS_ioctl, vec![eq(1, u64::from(request), name)])
}

/// std's `UnixStream` writes are `send(fd, buf, len, MSG_NOSIGNAL)`, i.e. `sendto`. The address
/// is not checked (a pointer does not fit the 32-bit comparisons used here); stream sockets
/// refuse one anyway.
fn send_nosignal() -> AllowedSyscall {
    when("sendto", libc::SYS_sendto, vec![eq(3, int(libc::MSG_NOSIGNAL), "MSG_NOSIGNAL")])
}

/// `mmap`/`mprotect` without `PROT_EXEC` (the protection is argument 2 of both).
fn no_exec(syscall: &'static str, number: i64) -> AllowedSyscall {
    let check = ArgCheck {
        index: 2,
        op: ArgOp::MaskedEq(libc::PROT_EXEC as u64),
        value: 0,
        name: "PROT_EXEC clear",
    };
    when(syscall, number, vec![check])
}

fn int(v: libc::c_int) -> u64 {
    // Compared as 32-bit values; every constant used here is non-negative.
    u64::from(v as u32)
}

/// What every thread needs from glibc and Rust's std: memory, locks, time, signals (the vCPU
/// kick, `abort`), thread and process exit, and writing/closing what it owns.
fn common() -> Vec<AllowedSyscall> {
    vec![
        // malloc: brk for the main arena, mmap/munmap/mremap for large blocks, mprotect to
        // grow heaps, madvise(MADV_DONTNEED) to trim them and to drop a dead thread's stack.
        any("brk", libc::SYS_brk),
        no_exec("mmap", libc::SYS_mmap),
        no_exec("mprotect", libc::SYS_mprotect),
        any("munmap", libc::SYS_munmap),
        any("mremap", libc::SYS_mremap),
        when("madvise", libc::SYS_madvise, vec![eq(2, int(libc::MADV_DONTNEED), "MADV_DONTNEED")]),
        // Mutexes, mpsc channels, parking and joins; spinning mpsc senders yield.
        any("futex", libc::SYS_futex),
        any("sched_yield", libc::SYS_sched_yield),
        // Instant::now when the vDSO cannot serve it; HashMap keys.
        any("clock_gettime", libc::SYS_clock_gettime),
        any("getrandom", libc::SYS_getrandom),
        // Returning from the kick handler; resuming a sleep or timed wait after SIGSTOP/SIGCONT.
        any("rt_sigreturn", libc::SYS_rt_sigreturn),
        any("restart_syscall", libc::SYS_restart_syscall),
        // glibc blocks signals around pthread_kill and at thread exit; abort unblocks SIGABRT.
        any("rt_sigprocmask", libc::SYS_rt_sigprocmask),
        // Rust std drops a thread's alternate signal stack as the thread ends.
        any("sigaltstack", libc::SYS_sigaltstack),
        // abort() after a panic raises SIGABRT at itself: tgkill(getpid(), gettid(), SIGABRT).
        any("getpid", libc::SYS_getpid),
        any("gettid", libc::SYS_gettid),
        when("tgkill", libc::SYS_tgkill, vec![eq(2, int(libc::SIGABRT), "SIGABRT")]),
        // stderr, console, eventfds, sockets, the report; closing dropped files.
        any("write", libc::SYS_write),
        any("close", libc::SYS_close),
        // Rust std built with debug assertions checks that an fd is open before closing it.
        when("fcntl", libc::SYS_fcntl, vec![eq(1, int(libc::F_GETFD), "F_GETFD")]),
        any("exit", libc::SYS_exit),
        any("exit_group", libc::SYS_exit_group),
    ]
}

/// The syscalls a thread of `kind` may make, sorted by name, then arguments.
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<AllowedSyscall> {
    let mut list = common();
    match kind {
        ThreadKind::Main => list.extend([
            // stop_vcpus: pthread_kill with the kick signal, sleeping between rounds.
            when("tgkill", libc::SYS_tgkill, vec![eq(2, int(libc::SIGRTMIN()), "SIGRTMIN")]),
            any("clock_nanosleep", libc::SYS_clock_nanosleep),
            // remove_host_sockets.
            any("unlink", libc::SYS_unlink),
            // flush_disks.
            any("fsync", libc::SYS_fsync),
            // measure_self reads /proc/self/smaps; main writes the report file.
            when(
                "openat",
                libc::SYS_openat,
                vec![eq(2, int(libc::O_RDONLY | libc::O_CLOEXEC), "O_RDONLY|O_CLOEXEC")],
            ),
            when(
                "openat",
                libc::SYS_openat,
                vec![eq(
                    2,
                    int(libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC),
                    "O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC",
                )],
            ),
            any("read", libc::SYS_read),
            // File::metadata in fs::read_to_string: statx, or fstat where statx is refused.
            any("statx", libc::SYS_statx),
            any("newfstatat", libc::SYS_newfstatat),
        ]),
        ThreadKind::Vcpu => list.extend([
            ioctl(KVM_RUN, "KVM_RUN"),
            // virtio-rng reads /dev/urandom; virtio-blk reads, writes and flushes its image.
            any("read", libc::SYS_read),
            any("pread64", libc::SYS_pread64),
            any("pwrite64", libc::SYS_pwrite64),
            any("fdatasync", libc::SYS_fdatasync),
            // virtio-vsock queue work: guest connections to host Unix sockets.
            when(
                "socket",
                libc::SYS_socket,
                vec![
                    eq(0, int(libc::AF_UNIX), "AF_UNIX"),
                    eq(1, int(libc::SOCK_STREAM | libc::SOCK_CLOEXEC), "SOCK_STREAM|SOCK_CLOEXEC"),
                ],
            ),
            any("connect", libc::SYS_connect),
            ioctl(libc::FIONBIO as u32, "FIONBIO"),
            any("recvfrom", libc::SYS_recvfrom),
            send_nosignal(),
            any("shutdown", libc::SYS_shutdown),
            any("epoll_ctl", libc::SYS_epoll_ctl),
        ]),
        ThreadKind::Vsock => list.extend([
            any("epoll_wait", libc::SYS_epoll_wait),
            any("epoll_ctl", libc::SYS_epoll_ctl),
            when(
                "accept4",
                libc::SYS_accept4,
                vec![eq(3, int(libc::SOCK_CLOEXEC), "SOCK_CLOEXEC")],
            ),
            ioctl(libc::FIONBIO as u32, "FIONBIO"),
            any("recvfrom", libc::SYS_recvfrom),
            send_nosignal(),
            any("shutdown", libc::SYS_shutdown),
        ]),
    }
    list.sort();
    list
}

/// Checks the list's own rules and groups it by syscall number, as seccompiler wants it.
fn rule_map(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let bad = |detail: String| SeccompError::Rules { kind, detail };
    let backend = |source| SeccompError::Compile { kind, source };
    let mut map: BTreeMap<i64, (&'static str, bool, Vec<SeccompRule>)> = BTreeMap::new();
    for entry in allowed_syscalls(kind) {
        if entry.args.is_empty() && MUST_CHECK_ARGS.contains(&entry.number) {
            return Err(bad(format!("{} is allowed without an argument check", entry.syscall)));
        }
        let slot = map.entry(entry.number).or_insert((entry.syscall, false, Vec::new()));
        if slot.0 != entry.syscall {
            return Err(bad(format!("{} and {} share a number", slot.0, entry.syscall)));
        }
        if entry.args.is_empty() {
            if slot.1 || !slot.2.is_empty() {
                return Err(bad(format!("{} is listed twice", entry.syscall)));
            }
            slot.1 = true;
            continue;
        }
        if slot.1 {
            return Err(bad(format!("{} is listed twice", entry.syscall)));
        }
        let conditions = entry
            .args
            .iter()
            .map(|a| {
                let op = match a.op {
                    ArgOp::Eq => SeccompCmpOp::Eq,
                    ArgOp::MaskedEq(mask) => SeccompCmpOp::MaskedEq(mask),
                };
                SeccompCondition::new(a.index, SeccompCmpArgLen::Dword, op, a.value)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        slot.2.push(SeccompRule::new(conditions).map_err(backend)?);
    }
    Ok(map.into_iter().map(|(nr, (_, _, rules))| (nr, rules)).collect())
}

/// Compiles the filter of `kind` for x86_64: listed syscalls are allowed, anything else kills
/// the process.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let backend = |source| SeccompError::Compile { kind, source };
    let filter = SeccompFilter::new(
        rule_map(kind)?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(backend)?;
    BpfProgram::try_from(filter).map_err(backend)
}

/// Compiles the filter of `kind` and applies it to the calling thread only. seccompiler sets
/// `PR_SET_NO_NEW_PRIVS` first, which an unprivileged process needs to install a filter.
/// Irreversible; threads this thread creates afterwards inherit the filter.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let program = compile(kind)?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install { kind, source })?;
    if PROBE.get() == Some(&kind) {
        forbidden_syscall_probe();
    }
    Ok(())
}

/// The thread kind that makes a forbidden syscall right after installing its filter (the
/// hidden `--seccomp-probe` flag, for end-to-end tests of enforcement).
static PROBE: std::sync::OnceLock<ThreadKind> = std::sync::OnceLock::new();

/// Arms the probe for threads of `kind`. Call before any thread installs its filter.
pub fn set_probe(kind: ThreadKind) {
    let _ = PROBE.set(kind);
}

/// Keeps glibc's malloc to its main arena, so that no thread ever needs `openat`: trimming a
/// secondary arena makes glibc read `/proc/sys/vm/overcommit_memory` once, from whichever
/// thread frees. Call first thing in `main`, before any thread exists: threads that already
/// allocated keep their arena.
pub fn prepare_process() -> Result<(), SeccompError> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes a malloc tunable; it returns 1 on success.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
            return Err(SeccompError::Mallopt);
        }
    }
    Ok(())
}

fn arg_json(a: &ArgCheck) -> Value {
    // Keys in alphabetical order, so the text is the same whether or not serde_json
    // preserves insertion order.
    match a.op {
        ArgOp::Eq => json!({ "index": a.index, "name": a.name, "op": "eq", "value": a.value }),
        ArgOp::MaskedEq(mask) => json!({
            "index": a.index,
            "mask": mask,
            "name": a.name,
            "op": "masked_eq",
            "value": a.value,
        }),
    }
}

/// Every thread kind's allow-list as JSON, `{kind: [{syscall, number, args}]}`, sorted, from
/// the same data [`compile`] uses. A syscall not listed for a kind kills the VMM.
pub fn describe() -> Value {
    let mut kinds = serde_json::Map::new();
    for kind in ThreadKind::ALL {
        let entries = allowed_syscalls(kind)
            .iter()
            .map(|s| {
                let args: Vec<Value> = s.args.iter().map(arg_json).collect();
                json!({ "args": args, "number": s.number, "syscall": s.syscall })
            })
            .collect();
        kinds.insert(kind.name().to_owned(), Value::Array(entries));
    }
    Value::Object(kinds)
}

/// Test hook for end-to-end tests (reached only through a hidden VMM flag): makes a syscall
/// that no thread kind allows, `socket(AF_INET, SOCK_STREAM)`, so that under any of these
/// filters the VMM dies with `SIGSYS` here. Without a filter it closes the socket and returns.
pub fn forbidden_syscall_probe() {
    // SAFETY: socket() takes no pointers; the descriptor, if any, is ours and closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just created by this function and nothing else refers to it.
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs::{File, OpenOptions};
    use std::io::{LineWriter, Read, Write};
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::os::unix::process::ExitStatusExt;
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{channel, Receiver};
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    use vmm_sys_util::epoll::EpollEvent;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vmm_sys_util::signal::{Killable, SIGRTMIN};

    use super::*;
    use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_LEN, BOOT_TIMER_MAGIC};
    use crate::devices::i8042::{self, I8042};
    use crate::devices::serial::{SerialConsole, COM1_BASE, COM1_LEN};
    use crate::devices::virtio::vsock::muxer::{op, Header, Muxer, HOST_CID, TYPE_STREAM};
    use crate::devices::Bus;
    use crate::exit::{ExitRequester, VmExit};
    use crate::timeline::{Phase, Timeline};
    use crate::vstate::vcpu::{
        register_kick_signal, stop_vcpus, ExitCounts, ExitKind, VcpuContext,
    };

    #[test]
    fn every_kind_compiles() {
        for kind in ThreadKind::ALL {
            let program = compile(kind).unwrap();
            assert!(!program.is_empty() && program.len() < 4096, "{kind}: {}", program.len());
        }
        let names: Vec<_> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names, ["main", "vcpu", "vsock"]);
    }

    #[test]
    fn ioctl_numbers_match_known_values() {
        assert_eq!(KVM_RUN, 0xAE80);
        const IOC_WRITE: u32 = 1;
        let irq_line = ioc(IOC_WRITE, kvm_bindings::KVMIO, 0x61, 8);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_irq_level>(), 8);
        assert_eq!(irq_line, 0x4008_AE61);
        assert_eq!(libc::FIONBIO, 0x5421);
        assert_eq!(libc::FIOCLEX, 0x5451);
    }

    #[test]
    fn describe_is_deterministic_and_constrains_ioctl() {
        let a = describe();
        assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&describe()).unwrap());
        let kinds: Vec<_> = a.as_object().unwrap().keys().cloned().collect();
        assert_eq!(kinds, ["main", "vcpu", "vsock"]);
        for kind in ThreadKind::ALL {
            let list = a[kind.name()].as_array().unwrap();
            let names: Vec<_> = list.iter().map(|e| e["syscall"].as_str().unwrap()).collect();
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(names, sorted, "{kind} is not sorted");
            for e in list.iter().filter(|e| e["syscall"] == "ioctl") {
                let args = e["args"].as_array().unwrap();
                assert_eq!(args.len(), 1, "{e}");
                assert_eq!(
                    (args[0]["index"].as_u64(), args[0]["op"].as_str()),
                    (Some(1), Some("eq"))
                );
            }
        }
        let vcpu_ioctls: Vec<_> = a["vcpu"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["syscall"] == "ioctl")
            .map(|e| {
                (e["args"][0]["name"].as_str().unwrap(), e["args"][0]["value"].as_u64().unwrap())
            })
            .collect();
        assert_eq!(vcpu_ioctls, [("FIONBIO", 0x5421), ("KVM_RUN", 0xAE80)]);
        assert!(!a["main"].as_array().unwrap().iter().any(|e| e["syscall"] == "ioctl"));
    }

    #[test]
    fn dangerous_syscalls_are_narrowed() {
        for kind in ThreadKind::ALL {
            let list = allowed_syscalls(kind);
            for s in &list {
                assert!(
                    !MUST_CHECK_ARGS.contains(&s.number) || !s.args.is_empty(),
                    "{kind}: {} unchecked",
                    s.syscall
                );
                if s.number == libc::SYS_socket {
                    assert!(s.args.contains(&eq(0, 1, "AF_UNIX")), "{kind}: {s:?}");
                }
                if s.number == libc::SYS_mmap || s.number == libc::SYS_mprotect {
                    assert_eq!(s.args[0].op, ArgOp::MaskedEq(libc::PROT_EXEC as u64));
                }
            }
            for never in [libc::SYS_clone, libc::SYS_clone3, libc::SYS_execve, libc::SYS_ptrace] {
                assert!(!list.iter().any(|s| s.number == never), "{kind} allows {never}");
            }
        }
    }

    // Enforcement runs in child processes: this test binary runs again with CHILD_ENV naming a
    // case, and `child_entry` runs that case instead of passing trivially.

    const CHILD_ENV: &str = "ISOCELL_SECCOMP_TEST_CHILD";
    const CID: u64 = 3;

    fn run_child(case: &str) -> std::process::Output {
        Command::new(std::env::current_exe().unwrap())
            .args(["seccomp::tests::child_entry", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, case)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    }

    fn explain(out: &std::process::Output) -> String {
        format!(
            "status {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    #[test]
    fn child_entry() {
        let Ok(case) = std::env::var(CHILD_ENV) else { return };
        let limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: plain syscalls: no core files from the SIGSYS kills; a hung child dies.
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &limit);
            libc::alarm(60);
        }
        let result = match case.as_str() {
            "probe-main" => probe(ThreadKind::Main),
            "probe-vcpu" => probe(ThreadKind::Vcpu),
            "probe-vsock" => probe(ThreadKind::Vsock),
            "pipe-write" => pipe_write(),
            "devices" => devices(),
            "main-epilogue" => main_epilogue(),
            other => Err(format!("unknown case {other}")),
        };
        if let Err(e) = result {
            eprintln!("child case {case} failed: {e}");
            std::process::exit(1);
        }
    }

    fn join<T>(h: thread::JoinHandle<Result<T, String>>) -> Result<T, String> {
        h.join().map_err(|_| "thread panicked".to_owned())?
    }

    fn probe(kind: ThreadKind) -> Result<(), String> {
        join(thread::spawn(move || {
            install(kind).map_err(|e| e.to_string())?;
            forbidden_syscall_probe();
            Ok(())
        }))
    }

    #[test]
    fn a_forbidden_syscall_kills_the_process_with_sigsys() {
        for kind in ThreadKind::ALL {
            let out = run_child(&format!("probe-{kind}"));
            assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{kind}: {}", explain(&out));
        }
    }

    fn pipe_write() -> Result<(), String> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() writes.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err("pipe failed".into());
        }
        for kind in ThreadKind::ALL {
            let fd = fds[1];
            join(thread::spawn(move || {
                install(kind).map_err(|e| e.to_string())?;
                // SAFETY: writes one byte from a live buffer to a pipe this process owns.
                let n = unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
                // SAFETY: getpid takes no arguments.
                let pid = unsafe { libc::getpid() };
                if n == 1 && pid > 0 {
                    Ok(())
                } else {
                    Err(format!("{kind}: write returned {n}"))
                }
            }))?;
        }
        let mut got = [0u8; 3];
        // SAFETY: reads into a live buffer of the length given.
        let n = unsafe { libc::read(fds[0], got.as_mut_ptr().cast(), got.len()) };
        if n == 3 {
            Ok(())
        } else {
            Err(format!("read {n} bytes back"))
        }
    }

    #[test]
    fn allowed_syscalls_work_under_every_filter() {
        let out = run_child("pipe-write");
        assert!(out.status.success(), "{}", explain(&out));
    }

    fn temp_dir(name: &str) -> Result<PathBuf, String> {
        let dir =
            std::env::temp_dir().join(format!("isocell-seccomp-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        Ok(dir)
    }

    fn s<E: std::fmt::Display>(e: E) -> String {
        e.to_string()
    }

    fn from_guest(op: u16, local: u32, peer: u32, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: peer,
            dst_port: local,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    type Packet = (Header, Vec<u8>);

    /// The next packet for the guest with operation `want` (others, such as credit updates,
    /// are skipped): from the muxer directly, as the vCPU's receive-queue refill takes them,
    /// or forwarded by the event thread.
    fn wait_for(
        muxer: &Mutex<Muxer>,
        forwarded: &Receiver<Packet>,
        want: u16,
    ) -> Result<Packet, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            let direct = muxer.lock().unwrap().next_packet(&mut buf);
            let packet = match direct {
                Some(h) => Some((h, buf[..h.len as usize].to_vec())),
                None => forwarded.recv_timeout(Duration::from_millis(20)).ok(),
            };
            if let Some(p) = packet.filter(|p| p.0.op == want) {
                return Ok(p);
            }
        }
        Err(format!("no packet with op {want} for the guest"))
    }

    /// A vCPU thread and the vsock event thread, each under its filter, run the real devices:
    /// serial, i8042 reset, boot timer, block-style file I/O, urandom, and vsock connections
    /// both ways through the real muxer; the vCPU thread is kicked and both threads end.
    fn devices() -> Result<(), String> {
        prepare_process().map_err(s)?;
        let dir = temp_dir("devices")?;
        let uds = dir.join("v.sock");
        let guest_target = UnixListener::bind(format!("{}_1024", uds.display())).map_err(s)?;
        let muxer = Arc::new(Mutex::new(Muxer::new(CID, &uds).map_err(s)?));
        let epoll = muxer.lock().unwrap().epoll();
        let irq = EventFd::new(EFD_NONBLOCK).map_err(s)?;
        let (exit_tx, exit_rx) = channel();
        let exit = ExitRequester::new(exit_tx);
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let console = LineWriter::new(File::create(dir.join("console")).map_err(s)?);
        let mut pio = Bus::new();
        let serial = SerialConsole::new(irq.try_clone().map_err(s)?, Box::new(console));
        pio.insert("serial0", COM1_BASE, COM1_LEN, Arc::new(Mutex::new(serial))).map_err(s)?;
        let ctl = Arc::new(Mutex::new(I8042::new(exit.clone())));
        pio.insert("i8042", i8042::COMMAND_PORT, 1, ctl).map_err(s)?;
        let mut mmio = Bus::new();
        let timer = Arc::new(Mutex::new(BootTimer::new(timeline.clone())));
        mmio.insert("boot_timer", 0xd000_0000, BOOT_TIMER_LEN, timer).map_err(s)?;
        let disk = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("disk.img"))
            .map_err(s)?;
        disk.set_len(1 << 20).map_err(s)?;
        let urandom = File::open("/dev/urandom").map_err(s)?;
        register_kick_signal().map_err(s)?;
        let (fwd_tx, fwd_rx) = channel::<Packet>();
        let (kick_tx, kick_rx) = channel::<()>();
        let (go_tx, go_rx) = channel::<()>();
        let stop = Arc::new(AtomicBool::new(false));

        let event_thread = {
            let (muxer, stop, irq) = (muxer.clone(), stop.clone(), irq.try_clone().map_err(s)?);
            thread::spawn(move || -> Result<(), String> {
                install(ThreadKind::Vsock).map_err(s)?;
                let mut events = [EpollEvent::default(); 1];
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::SeqCst) {
                    match epoll.wait(50, &mut events) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.to_string()),
                    }
                    let mut m = muxer.lock().unwrap();
                    m.poll();
                    while let Some(h) = m.next_packet(&mut buf) {
                        let _ = fwd_tx.send((h, buf[..h.len as usize].to_vec()));
                        irq.write(1).map_err(s)?;
                    }
                }
                Ok(())
            })
        };

        let vcpu = {
            let muxer = muxer.clone();
            thread::spawn(move || -> Result<(), String> {
                install(ThreadKind::Vcpu).map_err(s)?;
                for b in b"console line\n" {
                    pio.write(COM1_BASE, &[*b]);
                }
                mmio.write(0xd000_0000, &[BOOT_TIMER_MAGIC]);
                let sector = vec![7u8; 4096];
                disk.write_all_at(&sector, 512).map_err(s)?;
                let mut back = vec![0u8; 4096];
                disk.read_exact_at(&mut back, 512).map_err(s)?;
                disk.sync_data().map_err(s)?;
                let mut random = [0u8; 64];
                (&urandom).read_exact(&mut random).map_err(s)?;
                let exit_counts = ExitCounts::default();
                exit_counts.add(ExitKind::PioOut, None);
                drop(exit_counts.sorted());
                drop(vec![1u8; 8 << 20]);

                // Guest-initiated: connect to the host's listener at uds_1024, talk, shut down.
                muxer.lock().unwrap().guest_packet(&from_guest(op::REQUEST, 1024, 5000, 0), &[]);
                wait_for(&muxer, &fwd_rx, op::RESPONSE)?;
                muxer.lock().unwrap().guest_packet(&from_guest(op::RW, 1024, 5000, 4), b"ping");
                let (_, data) = wait_for(&muxer, &fwd_rx, op::RW)?;
                if data != b"pong" {
                    return Err(format!("expected pong, got {data:?}"));
                }
                let mut shut = from_guest(op::SHUTDOWN, 1024, 5000, 0);
                shut.flags = 3;
                muxer.lock().unwrap().guest_packet(&shut, &[]);

                // Host-initiated: the event thread accepts it and forwards the request.
                let (req, _) = wait_for(&muxer, &fwd_rx, op::REQUEST)?;
                let resp = from_guest(op::RESPONSE, req.src_port, req.dst_port, 0);
                muxer.lock().unwrap().guest_packet(&resp, &[]);
                let data = from_guest(op::RW, req.src_port, req.dst_port, 5);
                muxer.lock().unwrap().guest_packet(&data, b"hello");
                let rst = from_guest(op::RST, req.src_port, req.dst_port, 0);
                muxer.lock().unwrap().guest_packet(&rst, &[]);

                // Reset through the i8042, then wait to be kicked as stop_vcpus would.
                pio.write(i8042::COMMAND_PORT, &[0xfe]);
                kick_tx.send(()).map_err(s)?;
                go_rx.recv_timeout(Duration::from_secs(10)).map_err(s)?;
                Ok(())
            })
        };

        // The host side, unfiltered.
        let (mut guest_conn, _) = guest_target.accept().map_err(s)?;
        guest_conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(s)?;
        let mut ping = [0u8; 4];
        guest_conn.read_exact(&mut ping).map_err(s)?;
        guest_conn.write_all(b"pong").map_err(s)?;
        let mut host = UnixStream::connect(&uds).map_err(s)?;
        host.set_read_timeout(Some(Duration::from_secs(10))).map_err(s)?;
        host.write_all(b"CONNECT 52\n").map_err(s)?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            host.read_exact(&mut byte).map_err(s)?;
            line.push(byte[0]);
        }
        let mut hello = [0u8; 5];
        host.read_exact(&mut hello).map_err(s)?;

        kick_rx.recv_timeout(Duration::from_secs(10)).map_err(s)?;
        vcpu.kill(SIGRTMIN()).map_err(s)?;
        thread::sleep(Duration::from_millis(50));
        go_tx.send(()).map_err(s)?;
        join(vcpu)?;
        stop.store(true, Ordering::SeqCst);
        join(event_thread)?;

        if !line.starts_with(b"OK ") || &hello != b"hello" || &ping != b"ping" {
            return Err(format!("host saw {line:?} {hello:?} {ping:?}"));
        }
        if exit_rx.try_recv() != Ok(VmExit::Reboot) {
            return Err("the i8042 reset was not reported".into());
        }
        if timeline.phases().guest_init_us.is_none() {
            return Err("the boot timer did not fire".into());
        }
        let console = std::fs::read_to_string(dir.join("console")).map_err(s)?;
        if console != "console line\n" {
            return Err(format!("console holds {console:?}"));
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn device_threads_run_under_their_filters() {
        let out = run_child("devices");
        assert!(out.status.success(), "{}", explain(&out));
    }

    /// The main thread's work after the vCPUs start, under the Main filter: wait for the exit,
    /// kick and join the vCPU threads, remove the socket, flush the disk, measure memory,
    /// write the report, print to stderr, and exit the process.
    fn main_epilogue() -> Result<(), String> {
        prepare_process().map_err(s)?;
        let dir = temp_dir("main")?;
        let socket_path = dir.join("v.sock");
        let _listener = UnixListener::bind(&socket_path).map_err(s)?;
        let mut disk = File::create(dir.join("disk.img")).map_err(s)?;
        disk.write_all(b"data").map_err(s)?;
        register_kick_signal().map_err(s)?;
        let (tx, rx) = channel();
        let ctx = Arc::new(VcpuContext {
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            exit: ExitRequester::new(tx),
            exit_counts: ExitCounts::default(),
            stopping: AtomicBool::new(false),
        });
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let report_path = dir.join("report.json");
        let main = thread::spawn(move || -> Result<(), String> {
            let workers: Vec<_> = (0..2)
                .map(|i| {
                    let ctx = ctx.clone();
                    thread::spawn(move || {
                        if i == 0 {
                            ctx.exit.request(VmExit::Reboot);
                        }
                        while !ctx.stopping.load(Ordering::SeqCst) {
                            // SAFETY: pause() only waits for a signal (the kick).
                            unsafe { libc::pause() };
                        }
                    })
                })
                .collect();
            install(ThreadKind::Main).map_err(s)?;
            let big = vec![1u8; 8 << 20];
            let reason = rx.recv_timeout(Duration::from_secs(10)).map_err(s)?;
            timeline.mark(Phase::Exited);
            let stuck = stop_vcpus(&ctx, workers, Duration::from_secs(5));
            let _ = std::fs::remove_file(&socket_path);
            disk.sync_all().map_err(s)?;
            let memory = crate::report::measure_self(&[]).ok_or("smaps unreadable")?;
            let report = json!({
                "reason": reason.kind(),
                "stuck": stuck,
                "vmm_kib": memory.vmm_overhead_kib,
                "phases": serde_json::to_value(timeline.phases()).map_err(s)?,
            });
            let text = serde_json::to_string_pretty(&report).map_err(s)?;
            std::fs::write(&report_path, text).map_err(s)?;
            writeln!(std::io::stderr(), "main epilogue done").map_err(s)?;
            drop(big);
            if stuck != 0 || reason != VmExit::Reboot || socket_path.exists() {
                return Err(format!("stuck {stuck}, reason {reason:?}"));
            }
            std::process::exit(0)
        });
        join(main)
    }

    #[test]
    fn main_thread_epilogue_runs_under_its_filter() {
        let out = run_child("main-epilogue");
        assert!(out.status.success(), "{}", explain(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("main epilogue done"));
    }
}
