//! Why a VM stopped, and the VMM process exit status that says so.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::OnceLock;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Exit status: the guest powered off or rebooted.
pub const EXIT_OK: i32 = 0;
/// Exit status: the VMM failed (KVM setup, I/O on the host, ...).
pub const EXIT_VMM_ERROR: i32 = 1;
/// Exit status: the configuration or the command line was invalid; no VM was created.
pub const EXIT_BAD_CONFIG: i32 = 2;
/// Exit status: the guest kernel panicked.
pub const EXIT_GUEST_PANIC: i32 = 3;
/// Exit status: the guest crashed the vCPU (triple fault, invalid state, KVM internal error).
pub const EXIT_GUEST_CRASH: i32 = 4;
/// Exit status: this host cannot run the VM (no hardware virtualization behind /dev/kvm).
pub const EXIT_NO_HARDWARE_VIRT: i32 = 5;
/// Exit status: the VM ran past its configured `max_lifetime_secs` and was stopped.
pub const EXIT_LIFETIME_EXCEEDED: i32 = 6;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 pulse) or KVM reported a shutdown/reset system event.
    Reboot,
    /// The guest powered off through the ACPI sleep control register (S5).
    PowerOff,
    /// The guest kernel panicked (seen through the i8042 LED blink its panic loop sends).
    GuestPanic,
    /// A vCPU triple-faulted.
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u8,
    },
    /// KVM could not run a vCPU (internal error, failed entry, unexpected exit).
    KvmFailure {
        /// The vCPU concerned.
        vcpu: u8,
        /// What KVM reported.
        detail: String,
    },
    /// The lifetime limit passed.
    LifetimeExceeded {
        /// The limit, in seconds.
        secs: u64,
    },
    /// The VMM itself failed while the VM ran.
    VmmError(String),
    /// The VM was paused and saved as a snapshot (`--snapshot-save`); it never resumes.
    Saved,
    /// The host asked the VMM to stop (SIGTERM): the cell is over and nothing in the guest
    /// outlives it, so the guest is not asked to shut itself down.
    Stopped,
}

impl VmExit {
    /// The process exit status for this reason.
    pub fn code(&self) -> i32 {
        match self {
            VmExit::Reboot | VmExit::PowerOff | VmExit::Saved | VmExit::Stopped => EXIT_OK,
            VmExit::GuestPanic => EXIT_GUEST_PANIC,
            VmExit::TripleFault { .. } | VmExit::KvmFailure { .. } => EXIT_GUEST_CRASH,
            VmExit::LifetimeExceeded { .. } => EXIT_LIFETIME_EXCEEDED,
            VmExit::VmmError(_) => EXIT_VMM_ERROR,
        }
    }

    /// A short machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            VmExit::Reboot => "reboot",
            VmExit::PowerOff => "poweroff",
            VmExit::GuestPanic => "guest_panic",
            VmExit::TripleFault { .. } => "triple_fault",
            VmExit::KvmFailure { .. } => "kvm_failure",
            VmExit::LifetimeExceeded { .. } => "lifetime_exceeded",
            VmExit::VmmError(_) => "vmm_error",
            VmExit::Saved => "saved",
            VmExit::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reboot => write!(f, "the guest stopped (reboot)"),
            VmExit::PowerOff => write!(f, "the guest powered off"),
            VmExit::GuestPanic => write!(f, "the guest kernel panicked (see its console log)"),
            VmExit::TripleFault { vcpu } => write!(f, "vCPU {vcpu} triple-faulted"),
            VmExit::KvmFailure { vcpu, detail } => write!(f, "vCPU {vcpu} stopped: {detail}"),
            VmExit::LifetimeExceeded { secs } => {
                write!(f, "the VM ran past its lifetime limit of {secs} s and was stopped")
            }
            VmExit::VmmError(e) => write!(f, "VMM failure: {e}"),
            VmExit::Saved => write!(f, "the VM was paused and saved as a snapshot"),
            VmExit::Stopped => write!(f, "the host stopped the VM (SIGTERM)"),
        }
    }
}

/// Lets devices and vCPU threads ask for the VM to stop. The first request wins.
#[derive(Clone, Debug)]
pub struct ExitRequester(Sender<VmExit>);

impl ExitRequester {
    /// Wraps the sending side of the VMM's exit channel.
    pub fn new(tx: Sender<VmExit>) -> Self {
        ExitRequester(tx)
    }

    /// Asks for the VM to stop. Never fails: if the VMM is already stopping, it is ignored.
    pub fn request(&self, exit: VmExit) {
        let _ = self.0.send(exit);
        wake();
    }
}

/// The process's [`Wakeup`], made on first use and never closed: a signal handler or a
/// vCPU thread that outlives the VM may still write it while the VMM writes its report.
static WAKEUP: OnceLock<Wakeup> = OnceLock::new();

/// Set by the SIGTERM handler: the host asked for the VM to stop.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Wakes the main thread from [`Wakeup::wait`]. Async-signal-safe: an atomic load and one
/// `write` of a counter to an eventfd that stays open.
pub fn wake() {
    if let Some(w) = WAKEUP.get() {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes of a live stack buffer to the process's eventfd, which is
        // never closed.
        unsafe { libc::write(w.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

extern "C" fn stop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
    wake();
}

/// Whether the host has asked for the VM to stop (SIGTERM since [`Wakeup::get`]).
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// Set by the SIGUSR1 handler of a VMM that may be saved: the host asked for a snapshot.
static SAVE_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn save_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SAVE_REQUESTED.store(true, Ordering::SeqCst);
    wake();
}

/// Handles SIGUSR1 as a snapshot request from here on (`--snapshot-save` only: any other VMM
/// leaves it alone), with no request yet.
pub fn handle_save_signal() -> std::io::Result<()> {
    SAVE_REQUESTED.store(false, Ordering::SeqCst);
    handle(libc::SIGUSR1, save_handler)
}

/// Whether the host has asked for a snapshot (SIGUSR1 since [`handle_save_signal`]).
pub fn save_requested() -> bool {
    SAVE_REQUESTED.load(Ordering::SeqCst)
}

fn handle(
    signal: libc::c_int,
    handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
) -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(signal, handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// What the main thread sleeps on while the VM runs: an eventfd written by every exit request,
/// by SIGTERM (the host stopping the cell) and by SIGUSR1 (a snapshot request), so it wakes
/// at once for each and never polls. One per process: the VMM runs one VM.
pub struct Wakeup(EventFd);

impl Wakeup {
    /// The process's wake-up; the first call makes it and handles SIGTERM as a stop request
    /// from then on (`main` calls it first thing, so no SIGTERM is lost while the VM is being
    /// built). A VMM is PID 1 of its jail's PID namespace, where a signal without a handler
    /// is ignored: without this the host could only kill it, losing its report.
    pub fn get() -> std::io::Result<&'static Wakeup> {
        if let Some(w) = WAKEUP.get() {
            return Ok(w);
        }
        let fd = EventFd::new(EFD_NONBLOCK)?;
        // Handled before the eventfd is published: a SIGTERM in between only sets the flag,
        // which the first wait sees; a failure leaves nothing half made for a retry.
        handle(libc::SIGTERM, stop_handler)?;
        Ok(WAKEUP.get_or_init(|| Wakeup(fd)))
    }

    /// Sleeps until woken or `timeout` passes (`None`: no limit), then clears the wake-ups.
    pub fn wait(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(-1, |t| {
            // Rounded up, so a wait never ends just before its deadline and spins.
            libc::c_int::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(libc::c_int::MAX)
        });
        let mut fds = [libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        // SAFETY: one valid pollfd that outlives the call; EINTR only ends the wait early.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        let _ = self.0.read();
    }
}
