//! vCPUs: configured for the 64-bit boot protocol, each run on its own thread. Port I/O and MMIO
//! exits are dispatched to the buses; anything that ends the VM is reported through the exit
//! channel, never by panicking.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
    /// VM exits counted by kind and device, for profiling.
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

/// The kinds of VM exit the VMM counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Port I/O read.
    PioIn = 0,
    /// Port I/O write.
    PioOut = 1,
    /// MMIO read.
    MmioRead = 2,
    /// MMIO write.
    MmioWrite = 3,
}

impl ExitKind {
    const ALL: [ExitKind; 4] =
        [ExitKind::PioIn, ExitKind::PioOut, ExitKind::MmioRead, ExitKind::MmioWrite];

    /// The name used in the run report.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::PioIn => "pio_in",
            ExitKind::PioOut => "pio_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
        }
    }

    fn is_pio(self) -> bool {
        matches!(self, ExitKind::PioIn | ExitKind::PioOut)
    }
}

/// Name of the bucket that counts accesses no device answered.
pub const UNMAPPED: &str = "unmapped";

/// Counts of VM exits that reached the VMM, by kind and by the device that handled them.
///
/// The counters are fixed when the buses are built: one per (kind, device) plus one "unmapped"
/// bucket per kind, so whatever addresses a guest touches, counting takes no lock and allocates
/// nothing.
#[derive(Clone, Debug)]
pub struct ExitCounts(Arc<ExitCountsInner>);

#[derive(Debug)]
struct ExitCountsInner {
    /// Device ids on the port I/O bus, by device index.
    pio_ids: Vec<String>,
    /// Device ids on the MMIO bus, by device index.
    mmio_ids: Vec<String>,
    /// `[kind][device index]`; the last slot of each row is the unmapped bucket.
    counts: [Box<[AtomicU64]>; 4],
}

impl Default for ExitCounts {
    /// Counters for two empty buses: every exit lands in the unmapped buckets.
    fn default() -> Self {
        ExitCounts::new(&Bus::new(), &Bus::new())
    }
}

impl ExitCounts {
    /// Counters for the devices of `pio` and `mmio` (devices added to the buses later are
    /// counted as unmapped).
    pub fn new(pio: &Bus, mmio: &Bus) -> Self {
        let pio_ids = pio.device_ids().to_vec();
        let mmio_ids = mmio.device_ids().to_vec();
        let row = |n: usize| (0..=n).map(|_| AtomicU64::new(0)).collect::<Box<[AtomicU64]>>();
        let counts =
            ExitKind::ALL.map(|k| row(if k.is_pio() { pio_ids.len() } else { mmio_ids.len() }));
        ExitCounts(Arc::new(ExitCountsInner { pio_ids, mmio_ids, counts }))
    }

    /// Counts one exit of `kind` handled by the device with index `device` on its bus (`None`:
    /// nothing was there).
    pub fn add(&self, kind: ExitKind, device: Option<usize>) {
        let row = &self.0.counts[kind as usize];
        let unmapped = row.len() - 1;
        let slot = device.filter(|d| *d < unmapped).unwrap_or(unmapped);
        if let Some(c) = row.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many exits of `kind` found no device.
    pub fn unmapped(&self, kind: ExitKind) -> u64 {
        self.0.counts[kind as usize].last().map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Bytes the counters occupy; fixed when the counters are created.
    pub fn footprint(&self) -> usize {
        let ids =
            self.0.pio_ids.iter().chain(&self.0.mmio_ids).map(|s| s.capacity()).sum::<usize>();
        let counters = self.0.counts.iter().map(|r| r.len()).sum::<usize>();
        std::mem::size_of::<ExitCountsInner>() + ids + counters * std::mem::size_of::<AtomicU64>()
    }

    /// The non-zero counts, most frequent first, as `("pio_in serial0", n)` or
    /// `("mmio_read unmapped", n)`.
    pub fn sorted(&self) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        for kind in ExitKind::ALL {
            let ids = if kind.is_pio() { &self.0.pio_ids } else { &self.0.mmio_ids };
            for (i, c) in self.0.counts[kind as usize].iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let dev = ids.get(i).map_or(UNMAPPED, String::as_str);
                    v.push((format!("{} {dev}", kind.name()), n));
                }
            }
        }
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// Handles a port read: the device answers, or the floating bus reads all ones.
pub fn pio_in(ctx: &VcpuContext, port: u16, data: &mut [u8]) {
    let dev = ctx.pio.read_at(u64::from(port), data);
    if dev.is_none() {
        data.fill(0xff);
    }
    ctx.exit_counts.add(ExitKind::PioIn, dev);
}

/// Handles a port write; nothing there ignores it.
pub fn pio_out(ctx: &VcpuContext, port: u16, data: &[u8]) {
    let dev = ctx.pio.write_at(u64::from(port), data);
    ctx.exit_counts.add(ExitKind::PioOut, dev);
}

/// Handles an MMIO read: the device answers, or unmapped memory reads all ones.
pub fn mmio_read(ctx: &VcpuContext, addr: u64, data: &mut [u8]) {
    let dev = ctx.mmio.read_at(addr, data);
    if dev.is_none() {
        data.fill(0xff);
    }
    ctx.exit_counts.add(ExitKind::MmioRead, dev);
}

/// Handles an MMIO write; nothing there ignores it.
pub fn mmio_write(ctx: &VcpuContext, addr: u64, data: &[u8]) {
    let dev = ctx.mmio.write_at(addr, data);
    ctx.exit_counts.add(ExitKind::MmioWrite, dev);
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and programs CPUID, MSRs, registers, FPU and LAPIC.
    /// `tsc_deadline`: KVM emulates the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub fn new(
        vm: &VmFd,
        supported: &CpuId,
        tsc_deadline: bool,
        index: u8,
        count: u8,
        entry: u64,
    ) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(u64::from(index)).map_err(|e| VcpuError::Create(index, e))?;
        // The vCPU's TSC frequency is KVM's to say (it may scale the host's).
        let inputs = cpuid::CpuidInputs::for_host(tsc_deadline, fd.get_tsc_khz().ok());
        let cpuid = cpuid::for_vcpu(supported, index, count, &inputs)
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
                pio_in(ctx, port, data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio_out(ctx, port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio_read(ctx, addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio_write(ctx, addr, data);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;

    use super::*;
    use crate::devices::{BusDevice, SharedDevice};
    use crate::exit::ExitRequester;

    struct Sink;
    impl BusDevice for Sink {
        fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
    }

    fn context() -> VcpuContext {
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        let com: SharedDevice = Arc::new(Mutex::new(Sink));
        pio.insert("serial0", 0x3f8, 8, com).unwrap();
        let kbd: SharedDevice = Arc::new(Mutex::new(Sink));
        pio.insert("i8042", 0x60, 1, kbd.clone()).unwrap();
        pio.insert("i8042", 0x64, 1, kbd).unwrap();
        let blk: SharedDevice = Arc::new(Mutex::new(Sink));
        mmio.insert("root", 0xd000_1000, 0x1000, blk).unwrap();
        let exit_counts = ExitCounts::new(&pio, &mmio);
        let (tx, _rx) = std::sync::mpsc::channel();
        VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit: ExitRequester::new(tx),
            exit_counts,
            stopping: AtomicBool::new(false),
        }
    }

    #[test]
    fn counts_by_device_and_kind() {
        let ctx = context();
        let mut b = [0u8; 4];
        pio_out(&ctx, 0x3f8, b"x");
        pio_out(&ctx, 0x3f9, &[0]);
        pio_in(&ctx, 0x64, &mut b[..1]);
        pio_in(&ctx, 0x60, &mut b[..1]);
        pio_in(&ctx, 0x80, &mut b[..1]);
        assert_eq!(b[0], 0xff);
        mmio_write(&ctx, 0xd000_1050, &[1, 0, 0, 0]);
        mmio_read(&ctx, 0xd000_0000, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert_eq!(
            ctx.exit_counts.sorted(),
            [
                ("pio_in i8042".to_owned(), 2),
                ("pio_out serial0".to_owned(), 2),
                ("mmio_read unmapped".to_owned(), 1),
                ("mmio_write root".to_owned(), 1),
                ("pio_in unmapped".to_owned(), 1),
            ]
        );
    }

    #[test]
    fn a_million_distinct_unmapped_addresses_take_no_memory() {
        let ctx = context();
        let before = ctx.exit_counts.footprint();
        let mut b = [0u8; 4];
        for i in 0..1_000_000u64 {
            // Distinct addresses below the device window, none of them mapped.
            mmio_read(&ctx, 0x1_0000_0000 + i * 8, &mut b);
        }
        assert_eq!(ctx.exit_counts.footprint(), before);
        assert_eq!(ctx.exit_counts.unmapped(ExitKind::MmioRead), 1_000_000);
        assert_eq!(ctx.exit_counts.sorted(), [("mmio_read unmapped".to_owned(), 1_000_000)]);
        // Out-of-range device indices (a bus that grew later) land in the unmapped bucket too.
        ctx.exit_counts.add(ExitKind::PioOut, Some(1000));
        assert_eq!(ctx.exit_counts.unmapped(ExitKind::PioOut), 1);
        assert_eq!(ctx.exit_counts.footprint(), before);
    }
}
