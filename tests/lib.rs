//! Shared pieces of the end-to-end tests: the batched VMM scenario (run once per test binary
//! through the test host), the path of the locally built VMM, and the image tests' fixtures
//! (test images, a real registry: [`registry`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use isocell_testhost::guest_tools::{device_step_script, VSOCK_PORT};
use isocell_testhost::host::Paths;
use isocell_testhost::{Scenario, Step, StepResult, TestHost};

pub use isocell_testhost::registry::{self, layout_digest, test_images, Registry};

/// The directory of this process's [`static_scratch`] directories.
static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

/// A fresh directory (`NAME-` and a random suffix) for a test file's shared set-up, which a
/// `static` holds and so never drops: every such directory lives under one per process,
/// removed when the process exits.
pub fn static_scratch(name: &str) -> PathBuf {
    let root = SCRATCH.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("isocell-e2e-")
            .tempdir()
            .unwrap_or_else(|e| panic!("a temporary directory: {e}"))
            .keep();
        // SAFETY: registers a function that takes nothing and returns nothing, for exit().
        unsafe { libc::atexit(remove_static_scratch) };
        dir
    });
    // Unique even when a set-up that panicked part-way is run again by the next test.
    tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(root)
        .unwrap_or_else(|e| panic!("a directory in {}: {e}", root.display()))
        .keep()
}

extern "C" fn remove_static_scratch() {
    if let Some(dir) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Size of the data disk the guest fills in the `disk` step.
pub const DATA_DISK_BYTES: u64 = 1 << 20;

/// Size of the data disk the `device-reset` guest writes and reads back after the resets.
pub const RESET_DISK_BYTES: u64 = 4 << 20;

/// Bytes the `device-reset` guest sends (and reads back) over a new vsock connection after the
/// resets.
pub const RESET_VSOCK_BYTES: u64 = 1 << 20;

/// A VMM step: `isocell-vmm ARGS --report {work}/report.json`.
pub fn vmm_step(name: &str, args: &[&str], timeout_secs: u64) -> Step {
    let mut argv = vec!["{vmm}".to_owned()];
    argv.extend(args.iter().map(|a| a.to_string()));
    argv.extend(["--report".to_owned(), "{work}/report.json".to_owned()]);
    Step {
        report_file: Some("{work}/report.json".to_owned()),
        ..Step::new(name, &argv, timeout_secs)
    }
}

const ROOT_RO: &str = "id=root,path={rootfs},ro,root";
/// The scenario init's timing report, with the kernel's own messages kept off the console.
/// `nohz=off`: the tick then counts idle time from the first one; with dynamic ticks
/// `/proc/uptime` counts it only from when they start, after the calibrations this measures.
const IDLE_ARGS: &str = "init=/sbin/scenario-init isocell_scenario=idle quiet nohz=off";
/// What the ACPI-only kernel runs: list what it found, then power off.
const ACPI_ARGS: &str =
    "init=/sbin/scenario-init isocell_scenario=devices isocell_end=poweroff quiet";

/// Every guest-booting check of the VMM, batched so the nested host boots once. The kernel is
/// `quiet` wherever a check reads only init's result lines: under emulation each byte of a
/// kernel log on the serial console is an exit, and a full log cost ~10 s per boot. The console
/// itself is checked by `boot-elf-vmlinux` (to a file) and by `console_storm.rs`.
pub fn vmm_scenario() -> Scenario {
    let mut steps = vec![
        vmm_step(
            "boot-1cpu",
            &[
                "--kernel",
                "{bzimage}",
                "--drive",
                ROOT_RO,
                "--cpus",
                "1",
                "--memory",
                "128",
                "--boot-args",
                "init=/sbin/scenario-init isocell_scenario=report quiet",
            ],
            120,
        ),
        vmm_step("boot-4cpu-config-file", &["--config", "{work}/vm.json"], 120),
        vmm_step(
            "boot-elf-vmlinux",
            &[
                "--kernel",
                "{vmlinux}",
                "--drive",
                ROOT_RO,
                "--console",
                "file:{work}/console.log",
                "--boot-args",
                "init=/sbin/scenario-init isocell_scenario=report",
            ],
            120,
        ),
        vmm_step(
            "read-only-root",
            &[
                "--kernel",
                "{bzimage}",
                "--drive",
                ROOT_RO,
                "--boot-args",
                "init=/sbin/scenario-init isocell_scenario=rofs quiet",
            ],
            120,
        ),
        vmm_step(
            "data-disk",
            &[
                "--kernel",
                "{bzimage}",
                "--drive",
                ROOT_RO,
                "--drive",
                "id=data,path={work}/data.img",
                "--boot-args",
                "init=/sbin/scenario-init isocell_scenario=disk quiet",
            ],
            120,
        ),
        vmm_step(
            "initrd",
            &[
                "--kernel",
                "{bzimage}",
                "--initrd",
                "{initrd}",
                "--memory",
                "96",
                "--boot-args",
                "init=/sbin/scenario-init isocell_scenario=rootfs quiet",
            ],
            120,
        ),
        vmm_step(
            "rng",
            &[
                "--kernel",
                "{bzimage}",
                "--drive",
                ROOT_RO,
                "--boot-args",
                "init=/sbin/scenario-init isocell_scenario=rng quiet",
            ],
            120,
        ),
        vmm_step(
            "panic",
            &[
                "--kernel",
                "{bzimage}",
                "--drive",
                ROOT_RO,
                "--boot-args",
                "init=/sbin/scenario-init isocell_scenario=panic quiet",
            ],
            120,
        ),
        vmm_step(
            "lifetime",
            &[
                "--kernel",
                "{bzimage}",
                "--drive",
                ROOT_RO,
                "--max-lifetime",
                "6",
                "--boot-args",
                "init=/sbin/scenario-init isocell_scenario=hang quiet",
            ],
            120,
        ),
        vmm_step(
            "hung-guest",
            &[
                "--kernel",
                "{bzimage}",
                "--drive",
                ROOT_RO,
                "--boot-args",
                "init=/sbin/scenario-init isocell_scenario=hang quiet",
            ],
            12,
        ),
        // The guest's CPU: the same boot with the TSC-deadline timer and with the guest told to
        // ignore it, to show what the flag saves (idle time before init) in the same host.
        vmm_step(
            "idle-tsc-deadline",
            &["--kernel", "{bzimage}", "--drive", ROOT_RO, "--boot-args", IDLE_ARGS],
            120,
        ),
        vmm_step(
            "idle-no-tsc-deadline",
            &[
                "--kernel",
                "{bzimage}",
                "--drive",
                ROOT_RO,
                "--boot-args",
                &format!("{IDLE_ARGS} clearcpuid=tsc_deadline_timer"),
            ],
            120,
        ),
        // A kernel that finds its devices and CPUs through ACPI alone, and powers off through it.
        vmm_step(
            "acpi-1cpu",
            &[
                "--kernel",
                "{acpi_bzimage}",
                "--drive",
                ROOT_RO,
                "--drive",
                "id=data,path={work}/data.img",
                "--cpus",
                "1",
                "--boot-args",
                ACPI_ARGS,
            ],
            120,
        ),
        vmm_step(
            "acpi-2cpu",
            &[
                "--kernel",
                "{acpi_bzimage}",
                "--drive",
                ROOT_RO,
                "--cpus",
                "2",
                "--boot-args",
                ACPI_ARGS,
            ],
            120,
        ),
    ];
    let acpi_1cpu = steps.iter().position(|s| s.name == "acpi-1cpu").unwrap_or_default();
    steps[acpi_1cpu].create_files.insert("{work}/data.img".into(), DATA_DISK_BYTES);
    steps[1].write_files.insert(
        "{work}/vm.json".into(),
        r#"{"kernel": "{bzimage}", "vcpus": 4, "memory_mib": 256,
            "drives": [{"id": "root", "path": "{rootfs}", "read_only": true, "root": true}],
            "boot_args": "init=/sbin/scenario-init isocell_scenario=report quiet"}"#
            .into(),
    );
    steps[4].create_files.insert("{work}/data.img".into(), DATA_DISK_BYTES);
    steps[4].hash_files.push("{work}/data.img".into());
    steps.push(device_reset_step());
    steps.push(snapshot_step());
    // The seccomp debug mode names the refused call: the rng worker's probe makes socket(2).
    steps.push(vmm_step(
        "seccomp-trap",
        &[
            "--kernel",
            "{bzimage}",
            "--drive",
            ROOT_RO,
            "--seccomp",
            "trap",
            "--seccomp-probe",
            "virtio-rng",
        ],
        60,
    ));
    Scenario { steps, ..Default::default() }
}

/// Saves a booted guest as a snapshot (SIGUSR1 to `--snapshot-save`), restores two copies
/// of it at once, checks the memory file is unchanged, then tries restores that must be
/// refused: another kernel command line, another memory size, a truncated memory file.
fn snapshot_step() -> Step {
    let args = "init=/sbin/scenario-init isocell_scenario=snapshot quiet";
    let vmm = format!("{{vmm}} --kernel {{bzimage}} --drive {ROOT_RO}");
    let script = format!(
        "d={{work}}/snap; mkdir -p $d
         {vmm} --memory 128 --boot-args '{args}' --console file:{{work}}/c0.log --snapshot-save $d --report {{work}}/save.json & p=$!
         i=0; until grep -q isocell-snapshot-ready {{work}}/c0.log 2>/dev/null; do
           sleep 0.1; i=$((i+1)); [ $i -gt 1200 ] && {{ echo never ready; kill $p; exit 3; }}; done
         kill -USR1 $p; wait $p; echo \"save rc=$?\"
         echo \"saved-vm-results $(grep -c ISOCELL-RESULT {{work}}/c0.log)\"
         ls -l $d; sha256sum $d/memory > {{work}}/before
         {vmm} --memory 128 --boot-args '{args}' --console file:{{work}}/c1.log --restore $d --report {{work}}/r1.json & a=$!
         {vmm} --memory 128 --boot-args '{args}' --console file:{{work}}/c2.log --restore $d --report {{work}}/r2.json & b=$!
         wait $a; echo \"restore1 rc=$?\"; wait $b; echo \"restore2 rc=$?\"
         grep -h ISOCELL-RESULT {{work}}/c1.log {{work}}/c2.log
         sha256sum -c {{work}}/before >/dev/null && echo memory-unchanged
         {vmm} --memory 128 --boot-args '{args} extra' --console file:{{work}}/c3.log --restore $d 2>{{work}}/e3; echo \"other-cmdline rc=$?\"; cat {{work}}/e3
         {vmm} --memory 256 --boot-args '{args}' --console file:{{work}}/c4.log --restore $d 2>{{work}}/e4; echo \"other-memory rc=$?\"; cat {{work}}/e4
         head -c 1000 $d/memory > {{work}}/short && cp $d/vm.json {{work}}/ && mkdir {{work}}/cut && mv {{work}}/short {{work}}/cut/memory && mv {{work}}/vm.json {{work}}/cut/
         {vmm} --memory 128 --boot-args '{args}' --console file:{{work}}/c5.log --restore {{work}}/cut 2>{{work}}/e5; echo \"short-memory rc=$?\"; cat {{work}}/e5
         echo restore-report; cat {{work}}/r1.json"
    );
    let mut step = shell_step("snapshot", &script, 300);
    step.report_file = Some("{work}/save.json".into());
    step
}

/// The guest resets every virtio device (unbind and bind its driver, twice) and uses each
/// again: the tools disk, a data disk, the rng and vsock. On the host `isocell-hostile
/// unix-echo` serves two guest connections: one the guest holds across the resets, one it
/// opens after them.
fn device_reset_step() -> Step {
    let boot_args = format!(
        "init=/sbin/scenario-init isocell_scenario=reset isocell_vsock_port={VSOCK_PORT} \
         isocell_vsock_bytes={RESET_VSOCK_BYTES}"
    );
    let vmm = ["{vmm}", "--kernel", "{bzimage}", "--initrd", "{initrd}", "--memory", "128"];
    let script = device_step_script(&vmm, &boot_args, "unix-echo", &["2"]);
    let mut step = shell_step("device-reset", &script, 240);
    step.create_files.insert("{work}/data.img".into(), RESET_DISK_BYTES);
    step.hash_files.push("{work}/data.img".into());
    step.report_file = Some("{work}/report.json".into());
    step
}

/// A step running a shell command line on the test host (placeholders such as `{isocell}` and
/// `{work}` are replaced).
pub fn shell_step(name: &str, script: &str, timeout_secs: u64) -> Step {
    Step::new(name, &["sh", "-c", script], timeout_secs)
}

/// Results of a scenario by step name, or why the test host could not run it.
pub type Results = Result<HashMap<String, StepResult>, String>;

/// Runs `scenario` (called `what` in the log) on the detected test host.
pub fn run_scenario(what: &str, scenario: &Scenario) -> Results {
    let host = TestHost::detect().map_err(|e| e.to_string())?;
    run_scenario_on(host, what, scenario)
}

/// Runs `scenario` on `host`.
pub fn run_scenario_on(host: TestHost, what: &str, scenario: &Scenario) -> Results {
    eprintln!("running the {what} scenario on the {} test host", host.kind().name());
    let results = host.run(scenario).map_err(|e| e.to_string())?;
    Ok(results.into_iter().map(|r| (r.name.clone(), r)).collect())
}

/// The result of step `name`; panics with the test host's error if the scenario could not run.
pub fn result_of<'a>(results: &'a Results, name: &str) -> &'a StepResult {
    match results {
        Ok(map) => map.get(name).unwrap_or_else(|| panic!("no result for step {name}")),
        Err(e) => panic!("the test host failed: {e}"),
    }
}

/// The results of [`vmm_scenario`], computed once per test binary.
pub fn vmm_results() -> &'static Results {
    static RESULTS: OnceLock<Results> = OnceLock::new();
    RESULTS.get_or_init(|| run_scenario("VMM", &vmm_scenario()))
}

/// The result of one step of [`vmm_scenario`].
pub fn step(name: &str) -> &'static StepResult {
    result_of(vmm_results(), name)
}

/// The locally built `isocell-vmm`.
pub fn local_vmm() -> PathBuf {
    match Paths::discover() {
        Ok(p) => p.vmm,
        Err(e) => panic!("{e}"),
    }
}

/// The locally built cell kernel.
pub fn local_bzimage() -> PathBuf {
    match Paths::discover() {
        Ok(p) => p.bzimage,
        Err(e) => panic!("{e}"),
    }
}

/// The value of `key=` in a step's output (up to the next space).
pub fn value(r: &StepResult, key: &str) -> String {
    let pat = format!("{key}=");
    r.stdout
        .split(char::is_whitespace)
        .find_map(|w| w.strip_prefix(&pat))
        .unwrap_or_else(|| panic!("no {key}= in the output of {}:\n{}", r.name, r.explain()))
        .to_owned()
}
