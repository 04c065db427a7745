//! CPUID as each vCPU sees it: KVM's supported set, normalised deliberately, leaf by leaf. A leaf
//! not named here is passed through as KVM reports it.
//!
//! | leaf | what the guest is told | why |
//! |------|------------------------|-----|
//! | 0x1 | EBX: its APIC id (= vCPU index) and the vCPU count; ECX: `hypervisor` set, `monitor` cleared, `tsc_deadline_timer` set where KVM emulates it (`KVM_CAP_TSC_DEADLINE_TIMER`); EDX: `htt` only with more than one vCPU | KVM leaves the TSC-deadline bit out of its supported set because it depends on the in-kernel LAPIC; without it a kernel calibrates its LAPIC timer against the PIT (half a second idle before init) and a hardware-reduced ACPI guest, which has no PIT, has no timer at all |
//! | 0x4, 0x8000001D | caches: L1/L2 private to one core, L3 shared by all vCPUs | matches the topology below |
//! | 0x6 | EAX: only ARAT (the LAPIC timer keeps running in deep C-states); the rest zero | no thermal or power management behind it; without ARAT a guest keeps the PIT as a broadcast timer beside the LAPIC timer, and KVM then emulates both |
//! | 0xB | one thread per core, one core per vCPU, one package | a topology that matches the vCPU count whatever the host's is |
//! | 0x1F | dropped | so the guest reads 0xB, whose meaning we control |
//! | 0x40000000 | "KVMKVMKVM", highest leaf 0x40000001 (0x40000010 when the TSC frequency is known) | the paravirtual interface is KVM's |
//! | 0x40000001 | EAX: the KVM features in [`KVM_FEATURES_OFFERED`] that KVM supports; EDX: no hints | kvmclock (stable), async page faults, steal time, PV EOI/unhalt/IPI/TLB flush/yield and poll control need nothing from the VMM; `HC_MAP_GPA_RANGE` needs a hypercall exit the VMM does not handle and `MIGRATION_CONTROL` a migration it does not do; `REALTIME` hints would be false (vCPUs are not pinned) |
//! | 0x40000010 | EAX: TSC frequency (kHz, from `KVM_GET_TSC_KHZ`); EBX: LAPIC timer frequency (1 GHz in KVM) | the timing leaf some guests read instead of calibrating |
//! | 0x80000000 | highest extended leaf at least 0x80000004 | so the brand string is reachable |
//! | 0x80000001 | ECX: `topoext` set on AMD hosts whose KVM reports leaf 0x8000001E | the guest then takes core ids from 0x8000001E, which we rewrite |
//! | 0x80000002-4 | the host CPU's brand string, or "IsoCell virtual CPU" where the host has none | tools that print or tune by model see the truth |
//! | 0x80000008 | ECX: APIC id bits and core count for the vCPU count | AMD topology |
//! | 0x8000001E | extended APIC id = core id = vCPU index; one thread per core; one node | AMD topology |

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use serde::Serialize;

/// Leaf 1 ECX bit 31: "running under a hypervisor".
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX bit 24: the LAPIC timer has a TSC-deadline mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX bit 28: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX bit 3: MONITOR/MWAIT, which a vCPU should not use to idle.
const LEAF1_ECX_MONITOR: u32 = 1 << 3;
/// Leaf 6: thermal and power management; nothing behind it in a VM but ARAT.
const LEAF_THERMAL: u32 = 0x6;
/// Leaf 6 EAX bit 2: the APIC timer always runs (KVM's does).
const LEAF6_EAX_ARAT: u32 = 1 << 2;
/// Leaves whose topology the VMM rewrites.
const LEAF_CACHE_INTEL: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;
const LEAF_AMD_CACHE: u32 = 0x8000_001d;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
/// x2APIC topology level types (leaf 0xB ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
/// KVM's paravirtual leaves.
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_TIMING: u32 = 0x4000_0010;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// The LAPIC timer of KVM's in-kernel LAPIC counts at 1 GHz.
const KVM_APIC_BUS_KHZ: u32 = 1_000_000;
/// Extended leaves.
const LEAF_EXT_MAX: u32 = 0x8000_0000;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_BRAND: [u32; 3] = [0x8000_0002, 0x8000_0003, 0x8000_0004];
/// Leaf 0x80000001 ECX bit 22: topology extensions (leaves 0x8000001D/E).
const EXT_ECX_TOPOEXT: u32 = 1 << 22;
/// The brand string where the host has none.
const FALLBACK_BRAND: &str = "IsoCell virtual CPU";

/// KVM paravirtual features (leaf 0x40000001 EAX) by bit, as the guest's `kvm_para.h` names them.
const KVM_FEATURE_NAMES: [(u32, &str); 17] = [
    (0, "clocksource"),
    (1, "nop_io_delay"),
    (2, "mmu_op"),
    (3, "clocksource2"),
    (4, "async_pf"),
    (5, "steal_time"),
    (6, "pv_eoi"),
    (7, "pv_unhalt"),
    (9, "pv_tlb_flush"),
    (10, "async_pf_vmexit"),
    (11, "pv_send_ipi"),
    (12, "poll_control"),
    (13, "pv_sched_yield"),
    (14, "async_pf_int"),
    (15, "msi_ext_dest_id"),
    (16, "hc_map_gpa_range"),
    (17, "migration_control"),
];
/// Leaf 0x40000001 EAX bit 24: the kvmclock is stable across vCPUs.
const KVM_FEATURE_CLOCKSOURCE_STABLE: u32 = 1 << 24;

/// The KVM features a guest may use: every one KVM implements on its own, none that needs the
/// VMM (`mmu_op` is obsolete, `hc_map_gpa_range` exits to a VMM that does not handle it,
/// `migration_control` is for migration, which cells do not do).
pub const KVM_FEATURES_OFFERED: u32 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 9)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 15)
    | KVM_FEATURE_CLOCKSOURCE_STABLE;

/// What the normalisation needs to know beyond KVM's supported CPUID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidInputs {
    /// KVM emulates the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
    /// The vCPU's TSC frequency in kHz (`KVM_GET_TSC_KHZ`), where known.
    pub tsc_khz: Option<u32>,
    /// The brand string (at most 47 bytes are used).
    pub brand: String,
}

impl CpuidInputs {
    /// The inputs for this host: `tsc_deadline` as KVM says, the host CPU's brand string.
    pub fn for_host(tsc_deadline: bool, tsc_khz: Option<u32>) -> Self {
        CpuidInputs { tsc_deadline, tsc_khz, brand: host_brand() }
    }
}

/// The host CPU's brand string (leaves 0x80000002-4 as this process sees them), trimmed.
pub fn host_brand() -> String {
    use std::arch::x86_64::__cpuid;
    let max = __cpuid(LEAF_EXT_MAX).eax;
    if max < LEAF_BRAND[2] {
        return FALLBACK_BRAND.to_owned();
    }
    let mut bytes = Vec::with_capacity(48);
    for leaf in LEAF_BRAND {
        let r = __cpuid(leaf);
        for reg in [r.eax, r.ebx, r.ecx, r.edx] {
            bytes.extend_from_slice(&reg.to_le_bytes());
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    let brand = text.trim_matches(|c: char| c == '\0' || c.is_whitespace()).to_owned();
    if brand.is_empty() {
        FALLBACK_BRAND.to_owned()
    } else {
        brand
    }
}

/// Bits needed to number `count` APIC ids.
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// The 48-byte brand string as the 12 registers of leaves 0x80000002-4 (NUL padded, the last
/// byte always NUL).
fn brand_registers(brand: &str) -> [u32; 12] {
    let mut bytes = [0u8; 48];
    let text = brand.as_bytes();
    let n = text.len().min(47);
    bytes[..n].copy_from_slice(&text[..n]);
    let mut regs = [0u32; 12];
    for (i, r) in regs.iter_mut().enumerate() {
        *r = u32::from_le_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ]);
    }
    regs
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries.iter().any(|e| {
        // "AuthenticAMD" in EBX, EDX, ECX.
        e.function == 0 && (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
    })
}

fn leaf(function: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

/// Rewrites `entries` for vCPU `index` of `count`, as the table at the top of this file says.
pub fn normalize(
    entries: &[kvm_cpuid_entry2],
    index: u8,
    count: u8,
    inputs: &CpuidInputs,
) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(index);
    let count32 = u32::from(count);
    let amd = is_amd(entries);
    let topoext = amd && entries.iter().any(|e| e.function == LEAF_AMD_TOPOLOGY);
    let brand = brand_registers(&inputs.brand);
    let hv_max = if inputs.tsc_khz.is_some() { LEAF_TIMING } else { LEAF_KVM_FEATURES };
    let mut out = Vec::with_capacity(entries.len() + 5);
    for entry in entries {
        let mut e = *entry;
        match e.function {
            LEAF_TOPOLOGY_V2 | LEAF_TIMING => continue,
            f if LEAF_BRAND.contains(&f) => continue,
            1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (count32 << 16) | (apic_id << 24);
                e.ecx = (e.ecx | LEAF1_ECX_HYPERVISOR) & !LEAF1_ECX_MONITOR;
                if inputs.tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            LEAF_CACHE_INTEL | LEAF_AMD_CACHE => {
                // EAX[25:14]: logical CPUs sharing this cache - 1 (L3: all; L1/L2: one core).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count32 - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14);
                if e.function == LEAF_CACHE_INTEL {
                    // EAX[31:26]: cores per package - 1.
                    e.eax |= (count32 - 1) << 26;
                }
            }
            LEAF_THERMAL => {
                e.eax &= LEAF6_EAX_ARAT;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY => {
                let (shift, logical, level) = match e.index {
                    0 => (0, 1, LEVEL_SMT),
                    1 => (id_bits(count), count32, LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = logical;
                e.ecx = (level << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            LEAF_KVM_SIGNATURE => {
                e.eax = hv_max;
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            LEAF_KVM_FEATURES => {
                e.eax &= KVM_FEATURES_OFFERED;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_EXT_MAX => e.eax = e.eax.max(LEAF_BRAND[2]),
            LEAF_EXT_FEATURES if topoext => e.ecx |= EXT_ECX_TOPOEXT,
            LEAF_AMD_SIZE => {
                // ECX[15:12]: APIC id bits for cores; [7:0]: cores per package - 1.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | (count32 - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                // EAX: extended APIC id; EBX[15:8]: threads per core - 1, [7:0]: core id;
                // ECX: one node.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
        out.push(e);
    }
    if !out.iter().any(|e| e.function == LEAF_EXT_MAX) {
        out.push(leaf(LEAF_EXT_MAX, [LEAF_BRAND[2], 0, 0, 0]));
    }
    for (i, function) in LEAF_BRAND.into_iter().enumerate() {
        let r = &brand[4 * i..4 * i + 4];
        out.push(leaf(function, [r[0], r[1], r[2], r[3]]));
    }
    if !out.iter().any(|e| e.function == LEAF_KVM_SIGNATURE) {
        let [b, c, d] = KVM_SIGNATURE;
        out.push(leaf(LEAF_KVM_SIGNATURE, [hv_max, b, c, d]));
    }
    if let Some(khz) = inputs.tsc_khz {
        out.push(leaf(LEAF_TIMING, [khz, KVM_APIC_BUS_KHZ, 0, 0]));
    }
    out
}

/// Builds the CPUID for one vCPU from what KVM supports.
pub fn for_vcpu(
    supported: &CpuId,
    index: u8,
    count: u8,
    inputs: &CpuidInputs,
) -> Result<CpuId, vmm_sys_util::fam::Error> {
    CpuId::from_entries(&normalize(supported.as_slice(), index, count, inputs))
}

/// One CPUID leaf as `--describe` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LeafView {
    /// Leaf (EAX in), hex.
    pub leaf: String,
    /// Subleaf (ECX in), hex, where it matters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subleaf: Option<String>,
    /// EAX, EBX, ECX, EDX out, hex.
    pub regs: [String; 4],
}

/// A summary of the choices in a normalised CPUID, and every leaf.
#[derive(Clone, Debug, Serialize)]
pub struct CpuidView {
    /// Leaf 1 ECX bit 24.
    pub tsc_deadline_timer: bool,
    /// Leaves 0x80000002-4.
    pub brand: String,
    /// The hypervisor signature (leaf 0x40000000).
    pub hypervisor: String,
    /// KVM paravirtual features offered (leaf 0x40000001 EAX).
    pub kvm_features: Vec<&'static str>,
    /// The kvmclock is marked stable.
    pub kvmclock_stable: bool,
    /// Leaf 0x40000010 EAX, if present.
    pub tsc_khz: Option<u32>,
    /// Leaf 0x80000001 ECX bit 22.
    pub topoext: bool,
    /// Every leaf.
    pub leaves: Vec<LeafView>,
}

/// Describes a normalised CPUID.
pub fn view(entries: &[kvm_cpuid_entry2]) -> CpuidView {
    let find = |f: u32| entries.iter().find(|e| e.function == f).copied().unwrap_or_default();
    let regs_text = |regs: &[u32]| -> String {
        let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
        String::from_utf8_lossy(&bytes).trim_matches('\0').trim().to_owned()
    };
    let brand: Vec<u32> = LEAF_BRAND
        .iter()
        .flat_map(|f| {
            let e = find(*f);
            [e.eax, e.ebx, e.ecx, e.edx]
        })
        .collect();
    let sig = find(LEAF_KVM_SIGNATURE);
    let kvm = find(LEAF_KVM_FEATURES).eax;
    let timing = entries.iter().find(|e| e.function == LEAF_TIMING);
    let mut sorted: Vec<&kvm_cpuid_entry2> = entries.iter().collect();
    sorted.sort_by_key(|e| (e.function, e.index));
    CpuidView {
        tsc_deadline_timer: find(1).ecx & LEAF1_ECX_TSC_DEADLINE != 0,
        brand: regs_text(&brand),
        hypervisor: regs_text(&[sig.ebx, sig.ecx, sig.edx]),
        kvm_features: KVM_FEATURE_NAMES
            .iter()
            .filter(|(bit, _)| kvm & (1 << bit) != 0)
            .map(|(_, name)| *name)
            .collect(),
        kvmclock_stable: kvm & KVM_FEATURE_CLOCKSOURCE_STABLE != 0,
        tsc_khz: timing.map(|e| e.eax),
        topoext: find(LEAF_EXT_FEATURES).ecx & EXT_ECX_TOPOEXT != 0,
        leaves: sorted
            .into_iter()
            .map(|e| LeafView {
                leaf: format!("{:#x}", e.function),
                subleaf: (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0)
                    .then(|| format!("{:#x}", e.index)),
                regs: [e.eax, e.ebx, e.ecx, e.edx].map(|r| format!("{r:#010x}")),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0x0008_0800, ..Default::default() }
    }

    fn inputs() -> CpuidInputs {
        CpuidInputs {
            tsc_deadline: true,
            tsc_khz: Some(2_100_000),
            brand: "Test CPU @ 2.10GHz".into(),
        }
    }

    fn find(out: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        out.iter().find(|e| e.function == f && e.index == i).copied().unwrap_or_default()
    }

    #[test]
    fn topology_matches_vcpu_count() {
        let supported = [entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0x1f, 0), entry(6, 0)];
        let out = normalize(&supported, 3, 4, &inputs());
        assert!(out.iter().all(|e| e.function != 0x1f));
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let core = find(&out, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, LEVEL_CORE, 3));
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut l1 = entry(1, 0);
        l1.edx = LEAF1_EDX_HTT;
        let out = normalize(&[l1], 0, 1, &inputs());
        assert_eq!(out[0].edx & LEAF1_EDX_HTT, 0);
        let mut thermal = entry(LEAF_THERMAL, 0);
        thermal.eax = u32::MAX;
        thermal.ecx = u32::MAX;
        let t = normalize(&[thermal], 0, 1, &inputs());
        assert_eq!((t[0].eax, t[0].ecx), (LEAF6_EAX_ARAT, 0));
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(32), 5);
    }

    #[test]
    fn tsc_deadline_follows_kvm_not_the_supported_list() {
        let mut l1 = entry(1, 0);
        let out = normalize(&[l1], 0, 1, &inputs());
        assert!(view(&out).tsc_deadline_timer);
        l1.ecx = LEAF1_ECX_TSC_DEADLINE;
        let without = CpuidInputs { tsc_deadline: false, ..inputs() };
        assert!(!view(&normalize(&[l1], 0, 1, &without)).tsc_deadline_timer);
    }

    #[test]
    fn brand_string_and_paravirtual_leaves() {
        let mut features = entry(LEAF_KVM_FEATURES, 0);
        features.eax = u32::MAX;
        features.edx = 1; // KVM_HINTS_REALTIME
        let out = normalize(&[entry(LEAF_EXT_MAX, 0), features], 0, 2, &inputs());
        let v = view(&out);
        assert_eq!(v.brand, "Test CPU @ 2.10GHz");
        assert!(find(&out, LEAF_EXT_MAX, 0).eax >= 0x8000_0004);
        assert_eq!(v.hypervisor, "KVMKVMKVM");
        assert_eq!(find(&out, LEAF_KVM_SIGNATURE, 0).eax, LEAF_TIMING);
        assert_eq!(v.tsc_khz, Some(2_100_000));
        assert!(v.kvmclock_stable);
        assert!(v.kvm_features.contains(&"clocksource2"));
        assert!(!v.kvm_features.contains(&"hc_map_gpa_range"));
        assert!(!v.kvm_features.contains(&"migration_control"));
        assert_eq!(find(&out, LEAF_KVM_FEATURES, 0).edx, 0);
        // Without a TSC frequency the timing leaf is absent and not advertised.
        let none = CpuidInputs { tsc_khz: None, ..inputs() };
        let out = normalize(&[], 0, 1, &none);
        assert_eq!(find(&out, LEAF_KVM_SIGNATURE, 0).eax, LEAF_KVM_FEATURES);
        assert!(out.iter().all(|e| e.function != LEAF_TIMING));
        // An over-long brand keeps its terminating NUL.
        let long = brand_registers(&"x".repeat(60));
        assert_eq!(long[11] >> 24, 0);
    }

    #[test]
    fn topoext_only_on_amd_with_the_topology_leaf() {
        let mut vendor = entry(0, 0);
        (vendor.ebx, vendor.edx, vendor.ecx) = (0x6874_7541, 0x6974_6e65, 0x444d_4163);
        let ext = entry(LEAF_EXT_FEATURES, 0);
        let amd = [vendor, ext, entry(LEAF_AMD_TOPOLOGY, 0)];
        assert!(view(&normalize(&amd, 1, 2, &inputs())).topoext);
        assert!(!view(&normalize(&amd[..2], 1, 2, &inputs())).topoext);
        assert!(!view(&normalize(&[entry(0, 0), ext], 1, 2, &inputs())).topoext);
        let t = find(&normalize(&amd, 1, 2, &inputs()), LEAF_AMD_TOPOLOGY, 0);
        assert_eq!((t.eax, t.ebx & 0xff, (t.ebx >> 8) & 0xff), (1, 1, 0));
    }
}
