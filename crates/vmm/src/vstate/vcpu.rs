//! vCPUs: configured for the 64-bit boot protocol, each run on its own thread. Port I/O and MMIO
//! exits are dispatched to the buses; anything that ends the VM is reported through the exit
//! channel, never by panicking.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

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
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and programs CPUID, MSRs, registers, FPU and LAPIC.
    pub fn new(vm: &VmFd, supported: &CpuId, index: u8, count: u8, entry: u64) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(u64::from(index)).map_err(|e| VcpuError::Create(index, e))?;
        let cpuid = cpuid::for_vcpu(supported, index, count).map_err(|e| VcpuError::Cpuid(index, format!("{e:?}")))?;
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
            .spawn(move || self.run(&ctx))
            .map_err(|e| VcpuError::Spawn(index, e))
    }

    fn run(mut self, ctx: &VcpuContext) {
        loop {
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
                if !ctx.pio.read(u64::from(port), data) {
                    // Nothing there: the floating bus reads all ones.
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Shutdown) => Some(VmExit::TripleFault { vcpu: index }),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    Some(VmExit::Reboot)
                }
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => Some(VmExit::GuestPanic),
                other => Some(VmExit::KvmFailure { vcpu: index, detail: format!("system event {other}") }),
            },
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::KvmFailure {
                vcpu: index,
                detail: format!("KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"),
            }),
            Ok(VcpuExit::InternalError) => Some(VmExit::KvmFailure {
                vcpu: index,
                detail: "KVM internal error (the guest state could not be emulated)".into(),
            }),
            Ok(other) => Some(VmExit::KvmFailure { vcpu: index, detail: format!("unexpected exit {other:?}") }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmExit::VmmError(format!("KVM_RUN failed on vCPU {index}: {e}"))),
        }
    }

    /// Wraps an already created vCPU fd (tests that run hand-made guest code).
    pub fn from_fd(index: u8, fd: VcpuFd) -> Self {
        Vcpu { index, fd }
    }
}
