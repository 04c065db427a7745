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
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use isocell_vmm_model::device_plan::*;

use crate::devices::acpi_sleep::AcpiSleep;
use crate::devices::boot_timer::BootTimer;
use crate::devices::i8042::I8042;
use crate::devices::serial::{BoundedLog, SerialConsole, COM1_IRQ, CONSOLE_FILE_LIMIT};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::feature_names;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{self, Vsock};
use crate::devices::{Bus, BusOverlap, SharedDevice};
use crate::exit::ExitRequester;
use crate::timeline::Timeline;

/// Failure to create the planned devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created or registered as a KVM irqfd.
    #[error("could not wire the interrupt of device {0:?}")]
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
    /// A range was refused by the bus (a planner bug if it happens).
    #[error("device {0:?} could not be placed on its bus")]
    Bus(String, #[source] BusOverlap),
}

/// The live devices of a running VM.
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    blocks: Vec<Arc<Mutex<MmioTransport>>>,
    /// Every virtio transport with its device id, for the negotiated features.
    virtio: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    block_files: Vec<File>,
    socket_paths: Vec<PathBuf>,
}

impl DeviceManager {
    /// Creates every planned device, wires its interrupt and puts it on its bus.
    pub fn create(
        plan: &DevicePlan,
        config: &VmConfig,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        exit: &ExitRequester,
        timeline: &Arc<Timeline>,
    ) -> Result<Self, DeviceError> {
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        let (mut blocks, mut block_files, mut socket_paths) = (Vec::new(), Vec::new(), Vec::new());
        let mut virtio = Vec::new();
        for planned in &plan.devices {
            let id = &planned.id;
            let irqfd = |irq: u32| -> Result<EventFd, DeviceError> {
                let evt =
                    EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError::Irq(id.clone(), e))?;
                vm.register_irqfd(&evt, irq).map_err(|e| {
                    DeviceError::Irq(id.clone(), std::io::Error::from_raw_os_error(e.errno()))
                })?;
                Ok(evt)
            };
            let device: SharedDevice = match &planned.kind {
                DeviceKind::Serial { .. } => {
                    let out: Box<dyn Write + Send> = match &config.console {
                        ConsoleConfig::Stdout => Box::new(std::io::stdout()),
                        ConsoleConfig::File(p) => {
                            Box::new(std::io::LineWriter::new(BoundedLog::new(
                                File::create(p).map_err(|e| DeviceError::Console(p.clone(), e))?,
                                CONSOLE_FILE_LIMIT,
                            )))
                        }
                        ConsoleConfig::Off => Box::new(std::io::sink()),
                    };
                    Arc::new(Mutex::new(SerialConsole::new(irqfd(COM1_IRQ)?, out)))
                }
                DeviceKind::I8042 => Arc::new(Mutex::new(I8042::new(exit.clone()))),
                DeviceKind::AcpiSleep => Arc::new(Mutex::new(AcpiSleep::new(exit.clone()))),
                DeviceKind::BootTimer => Arc::new(Mutex::new(BootTimer::new(timeline.clone()))),
                DeviceKind::VirtioBlock { path, read_only, .. } => {
                    let file = OpenOptions::new()
                        .read(true)
                        .write(!read_only)
                        .open(path)
                        .map_err(|e| DeviceError::Backing(id.clone(), path.clone(), e))?;
                    let keep = file
                        .try_clone()
                        .map_err(|e| DeviceError::Backing(id.clone(), path.clone(), e))?;
                    let blk = Block::new(id.clone(), file, *read_only)
                        .map_err(|e| DeviceError::Backing(id.clone(), path.clone(), e))?;
                    let irq = planned.irq.unwrap_or_default();
                    let t = MmioTransport::new(Box::new(blk), mem.clone(), irqfd(irq)?)
                        .map_err(|e| DeviceError::Queue(id.clone(), e.to_string()))?;
                    let t = Arc::new(Mutex::new(t));
                    virtio.push((id.clone(), t.clone()));
                    blocks.push(t.clone());
                    if !read_only {
                        block_files.push(keep);
                    }
                    t
                }
                DeviceKind::VirtioVsock { guest_cid, uds_path, .. } => {
                    let dev = Vsock::new(*guest_cid, uds_path)
                        .map_err(|e| DeviceError::Backing(id.clone(), uds_path.clone(), e))?;
                    socket_paths.push(uds_path.clone());
                    let epoll = dev.epoll();
                    let irq = planned.irq.unwrap_or_default();
                    let t = MmioTransport::new(Box::new(dev), mem.clone(), irqfd(irq)?)
                        .map_err(|e| DeviceError::Queue(id.clone(), e.to_string()))?;
                    let t = Arc::new(Mutex::new(t));
                    virtio.push((id.clone(), t.clone()));
                    vsock::spawn_event_thread(t.clone(), epoll)
                        .map_err(|e| DeviceError::Backing(id.clone(), uds_path.clone(), e))?;
                    t
                }
                DeviceKind::VirtioRng { .. } => {
                    let rng = Rng::new()
                        .map_err(|e| DeviceError::Backing(id.clone(), "/dev/urandom".into(), e))?;
                    let irq = planned.irq.unwrap_or_default();
                    let t = MmioTransport::new(Box::new(rng), mem.clone(), irqfd(irq)?)
                        .map_err(|e| DeviceError::Queue(id.clone(), e.to_string()))?;
                    let t = Arc::new(Mutex::new(t));
                    virtio.push((id.clone(), t.clone()));
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
        Ok(DeviceManager {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            blocks,
            virtio,
            block_files,
            socket_paths,
        })
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
        self.blocks.len()
    }
}
