//! x86_64 guest setup: memory layout, CPUID, MSRs, registers, MP table, ACPI tables and the
//! Linux boot protocol.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub use isocell_vmm_model::layout;
pub mod mptable;
pub mod msrs;
pub mod regs;
