//! vCPUs: configured for the 64-bit boot protocol, each run on its own thread. Port I/O and MMIO
//! exits are dispatched to the buses; anything that ends the VM is reported through the exit
//! channel, never by panicking.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
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
    /// KVM would not give or take part of the vCPU's state.
    #[error("KVM refused to {1} of vCPU {0}")]
    State(u8, &'static str, #[source] kvm_ioctls::Error),
    /// A snapshot's vCPU cannot run on this host as it was saved.
    #[error("vCPU {0}: {1}")]
    Mismatch(u8, String),
}

/// One configured vCPU, ready to run.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// The CPUID it was given, kept for its snapshot.
    cpuid: Vec<kvm_cpuid_entry2>,
}

/// Everything KVM holds for one vCPU: what a snapshot saves and a restore sets again, in the
/// order it is set (CPUID and TSC frequency first: the rest is checked against them).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the guest has seen; a restore refuses a host that would give another.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest's TSC frequency; a restore sets it (KVM scales) or refuses.
    pub tsc_khz: Option<u32>,
    #[allow(missing_docs)]
    pub mp_state: kvm_mp_state,
    #[allow(missing_docs)]
    pub regs: kvm_regs,
    #[allow(missing_docs)]
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (no dynamically enabled features, so 4 KiB holds it all).
    pub xsave: kvm_xsave,
    #[allow(missing_docs)]
    pub xcrs: kvm_xcrs,
    #[allow(missing_docs)]
    pub debug_regs: kvm_debugregs,
    #[allow(missing_docs)]
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists that it could read, by ascending index (the TSC before the
    /// TSC deadline, which is relative to it).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs, last of all.
    pub events: kvm_vcpu_events,
}

/// How many MSRs one `KVM_GET_MSRS`/`KVM_SET_MSRS` call carries.
const MSR_CHUNK: usize = 64;

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
    /// Set with `stopping` when the VM is paused for a snapshot: a vCPU thread then completes
    /// the exit it was handling, so its registers are whole, and hands its vCPU back.
    pub pausing: AtomicBool,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the signal that kicks vCPU threads out of `KVM_RUN`.
pub fn register_kick_signal() -> Result<(), VcpuError> {
    register_signal_handler(SIGRTMIN(), kick_handler)
        .map_err(|e| VcpuError::Spawn(0, std::io::Error::from_raw_os_error(e.errno())))
}

/// Stops the vCPU threads: marks the VM as stopping and signals each thread until it has left
/// `KVM_RUN` and ended. Returns how many threads did not end within `patience`.
pub fn stop_vcpus<T>(ctx: &VcpuContext, threads: Vec<JoinHandle<T>>, patience: Duration) -> usize {
    stop_and_collect(ctx, threads, patience).1
}

/// Pauses the VM for a snapshot: every vCPU thread completes the exit it was in, leaves
/// `KVM_RUN` and hands its vCPU back. `None` if a thread did not end within `patience`.
pub fn pause_vcpus(
    ctx: &VcpuContext,
    threads: Vec<JoinHandle<Vcpu>>,
    patience: Duration,
) -> Option<Vec<Vcpu>> {
    ctx.pausing.store(true, Ordering::SeqCst);
    let count = threads.len();
    let (mut vcpus, stuck) = stop_and_collect(ctx, threads, patience);
    vcpus.sort_by_key(|v| v.index);
    // Every vCPU must come back (one whose thread panicked does not).
    (stuck == 0 && vcpus.len() == count).then_some(vcpus)
}

fn stop_and_collect<T>(
    ctx: &VcpuContext,
    threads: Vec<JoinHandle<T>>,
    patience: Duration,
) -> (Vec<T>, usize) {
    ctx.stopping.store(true, Ordering::SeqCst);
    let start = std::time::Instant::now();
    let mut left = threads;
    let mut ended = Vec::new();
    while !left.is_empty() && start.elapsed() < patience {
        let (done, running): (Vec<_>, Vec<_>) = left.into_iter().partition(|t| t.is_finished());
        for t in done {
            if let Ok(v) = t.join() {
                ended.push(v);
            }
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
    (ended, left.len())
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
        Ok(Vcpu { index, fd, cpuid: cpuid.as_slice().to_vec() })
    }

    /// Creates vCPU `index` of `count` in the state `state` saved. Refuses, before setting
    /// anything, a host whose CPUID for this vCPU differs from the one the guest has seen, and a
    /// TSC frequency KVM cannot give.
    pub fn restore(
        vm: &VmFd,
        supported: &CpuId,
        tsc_deadline: bool,
        index: u8,
        count: u8,
        state: &VcpuState,
    ) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(u64::from(index)).map_err(|e| VcpuError::Create(index, e))?;
        let kvm_err = |what: &'static str| move |e| VcpuError::State(index, what, e);
        if let Some(khz) = state.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(|_| {
                    VcpuError::Mismatch(
                        index,
                        format!(
                            "the snapshot's TSC runs at {khz} kHz and KVM cannot scale this \
                             host's to it: take the snapshot on this host"
                        ),
                    )
                })?;
            }
        }
        let inputs = cpuid::CpuidInputs::for_host(tsc_deadline, state.tsc_khz);
        let here = cpuid::for_vcpu(supported, index, count, &inputs)
            .map_err(|e| VcpuError::Cpuid(index, format!("{e:?}")))?;
        if let Some(leaf) = first_difference(here.as_slice(), &state.cpuid) {
            return Err(VcpuError::Mismatch(
                index,
                format!(
                    "this host's CPU differs from the one the snapshot was taken on (CPUID leaf \
                     {leaf:#x}): take the snapshot on this host's CPU model"
                ),
            ));
        }
        let saved = CpuId::from_entries(&state.cpuid)
            .map_err(|e| VcpuError::Cpuid(index, format!("{e:?}")))?;
        fd.set_cpuid2(&saved).map_err(|e| VcpuError::Cpuid(index, e.to_string()))?;
        fd.set_mp_state(state.mp_state).map_err(kvm_err("set the run state"))?;
        fd.set_regs(&state.regs).map_err(kvm_err("set the registers"))?;
        fd.set_sregs(&state.sregs).map_err(kvm_err("set the special registers"))?;
        // SAFETY: the VMM never enables dynamic XSAVE features (no ARCH_REQ_XCOMP_GUEST_PERM),
        // so the kernel's XSAVE area fits the 4 KiB `kvm_xsave` it reads from.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm_err("set the FPU state"))?;
        fd.set_xcrs(&state.xcrs).map_err(kvm_err("set the XCRs"))?;
        fd.set_debug_regs(&state.debug_regs).map_err(kvm_err("set the debug registers"))?;
        fd.set_lapic(&state.lapic).map_err(kvm_err("set the local APIC"))?;
        for chunk in state.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|e| {
                VcpuError::Mismatch(index, format!("cannot carry the saved MSRs: {e:?}"))
            })?;
            let set = fd.set_msrs(&msrs).map_err(kvm_err("set the MSRs"))?;
            if let Some(refused) = chunk.get(set) {
                return Err(VcpuError::Mismatch(
                    index,
                    format!("KVM refused the saved value of MSR {:#x}", refused.index),
                ));
            }
        }
        fd.set_vcpu_events(&state.events).map_err(kvm_err("set the pending events"))?;
        Ok(Vcpu { index, fd, cpuid: state.cpuid.clone() })
    }

    /// Reads the vCPU's whole state. The vCPU must not be running, and the exit it last took
    /// must have been completed ([`pause_vcpus`] does both). `msr_index`: the MSRs KVM lists.
    pub fn save(&self, msr_index: &[u32]) -> Result<VcpuState, VcpuError> {
        let index = self.index;
        let fd = &self.fd;
        let kvm_err = |what: &'static str| move |e| VcpuError::State(index, what, e);
        Ok(VcpuState {
            cpuid: self.cpuid.clone(),
            tsc_khz: fd.get_tsc_khz().ok(),
            mp_state: fd.get_mp_state().map_err(kvm_err("read the run state"))?,
            regs: fd.get_regs().map_err(kvm_err("read the registers"))?,
            sregs: fd.get_sregs().map_err(kvm_err("read the special registers"))?,
            xsave: fd.get_xsave().map_err(kvm_err("read the FPU state"))?,
            xcrs: fd.get_xcrs().map_err(kvm_err("read the XCRs"))?,
            debug_regs: fd.get_debug_regs().map_err(kvm_err("read the debug registers"))?,
            lapic: fd.get_lapic().map_err(kvm_err("read the local APIC"))?,
            msrs: self.read_msrs(msr_index)?,
            events: fd.get_vcpu_events().map_err(kvm_err("read the pending events"))?,
        })
    }

    /// Reads every MSR of `msr_index` KVM will give, in ascending order. KVM lists some it
    /// cannot read for this vCPU; each refused one is left out and the rest read again.
    fn read_msrs(&self, msr_index: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let index = self.index;
        let mut wanted: Vec<u32> = msr_index.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let mut read = Vec::with_capacity(wanted.len());
        for chunk in wanted.chunks(MSR_CHUNK) {
            let mut chunk: Vec<u32> = chunk.to_vec();
            while !chunk.is_empty() {
                let entries: Vec<kvm_msr_entry> = chunk
                    .iter()
                    .map(|&i| kvm_msr_entry { index: i, ..Default::default() })
                    .collect();
                let mut msrs = Msrs::from_entries(&entries).map_err(|e| {
                    VcpuError::Mismatch(index, format!("cannot list the MSRs: {e:?}"))
                })?;
                let got = self
                    .fd
                    .get_msrs(&mut msrs)
                    .map_err(|e| VcpuError::State(index, "read the MSRs", e))?;
                read.extend_from_slice(&msrs.as_slice()[..got.min(chunk.len())]);
                // Entries up to `got` were read; the one at `got` was refused.
                chunk.drain(..(got + 1).min(chunk.len()));
            }
        }
        Ok(read)
    }

    /// Runs the vCPU on a new thread until the VM stops, and hands it back.
    pub fn start(self, ctx: Arc<VcpuContext>) -> Result<JoinHandle<Vcpu>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .stack_size(crate::vstate::vm::THREAD_STACK)
            .spawn(move || {
                // The filter is in place before the first KVM_RUN: before any guest code runs.
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                    ctx.exit.request(VmExit::VmmError(format!("vCPU {index}: {e}")));
                    return self;
                }
                self.run(&ctx)
            })
            .map_err(|e| VcpuError::Spawn(index, e))
    }

    fn run(mut self, ctx: &VcpuContext) -> Self {
        while !ctx.stopping.load(Ordering::SeqCst) {
            if let Some(exit) = self.run_once(ctx) {
                ctx.exit.request(exit);
                return self;
            }
        }
        if ctx.pausing.load(Ordering::SeqCst) {
            // The last port or MMIO read was answered into the run area but reaches the
            // guest's registers only on the next entry: enter once with immediate_exit set, so
            // KVM completes it and returns at once (EINTR) without running guest code.
            self.fd.set_kvm_immediate_exit(1);
            let _ = self.fd.run();
            self.fd.set_kvm_immediate_exit(0);
        }
        self
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
        Vcpu { index, fd, cpuid: Vec::new() }
    }
}

/// The first CPUID leaf (function) on which `here` and `saved` differ, if any.
fn first_difference(here: &[kvm_cpuid_entry2], saved: &[kvm_cpuid_entry2]) -> Option<u32> {
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index);
    let mut a: Vec<_> = here.to_vec();
    let mut b: Vec<_> = saved.to_vec();
    a.sort_by_key(key);
    b.sort_by_key(key);
    for (x, y) in a.iter().zip(&b) {
        if x != y {
            return Some(x.function.min(y.function));
        }
    }
    match a.len().cmp(&b.len()) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Greater => a.get(b.len()).map(|e| e.function),
        std::cmp::Ordering::Less => b.get(a.len()).map(|e| e.function),
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
            pausing: AtomicBool::new(false),
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
