//! The device plan: where every device sits, decided before any VM exists, so placement errors
//! are configuration errors. The VMM creates its live devices from this plan, and the device
//! list printed by `isocell-vmm --describe` and `isocell surface` is this same plan.

use std::path::PathBuf;

use isocell_spec::{ConsoleConfig, VmConfig};
use serde::Serialize;

use crate::devices::acpi_sleep;
use crate::devices::boot_timer::BOOT_TIMER_LEN;
use crate::devices::i8042;
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::virtio::{block, feature_names, rng, vsock, MMIO_WINDOW_LEN};
use crate::layout::{DEVICE_WINDOW_END, DEVICE_WINDOW_START, IOAPIC_PINS};

/// IRQ lines handed to virtio devices, in order (1 keyboard, 4 COM1, 8 RTC and 12 PS/2 mouse
/// are left to their legacy owners).
const VIRTIO_IRQS: [u32; 17] = [5, 6, 7, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];

/// A device placement the configuration asked for cannot be honoured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    /// The MMIO base is not page aligned or not inside the device window.
    #[error(
        "device {id:?}: mmio_base {base:#x} must be 4 KiB aligned and inside {DEVICE_WINDOW_START:#x}..{DEVICE_WINDOW_END:#x}"
    )]
    BadAddress {
        /// The device.
        id: String,
        /// The requested base.
        base: u64,
    },
    /// The IRQ is not one virtio devices may use.
    #[error("device {id:?}: irq {irq} is not available; use one of {VIRTIO_IRQS:?}")]
    BadIrq {
        /// The device.
        id: String,
        /// The requested line.
        irq: u32,
    },
    /// Two devices claim overlapping address ranges.
    #[error("devices {0:?} and {1:?} overlap: {2:#x}..{3:#x} is claimed twice")]
    Overlap(String, String, u64, u64),
    /// Two devices claim the same IRQ.
    #[error("devices {0:?} and {1:?} both use irq {2}")]
    IrqConflict(String, String, u32),
    /// No free address or IRQ is left.
    #[error("no free MMIO window or IRQ left for device {0:?}")]
    Exhausted(String),
}

/// Which bus a range is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressSpace {
    /// x86 port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

/// One address range a device answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct IoRange {
    /// Port I/O or MMIO.
    pub space: AddressSpace,
    /// First address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a device is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceKind {
    /// 8250 UART (COM1) carrying the console.
    Serial {
        /// Where its output goes: "stdout", "file" or "off".
        output: &'static str,
    },
    /// i8042 controller: reset and panic signalling; no keyboard attached.
    I8042,
    /// Boot-timer register.
    BootTimer,
    /// ACPI sleep control and status registers: a guest `poweroff` (S5) stops the VM.
    AcpiSleep,
    /// virtio-blk over virtio-mmio.
    VirtioBlock {
        /// Backing raw image.
        path: PathBuf,
        /// The guest may not write.
        read_only: bool,
        /// Mounted as the root filesystem.
        root: bool,
        /// The guest's name for it (`vda`, `vdb`, ...).
        guest_name: String,
        /// Feature bits offered to the driver.
        features: Vec<String>,
        /// Maximum size of each queue.
        queue_sizes: Vec<u16>,
    },
    /// virtio-vsock over virtio-mmio, with Unix sockets on the host side.
    VirtioVsock {
        /// The guest's context id.
        guest_cid: u64,
        /// Host socket for host-initiated connections; guest-initiated ones go to `PATH_PORT`.
        uds_path: PathBuf,
        /// Feature bits offered to the driver.
        features: Vec<String>,
        /// Maximum size of each queue.
        queue_sizes: Vec<u16>,
    },
    /// virtio-rng over virtio-mmio.
    VirtioRng {
        /// Feature bits offered to the driver.
        features: Vec<String>,
        /// Maximum size of each queue.
        queue_sizes: Vec<u16>,
    },
}

impl DeviceKind {
    /// The kind's name, as the plan's JSON spells it (`serial`, `virtio_block`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::Serial { .. } => "serial",
            DeviceKind::I8042 => "i8042",
            DeviceKind::BootTimer => "boot_timer",
            DeviceKind::AcpiSleep => "acpi_sleep",
            DeviceKind::VirtioBlock { .. } => "virtio_block",
            DeviceKind::VirtioVsock { .. } => "virtio_vsock",
            DeviceKind::VirtioRng { .. } => "virtio_rng",
        }
    }
}

/// One device as planned: stable id, kind, ranges and interrupt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlannedDevice {
    /// Stable id (`serial0`, `i8042`, `acpi_sleep`, `boot_timer`, drive ids, `rng0`).
    pub id: String,
    /// Kind and kind-specific details.
    #[serde(flatten)]
    pub kind: DeviceKind,
    /// The ranges it answers on.
    pub ranges: Vec<IoRange>,
    /// The IRQ it raises, if any.
    pub irq: Option<u32>,
}

/// Every device of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DevicePlan {
    /// In creation order; virtio devices in the order the guest probes them.
    pub devices: Vec<PlannedDevice>,
}

impl DevicePlan {
    /// Plans the devices for `config`: fixed legacy devices, then each drive, the vsock device
    /// and the RNG.
    pub fn new(config: &VmConfig) -> Result<Self, PlacementError> {
        let output = match config.console {
            ConsoleConfig::Stdout => "stdout",
            ConsoleConfig::File(_) => "file",
            ConsoleConfig::Off => "off",
        };
        let pio = |base, len| IoRange { space: AddressSpace::Pio, base, len };
        let mmio = |base, len| IoRange { space: AddressSpace::Mmio, base, len };
        let mut devices = vec![
            PlannedDevice {
                id: "serial0".into(),
                kind: DeviceKind::Serial { output },
                ranges: vec![pio(COM1_BASE, COM1_LEN)],
                irq: Some(COM1_IRQ),
            },
            PlannedDevice {
                id: "i8042".into(),
                kind: DeviceKind::I8042,
                ranges: vec![pio(i8042::DATA_PORT, 1), pio(i8042::COMMAND_PORT, 1)],
                irq: None,
            },
            PlannedDevice {
                id: "acpi_sleep".into(),
                kind: DeviceKind::AcpiSleep,
                ranges: vec![pio(u64::from(acpi_sleep::SLEEP_CONTROL_PORT), acpi_sleep::PORTS_LEN)],
                irq: None,
            },
            PlannedDevice {
                id: "boot_timer".into(),
                kind: DeviceKind::BootTimer,
                ranges: vec![mmio(DEVICE_WINDOW_START, BOOT_TIMER_LEN)],
                irq: None,
            },
        ];

        // Virtio devices with a fixed placement are checked first; the rest fill the gaps.
        let mut virtio: Vec<(PlannedDevice, Option<isocell_spec::MmioPlacement>)> = Vec::new();
        for (i, d) in config.drives.iter().enumerate() {
            let guest_name = format!("vd{}", (b'a' + i as u8) as char);
            let kind = DeviceKind::VirtioBlock {
                path: d.path.clone(),
                read_only: d.read_only,
                root: d.root,
                guest_name,
                features: feature_names(block::DEVICE_TYPE, block::offered_features(d.read_only)),
                queue_sizes: vec![block::QUEUE_SIZE],
            };
            virtio.push((
                PlannedDevice { id: d.id.clone(), kind, ranges: vec![], irq: None },
                d.placement,
            ));
        }
        if let Some(v) = &config.vsock {
            let kind = DeviceKind::VirtioVsock {
                guest_cid: v.guest_cid,
                uds_path: v.uds_path.clone(),
                features: feature_names(vsock::DEVICE_TYPE, vsock::offered_features()),
                queue_sizes: vec![vsock::QUEUE_SIZE; 3],
            };
            virtio.push((
                PlannedDevice { id: "vsock0".into(), kind, ranges: vec![], irq: None },
                None,
            ));
        }
        if config.rng {
            let kind = DeviceKind::VirtioRng {
                features: feature_names(rng::DEVICE_TYPE, rng::offered_features()),
                queue_sizes: vec![rng::QUEUE_SIZE],
            };
            virtio
                .push((PlannedDevice { id: "rng0".into(), kind, ranges: vec![], irq: None }, None));
        }

        for (dev, placement) in &mut virtio {
            let Some(p) = placement else { continue };
            let aligned = p.mmio_base % MMIO_WINDOW_LEN == 0;
            let inside = p.mmio_base >= DEVICE_WINDOW_START
                && p.mmio_base.checked_add(MMIO_WINDOW_LEN).is_some_and(|e| e <= DEVICE_WINDOW_END);
            if !aligned || !inside {
                return Err(PlacementError::BadAddress { id: dev.id.clone(), base: p.mmio_base });
            }
            if !VIRTIO_IRQS.contains(&p.irq) || p.irq >= IOAPIC_PINS {
                return Err(PlacementError::BadIrq { id: dev.id.clone(), irq: p.irq });
            }
            dev.ranges = vec![mmio(p.mmio_base, MMIO_WINDOW_LEN)];
            dev.irq = Some(p.irq);
            check_conflicts(&devices, dev)?;
            devices.push(dev.clone());
        }
        let mut next_base = DEVICE_WINDOW_START + BOOT_TIMER_LEN;
        for (dev, placement) in &mut virtio {
            if placement.is_some() {
                continue;
            }
            let taken_range = |base: u64, devs: &[PlannedDevice]| {
                devs.iter().flat_map(|d| &d.ranges).any(|r| {
                    r.space == AddressSpace::Mmio
                        && base < r.base + r.len
                        && r.base < base + MMIO_WINDOW_LEN
                })
            };
            while taken_range(next_base, &devices) {
                next_base += MMIO_WINDOW_LEN;
            }
            let irq =
                VIRTIO_IRQS.iter().copied().find(|irq| devices.iter().all(|d| d.irq != Some(*irq)));
            let (Some(irq), true) = (irq, next_base + MMIO_WINDOW_LEN <= DEVICE_WINDOW_END) else {
                return Err(PlacementError::Exhausted(dev.id.clone()));
            };
            dev.ranges = vec![mmio(next_base, MMIO_WINDOW_LEN)];
            dev.irq = Some(irq);
            devices.push(dev.clone());
        }
        // Put virtio devices back in guest probe order (drives in config order, then rng).
        let order: Vec<String> = virtio.iter().map(|(d, _)| d.id.clone()).collect();
        devices.sort_by_key(|d| order.iter().position(|id| *id == d.id).map_or(0, |p| p + 1));
        Ok(DevicePlan { devices })
    }

    /// The virtio-mmio devices, in the order the guest must probe them.
    pub fn virtio_devices(&self) -> impl Iterator<Item = &PlannedDevice> {
        self.devices.iter().filter(|d| {
            matches!(
                d.kind,
                DeviceKind::VirtioBlock { .. }
                    | DeviceKind::VirtioVsock { .. }
                    | DeviceKind::VirtioRng { .. }
            )
        })
    }

    /// The `virtio_mmio.device=` arguments that tell the kernel where the virtio devices are.
    pub fn kernel_args(&self) -> Vec<String> {
        self.virtio_devices()
            .filter_map(|d| {
                let r = d.ranges.first()?;
                Some(format!("virtio_mmio.device=4K@{:#x}:{}", r.base, d.irq?))
            })
            .collect()
    }
}

fn check_conflicts(existing: &[PlannedDevice], new: &PlannedDevice) -> Result<(), PlacementError> {
    for d in existing {
        for a in &d.ranges {
            for b in &new.ranges {
                if a.space == b.space && a.base < b.base + b.len && b.base < a.base + a.len {
                    let start = a.base.max(b.base);
                    let end = (a.base + a.len).min(b.base + b.len);
                    return Err(PlacementError::Overlap(d.id.clone(), new.id.clone(), start, end));
                }
            }
        }
        if let (Some(x), Some(y)) = (d.irq, new.irq) {
            if x == y {
                return Err(PlacementError::IrqConflict(d.id.clone(), new.id.clone(), x));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use isocell_spec::{DriveConfig, MmioPlacement};

    use super::*;

    fn drive(id: &str, placement: Option<MmioPlacement>) -> DriveConfig {
        DriveConfig { id: id.into(), path: "x.img".into(), read_only: true, root: false, placement }
    }

    #[test]
    fn default_layout() {
        let mut c = VmConfig::new("k");
        c.drives = vec![drive("root", None), drive("data", None)];
        let plan = DevicePlan::new(&c).unwrap();
        let ids: Vec<_> = plan.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["serial0", "i8042", "acpi_sleep", "boot_timer", "root", "data", "rng0"]);
        assert_eq!(
            plan.kernel_args(),
            [
                "virtio_mmio.device=4K@0xd0001000:5",
                "virtio_mmio.device=4K@0xd0002000:6",
                "virtio_mmio.device=4K@0xd0003000:7"
            ]
        );
    }

    #[test]
    fn vsock_is_planned_between_drives_and_rng() {
        let mut c = VmConfig::new("k");
        c.drives = vec![drive("root", None)];
        c.vsock =
            Some(isocell_spec::VsockConfig { guest_cid: 3, uds_path: "/tmp/x/v.sock".into() });
        let plan = DevicePlan::new(&c).unwrap();
        let ids: Vec<_> = plan.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["serial0", "i8042", "acpi_sleep", "boot_timer", "root", "vsock0", "rng0"]);
        assert_eq!(plan.kernel_args().len(), 3);
        let json = serde_json::to_value(&plan).unwrap();
        let vsock =
            json["devices"].as_array().unwrap().iter().find(|d| d["id"] == "vsock0").unwrap();
        assert_eq!(vsock["type"], "virtio_vsock");
        assert_eq!(vsock["guest_cid"], 3);
        assert_eq!(vsock["queue_sizes"], serde_json::json!([256, 256, 256]));
    }

    #[test]
    fn pinned_devices_keep_their_place_and_others_avoid_it() {
        let mut c = VmConfig::new("k");
        let pin = MmioPlacement { mmio_base: 0xd000_1000, irq: 5 };
        c.drives = vec![drive("a", None), drive("b", Some(pin))];
        let plan = DevicePlan::new(&c).unwrap();
        let a = plan.devices.iter().find(|d| d.id == "a").unwrap();
        let b = plan.devices.iter().find(|d| d.id == "b").unwrap();
        assert_eq!((b.ranges[0].base, b.irq), (0xd000_1000, Some(5)));
        assert_ne!(a.ranges[0].base, 0xd000_1000);
        assert_ne!(a.irq, Some(5));
        // Guest order is still config order.
        assert!(plan.kernel_args()[0].contains(&format!("{:#x}", a.ranges[0].base)));
    }

    #[test]
    fn overlaps_and_bad_placements_are_refused() {
        let mut c = VmConfig::new("k");
        let p = MmioPlacement { mmio_base: 0xd000_2000, irq: 5 };
        c.drives = vec![drive("a", Some(p)), drive("b", Some(MmioPlacement { irq: 6, ..p }))];
        assert!(matches!(DevicePlan::new(&c), Err(PlacementError::Overlap(..))));
        c.drives = vec![
            drive("a", Some(p)),
            drive("b", Some(MmioPlacement { mmio_base: 0xd000_3000, ..p })),
        ];
        assert!(matches!(DevicePlan::new(&c), Err(PlacementError::IrqConflict(..))));
        c.drives = vec![drive("a", Some(MmioPlacement { mmio_base: DEVICE_WINDOW_START, irq: 5 }))];
        let e = DevicePlan::new(&c).unwrap_err();
        assert!(e.to_string().contains("\"a\" and") || e.to_string().contains("overlap"), "{e}");
        c.drives = vec![drive("a", Some(MmioPlacement { mmio_base: 0xd000_2001, irq: 5 }))];
        assert!(matches!(DevicePlan::new(&c), Err(PlacementError::BadAddress { .. })));
        c.drives = vec![drive("a", Some(MmioPlacement { mmio_base: 0xd000_2000, irq: 4 }))];
        assert!(matches!(DevicePlan::new(&c), Err(PlacementError::BadIrq { .. })));
    }
}
