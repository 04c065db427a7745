//! The KVM VM: guest memory, in-kernel interrupt controllers and PIT.

use std::fs::File;
use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::arch::x86_64::layout::{ram_ranges, KVM_TSS_ADDR};

/// Failure to create the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM refused to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be mapped.
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, String),
    /// A snapshot's memory file could not be mapped.
    #[error("cannot map the snapshot's guest memory: {0}")]
    SnapshotMemory(String),
}

/// What KVM holds for the VM as a whole: the interrupt controllers, the PIT and the clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    #[allow(missing_docs)]
    pub pic_master: kvm_irqchip,
    #[allow(missing_docs)]
    pub pic_slave: kvm_irqchip,
    #[allow(missing_docs)]
    pub ioapic: kvm_irqchip,
    #[allow(missing_docs)]
    pub pit: kvm_pit_state2,
    /// kvmclock's value when the VM was paused: a restored guest's clock goes on from there.
    pub clock: kvm_clock_data,
}

fn irqchip(id: u32) -> kvm_irqchip {
    kvm_irqchip { chip_id: id, ..Default::default() }
}

/// Reads the VM-wide state; the vCPUs must be paused.
pub fn save_state(vm: &VmFd) -> Result<VmState, VmError> {
    let chip = |id| {
        let mut c = irqchip(id);
        vm.get_irqchip(&mut c).map(|_| c).map_err(|e| VmError::Kvm("read the irqchip", e))
    };
    let mut clock = vm.get_clock().map_err(|e| VmError::Kvm("read the clock", e))?;
    // Only the value is set again; the flags describe how it was read.
    clock.flags = 0;
    Ok(VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(|e| VmError::Kvm("read the PIT", e))?,
        clock,
    })
}

/// Sets the VM-wide state of a VM made by [`create_vm`], before its vCPUs run.
pub fn restore_state(vm: &VmFd, state: &VmState) -> Result<(), VmError> {
    let chips = [
        (KVM_IRQCHIP_PIC_MASTER, &state.pic_master),
        (KVM_IRQCHIP_PIC_SLAVE, &state.pic_slave),
        (KVM_IRQCHIP_IOAPIC, &state.ioapic),
    ];
    for (id, chip) in chips {
        if chip.chip_id != id {
            return Err(VmError::SnapshotMemory(format!(
                "irqchip {id} was saved as {}",
                chip.chip_id
            )));
        }
        vm.set_irqchip(chip).map_err(|e| VmError::Kvm("set the irqchip", e))?;
    }
    vm.set_pit2(&state.pit).map_err(|e| VmError::Kvm("set the PIT", e))?;
    let mut clock = state.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(|e| VmError::Kvm("set the clock", e))?;
    Ok(())
}

/// Maps a snapshot's guest memory from `file` (its regions back to back, as [`write_memory`]
/// wrote them): private and copy-on-write, so the guest's writes never reach the file, and
/// pages are read from it only when first touched.
pub fn guest_memory_from_file(mem_size: u64, file: File) -> Result<GuestMemoryMmap, VmError> {
    let err = |e: String| VmError::SnapshotMemory(e);
    let needed: u64 = ram_ranges(mem_size).iter().map(|(_, l)| *l).sum();
    let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    if len != needed {
        return Err(err(format!("the file holds {len} bytes, the VM has {needed}")));
    }
    let file = Arc::new(file);
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, size) in ram_ranges(mem_size) {
        let mapping = MmapRegionBuilder::new(size as usize)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| err(format!("region at {start:#x} does not fit")))?;
        regions.push(region);
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))
}

/// Writes every region of guest memory to `out`, back to back.
pub fn write_memory(mem: &GuestMemoryMmap, out: &mut File) -> std::io::Result<()> {
    use vm_memory::Bytes;
    for region in mem.iter() {
        mem.write_all_volatile_to(region.start_addr(), out, region.len() as usize)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// Huge page size on x86-64.
const HUGE_PAGE: usize = 2 << 20;

/// Stack size of the VMM's own threads (vCPUs, device workers): well above what they use, and
/// below a huge page, so a host whose THP is `always` cannot back a thread's stack with 2 MiB
/// of memory it never uses (Rust's default of 2 MiB could be).
pub const THREAD_STACK: usize = 512 << 10;

/// Creates the guest memory mapping (anonymous, private, not reserved up front), each region
/// placed at a host address 2 MiB-aligned like its guest address and advised for transparent
/// huge pages: where the host has THP, KVM then maps the guest's memory 2 MiB at a time (it
/// can only when host and guest addresses agree modulo 2 MiB), so a guest's first touch of
/// its memory costs one fault per 2 MiB instead of one per 4 KiB. A host with THP off
/// (`never`) ignores the advice and the guest runs on 4 KiB pages.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, VmError> {
    let mut regions = Vec::new();
    for (start, size) in ram_ranges(mem_size) {
        let fail = |e: String| VmError::Memory(mem_size >> 20, e);
        let ptr = map_aligned(size as usize).map_err(|e| fail(e.to_string()))?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: `ptr` starts a live mapping of `size` bytes made by `map_aligned`, which
        // nothing else uses; it stays mapped until the process exits (the region does not own
        // it, and a VMM that fails here exits).
        let mapping = unsafe {
            MmapRegionBuilder::new(size as usize)
                .with_raw_mmap_pointer(ptr)
                .with_mmap_prot(prot)
                .with_mmap_flags(flags)
                .build()
        }
        .map_err(|e| fail(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| fail(format!("the region at {start:#x} does not fit")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| VmError::Memory(mem_size >> 20, e.to_string()))
}

/// Maps `size` bytes of anonymous memory at a 2 MiB-aligned address, advised for huge pages.
fn map_aligned(size: usize) -> Result<*mut u8, std::io::Error> {
    let len = size + HUGE_PAGE;
    // SAFETY: a new private anonymous mapping at an address of the kernel's choice; the result
    // is checked before use.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = raw as usize;
    let aligned = (base + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    let (head, tail) = (aligned - base, base + len - (aligned + size));
    // SAFETY: the head and tail are the parts of the mapping just made that lie outside the
    // aligned `size` bytes; nothing references them.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
        // Advice only: it changes no contents and may be refused.
        libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
    }
    Ok(aligned as *mut u8)
}

/// Creates a VM, hands it `mem` and sets up the in-kernel IO-APIC, PICs and PIT.
pub fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(|e| VmError::Kvm("create a VM", e))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| VmError::Kvm("map guest memory", kvm_ioctls::Error::new(libc::EFAULT)))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region describes a live mapping of `mem`'s, which stays mapped for as long
        // as the VM runs (both live until the process exits).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| VmError::Kvm("map guest memory", e))?;
    }
    vm.set_tss_address(KVM_TSS_ADDR as usize).map_err(|e| VmError::Kvm("place the TSS", e))?;
    vm.create_irq_chip().map_err(|e| VmError::Kvm("create the irqchip", e))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(|e| VmError::Kvm("create the PIT", e))?;
    Ok(vm)
}

/// The host virtual address ranges `(start, len)` of guest memory, for memory accounting.
pub fn host_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter()
        .filter_map(|r| {
            let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
            Some((host as u64, r.len()))
        })
        .collect()
}
