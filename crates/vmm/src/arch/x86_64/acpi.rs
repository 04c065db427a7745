//! ACPI tables: built by [`isocell_vmm_model::acpi`] (re-exported here, see there for what they
//! contain), copied into guest memory here.

pub use isocell_vmm_model::acpi::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Failure to copy the ACPI tables into guest memory.
#[derive(Debug, thiserror::Error)]
#[error("could not write the ACPI tables into guest memory")]
pub struct AcpiWriteError(#[source] pub vm_memory::GuestMemoryError);

/// Copies `tables` into guest memory.
pub fn write(tables: &AcpiTables, mem: &GuestMemoryMmap) -> Result<(), AcpiWriteError> {
    for (addr, bytes) in tables.blobs() {
        mem.write_slice(bytes, GuestAddress(*addr)).map_err(AcpiWriteError)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::device_manager::DevicePlan;

    #[test]
    fn tables_land_at_their_addresses() {
        let plan = DevicePlan::new(&isocell_spec::VmConfig::new("/k")).unwrap();
        let tables = build(2, &plan).unwrap();
        let mem = crate::vstate::vm::create_guest_memory(2 << 20).unwrap();
        write(&tables, &mem).unwrap();
        for (addr, bytes) in tables.blobs() {
            let mut back = vec![0u8; bytes.len()];
            mem.read_slice(&mut back, GuestAddress(*addr)).unwrap();
            assert_eq!(&back, bytes);
        }
    }
}
