//! The device manager: creates the planned devices on the buses. The plan itself (where every
//! device sits, decided before any VM exists) is [`isocell_vmm_model::device_plan`], re-exported
//! here; the device list printed by `isocell-vmm --describe` is generated from the same plan that
//! builds the VM.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use isocell_spec::{ConsoleConfig, VmConfig};
use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use isocell_vmm_model::device_plan::*;

use crate::devices::acpi_sleep::AcpiSleep;
use crate::devices::boot_timer::BootTimer;
use crate::devices::i8042::I8042;
use crate::devices::serial::{BoundedLog, SerialConsole, COM1_IRQ, CONSOLE_FILE_LIMIT};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioState, MmioTransport};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{feature_names, DeviceState, VirtioDevice};
use crate::devices::{Bus, BusOverlap, SharedDevice};
use crate::exit::ExitRequester;
use crate::timeline::Timeline;

/// Failure to create the planned devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created or registered as a KVM irqfd or ioeventfd.
    #[error("could not wire the interrupt or notifies of device {0:?}")]
    Irq(String, #[source] std::io::Error),
    /// A backing file could not be opened or inspected.
    #[error("device {0:?}: cannot open {1}")]
    Backing(String, PathBuf, #[source] std::io::Error),
    /// The console file could not be created.
    #[error("cannot create the console file {0}")]
    Console(PathBuf, #[source] std::io::Error),
    /// The virtio queues could not be created.
    #[error("device {0:?}: could not create its virtio queues: {1}")]
    Queue(String, String),
    /// The device's worker thread could not be started.
    #[error("device {0:?}: could not start its worker thread")]
    Worker(String, #[source] std::io::Error),
    /// The plan holds a kind no builder knows (a bug: the table below is incomplete).
    #[error("device {0:?}: no builder for kind {1}")]
    UnknownKind(String, &'static str),
    /// A range was refused by the bus (a planner bug if it happens).
    #[error("device {0:?} could not be placed on its bus")]
    Bus(String, #[source] BusOverlap),
}

/// What the builders need besides the planned device itself.
struct BuildContext<'a> {
    config: &'a VmConfig,
    vm: &'a VmFd,
    exit: &'a ExitRequester,
    timeline: &'a Arc<Timeline>,
}

impl BuildContext<'_> {
    /// An eventfd that raises `irq` in the guest.
    fn irqfd(&self, id: &str, irq: u32) -> Result<EventFd, DeviceError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError::Irq(id.into(), e))?;
        self.vm.register_irqfd(&evt, irq).map_err(|e| {
            DeviceError::Irq(id.into(), std::io::Error::from_raw_os_error(e.errno()))
        })?;
        Ok(evt)
    }
}

/// What building one planned device gives.
enum Built {
    /// A device the vCPUs reach directly on its bus (a few registers, no queues).
    Plain(SharedDevice),
    /// A virtio device's backend; the transport and worker around it are the same for all.
    Virtio {
        device: Box<dyn VirtioDevice>,
        /// A writable disk image, flushed when the VM stops.
        flush: Option<File>,
        /// A host socket the device created, removed when the VM stops.
        socket: Option<PathBuf>,
    },
}

type Builder = fn(&PlannedDevice, &BuildContext) -> Result<Built, DeviceError>;

/// How each kind of planned device is built, by the kind's name in the plan.
const BUILDERS: &[(&str, Builder)] = &[
    ("serial", build_serial),
    ("i8042", |_, cx| Ok(Built::Plain(Arc::new(Mutex::new(I8042::new(cx.exit.clone())))))),
    ("acpi_sleep", |_, cx| Ok(Built::Plain(Arc::new(Mutex::new(AcpiSleep::new(cx.exit.clone())))))),
    ("boot_timer", |_, cx| {
        Ok(Built::Plain(Arc::new(Mutex::new(BootTimer::new(cx.timeline.clone())))))
    }),
    ("virtio_block", build_block),
    ("virtio_vsock", build_vsock),
    ("virtio_rng", build_rng),
];

fn build_serial(planned: &PlannedDevice, cx: &BuildContext) -> Result<Built, DeviceError> {
    let out: Box<dyn Write + Send> = match &cx.config.console {
        ConsoleConfig::Stdout => Box::new(std::io::stdout()),
        ConsoleConfig::File(p) => Box::new(std::io::LineWriter::new(BoundedLog::new(
            File::create(p).map_err(|e| DeviceError::Console(p.clone(), e))?,
            CONSOLE_FILE_LIMIT,
        ))),
        ConsoleConfig::Off => Box::new(std::io::sink()),
    };
    let serial = SerialConsole::new(cx.irqfd(&planned.id, COM1_IRQ)?, out);
    Ok(Built::Plain(Arc::new(Mutex::new(serial))))
}

fn build_block(planned: &PlannedDevice, _: &BuildContext) -> Result<Built, DeviceError> {
    let DeviceKind::VirtioBlock { path, read_only, .. } = &planned.kind else {
        return Err(DeviceError::UnknownKind(planned.id.clone(), planned.kind.name()));
    };
    let backing = |e| DeviceError::Backing(planned.id.clone(), path.clone(), e);
    let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(backing)?;
    let flush = if *read_only { None } else { Some(file.try_clone().map_err(backing)?) };
    let device = Block::new(planned.id.clone(), file, *read_only).map_err(backing)?;
    Ok(Built::Virtio { device: Box::new(device), flush, socket: None })
}

fn build_vsock(planned: &PlannedDevice, _: &BuildContext) -> Result<Built, DeviceError> {
    let DeviceKind::VirtioVsock { guest_cid, uds_path, .. } = &planned.kind else {
        return Err(DeviceError::UnknownKind(planned.id.clone(), planned.kind.name()));
    };
    let device = Vsock::new(*guest_cid, uds_path)
        .map_err(|e| DeviceError::Backing(planned.id.clone(), uds_path.clone(), e))?;
    Ok(Built::Virtio { device: Box::new(device), flush: None, socket: Some(uds_path.clone()) })
}

fn build_rng(planned: &PlannedDevice, _: &BuildContext) -> Result<Built, DeviceError> {
    let device = Rng::new()
        .map_err(|e| DeviceError::Backing(planned.id.clone(), "/dev/urandom".into(), e))?;
    Ok(Built::Virtio { device: Box::new(device), flush: None, socket: None })
}

/// Every device's state in a snapshot, by device id.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DeviceStates {
    /// virtio devices: transport, queues and device.
    pub virtio: BTreeMap<String, MmioState>,
    /// Other devices that keep state (the UART, the i8042).
    pub plain: BTreeMap<String, serde_json::Value>,
}

impl DeviceStates {
    /// Why these states cannot make a faithful snapshot (a device that was busy), if so.
    pub fn busy(&self) -> Option<String> {
        self.virtio.iter().find_map(|(id, m)| match &m.device {
            DeviceState::Vsock(v) => v.busy.as_ref().map(|why| format!("{id}: {why}")),
            _ => None,
        })
    }
}

/// The live devices of a running VM.
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Every virtio transport with its device id.
    virtio: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    /// Every other device with its id.
    plain: Vec<(String, SharedDevice)>,
    block_count: usize,
    block_files: Vec<File>,
    socket_paths: Vec<PathBuf>,
}

impl DeviceManager {
    /// Creates every planned device, wires its interrupt and puts it on its bus; each virtio
    /// device gets its worker thread, and KVM signals that worker directly on every notify.
    pub fn create(
        plan: &DevicePlan,
        config: &VmConfig,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        exit: &ExitRequester,
        timeline: &Arc<Timeline>,
    ) -> Result<Self, DeviceError> {
        let cx = BuildContext { config, vm, exit, timeline };
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        let mut manager = DeviceManager {
            pio: Arc::default(),
            mmio: Arc::default(),
            virtio: Vec::new(),
            plain: Vec::new(),
            block_count: 0,
            block_files: Vec::new(),
            socket_paths: Vec::new(),
        };
        for planned in &plan.devices {
            let id = &planned.id;
            let kind = planned.kind.name();
            let build = BUILDERS
                .iter()
                .find(|(name, _)| *name == kind)
                .map(|(_, build)| build)
                .ok_or_else(|| DeviceError::UnknownKind(id.clone(), kind))?;
            let device: SharedDevice = match build(planned, &cx)? {
                Built::Plain(device) => {
                    manager.plain.push((id.clone(), device.clone()));
                    device
                }
                Built::Virtio { device, flush, socket } => {
                    manager.socket_paths.extend(socket);
                    if let DeviceKind::VirtioBlock { .. } = planned.kind {
                        manager.block_count += 1;
                        manager.block_files.extend(flush);
                    }
                    let t = Arc::new(Mutex::new(start_virtio(planned, device, &cx, mem)?));
                    manager.virtio.push((id.clone(), t.clone()));
                    t
                }
            };
            for r in &planned.ranges {
                let bus = match r.space {
                    AddressSpace::Pio => &mut pio,
                    AddressSpace::Mmio => &mut mmio,
                };
                bus.insert(id, r.base, r.len, device.clone())
                    .map_err(|e| DeviceError::Bus(id.clone(), e))?;
            }
        }
        manager.pio = Arc::new(pio);
        manager.mmio = Arc::new(mmio);
        Ok(manager)
    }

    /// Waits until every virtio worker thread has installed its seccomp filter; call before
    /// any vCPU runs.
    pub fn confirm_workers(&self) -> Result<(), DeviceError> {
        for (id, t) in &self.virtio {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            t.confirm_worker().map_err(|e| DeviceError::Worker(id.clone(), e))?;
        }
        Ok(())
    }

    /// Every device's state for a snapshot of a paused VM, after which no device touches guest
    /// memory again (the VM never resumes). Errs with the id of a device that did not answer.
    pub fn save_for_snapshot(&self) -> Result<DeviceStates, String> {
        let virtio = self
            .virtio
            .iter()
            .map(|(id, t)| {
                let state = t.lock().unwrap_or_else(|p| p.into_inner()).save_and_stop();
                state.map(|s| (id.clone(), s)).ok_or_else(|| id.clone())
            })
            .collect::<Result<_, _>>()?;
        let plain = self
            .plain
            .iter()
            .filter_map(|(id, d)| {
                let state = d.lock().unwrap_or_else(|p| p.into_inner()).save_state()?;
                Some((id.clone(), state))
            })
            .collect();
        Ok(DeviceStates { virtio, plain })
    }

    /// Gives every device the state a snapshot saved, before any vCPU runs. Every device of
    /// the plan must be in it and nothing else.
    pub fn restore(&self, states: &DeviceStates) -> Result<(), String> {
        let ids: Vec<&String> = self.virtio.iter().map(|(id, _)| id).collect();
        let saved: Vec<&String> = states.virtio.keys().collect();
        if ids.iter().collect::<std::collections::BTreeSet<_>>()
            != saved.iter().collect::<std::collections::BTreeSet<_>>()
        {
            return Err(format!("the snapshot has virtio devices {saved:?}, this VM {ids:?}"));
        }
        for (id, t) in &self.virtio {
            let state = states.virtio.get(id).ok_or_else(|| format!("{id}: not saved"))?;
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore(state)
                .map_err(|e| format!("{id}: {e}"))?;
        }
        for (id, d) in &self.plain {
            if let Some(state) = states.plain.get(id) {
                d.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .restore_state(state)
                    .map_err(|e| format!("{id}: {e}"))?;
            }
        }
        Ok(())
    }

    /// Makes every write the guest made to a writable disk durable.
    pub fn flush_disks(&self) -> std::io::Result<()> {
        for f in &self.block_files {
            f.sync_all()?;
        }
        Ok(())
    }

    /// Removes the Unix socket files the devices created on the host.
    pub fn remove_host_sockets(&self) {
        for p in &self.socket_paths {
            let _ = std::fs::remove_file(p);
        }
    }

    /// The features the guest's driver negotiated with each virtio device, by device id; a
    /// device the guest never brought up has none.
    pub fn negotiated_features(&self) -> BTreeMap<String, Vec<String>> {
        self.virtio
            .iter()
            .map(|(id, t)| {
                let (kind, features) = t.lock().map_or((0, None), |t| t.negotiated_features());
                (id.clone(), features.map_or_else(Vec::new, |f| feature_names(kind, f)))
            })
            .collect()
    }

    /// Number of block devices.
    pub fn block_count(&self) -> usize {
        self.block_count
    }
}

/// Wraps a virtio backend in its transport, moves it onto its worker thread and has KVM
/// signal that worker's queue eventfds on writes to `QueueNotify` (one ioeventfd per queue,
/// matched on the queue index), so notifies never exit to a vCPU thread.
fn start_virtio(
    planned: &PlannedDevice,
    device: Box<dyn VirtioDevice>,
    cx: &BuildContext,
    mem: &GuestMemoryMmap,
) -> Result<MmioTransport, DeviceError> {
    let id = &planned.id;
    let name = device.thread_kind().name().to_owned();
    let irq = cx.irqfd(id, planned.irq.unwrap_or_default())?;
    let transport = MmioTransport::new(device, mem.clone(), irq)
        .map_err(|e| DeviceError::Queue(id.clone(), e.to_string()))?;
    let (transport, queue_events) =
        transport.start_worker(name).map_err(|e| DeviceError::Worker(id.clone(), e))?;
    let window = planned.ranges.iter().find(|r| r.space == AddressSpace::Mmio);
    let notify = window.map(|r| r.base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
    let notify =
        notify.ok_or_else(|| DeviceError::Queue(id.clone(), "it has no MMIO window".into()))?;
    for (index, evt) in queue_events.iter().enumerate() {
        cx.vm.register_ioevent(evt, &IoEventAddress::Mmio(notify), index as u32).map_err(|e| {
            DeviceError::Irq(id.clone(), std::io::Error::from_raw_os_error(e.errno()))
        })?;
    }
    Ok(transport)
}
