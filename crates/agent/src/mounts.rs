//! The cell's filesystem. The agent comes from the host: the VMM boots the kernel with an
//! initramfs that holds only the agent, as `/init`, and the kernel command line names the cell
//! image (`isocell.root=DEVICE`, a read-only virtio disk or the dm-verity device over it). The
//! agent mounts the image read-only, stacks a tmpfs-backed overlay on it and switches into
//! that, so the workload can write anywhere and every write is gone with the cell. Nothing of
//! the image runs before the workload: its own `/sbin/init` is neither needed nor trusted.
//!
//! Images built before the initramfs still boot the old way: the kernel mounts the image as
//! the root (`root=/dev/vda ro`) and runs the agent as its `/sbin/init`.

use std::fs;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chdir, chroot, pivot_root};

use crate::boot::{self, BootArgs};

/// Where the overlay is assembled, on a tmpfs mounted at `/run` of the initramfs (or of the
/// read-only image, the old way).
const STAGING: &str = "/run";
const LOWER: &str = "/run/cell/lower";
const UPPER: &str = "/run/cell/upper";
const WORK: &str = "/run/cell/work";
const NEW_ROOT: &str = "/run/cell/root";

/// `statfs` type of ramfs, the kernel's rootfs without tmpfs (linux/magic.h).
const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;

/// How long the image's device may take to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// Read-ahead on the cell image, in 512-byte sectors: 4 MiB, against the kernel's 128 KiB.
/// Every virtio request costs a round trip through the VMM (under emulation, milliseconds)
/// whatever it carries, and the image is read-only and local: a command's first run of a
/// 2 MB binary took about twenty requests at the default. Files shorter than the window are
/// read whole and no further.
const IMAGE_READ_AHEAD_SECTORS: libc::c_ulong = 8192;

/// `BLKRASET`: `_IO(0x12, 98)`, sets a block device's read-ahead in sectors.
const BLKRASET: libc::c_ulong = 0x1262;

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) => Ok(()),
        // Already there (the kernel mounts devtmpfs itself when it mounts the root).
        Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(format!("mount {fstype} on {target}: {}", describe(e))),
    }
}

/// An errno as people read it ("Input/output error").
fn describe(e: Errno) -> String {
    let text = std::io::Error::from_raw_os_error(e as i32).to_string();
    match text.split_once(" (os error") {
        Some((head, _)) => head.to_owned(),
        None => text,
    }
}

/// Makes `dir` a directory: created if the image lacks it (an image need not have /proc,
/// /dev or /tmp), and replacing anything else there (a link, a file) rather than following it.
/// `/tmp` is made world-writable and sticky.
fn ensure_dir(dir: &str) -> Result<(), String> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => fs::remove_file(dir).map_err(|e| format!("replace {dir}: {e}"))?,
        Err(_) => {}
    }
    fs::create_dir_all(dir).map_err(|e| format!("create {dir}: {e}"))?;
    if dir == "/tmp" {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o1777))
            .map_err(|e| format!("chmod {dir}: {e}"))?;
    }
    Ok(())
}

/// Makes `path` read-only for everything in the cell, as a container runtime mounts a
/// read-only volume: a bind mount of it over itself, remounted read-only (and without set-id
/// or device files). A command without `CAP_SYS_ADMIN` cannot undo it. A symbolic link is
/// followed inside the cell.
pub fn make_read_only(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path}: paths in the cell must be absolute"));
    }
    // A link in the image (`/etc/resolv.conf` often is one) is followed, inside the cell, as
    // runc resolves a mount destination inside the container's root.
    let resolved = fs::canonicalize(path).map_err(|e| format!("{path}: {e}"))?;
    let path = resolved.to_str().ok_or_else(|| format!("{path}: not UTF-8 once resolved"))?;
    let none: Option<&str> = None;
    mount(Some(path), path, none, MsFlags::MS_BIND | MsFlags::MS_REC, none)
        .map_err(|e| format!("bind {path} over itself: {}", describe(e)))?;
    let flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    mount(none, path, none, flags, none).map_err(|e| {
        // Not left half done: a writable bind mount would look like success.
        let _ = umount2(path, MntFlags::MNT_DETACH);
        format!("remount {path} read-only: {}", describe(e))
    })
}

/// The first thing PID 1 does: /dev, then a console on fds 0-2 if the kernel could not open
/// one, so that what the agent says reaches the serial console.
pub fn early() {
    let _ = ensure_dir("/dev");
    let _ = mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"));
    reopen_console();
}

/// Points whichever of fds 0, 1 and 2 is closed at /dev/console.
fn reopen_console() {
    // SAFETY: F_GETFD only asks about a descriptor number; it touches no memory.
    let closed: Vec<i32> =
        (0..3).filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } == -1).collect();
    if closed.is_empty() {
        return;
    }
    // Not close-on-exec: the descriptors are the agent's standard streams.
    let Ok(console) = fs::OpenOptions::new().read(true).write(true).open("/dev/console") else {
        return;
    };
    let console = std::os::fd::OwnedFd::from(console);
    for fd in &closed {
        if *fd != console.as_raw_fd() {
            // SAFETY: dup2 onto a descriptor number that is closed; no Rust object owns it.
            unsafe { libc::dup2(console.as_raw_fd(), *fd) };
        }
    }
    if closed.contains(&console.as_raw_fd()) {
        // It took one of the closed numbers itself: keep it open as that stream.
        std::mem::forget(console);
    }
}

/// Mounts /proc and reads the kernel command line (empty if it cannot).
pub fn kernel_cmdline() -> String {
    let _ = ensure_dir("/proc");
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let _ = mount_fs("proc", "/proc", "proc", nodev, None);
    fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

/// Puts the cell's root in place (from `isocell.root=`, or the old way) and mounts /proc,
/// /sys, /dev, /dev/pts, /dev/shm and /tmp in it.
pub fn set_up(args: &BootArgs) -> Result<(), String> {
    match &args.root {
        Some(device) => switch_to_image(device, &args.root_fstype)?,
        None => overlay_kernel_root()?,
    }
    pseudo_filesystems()
}

/// The tmpfs at [`STAGING`] with the overlay's directories.
fn staging() -> Result<(), String> {
    ensure_dir(STAGING)?;
    mount_fs("tmpfs", STAGING, "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    for d in [LOWER, UPPER, WORK, NEW_ROOT] {
        fs::create_dir_all(d).map_err(|e| format!("create {d}: {e}"))?;
    }
    Ok(())
}

fn overlay(lower: &str) -> Result<(), String> {
    let options = format!("lowerdir={lower},upperdir={UPPER},workdir={WORK}");
    mount_fs("overlay", NEW_ROOT, "overlay", MsFlags::empty(), Some(&options))
}

/// From the initramfs: mounts the image, builds the overlay on it and makes that the root,
/// switch_root style (the initramfs itself cannot be pivoted away; it stays underneath).
fn switch_to_image(device: &str, fstype: &str) -> Result<(), String> {
    if !boot::valid_device(device) {
        return Err(format!(
            "isocell.root={device:?} is not a device path under /dev: there is no cell image to boot"
        ));
    }
    staging()?;
    wait_for(device, fstype)?;
    mount(Some(device), LOWER, Some(fstype), MsFlags::MS_RDONLY, None::<&str>)
        .map_err(|e| image_error(device, fstype, e))?;
    if let Err(e) = set_read_ahead(device, IMAGE_READ_AHEAD_SECTORS) {
        // Only slower: the kernel's default stays.
        crate::log(&format!("cannot set read-ahead on {device}: {e}"));
    }
    overlay(LOWER)?;
    chdir(NEW_ROOT).map_err(|e| format!("chdir {NEW_ROOT}: {}", describe(e)))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move the cell's root to /: {}", describe(e)))?;
    chroot(".").map_err(|e| format!("chroot: {}", describe(e)))?;
    chdir("/").map_err(|e| format!("chdir /: {}", describe(e)))?;
    Ok(())
}

/// Waits for the image's device node, for at most [`DEVICE_WAIT`].
fn wait_for(device: &str, fstype: &str) -> Result<(), String> {
    let start = Instant::now();
    while fs::metadata(device).is_err() {
        if start.elapsed() > DEVICE_WAIT {
            return Err(format!(
                "cannot mount the cell image {device} ({fstype}, read-only): the device did not \
                 appear within {} s",
                DEVICE_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Sets the read-ahead of the block device at `device` (and so of the file system on it).
fn set_read_ahead(device: &str, sectors: libc::c_ulong) -> std::io::Result<()> {
    let dev = fs::File::open(device)?;
    // SAFETY: BLKRASET takes its argument by value and writes no memory of ours; `dev` is an
    // open descriptor for the whole call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), BLKRASET, sectors) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The one line that says why the image could not be mounted.
fn image_error(device: &str, fstype: &str, e: Errno) -> String {
    let why = match e {
        Errno::EIO => "; the image failed its integrity check or is damaged".to_owned(),
        Errno::EINVAL | Errno::EUCLEAN => format!("; it does not hold a valid {fstype} filesystem"),
        Errno::ENODEV => format!("; the cell kernel has no {fstype} filesystem"),
        _ => String::new(),
    };
    format!("cannot mount the cell image {device} ({fstype}, read-only): {}{why}", describe(e))
}

/// The old way: the kernel mounted the image read-only as `/`; the overlay goes over it and
/// is pivoted to.
fn overlay_kernel_root() -> Result<(), String> {
    if started_from_initramfs() {
        return Err("started from an initramfs, but the kernel command line names no \
                    isocell.root=DEVICE: there is no cell image to boot"
            .into());
    }
    staging()?;
    overlay("/")?;
    // The overlay becomes `/`; the image's own root stays mounted underneath as its lower layer.
    let old = format!("{NEW_ROOT}/.old-root");
    fs::create_dir_all(&old).map_err(|e| format!("create {old}: {e}"))?;
    pivot_root(NEW_ROOT, old.as_str()).map_err(|e| format!("pivot_root: {}", describe(e)))?;
    chdir("/").map_err(|e| format!("chdir /: {}", describe(e)))?;
    umount2("/.old-root", MntFlags::MNT_DETACH)
        .map_err(|e| format!("detach old root: {}", describe(e)))?;
    let _ = fs::remove_dir("/.old-root");
    chroot(".").map_err(|e| format!("chroot: {}", describe(e)))?;
    Ok(())
}

/// Whether `/` is the kernel's rootfs (an initramfs), which cannot be pivoted away.
fn started_from_initramfs() -> bool {
    nix::sys::statfs::statfs("/").is_ok_and(|s| {
        let kind = s.filesystem_type().0;
        kind == RAMFS_MAGIC || kind == libc::TMPFS_MAGIC
    })
}

/// /proc, /sys, /dev and the rest in the new root, creating the directories the image lacks.
fn pseudo_filesystems() -> Result<(), String> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for dir in ["/proc", "/sys", "/dev"] {
        ensure_dir(dir)?;
    }
    mount_fs("proc", "/proc", "proc", nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev, None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    for dir in ["/dev/pts", "/dev/shm", "/tmp"] {
        ensure_dir(dir)?;
    }
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    )?;
    mount_fs(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Takes the test's bind mount off again, even when an assertion fails.
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            while umount2(self.0.as_str(), MntFlags::MNT_DETACH).is_ok() {}
        }
    }

    // Runs as root, as the agent does (and as the project's tests do).
    #[test]
    fn a_read_only_volume_refuses_writes_even_through_a_link() {
        let dir = std::env::temp_dir().join(format!("isocell-ro-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/key"), "secret").unwrap();
        let path = dir.to_str().unwrap().to_owned();
        {
            let _guard = Unmount(path.clone());
            make_read_only(&path).unwrap();
            let erofs = |r: std::io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::EROFS);
            assert!(erofs(fs::write(dir.join("sub/key"), "changed")));
            assert!(erofs(fs::write(dir.join("new"), "x")));
            assert!(erofs(fs::remove_file(dir.join("sub/key"))));
            assert_eq!(fs::read_to_string(dir.join("sub/key")).unwrap(), "secret");
        }
        fs::write(dir.join("sub/key"), "writable again once unmounted").unwrap();
        // Through a link: what it points to becomes read-only.
        std::os::unix::fs::symlink(dir.join("sub"), dir.with_extension("link")).unwrap();
        let link = dir.with_extension("link").to_str().unwrap().to_owned();
        {
            let _guard = Unmount(dir.join("sub").to_str().unwrap().to_owned());
            make_read_only(&link).unwrap();
            let refused = fs::write(dir.join("sub/key"), "x").unwrap_err();
            assert_eq!(refused.raw_os_error(), Some(libc::EROFS));
        }
        assert!(make_read_only("relative/path").unwrap_err().contains("absolute"));
        assert!(make_read_only(&format!("{path}/missing")).is_err());
        fs::remove_file(&link).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_refused_block_reads_as_an_integrity_failure() {
        assert_eq!(
            image_error("/dev/dm-0", "ext4", Errno::EIO),
            "cannot mount the cell image /dev/dm-0 (ext4, read-only): Input/output error; the \
             image failed its integrity check or is damaged"
        );
        assert!(image_error("/dev/vda", "ext4", Errno::EINVAL).ends_with("valid ext4 filesystem"));
        assert_eq!(describe(Errno::ENOENT), "No such file or directory");
    }
}
