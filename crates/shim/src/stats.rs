//! A cell's figures for `Stats`, from its VMM's cgroup (v2): the CPU and memory the whole cell
//! uses on the host, which is what its pod costs. containerd's CRI plugin reads them as
//! `io.containerd.cgroups.v2.Metrics`.

use std::path::{Path, PathBuf};

use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim_protos::protobuf::MessageField;

/// The cgroup v2 directory of process `pid`, if it can be read.
pub fn cgroup_of(pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

fn flat(dir: &Path, file: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
}

fn keyed(dir: &Path, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

/// The figures in cgroup directory `dir`.
pub fn metrics(dir: &Path) -> Metrics {
    let cpu = CPUStat {
        usage_usec: keyed(dir, "cpu.stat", "usage_usec"),
        user_usec: keyed(dir, "cpu.stat", "user_usec"),
        system_usec: keyed(dir, "cpu.stat", "system_usec"),
        nr_periods: keyed(dir, "cpu.stat", "nr_periods"),
        nr_throttled: keyed(dir, "cpu.stat", "nr_throttled"),
        throttled_usec: keyed(dir, "cpu.stat", "throttled_usec"),
        ..Default::default()
    };
    let memory = MemoryStat {
        usage: flat(dir, "memory.current").unwrap_or(0),
        // "max" (no limit) does not parse: 0, as containerd reports it.
        usage_limit: flat(dir, "memory.max").unwrap_or(0),
        anon: keyed(dir, "memory.stat", "anon"),
        file: keyed(dir, "memory.stat", "file"),
        ..Default::default()
    };
    let pids = PidsStat {
        current: flat(dir, "pids.current").unwrap_or(0),
        limit: flat(dir, "pids.max").unwrap_or(0),
        ..Default::default()
    };
    Metrics {
        cpu: MessageField::some(cpu),
        memory: MessageField::some(memory),
        pids: MessageField::some(pids),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_cgroup_files_and_tolerates_missing_or_max() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        std::fs::write(d.path().join("memory.current"), "4096\n").unwrap();
        std::fs::write(d.path().join("memory.max"), "max\n").unwrap();
        let m = metrics(d.path());
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.cpu.user_usec, 1000);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, 0);
        assert_eq!(m.pids.current, 0);
    }

    #[test]
    fn this_process_has_a_cgroup_or_none_without_panicking() {
        let _ = cgroup_of(std::process::id());
        assert!(cgroup_of(u32::MAX).is_none());
    }
}
