//! The Linux x86 boot protocol: load the kernel (ELF `vmlinux` or `bzImage`) and an optional
//! initrd, write the command line and the zero page with its e820 memory map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    ram_ranges, CMDLINE_ADDR, CMDLINE_MAX_SIZE, EBDA_START, HIMEM_START, MMIO_GAP_START,
    ZERO_PAGE_ADDR,
};

/// Failure to load or describe the guest's boot payload.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be read.
    #[error("could not read the kernel image")]
    ReadKernel(#[source] std::io::Error),
    /// The kernel is neither an ELF vmlinux nor a bzImage.
    #[error(
        "the kernel is neither an ELF vmlinux nor a bzImage (no ELF magic, no 'HdrS' at 0x202)"
    )]
    UnknownKernelFormat,
    /// linux-loader refused the kernel.
    #[error("could not load the kernel into guest memory")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// The initrd could not be read or does not fit.
    #[error("could not load the initrd: {0}")]
    Initrd(String),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The zero page could not be written.
    #[error("could not write the boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// The two kernel image formats the VMM boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelFormat {
    /// Uncompressed ELF `vmlinux`.
    Elf,
    /// Compressed `bzImage` with a real-mode setup header.
    BzImage,
}

impl KernelFormat {
    /// Tells the format from the file's magic numbers.
    pub fn detect(file: &mut File) -> Result<Self, BootError> {
        let mut head = [0u8; 0x206];
        file.seek(SeekFrom::Start(0)).map_err(BootError::ReadKernel)?;
        let n = read_up_to(file, &mut head).map_err(BootError::ReadKernel)?;
        if n >= 4 && head[..4] == *b"\x7fELF" {
            return Ok(KernelFormat::Elf);
        }
        if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
            return Ok(KernelFormat::BzImage);
        }
        Err(BootError::UnknownKernelFormat)
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// A kernel in guest memory.
#[derive(Debug)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: u64,
    /// First guest address past the kernel image.
    pub end: u64,
    /// The bzImage's own setup header, to be completed in the zero page.
    setup_header: Option<setup_header>,
}

/// Loads the kernel at 1 MiB.
pub fn load_kernel(mem: &GuestMemoryMmap, file: &mut File) -> Result<LoadedKernel, BootError> {
    let format = KernelFormat::detect(file)?;
    let himem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, file, himem),
        KernelFormat::BzImage => BzImage::load(mem, None, file, himem),
    }
    .map_err(BootError::LoadKernel)?;
    let entry = match format {
        KernelFormat::Elf => result.kernel_load.0,
        // The 64-bit entry point of a bzImage is 0x200 past its protected-mode code.
        KernelFormat::BzImage => result.kernel_load.0 + 0x200,
    };
    Ok(LoadedKernel {
        entry,
        end: result.kernel_load.0.saturating_add(result.kernel_end),
        setup_header: result.setup_header,
    })
}

/// Where the initrd sits: `(address, size)`.
pub type InitrdPlacement = (u64, u64);

/// Loads the initrd as high as the kernel allows in low memory, page aligned, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    file: &mut File,
) -> Result<InitrdPlacement, BootError> {
    let size = file.metadata().map_err(|e| BootError::Initrd(e.to_string()))?.len();
    let addr_max = match kernel.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        _ => 0x7fff_ffff,
    };
    let top = mem_size.min(MMIO_GAP_START).min(addr_max + 1);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel.end)
        .ok_or_else(|| {
            BootError::Initrd(format!(
                "{size} bytes do not fit between the kernel (ends at {:#x}) and {top:#x}; give the cell more memory",
                kernel.end
            ))
        })?;
    file.seek(SeekFrom::Start(0)).map_err(|e| BootError::Initrd(e.to_string()))?;
    let count = usize::try_from(size).map_err(|e| BootError::Initrd(e.to_string()))?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, count)
        .map_err(|e| BootError::Initrd(e.to_string()))?;
    Ok((addr, size))
}

/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// e820 type of ACPI tables (reclaimable once the kernel has read them).
const E820_ACPI: u32 = 3;

/// Writes the command line and the zero page (setup header, initrd, e820 map and, when the VM
/// has ACPI tables, where they are: `acpi` is their `(start, length)`, the RSDP at the start).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<InitrdPlacement>,
    acpi: Option<(u64, u64)>,
) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len =
        cmdline.as_cstring().map_err(|e| BootError::Cmdline(e.to_string()))?.as_bytes().len();

    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    } else {
        params.hdr.kernel_alignment = 0x100_0000;
    }
    params.hdr.type_of_loader = 0xff; // "undefined" boot loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = vec![(0, EBDA_START, E820_RAM)];
    if let Some((start, len)) = acpi {
        e820.push((start, len, E820_ACPI));
        params.acpi_rsdp_addr = start;
    }
    for (start, size) in ram_ranges(mem_size) {
        if start == 0 {
            e820.push((HIMEM_START, size - HIMEM_START, E820_RAM));
        } else {
            e820.push((start, size, E820_RAM));
        }
    }
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr: *addr, size: *size, r#type: *kind };
    }
    params.e820_entries = e820.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(BootError::BootParams)
}

/// A command line with room for the boot protocol's maximum.
pub fn new_cmdline() -> Cmdline {
    // Infallible for a non-zero capacity.
    Cmdline::new(CMDLINE_MAX_SIZE).unwrap_or_else(|_| unreachable!("non-zero capacity"))
}

/// Reads the zero page back (for tests and diagnostics).
pub fn read_boot_params(mem: &GuestMemoryMmap) -> Option<boot_params> {
    mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;

    use super::*;

    #[test]
    fn detects_formats() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("isocell-kfmt-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(b"\x7fELF\x02\x01").unwrap();
        let mut f = File::open(&path).unwrap();
        assert_eq!(KernelFormat::detect(&mut f).unwrap(), KernelFormat::Elf);

        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&path, &bz).unwrap();
        let mut f = File::open(&path).unwrap();
        assert_eq!(KernelFormat::detect(&mut f).unwrap(), KernelFormat::BzImage);

        std::fs::write(&path, b"#!/bin/sh\necho not a kernel\n").unwrap();
        let mut f = File::open(&path).unwrap();
        assert!(matches!(KernelFormat::detect(&mut f), Err(BootError::UnknownKernelFormat)));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn zero_page_has_e820_and_cmdline() {
        let size = 64u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let kernel = LoadedKernel { entry: HIMEM_START, end: 2 << 20, setup_header: None };
        let mut cmdline = new_cmdline();
        cmdline.insert_str("console=ttyS0").unwrap();
        let acpi = Some((0xe_0000, 0x300));
        write_boot_params(&mem, size, &kernel, &cmdline, Some((32 << 20, 4096)), acpi).unwrap();
        let p = read_boot_params(&mem).unwrap();
        assert_eq!(p.e820_entries, 3);
        let (a1, s1, t1) = (p.e820_table[1].addr, p.e820_table[1].size, p.e820_table[1].r#type);
        assert_eq!((a1, s1, t1), (0xe_0000, 0x300, E820_ACPI));
        let (a2, s2) = (p.e820_table[2].addr, p.e820_table[2].size);
        assert_eq!((a2, s2), (HIMEM_START, size - HIMEM_START));
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, 0xe_0000);
        let (ptr, len, rd) = (p.hdr.cmd_line_ptr, p.hdr.cmdline_size, p.hdr.ramdisk_image);
        assert_eq!((ptr as u64, len, rd), (CMDLINE_ADDR, 13, 32 << 20));
    }
}
