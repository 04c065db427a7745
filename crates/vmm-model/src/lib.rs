//! The IsoCell VMM's pure model: what a VM configuration becomes, computed without KVM.
//!
//! [`device_plan::DevicePlan`] places every device, [`kernel_cmdline`] builds the kernel command
//! line, [`acpi`] the ACPI tables and [`descriptions`] how the guest learns its machine;
//! [`seccomp`] holds the VMM threads' syscall allow-lists and [`host_check`] the host check that
//! only reads files. `isocell-vmm` builds its VMs from these; `isocell` (and the lifecycle
//! library) plans, measures and describes cells from them without linking any KVM code.

pub mod acpi;
pub mod config;
pub mod device_plan;
pub mod devices;
pub mod host_check;
pub mod layout;
pub mod seccomp;

use isocell_spec::{ConsoleConfig, VmConfig};

use device_plan::{DeviceKind, DevicePlan};

/// Kernel arguments every cell gets: reboot through the i8042 (which stops the VM) at once
/// (`f`: no `machine_shutdown`, whose IOAPIC clear-out alone is ~290 trapped register accesses,
/// for a machine that is about to be destroyed: the full cycle 0.98x, same run), no panic
/// reboot (so the panic loop's LED blink reports it), no PCI or modules, and no PS/2 devices to
/// probe. Nothing is checked that the VMM already guarantees: the in-kernel IOAPIC and PIT
/// deliver the timer (`no_timer_check` skips waiting ticks to prove it) and the TSC is KVM's
/// (`tsc=reliable`: no clocksource watchdog compares it with kvm-clock twice a second, which
/// after a snapshot restore found a skew, marked the TSC unstable and patched the guest's
/// sched_clock code: a fifth of the page faults before the agent answered). A one-vCPU kernel
/// keeps its `lock` prefixes (`noreplace-smp`): rewriting each of its ~6,000 into a no-op is a
/// `text_poke` apiece, each switching page tables twice, for a short life of atomics a few
/// cycles cheaper. In the nested host, where each switch also flushes the emulator's TLB, it was
/// a sixth of the guest's running time during boot (sampled guest RIPs).
pub const BASE_KERNEL_ARGS: &str = concat!(
    "reboot=k,f panic=0 pci=off nomodule i8042.noaux i8042.nomux i8042.nokbd ",
    "tsc=reliable no_timer_check noreplace-smp"
);

/// The full kernel command line for a configuration and its device plan.
pub fn kernel_cmdline(config: &VmConfig, plan: &DevicePlan) -> String {
    let mut args = vec![BASE_KERNEL_ARGS.to_owned()];
    args.push(match config.console {
        ConsoleConfig::Off => "8250.nr_uarts=0".to_owned(),
        _ => "console=ttyS0".to_owned(),
    });
    for d in &plan.devices {
        if let DeviceKind::VirtioBlock { root: true, read_only, guest_name, .. } = &d.kind {
            args.push(format!("root=/dev/{guest_name} {}", if *read_only { "ro" } else { "rw" }));
        }
    }
    args.extend(plan.kernel_args());
    if !config.boot_args.is_empty() {
        args.push(config.boot_args.clone());
    }
    args.join(" ")
}

/// How the guest can learn its machine: every VM carries all three descriptions, so a kernel
/// built either way finds its CPUs and devices.
pub fn descriptions(config: &VmConfig, plan: &DevicePlan) -> serde_json::Value {
    let acpi = match acpi::build(config.vcpus, plan) {
        Ok(t) => serde_json::json!({ "e820": t.extent(), "tables": t.tables }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    serde_json::json!({
        "kernel_cmdline": plan.kernel_args(),
        "mp_table": { "address": layout::EBDA_START, "cpus": config.vcpus },
        "acpi": acpi,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cmdline_names_the_root_drive_and_every_virtio_window() {
        let mut c = VmConfig::new("/k");
        c.drives.push(isocell_spec::DriveConfig {
            id: "root".into(),
            path: "/r".into(),
            read_only: true,
            root: true,
            placement: None,
        });
        c.boot_args = "init=/x".into();
        let plan = DevicePlan::new(&c).unwrap();
        let line = kernel_cmdline(&c, &plan);
        assert!(line.starts_with(BASE_KERNEL_ARGS), "{line}");
        assert!(line.contains(" console=ttyS0 root=/dev/vda ro "), "{line}");
        assert!(line.contains("virtio_mmio.device=4K@0xd0001000:5"), "{line}");
        assert!(line.ends_with(" init=/x"), "{line}");
        c.console = ConsoleConfig::Off;
        assert!(kernel_cmdline(&c, &plan).contains("8250.nr_uarts=0"));
    }

    #[test]
    fn descriptions_carry_all_three() {
        let c = VmConfig::new("/k");
        let plan = DevicePlan::new(&c).unwrap();
        let d = descriptions(&c, &plan);
        assert_eq!(d["mp_table"]["address"], layout::EBDA_START);
        let sigs: Vec<_> = d["acpi"]["tables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["signature"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(sigs, ["RSD PTR ", "XSDT", "FACP", "APIC", "DSDT"]);
        assert_eq!(d["kernel_cmdline"].as_array().unwrap().len(), plan.virtio_devices().count());
    }
}
