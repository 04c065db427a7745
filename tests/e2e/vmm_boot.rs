//! End-to-end tests of `isocell-vmm`: real guests boot through the test host (directly on
//! hardware KVM, in the nested host elsewhere); bad configurations and the host check run
//! locally, since they must fail before any VM exists.

use std::path::Path;
use std::process::Command;

use isocell_e2e::{
    local_bzimage, local_vmm, step, DATA_DISK_BYTES, RESET_DISK_BYTES, RESET_VSOCK_BYTES,
};
use serde_json::Value;

fn report(name: &str) -> &'static Value {
    let r = step(name);
    r.report.as_ref().unwrap_or_else(|| panic!("no VMM report\n{}", r.explain()))
}

/// The guest saw `cpus` CPUs and all of `memory_mib` in its e820 map (less the legacy hole and
/// the first page, which the boot protocol keeps from it).
fn assert_guest_saw(name: &str, cpus: u64, memory_mib: u64) {
    let r = step(name);
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    let g = r.guest_result();
    assert_eq!(g["cpus"], cpus, "{}", r.explain());
    let expected_online = if cpus == 1 { "0".to_owned() } else { format!("0-{}", cpus - 1) };
    assert_eq!(g["online"], expected_online.as_str());
    let e820_kb = g["mem_e820_kb"].as_u64().unwrap_or(0);
    let configured_kb = memory_mib * 1024;
    assert!(
        e820_kb <= configured_kb && e820_kb >= configured_kb - 1024,
        "guest found {e820_kb} kB of RAM for {configured_kb} kB configured\n{}",
        r.explain()
    );
    let rep = report(name);
    assert_eq!(rep["exit_reason"], "reboot");
    assert_eq!(rep["vcpus"], cpus);
    assert!(rep["phases"]["guest_init_us"].as_u64().is_some(), "boot timer never fired: {rep}");
}

#[test]
fn one_vcpu_guest_sees_its_cpu_and_memory() {
    assert_guest_saw("boot-1cpu", 1, 128);
}

#[test]
fn the_guest_cpu_has_a_tsc_deadline_timer_a_brand_and_a_hypervisor() {
    let r = step("boot-1cpu");
    let g = r.guest_result();
    assert_eq!(g["tsc_deadline_timer"], true, "{}", r.explain());
    assert_eq!(g["hypervisor"], true, "{g}");
    assert!(!g["model_name"].as_str().unwrap_or("").is_empty(), "no brand string: {g}");
    // The cell kernel has no ACPI; it found everything through the command line and MP table.
    assert_eq!(g["acpi"], false, "{g}");
}

/// Seconds all CPUs spent idle before init, and whether the guest saw the TSC-deadline timer.
fn idle_at_init(name: &str) -> (f64, bool) {
    let r = step(name);
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    let g = r.guest_result();
    let idle =
        g["idle_at_init"].as_f64().unwrap_or_else(|| panic!("no idle figure: {}", r.explain()));
    (idle, g["tsc_deadline_timer"] == true)
}

#[test]
fn with_the_tsc_deadline_timer_the_guest_does_not_sit_idle_before_init() {
    let (with, seen) = idle_at_init("idle-tsc-deadline");
    let (without, seen_without) = idle_at_init("idle-no-tsc-deadline");
    assert!(seen && !seen_without, "clearcpuid did not take the flag away");
    // Same kernel, same host, same run: the only difference is the LAPIC timer's calibration
    // against the PIT, which the kernel spends idle.
    assert!(
        with < without,
        "idle before init: {with} s with the TSC-deadline timer, {without} s without"
    );
}

/// A step of the ACPI-only kernel: it found every device and CPU through ACPI and powered off.
fn assert_acpi_guest(name: &str, cpus: u64, blocks: &str) {
    let r = step(name);
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    let rep = report(name);
    assert_eq!(rep["exit_reason"], "poweroff", "{}", r.explain());
    let g = r.guest_result();
    assert_eq!(g["acpi"], true, "{}", r.explain());
    assert_eq!(g["cpus"], cpus, "{}", r.explain());
    assert_eq!(g["blocks"].as_str().unwrap_or("").trim(), blocks, "{g}");
    assert_eq!(g["root_dev"], "/dev/root", "{g}");
    assert!(g["rng_current"].as_str().unwrap_or("").starts_with("virtio_rng"), "{g}");
    assert_eq!(g["hwrng_bytes"], 32, "{g}");
    // The devices came from the DSDT (named by their ACPI id), not from the command line.
    let mmio = g["virtio_mmio"].as_str().unwrap_or("");
    assert!(mmio.contains("LNRO0005") && !mmio.contains("virtio-mmio."), "{g}");
    assert_eq!(g["tsc_deadline_timer"], true, "{g}");
    assert!(rep["phases"]["guest_init_us"].as_u64().is_some(), "boot timer never fired: {rep}");
}

#[test]
fn acpi_only_kernel_finds_its_devices_and_powers_off_with_one_vcpu() {
    assert_acpi_guest("acpi-1cpu", 1, "vda vdb");
}

#[test]
fn acpi_only_kernel_finds_both_vcpus() {
    assert_acpi_guest("acpi-2cpu", 2, "vda");
    assert_eq!(step("acpi-2cpu").guest_result()["online"], "0-1");
}

#[test]
fn four_vcpu_guest_from_a_config_file_sees_all_cpus() {
    assert_guest_saw("boot-4cpu-config-file", 4, 256);
}

#[test]
fn elf_vmlinux_boots_with_console_to_a_file() {
    let r = step("boot-elf-vmlinux");
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    // The console went to the file, not to stdout, so stdout has no result line.
    assert!(r.guest_results.is_empty(), "{}", r.explain());
    assert_eq!(report("boot-elf-vmlinux")["exit_reason"], "reboot");
}

#[test]
fn read_only_root_refuses_writes() {
    let r = step("read-only-root");
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    let g = r.guest_result();
    assert_eq!(g["root_write"], "refused", "{}", r.explain());
    assert!(g["root_options"].as_str().unwrap_or("").split(',').any(|o| o == "ro"), "{g}");
}

#[test]
fn data_disk_writes_reach_the_host_file() {
    let r = step("data-disk");
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    let g = r.guest_result();
    assert_eq!(g["bytes"], DATA_DISK_BYTES, "{}", r.explain());
    let guest_hash = g["sha256"].as_str().unwrap_or("");
    assert_eq!(guest_hash.len(), 64, "{g}");
    // Random bytes: an all-zero disk would hash differently.
    assert_eq!(
        r.hashes.get("{work}/data.img").map(String::as_str),
        Some(guest_hash),
        "{}",
        r.explain()
    );
}

#[test]
fn initrd_becomes_the_root_filesystem() {
    let r = step("initrd");
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    assert_eq!(r.guest_result()["root_fstype"], "rootfs", "{}", r.explain());
}

#[test]
fn virtio_rng_feeds_the_guest() {
    let r = step("rng");
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    let g = r.guest_result();
    assert!(g["rng_current"].as_str().unwrap_or("").starts_with("virtio_rng"), "{}", r.explain());
    assert_eq!(g["hwrng_bytes"], 32);
}

#[test]
fn guest_panic_gives_exit_status_3() {
    let r = step("panic");
    assert_eq!(r.exit_code, Some(3), "{}", r.explain());
    assert_eq!(report("panic")["exit_reason"], "guest_panic");
    assert!(r.stderr.contains("panicked"), "{}", r.explain());
}

#[test]
fn lifetime_limit_stops_a_guest_that_never_ends() {
    let r = step("lifetime");
    assert_eq!(r.exit_code, Some(6), "{}", r.explain());
    assert!(!r.timed_out);
    assert_eq!(report("lifetime")["exit_reason"], "lifetime_exceeded");
}

#[test]
fn hung_guest_fails_at_the_bound_with_its_console() {
    let r = step("hung-guest");
    assert!(r.timed_out, "{}", r.explain());
    assert_eq!(r.signal, Some(9));
    assert!(r.explain().contains("hanging on purpose"), "{}", r.explain());
}

#[test]
fn every_virtio_device_works_again_after_the_guest_resets_it_twice() {
    let r = step("device-reset");
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    assert_eq!(report("device-reset")["exit_reason"], "reboot", "{}", r.explain());
    let g = r.guest_result();
    // Two disks, the rng and vsock; each driver let go of its device and took it back, twice.
    assert_eq!(g["devices"], 4, "{}", r.explain());
    assert_eq!(g["rebound"], 8, "failed: {}\n{}", g["failed"], r.explain());
    let before = g["drivers_before"].as_str().unwrap_or("");
    for driver in ["virtio_blk", "virtio_rng", "vmw_vsock_virtio_transport"] {
        assert!(before.contains(driver), "{driver} missing: {g}");
    }
    assert_eq!(g["drivers_after"], before, "{g}");
    // The data disk: what the guest wrote after the resets reads back and reached the file.
    assert_eq!(g["disk_ok"], true, "{g}");
    assert_eq!(g["disk_bytes"], RESET_DISK_BYTES, "{g}");
    let guest_hash = g["disk_sha256"].as_str().unwrap_or("");
    assert_eq!(r.hashes.get("{work}/data.img").map(String::as_str), Some(guest_hash), "{g}");
    assert!(g["rng_current"].as_str().unwrap_or("").starts_with("virtio_rng"), "{g}");
    assert_eq!(g["hwrng_bytes"], 32, "{g}");
    // A new connection after the resets carries every byte there and back.
    let v = &g["vsock"];
    assert_eq!(v["ok"], true, "{g}\n{}", r.explain());
    assert_eq!(v["bytes"], RESET_VSOCK_BYTES, "{g}");
    assert_eq!(v["received"], RESET_VSOCK_BYTES, "{g}");
    // The connection held across the resets ended in the guest (its driver went away)...
    assert!(g["held"]["ended"].is_string() && g["held"]["ended"] != "timeout", "{g}");
    // ...and on the host when the device reset, not when the VMM exited: before the guest's
    // new connection arrived.
    let log = |what: &str| {
        r.stderr.find(what).unwrap_or_else(|| {
            panic!("the host's echo server never said {what:?}\n{}", r.explain())
        })
    };
    assert!(
        log("host: unix-echo: connection 1 ended") < log("host: unix-echo: connection 2 accepted"),
        "the VMM kept the host's connection open across the device reset\n{}",
        r.explain()
    );
    let echoed = format!("connection 2 ended (eof) after echoing {RESET_VSOCK_BYTES} bytes");
    assert!(r.stderr.contains(&echoed), "{}", r.explain());
}

/// Runs the local VMM, which must refuse before creating anything.
fn refuse(args: &[&str]) -> (i32, String) {
    let out = Command::new(local_vmm())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the VMM: {e}"));
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn temp(name: &str, contents: &[u8]) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("isocell-e2e-{}-{name}", std::process::id()));
    std::fs::write(&p, contents).unwrap_or_else(|e| panic!("{e}"));
    p
}

#[test]
fn bad_configurations_exit_2_with_a_clear_message() {
    let kernel = local_bzimage();
    let k = kernel.to_str().unwrap_or_default();
    let not_a_kernel = temp("notkernel", b"#!/bin/sh\n");
    let nk = not_a_kernel.to_str().unwrap_or_default();
    let overlap = temp(
        "overlap.json",
        format!(
            r#"{{"kernel": "{k}", "drives": [
                {{"id": "a", "path": "{k}", "read_only": true, "placement": {{"mmio_base": 3489669120, "irq": 5}}}},
                {{"id": "b", "path": "{k}", "read_only": true, "placement": {{"mmio_base": 3489669120, "irq": 6}}}}]}}"#
        )
        .as_bytes(),
    );
    let ov = overlap.to_str().unwrap_or_default();
    let cases: &[(&[&str], &str)] = &[
        (&["--kernel", "/nonexistent/vmlinux"], "kernel /nonexistent/vmlinux cannot be opened"),
        (&["--kernel", nk], "neither an ELF vmlinux nor a bzImage"),
        (
            &["--kernel", k, "--drive", "id=root,path=/nonexistent.img,ro,root"],
            "image /nonexistent.img cannot be opened",
        ),
        (&["--kernel", k, "--memory", "0"], "give between 32 MiB and 1 TiB"),
        (&["--kernel", k, "--memory", "900G"], "MiB"),
        (&["--kernel", k, "--cpus", "0"], "vcpus is 0"),
        (&["--kernel", k, "--cpus", "1000"], "vcpus is 1000"),
        (&["--config", ov], "overlap"),
        (&["--config", "/nonexistent.json"], "cannot read the config file"),
        (&["--kernel", k, "--drive", "path=/x"], "missing id"),
        (&["--kernel", k, "--bogus-flag"], "--bogus-flag"),
    ];
    for (args, expected) in cases {
        let (code, stderr) = refuse(args);
        assert_eq!(code, 2, "{args:?} gave status {code}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in: {stderr}");
    }
    for p in [not_a_kernel, overlap] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn a_host_without_hardware_virtualization_is_refused_at_once() {
    let kernel = local_bzimage();
    let started = std::time::Instant::now();
    let (code, stderr) =
        refuse(&["--kernel", kernel.to_str().unwrap_or_default(), "--max-lifetime", "30"]);
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(code, 5, "{stderr}");
        assert!(stderr.contains("kvm-pvm") && stderr.contains("nested test host"), "{stderr}");
        // "At once": long before any guest could have run into trouble.
        assert!(started.elapsed().as_secs() < 5, "took {:?}", started.elapsed());
    } else if isocell_vmm_host_has_virt() {
        assert_ne!(code, 5, "a hardware-virtualization host was refused: {stderr}");
    } else {
        assert_eq!(code, 5, "{stderr}");
        assert!(stderr.contains("no vmx or svm"), "{stderr}");
    }
}

fn isocell_vmm_host_has_virt() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo.split_whitespace().any(|f| f == "vmx" || f == "svm")
}

#[test]
fn describe_lists_every_device_with_its_place() {
    let kernel = local_bzimage();
    let out = Command::new(local_vmm())
        .args(["--kernel", kernel.to_str().unwrap_or_default(), "--cpus", "2", "--describe"])
        .args(["--drive", &format!("id=root,path={},ro,root", kernel.display())])
        .output()
        .unwrap_or_else(|e| panic!("cannot run the VMM: {e}"));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let d: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON: {e}"));
    let devices = d["devices"].as_array().cloned().unwrap_or_default();
    let ids: Vec<&str> = devices.iter().filter_map(|x| x["id"].as_str()).collect();
    assert_eq!(ids, ["serial0", "i8042", "acpi_sleep", "boot_timer", "root", "rng0"]);
    let root = devices.iter().find(|d| d["id"] == "root").cloned().unwrap_or_default();
    assert_eq!(root["type"], "virtio_block");
    assert_eq!(root["read_only"], true);
    assert_eq!(root["irq"], 5);
    assert_eq!(root["ranges"][0]["base"], 0xd000_1000u64);
    let features: Vec<&str> = root["features"]
        .as_array()
        .map(|f| f.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    assert!(
        features.contains(&"VIRTIO_BLK_F_RO") && features.contains(&"VIRTIO_F_VERSION_1"),
        "{features:?}"
    );
    // Every VM carries all three descriptions of its machine.
    let tables: Vec<&str> = d["descriptions"]["acpi"]["tables"]
        .as_array()
        .map(|t| t.iter().filter_map(|x| x["signature"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(tables, ["RSD PTR ", "XSDT", "FACP", "APIC", "DSDT"], "{d}");
    assert_eq!(d["descriptions"]["mp_table"]["cpus"], 2);
    assert_eq!(d["descriptions"]["kernel_cmdline"][0], "virtio_mmio.device=4K@0xd0001000:5");
    // The CPUID vCPU 0 would see, where this host's /dev/kvm can say.
    let cpuid = &d["cpuid"];
    if cpuid.get("unavailable").is_none() {
        assert_eq!(cpuid["hypervisor"], "KVMKVMKVM", "{cpuid}");
        assert!(cpuid["leaves"].as_array().is_some_and(|l| l.len() > 10), "{cpuid}");
        assert!(!cpuid["brand"].as_str().unwrap_or("").is_empty(), "{cpuid}");
    }
    let cmdline = d["kernel_cmdline"].as_str().unwrap_or("");
    assert!(
        cmdline.contains("virtio_mmio.device=4K@0xd0001000:5")
            && cmdline.contains("root=/dev/vda ro"),
        "{cmdline}"
    );
}

#[test]
fn the_seccomp_trap_mode_names_the_refused_call_and_its_thread() {
    let r = step("seccomp-trap");
    // 128 + SIGSYS: the trap handler's own exit, not a kill.
    assert_eq!(r.exit_code, Some(159), "{}", r.explain());
    assert!(
        r.stderr
            .contains("the virtio-rng thread made syscall 41 (socket), which its filter refuses"),
        "{}",
        r.explain()
    );
}

#[test]
fn a_saved_guest_restores_twice_from_an_unchanged_snapshot_and_a_misfit_is_refused() {
    let r = step("snapshot");
    let out = &r.stdout;
    eprintln!("{out}");
    assert!(out.contains("save rc=0"), "{}", r.explain());
    assert_eq!(report("snapshot")["exit_reason"], "saved");
    // The saved VM never went on past the point it was saved at.
    assert!(out.contains("saved-vm-results 0"), "{}", r.explain());
    assert!(out.contains("restore1 rc=0") && out.contains("restore2 rc=0"), "{}", r.explain());
    let results: Vec<Value> = out
        .lines()
        .filter_map(|l| l.strip_prefix("ISOCELL-RESULT "))
        .map(|j| serde_json::from_str(j).unwrap_or_else(|e| panic!("{e}: {j}")))
        .collect();
    assert_eq!(results.len(), 2, "{}", r.explain());
    for g in &results {
        assert_eq!(g["restored"], true);
        assert_eq!(g["hwrng"].as_str().map(str::len), Some(32), "{}", r.explain());
    }
    // The rng device works in each copy, from the host's entropy: the copies differ.
    assert_ne!(results[0]["hwrng"], results[1]["hwrng"]);
    assert!(out.contains("memory-unchanged"), "{}", r.explain());
    for refused in ["other-cmdline rc=2", "other-memory rc=2", "short-memory rc=2"] {
        assert!(out.contains(refused), "{refused}\n{}", r.explain());
    }
    assert!(out.contains("kernel command line: the snapshot has"), "{}", r.explain());
    assert!(out.contains("memory: the snapshot has 128 MiB, this VM 256 MiB"), "{}", r.explain());
    assert!(out.contains("the file holds 1000 bytes"), "{}", r.explain());
    // The restored VM's own report: it stopped as a cold-booted one does.
    let restored: Value = out
        .split_once("restore-report")
        .and_then(|(_, j)| serde_json::from_str(j.trim()).ok())
        .unwrap_or_else(|| panic!("no restore report\n{}", r.explain()));
    assert_eq!(restored["exit_reason"], "reboot", "{restored}");
}
