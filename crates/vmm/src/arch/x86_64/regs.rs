//! Register state for the Linux 64-bit boot protocol: a flat GDT, identity-mapped page tables,
//! long mode, and the local APIC's LINT pins wired as a PC expects.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_STACK_ADDR, GDT_ADDR, IDT_ADDR, PDE_ADDR, PDPTE_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};

/// Failure to set up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("KVM refused the {0} registers")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The GDT or page tables did not fit in guest memory.
    #[error("could not write boot tables into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// The boot GDT: null, 64-bit code, data, TSS. Flags are (access byte | granularity nibble << 12).
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE_SELECTOR: u16 = 1 << 3;
const DATA_SELECTOR: u16 = 2 << 3;
const TSS_SELECTOR: u16 = 3 << 3;

/// Encodes one segment descriptor.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
}

/// Decodes a descriptor into the form KVM takes.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let granular = (entry >> 55) & 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if granular == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and identity page tables for the first 1 GiB (2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(RegsError::GuestMemory)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(RegsError::GuestMemory)?;
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> 2 MiB page i (present, writable, huge).
    mem.write_obj(PDPTE_ADDR | 0x03, GuestAddress(PML4_ADDR)).map_err(RegsError::GuestMemory)?;
    mem.write_obj(PDE_ADDR | 0x03, GuestAddress(PDPTE_ADDR)).map_err(RegsError::GuestMemory)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_ADDR + i * 8))
            .map_err(RegsError::GuestMemory)?;
    }
    Ok(())
}

/// Puts a vCPU in 64-bit mode with paging on, ready to jump to the kernel's 64-bit entry.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|e| RegsError::Kvm("special", e))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(GDT[1], CODE_SELECTOR);
    let data = segment_from_gdt(GDT[2], DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(GDT[3], TSS_SELECTOR);
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(|e| RegsError::Kvm("special", e))
}

/// General registers at the kernel's 64-bit entry: `rsi` points at the zero page.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_ADDR,
        rbp: BOOT_STACK_ADDR,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| RegsError::Kvm("general", e))
}

/// x87 and SSE control words at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("FPU", e))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as _;
    }
}

/// LINT0 delivers the PIC's interrupts (ExtINT), LINT1 delivers NMIs, as on a PC.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut state = vcpu.get_lapic().map_err(|e| RegsError::Kvm("local APIC", e))?;
    let with_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(&mut state, APIC_LVT0, with_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(&mut state, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&state).map_err(|e| RegsError::Kvm("local APIC", e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let code = segment_from_gdt(GDT[1], CODE_SELECTOR);
        assert_eq!((code.l, code.db, code.present, code.s, code.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(GDT[2], DATA_SELECTOR);
        assert_eq!((data.l, data.db, data.type_), (0, 1, 0x3));
        let tss = segment_from_gdt(GDT[3], TSS_SELECTOR);
        assert_eq!((tss.s, tss.type_, tss.g, tss.present), (0, 0xb, 1, 1));
    }

    #[test]
    fn tables_identity_map_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PDE_ADDR + 8 * 511)).unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
        let gdt1: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(gdt1, 0x00af_9b00_0000_ffff);
    }
}
