//! The benchmark's peer VMM: QEMU's `microvm` machine, the minimal VMM a user could pick
//! instead of ours, booting the same kernel and image in the same test host.
//!
//! The nested host is an initramfs of static binaries, and Debian's QEMU is not static: the
//! benchmark stages a bundle (the binary, every library `ldd` names, the dynamic loader and the
//! microvm firmware) and runs it through the bundled loader. Both VMMs are timed the same way
//! from outside by `isocell-hostile time-boot`: spawn to the guest's init marker on the
//! console, and spawn to exit; the memory overhead is read from the VMM's `/proc/PID/smaps` at
//! the marker, by the same rule for both (see [`split_rss`]).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The line the guest's `peer` scenario prints on the console as init starts.
pub const INIT_MARKER: &str = "ISOCELL-AT-INIT";

/// Resident memory of a VMM process: guest memory, and everything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RssSplit {
    /// Resident KiB of the guest memory mappings.
    pub guest_kib: u64,
    /// Resident KiB of the rest: the VMM's overhead.
    pub other_kib: u64,
    /// Of the guest's resident KiB, those in transparent huge pages.
    pub guest_huge_kib: u64,
}

/// Splits the `Rss:` lines of an smaps text: anonymous mappings at least `guest_bytes` long
/// (or 1 GiB, for a guest whose memory is split around the MMIO gap below 4 GiB) hold guest
/// memory, the rest is the VMM's (its heap arenas are far smaller).
pub fn split_rss(smaps: &str, guest_bytes: u64) -> RssSplit {
    let guest_bytes = guest_bytes.min(1 << 30);
    let mut split = RssSplit { guest_kib: 0, other_kib: 0, guest_huge_kib: 0 };
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                // addr perms offset dev inode [path]: anonymous has no path or an [anon:] one.
                let path = fields.nth(4);
                let anonymous = path.is_none_or(|p| p.starts_with("[anon"));
                in_guest = anonymous && e.saturating_sub(s) >= guest_bytes;
                continue;
            }
        }
        let kib = |rest: &str| -> u64 {
            rest.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        if let Some(rest) = line.strip_prefix("AnonHugePages:") {
            if in_guest {
                split.guest_huge_kib += kib(rest);
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib = kib(rest);
            if in_guest {
                split.guest_kib += kib;
            } else {
                split.other_kib += kib;
            }
        }
    }
    split
}

/// Where Debian keeps the microvm firmware (qboot is QEMU's own; SeaBIOS's build is the
/// default `bios-microvm.bin`).
const FIRMWARE: [&str; 2] = ["/usr/share/seabios/bios-microvm.bin", "/usr/share/qemu/qboot.rom"];

/// Stages QEMU under `dir`: `bin/qemu-system-x86_64`, `lib/` with its libraries and the
/// loader, `share/` with the firmware. Returns `dir`.
pub fn stage_qemu(dir: &Path) -> Result<PathBuf, String> {
    stage_dynamic(&["qemu-system-x86_64"], dir)?;
    std::fs::create_dir_all(dir.join("share")).map_err(|e| format!("{}: {e}", dir.display()))?;
    for fw in FIRMWARE {
        let fw = Path::new(fw);
        if fw.exists() {
            copy(fw, &dir.join("share").join(fw.file_name().unwrap_or_default()))?;
        }
    }
    if !dir.join("share/bios-microvm.bin").exists() {
        return Err("the microvm firmware (seabios' bios-microvm.bin) is not installed".into());
    }
    Ok(dir.to_path_buf())
}

/// Stages dynamically linked `programs` (found on PATH) under `dir` for the nested host, whose
/// initramfs has no libraries: `bin/` with the programs, `lib/` with every library `ldd` names
/// and the loader. Run one as `dir/lib/ld-linux-x86-64.so.2 --library-path dir/lib dir/bin/NAME`.
/// QEMU for the benchmark's peer; containerd, ctr and e2fsprogs for the shim's tests.
pub fn stage_dynamic(programs: &[&str], dir: &Path) -> Result<PathBuf, String> {
    for sub in ["bin", "lib"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    for program in programs {
        let path = which(program)
            .ok_or(format!("{program} is not installed (run scripts/install-deps.sh)"))?;
        copy(&path, &dir.join("bin").join(program))?;
        let loader = stage_libraries(&path, &dir.join("lib"))?;
        if !loader {
            return Err(format!("ldd did not name the loader {LOADER} for {program}"));
        }
    }
    Ok(dir.to_path_buf())
}

/// Stages the library `name` (as `ldconfig -p` finds it) and its own libraries into `dir/lib`:
/// for what a program loads at run time rather than links (mke2fs's libarchive).
pub fn stage_library(name: &str, dir: &Path) -> Result<(), String> {
    let out = Command::new("ldconfig").arg("-p").output().map_err(|e| format!("ldconfig: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let path = text
        .lines()
        .filter(|l| l.trim_start().starts_with(&format!("{name} ")) && l.contains("x86-64"))
        .find_map(|l| l.split("=>").nth(1).map(|p| PathBuf::from(p.trim())))
        .ok_or(format!("the library {name} is not installed (run scripts/install-deps.sh)"))?;
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    copy(&path, &lib.join(name))?;
    stage_libraries(&path, &lib).map(|_| ())
}

/// Copies every library `ldd` names for `path` into `lib`; whether the loader was among them.
fn stage_libraries(path: &Path, lib: &Path) -> Result<bool, String> {
    let out = Command::new("ldd").arg(path).output().map_err(|e| format!("ldd: {e}"))?;
    if !out.status.success() {
        return Err(format!("ldd {} failed", path.display()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(missing) = text.lines().find(|l| l.contains("not found")) {
        return Err(format!("a library of {} is missing: {}", path.display(), missing.trim()));
    }
    let mut loader = false;
    for l in libraries(&text) {
        let name = l.file_name().ok_or("ldd printed a path without a name")?;
        loader |= name == LOADER;
        copy(&l, &lib.join(name))?;
    }
    Ok(loader)
}

/// The dynamic loader's name in `ldd` output and in the bundle.
const LOADER: &str = "ld-linux-x86-64.so.2";

/// The absolute paths `ldd` printed: `name => /path (addr)` and the loader's `/path (addr)`.
fn libraries(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|l| {
            let l = l.split_once("=>").map_or(l, |(_, r)| r).trim();
            let path = l.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to).map(|_| ()).map_err(|e| format!("copying {}: {e}", from.display()))
}

/// What a boot of the peer is given.
pub struct PeerBoot<'a> {
    /// The staged bundle, as the test host sees it (a scenario placeholder is fine).
    pub bundle: &'a str,
    /// The ELF kernel (booted through its PVH entry, as our VMM boots it).
    pub kernel: &'a str,
    /// The root disk, attached read-only as the first virtio-mmio block device.
    pub rootfs: &'a str,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Kernel arguments after those the peer needs for its machine.
    pub boot_args: &'a str,
}

/// The command line of a QEMU microvm boot, configured as its documentation recommends for
/// speed: KVM and the host CPU, no option ROMs, no RTC, no ACPI (so QEMU names the
/// virtio-mmio devices on the kernel command line, as ours does), console on the serial port to
/// stdout, exit on the guest's reset (a triple fault: `reboot=t`, as microvm has no i8042).
pub fn qemu_argv(b: &PeerBoot) -> Vec<String> {
    let bundle = b.bundle;
    let append =
        format!("reboot=t panic=0 pci=off nomodule console=ttyS0 root=/dev/vda ro {}", b.boot_args);
    [
        format!("{bundle}/lib/{LOADER}"),
        "--library-path".into(),
        format!("{bundle}/lib"),
        format!("{bundle}/bin/qemu-system-x86_64"),
        "-L".into(),
        format!("{bundle}/share"),
        "-M".into(),
        "microvm,acpi=off,x-option-roms=off,rtc=off".into(),
        "-accel".into(),
        "kvm".into(),
        "-cpu".into(),
        "host".into(),
        "-smp".into(),
        b.cpus.to_string(),
        "-m".into(),
        b.memory_mib.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-serial".into(),
        "stdio".into(),
        "-kernel".into(),
        b.kernel.into(),
        "-append".into(),
        append,
        "-drive".into(),
        format!("id=root,file={},format=raw,if=none,readonly=on", b.rootfs),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
    ]
    .into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn guest_memory_is_the_large_anonymous_mapping() {
        let smaps = "\
55d0c0000000-55d0c0200000 r-xp 00000000 08:01 123 /usr/bin/qemu-system-x86_64
Rss:                1500 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Rss:               20000 kB
AnonHugePages:      4096 kB
7f0008000000-7f0008100000 rw-p 00000000 00:00 0
Rss:                 300 kB
7f1000000000-7f1008000000 r--p 00000000 08:01 77 /big/file
Rss:                 100 kB
7f2000000000-7f2008200000 rw-p 00000000 00:00 0 [anon:guest]
Rss:                  50 kB
";
        let s = split_rss(smaps, 128 << 20);
        assert_eq!(s, RssSplit { guest_kib: 20050, other_kib: 1900, guest_huge_kib: 4096 });
    }

    #[test]
    fn ldd_paths_and_the_loader() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n\tlibgone.so => not found\n";
        let libs = libraries(ldd);
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn qemu_boots_the_same_kernel_and_disk() {
        let argv = qemu_argv(&PeerBoot {
            bundle: "/q",
            kernel: "/k",
            rootfs: "/r",
            cpus: 2,
            memory_mib: 128,
            boot_args: "quiet",
        });
        assert_eq!(argv[0], "/q/lib/ld-linux-x86-64.so.2");
        let after = |flag: &str| argv[argv.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(after("-kernel"), "/k");
        assert_eq!(after("-smp"), "2");
        assert!(after("-append").ends_with("root=/dev/vda ro quiet"));
        assert!(after("-drive").contains("file=/r,"));
    }
}
