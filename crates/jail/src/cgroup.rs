//! A cgroup v2 leaf per cell, `<root>/isocell/<cell>`, with memory, CPU and pid limits. `isocell`
//! creates it before the jailer starts and removes it after, killing anything left in it, so a
//! VMM that crashes or is SIGKILLed leaves no cgroup behind.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `statfs` magic of a cgroup v2 mount.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The controllers a cell's leaf uses.
const CONTROLLERS: &str = "+memory +cpu +pids";

/// Limits of one cell's cgroup.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    /// memory.max in bytes: guest memory plus the VMM's allowance.
    pub memory_max: u64,
    /// memory.swap.max: 0, guest memory is never swapped to disk.
    pub swap_max: u64,
    /// cpu.max quota in microseconds per period.
    pub cpu_quota_us: u64,
    /// cpu.max period in microseconds.
    pub cpu_period_us: u64,
    /// pids.max: the jailer, the VMM and its threads.
    pub pids_max: u64,
}

/// Memory a VMM may use beyond guest memory: its binary, stacks, page tables, device and vsock
/// buffers (256 vsock connections x 256 KiB credit at most: 64 MiB).
pub const VMM_ALLOWANCE_MIB: u64 = 112;

impl Limits {
    /// Limits for a cell with `vcpus` vCPUs and `memory_mib` of guest memory: its vCPUs plus
    /// half a CPU for device threads, and room for its threads.
    pub fn for_cell(vcpus: u8, memory_mib: u64) -> Limits {
        Limits {
            memory_max: (memory_mib + VMM_ALLOWANCE_MIB) << 20,
            swap_max: 0,
            cpu_quota_us: u64::from(vcpus) * 100_000 + 50_000,
            cpu_period_us: 100_000,
            pids_max: u64::from(vcpus) + 16,
        }
    }
}

/// Cgroup setup and teardown failures.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup v2 hierarchy where we look.
    #[error(
        "{0} is not a cgroup v2 mount; mount one there (mount -t cgroup2 none {0}) or set ISOCELL_CGROUP_ROOT"
    )]
    NotCgroup2(String),
    /// A cgroup file could not be written or read.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Processes stayed in the cgroup after it was killed.
    #[error("cgroup {0} still has processes after cgroup.kill")]
    Busy(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.display().to_string(), source }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io(path))
}

/// The cgroup v2 root: `ISOCELL_CGROUP_ROOT`, else /sys/fs/cgroup.
pub fn root() -> PathBuf {
    std::env::var_os("ISOCELL_CGROUP_ROOT").map_or_else(|| "/sys/fs/cgroup".into(), PathBuf::from)
}

/// The cgroup of one cell.
#[derive(Debug)]
pub struct CellCgroup {
    path: PathBuf,
}

impl CellCgroup {
    /// The leaf's path for `cell_id` under `root`.
    pub fn path_for(root: &Path, cell_id: &str) -> PathBuf {
        root.join("isocell").join(cell_id)
    }

    /// Creates the leaf for `cell_id` with `limits`, enabling the controllers on the way.
    pub fn create(root: &Path, cell_id: &str, limits: &Limits) -> Result<CellCgroup, CgroupError> {
        let fs = nix::sys::statfs::statfs(root).map_err(|e| io(root)(e.into()))?;
        if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
            return Err(CgroupError::NotCgroup2(root.display().to_string()));
        }
        let parent = root.join("isocell");
        write(&root.join("cgroup.subtree_control"), CONTROLLERS)?;
        match fs::create_dir(&parent) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(io(&parent)(e)),
            _ => {}
        }
        write(&parent.join("cgroup.subtree_control"), CONTROLLERS)?;
        let path = Self::path_for(root, cell_id);
        fs::create_dir(&path).map_err(io(&path))?;
        let cg = CellCgroup { path };
        if let Err(e) = cg.apply(limits) {
            let _ = fs::remove_dir(&cg.path);
            return Err(e);
        }
        Ok(cg)
    }

    fn apply(&self, l: &Limits) -> Result<(), CgroupError> {
        write(&self.path.join("memory.max"), &l.memory_max.to_string())?;
        // Without swap accounting the file is absent, and then there is nothing to limit.
        match fs::write(self.path.join("memory.swap.max"), l.swap_max.to_string()) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(io(&self.path.join("memory.swap.max"))(e))
            }
            _ => {}
        }
        // An OOM kill in the cell takes the whole cell, never half a VMM.
        write(&self.path.join("memory.oom.group"), "1")?;
        write(&self.path.join("cpu.max"), &format!("{} {}", l.cpu_quota_us, l.cpu_period_us))?;
        write(&self.path.join("pids.max"), &l.pids_max.to_string())
    }

    /// The leaf's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Kills every process in the cgroup (cgroup.kill).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        write(&self.path.join("cgroup.kill"), "1")
    }

    /// Waits up to `limit` for the cgroup to hold no process; returns whether it is empty.
    pub fn wait_empty(&self, limit: Duration) -> bool {
        wait_empty(&self.path, limit)
    }

    /// `memory.events` `oom_kill` count: how often the cell hit its memory limit.
    pub fn oom_kills(&self) -> u64 {
        let text = fs::read_to_string(self.path.join("memory.events")).unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok()).unwrap_or(0)
    }

    /// Kills everything left in the leaf and removes it.
    pub fn destroy(self) -> Result<(), CgroupError> {
        remove(&self.path)
    }
}

fn populated(path: &Path) -> bool {
    fs::read_to_string(path.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

fn wait_empty(path: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while populated(path) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// Kills every process in the cgroup at `path` (cgroup.kill), waits for it to empty and removes
/// it. A missing cgroup is already removed.
pub fn remove(path: &Path) -> Result<(), CgroupError> {
    if !path.exists() {
        return Ok(());
    }
    if populated(path) {
        write(&path.join("cgroup.kill"), "1")?;
        if !wait_empty(path, Duration::from_secs(5)) {
            return Err(CgroupError::Busy(path.display().to_string()));
        }
    }
    // The kernel can report EBUSY for a moment after the last process left.
    let start = Instant::now();
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e)
                if start.elapsed() < Duration::from_secs(2)
                    && e.raw_os_error() == Some(libc::EBUSY) =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(io(path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_scale_with_the_cell() {
        let l = Limits::for_cell(2, 256);
        assert_eq!(l.memory_max, (256 + VMM_ALLOWANCE_MIB) << 20);
        assert_eq!(l.cpu_quota_us, 250_000);
        assert_eq!(l.pids_max, 18);
        assert_eq!(l.swap_max, 0);
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_refused() {
        let err = CellCgroup::create(Path::new("/tmp"), "x", &Limits::for_cell(1, 64));
        assert!(matches!(err, Err(CgroupError::NotCgroup2(_))), "{err:?}");
    }
}
