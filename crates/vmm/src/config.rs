//! Turns what the user gave (a JSON file and/or flags) into a [`VmConfig`] and checks it against
//! the host: files exist and have the right format, memory fits, devices fit. All of it happens
//! before a VM is created; every failure here is exit status 2.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use isocell_spec::{ConsoleConfig, DriveConfig, VmConfig, VmConfigError, VsockConfig};

use crate::arch::x86_64::boot::KernelFormat;
use crate::device_manager::{DevicePlan, PlacementError};

pub use isocell_vmm_model::config::host_memory_mib;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read the config file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The config file is not valid JSON for a VM config.
    #[error("config file {0} is invalid: {1}")]
    Parse(PathBuf, String),
    /// A command-line value is malformed.
    #[error("{0}")]
    Flag(String),
    /// A value is out of range or inconsistent.
    #[error(transparent)]
    Invalid(#[from] VmConfigError),
    /// The kernel cannot be opened.
    #[error("kernel {0} cannot be opened ({1}); build the cell kernel with guest/build-kernel.sh or give another path")]
    Kernel(PathBuf, std::io::Error),
    /// The kernel has an unknown format.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat(PathBuf),
    /// The initrd cannot be opened.
    #[error("initrd {0} cannot be opened ({1})")]
    Initrd(PathBuf, std::io::Error),
    /// A drive's image cannot be opened as asked.
    #[error("drive {id:?}: image {path} cannot be opened {mode} ({err})")]
    Drive {
        /// Drive id.
        id: String,
        /// Image path.
        path: PathBuf,
        /// "read-only" or "read-write".
        mode: &'static str,
        /// The underlying error.
        err: std::io::Error,
    },
    /// A drive's image is not a usable disk.
    #[error("drive {0:?}: image {1} {2}")]
    DriveImage(String, PathBuf, &'static str),
    /// Two drives are backed by the same file (same device and inode, whatever the paths say)
    /// and at least one of them is writable: the guest would see the image change under a
    /// mounted filesystem.
    #[error(
        "drives {first:?} and {second:?} are the same image file ({path}) and {writable:?} is writable: attach an image once, or read-only every time"
    )]
    SharedImage {
        /// The drive listed first.
        first: String,
        /// The drive listed later.
        second: String,
        /// The second drive's path.
        path: PathBuf,
        /// The id of a writable one of the two.
        writable: String,
    },
    /// More memory than the host has.
    #[error("memory_mib is {0} but this host has only {1} MiB of RAM")]
    MemoryExceedsHost(u64, u64),
    /// Devices cannot be placed.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// The console file cannot be created.
    #[error("console file {0} cannot be created ({1})")]
    Console(PathBuf, std::io::Error),
    /// The vsock socket path cannot be used.
    #[error("vsock uds_path {0}: {1}")]
    VsockPath(PathBuf, &'static str),
}

/// Reads a JSON config file.
pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
    serde_json::from_str(&text).map_err(|e| ConfigError::Parse(path.into(), e.to_string()))
}

/// Parses `--memory`: MiB by default, or with an `M`/`MiB`/`G`/`GiB`/`T`/`TiB` suffix.
pub fn parse_memory_mib(s: &str) -> Result<u64, ConfigError> {
    s.parse::<isocell_spec::MemorySize>()
        .map(isocell_spec::MemorySize::mib)
        .map_err(|e| ConfigError::Flag(format!("--memory {e}")))
}

/// Parses `--console`: `stdout`, `off` or `file:PATH`.
pub fn parse_console(s: &str) -> Result<ConsoleConfig, ConfigError> {
    match s {
        "stdout" => Ok(ConsoleConfig::Stdout),
        "off" => Ok(ConsoleConfig::Off),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(ConsoleConfig::File(p.into())),
            _ => Err(ConfigError::Flag(format!("--console {s:?}: use stdout, off or file:PATH"))),
        },
    }
}

/// Parses `--vsock cid=CID,uds=PATH`.
pub fn parse_vsock(s: &str) -> Result<VsockConfig, ConfigError> {
    let bad =
        |why: &str| ConfigError::Flag(format!("--vsock {s:?}: {why}; expected cid=CID,uds=PATH"));
    let (mut cid, mut path) = (None, None);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("cid", v)) => {
                cid = Some(v.parse::<u64>().map_err(|_| bad("cid is not a number"))?)
            }
            Some(("uds", v)) => path = Some(PathBuf::from(v)),
            _ => return Err(bad(&format!("unknown part {part:?}"))),
        }
    }
    Ok(VsockConfig {
        guest_cid: cid.ok_or_else(|| bad("missing cid"))?,
        uds_path: path.ok_or_else(|| bad("missing uds"))?,
    })
}

/// Parses `--drive id=ID,path=PATH[,ro][,root]`.
pub fn parse_drive(s: &str) -> Result<DriveConfig, ConfigError> {
    let bad = |why: &str| {
        ConfigError::Flag(format!("--drive {s:?}: {why}; expected id=ID,path=PATH[,ro][,root]"))
    };
    let (mut id, mut path, mut read_only, mut root) = (None, None, false, false);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_owned()),
            Some(("path", v)) => path = Some(PathBuf::from(v)),
            None if part == "ro" => read_only = true,
            None if part == "root" => root = true,
            _ => return Err(bad(&format!("unknown part {part:?}"))),
        }
    }
    Ok(DriveConfig {
        id: id.ok_or_else(|| bad("missing id"))?,
        path: path.ok_or_else(|| bad("missing path"))?,
        read_only,
        root,
        placement: None,
    })
}

/// Checks `config` completely: values, device placement, and every file it names.
/// Returns the device plan the VM will be built from.
pub fn check(config: &VmConfig) -> Result<DevicePlan, ConfigError> {
    config.validate()?;
    let plan = DevicePlan::new(config)?;
    if let Some(host) = host_memory_mib() {
        if config.memory_mib > host {
            return Err(ConfigError::MemoryExceedsHost(config.memory_mib, host));
        }
    }
    let mut kernel =
        File::open(&config.kernel).map_err(|e| ConfigError::Kernel(config.kernel.clone(), e))?;
    KernelFormat::detect(&mut kernel)
        .map_err(|_| ConfigError::KernelFormat(config.kernel.clone()))?;
    if let Some(initrd) = &config.initrd {
        File::open(initrd).map_err(|e| ConfigError::Initrd(initrd.clone(), e))?;
    }
    // (device, inode) of each drive's image: the same file under two paths is one image.
    let mut images: Vec<((u64, u64), &DriveConfig)> = Vec::new();
    for d in &config.drives {
        let mode = if d.read_only { "read-only" } else { "read-write" };
        let file =
            OpenOptions::new().read(true).write(!d.read_only).open(&d.path).map_err(|err| {
                ConfigError::Drive { id: d.id.clone(), path: d.path.clone(), mode, err }
            })?;
        let meta = file.metadata().map_err(|err| ConfigError::Drive {
            id: d.id.clone(),
            path: d.path.clone(),
            mode,
            err,
        })?;
        if !meta.is_file() {
            return Err(ConfigError::DriveImage(
                d.id.clone(),
                d.path.clone(),
                "is not a regular file",
            ));
        }
        if meta.len() < 512 {
            return Err(ConfigError::DriveImage(
                d.id.clone(),
                d.path.clone(),
                "is smaller than one 512-byte sector",
            ));
        }
        let identity = (meta.dev(), meta.ino());
        if let Some((_, first)) =
            images.iter().find(|(i, other)| *i == identity && (!other.read_only || !d.read_only))
        {
            let writable = if first.read_only { &d.id } else { &first.id };
            return Err(ConfigError::SharedImage {
                first: first.id.clone(),
                second: d.id.clone(),
                path: d.path.clone(),
                writable: writable.clone(),
            });
        }
        images.push((identity, d));
    }
    if let ConsoleConfig::File(p) = &config.console {
        File::create(p).map_err(|e| ConfigError::Console(p.clone(), e))?;
    }
    if let Some(v) = &config.vsock {
        let path = &v.uds_path;
        if path.symlink_metadata().is_ok() {
            return Err(ConfigError::VsockPath(
                path.clone(),
                "already exists; remove it or choose another path",
            ));
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(ConfigError::VsockPath(path.clone(), "its directory does not exist"));
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("128").unwrap(), 128);
        assert_eq!(parse_memory_mib("256M").unwrap(), 256);
        assert_eq!(parse_memory_mib("2G").unwrap(), 2048);
        assert_eq!(parse_memory_mib("1GiB").unwrap(), 1024);
        assert!(parse_memory_mib("lots").is_err());
        assert!(parse_memory_mib("-1").is_err());
        assert!(parse_memory_mib("99999999999999999999G").is_err());
    }

    #[test]
    fn drives_and_console() {
        let d = parse_drive("id=root,path=/x.img,ro,root").unwrap();
        assert_eq!((d.id.as_str(), d.read_only, d.root), ("root", true, true));
        assert!(parse_drive("path=/x.img").is_err());
        assert!(parse_drive("id=a,path=/x,rw=1").is_err());
        assert_eq!(parse_console("file:/tmp/c").unwrap(), ConsoleConfig::File("/tmp/c".into()));
        assert!(parse_console("file:").is_err());
        assert!(parse_console("tty").is_err());
        let v = parse_vsock("cid=3,uds=/run/x/v.sock").unwrap();
        assert_eq!((v.guest_cid, v.uds_path.to_str()), (3, Some("/run/x/v.sock")));
        assert!(parse_vsock("cid=x,uds=/a").is_err());
        assert!(parse_vsock("uds=/a").is_err());
    }

    #[test]
    fn one_image_attached_twice_is_refused_unless_read_only() {
        let dir = std::env::temp_dir().join(format!("isocell-shared-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF\x02\x01").unwrap();
        let image = dir.join("disk.img");
        std::fs::write(&image, [0u8; 4096]).unwrap();
        // The same file under other names: a hard link and a path with a `.` component.
        let link = dir.join("link.img");
        std::fs::hard_link(&image, &link).unwrap();
        let dotted = dir.join(".").join("disk.img");
        let other = dir.join("other.img");
        std::fs::write(&other, [0u8; 4096]).unwrap();
        let drive = |id: &str, path: &Path, read_only: bool| DriveConfig {
            id: id.into(),
            path: path.into(),
            read_only,
            root: false,
            placement: None,
        };
        let mut c = VmConfig::new(&kernel);
        c.memory_mib = 32;

        c.drives = vec![drive("a", &image, true), drive("b", &link, false)];
        match check(&c) {
            Err(ConfigError::SharedImage { first, second, writable, .. }) => {
                assert_eq!((first.as_str(), second.as_str(), writable.as_str()), ("a", "b", "b"));
            }
            other => panic!("expected SharedImage, got {other:?}"),
        }
        c.drives = vec![drive("x", &image, false), drive("y", &dotted, true)];
        let e = check(&c).unwrap_err();
        assert!(matches!(&e, ConfigError::SharedImage { writable, .. } if writable == "x"), "{e}");
        let text = e.to_string();
        assert!(text.contains("\"x\"") && text.contains("\"y\""), "{text}");
        c.drives = vec![drive("x", &image, false), drive("y", &image, false)];
        assert!(matches!(check(&c), Err(ConfigError::SharedImage { .. })));

        // Read-only twice is fine, and so are two different files.
        c.drives = vec![drive("a", &image, true), drive("b", &link, true)];
        check(&c).unwrap();
        c.drives = vec![drive("a", &image, false), drive("b", &other, false)];
        check(&c).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_and_wrong_files_are_named() {
        let mut c = VmConfig::new("/nonexistent/vmlinux");
        let e = check(&c).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/vmlinux") && e.contains("build-kernel.sh"), "{e}");
        let not_kernel =
            std::env::temp_dir().join(format!("isocell-notkernel-{}", std::process::id()));
        std::fs::write(&not_kernel, b"hello").unwrap();
        c.kernel = not_kernel.clone();
        let e = check(&c).unwrap_err().to_string();
        assert!(e.contains("neither an ELF vmlinux nor a bzImage"), "{e}");
        std::fs::remove_file(not_kernel).unwrap();
    }
}
