//! The IsoCell VMM: one KVM microVM per process.
//!
//! [`config::check`] validates everything before a VM exists; [`boot`] builds the VM (memory,
//! irqchip, kernel, boot tables, devices, vCPUs) and runs it until it stops, returning why.
//!
//! What needs no KVM (the device plan, guest memory layout, kernel command line, ACPI tables,
//! seccomp allow-lists, the file-only host check) is the `isocell-vmm-model` crate; the modules
//! here re-export it, so `isocell_vmm::device_manager::DevicePlan` and
//! `isocell_vmm_model::device_plan::DevicePlan` are one type.

pub mod arch;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod exit;
#[doc(hidden)]
pub mod fuzzing;
pub mod host_check;
pub mod report;
pub mod seccomp;
pub mod snapshot;
pub mod timeline;
pub mod vstate;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use isocell_spec::VmConfig;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::loader::Cmdline;
use vm_memory::GuestMemoryMmap;

use arch::x86_64::{acpi, boot, cpuid, mptable, regs};
use device_manager::{DeviceManager, DevicePlan};
use exit::{ExitRequester, VmExit, Wakeup};
use report::MemoryUse;
use snapshot::{MachineShape, SnapshotError, SnapshotState};
use timeline::{Phase, Timeline};
use vstate::vcpu::{pause_vcpus, register_kick_signal, stop_vcpus, ExitCounts, Vcpu, VcpuContext};

pub use isocell_vmm_model::{descriptions, kernel_cmdline, BASE_KERNEL_ARGS};

/// Failure to build the VM; nothing has run in the guest yet.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The host check or capability check failed.
    #[error(transparent)]
    Host(#[from] host_check::HostError),
    /// The VM or its memory could not be created.
    #[error(transparent)]
    Vm(#[from] vstate::vm::VmError),
    /// The kernel, initrd or boot parameters could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// The ACPI tables could not be built.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The ACPI tables could not be written into guest memory.
    #[error(transparent)]
    AcpiWrite(#[from] acpi::AcpiWriteError),
    /// The boot page tables could not be written.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// A device could not be created.
    #[error(transparent)]
    Device(#[from] device_manager::DeviceError),
    /// A vCPU could not be created.
    #[error(transparent)]
    Vcpu(#[from] vstate::vcpu::VcpuError),
    /// A file the configuration names could not be opened any more.
    #[error("cannot open {0}")]
    Open(std::path::PathBuf, #[source] std::io::Error),
    /// The main thread's seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// KVM's supported CPUID could not be read.
    #[error("cannot read the CPUID KVM supports")]
    Cpuid(#[source] kvm_ioctls::Error),
    /// The snapshot to restore cannot be used.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A device refused the state the snapshot holds for it.
    #[error("the snapshot's device state does not fit: {0}")]
    DeviceState(String),
    /// KVM's list of MSRs, which a snapshot saves, could not be read.
    #[error("cannot read the list of MSRs KVM saves")]
    MsrList(#[source] kvm_ioctls::Error),
    /// A signal the host sends (SIGTERM to stop, SIGUSR1 for a snapshot) could not be handled.
    #[error("cannot handle a signal: {0}")]
    Signal(String),
}

/// How a VM starts and whether it may be saved.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootOptions<'a> {
    /// Start from the snapshot in this directory instead of booting the kernel.
    pub restore: Option<&'a Path>,
    /// On SIGUSR1, pause the VM, save it as a snapshot into this (existing) directory and
    /// stop ([`VmExit::Saved`]). The VM never resumes.
    pub save_to: Option<&'a Path>,
}

/// What `isocell-vmm --describe` prints: the machine a configuration gives the guest, built from
/// the same plan and table builders as the VM itself.
pub fn describe(config: &VmConfig, plan: &DevicePlan) -> serde_json::Value {
    serde_json::json!({
        "vcpus": config.vcpus,
        "memory_mib": config.memory_mib,
        "kernel": config.kernel,
        "kernel_cmdline": kernel_cmdline(config, plan),
        "devices": plan.devices,
        "descriptions": descriptions(config, plan),
        "cpuid": describe_cpuid(config.vcpus, true),
    })
}

/// The CPUID vCPU 0 would see on this host (every leaf if `leaves`, else the choices only), or
/// why it cannot be known here.
pub fn describe_cpuid(vcpus: u8, leaves: bool) -> serde_json::Value {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => return serde_json::json!({ "unavailable": format!("cannot open /dev/kvm: {e}") }),
    };
    match kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) {
        Ok(supported) => {
            let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
            // The TSC frequency comes from a vCPU, which describing does not create.
            let inputs = cpuid::CpuidInputs::for_host(tsc_deadline, None);
            let entries = cpuid::normalize(supported.as_slice(), 0, vcpus, &inputs);
            let mut v = serde_json::to_value(cpuid::view(&entries)).unwrap_or_default();
            v["vcpu"] = 0.into();
            v["tsc_khz_note"] = "read from KVM_GET_TSC_KHZ when the vCPU is created".into();
            if !leaves {
                if let Some(o) = v.as_object_mut() {
                    o.remove("leaves");
                }
            }
            v
        }
        Err(e) => {
            serde_json::json!({ "unavailable": format!("KVM_GET_SUPPORTED_CPUID failed: {e}") })
        }
    }
}

/// A VM that has stopped: every vCPU thread has left `KVM_RUN` and ended (or, if one would not,
/// the memory it could still touch is kept alive here until the process exits).
pub struct StoppedVm {
    /// Why it stopped.
    pub exit: VmExit,
    /// Memory use measured as it stopped.
    pub memory: Option<MemoryUse>,
    /// VM exits handled by the VMM, by kind and device, most frequent first.
    pub exit_counts: Vec<(String, u64)>,
    /// Features the guest negotiated with each virtio device.
    pub negotiated_features: BTreeMap<String, Vec<String>>,
    _kvm: Kvm,
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    _devices: DeviceManager,
}

/// Builds the VM described by `config` (already checked into `plan`), booting its kernel or
/// restoring a snapshot, and runs it until it stops.
pub fn boot(
    config: &VmConfig,
    plan: &DevicePlan,
    timeline: Arc<Timeline>,
    options: BootOptions<'_>,
) -> Result<StoppedVm, BuildError> {
    let kvm = Kvm::new().map_err(|e| host_check::HostError::NoKvm(e.to_string()))?;
    host_check::check_capabilities(&kvm)?;
    let mem_size = config.memory_mib << 20;
    let machine = MachineShape::of(config, plan);
    let restored = match options.restore {
        Some(dir) => Some(SnapshotState::load(dir, &machine)?),
        None => None,
    };
    let mem = match options.restore {
        Some(dir) => {
            let path = dir.join(snapshot::MEMORY_FILE);
            let file = File::open(&path).map_err(|e| BuildError::Open(path.clone(), e))?;
            vstate::vm::guest_memory_from_file(mem_size, file)?
        }
        None => vstate::vm::create_guest_memory(mem_size)?,
    };
    let vm = vstate::vm::create_vm(&kvm, &mem)?;
    let entry = match &restored {
        Some(state) => {
            vstate::vm::restore_state(&vm, &state.vm)?;
            0
        }
        None => load_guest(config, plan, &mem, mem_size)?,
    };

    let (tx, rx) = channel();
    let wakeup = Wakeup::get().map_err(|e| BuildError::Signal(format!("SIGTERM: {e}")))?;
    let exit = ExitRequester::new(tx);
    let devices = DeviceManager::create(plan, config, &vm, &mem, &exit, &timeline)?;

    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(BuildError::Cpuid)?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let vcpus = match &restored {
        Some(state) => state
            .vcpus
            .iter()
            .zip(0..config.vcpus)
            .map(|(s, i)| Vcpu::restore(&vm, &supported, tsc_deadline, i, config.vcpus, s))
            .collect::<Result<Vec<_>, _>>()?,
        None => (0..config.vcpus)
            .map(|i| Vcpu::new(&vm, &supported, tsc_deadline, i, config.vcpus, entry))
            .collect::<Result<Vec<_>, _>>()?,
    };
    // The worker threads installed their filters while the vCPUs were set up.
    devices.confirm_workers()?;
    // Devices take their state last: a restored device may raise its interrupt at once (vsock
    // may have host bytes for the guest already), and setting a vCPU's LAPIC afterwards would
    // drop it.
    if let Some(state) = &restored {
        devices.restore(&state.devices).map_err(BuildError::DeviceState)?;
    }
    // The MSRs a snapshot saves: KVM's list, read now, before the filter forbids asking.
    let msr_index = match options.save_to {
        Some(_) => {
            exit::handle_save_signal().map_err(|e| BuildError::Signal(format!("SIGUSR1: {e}")))?;
            kvm.get_msr_index_list().map_err(BuildError::MsrList)?.as_slice().to_vec()
        }
        None => Vec::new(),
    };
    timeline.mark(Phase::VmBuilt);

    let exit_counts = ExitCounts::new(&devices.pio, &devices.mmio);
    let ctx = Arc::new(VcpuContext {
        pio: devices.pio.clone(),
        mmio: devices.mmio.clone(),
        exit,
        exit_counts: exit_counts.clone(),
        stopping: AtomicBool::new(false),
        pausing: AtomicBool::new(false),
    });
    register_kick_signal()?;
    let threads = vcpus.into_iter().map(|v| v.start(ctx.clone())).collect::<Result<Vec<_>, _>>()?;
    // Every thread exists now; from here the main thread only waits, stops and reports.
    let main_kind = match options.save_to {
        Some(_) => seccomp::ThreadKind::MainSnapshot,
        None => seccomp::ThreadKind::Main,
    };
    if let Err(e) = seccomp::install(main_kind) {
        stop_vcpus(&ctx, threads, Duration::from_secs(2));
        return Err(BuildError::Seccomp(e));
    }

    let mut reason =
        wait_for_exit(&rx, wakeup, config.max_lifetime_secs, options.save_to.is_some());
    timeline.mark(Phase::Exited);
    let stuck = match (&reason, options.save_to) {
        (VmExit::Saved, Some(dir)) => {
            let parts =
                SnapshotParts { vm: &vm, mem: &mem, devices: &devices, msr_index: &msr_index };
            if let Err(e) = save_snapshot(dir, &ctx, threads, machine, &parts) {
                reason = VmExit::VmmError(format!("cannot save the snapshot: {e}"));
            }
            0
        }
        _ => stop_vcpus(&ctx, threads, Duration::from_secs(2)),
    };
    if stuck > 0 && reason.code() == exit::EXIT_OK {
        reason = VmExit::VmmError(format!("{stuck} vCPU thread(s) did not stop"));
    }
    devices.remove_host_sockets();
    if let Err(e) = devices.flush_disks() {
        reason = VmExit::VmmError(format!("could not flush a disk image to the host: {e}"));
    }
    let memory = report::measure_self(&vstate::vm::host_ranges(&mem));
    Ok(StoppedVm {
        exit: reason,
        memory,
        exit_counts: exit_counts.sorted(),
        negotiated_features: devices.negotiated_features(),
        _kvm: kvm,
        _vm: vm,
        _mem: mem,
        _devices: devices,
    })
}

/// Loads the kernel, initrd, command line and boot tables into fresh guest memory; returns the
/// kernel's 64-bit entry point.
fn load_guest(
    config: &VmConfig,
    plan: &DevicePlan,
    mem: &GuestMemoryMmap,
    mem_size: u64,
) -> Result<u64, BuildError> {
    let mut kernel_file =
        File::open(&config.kernel).map_err(|e| BuildError::Open(config.kernel.clone(), e))?;
    let kernel = boot::load_kernel(mem, &mut kernel_file)?;
    let initrd = match &config.initrd {
        Some(path) => {
            let mut f = File::open(path).map_err(|e| BuildError::Open(path.clone(), e))?;
            Some(boot::load_initrd(mem, mem_size, &kernel, &mut f)?)
        }
        None => None,
    };
    let mut cmdline: Cmdline = boot::new_cmdline();
    cmdline
        .insert_str(kernel_cmdline(config, plan))
        .map_err(|e| BuildError::Boot(boot::BootError::Cmdline(e.to_string())))?;
    // Both descriptions of the machine, so a kernel finds its CPUs and devices either way: the
    // command line and MP table (the cell kernel), or ACPI (kernels built for other microVMs).
    let acpi = acpi::build(config.vcpus, plan)?;
    acpi::write(&acpi, mem)?;
    boot::write_boot_params(mem, mem_size, &kernel, &cmdline, initrd, Some(acpi.extent()))?;
    mptable::write(mem, config.vcpus)?;
    regs::write_boot_tables(mem)?;
    Ok(kernel.entry)
}

/// Waits for the first stop request (the guest's, a device's, a vCPU's, or the host's
/// SIGTERM), the lifetime limit or, when the VM may be saved, SIGUSR1.
fn wait_for_exit(
    rx: &Receiver<VmExit>,
    wakeup: &Wakeup,
    lifetime: Option<u64>,
    may_save: bool,
) -> VmExit {
    let deadline = lifetime.map(|secs| (Instant::now() + Duration::from_secs(secs), secs));
    loop {
        match rx.try_recv() {
            Ok(e) => return e,
            Err(TryRecvError::Disconnected) => {
                return VmExit::VmmError("all vCPU threads ended".into())
            }
            Err(TryRecvError::Empty) => {}
        }
        if exit::stop_requested() {
            return VmExit::Stopped;
        }
        if may_save && exit::save_requested() {
            return VmExit::Saved;
        }
        let left = match deadline {
            Some((at, secs)) => match at.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return VmExit::LifetimeExceeded { secs },
            },
            None => None,
        };
        wakeup.wait(left);
    }
}

/// What a snapshot reads besides the vCPUs.
struct SnapshotParts<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    devices: &'a DeviceManager,
    msr_index: &'a [u32],
}

/// Pauses the VM and saves it into `dir`: devices first (after which they do nothing more),
/// then the VM-wide and vCPU state, then guest memory, which nothing changes any more.
fn save_snapshot(
    dir: &Path,
    ctx: &VcpuContext,
    threads: Vec<JoinHandle<Vcpu>>,
    machine: MachineShape,
    parts: &SnapshotParts<'_>,
) -> Result<(), String> {
    let vcpus = pause_vcpus(ctx, threads, Duration::from_secs(2))
        .ok_or_else(|| "a vCPU did not pause".to_owned())?;
    let devices = parts
        .devices
        .save_for_snapshot()
        .map_err(|id| format!("device {id} did not give its state"))?;
    if let Some(why) = devices.busy() {
        return Err(format!("the VM cannot be saved at this point: {why}"));
    }
    let vm = vstate::vm::save_state(parts.vm).map_err(|e| e.to_string())?;
    let vcpus = vcpus
        .iter()
        .map(|v| v.save(parts.msr_index))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let path = dir.join(snapshot::MEMORY_FILE);
    let mut file = snapshot::create_private(&path).map_err(|e| e.to_string())?;
    vstate::vm::write_memory(parts.mem, &mut file)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let state = SnapshotState {
        format: snapshot::FORMAT,
        vmm_version: env!("CARGO_PKG_VERSION").to_owned(),
        machine,
        vm,
        vcpus,
        devices,
    };
    state.write(dir).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_main_thread_wakes_for_a_request_a_sigterm_and_its_lifetime() {
        let wakeup = Wakeup::get().unwrap();
        let (tx, rx) = channel();
        let exit = ExitRequester::new(tx);

        // A device's or vCPU's request from another thread ends a wait that has no deadline.
        let requester = exit.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            requester.request(VmExit::PowerOff);
        });
        assert_eq!(wait_for_exit(&rx, wakeup, None, false), VmExit::PowerOff);
        t.join().unwrap();

        // The lifetime limit ends it with a request pending nowhere.
        assert_eq!(
            wait_for_exit(&rx, wakeup, Some(0), false),
            VmExit::LifetimeExceeded { secs: 0 }
        );

        // The host's SIGTERM, sent to the process while the main thread waits.
        let t = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: sends SIGTERM to this process, which handles it (Wakeup::get).
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        });
        // (Were it missed, the 60 s lifetime would end the wait instead.)
        assert_eq!(wait_for_exit(&rx, wakeup, Some(60), false), VmExit::Stopped);
        t.join().unwrap();
        // A guest's request that came first still wins over a later stop.
        exit.request(VmExit::Reboot);
        assert_eq!(wait_for_exit(&rx, wakeup, None, false), VmExit::Reboot);
    }
}
