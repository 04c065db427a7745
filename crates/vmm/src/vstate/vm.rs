//! The KVM VM: guest memory, in-kernel interrupt controllers and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
    #[error("cannot allocate {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
}

/// Creates the guest memory mapping (anonymous, private, not reserved up front).
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<(GuestAddress, usize)> =
        ram_ranges(mem_size).into_iter().map(|(s, l)| (GuestAddress(s), l as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory(mem_size >> 20, e))
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
        // SAFETY: the region describes a live mapping owned by `mem`, which the caller keeps
        // alive for as long as the VM runs (both live until the process exits).
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
