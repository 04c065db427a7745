//! Seccomp filters for the VMM's threads, one per kind of thread.
//!
//! The allow-lists ([`allowed_syscalls`]) and their JSON description ([`describe`]) are
//! [`isocell_vmm_model::seccomp`], re-exported here; [`compile`] turns a list into a BPF program
//! with seccompiler and [`install`] applies it. Anything not on a thread's list kills the whole
//! VMM with `SIGSYS`.
//!
//! Each thread installs its own filter ([`install`], no TSYNC), once its setup is done:
//! - [`ThreadKind::Vcpu`]: first thing on each vCPU thread, before the first `KVM_RUN`;
//! - [`ThreadKind::Vsock`]: first thing on the vsock event thread;
//! - [`ThreadKind::Main`]: on the main thread right after the vCPU threads are started, so it
//!   never needs `clone`. A filter is inherited by threads created later, so no thread may be
//!   spawned after it.
//!
//! What a refused call does is the [`Mode`], chosen once per process with `--seccomp`: `kill`
//! (the default: `SIGSYS` kills the VMM), `trap` (the VMM prints which thread made which call
//! and exits with status 159, 128 + SIGSYS), or `log` (the call is allowed and the kernel's audit
//! log records it: `dmesg | grep 'type=1326'`). The last two are for developers and bug
//! reports, never for production.
//!
//! glibc's malloc, when it shrinks a secondary arena, may open and read
//! `/proc/sys/vm/overcommit_memory` from whatever thread frees memory. [`prepare_process`] keeps
//! every thread on the main arena so that never happens; call it first thing in `main`.

use std::collections::BTreeMap;

pub use isocell_vmm_model::seccomp::*;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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
    /// The `SIGSYS` handler of the `trap` mode could not be installed.
    #[error("cannot install the SIGSYS handler of --seccomp trap")]
    Handler,
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

/// What a call off a thread's list does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// `SIGSYS` kills the whole VMM (production).
    #[default]
    Kill,
    /// The VMM names the thread and the call on stderr and exits with status 159.
    Trap,
    /// The call goes through; the kernel's audit log records it.
    Log,
}

static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();

/// Chooses what refused calls do, for every filter installed afterwards. Call once, before any
/// thread installs its filter; `trap` also installs the `SIGSYS` handler that names the call.
pub fn set_mode(mode: Mode) -> Result<(), SeccompError> {
    let _ = MODE.set(mode);
    if mode == Mode::Trap {
        let _ = SYSCALL_NAMES.set(known_syscalls());
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
            .map_err(|_| SeccompError::Handler)?;
    }
    Ok(())
}

fn mode() -> Mode {
    MODE.get().copied().unwrap_or_default()
}

/// Every syscall name the allow-lists know, plus the usual suspects, for the trap message.
static SYSCALL_NAMES: std::sync::OnceLock<Vec<(i64, &'static str)>> = std::sync::OnceLock::new();

fn known_syscalls() -> Vec<(i64, &'static str)> {
    let mut names: Vec<(i64, &'static str)> = ThreadKind::ALL
        .iter()
        .flat_map(|k| allowed_syscalls(*k))
        .map(|s| (s.number, s.syscall))
        .collect();
    names.extend([
        (libc::SYS_read, "read"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_open, "open"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_clone, "clone"),
        (libc::SYS_clone3, "clone3"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_mmap, "mmap"),
        (libc::SYS_mprotect, "mprotect"),
        (libc::SYS_prctl, "prctl"),
        (libc::SYS_getdents64, "getdents64"),
    ]);
    names.sort_unstable();
    names.dedup_by_key(|n| n.0);
    names
}

thread_local! {
    /// This thread's kind, for the trap message (const-initialised: safe in a signal handler).
    static THREAD_KIND: std::cell::Cell<Option<ThreadKind>> = const { std::cell::Cell::new(None) };
}

/// `SIGSYS` from a `trap` filter: writes "seccomp: THREAD thread made syscall N (NAME), which
/// its filter refuses" to stderr and exits. Only async-signal-safe work: no allocation, and
/// only `write` and `exit_group`, which every list allows.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `si_syscall` sits at byte 24 of a SIGSYS siginfo on x86_64 (`_sigsys` in the union at
    // 16: `_call_addr` pointer, then `_syscall`).
    // SAFETY: the kernel hands a valid siginfo for SIGSYS; the offset is fixed by its ABI.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let kind = THREAD_KIND.with(|k| k.get()).map_or("unfiltered", ThreadKind::name);
    let name = SYSCALL_NAMES
        .get()
        .and_then(|names| {
            names.binary_search_by_key(&i64::from(nr), |n| n.0).ok().map(|i| names[i].1)
        })
        .unwrap_or("?");
    let mut buf = [0u8; 160];
    let mut len = 0;
    for part in [
        "isocell-vmm: seccomp: the ",
        kind,
        " thread made syscall ",
        decimal(nr, &mut [0u8; 12]),
        " (",
        name,
        "), which its filter refuses\n",
    ] {
        let bytes = part.as_bytes();
        let n = bytes.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    }
    // SAFETY: writes `len` bytes of a live stack buffer to stderr, then ends the process.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
    }
}

/// `n` in decimal, written into `out` (no allocation: used in the signal handler).
fn decimal(n: i32, out: &mut [u8; 12]) -> &str {
    let mut v = i64::from(n).unsigned_abs();
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 || i == 1 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        out[i] = b'-';
    }
    std::str::from_utf8(&out[i..]).unwrap_or("?")
}

/// Compiles the filter of `kind` for x86_64: listed syscalls are allowed, anything else does
/// what the [`Mode`] says (kills the process, by default).
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let backend = |source| SeccompError::Compile { kind, source };
    let refused = match mode() {
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Trap => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let filter =
        SeccompFilter::new(rule_map(kind)?, refused, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(backend)?;
    BpfProgram::try_from(filter).map_err(backend)
}

/// Compiles the filter of `kind` and applies it to the calling thread only. seccompiler sets
/// `PR_SET_NO_NEW_PRIVS` first, which an unprivileged process needs to install a filter.
/// Irreversible; threads this thread creates afterwards inherit the filter.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let program = compile(kind)?;
    THREAD_KIND.with(|k| k.set(Some(kind)));
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
    use std::sync::mpsc::channel;
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    use serde_json::json;
    use vmm_sys_util::epoll::EpollEvent;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vmm_sys_util::signal::{Killable, SIGRTMIN};

    use super::*;
    use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_LEN, BOOT_TIMER_MAGIC};
    use crate::devices::i8042::{self, I8042};
    use crate::devices::serial::{SerialConsole, COM1_BASE, COM1_LEN};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::rng::Rng;
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
        assert_eq!(
            names,
            ["main", "main-snapshot", "vcpu", "virtio-blk", "virtio-rng", "virtio-vsock"]
        );
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
    }

    #[test]
    fn ioctl_numbers_match_known_values() {
        assert_eq!(KVMIO, kvm_bindings::KVMIO);
        assert_eq!(KVM_RUN, 0xAE80);
        const IOC_WRITE: u32 = 1;
        let irq_line = ioc(IOC_WRITE, kvm_bindings::KVMIO, 0x61, 8);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_irq_level>(), 8);
        assert_eq!(irq_line, 0x4008_AE61);
        assert_eq!(libc::FIONBIO, 0x5421);
        assert_eq!(libc::FIOCLEX, 0x5451);
    }

    #[test]
    fn snapshot_ioctls_carry_the_sizes_of_their_structures() {
        use kvm_bindings as k;
        use std::mem::size_of;
        let sizes = [
            ("KVM_GET_REGS", size_of::<k::kvm_regs>()),
            ("KVM_GET_SREGS", size_of::<k::kvm_sregs>()),
            ("KVM_GET_MSRS", size_of::<k::kvm_msrs>()),
            ("KVM_GET_LAPIC", size_of::<k::kvm_lapic_state>()),
            ("KVM_GET_MP_STATE", size_of::<k::kvm_mp_state>()),
            ("KVM_GET_VCPU_EVENTS", size_of::<k::kvm_vcpu_events>()),
            ("KVM_GET_DEBUGREGS", size_of::<k::kvm_debugregs>()),
            ("KVM_GET_TSC_KHZ", 0),
            ("KVM_GET_XSAVE", size_of::<k::kvm_xsave>()),
            ("KVM_GET_XCRS", size_of::<k::kvm_xcrs>()),
            ("KVM_GET_IRQCHIP", size_of::<k::kvm_irqchip>()),
            ("KVM_GET_PIT2", size_of::<k::kvm_pit_state2>()),
            ("KVM_GET_CLOCK", size_of::<k::kvm_clock_data>()),
        ];
        assert_eq!(SNAPSHOT_IOCTLS.len(), sizes.len());
        for ((request, name), (want_name, size)) in SNAPSHOT_IOCTLS.iter().zip(sizes) {
            assert_eq!(*name, want_name);
            assert_eq!((request >> 16) & 0x3fff, size as u32, "{name}");
            assert_eq!((request >> 8) & 0xff, KVMIO, "{name}");
        }
    }

    // Enforcement runs in child processes: this test binary runs again with CHILD_ENV naming a
    // case, and `child_entry` runs that case instead of passing trivially.

    const CHILD_ENV: &str = "ISOCELL_SECCOMP_TEST_CHILD";
    const SCRATCH_ENV: &str = "ISOCELL_SECCOMP_TEST_SCRATCH";
    const CID: u64 = 3;

    /// Runs `case` in a child test process. The child works in a scratch directory that this
    /// process owns and removes, since a case may end its process without returning.
    fn run_child(case: &str) -> std::process::Output {
        let scratch = tempfile::Builder::new().prefix("isocell-seccomp-").tempdir().unwrap();
        Command::new(std::env::current_exe().unwrap())
            .args(["seccomp::tests::child_entry", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, case)
            .env(SCRATCH_ENV, scratch.path())
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
            other if other.starts_with("probe-") => match ThreadKind::from_name(&other[6..]) {
                Some(kind) => probe(kind),
                None => Err(format!("unknown thread kind in {other}")),
            },
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

    /// The scratch directory the parent test made for this child (`run_child`).
    fn scratch_dir() -> Result<PathBuf, String> {
        std::env::var_os(SCRATCH_ENV)
            .map(PathBuf::from)
            .ok_or_else(|| format!("{SCRATCH_ENV} unset"))
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

    /// The next packet for the guest with operation `want` (others, such as credit updates,
    /// are skipped), polling the host sockets as the vsock worker does.
    fn wait_for(muxer: &mut Muxer, want: u16) -> Result<(Header, Vec<u8>), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let epoll = muxer.epoll();
        let mut events = [EpollEvent::default(); 1];
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            muxer.poll();
            while let Some(h) = muxer.next_packet(&mut buf) {
                if h.op == want {
                    return Ok((h, buf[..h.len as usize].to_vec()));
                }
            }
            let _ = epoll.wait(20, &mut events);
        }
        Err(format!("no packet with op {want} for the guest"))
    }

    /// Every thread kind, each under its filter, doing its real work: a vCPU thread drives
    /// serial, i8042 reset, the boot timer and a virtio transport (bring-up, notify, reset)
    /// whose rng worker runs on its own thread; a block worker's file I/O; a vsock worker's
    /// connections both ways through the real muxer; the vCPU thread is kicked and all end.
    fn devices() -> Result<(), String> {
        prepare_process().map_err(s)?;
        let dir = scratch_dir()?;
        let uds = dir.join("v.sock");
        let guest_target = UnixListener::bind(format!("{}_1024", uds.display())).map_err(s)?;
        let mut muxer = Muxer::new(CID, &uds).map_err(s)?;
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
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).map_err(s)?;
        let rng =
            MmioTransport::new(Box::new(Rng::new().map_err(s)?), mem, irq.try_clone().map_err(s)?)
                .map_err(s)?;
        // The worker installs its VirtioRng filter before it runs; wait until it has.
        let (mut rng, queue_events) = rng.start_worker("virtio-rng".into()).map_err(s)?;
        rng.confirm_worker().map_err(s)?;
        mmio.insert("rng0", 0xd000_1000, 0x1000, Arc::new(Mutex::new(rng))).map_err(s)?;
        let disk = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("disk.img"))
            .map_err(s)?;
        disk.set_len(1 << 20).map_err(s)?;
        register_kick_signal().map_err(s)?;
        let (kick_tx, kick_rx) = channel::<()>();
        let (go_tx, go_rx) = channel::<()>();

        let block = thread::spawn(move || -> Result<(), String> {
            install(ThreadKind::VirtioBlock).map_err(s)?;
            let sector = vec![7u8; 4096];
            disk.write_all_at(&sector, 512).map_err(s)?;
            let mut back = vec![0u8; 4096];
            disk.read_exact_at(&mut back, 512).map_err(s)?;
            disk.sync_data().map_err(s)?;
            if back != sector {
                return Err("the disk read back something else".into());
            }
            Ok(())
        });
        join(block)?;

        let vsock = thread::spawn(move || -> Result<(), String> {
            install(ThreadKind::VirtioVsock).map_err(s)?;
            // Guest-initiated: connect to the host's listener at uds_1024, talk, shut down.
            muxer.guest_packet(&from_guest(op::REQUEST, 1024, 5000, 0), &[]);
            wait_for(&mut muxer, op::RESPONSE)?;
            muxer.guest_packet(&from_guest(op::RW, 1024, 5000, 4), b"ping");
            let (_, data) = wait_for(&mut muxer, op::RW)?;
            if data != b"pong" {
                return Err(format!("expected pong, got {data:?}"));
            }
            let mut shut = from_guest(op::SHUTDOWN, 1024, 5000, 0);
            shut.flags = 3;
            muxer.guest_packet(&shut, &[]);
            // Host-initiated: accepted, and the request forwarded to the guest.
            let (req, _) = wait_for(&mut muxer, op::REQUEST)?;
            muxer.guest_packet(&from_guest(op::RESPONSE, req.src_port, req.dst_port, 0), &[]);
            muxer.guest_packet(&from_guest(op::RW, req.src_port, req.dst_port, 5), b"hello");
            muxer.guest_packet(&from_guest(op::RST, req.src_port, req.dst_port, 0), &[]);
            // A driver reset drops every connection.
            muxer.clear();
            Ok(())
        });

        let vcpu = thread::spawn(move || -> Result<(), String> {
            install(ThreadKind::Vcpu).map_err(s)?;
            for b in b"console line\n" {
                pio.write(COM1_BASE, &[*b]);
            }
            mmio.write(0xd000_0000, &[BOOT_TIMER_MAGIC]);
            // A driver brings the rng up (no queue ready), notifies and resets it: commands to
            // its worker, a notify eventfd, and a reset the vCPU waits for.
            for status in [1u32, 3, 11, 15] {
                mmio.write(0xd000_1000 + 0x70, &status.to_le_bytes());
            }
            mmio.write(0xd000_1000 + 0x50, &0u32.to_le_bytes());
            mmio.write(0xd000_1000 + 0x70, &0u32.to_le_bytes());
            let mut status = [0xffu8; 4];
            mmio.read(0xd000_1000 + 0x70, &mut status);
            if status != [0; 4] {
                return Err(format!("status after reset: {status:?}"));
            }
            let exit_counts = ExitCounts::default();
            exit_counts.add(ExitKind::PioOut, None);
            drop(exit_counts.sorted());
            drop(vec![1u8; 8 << 20]);
            // Reset through the i8042, then wait to be kicked as stop_vcpus would.
            pio.write(i8042::COMMAND_PORT, &[0xfe]);
            kick_tx.send(()).map_err(s)?;
            go_rx.recv_timeout(Duration::from_secs(10)).map_err(s)?;
            Ok(())
        });

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
        join(vsock)?;

        kick_rx.recv_timeout(Duration::from_secs(10)).map_err(s)?;
        vcpu.kill(SIGRTMIN()).map_err(s)?;
        thread::sleep(Duration::from_millis(50));
        go_tx.send(()).map_err(s)?;
        join(vcpu)?;
        drop(queue_events);

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
        let dir = scratch_dir()?;
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
            pausing: AtomicBool::new(false),
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
