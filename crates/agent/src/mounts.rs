//! The cell's filesystem: the image is mounted read-only as the root by the kernel; the agent
//! stacks a tmpfs-backed overlay on it and makes that the root, so the workload can write
//! anywhere and every write is gone with the cell.

use std::fs;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chdir, chroot, pivot_root};

/// Where the overlay is assembled, on a tmpfs mounted at `/run` of the read-only image.
const STAGING: &str = "/run";
const UPPER: &str = "/run/cell/upper";
const WORK: &str = "/run/cell/work";
const NEW_ROOT: &str = "/run/cell/root";

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) => Ok(()),
        // Already there (the kernel mounts devtmpfs itself with DEVTMPFS_MOUNT).
        Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(format!("mount {fstype} on {target}: {e}")),
    }
}

/// Mounts /proc, /sys and /dev, and moves the root onto a writable overlay.
pub fn set_up() -> Result<(), String> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs("tmpfs", STAGING, "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    for d in [UPPER, WORK, NEW_ROOT] {
        fs::create_dir_all(d).map_err(|e| format!("create {d}: {e}"))?;
    }
    let options = format!("lowerdir=/,upperdir={UPPER},workdir={WORK}");
    mount_fs("overlay", NEW_ROOT, "overlay", MsFlags::empty(), Some(&options))?;

    // The overlay becomes `/`; the image's own root stays mounted underneath as its lower layer.
    let old = format!("{NEW_ROOT}/.old-root");
    fs::create_dir_all(&old).map_err(|e| format!("create {old}: {e}"))?;
    pivot_root(NEW_ROOT, old.as_str()).map_err(|e| format!("pivot_root: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    umount2("/.old-root", MntFlags::MNT_DETACH).map_err(|e| format!("detach old root: {e}"))?;
    let _ = fs::remove_dir("/.old-root");
    chroot(".").map_err(|e| format!("chroot: {e}"))?;

    mount_fs("proc", "/proc", "proc", nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev, None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    for dir in ["/dev/pts", "/dev/shm", "/tmp"] {
        if !Path::new(dir).exists() {
            fs::create_dir_all(dir).map_err(|e| format!("create {dir}: {e}"))?;
        }
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
