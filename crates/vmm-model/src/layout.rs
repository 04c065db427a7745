//! Where things live in guest-physical memory. One table, so overlaps are easy to see.

/// Global descriptor table used for the 64-bit entry.
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (empty; the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// The Linux "zero page" (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT and one PD of 2 MiB pages (first 1 GiB).
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// Page directory.
pub const PDE_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest kernel command line, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table goes (the kernel scans 639K-640K).
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables: the RSDP at the start (inside the BIOS area 0xE0000-0xFFFFF, where a kernel
/// that is not told the RSDP's address scans for it), the other tables after it.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x10_0000;
/// First byte above the legacy hole; the kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (devices, IO-APIC, local APIC); RAM resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The VMM's own MMIO device window inside the gap; the boot timer sits at its start.
pub const DEVICE_WINDOW_START: u64 = isocell_spec::vm::BOOT_TIMER_ADDR;
/// End of the device window (the IO-APIC sits just above it).
pub const DEVICE_WINDOW_END: u64 = 0xfec0_0000;
/// IO-APIC registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Where KVM may put the TSS it needs on Intel (three pages, inside the gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Number of IO-APIC input pins the in-kernel irqchip provides.
pub const IOAPIC_PINS: u32 = 24;

/// The guest RAM ranges `(start, size)` for `mem_size` bytes of memory: below the MMIO gap, and
/// the rest from 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)]
        );
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let mut areas = [
            (GDT_ADDR, 0x20),
            (IDT_ADDR, 0x8),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPTE_ADDR, 0x1000),
            (PDE_ADDR, 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, 0x400),
            (ACPI_START, ACPI_END - ACPI_START),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
        }
        const { assert!(BOOT_STACK_ADDR < PML4_ADDR && BOOT_STACK_ADDR > ZERO_PAGE_ADDR + 0x1000) };
    }
}
