//! The jail every cell's VMM runs in.
//!
//! [`JailSpec`] says exactly what one VMM may see and use: the files bind-mounted into an
//! otherwise empty root, the device nodes, the unprivileged uid/gid, rlimits, and the cgroup v2
//! leaf ([`cgroup`]) whose limits bound it. `isocell-jailer` ([`enter`]) turns a spec into a
//! confined process; [`JailSpec::surface`] turns the same spec into the published description,
//! so what is enforced and what is shown cannot drift apart.

pub mod cgroup;
pub mod enter;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The namespaces a jailed VMM gets, all new and private to it.
pub const NAMESPACES: [&str; 6] = ["mount", "pid", "ipc", "uts", "net", "cgroup"];

/// Where in the jail the cell's shared directory (config, sockets, console, report) lives.
pub const CELL_DIR: &str = "/cell";

/// Exit status of `isocell-jailer` when the jail cannot be set up (the VMM never ran). The
/// VMM's own statuses are 0-6.
pub const EXIT_JAIL_FAILED: i32 = 7;

/// One host path made visible in the jail.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BindMount {
    /// The host file or directory.
    pub host: PathBuf,
    /// Where it appears in the jail (absolute).
    pub jail: PathBuf,
    /// Writable from the jail (otherwise read-only).
    pub writable: bool,
    /// Files in it may be executed (only the VMM binary).
    pub exec: bool,
    /// What is actually mounted, when not `host` itself: an open descriptor of `isocell`
    /// (`/proc/PID/fd/N`), so the jail gets the very file that was measured even if `host`
    /// was replaced since.
    #[serde(default)]
    pub pinned: Option<PathBuf>,
}

/// A device node created in the jail, owned by the jail's uid.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceNode {
    /// Path in the jail, such as /dev/kvm.
    pub path: PathBuf,
    /// Character device major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

/// /dev/kvm: the VMM's only way to the hypervisor.
pub fn kvm_device() -> DeviceNode {
    DeviceNode { path: "/dev/kvm".into(), major: 10, minor: 232 }
}

/// /dev/urandom.
pub fn urandom_device() -> DeviceNode {
    DeviceNode { path: "/dev/urandom".into(), major: 1, minor: 9 }
}

/// Resource limits set on the VMM process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rlimits {
    /// RLIMIT_NOFILE: open files (vsock connections, disks, sockets).
    pub nofile: u64,
    /// RLIMIT_FSIZE: bytes any file it writes may reach (console log, report, writable disks).
    pub fsize: u64,
    /// RLIMIT_CORE: always 0, so guest memory never lands in a core dump.
    pub core: u64,
}

impl Default for Rlimits {
    fn default() -> Self {
        Rlimits { nofile: 256, fsize: 256 << 20, core: 0 }
    }
}

/// Everything the jailer needs to confine one VMM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JailSpec {
    /// The cell.
    pub cell_id: String,
    /// An empty host directory; the jail's root (a small tmpfs) is mounted on it, visible only
    /// inside the jail's mount namespace.
    pub root: PathBuf,
    /// The cgroup v2 leaf to join (created, limited and later removed by `isocell`).
    pub cgroup: Option<PathBuf>,
    /// The process that started the jailer (`isocell`): the jailer and the VMM die with it
    /// (the parent-death signal, which the jailer sets itself so that `isocell` can start it
    /// with `posix_spawn` rather than copy its own address space with `fork`), and the jailer
    /// refuses to start once it is gone.
    #[serde(default)]
    pub parent: Option<u32>,
    /// Unprivileged uid the VMM runs as.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Supplementary groups (none, unless the cell reads a snapshot: [`SNAPSHOT_READER_GID`]).
    #[serde(default)]
    pub groups: Vec<u32>,
    /// Host files and directories made visible.
    pub mounts: Vec<BindMount>,
    /// Device nodes created.
    pub devices: Vec<DeviceNode>,
    /// Resource limits.
    pub rlimits: Rlimits,
    /// The program and its arguments; `argv[0]` is a path in the jail.
    pub argv: Vec<String>,
}

/// A mistake in a jail spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Something in the spec is not acceptable.
    #[error("invalid jail spec: {0}")]
    Invalid(String),
}

impl JailSpec {
    /// Checks what the jailer relies on: absolute, normal jail paths that do not collide,
    /// a non-root uid/gid and something to run.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::Invalid(m));
        if self.uid == 0 || self.gid == 0 {
            return bad("the jail's uid and gid must not be 0".into());
        }
        if !self.root.is_absolute() {
            return bad(format!("root {} is not absolute", self.root.display()));
        }
        let mut seen: std::collections::BTreeSet<PathBuf> = std::collections::BTreeSet::new();
        let paths = self.mounts.iter().map(|m| &m.jail).chain(self.devices.iter().map(|d| &d.path));
        for p in paths {
            let normal = p.is_absolute()
                && p.components().skip(1).all(|c| matches!(c, std::path::Component::Normal(_)))
                && p.components().count() > 1;
            if !normal {
                return bad(format!("jail path {} must be absolute, without . or ..", p.display()));
            }
            if p.starts_with("/proc") {
                return bad(format!(
                    "jail path {} is under /proc, which the jail mounts",
                    p.display()
                ));
            }
            // A path under another would be created through that bind mount, on the host.
            if let Some(q) = seen.iter().find(|q| p.starts_with(q) || q.starts_with(p)) {
                return bad(format!("jail paths {} and {} overlap", p.display(), q.display()));
            }
            seen.insert(p.clone());
        }
        match self.argv.first() {
            Some(p) if p.starts_with('/') => Ok(()),
            _ => bad("argv[0] must be an absolute path in the jail".into()),
        }
    }

    /// Every path that exists in the jail, sorted: the directories leading to each mount and
    /// device, the mounts and devices themselves, and /proc (own processes only).
    pub fn visible_paths(&self) -> Vec<String> {
        let mut out = std::collections::BTreeSet::new();
        let proc = PathBuf::from("/proc");
        let leaves = self
            .mounts
            .iter()
            .map(|m| &m.jail)
            .chain(self.devices.iter().map(|d| &d.path))
            .chain(std::iter::once(&proc));
        for p in leaves {
            for a in p.ancestors() {
                if a != std::path::Path::new("/") {
                    out.insert(a.display().to_string());
                }
            }
        }
        out.into_iter().collect()
    }

    /// The jail as part of a cell's attack surface.
    pub fn surface(&self, cgroup_limits: Option<&cgroup::Limits>) -> Value {
        let files: Vec<Value> = self
            .mounts
            .iter()
            .map(|m| {
                // The cell's own directory differs per cell; what matters is that it is its own.
                let host = if m.jail == std::path::Path::new(CELL_DIR) {
                    json!("(this cell's own run directory)")
                } else {
                    json!(m.host)
                };
                json!({
                    "path": m.jail,
                    "host": host,
                    "access": match (m.writable, m.exec) {
                        (true, _) => "read-write",
                        (false, true) => "read-exec",
                        (false, false) => "read-only",
                    },
                })
            })
            .collect();
        let devices: Vec<Value> = self
            .devices
            .iter()
            .map(|d| json!({ "path": d.path, "char_device": format!("{}:{}", d.major, d.minor) }))
            .collect();
        json!({
            "namespaces": NAMESPACES,
            "root": "tmpfs, read-only after setup, pivot_root'ed; /proc shows the jail's own processes only",
            "visible_paths": self.visible_paths(),
            "files": files,
            "device_nodes": devices,
            "uid": self.uid,
            "gid": self.gid,
            "uid_gid_range": "one per cell in 0x70000000-0x70ffffff, never 0",
            "supplementary_groups": self.groups,
            "no_new_privs": true,
            "capabilities": [],
            "inherited_fds": ["stdin (/dev/null)", "stdout (VMM log)", "stderr (VMM log)"],
            "rlimits": self.rlimits,
            "cgroup": cgroup_limits,
            "program": self.argv,
        })
    }
}

/// The group that may read the host's snapshots (their memory and state files are
/// `root:SNAPSHOT_READER_GID`, mode 0640): a jailed VMM that restores a cell gets it as a
/// supplementary group. Just above the per-cell range of [`cell_uid`].
pub const SNAPSHOT_READER_GID: u32 = 0x7100_0000;

/// A per-cell unprivileged uid (and gid) from the cell id: 0x7000_0000 plus 24 bits of it, above
/// the ranges distributions, systemd (up to 0x6fffffff for containers) and subuid files hand out.
pub fn cell_uid(cell_id: &str) -> u32 {
    let h = cell_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    0x7000_0000 | (h as u32 & 0x00ff_ffff)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> JailSpec {
        JailSpec {
            cell_id: "abc".into(),
            root: "/run/isocell/abc/root".into(),
            cgroup: None,
            parent: None,
            uid: cell_uid("abc"),
            gid: cell_uid("abc"),
            groups: Vec::new(),
            mounts: vec![
                BindMount {
                    host: "/k".into(),
                    jail: "/boot/vmlinux".into(),
                    writable: false,
                    exec: false,
                    pinned: None,
                },
                BindMount {
                    host: "/c".into(),
                    jail: CELL_DIR.into(),
                    writable: true,
                    exec: false,
                    pinned: None,
                },
            ],
            devices: vec![kvm_device(), urandom_device()],
            rlimits: Rlimits::default(),
            argv: vec!["/isocell-vmm".into()],
        }
    }

    #[test]
    fn a_good_spec_validates_and_lists_what_is_visible() {
        let s = spec();
        s.validate().unwrap();
        assert_eq!(
            s.visible_paths(),
            ["/boot", "/boot/vmlinux", "/cell", "/dev", "/dev/kvm", "/dev/urandom", "/proc"]
        );
        let surface = s.surface(None);
        assert_eq!(surface["namespaces"].as_array().unwrap().len(), 6);
        assert_eq!(surface["files"][0]["access"], "read-only");
        assert_eq!(surface["supplementary_groups"], serde_json::json!([]));
        // A restoring VMM's extra group is part of what the surface says.
        let mut s = spec();
        s.groups.push(SNAPSHOT_READER_GID);
        assert_eq!(
            s.surface(None)["supplementary_groups"],
            serde_json::json!([SNAPSHOT_READER_GID])
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = spec();
        s.uid = 0;
        assert!(s.validate().is_err());
        let mut s = spec();
        s.mounts[0].jail = "/boot/../etc".into();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.mounts[1].jail = "/dev/kvm".into();
        assert!(s.validate().unwrap_err().to_string().contains("overlap"));
        let mut s = spec();
        s.mounts[1].jail = "/boot/vmlinux/x".into();
        assert!(s.validate().unwrap_err().to_string().contains("overlap"));
        let mut s = spec();
        s.mounts[1].jail = "/proc/x".into();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.argv = vec!["vmm".into()];
        assert!(s.validate().is_err());
    }

    #[test]
    fn cell_uids_are_unprivileged_and_spread() {
        let a = cell_uid("0123456789ab");
        let b = cell_uid("0123456789ac");
        assert_ne!(a, b);
        assert!((0x7000_0000..0x7100_0000).contains(&a) && b >= 0x7000_0000);
    }
}
