//! The configuration of one microVM, as the VMM accepts it (JSON file or CLI flags).

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Fewest vCPUs a cell may have.
pub const MIN_VCPUS: u8 = 1;
/// Most vCPUs a cell may have (the cell kernel is built with `NR_CPUS=32`).
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest memory, in MiB, that the cell kernel boots in.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Largest guest memory, in MiB, the VMM accepts before even looking at the host (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most block devices per cell.
pub const MAX_DRIVES: usize = 8;
/// Longest extra kernel command line, in bytes (the boot protocol allows 2 KiB in all).
pub const MAX_BOOT_ARGS_LEN: usize = 1024;
/// Longest vsock socket path: `sun_path` holds 108 bytes, and guest-initiated connections use
/// `PATH_PORT` (up to 11 more bytes).
pub const MAX_VSOCK_PATH_LEN: usize = 96;
/// Guest-physical address of the boot-timer register: the guest writes [`BOOT_TIMER_MAGIC`]
/// there once its init is running, and the VMM records the time.
pub const BOOT_TIMER_ADDR: u64 = 0xd000_0000;
/// The byte that marks "init is running" on the boot timer.
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// The host's vsock context id, as the guest addresses it.
pub const VSOCK_HOST_CID: u64 = 2;

/// Everything needed to build and boot one microVM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs, 1 to 32.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Guest kernel: an uncompressed ELF `vmlinux` or a `bzImage`.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended after the ones the VMM sets.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot_args: String,
    /// Where the guest's serial console goes.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Block devices, in the order the guest sees them (`/dev/vda`, `/dev/vdb`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveConfig>,
    /// Whether the guest gets a virtio-rng entropy device.
    #[serde(default = "default_true")]
    pub rng: bool,
    /// Stop the VM after this many seconds of wall-clock time (none: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_secs: Option<u64>,
    /// A virtio-vsock device, with its host side as Unix sockets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
}

/// A virtio-vsock device whose host side is Unix sockets ("hybrid vsock"): the host connects to
/// `uds_path` and writes `CONNECT PORT\n` to reach guest port PORT; a guest connection to host
/// port P reaches the socket listening at `uds_path` + `_P`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more; 0-2 are reserved).
    pub guest_cid: u64,
    /// Unix socket the VMM listens on for host-initiated connections; must not exist yet.
    pub uds_path: PathBuf,
}

/// Where the 8250 serial console's output goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ConsoleConfig {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded; the kernel is also told not to use a serial console, which boots faster.
    Off,
}

/// One virtio-blk device backed by a raw image file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Stable name of the device (letters, digits, `-` and `_`).
    pub id: String,
    /// Raw disk image on the host.
    pub path: PathBuf,
    /// The guest may not write (the device offers `VIRTIO_BLK_F_RO` and refuses writes).
    #[serde(default)]
    pub read_only: bool,
    /// This drive is the guest's root filesystem (`root=/dev/vdX`).
    #[serde(default)]
    pub root: bool,
    /// Where the device sits; chosen by the VMM when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<MmioPlacement>,
}

/// A fixed MMIO window and interrupt line for a virtio-mmio device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmioPlacement {
    /// Guest-physical base address of the device's 4 KiB register window.
    pub mmio_base: u64,
    /// Legacy IRQ line (IO-APIC pin).
    pub irq: u32,
}

/// Why a [`VmConfig`] was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmConfigError {
    /// vCPU count out of range.
    #[error("vcpus is {0}: a cell has between {MIN_VCPUS} and {MAX_VCPUS} vCPUs")]
    VcpuCount(u64),
    /// Memory size out of range.
    #[error(
        "memory_mib is {0}: guest memory must be between {MIN_MEMORY_MIB} MiB and {MAX_MEMORY_MIB} MiB"
    )]
    MemorySize(u64),
    /// No kernel path.
    #[error("kernel is empty: give the path of a vmlinux or bzImage (see guest/build-kernel.sh)")]
    NoKernel,
    /// Too many drives.
    #[error("{0} drives configured: a cell has at most {MAX_DRIVES}")]
    TooManyDrives(usize),
    /// A drive id is empty or has characters other than letters, digits, `-`, `_`.
    #[error("drive id {0:?} is invalid: use 1-32 letters, digits, '-' or '_'")]
    DriveId(String),
    /// Two drives share an id.
    #[error("drive id {0:?} is used twice: drive ids must be unique")]
    DuplicateDriveId(String),
    /// A drive has no path.
    #[error("drive {0:?} has an empty path")]
    DrivePath(String),
    /// More than one drive claims to be the root.
    #[error("drives {0:?} and {1:?} are both marked root: at most one drive is the root")]
    TwoRoots(String, String),
    /// The extra command line is too long or has characters the kernel cannot take.
    #[error("boot_args is invalid: {0}")]
    BootArgs(&'static str),
    /// The vsock context id is reserved or out of range.
    #[error("vsock guest_cid is {0}: use a number from 3 to 4294967294")]
    VsockCid(u64),
    /// The vsock socket path is empty or too long for a Unix socket.
    #[error("vsock uds_path {0:?} must be a non-empty path of at most {MAX_VSOCK_PATH_LEN} bytes")]
    VsockPath(PathBuf),
    /// Lifetime limit of zero.
    #[error("max_lifetime_secs is 0: omit it for no limit, or give a positive number of seconds")]
    ZeroLifetime,
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory_mib() -> u64 {
    128
}

fn default_true() -> bool {
    true
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            kernel: kernel.into(),
            initrd: None,
            boot_args: String::new(),
            console: ConsoleConfig::default(),
            drives: Vec::new(),
            rng: true,
            max_lifetime_secs: None,
            vsock: None,
        }
    }

    /// Checks everything that can be checked without touching the host. Device placement is
    /// checked by the VMM, which knows its fixed devices; files are checked where they are opened.
    pub fn validate(&self) -> Result<(), VmConfigError> {
        if !(MIN_VCPUS..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(VmConfigError::VcpuCount(self.vcpus.into()));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(VmConfigError::MemorySize(self.memory_mib));
        }
        if self.kernel.as_os_str().is_empty() {
            return Err(VmConfigError::NoKernel);
        }
        if self.drives.len() > MAX_DRIVES {
            return Err(VmConfigError::TooManyDrives(self.drives.len()));
        }
        let mut ids = HashSet::new();
        let mut root: Option<&str> = None;
        for drive in &self.drives {
            let id_ok = (1..=32).contains(&drive.id.len())
                && drive.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !id_ok {
                return Err(VmConfigError::DriveId(drive.id.clone()));
            }
            if !ids.insert(drive.id.as_str()) {
                return Err(VmConfigError::DuplicateDriveId(drive.id.clone()));
            }
            if drive.path.as_os_str().is_empty() {
                return Err(VmConfigError::DrivePath(drive.id.clone()));
            }
            if drive.root {
                if let Some(first) = root {
                    return Err(VmConfigError::TwoRoots(first.to_owned(), drive.id.clone()));
                }
                root = Some(&drive.id);
            }
        }
        if self.boot_args.len() > MAX_BOOT_ARGS_LEN {
            return Err(VmConfigError::BootArgs("longer than 1024 bytes"));
        }
        if !self.boot_args.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(VmConfigError::BootArgs("only printable ASCII is allowed"));
        }
        if self.max_lifetime_secs == Some(0) {
            return Err(VmConfigError::ZeroLifetime);
        }
        if let Some(v) = &self.vsock {
            if !(3..u64::from(u32::MAX)).contains(&v.guest_cid) {
                return Err(VmConfigError::VsockCid(v.guest_cid));
            }
            let len = v.uds_path.as_os_str().len();
            if len == 0 || len > MAX_VSOCK_PATH_LEN {
                return Err(VmConfigError::VsockPath(v.uds_path.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn drive(id: &str) -> DriveConfig {
        DriveConfig {
            id: id.into(),
            path: "disk.img".into(),
            read_only: false,
            root: false,
            placement: None,
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel": "vmlinux"}"#).unwrap();
        assert_eq!(c, VmConfig::new("vmlinux"));
        c.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel": "k", "vcpu": 2}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `vcpu`"), "{e}");
    }

    #[test]
    fn console_forms() {
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel": "k", "console": {"file": "/tmp/c"}}"#).unwrap();
        assert_eq!(c.console, ConsoleConfig::File("/tmp/c".into()));
        let c: VmConfig = serde_json::from_str(r#"{"kernel": "k", "console": "off"}"#).unwrap();
        assert_eq!(c.console, ConsoleConfig::Off);
    }

    #[test]
    fn ranges_are_enforced() {
        let mut c = VmConfig::new("k");
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(VmConfigError::VcpuCount(0)));
        c.vcpus = 33;
        assert_eq!(c.validate(), Err(VmConfigError::VcpuCount(33)));
        c.vcpus = 32;
        c.memory_mib = 0;
        assert_eq!(c.validate(), Err(VmConfigError::MemorySize(0)));
        c.memory_mib = MAX_MEMORY_MIB + 1;
        assert!(c.validate().is_err());
        c.memory_mib = 64;
        c.max_lifetime_secs = Some(0);
        assert_eq!(c.validate(), Err(VmConfigError::ZeroLifetime));
    }

    #[test]
    fn drives_are_checked() {
        let mut c = VmConfig::new("k");
        c.drives = vec![drive("a"), drive("a")];
        assert_eq!(c.validate(), Err(VmConfigError::DuplicateDriveId("a".into())));
        c.drives = vec![drive("a b")];
        assert_eq!(c.validate(), Err(VmConfigError::DriveId("a b".into())));
        let mut r1 = drive("r1");
        r1.root = true;
        let mut r2 = drive("r2");
        r2.root = true;
        c.drives = vec![r1, r2];
        assert_eq!(c.validate(), Err(VmConfigError::TwoRoots("r1".into(), "r2".into())));
        c.drives = (0..9).map(|i| drive(&format!("d{i}"))).collect();
        assert_eq!(c.validate(), Err(VmConfigError::TooManyDrives(9)));
    }

    #[test]
    fn vsock_is_checked() {
        let mut c = VmConfig::new("k");
        c.vsock = Some(VsockConfig { guest_cid: 2, uds_path: "/tmp/v.sock".into() });
        assert_eq!(c.validate(), Err(VmConfigError::VsockCid(2)));
        c.vsock = Some(VsockConfig { guest_cid: 3, uds_path: "/x".repeat(60).into() });
        assert!(matches!(c.validate(), Err(VmConfigError::VsockPath(_))));
        c.vsock = Some(VsockConfig { guest_cid: 3, uds_path: "/tmp/v.sock".into() });
        c.validate().unwrap();
    }

    #[test]
    fn boot_args_are_checked() {
        let mut c = VmConfig::new("k");
        c.boot_args = "quiet\n".into();
        assert!(c.validate().is_err());
        c.boot_args = "x".repeat(2000);
        assert!(c.validate().is_err());
        c.boot_args = "quiet loglevel=3".into();
        c.validate().unwrap();
    }
}
