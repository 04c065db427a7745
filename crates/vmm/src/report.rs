//! The run report the VMM writes when asked (`--report FILE`): why it stopped, the boot phases
//! and its memory overhead. The benchmark and the test host read it; nobody scrapes the console.

use serde::Serialize;

use crate::timeline::Phases;

/// Everything the VMM knows about one run.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// Machine-readable exit reason (`reboot`, `guest_panic`, ...).
    pub exit_reason: String,
    /// Human-readable detail.
    pub exit_detail: String,
    /// The process exit status.
    pub exit_code: i32,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory size in MiB.
    pub memory_mib: u64,
    /// Boot phase timestamps.
    pub phases: Phases,
    /// Memory use, measured from `/proc/self/smaps` just before the VMM exits.
    pub memory: Option<MemoryUse>,
    /// VM exits the VMM handled, by kind and device id (`"mmio_write root"`; accesses no device
    /// answered count as `"... unmapped"`), most frequent first (at most 20).
    pub exit_counts: Vec<(String, u64)>,
    /// Features the guest's drivers negotiated, by virtio device id (empty: never brought up).
    pub negotiated_features: std::collections::BTreeMap<String, Vec<String>>,
}

/// Resident memory of the VMM process, split into guest memory and everything else.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct MemoryUse {
    /// Resident KiB of the guest memory mappings.
    pub guest_rss_kib: u64,
    /// Resident KiB of everything else: the VMM's own overhead.
    pub vmm_overhead_kib: u64,
}

/// Splits the `Rss:` lines of an smaps text between mappings inside `guest` host ranges
/// `(start, len)` and the rest.
pub fn memory_use(smaps: &str, guest: &[(u64, u64)]) -> MemoryUse {
    let mut use_ = MemoryUse { guest_rss_kib: 0, vmm_overhead_kib: 0 };
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                in_guest = guest.iter().any(|(gs, gl)| s >= *gs && e <= gs + gl);
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if in_guest {
                use_.guest_rss_kib += kib;
            } else {
                use_.vmm_overhead_kib += kib;
            }
        }
    }
    use_
}

/// Measures this process.
pub fn measure_self(guest: &[(u64, u64)]) -> Option<MemoryUse> {
    std::fs::read_to_string("/proc/self/smaps").ok().map(|s| memory_use(&s, guest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_guest_from_vmm() {
        let smaps = "\
55d0a0000000-55d0a0100000 r-xp 00000000 08:01 1 /usr/bin/isocell-vmm
Size:               1024 kB
Rss:                 700 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:               20000 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
";
        let m = memory_use(smaps, &[(0x7f00_0000_0000, 0x800_0000)]);
        assert_eq!(m, MemoryUse { guest_rss_kib: 20000, vmm_overhead_kib: 712 });
    }
}
