//! vCPUs: configured for the 64-bit boot protocol, each run on its own thread. Port I/O and MMIO
//! exits are dispatched to the buses; anything that ends the VM is reported through the exit
//! channel, never by panicking.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::{cpuid, msrs, regs};
use crate::devices::Bus;
use crate::exit::{ExitRequester, VmExit};

/// Failure to create or configure a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM refused to create the vCPU.
    #[error("KVM refused to create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// The CPUID could not be built or set.
    #[error("could not set the CPUID of vCPU {0}: {1}")]
    Cpuid(u8, String),
    /// MSRs could not be set.
    #[error("could not set the MSRs of vCPU {0}")]
    Msrs(u8, #[source] msrs::MsrError),
    /// Registers could not be set.
    #[error("could not set the registers of vCPU {0}")]
    Regs(u8, #[source] regs::RegsError),
    /// The vCPU thread could not be started.
    #[error("could not start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
}

/// One configured vCPU, ready to run.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

/// What the vCPU threads share: the buses and the way to stop the VM.
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where stop requests go.
    pub exit: ExitRequester,
    /// VM exits counted by kind and address, for profiling.
    pub exit_counts: ExitCounts,
    /// Set when the VM is stopping; vCPU threads leave their loop when they see it.
    pub stopping: AtomicBool,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the signal that kicks vCPU threads out of `KVM_RUN`.
pub fn register_kick_signal() -> Result<(), VcpuError> {
    register_signal_handler(SIGRTMIN(), kick_handler)
        .map_err(|e| VcpuError::Spawn(0, std::io::Error::from_raw_os_error(e.errno())))
}

/// Stops the vCPU threads: marks the VM as stopping and signals each thread until it has left
/// `KVM_RUN` and ended. Returns how many threads did not end within `patience`.
pub fn stop_vcpus(ctx: &VcpuContext, threads: Vec<JoinHandle<()>>, patience: Duration) -> usize {
    ctx.stopping.store(true, Ordering::SeqCst);
    let start = std::time::Instant::now();
    let mut left = threads;
    while !left.is_empty() && start.elapsed() < patience {
        let (done, running): (Vec<_>, Vec<_>) = left.into_iter().partition(|t| t.is_finished());
        for t in done {
            let _ = t.join();
        }
        for t in &running {
            // The signal interrupts KVM_RUN (EINTR); a thread between two runs sees `stopping`.
            let _ = t.kill(SIGRTMIN());
        }
        left = running;
        if !left.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    left.len()
}

/// Counts of VM exits that reached the VMM, by kind and address.
#[derive(Clone, Debug, Default)]
pub struct ExitCounts(Arc<Mutex<HashMap<(&'static str, u64), u64>>>);

impl ExitCounts {
    fn add(&self, kind: &'static str, addr: u64) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((kind, addr)).or_default() += 1;
    }

    /// The counts, most frequent first, as `("pio_in 0x71", n)`.
    pub fn sorted(&self) -> Vec<(String, u64)> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, u64)> =
            map.iter().map(|((kind, addr), n)| (format!("{kind} {addr:#x}"), *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and programs CPUID, MSRs, registers, FPU and LAPIC.
    pub fn new(
        vm: &VmFd,
        supported: &CpuId,
        index: u8,
        count: u8,
        entry: u64,
    ) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(u64::from(index)).map_err(|e| VcpuError::Create(index, e))?;
        let cpuid = cpuid::for_vcpu(supported, index, count)
            .map_err(|e| VcpuError::Cpuid(index, format!("{e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(|e| VcpuError::Cpuid(index, e.to_string()))?;
        msrs::setup_msrs(&fd).map_err(|e| VcpuError::Msrs(index, e))?;
        regs::setup_regs(&fd, entry).map_err(|e| VcpuError::Regs(index, e))?;
        regs::setup_sregs(&fd).map_err(|e| VcpuError::Regs(index, e))?;
        regs::setup_fpu(&fd).map_err(|e| VcpuError::Regs(index, e))?;
        regs::setup_lint(&fd).map_err(|e| VcpuError::Regs(index, e))?;
        Ok(Vcpu { index, fd })
    }

    /// Runs the vCPU on a new thread until the VM stops.
    pub fn start(self, ctx: Arc<VcpuContext>) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // The filter is in place before the first KVM_RUN: before any guest code runs.
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                    ctx.exit.request(VmExit::VmmError(format!("vCPU {index}: {e}")));
                    return;
                }
                self.run(&ctx)
            })
            .map_err(|e| VcpuError::Spawn(index, e))
    }

    fn run(mut self, ctx: &VcpuContext) {
        while !ctx.stopping.load(Ordering::SeqCst) {
            if let Some(exit) = self.run_once(ctx) {
                ctx.exit.request(exit);
                return;
            }
        }
    }

    /// Runs until the next exit to user space; returns why the VM must stop, if it must.
    pub fn run_once(&mut self, ctx: &VcpuContext) -> Option<VmExit> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.exit_counts.add("pio_in", u64::from(port));
                if !ctx.pio.read(u64::from(port), data) {
                    // Nothing there: the floating bus reads all ones.
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.exit_counts.add("pio_out", u64::from(port));
                ctx.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.exit_counts.add("mmio_read", addr);
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.exit_counts.add("mmio_write", addr);
                ctx.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Shutdown) => Some(VmExit::TripleFault { vcpu: index }),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    Some(VmExit::Reboot)
                }
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => Some(VmExit::GuestPanic),
                other => Some(VmExit::KvmFailure {
                    vcpu: index,
                    detail: format!("system event {other}"),
                }),
            },
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::KvmFailure {
                vcpu: index,
                detail: format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                ),
            }),
            Ok(VcpuExit::InternalError) => Some(VmExit::KvmFailure {
                vcpu: index,
                detail: "KVM internal error (the guest state could not be emulated)".into(),
            }),
            Ok(other) => Some(VmExit::KvmFailure {
                vcpu: index,
                detail: format!("unexpected exit {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmExit::VmmError(format!("KVM_RUN failed on vCPU {index}: {e}"))),
        }
    }

    /// Wraps an already created vCPU fd (tests that run hand-made guest code).
    pub fn from_fd(index: u8, fd: VcpuFd) -> Self {
        Vcpu { index, fd }
    }
}
