//! ACPI tables: how a guest configured like a Firecracker guest (`CONFIG_ACPI`, no command-line
//! virtio devices, no MP table parser) finds its CPUs and devices.
//!
//! The platform is *hardware-reduced* ACPI: no PM1 blocks, no SCI, no GPEs, no fixed power
//! button. The tables carry only what a guest needs:
//!
//! | table | contents |
//! |-------|----------|
//! | RSDP  | at [`ACPI_START`] (also named in the zero page), points at the XSDT |
//! | XSDT  | FADT, MADT |
//! | FADT  | hardware-reduced; DSDT address; sleep control/status registers (for S5 only); boot flags: i8042 present, no VGA, no MSI, no CMOS RTC |
//! | MADT  | one enabled local APIC per vCPU (APIC id = vCPU index), the IO-APIC (GSI base 0) |
//! | DSDT  | COM1 (`PNP0501`), the i8042 (`PNP0303`), each virtio-mmio device (`LNRO0005`: its 4 KiB window and edge-triggered interrupt), and `\_S5_` |
//!
//! ISA interrupts keep the identity routing the MP table also describes (IRQ n on IO-APIC pin n),
//! so the MADT needs no interrupt source overrides. The only AML is names and resource templates:
//! no methods. A guest `poweroff` writes S5 to the sleep control register, which the VMM's
//! ACPI sleep device turns into a clean stop.
//!
//! Building the tables is pure (bytes only); the VMM copies [`AcpiTables::blobs`] into guest
//! memory.

use acpi_tables::aml::{self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use serde::Serialize;

use crate::device_plan::DevicePlan;
use crate::devices::acpi_sleep::{S5_SLEEP_TYPE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use crate::devices::i8042;
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::layout::{ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR};

const OEM_ID: [u8; 6] = *b"ISOCEL";
const OEM_REVISION: u32 = 1;
/// `_HID` of a virtio-mmio device, as Linux's virtio_mmio driver matches it.
const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// Size of a virtio-mmio register window.
const VIRTIO_MMIO_LEN: u32 = 0x1000;
/// The i8042's interrupt (keyboard port).
const I8042_IRQ: u32 = 1;
/// FADT IAPC_BOOT_ARCH bits (ACPI 6.5, table 5.11).
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const BOOT_ARCH_NO_MSI: u16 = 1 << 3;
const BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
/// What the FADT names as the hypervisor ("ISOCELL" and a NUL, little-endian).
const HYPERVISOR_ID: u64 = u64::from_le_bytes(*b"ISOCELL\0");

/// Failure to build the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables outgrew their area below 1 MiB.
    #[error("the ACPI tables need {0} bytes, more than the {1} bytes reserved for them")]
    TooBig(u64, u64),
    /// More vCPUs than an 8-bit APIC id numbers (one id is the IO-APIC's).
    #[error("{0} vCPUs do not fit in the MADT")]
    TooManyCpus(u8),
}

/// One table as placed in guest memory, for `--describe` and `isocell surface`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TableInfo {
    /// Signature ("RSD PTR ", "XSDT", "FACP", "APIC", "DSDT").
    pub signature: String,
    /// Guest-physical address.
    pub address: u64,
    /// Length in bytes.
    pub length: u64,
}

/// The tables of one VM, laid out from [`ACPI_START`].
pub struct AcpiTables {
    /// `(guest address, bytes)` of each table.
    blobs: Vec<(u64, Vec<u8>)>,
    /// What each is, in placement order.
    pub tables: Vec<TableInfo>,
}

impl AcpiTables {
    /// Guest-physical range `(start, length)` the tables occupy, for the e820 map.
    pub fn extent(&self) -> (u64, u64) {
        let end = self.blobs.iter().map(|(a, b)| a + b.len() as u64).max().unwrap_or(ACPI_START);
        (ACPI_START, end - ACPI_START)
    }

    /// `(guest address, bytes)` of each table, in placement order: what goes into guest memory.
    pub fn blobs(&self) -> &[(u64, Vec<u8>)] {
        &self.blobs
    }
}

fn aml_bytes(item: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    item.to_aml_bytes(&mut v);
    v
}

/// The DSDT's AML: one device per legacy port and virtio-mmio window, and the S5 sleep type.
fn dsdt_body(plan: &DevicePlan) -> Vec<u8> {
    let mut body = Vec::new();
    Device::new(
        Path::new("_SB_.COM1"),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &0u8),
            &Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_BASE as u16, COM1_BASE as u16, 1, COM1_LEN as u8),
                    &Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    // Without it, a kernel with PNP finds no PS/2 controller and never loads the driver whose
    // panic blink tells the VMM that the guest panicked.
    Device::new(
        Path::new("_SB_.PS2_"),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0303")),
            &Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(i8042::DATA_PORT as u16, i8042::DATA_PORT as u16, 1, 1),
                    &aml::IO::new(i8042::COMMAND_PORT as u16, i8042::COMMAND_PORT as u16, 1, 1),
                    &Interrupt::new(true, true, false, false, I8042_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    for (i, dev) in plan.virtio_devices().enumerate() {
        let (Some(range), Some(irq)) = (dev.ranges.first(), dev.irq) else { continue };
        let uid = i as u32;
        let window = Memory32Fixed::new(true, range.base as u32, VIRTIO_MMIO_LEN);
        let interrupt = Interrupt::new(true, true, false, false, irq);
        let resources = aml::ResourceTemplate::new(vec![&window, &interrupt]);
        Device::new(
            Path::new(&format!("_SB_.V{i:03X}")),
            vec![
                &Name::new("_HID".into(), &VIRTIO_MMIO_HID),
                &Name::new("_UID".into(), &uid),
                &Name::new("_CRS".into(), &resources),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    // \_S5_: {SLP_TYPa, SLP_TYPb, reserved, reserved}; the guest writes SLP_TYPa with SLP_EN.
    let s5 = Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &0u8, &0u8]);
    Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    body
}

/// Rounds `addr` up to a multiple of 16.
fn align16(addr: u64) -> u64 {
    (addr + 15) & !15
}

/// Builds the tables for `vcpus` vCPUs and the devices in `plan`.
pub fn build(vcpus: u8, plan: &DevicePlan) -> Result<AcpiTables, AcpiError> {
    if vcpus == 0 || vcpus == u8::MAX {
        return Err(AcpiError::TooManyCpus(vcpus));
    }
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"ISOCDSDT", OEM_REVISION);
    dsdt.append_slice(&dsdt_body(plan));
    dsdt.update_checksum();

    let mut madt = MADT::new(
        OEM_ID,
        *b"ISOCMADT",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // The IO-APIC takes the id after the last vCPU's, as in the MP table.
    madt.add_structure(IoApic::new(vcpus, IOAPIC_ADDR as u32, 0));
    let madt = aml_bytes(&madt);

    // Addresses: RSDP first, then XSDT, FADT, MADT, DSDT, each 16-byte aligned.
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    const XSDT_LEN: u64 = 36 + 2 * 8;
    let fadt_addr = align16(xsdt_addr + XSDT_LEN);
    let madt_addr = align16(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let dsdt_addr = align16(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooBig(end - ACPI_START, ACPI_END - ACPI_START));
    }

    let sleep_register =
        |port: u16| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(port));
    let mut fadt = FADTBuilder::new(OEM_ID, *b"ISOCFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi);
    fadt.iapc_boot_arch =
        (BOOT_ARCH_8042 | BOOT_ARCH_NO_VGA | BOOT_ARCH_NO_MSI | BOOT_ARCH_NO_CMOS_RTC).into();
    fadt.sleep_control_reg = sleep_register(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = sleep_register(SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = HYPERVISOR_ID.into();
    let fadt = aml_bytes(&fadt.finalize());

    let mut xsdt = XSDT::new(OEM_ID, *b"ISOCXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, XSDT_LEN);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let blobs = vec![
        (rsdp_addr, rsdp),
        (xsdt_addr, xsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (dsdt_addr, dsdt.as_slice().to_vec()),
    ];
    let tables = blobs
        .iter()
        .map(|(addr, bytes)| TableInfo {
            signature: String::from_utf8_lossy(&bytes[..if *addr == rsdp_addr { 8 } else { 4 }])
                .into_owned(),
            address: *addr,
            length: bytes.len() as u64,
        })
        .collect();
    Ok(AcpiTables { blobs, tables })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn plan() -> DevicePlan {
        let mut c = isocell_spec::VmConfig::new("/k");
        c.drives.push(isocell_spec::DriveConfig {
            id: "root".into(),
            path: "/r".into(),
            read_only: true,
            root: true,
            placement: None,
        });
        DevicePlan::new(&c).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn tables_checksum_and_chain() {
        for cpus in [1u8, 2, 32] {
            let t = build(cpus, &plan()).unwrap();
            let by_sig =
                |s: &str| t.blobs.iter().find(|(_, b)| b.starts_with(s.as_bytes())).unwrap();
            let (_, rsdp) = by_sig("RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0);
            assert_eq!(sum(rsdp), 0);
            let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
            let (xa, xsdt) = by_sig("XSDT");
            assert_eq!(*xa, xsdt_addr);
            for (_, b) in &t.blobs[1..] {
                assert_eq!(sum(b), 0, "{:?}", String::from_utf8_lossy(&b[..4]));
                assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize, b.len());
            }
            let entries: Vec<u64> =
                xsdt[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(entries, [by_sig("FACP").0, by_sig("APIC").0]);
            let (_, fadt) = by_sig("FACP");
            let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
            assert_eq!(x_dsdt, by_sig("DSDT").0);
            let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
            assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
            // One local APIC entry per vCPU, then the IO-APIC.
            let (_, madt) = by_sig("APIC");
            assert_eq!(madt.len(), 44 + 8 * cpus as usize + 12);
            let (start, len) = t.extent();
            assert!(start == ACPI_START && start + len <= ACPI_END);
        }
    }

    #[test]
    fn dsdt_names_every_virtio_window_and_the_serial_port() {
        let p = plan();
        let body = dsdt_body(&p);
        let text = String::from_utf8_lossy(&body);
        assert_eq!(text.matches(VIRTIO_MMIO_HID).count(), p.virtio_devices().count());
        for dev in p.virtio_devices() {
            let base = (dev.ranges[0].base as u32).to_le_bytes();
            assert!(body.windows(4).any(|w| w == base), "{} missing", dev.id);
        }
        assert!(text.contains("COM1") && text.contains("_S5_") && text.contains("PS2_"));
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        assert!(matches!(build(255, &plan()), Err(AcpiError::TooManyCpus(255))));
    }
}
