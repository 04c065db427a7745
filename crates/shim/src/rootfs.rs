//! The root containerd's snapshotter prepares: a list of mounts (a bind of the native
//! snapshotter's directory, an overlay of the overlayfs snapshotter's layers) that the shim
//! mounts on the bundle's `rootfs` to read it, and must unmount before containerd removes the
//! bundle.

use std::path::Path;

/// One mount from containerd's `CreateTaskRequest.rootfs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootMount {
    /// File system type (`bind`, `overlay`, ...).
    pub kind: String,
    /// Source.
    pub source: String,
    /// Options, as mount(8) takes them.
    pub options: Vec<String>,
}

/// Mounts `mounts` in order on `target`.
pub fn mount_all(mounts: &[RootMount], target: &Path) -> Result<(), String> {
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = containerd_shim::mount::mount_rootfs(
            Some(m.kind.as_str()).filter(|k| !k.is_empty()),
            Some(m.source.as_str()).filter(|s| !s.is_empty()),
            &m.options,
            target,
        ) {
            if i > 0 {
                unmount(target);
            }
            return Err(format!(
                "mounting the container's root ({} from {}) on {}: {e}",
                m.kind,
                m.source,
                target.display()
            ));
        }
    }
    Ok(())
}

/// Unmounts everything on and under `target` (nothing mounted is fine).
pub fn unmount(target: &Path) {
    if let Some(t) = target.to_str() {
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(t), libc::MNT_DETACH) {
            log::warn!("unmounting {t}: {e}");
        }
    }
}
