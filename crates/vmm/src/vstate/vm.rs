//! The KVM VM: guest memory, in-kernel interrupt controllers and PIT.

use std::fs::File;
use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
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
/// pages are read from it only when first touched. Each 2 MiB stretch the file has no data in
/// (a hole: memory the saved guest had never touched) is fresh anonymous memory instead, laid
/// out as [`create_guest_memory`] lays it out, so the restored guest's new allocations get
/// huge pages as a booted guest's do: a private file mapping is mapped and copied 4 KiB at a
/// time, and under nested emulation each of those faults cost more than the page.
pub fn guest_memory_from_file(mem_size: u64, file: File) -> Result<GuestMemoryMmap, VmError> {
    let err = |e: String| VmError::SnapshotMemory(e);
    let needed: u64 = ram_ranges(mem_size).iter().map(|(_, l)| *l).sum();
    let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    if len != needed {
        return Err(err(format!("the file holds {len} bytes, the VM has {needed}")));
    }
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, size) in ram_ranges(mem_size) {
        let ptr = map_aligned(size as usize).map_err(|e| err(e.to_string()))?;
        for (at, len) in data_stretches(&file, offset, size) {
            // SAFETY: [ptr + at, ptr + at + len) lies inside the live anonymous mapping of
            // `size` bytes just made, which nothing references yet; MAP_FIXED replaces those
            // pages with a private mapping of the file at a page-aligned offset (2 MiB
            // multiples from a region start that is one too). The result is checked.
            let mapped = unsafe {
                libc::mmap(
                    ptr.add(at as usize).cast(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    libc::off_t::try_from(offset + at).map_err(|e| err(e.to_string()))?,
                )
            };
            if mapped == libc::MAP_FAILED {
                return Err(err(format!(
                    "cannot map the file: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        // SAFETY: `ptr` starts a live mapping of `size` bytes made above (anonymous, with the
        // file mapped over parts of it), which nothing else uses; it stays mapped until the
        // process exits.
        let mapping = unsafe {
            MmapRegionBuilder::new(size as usize)
                .with_raw_mmap_pointer(ptr)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
        }
        .map_err(|e| err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| err(format!("region at {start:#x} does not fit")))?;
        regions.push(region);
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))
}

/// The stretches `(start, len)`, relative to `base`, of the `size` bytes of `file` at `base`
/// that hold data, in whole 2 MiB steps (the last one may be shorter), adjacent ones merged.
/// A file system that cannot say where its holes are reports data everywhere: all of it is
/// then mapped from the file, which is only slower.
fn data_stretches(file: &File, base: u64, size: u64) -> Vec<(u64, u64)> {
    let step = HUGE_PAGE as u64;
    let mut stretches: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    while at < size {
        let len = step.min(size - at);
        // The first data at or after this stretch's start; none left (ENXIO) ends the search.
        let next = match next_data(file, base + at) {
            Some(pos) => pos,
            None => break,
        };
        if next >= base + at + len {
            // A hole through to `next`: skip to the 2 MiB step that holds it.
            at = (next - base) / step * step;
            continue;
        }
        match stretches.last_mut() {
            Some((s, l)) if *s + *l == at => *l += len,
            _ => stretches.push((at, len)),
        }
        at += len;
    }
    stretches
}

/// `lseek(SEEK_DATA)`: where the first data at or after `from` is; `None` if there is none.
/// Any other failure counts as data at `from`.
fn next_data(file: &File, from: u64) -> Option<u64> {
    let Ok(from_off) = libc::off_t::try_from(from) else {
        return None;
    };
    // SAFETY: lseek on an open descriptor; it reads and writes no memory of ours.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), from_off, libc::SEEK_DATA) };
    if pos < 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => None,
            _ => Some(from),
        };
    }
    Some(pos as u64)
}

/// Writes every region of guest memory to `out`, back to back, leaving a hole wherever a
/// 4 KiB page is all zeros (memory the guest never touched: most of it in a snapshot taken at
/// the agent's hello). The file reads the same as a full copy and takes a fraction of the
/// disk; [`guest_memory_from_file`] maps its holes as fresh memory.
pub fn write_memory(mem: &GuestMemoryMmap, out: &mut File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    const BATCH: usize = 1 << 20;
    let mut offset = 0u64;
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH);
    // File offset of the batch's first byte.
    let mut batch_at = 0u64;
    let mut page = [0u8; PAGE];
    for region in mem.iter() {
        let len = region.len() as usize;
        let slice = region
            .get_slice(vm_memory::MemoryRegionAddress(0), len)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut at = 0usize;
        while at < len {
            let n = PAGE.min(len - at);
            let part = slice.subslice(at, n).map_err(|e| std::io::Error::other(e.to_string()))?;
            part.copy_to(&mut page[..n]);
            let page_at = offset + at as u64;
            let zero = page[..n].iter().all(|b| *b == 0);
            // A zero page, a gap or a full batch ends the batch.
            if !batch.is_empty()
                && (zero || batch_at + batch.len() as u64 != page_at || batch.len() >= BATCH)
            {
                out.write_all_at(&batch, batch_at)?;
                batch.clear();
            }
            if !zero {
                if batch.is_empty() {
                    batch_at = page_at;
                }
                batch.extend_from_slice(&page[..n]);
            }
            at += n;
        }
        offset += len as u64;
    }
    if !batch.is_empty() {
        out.write_all_at(&batch, batch_at)?;
    }
    // The length of all of memory, however much of its end is a hole.
    out.set_len(offset)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{Seek, SeekFrom};

    use vm_memory::Bytes;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A scratch file in a directory that is removed when the returned guard drops.
    fn scratch_file(name: &str) -> (tempfile::TempDir, std::path::PathBuf, File) {
        let dir = tempfile::Builder::new().prefix("isocell-vm-test-").tempdir().unwrap();
        let path = dir.path().join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (dir, path, file)
    }

    /// Data at 1 MiB, a page at the very end of the third 2 MiB step, nothing in the rest.
    fn guest_with_data(size: u64) -> GuestMemoryMmap {
        let mem = create_guest_memory(size).unwrap();
        mem.write_slice(&[0xab; 5000], GuestAddress(MIB)).unwrap();
        mem.write_slice(&[0x5a; 4096], GuestAddress(6 * MIB - 4096)).unwrap();
        mem
    }

    #[test]
    fn a_saved_memory_file_has_holes_where_memory_was_zero_and_restores_the_same() {
        let size = 12 * MIB;
        let mem = guest_with_data(size);
        let (_dir, path, mut file) = scratch_file("memory");
        write_memory(&mem, &mut file).unwrap();
        assert_eq!(file.metadata().unwrap().len(), size);
        // Only the pages that hold data take disk blocks (three pages; a file system may
        // allocate around them, but not the whole file).
        use std::os::unix::fs::MetadataExt;
        let on_disk = file.metadata().unwrap().blocks() * 512;
        assert!(on_disk < size / 2, "{on_disk} bytes on disk for three pages of data");

        let restored = guest_memory_from_file(size, File::open(&path).unwrap()).unwrap();
        let mut read = vec![0u8; size as usize];
        restored.read_slice(&mut read, GuestAddress(0)).unwrap();
        let mut want = vec![0u8; size as usize];
        mem.read_slice(&mut want, GuestAddress(0)).unwrap();
        assert!(read == want, "restored memory differs from what was saved");

        // The guest's writes, to file-backed and to fresh stretches alike, never reach the file.
        restored.write_slice(&[0xff; 64], GuestAddress(MIB)).unwrap();
        restored.write_slice(&[0xff; 64], GuestAddress(10 * MIB)).unwrap();
        let mut again = Vec::new();
        let mut f = File::open(&path).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        std::io::Read::read_to_end(&mut f, &mut again).unwrap();
        assert!(again == want, "a write to restored memory changed the snapshot file");
    }

    #[test]
    fn only_the_2_mib_steps_with_data_are_mapped_from_the_file() {
        let size = 12 * MIB;
        let mem = guest_with_data(size);
        let (_dir, _, mut file) = scratch_file("stretches");
        write_memory(&mem, &mut file).unwrap();
        // Data in the first step (at 1 MiB) and in the third (ending at 6 MiB): the second,
        // and everything from 6 MiB on, are holes.
        assert_eq!(data_stretches(&file, 0, size), vec![(0, 2 * MIB), (4 * MIB, 2 * MIB)]);
        // Relative to a base, and with a last step shorter than 2 MiB.
        assert_eq!(data_stretches(&file, 4 * MIB, 3 * MIB), vec![(0, 2 * MIB)]);
        assert_eq!(data_stretches(&file, 6 * MIB, 5 * MIB), vec![]);
    }

    #[test]
    fn a_file_of_the_wrong_length_is_refused() {
        let (_dir, _, file) = scratch_file("short");
        file.set_len(4 * MIB).unwrap();
        let e = guest_memory_from_file(8 * MIB, file).unwrap_err();
        assert!(e.to_string().contains("4194304 bytes"), "{e}");
    }
}
