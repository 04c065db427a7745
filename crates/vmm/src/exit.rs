//! Why a VM stopped, and the VMM process exit status that says so.

use std::sync::mpsc::Sender;

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
}

impl VmExit {
    /// The process exit status for this reason.
    pub fn code(&self) -> i32 {
        match self {
            VmExit::Reboot | VmExit::PowerOff | VmExit::Saved => EXIT_OK,
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
    }
}
