//! CPUID as each vCPU sees it: what KVM supports, normalised so that the guest is told it runs
//! under a hypervisor, sees a topology that matches the vCPU count (one core per vCPU, one thread
//! per core, one socket), and is not offered what the VMM cannot back.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX bit 31: "running under a hypervisor".
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX bit 3: MONITOR/MWAIT, which a vCPU should not use to idle.
const LEAF1_ECX_MONITOR: u32 = 1 << 3;
/// Leaf 6: thermal and power management; nothing behind it in a VM.
const LEAF_THERMAL: u32 = 0x6;
/// Leaves whose topology the VMM rewrites.
const LEAF_CACHE_INTEL: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
/// x2APIC topology level types (leaf 0xB ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `count` APIC ids.
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Rewrites `entries` for vCPU `index` of `count`. Leaf 0x1F, which KVM may pass through, is
/// dropped so the guest uses leaf 0xB, whose meaning we control.
pub fn normalize(entries: &[kvm_cpuid_entry2], index: u8, count: u8) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(index);
    let count32 = u32::from(count);
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let mut e = *entry;
        match e.function {
            LEAF_TOPOLOGY_V2 => continue,
            1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (count32 << 16) | (apic_id << 24);
                e.ecx = (e.ecx | LEAF1_ECX_HYPERVISOR) & !LEAF1_ECX_MONITOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            LEAF_CACHE_INTEL => {
                // EAX[31:26]: cores per package - 1; [25:14]: logical CPUs sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count32 - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count32 - 1) << 26) | (sharing << 14);
            }
            LEAF_THERMAL => {
                e.eax = 0;
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
    out
}

/// Builds the CPUID for one vCPU from what KVM supports.
pub fn for_vcpu(
    supported: &CpuId,
    index: u8,
    count: u8,
) -> Result<CpuId, vmm_sys_util::fam::Error> {
    CpuId::from_entries(&normalize(supported.as_slice(), index, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0x0008_0800, ..Default::default() }
    }

    #[test]
    fn topology_matches_vcpu_count() {
        let supported = [leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1), leaf(0x1f, 0), leaf(6, 0)];
        let out = normalize(&supported, 3, 4);
        assert!(out.iter().all(|e| e.function != 0x1f));
        let l1 = out.iter().find(|e| e.function == 1).copied().unwrap_or_default();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let core =
            out.iter().find(|e| e.function == 0xb && e.index == 1).copied().unwrap_or_default();
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, LEVEL_CORE, 3));
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut l1 = leaf(1, 0);
        l1.edx = LEAF1_EDX_HTT;
        let out = normalize(&[l1], 0, 1);
        assert_eq!(out[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(32), 5);
    }
}
