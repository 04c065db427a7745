//! Refuses, at once and with a clear message, to start on a host whose /dev/kvm cannot boot a
//! normal Linux guest. The check that only reads files ([`check`], [`classify`]) is
//! [`isocell_vmm_model::host_check`], re-exported here; the KVM capability check is here.

pub use isocell_vmm_model::host_check::*;

/// Checks the KVM capabilities the VMM uses.
pub fn check_capabilities(kvm: &kvm_ioctls::Kvm) -> Result<(), HostError> {
    use kvm_ioctls::Cap;
    let needed = [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    ];
    for (cap, name) in needed {
        if !kvm.check_extension(cap) {
            return Err(HostError::MissingCapability(name));
        }
    }
    Ok(())
}
