//! Finding what a cell is made of (the VMM binary, the jailer, the cell kernel, the agent's
//! initramfs, the base image) and the state and run directories. Explicit flags win, then
//! environment variables, then the project's build directory. Only the binaries and
//! [`HostConfig::discover`](crate::HostConfig::discover) call these; the lifecycle is given
//! what they found.

use std::path::{Path, PathBuf};

/// Where the built guest artefacts live, relative to the project root.
const GUEST_DIR: &str = "build/guest";

/// Why a file or program a cell is made of was not found.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    /// No flag, no environment variable, and no `build/guest` to look in.
    #[error(
        "{what} not found: no {dir} directory above this program or the current directory. \
         Build it with scripts/build-all.sh, or give its path with the flag or {env}",
        dir = GUEST_DIR
    )]
    NoGuestDir {
        /// What was looked for ("the cell kernel", ...).
        what: &'static str,
        /// The environment variable that would name it.
        env: &'static str,
    },
    /// The path names something that is not a regular file.
    #[error("{what} {} is not a regular file; give the path of one", path.display())]
    NotRegular {
        /// What was looked for.
        what: &'static str,
        /// Where.
        path: PathBuf,
    },
    /// Nothing at the path.
    #[error(
        "{what} {} does not exist. Build it with scripts/build-all.sh (or guest/build-kernel.sh \
         and guest/build-rootfs.sh), or give another path",
        path.display()
    )]
    Missing {
        /// What was looked for.
        what: &'static str,
        /// Where.
        path: PathBuf,
    },
    /// This program's own path is unknown.
    #[error("cannot find this program: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// No program of that name next to this one.
    #[error(
        "{} does not exist; build it with `cargo build --release --workspace --bins` or set {env}",
        path.display()
    )]
    NoProgram {
        /// Where it was looked for.
        path: PathBuf,
        /// The environment variable that would name it.
        env: &'static str,
    },
}

/// The project's `build/guest` directory: `ISOCELL_GUEST_DIR`, else found above the running
/// binary (`target/<triple>/release/isocell`) or the current directory.
fn guest_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("ISOCELL_GUEST_DIR") {
        return Some(PathBuf::from(d));
    }
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    let starts = exe.iter().chain(cwd.iter());
    for start in starts {
        for dir in start.ancestors() {
            let candidate = dir.join(GUEST_DIR);
            if candidate.is_dir() {
                return Some(candidate);
            }
        }
    }
    None
}

fn find(
    flag: Option<&Path>,
    env: &'static str,
    file: &str,
    what: &'static str,
) -> Result<PathBuf, LocateError> {
    let path = match (flag, std::env::var_os(env)) {
        (Some(p), _) => p.to_owned(),
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => match guest_dir() {
            Some(d) => d.join(file),
            None => return Err(LocateError::NoGuestDir { what, env }),
        },
    };
    if path.is_file() {
        Ok(path)
    } else if path.exists() {
        Err(LocateError::NotRegular { what, path })
    } else {
        Err(LocateError::Missing { what, path })
    }
}

/// The nested host's kernel directory (`vmlinuz` and `modules/`, from
/// scripts/prepare-nested-host.sh) that an `isocell machine` boots: `ISOCELL_NESTED_HOST`, else
/// `build/nested-host` next to `build/guest`.
pub fn nested_host() -> Result<PathBuf, LocateError> {
    let dir = match std::env::var_os("ISOCELL_NESTED_HOST") {
        Some(d) => PathBuf::from(d),
        None => match guest_dir().and_then(|g| g.parent().map(|p| p.join("nested-host"))) {
            Some(d) => d,
            None => {
                return Err(LocateError::NoGuestDir {
                    what: "the machine's kernel",
                    env: "ISOCELL_NESTED_HOST",
                })
            }
        },
    };
    let kernel = dir.join("vmlinuz");
    if kernel.is_file() {
        Ok(dir)
    } else {
        Err(LocateError::Missing {
            what: "the machine's kernel (scripts/prepare-nested-host.sh)",
            path: kernel,
        })
    }
}

/// The cell kernel (`--kernel`, `ISOCELL_KERNEL`, or `build/guest/vmlinux`).
pub fn kernel(flag: Option<&Path>) -> Result<PathBuf, LocateError> {
    find(flag, "ISOCELL_KERNEL", "vmlinux", "the cell kernel")
}

/// The agent's initramfs, which every cell boots with (`ISOCELL_AGENT_INITRD`, or
/// `build/guest/agent-initrd.cpio`).
pub fn agent_initrd(flag: Option<&Path>) -> Result<PathBuf, LocateError> {
    find(flag, "ISOCELL_AGENT_INITRD", "agent-initrd.cpio", "the agent initramfs")
}

/// The root image (`IMAGE`/`--image`, `ISOCELL_IMAGE`, or `build/guest/rootfs.ext4`).
pub fn image(flag: Option<&Path>) -> Result<PathBuf, LocateError> {
    find(flag, "ISOCELL_IMAGE", "rootfs.ext4", "the base image")
}

/// The VMM: `ISOCELL_VMM`, else `isocell-vmm` next to this program.
pub fn vmm() -> Result<PathBuf, LocateError> {
    sibling("ISOCELL_VMM", "isocell-vmm")
}

/// The jailer: `ISOCELL_JAILER`, else `isocell-jailer` next to this program.
pub fn jailer() -> Result<PathBuf, LocateError> {
    sibling("ISOCELL_JAILER", "isocell-jailer")
}

/// The per-cell supervisor: `ISOCELL_SUPERVISOR`, else `isocell-supervisor` next to this
/// program.
pub fn supervisor() -> Result<PathBuf, LocateError> {
    sibling("ISOCELL_SUPERVISOR", "isocell-supervisor")
}

/// The program `env` names, else `name` next to this program.
fn sibling(env: &'static str, name: &str) -> Result<PathBuf, LocateError> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(LocateError::CurrentExe)?;
    let path = exe.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(LocateError::NoProgram { path, env })
    }
}

/// The directory that holds one subdirectory per running cell: `ISOCELL_RUN_DIR`, else
/// `$XDG_RUNTIME_DIR/isocell` (not for root), else `/run/isocell`, else `/tmp/isocell-UID`.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ISOCELL_RUN_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    // Root's cells are jailed: never in a directory a user's environment points at.
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|_| uid != 0) {
        return Path::new(&d).join("isocell");
    }
    if uid == 0 && Path::new("/run").is_dir() {
        return PathBuf::from("/run/isocell");
    }
    std::env::temp_dir().join(format!("isocell-{uid}"))
}

/// The state directory: `ISOCELL_STATE_DIR`, else `/var/lib/isocell` for root, else
/// `~/.local/state/isocell`.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ISOCELL_STATE_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } == 0 {
        return PathBuf::from("/var/lib/isocell");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".local/state/isocell")
}
