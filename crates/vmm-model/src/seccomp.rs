//! Seccomp allow-lists for the VMM's threads, one per kind of thread.
//!
//! [`allowed_syscalls`] is the single source of truth: the VMM compiles it into the BPF
//! program each of its threads installs (`isocell_vmm::seccomp::compile`), and [`describe`] turns
//! it into the JSON published as part of the cell's attack surface. Anything not on a thread's
//! list kills the whole VMM with `SIGSYS`.
//!
//! Each thread installs its own filter (no TSYNC), once its setup is done:
//! - [`ThreadKind::Vcpu`]: first thing on each vCPU thread, before the first `KVM_RUN`;
//! - [`ThreadKind::VirtioBlock`], [`ThreadKind::VirtioRng`], [`ThreadKind::VirtioVsock`]: first
//!   thing on each device's worker thread, before it touches a queue;
//! - [`ThreadKind::Main`]: on the main thread right after the vCPU threads are started, so it
//!   never needs `clone`. A filter is inherited by threads created later, so no thread may be
//!   spawned after it.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// The kinds of thread the VMM runs, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread, once the vCPUs run: waits for the exit, stops the vCPUs, cleans up,
    /// writes the report and exits.
    Main,
    /// A vCPU thread: `KVM_RUN` and the register accesses its exits carry. Queue work never
    /// runs here: notifies go to ioeventfds, interrupts come from irqfds.
    Vcpu,
    /// A virtio-blk worker: the disk image's reads, writes and flushes.
    VirtioBlock,
    /// A virtio-rng worker: reads from the host's entropy source.
    VirtioRng,
    /// A virtio-vsock worker: the guest's connections as host Unix sockets.
    VirtioVsock,
    /// The main thread of a VMM started with `--snapshot-save`: the main thread's calls, and
    /// reading (never setting) the paused VM's state for the snapshot.
    MainSnapshot,
}

impl ThreadKind {
    /// Every kind, in the order of their names.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Main,
        ThreadKind::MainSnapshot,
        ThreadKind::Vcpu,
        ThreadKind::VirtioBlock,
        ThreadKind::VirtioRng,
        ThreadKind::VirtioVsock,
    ];

    /// Stable lowercase name, as used in [`describe`] and in thread names.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::MainSnapshot => "main-snapshot",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::VirtioBlock => "virtio-blk",
            ThreadKind::VirtioRng => "virtio-rng",
            ThreadKind::VirtioVsock => "virtio-vsock",
        }
    }

    /// The kind named `name`, as [`ThreadKind::name`] spells it.
    pub fn from_name(name: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
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
pub const MUST_CHECK_ARGS: [i64; 6] = [
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
pub const fn ioc(dir: u32, ty: u32, nr: u32, size: u32) -> u32 {
    (dir << IOC_DIRSHIFT) | (size << IOC_SIZESHIFT) | (ty << IOC_TYPESHIFT) | (nr << IOC_NRSHIFT)
}

/// The ioctl type of every KVM request, `KVMIO` in `include/uapi/linux/kvm.h` (0xAE). Written out
/// here so that this crate needs no KVM bindings; the VMM's tests check it against
/// `kvm_bindings::KVMIO`.
pub const KVMIO: u32 = 0xAE;

/// `KVM_RUN`, `_IO(KVMIO, 0x80)` (kvm-ioctls does not export its request numbers).
pub const KVM_RUN: u32 = ioc(IOC_NONE, KVMIO, 0x80, 0);

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// The requests that read a paused VM's state for a snapshot, with the sizes of the structures
/// they fill (`include/uapi/linux/kvm.h`, x86); the VMM's tests check each size against
/// `kvm_bindings`.
pub const SNAPSHOT_IOCTLS: [(u32, &str); 13] = [
    (ioc(IOC_READ, KVMIO, 0x81, 144), "KVM_GET_REGS"),
    (ioc(IOC_READ, KVMIO, 0x83, 312), "KVM_GET_SREGS"),
    (ioc(IOC_READ | IOC_WRITE, KVMIO, 0x88, 8), "KVM_GET_MSRS"),
    (ioc(IOC_READ, KVMIO, 0x8e, 1024), "KVM_GET_LAPIC"),
    (ioc(IOC_READ, KVMIO, 0x98, 4), "KVM_GET_MP_STATE"),
    (ioc(IOC_READ, KVMIO, 0x9f, 64), "KVM_GET_VCPU_EVENTS"),
    (ioc(IOC_READ, KVMIO, 0xa1, 128), "KVM_GET_DEBUGREGS"),
    (ioc(IOC_NONE, KVMIO, 0xa3, 0), "KVM_GET_TSC_KHZ"),
    (ioc(IOC_READ, KVMIO, 0xa4, 4096), "KVM_GET_XSAVE"),
    (ioc(IOC_READ, KVMIO, 0xa6, 392), "KVM_GET_XCRS"),
    (ioc(IOC_READ | IOC_WRITE, KVMIO, 0x62, 520), "KVM_GET_IRQCHIP"),
    (ioc(IOC_READ, KVMIO, 0x9f, 112), "KVM_GET_PIT2"),
    (ioc(IOC_READ, KVMIO, 0x7c, 48), "KVM_GET_CLOCK"),
];

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

/// What every device worker needs besides its backend's calls: waiting on its epoll set
/// (queue ioeventfds, the control eventfd, the backend), reading those eventfds and the backend
/// (`read`; writing the irqfd is `write`, in [`common`]).
fn worker<const N: usize>(backend: [AllowedSyscall; N]) -> Vec<AllowedSyscall> {
    let mut list = vec![any("epoll_wait", libc::SYS_epoll_wait), any("read", libc::SYS_read)];
    list.extend(backend);
    list
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
        ThreadKind::MainSnapshot => {
            list = allowed_syscalls(ThreadKind::Main);
            list.extend(SNAPSHOT_IOCTLS.iter().map(|&(request, name)| ioctl(request, name)));
            // write_memory: the pages that hold data at their offsets, holes left between
            // them, and the file's full length set at the end.
            list.extend([
                any("pwrite64", libc::SYS_pwrite64),
                any("ftruncate", libc::SYS_ftruncate),
            ]);
        }
        ThreadKind::Main => list.extend([
            // stop_vcpus: pthread_kill with the kick signal, sleeping between rounds.
            when("tgkill", libc::SYS_tgkill, vec![eq(2, int(libc::SIGRTMIN()), "SIGRTMIN")]),
            any("clock_nanosleep", libc::SYS_clock_nanosleep),
            // wait_for_exit sleeps on its wake-up eventfd with a deadline (and reads it, below).
            any("poll", libc::SYS_poll),
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
        ThreadKind::Vcpu => list.extend([ioctl(KVM_RUN, "KVM_RUN")]),
        ThreadKind::VirtioBlock => list.extend(worker([
            // Requests: reads and writes at an offset, flushes.
            any("pread64", libc::SYS_pread64),
            any("pwrite64", libc::SYS_pwrite64),
            any("fdatasync", libc::SYS_fdatasync),
        ])),
        ThreadKind::VirtioRng => list.extend(worker([])),
        ThreadKind::VirtioVsock => list.extend(worker([
            // The muxer's epoll set of host sockets, nested in the worker's.
            any("epoll_ctl", libc::SYS_epoll_ctl),
            // Host-initiated connections: accepted from the listening socket.
            when(
                "accept4",
                libc::SYS_accept4,
                vec![eq(3, int(libc::SOCK_CLOEXEC), "SOCK_CLOEXEC")],
            ),
            // Guest-initiated connections: to the host's listener for that port, never waiting
            // (a full listen queue is a refusal).
            when(
                "socket",
                libc::SYS_socket,
                vec![
                    eq(0, int(libc::AF_UNIX), "AF_UNIX"),
                    eq(
                        1,
                        int(libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK),
                        "SOCK_STREAM|SOCK_CLOEXEC|SOCK_NONBLOCK",
                    ),
                ],
            ),
            any("connect", libc::SYS_connect),
            ioctl(libc::FIONBIO as u32, "FIONBIO"),
            any("recvfrom", libc::SYS_recvfrom),
            send_nosignal(),
            any("shutdown", libc::SYS_shutdown),
        ])),
    }
    list.sort();
    list
}

/// One syscall form as [`describe`] shows it. The fields are declared in the byte order of
/// their names, so serde_json's compact text of it has its keys sorted: canonical JSON as is.
#[derive(Serialize)]
struct SyscallView {
    args: Vec<ArgView>,
    number: i64,
    syscall: &'static str,
}

/// One argument check as [`describe`] shows it (fields in name order, as above).
#[derive(Serialize)]
struct ArgView {
    index: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    mask: Option<u64>,
    name: &'static str,
    op: &'static str,
    value: u64,
}

fn view() -> BTreeMap<&'static str, Vec<SyscallView>> {
    let arg = |a: &ArgCheck| {
        let (op, mask) = match a.op {
            ArgOp::Eq => ("eq", None),
            ArgOp::MaskedEq(mask) => ("masked_eq", Some(mask)),
        };
        ArgView { index: a.index, mask, name: a.name, op, value: a.value }
    };
    ThreadKind::ALL
        .into_iter()
        .map(|kind| {
            let entries = allowed_syscalls(kind)
                .iter()
                .map(|s| SyscallView {
                    args: s.args.iter().map(arg).collect(),
                    number: s.number,
                    syscall: s.syscall,
                })
                .collect();
            (kind.name(), entries)
        })
        .collect()
}

/// Every thread kind's allow-list as JSON, `{kind: [{syscall, number, args}]}`, sorted, from
/// the same data the VMM compiles its filters from. A syscall not listed for a kind kills the VMM.
pub fn describe() -> Value {
    serde_json::to_value(view()).unwrap_or_default()
}

/// The canonical text of [`describe`] (compact, object keys sorted at every depth), written
/// without building JSON values first: every cell's plan measures it, and the value form cost
/// it a million instructions.
pub fn describe_canonical() -> String {
    serde_json::to_string(&view()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn describe_is_deterministic_and_constrains_ioctl() {
        let a = describe();
        assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&describe()).unwrap());
        let kinds: Vec<_> = a.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            kinds,
            ["main", "main-snapshot", "vcpu", "virtio-blk", "virtio-rng", "virtio-vsock"]
        );
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
        assert_eq!(vcpu_ioctls, [("KVM_RUN", 0xAE80)]);
        // Device work is off the vCPU threads: no sockets and no file I/O there.
        let vcpu: Vec<_> =
            a["vcpu"].as_array().unwrap().iter().map(|e| e["syscall"].as_str().unwrap()).collect();
        for never in ["socket", "connect", "sendto", "recvfrom", "pread64", "pwrite64", "read"] {
            assert!(!vcpu.contains(&never), "vcpu allows {never}");
        }
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
}
