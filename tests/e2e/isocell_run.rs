//! End-to-end tests of `isocell run`: each boots real cells with the agent through the test
//! host (directly on hardware KVM, in the nested host elsewhere). All cell runs are batched into
//! one scenario so the nested host boots once for this file.

use std::process::Command;
use std::sync::OnceLock;

use isocell_e2e::{result_of, run_scenario, shell_step, Results};
use isocell_testhost::{Scenario, Step, StepResult, TestHost};

fn scenario() -> Scenario {
    let run = "ISOCELL_RUN_DIR={work}/run ISOCELL_STATE_DIR={work}/state {isocell} run";
    let isocell = "ISOCELL_STATE_DIR={work}/state {isocell}";
    let mut echo = shell_step(
        "echo",
        &format!("{run} --report {{work}}/run.json -- echo hello-from-a-cell"),
        120,
    );
    echo.report_file = Some("{work}/run.json".into());
    let mut big = shell_step(
        "big-output",
        &format!(
            "{run} -- sh -c 'head -c 16777216 /dev/urandom > /tmp/big; sha256sum /tmp/big >&2; cat /tmp/big' > {{work}}/big.out"
        ),
        300,
    );
    big.hash_files = vec!["{work}/big.out".into()];
    let mut input = shell_step(
        "input",
        &format!(
            "head -c 3000000 /dev/urandom > {{work}}/in.bin && mkdir -p {{work}}/tree/sub && echo nested-file > {{work}}/tree/sub/f.txt && \
             {run} --input {{work}}/in.bin:/data/in.bin --input {{work}}/tree:/data/tree -- sh -c 'sha256sum /data/in.bin; cat /data/tree/sub/f.txt'"
        ),
        180,
    );
    input.hash_files = vec!["{work}/in.bin".into()];
    let mut output = shell_step(
        "output",
        &format!(
            "mkdir -p {{work}}/od && {run} --output /tmp/out.bin:{{work}}/out.bin --output /tmp/od:{{work}}/od/tree -- \
             sh -c 'head -c 2000000 /dev/urandom > /tmp/out.bin; mkdir -p /tmp/od/deep; echo deep-file > /tmp/od/deep/x.txt; sha256sum /tmp/out.bin' \
             && cat {{work}}/od/tree/deep/x.txt"
        ),
        180,
    );
    output.hash_files = vec!["{work}/out.bin".into()];
    Scenario {
        steps: vec![
            echo,
            shell_step("exit-42", &format!("{run} -- sh -c 'exit 42'"), 120),
            // A kernel that finds its devices through ACPI only: the agent reaches the host over
            // vsock, the command runs on the read-only root, and the cell ends as usual; with one
            // vCPU and with two.
            acpi_kernel_step("acpi-kernel-1cpu", run, 1),
            acpi_kernel_step("acpi-kernel", run, 2),
            shell_step("streams", &format!("{run} -- sh -c 'echo to-stdout; echo to-stderr >&2'"), 120),
            big,
            input,
            output,
            shell_step(
                "timeout",
                &format!(
                    "{run} --timeout 3 -- sleep 1000; echo status=$?; \
                     echo leftover_vmms=$(ps -o args | grep -c '^[^ ]*isocell-vm[m]'); \
                     echo leftover_files=$(ls -A {{work}}/run | wc -l); \
                     echo leftover_cgroups=$(find /sys/fs/cgroup/isocell -mindepth 1 -type d 2>/dev/null | wc -l)"
                ),
                180,
            ),
            shell_step(
                "interrupt",
                &format!(
                    "{run} -- sleep 1000 & pid=$!; sleep 10; kill -INT $pid; wait $pid; echo status=$?; \
                     echo leftover_vmms=$(ps -o args | grep -c '^[^ ]*isocell-vm[m]'); \
                     echo leftover_files=$(ls -A {{work}}/run | wc -l); \
                     echo leftover_cgroups=$(find /sys/fs/cgroup/isocell -mindepth 1 -type d 2>/dev/null | wc -l)"
                ),
                180,
            ),
            shell_step(
                "ephemeral",
                &format!(
                    "{run} -- sh -c 'echo secret > /persist.txt && cat /persist.txt' && \
                     {run} -- sh -c 'if [ -e /persist.txt ]; then echo present; else echo absent; fi'"
                ),
                180,
            ),
            shell_step(
                "concurrent",
                &format!(
                    "({run} -- echo one > {{work}}/a; echo $? > {{work}}/a.rc) & \
                     ({run} -- echo two > {{work}}/b; echo $? > {{work}}/b.rc) & wait; \
                     echo a=$(cat {{work}}/a) $(cat {{work}}/a.rc) b=$(cat {{work}}/b) $(cat {{work}}/b.rc); \
                     echo leftover_files=$(ls -A {{work}}/run | wc -l)"
                ),
                240,
            ),
            shell_step("not-found", &format!("{run} -- no-such-command --flag"), 120),
            shell_step(
                "background-process",
                &format!(
                    "({run} -- sh -c 'setsid sleep 1000 & sleep 3; echo started'; echo status=$?) > {{work}}/bg.out & \
                     i=0; until ls {{work}}/state/cells/*/launch.json >/dev/null 2>&1 || [ $i -ge 300 ]; do sleep 0.2; i=$((i+1)); done; \
                     sleep 1; pid=$(grep -ho '\"vmm_pid\": *[0-9]*' {{work}}/state/cells/*/launch.json | grep -o '[0-9]*$'); \
                     echo vmm_comm=$(cat /proc/$pid/comm); wait; cat {{work}}/bg.out"
                ),
                150,
            ),
            shell_step(
                "evidence",
                &format!(
                    "{run} --report {{work}}/r.json -- true && \
                     {isocell} audit verify && \
                     for f in {{work}}/state/cells/*/launch.json {{work}}/state/cells/*/exit.json; do {isocell} receipt verify $f || exit 9; done && \
                     cat {{work}}/state/cells/*/exit.json && \
                     {isocell} audit show | grep -o '\"kind\":\"[a-z_]*\"' | tr '\\n' ' '"
                ),
                120,
            ),
            // An initramfs whose /init never answers (the base image's, with the scenario init).
            shell_step(
                "agent-silent",
                &format!(
                    "ISOCELL_AGENT_INITRD={{initrd}} {run} --boot-timeout 15 --kernel-args 'isocell_scenario=hang' -- true"
                ),
                120,
            ),
            // The agent comes from the host's initramfs and mounts the image itself; the cell's
            // name and /etc files are its own; the command runs as the user it was given.
            shell_step(
                "identity",
                &format!(
                    "{run} -- sh -c 'echo hostname=$(hostname) file=$(cat /etc/hostname); cat /etc/hosts /etc/resolv.conf; \
                     echo cmdline: $(cat /proc/cmdline); echo agent=$(readlink /proc/1/exe); stat -c tmp=%a /tmp' && \
                     {run} --user 1000:1001 -- grep -E '^(Uid|Gid|Groups):' /proc/self/status"
                ),
                180,
            ),
            // An image the kernel cannot mount: one line on the console says so and the cell
            // stops at once, long before the boot timeout.
            shell_step(
                "bad-image",
                &format!(
                    "head -c 4194304 /dev/zero > {{work}}/zero.img && ISOCELL_IMAGE={{work}}/zero.img {run} --boot-timeout 100 -- true"
                ),
                150,
            ),
        ],
        ..Default::default()
    }
}

/// `isocell run` of the ACPI-only kernel with `cpus` vCPUs, listing what the guest found.
fn acpi_kernel_step(name: &str, run: &str, cpus: u8) -> Step {
    shell_step(
        name,
        &format!(
            "{run} --kernel {{acpi_bzimage}} --cpus {cpus} -- sh -c \
             'echo cpus=$(nproc) tables=$(ls /sys/firmware/acpi/tables | tr \"\\n\" \" \"); ls /sys/bus/platform/drivers/virtio-mmio | grep -c LNRO0005'"
        ),
        180,
    )
}

fn results() -> &'static Results {
    static RESULTS: OnceLock<Results> = OnceLock::new();
    RESULTS.get_or_init(|| run_scenario("isocell run", &scenario()))
}

fn step(name: &str) -> &'static StepResult {
    result_of(results(), name)
}

fn ok(name: &str) -> &'static StepResult {
    let r = step(name);
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    r
}

/// The first word of the first line that contains `path` (a `sha256sum` line).
fn hash_in(text: &str, path: &str) -> String {
    text.lines()
        .find(|l| l.contains(path))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn echo_runs_in_a_cell_and_reports_its_phases() {
    let r = ok("echo");
    assert_eq!(r.stdout.trim(), "hello-from-a-cell", "{}", r.explain());
    let report = r.report.as_ref().unwrap_or_else(|| panic!("no report\n{}", r.explain()));
    for phase in ["prepare_ms", "boot_ms", "agent_ready_ms", "exec_ms", "teardown_ms", "total_ms"] {
        assert!(report["phases"][phase].as_f64().is_some(), "{phase} missing: {report}");
    }
    // The host stopped the VMM once the command was done; the guest was not asked to power off.
    assert_eq!(report["vmm"]["exit_reason"], "stopped", "{report}");
    assert_eq!(report["vmm"]["exit_code"], 0, "{report}");
    assert!(report["vmm"]["phases"]["guest_init_us"].as_u64().is_some(), "{report}");
}

#[test]
fn a_cell_boots_a_kernel_that_finds_its_devices_through_acpi_only() {
    assert_acpi_cell("acpi-kernel-1cpu", 1);
    assert_acpi_cell("acpi-kernel", 2);
}

fn assert_acpi_cell(name: &str, cpus: u8) {
    let r = ok(name);
    let out = r.stdout.trim();
    assert!(out.contains(&format!("cpus={cpus} ")), "{}", r.explain());
    for table in ["APIC", "DSDT", "FACP"] {
        assert!(out.contains(table), "no {table} table: {}", r.explain());
    }
    // At least block (the root), vsock (this very command) and rng, all as LNRO0005 devices.
    let found: u32 = out.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    assert!(found >= 3, "{}", r.explain());
}

#[test]
fn exit_code_is_propagated() {
    let r = step("exit-42");
    assert_eq!(r.exit_code, Some(42), "{}", r.explain());
}

#[test]
fn stdout_and_stderr_are_kept_apart() {
    let r = ok("streams");
    assert_eq!(r.stdout.trim(), "to-stdout", "{}", r.explain());
    assert!(r.stderr.contains("to-stderr") && !r.stderr.contains("to-stdout"), "{}", r.explain());
}

#[test]
fn sixteen_mib_of_output_arrive_intact() {
    let r = ok("big-output");
    let inside = hash_in(&r.stderr, "/tmp/big");
    assert_eq!(inside.len(), 64, "{}", r.explain());
    assert_eq!(r.hashes.get("{work}/big.out"), Some(&inside), "{}", r.explain());
}

#[test]
fn input_files_and_trees_arrive_intact() {
    let r = ok("input");
    let inside = hash_in(&r.stdout, "/data/in.bin");
    assert_eq!(r.hashes.get("{work}/in.bin"), Some(&inside), "{}", r.explain());
    assert!(r.stdout.contains("nested-file"), "{}", r.explain());
}

#[test]
fn output_files_and_trees_come_back_intact() {
    let r = ok("output");
    let inside = hash_in(&r.stdout, "/tmp/out.bin");
    assert_eq!(r.hashes.get("{work}/out.bin"), Some(&inside), "{}", r.explain());
    assert!(r.stdout.contains("deep-file"), "{}", r.explain());
}

#[test]
fn timeout_kills_the_command_and_leaves_nothing_behind() {
    let r = ok("timeout");
    assert!(r.stdout.contains("status=124"), "{}", r.explain());
    assert!(r.stdout.contains("leftover_vmms=0"), "{}", r.explain());
    assert!(r.stdout.contains("leftover_files=0"), "{}", r.explain());
    assert!(r.stdout.contains("leftover_cgroups=0"), "{}", r.explain());
    assert!(r.stderr.contains("--timeout"), "{}", r.explain());
}

#[test]
fn ctrl_c_tears_the_cell_down_and_leaves_nothing_behind() {
    let r = ok("interrupt");
    assert!(r.stdout.contains("status=130"), "{}", r.explain());
    assert!(r.stdout.contains("leftover_vmms=0"), "{}", r.explain());
    assert!(r.stdout.contains("leftover_files=0"), "{}", r.explain());
    assert!(r.stdout.contains("leftover_cgroups=0"), "{}", r.explain());
}

#[test]
fn writes_do_not_survive_the_cell() {
    let r = ok("ephemeral");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines, ["secret", "absent"], "{}", r.explain());
}

#[test]
fn two_cells_at_once_both_succeed() {
    let r = ok("concurrent");
    assert!(r.stdout.contains("a=one 0 b=two 0"), "{}", r.explain());
    assert!(r.stdout.contains("leftover_files=0"), "{}", r.explain());
}

#[test]
fn a_run_leaves_verifiable_receipts_and_a_complete_audit_trail() {
    let r = ok("evidence");
    assert!(r.stdout.contains("audit log OK"), "{}", r.explain());
    assert_eq!(r.stdout.matches("receipt OK").count(), 2, "{}", r.explain());
    for check in ["vmm_process_gone", "guest_memory_released", "cell_files_removed"] {
        assert!(r.stdout.contains(&format!("\"{check}\": true")), "{check}\n{}", r.explain());
    }
    let kinds = r.stdout.lines().last().unwrap_or_default();
    for kind in ["admission", "create", "start", "exec", "exit", "teardown", "checkpoint"] {
        let needle = format!("\"kind\":\"{kind}\"");
        assert!(kinds.contains(&needle), "{kind} missing from {kinds}\n{}", r.explain());
    }
}

#[test]
fn a_background_process_does_not_hold_the_exit() {
    // Before: the agent waited for the setsid'd sleep to close the output pipes (1000 s), and
    // the step ran out of time.
    let r = step("background-process");
    assert!(r.stdout.contains("started\nstatus=0"), "{}", r.explain());
    // The receipt names the VMM's pid (reported by the jailer), not the jailer's.
    assert!(r.stdout.contains("vmm_comm=isocell-vmm"), "{}", r.explain());
}

#[test]
fn a_missing_command_exits_127() {
    let r = step("not-found");
    assert_eq!(r.exit_code, Some(127), "{}", r.explain());
    assert!(r.stderr.contains("no-such-command: command not found"), "{}", r.explain());
}

#[test]
fn a_silent_agent_fails_at_the_boot_timeout_with_the_console() {
    let r = step("agent-silent");
    assert_eq!(r.exit_code, Some(125), "{}", r.explain());
    assert!(r.stderr.contains("did not come up within 15 s"), "{}", r.explain());
    assert!(r.stderr.contains("hanging on purpose"), "console tail missing\n{}", r.explain());
}

#[test]
fn the_agent_comes_from_the_initramfs_and_the_cell_has_its_own_identity() {
    let r = ok("identity");
    let out = &r.stdout;
    assert!(out.contains("hostname=cell file=cell\n"), "{}", r.explain());
    assert!(out.contains("127.0.0.1\tlocalhost\n"), "{}", r.explain());
    assert!(out.contains("127.0.1.1\tcell\n"), "{}", r.explain());
    let cmdline = out.lines().find_map(|l| l.strip_prefix("cmdline: ")).unwrap_or_default();
    assert!(cmdline.contains(" isocell.root=/dev/vda "), "{}", r.explain());
    // The kernel mounts nothing of the image: no root= (and so no /sbin/init of the image).
    assert!(!cmdline.split(' ').any(|w| w.starts_with("root=")), "{}", r.explain());
    assert!(out.contains("agent=/init\n"), "{}", r.explain());
    assert!(out.contains("tmp=1777\n"), "{}", r.explain());
    assert!(out.contains("Uid:\t1000\t1000\t1000\t1000\n"), "{}", r.explain());
    assert!(out.contains("Gid:\t1001\t1001\t1001\t1001\n"), "{}", r.explain());
    let groups = out.lines().find(|l| l.starts_with("Groups:")).unwrap_or_default();
    assert_eq!(groups.trim_end(), "Groups:", "no supplementary groups\n{}", r.explain());
}

#[test]
fn an_image_that_cannot_be_mounted_stops_the_cell_with_one_clear_line() {
    let r = step("bad-image");
    assert_eq!(r.exit_code, Some(125), "{}", r.explain());
    assert!(r.stderr.contains("stopped before its agent came up"), "{}", r.explain());
    assert!(
        r.stderr.contains(
            "isocell-agent: cannot mount the cell image /dev/vda (ext4, read-only): Invalid argument; \
             it does not hold a valid ext4 filesystem"
        ),
        "{}",
        r.explain()
    );
    assert!(r.wall_us < 90_000_000, "not at the boot timeout\n{}", r.explain());
}

fn local_isocell(args: &[&str]) -> std::process::Output {
    let paths = isocell_testhost::host::Paths::discover().unwrap_or_else(|e| panic!("{e}"));
    // Never through an isocell machine this host may have running: these runs are local.
    Command::new(paths.isocell)
        .args(args)
        .env("ISOCELL_MACHINE_DIR", "/nonexistent/isocell-machine")
        .env_remove("ISOCELL_HOST")
        .output()
        .unwrap_or_else(|e| panic!("cannot run isocell: {e}"))
}

#[test]
fn a_missing_kernel_names_the_build_command() {
    let out = local_isocell(&["run", "--kernel", "/nonexistent/vmlinux", "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("/nonexistent/vmlinux does not exist") && err.contains("scripts/build-all.sh"),
        "{err}"
    );
}

#[test]
fn bad_options_are_refused_before_any_cell_exists() {
    for (args, needle) in [
        (&["run", "--cpus", "0", "--", "true"][..], "--cpus 0"),
        (&["run", "--env", "NOEQUALS", "--", "true"][..], "expected NAME=VALUE"),
        (&["run", "--input", "/nonexistent/in", "--", "true"][..], "does not exist on this host"),
        (&["run", "--workdir", "relative", "--", "true"][..], "absolute"),
        (&["run", "--"][..], "no command"),
    ] {
        let out = local_isocell(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn no_hardware_virtualization_is_refused_with_what_to_do() {
    let host = TestHost::detect().unwrap_or_else(|e| panic!("{e}"));
    if host.kind().has_hardware_kvm() {
        eprintln!("this host has hardware virtualization; nothing to refuse");
        return;
    }
    let out = local_isocell(&["run", "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("hardware virtualization") && err.contains("isocell machine start"),
        "{err}"
    );
}
