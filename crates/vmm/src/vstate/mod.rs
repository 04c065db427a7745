//! KVM state: the VM with its memory and irqchip, and the vCPUs.

pub mod vcpu;
pub mod vm;
