//! Refuses, at once and with a clear message, to start on a host whose /dev/kvm cannot boot a
//! normal Linux guest. On our development machines /dev/kvm is kvm-pvm, a software hypervisor
//! that only runs PVM-aware kernels: without this check a guest would get through early boot and
//! die with an internal error seconds later.
//!
//! This part only looks at files (/sys/module, /proc/cpuinfo, and whether /dev/kvm opens); the
//! VMM checks /dev/kvm's capabilities itself, with KVM ioctls.

use std::path::Path;

const WHAT_TO_DO: &str = "Run cells on a host with VT-x or AMD-V (vmx or svm in /proc/cpuinfo), \
or inside IsoCell's nested test host, which provides real KVM under QEMU: \
`cargo run -p isocell-testhost -- vmm -- ARGS...` (see README.md)";

/// Why this host cannot run a cell.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    /// /dev/kvm is kvm-pvm.
    #[error(
        "/dev/kvm on this host is kvm-pvm, a software hypervisor that runs only PVM-aware guest kernels; \
         the cell kernel needs hardware virtualization. {WHAT_TO_DO}"
    )]
    Pvm,
    /// The CPU does not advertise VMX or SVM.
    #[error("this CPU does not offer hardware virtualization (no vmx or svm flag). {WHAT_TO_DO}")]
    NoHardwareVirt,
    /// /dev/kvm is missing or cannot be opened.
    #[error("/dev/kvm is missing or not accessible ({0}): load kvm_intel or kvm_amd and check its permissions, or {WHAT_TO_DO}")]
    NoKvm(String),
    /// KVM lacks a capability the VMM relies on.
    #[error("KVM on this host lacks {0}, which the VMM needs")]
    MissingCapability(&'static str),
}

/// Decides from the facts the host shows.
pub fn classify(pvm_loaded: bool, cpuinfo: &str) -> Result<(), HostError> {
    if pvm_loaded {
        return Err(HostError::Pvm);
    }
    let has_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm");
    if has_flag {
        Ok(())
    } else {
        Err(HostError::NoHardwareVirt)
    }
}

/// Checks this host.
pub fn check() -> Result<(), HostError> {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify(pvm, &cpuinfo)?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| HostError::NoKvm(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_is_refused_even_with_flags() {
        assert_eq!(classify(true, "flags\t: fpu vmx"), Err(HostError::Pvm));
        let msg = HostError::Pvm.to_string();
        assert!(msg.contains("kvm-pvm") && msg.contains("nested test host"), "{msg}");
    }

    #[test]
    fn needs_vmx_or_svm() {
        assert_eq!(classify(false, "flags\t: fpu sse2 hypervisor"), Err(HostError::NoHardwareVirt));
        assert_eq!(classify(false, "flags\t: fpu svm"), Ok(()));
        assert_eq!(classify(false, "flags\t\t: vmx ept"), Ok(()));
        // A flag name inside another word does not count.
        assert_eq!(classify(false, "flags\t: vmx_ept"), Err(HostError::NoHardwareVirt));
    }
}
