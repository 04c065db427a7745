//! The Intel MultiProcessor Specification 1.4 table: how an SMP guest without ACPI learns its
//! CPUs, its IO-APIC and how ISA interrupts are routed. Written at the start of the EBDA, where
//! the kernel scans for the `_MP_` floating pointer.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{EBDA_START, IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};

/// Failure to write the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More CPUs than the table can describe (APIC ids are 8 bits, one is the IO-APIC's).
    #[error("{0} vCPUs do not fit in an MP table")]
    TooManyCpus(u8),
    /// The table did not fit in guest memory.
    #[error("could not write the MP table into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const SPEC_REVISION: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// CPU signature and feature flags the processor entries carry (family 6; FPU and APIC present).
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// Builds the floating pointer followed by the configuration table, for `cpus` CPUs, as the
/// bytes to place at `base`.
pub fn build(base: u64, cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus == u8::MAX {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS as u8 {
        // ISA IRQ n arrives on IO-APIC pin n; polarity and trigger conform to the ISA bus.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // LINT0 of every local APIC takes ExtINT (the PIC), LINT1 takes NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_base = base + FLOATING_POINTER_LEN as u64;
    let table_len = (HEADER_LEN + entries.len()) as u16;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.extend_from_slice(&[SPEC_REVISION, 0]); // checksum patched below
    header.extend_from_slice(b"ISOCELL ");
    header.extend_from_slice(b"CELL        ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_POINTER_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_base as u32).to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `cpus` CPUs at the start of the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(EBDA_START, cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START)).map_err(MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, 4, 32] {
            let bytes = build(EBDA_START, cpus).unwrap();
            let (fp, table) = bytes.split_at(FLOATING_POINTER_LEN);
            assert_eq!(&fp[..4], b"_MP_");
            assert_eq!(fp.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            assert_eq!(u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64, EBDA_START + 16);
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(u16::from_le_bytes([table[4], table[5]]) as usize, table.len());
            assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            let entries = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(entries, u16::from(cpus) + 2 + 24 + 2);
            // The whole table must fit in the 1 KiB the kernel scans at 639K.
            assert!(bytes.len() <= 1024, "{} bytes", bytes.len());
        }
    }

    #[test]
    fn exactly_one_bootstrap_cpu() {
        let bytes = build(EBDA_START, 4).unwrap();
        let cpus = &bytes[FLOATING_POINTER_LEN + HEADER_LEN..];
        let bsps = (0..4).filter(|i| cpus[i * 20 + 3] & CPU_BOOTSTRAP != 0).count();
        assert_eq!(bsps, 1);
        assert!(build(EBDA_START, 0).is_err());
    }
}
