//! `isocell-bench`: boots the cell kernel repeatedly through the test host and reports the boot
//! phases and the VMM's memory overhead, then runs `isocell run -- true` repeatedly and reports
//! its phases (median, min, max) as JSON. Not a test: timings are never asserted, only recorded
//! with the machine they ran on. Both series run in the same test host, so they compare.
//!
//! The device benchmark boots a guest (scenario init `devbench`) that writes and reads a 256 MiB
//! disk through virtio-blk and sends 16 MiB to the host over vsock, timed in the guest, and
//! records the boot phases and the VM exits by kind and device per boot. With
//! `--baseline-vmm PATH` the same boots run with another VMM build too, interleaved, and the
//! figures are printed side by side with the ratio of medians (`devices.json`).
//!
//! The peer series (`peers`) boots the same kernel and image under QEMU's `microvm` machine
//! too, and compares cold starts with starts from a snapshot (`peers.json`).
//!
//! The machine series (`machine`, only where this host has no hardware virtualization) runs
//! `isocell run -- true` through a warm `isocell machine`, in a fresh nested host, and inside
//! the machine itself (`machine.json`).
//!
//! The Kubernetes series (`cri`) starts pods through containerd's CRI plugin and the shim,
//! against `isocell run` of the same image (`cri.json`).

mod cri;
mod machine;
mod peers;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use isocell_host::{CellImage, CellPlan, CellRequest, HostConfig};
use isocell_spec::MemorySize;
use isocell_testhost::guest_tools::{device_step_script, VSOCK_PORT};
use isocell_testhost::host::{self, project_root};
use isocell_testhost::stats::{summarize, Summary};
use isocell_testhost::{HostKind, Scenario, Step, StepResult, TestHost};
use serde_json::{json, Value};

/// Target: `isocell run -- true` at most this multiple of the bare VMM boot cycle.
const RUN_TARGET_RATIO: f64 = 1.3;
/// Target: evidence work per cell (measurement, policy, receipts, audit appends), ms.
const EVIDENCE_TARGET_MS: f64 = 5.0;
/// Target: VMM memory overhead, KiB.
const OVERHEAD_TARGET_KIB: f64 = 3.0 * 1024.0;

/// Measure VMM boot phases and memory overhead.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Measured runs (one extra warm-up run is discarded).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Only measure the evidence cost per cell natively on this machine (boots nothing).
    #[arg(long)]
    evidence_only: bool,
    /// Directory for the JSON results (`vmm-boot.json`, `isocell-run.json`, `devices.json`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Another `isocell-vmm` (an earlier build, say): the device benchmark's boots also run
    /// with it, interleaved with this build's, and the figures are compared (new / baseline).
    #[arg(long, value_name = "PATH")]
    baseline_vmm: Option<PathBuf>,
    /// Only the device series (with `--baseline-vmm`, against that build): a quick same-run
    /// check of a change to the VMM's device paths or its build.
    #[arg(long)]
    devices_only: bool,
    /// Only the network series (the egress proxy against the host, and the boot time it adds).
    #[arg(long)]
    network_only: bool,
    /// Only the peer series: our VMM against QEMU microvm, and cold starts against snapshot
    /// starts.
    #[arg(long)]
    peers_only: bool,
    /// Only the machine series: `isocell run` through a warm `isocell machine`, in a fresh
    /// nested host, and bare inside the machine.
    #[arg(long)]
    machine_only: bool,
    /// Only the Kubernetes series: a pod's start to its container running through containerd's
    /// CRI plugin and the shim, against `isocell run` of the same image.
    #[arg(long)]
    cri_only: bool,
    /// Measured boots of the device benchmark per VMM (each moves 512 MiB through virtio-blk,
    /// slow under the nested host; one extra warm-up boot is discarded).
    #[arg(long, default_value_t = 3)]
    device_runs: usize,
}

/// Phases `isocell run --report` records, in order.
const RUN_PHASES: [&str; 6] =
    ["prepare_ms", "boot_ms", "agent_ready_ms", "exec_ms", "teardown_ms", "total_ms"];

fn run_step(i: usize, args: &Args, jailed: bool) -> Step {
    let (cpus, memory) = (args.cpus.to_string(), args.memory.to_string());
    let mut argv = vec!["{isocell}", "run", "--cpus", &cpus, "--memory", &memory];
    let name = if jailed {
        format!("run-{i}")
    } else {
        argv.push("--no-jail");
        format!("unjailed-{i}")
    };
    argv.extend(["--report", "{work}/run.json", "--", "true"]);
    measured_step(name, &argv, 180, "{work}/run.json")
}

/// A step that writes a JSON report the benchmark reads.
fn measured_step(name: String, argv: &[&str], timeout_secs: u64, report: &str) -> Step {
    Step { report_file: Some(report.into()), ..Step::new(name, argv, timeout_secs) }
}

/// Where the benchmark's daemon keeps its socket, state and run directories (in the test host).
const DAEMON_DIR: &str = "/tmp/isocell-bench-daemon";

/// A shell step with the benchmark daemon's socket in `ISOCELL_HOST`.
fn daemon_step(name: String, script: &str) -> Step {
    let script =
        format!("export ISOCELL_HOST=unix://{DAEMON_DIR}/d.sock; D={DAEMON_DIR}; {script}");
    Step::new(name, &["sh", "-c", &script], 600)
}

/// The daemon series: `isocell run -- true` against create, exec `true` and delete through the
/// API (alternating); `true` in a warm cell; three clients creating a cell each at once.
fn daemon_steps(runs: usize, args: &Args) -> Vec<Step> {
    let (cpus, memory) = (args.cpus, args.memory);
    let start = format!(
        r#"rm -rf $D; mkdir -p $D
cat > $D/d.toml <<CONF
socket = "$D/d.sock"
state_dir = "$D/state"
run_dir = "$D/run"
idle_timeout_secs = 0
CONF
({{isocelld}} --config $D/d.toml 2> $D/daemon.log &)
for i in $(seq 300); do {{isocell}} cell ls > /dev/null 2>&1 && break; sleep 0.1; done
{{isocell}} cell create --cpus {cpus} --memory {memory} > $D/warm"#
    );
    let mut steps = vec![daemon_step("daemon-start".into(), &start)];
    for i in 0..=runs {
        steps.push(daemon_step(
            format!("dcycle-run-{i}"),
            &format!("{{isocell}} run --cpus {cpus} --memory {memory} -- true"),
        ));
        steps.push(daemon_step(
            format!("dcycle-api-{i}"),
            &format!(
                "id=$({{isocell}} cell create --cpus {cpus} --memory {memory}) && \
                 {{isocell}} cell exec $id -- true && {{isocell}} cell rm $id > /dev/null"
            ),
        ));
    }
    for i in 0..=runs {
        steps.push(daemon_step(
            format!("warm-exec-{i}"),
            "{isocell} cell exec $(cat $D/warm) -- true",
        ));
    }
    steps.push(daemon_step(
        "concurrent-creates".into(),
        &format!(
            "for c in 1 2 3; do ({{isocell}} cell create --cpus {cpus} --memory {memory} > $D/c$c) & done; wait; \
             for c in 1 2 3; do [ -s $D/c$c ] || exit 1; done"
        ),
    ));
    steps.push(daemon_step(
        "daemon-stop".into(),
        "for f in $D/c1 $D/c2 $D/c3 $D/warm; do {isocell} cell rm $(cat $f) > /dev/null; done; \
         kill $(pidof isocelld)",
    ));
    steps
}

fn run_phase(r: &StepResult, name: &str) -> Option<f64> {
    r.report.as_ref()?.get("phases")?.get(name)?.as_f64()
}

/// Evidence costs `isocell run --report` records per cell; `total_ms` is their sum.
const EVIDENCE_COSTS: [&str; 5] =
    ["measure_ms", "policy_ms", "receipts_ms", "audit_ms", "total_ms"];

fn evidence_cost(r: &StepResult, name: &str) -> Option<f64> {
    let costs = r.report.as_ref()?.get("evidence")?;
    if name == "total_ms" {
        return EVIDENCE_COSTS[..4].iter().map(|k| costs.get(*k)?.as_f64()).sum();
    }
    costs.get(name)?.as_f64()
}

/// One cell's evidence, natively on this machine: the lifecycle library's own plan,
/// measurement, admission, receipts and audit appends, in the order a cell makes them, with the
/// audit log on this machine's disk (the nested host's log is on a tmpfs under emulation, which
/// says little about either cost). Returns the costs in ms, as `EVIDENCE_COSTS`.
fn native_evidence_cell(
    host: &HostConfig,
    paths: &isocell_testhost::host::Paths,
    cell: usize,
) -> Result<[f64; 5]> {
    use isocell_host::evidence::ms_since;
    let id = format!("bench{cell}");
    let request = CellRequest {
        kernel: paths.vmlinux.clone(),
        image: CellImage::Block(paths.rootfs.clone()),
        cpus: 1,
        memory: MemorySize::DEFAULT,
        kernel_args: String::new(),
        max_lifetime_secs: None,
        constraints: Default::default(),
        network: Default::default(),
        snapshot: Default::default(),
        workload: None,
    };
    let plan = CellPlan::new(host, &id, request)?;
    let mut ev = isocell_host::cell::open_evidence(host, &id)?;
    let t = Instant::now();
    let cache = isocell_evidence::measure::DigestCache::new(host.state_dir.join("digests"));
    let m = plan.measure(Some(&cache)).map_err(anyhow::Error::msg)?;
    ev.costs.measure_ms += ms_since(t);
    let t = Instant::now();
    let policies =
        isocell_evidence::policy::Policies::load_standard(&host.state_dir.join("policies"), &[]);
    ev.costs.policy_ms += ms_since(t);
    let request = plan.admission_request(&ev.host.profile, &m, None);
    let decision = ev.admit(policies, &request, &m).map_err(anyhow::Error::msg)?;
    if !decision.allowed {
        bail!("the default policy denied the benchmark cell: {}", decision.explain());
    }
    let argv = ["true".to_owned()];
    ev.launched(&m, &decision, &argv, None, &plan.image_identity(), &plan.start_identity())
        .map_err(anyhow::Error::msg)?;
    for (kind, data) in [
        ("start", json!({ "boot_ms": 100 })),
        ("exec", json!({ "program": "true" })),
        ("exit", json!({ "exit_code": 0, "outcome": "exited" })),
    ] {
        ev.log(kind, data).map_err(anyhow::Error::msg)?;
    }
    let checks = json!({ "vmm_process_gone": true });
    ev.ended(Some(0), "exited", &checks, json!({ "surface": plan.surface(None) }))
        .map_err(anyhow::Error::msg)?;
    let c = &ev.costs;
    Ok([
        c.measure_ms,
        c.policy_ms,
        c.receipts_ms,
        c.audit_ms,
        c.measure_ms + c.policy_ms + c.receipts_ms + c.audit_ms,
    ])
}

/// `runs` + 1 cells' evidence natively (the first warms caches and is not counted), in a
/// scratch state directory under `build/bench` that is removed afterwards.
fn native_evidence(runs: usize) -> Result<Vec<[f64; 5]>> {
    let paths = isocell_testhost::host::Paths::discover()?;
    let dir = project_root().join(format!("build/bench/evidence-native-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let host = HostConfig {
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        vmm: paths.vmm.clone(),
        // Planned jailed, as `isocell run` plans as root; nothing is started.
        jailer: Some(PathBuf::from("isocell-jailer")),
        agent_initrd: paths.agent_initrd.clone(),
        seccomp_probe: None,
    };
    let costs: Result<Vec<_>> =
        (0..=runs).map(|i| native_evidence_cell(&host, &paths, i)).collect();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(costs?.into_iter().skip(1).collect())
}

/// Prints one summary line.
fn print_row(label: &str, s: Option<Summary>, unit: &str) {
    match s {
        Some(s) => println!(
            "{label:<28} median {:>9.1} {unit}  min {:>9.1}  max {:>9.1}  (n={})",
            s.median, s.min, s.max, s.n
        ),
        None => println!("{label:<28} not measured"),
    }
}

/// The command line that boots the cell kernel (vmlinux) from the base image under `vmm` (a
/// scenario placeholder): `console` is its `--console` value, `boot_args` the scenario init's
/// arguments.
fn vmm_boot_argv(vmm: &str, args: &Args, console: &str, boot_args: &str) -> Vec<String> {
    let (cpus, memory) = (args.cpus.to_string(), args.memory.to_string());
    let argv = [vmm, "--kernel", "{vmlinux}", "--drive", "id=root,path={rootfs},ro,root"];
    let rest = ["--console", console, "--cpus", &cpus, "--memory", &memory];
    argv.iter().chain(&rest).chain(&["--boot-args", boot_args]).map(|s| s.to_string()).collect()
}

/// A measured boot of the cell kernel (vmlinux) from the base image (see [`vmm_boot_argv`]).
fn vmm_boot_step(name: String, args: &Args, console: &str, boot_args: &str) -> Step {
    let mut argv = vmm_boot_argv("{vmm}", args, console, boot_args);
    argv.extend(["--report".to_owned(), "{work}/report.json".to_owned()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    measured_step(name, &argv, 120, "{work}/report.json")
}

fn boot_step(i: usize, args: &Args) -> Step {
    let quiet = "init=/sbin/scenario-init isocell_scenario=quiet";
    vmm_boot_step(format!("boot-{i}"), args, "off", quiet)
}

/// The guest CPU variants the benchmark compares in the same host: as IsoCell gives it, and with
/// the guest told to ignore what issue 18 added (`clearcpuid=`), down to the CPU it saw before.
const CPU_VARIANTS: [(&str, &str); 3] = [
    ("as_given", ""),
    ("no_tsc_deadline", "clearcpuid=tsc_deadline_timer"),
    ("no_tsc_deadline_no_arat", "clearcpuid=tsc_deadline_timer,arat"),
];

/// A boot whose init reports the uptime and the idle time at init (console on, kernel quiet).
fn cpu_step(i: usize, variant: usize, args: &Args) -> Step {
    let (name, extra) = CPU_VARIANTS[variant];
    let boot_args = format!("init=/sbin/scenario-init isocell_scenario=idle quiet {extra}");
    vmm_boot_step(format!("cpu-{name}-{i}"), args, "stdout", boot_args.trim_end())
}

/// Size of the device benchmark's data disk, written and read whole.
const DEVBENCH_DISK_BYTES: u64 = 256 << 20;
/// Bytes the device benchmark's guest sends to the host over vsock.
const DEVBENCH_VSOCK_BYTES: u64 = 16 << 20;
/// The VMMs the device benchmark can run: this build, and the `--baseline-vmm` one (a scenario
/// file, so it travels into the nested host).
const DEVBENCH_VMMS: [(&str, &str); 2] = [("new", "{vmm}"), ("baseline", "{baseline_vmm}")];

/// A boot of the `devbench` guest with VMM `vmm` (an index into `DEVBENCH_VMMS`): the tools
/// disk, a 256 MiB data disk and vsock, with `isocell-hostile unix-sink` counting what the
/// guest sends.
fn devbench_step(i: usize, vmm: usize, args: &Args) -> Step {
    let (label, binary) = DEVBENCH_VMMS[vmm];
    let (cpus, memory) = (args.cpus.to_string(), args.memory.to_string());
    let boot_args = format!(
        "init=/sbin/scenario-init isocell_scenario=devbench quiet isocell_vsock_port={VSOCK_PORT}"
    );
    let vmm = [binary, "--kernel", "{vmlinux}", "--initrd", "{initrd}", "--console", "stdout"];
    let sizes = ["--cpus", &cpus, "--memory", &memory];
    let vmm: Vec<&str> = vmm.iter().chain(&sizes).copied().collect();
    let script = device_step_script(&vmm, &boot_args, "unix-sink", &[]);
    let mut step = measured_step(
        format!("devbench-{label}-{i}"),
        &["sh", "-c", &script],
        300,
        "{work}/report.json",
    );
    step.create_files.insert("{work}/data.img".into(), DEVBENCH_DISK_BYTES);
    step
}

/// Why a `devbench` boot does not count, if it does not: every transfer must have completed.
fn devbench_failure(r: &StepResult) -> Option<String> {
    let g = r.guest_results.first();
    let ok = |v: Option<&Value>| v == Some(&Value::Bool(true));
    let complete = ok(g.and_then(|g| g.get("write_ok")))
        && ok(g.and_then(|g| g.get("read_ok")))
        && ok(g.and_then(|g| g.get("vsock")).and_then(|v| v.get("ok")))
        && g.and_then(|g| g.get("block_bytes")).and_then(Value::as_u64)
            == Some(DEVBENCH_DISK_BYTES);
    (!complete).then(|| format!("a device benchmark boot did not complete:\n{}", r.explain()))
}

/// Throughput in MB/s (10^6 bytes per second) from the guest's byte count and microseconds.
fn devbench_rate(r: &StepResult, bytes: &str, us: &str) -> Option<f64> {
    let g = r.guest_results.first()?;
    let us = g.get(us)?.as_f64().filter(|us| *us > 0.0)?;
    Some(g.get(bytes)?.as_f64()? / us)
}

fn devbench_vsock_rate(r: &StepResult) -> Option<f64> {
    let v = r.guest_results.first()?.get("vsock")?;
    let us = v.get("us")?.as_f64().filter(|us| *us > 0.0)?;
    Some(v.get("bytes")?.as_f64()? / us)
}

/// The report's exit counts (`[["mmio_write data", 123], ...]`, or an object of the same) by
/// kind and device. The VMM lists the most frequent 20; one not listed counts as 0.
fn exit_counts(r: &StepResult) -> std::collections::BTreeMap<String, f64> {
    let mut counts = std::collections::BTreeMap::new();
    match r.report.as_ref().and_then(|v| v.get("exit_counts")) {
        Some(Value::Array(pairs)) => {
            for p in pairs {
                if let (Some(name), Some(n)) = (p[0].as_str(), p[1].as_f64()) {
                    counts.insert(name.to_owned(), n);
                }
            }
        }
        Some(Value::Object(map)) => {
            for (name, n) in map {
                if let Some(n) = n.as_f64() {
                    counts.insert(name.clone(), n);
                }
            }
        }
        _ => {}
    }
    counts
}

/// One figure of the device benchmark: its name, unit and how to read it from a boot.
type DevFigure = (&'static str, &'static str, fn(&StepResult) -> Option<f64>);

/// The device benchmark's figures, in the order they are printed.
const DEVBENCH_FIGURES: [DevFigure; 7] = [
    ("VM built", "ms", |r| ms(phase(r, "vm_built_us"))),
    ("guest init (boot timer)", "ms", |r| ms(phase(r, "guest_init_us"))),
    ("VM stopped", "ms", |r| ms(phase(r, "exit_us"))),
    ("block write 256 MiB", "MB/s", |r| devbench_rate(r, "block_bytes", "write_us")),
    ("block read 256 MiB", "MB/s", |r| devbench_rate(r, "block_bytes", "read_us")),
    ("vsock guest->host 16 MiB", "MB/s", devbench_vsock_rate),
    ("VM exits per boot (listed)", "", |r| Some(exit_counts(r).values().sum())),
];

/// Prints a figure for this build and, when there is one, the baseline with the ratio of
/// medians.
fn print_pair(label: &str, new: Option<Summary>, base: Option<Option<Summary>>, unit: &str) {
    let Some(base) = base else { return print_row(label, new, unit) };
    let median = |s: Option<Summary>| s.map_or("-".to_owned(), |s| format!("{:.1}", s.median));
    let r = ratio(new, base).map_or("-".to_owned(), |r| format!("{r:.3}x"));
    let n = new.map_or(0, |s| s.n);
    println!(
        "{label:<28} new {:>9} {unit:<4}  baseline {:>9}  new/baseline {r:>7}  (medians, n={n})",
        median(new),
        median(base)
    );
}

/// One VMM's device benchmark: each of `DEVBENCH_FIGURES` and the exits per boot by kind and
/// device, summarized over its boots.
struct DevSeries {
    figures: Vec<Option<Summary>>,
    exits: std::collections::BTreeMap<String, Option<Summary>>,
}

fn dev_series(runs: &[StepResult], exit_names: &std::collections::BTreeSet<String>) -> DevSeries {
    let figures = DEVBENCH_FIGURES.iter().map(|(_, _, f)| series(runs, f)).collect();
    let counts: Vec<_> = runs.iter().map(exit_counts).collect();
    let exits = exit_names
        .iter()
        .map(|name| {
            let per_boot: Vec<f64> =
                counts.iter().map(|c| c.get(name).copied().unwrap_or(0.0)).collect();
            (name.clone(), summarize(&per_boot))
        })
        .collect();
    DevSeries { figures, exits }
}

impl DevSeries {
    fn json(&self) -> Value {
        let mut v = json!({ "exits_per_boot": self.exits });
        for ((name, unit, _), s) in DEVBENCH_FIGURES.iter().zip(&self.figures) {
            v[format!("{name} ({unit})").trim_end_matches(" ()")] = json!(s);
        }
        v
    }
}

/// A figure from the guest's result line.
fn guest_figure(r: &StepResult, key: &str) -> Option<f64> {
    r.guest_results.first()?.get(key)?.as_f64()
}

/// Ratio of two medians.
fn ratio(a: Option<Summary>, b: Option<Summary>) -> Option<f64> {
    Some(a?.median / b?.median)
}

fn ms(us: Option<u64>) -> Option<f64> {
    us.map(|v| v as f64 / 1000.0)
}

fn series(results: &[StepResult], f: impl Fn(&StepResult) -> Option<f64>) -> Option<Summary> {
    summarize(&results.iter().filter_map(f).collect::<Vec<_>>())
}

fn phase(r: &StepResult, name: &str) -> Option<u64> {
    r.report.as_ref()?.get("phases")?.get(name)?.as_u64()
}

fn memory(r: &StepResult, name: &str) -> Option<f64> {
    r.report.as_ref()?.get("memory")?.get(name)?.as_f64()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default()
}

/// Target: an image the store already has adds at most this to a cell's start, ms.
const CACHED_IMAGE_TARGET_MS: f64 = 50.0;

/// Pull-and-convert figures for the test python image (Debian + python3, tests/images) from a
/// real registry on 127.0.0.1, and a copy of the converted store for the test host.
struct ImageBench {
    reference: String,
    /// `isocell image pull` into an empty store: wall, fetch and convert ms.
    cold: Vec<[f64; 3]>,
    /// What `isocell run` spends finding an image the store has (the library call it makes).
    cached_ms: Vec<f64>,
    layer_bytes: u64,
    unpacked_bytes: u64,
    block_bytes: u64,
    /// The store's converted images and names, for the test host (`{images}`).
    store_copy: tempfile::TempDir,
    _registry: isocell_testhost::registry::Registry,
}

fn image_bench(runs: usize) -> Result<ImageBench> {
    use isocell_testhost::registry::{test_images, Registry};
    let images = test_images().map_err(anyhow::Error::msg)?;
    let registry = Registry::start().map_err(anyhow::Error::msg)?;
    let src = format!("oci:{}:latest", images.join("python").display());
    let reference = registry.push(&src, "bench/python:latest").map_err(anyhow::Error::msg)?;
    let isocell = host::Paths::discover()?.isocell;
    let mut cold = Vec::new();
    let mut last = None;
    for _ in 0..=runs {
        let state = tempfile::tempdir()?;
        let t = Instant::now();
        let out = std::process::Command::new(&isocell)
            .args(["image", "pull", "--insecure-registry", &registry.addr(), &reference])
            .env("ISOCELL_STATE_DIR", state.path())
            .output()?;
        let wall = t.elapsed().as_secs_f64() * 1000.0;
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("pulling {reference}: {said}{}", String::from_utf8_lossy(&out.stderr));
        }
        let figure = |label: &str| -> f64 {
            said.split(label)
                .nth(1)
                .and_then(|rest| rest.split(" ms").next())
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(f64::NAN)
        };
        cold.push([wall, figure("fetched in "), figure("converted in ")]);
        last = Some(state);
    }
    cold.remove(0); // warm-up
    let state = last.context("no pull ran")?;
    let store = isocell_image::Store::open(state.path())?;
    let image = isocell_image::ImageRef::parse(&reference).map_err(anyhow::Error::msg)?;
    let mut cached_ms = Vec::new();
    let mut record = None;
    for _ in 0..=runs {
        let t = Instant::now();
        let r = isocell_image::resolve(
            &store,
            &image,
            isocell_image::PullPolicy::Missing,
            &isocell_image::RegistryOptions::default(),
            &isocell_image::Limits::default(),
        )?;
        cached_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        record = Some(r.record);
    }
    cached_ms.remove(0);
    let record = record.context("no image")?;
    let store_copy = tempfile::tempdir()?;
    isocell_testhost::registry::copy_converted(
        &state.path().join("images"),
        &store_copy.path().join("images"),
    )
    .map_err(anyhow::Error::msg)?;
    Ok(ImageBench {
        reference,
        cold,
        cached_ms,
        layer_bytes: record.layer_bytes,
        unpacked_bytes: record.file_bytes,
        block_bytes: record.converted.block_bytes,
        store_copy,
        _registry: registry,
    })
}

/// `isocell run IMAGE -- true` (IMAGE empty: the base image), in a state directory shared by
/// both series and holding the converted images (`{images}`).
fn image_run_step(name: String, args: &Args, image: &str) -> Step {
    let script = format!(
        "S={{work}}/../bench-state; mkdir -p $S && ln -sfn {{images}} $S/images && \
         ISOCELL_STATE_DIR=$S exec {{isocell}} run --cpus {} --memory {} --report {{work}}/run.json {image} -- true",
        args.cpus, args.memory
    );
    measured_step(name, &["sh", "-c", &script], 180, "{work}/run.json")
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.evidence_only {
        let native = native_evidence(args.runs)?;
        println!(
            "evidence per cell, natively on this machine (target total <= {EVIDENCE_TARGET_MS} ms)"
        );
        for (i, c) in EVIDENCE_COSTS.iter().enumerate() {
            print_row(
                &format!("  {}", c.trim_end_matches("_ms")),
                summarize(&native.iter().map(|c| c[i]).collect::<Vec<_>>()),
                "ms",
            );
        }
        return Ok(());
    }
    // Checked before anything runs: the benchmark takes a while to get to it.
    let baseline = match &args.baseline_vmm {
        Some(p) => {
            let p = p.canonicalize().with_context(|| format!("--baseline-vmm {}", p.display()))?;
            if !p.is_file() {
                bail!("--baseline-vmm {} is not a file", p.display());
            }
            Some(p)
        }
        None => None,
    };
    // Its figures are a nested host's (or hardware's), whatever machine the tests may use.
    let host = TestHost::detect()?.fresh_host();
    if args.machine_only {
        if host.kind() != HostKind::Nested {
            bail!(
                "this host has hardware virtualization: `isocell run` goes through no machine here"
            );
        }
        return machine::bench(
            args.runs,
            &host::Paths::discover()?.isocell,
            &host,
            &out_dir(&args)?,
        );
    }
    if args.cri_only {
        return cri::bench(args.runs, &host, &out_dir(&args)?);
    }
    if args.network_only {
        let results =
            run_checked(&host, &Scenario { steps: net_steps(args.runs), ..Default::default() })?;
        return net_report(&results, &out_dir(&args)?, &host);
    }
    if args.devices_only {
        let steps = devbench_steps(&args, baseline.is_some());
        let results = run_checked(&host, &Scenario { steps, files: baseline_file(&baseline) })?;
        return devices_report(&results, baseline.as_deref(), &args, &host, &out_dir(&args)?);
    }
    let qemu_dir = tempfile::tempdir()?;
    let qemu = peers::stage(qemu_dir.path())?;
    if args.peers_only {
        let mut files = baseline_file(&baseline);
        files.insert("qemu".to_owned(), qemu);
        let results = run_checked(&host, &Scenario { steps: peers::steps(&args), files })?;
        return peers::report(&results, &out_dir(&args)?, &host, &args);
    }
    eprintln!(
        "isocell-bench: {} runs + 1 warm-up on the {} test host",
        args.runs,
        host.kind().name()
    );
    eprintln!("isocell-bench: pulling and converting the python test image from a local registry");
    let t = Instant::now();
    let img = image_bench(args.runs)?;
    say_took("the image pulls", t);
    let mut steps: Vec<Step> = (0..=args.runs).map(|i| boot_step(i, &args)).collect();
    // Jailed and unjailed runs alternate, so both see the same machine conditions.
    for i in 0..=args.runs {
        steps.push(run_step(i, &args, true));
        steps.push(run_step(i, &args, false));
    }
    // The container image against the base image, alternating, sharing one state directory.
    for i in 0..=args.runs {
        steps.push(image_run_step(format!("base-{i}"), &args, ""));
        steps.push(image_run_step(format!("img-{i}"), &args, &img.reference));
    }
    steps.extend(daemon_steps(args.runs, &args));
    // The CPU variants alternate too.
    for i in 0..=args.runs {
        for v in 0..CPU_VARIANTS.len() {
            steps.push(cpu_step(i, v, &args));
        }
    }
    let mut files = baseline_file(&baseline);
    files.insert("images".to_owned(), img.store_copy.path().join("images").display().to_string());
    steps.extend(devbench_steps(&args, baseline.is_some()));
    steps.extend(net_steps(args.runs));
    steps.extend(peers::steps(&args));
    files.insert("qemu".to_owned(), qemu);
    let t = Instant::now();
    let results = run_checked(&host, &Scenario { steps, files })?;
    say_took("the test host's series", t);
    eprintln!("isocell-bench: seconds per series: {}", series_seconds(&results));
    let of_kind = |prefix: &str| measured_of(&results, prefix);
    let measured = of_kind("boot-");
    let measured_runs = of_kind("run-");
    let unjailed_runs = of_kind("unjailed-");

    let full_cycle = series(&measured, |r| Some(r.wall_us as f64 / 1000.0));
    let overhead = series(&measured, |r| memory(r, "vmm_overhead_kib"));
    let mut out = json!({
        "benchmark": "vmm-boot",
        "host": host.kind().name(),
        "host_cpu": cpu_model(),
        "runs": measured.len(),
        "vcpus": args.cpus,
        "memory_mib": args.memory,
        "kernel": "vmlinux, ELF (guest/build-kernel.sh)",
        "console": "off",
        "full_cycle_ms": full_cycle,
        "vm_built_ms": series(&measured, |r| ms(phase(r, "vm_built_us"))),
        "guest_init_ms": series(&measured, |r| ms(phase(r, "guest_init_us"))),
        "vmm_exit_ms": series(&measured, |r| ms(phase(r, "exit_us"))),
        "vmm_overhead_kib": overhead,
        "guest_rss_kib": series(&measured, |r| memory(r, "guest_rss_kib")),
    });
    let mut targets = json!({ "vmm_overhead_kib_max": OVERHEAD_TARGET_KIB });
    targets["peers"] = Value::from("peers.json: against QEMU microvm in the same run");
    if host.kind() == HostKind::Nested {
        out["nested_qemu"] =
            Value::from(host::qemu_version().map(|(a, b)| format!("{a}.{b}")).unwrap_or_default());
    }
    out["targets"] = targets;
    let mut cpu = json!({
        "what": "the guest CPU as given against the same guest told to ignore the TSC-deadline timer (and ARAT): idle seconds of all vCPUs before init, uptime at init, full cycle; console on, kernel quiet",
    });
    let mut cpu_rows = Vec::new();
    for (name, extra) in CPU_VARIANTS {
        let runs = of_kind(&format!("cpu-{name}-"));
        let idle = series(&runs, |r| guest_figure(r, "idle_at_init"));
        let up = series(&runs, |r| guest_figure(r, "uptime_at_init"));
        let cycle = series(&runs, |r| Some(r.wall_us as f64 / 1000.0));
        cpu[name] = json!({ "boot_args": extra, "idle_at_init_s": idle, "uptime_at_init_s": up, "full_cycle_ms": cycle });
        cpu_rows.push((name, idle, up, cycle));
    }
    let given_cycle = cpu_rows.first().and_then(|r| r.3);
    for (name, _, _, cycle) in &cpu_rows[1..] {
        cpu[format!("ratio_full_cycle_as_given_to_{name}")] = json!(ratio(given_cycle, *cycle));
    }
    out["guest_cpu"] = cpu;
    out["samples"] = measured
        .iter()
        .map(|r| json!({ "wall_us": r.wall_us, "phases": r.report.as_ref().and_then(|v| v.get("phases")), "memory": r.report.as_ref().and_then(|v| v.get("memory")) }))
        .collect();

    let run_total = series(&measured_runs, |r| Some(r.wall_us as f64 / 1000.0));
    let mut run_out = json!({
        "benchmark": "isocell-run-true",
        "host": host.kind().name(),
        "host_cpu": cpu_model(),
        "runs": measured_runs.len(),
        "vcpus": args.cpus,
        "memory_mib": args.memory,
        "command": "isocell run -- true (console to a file, quiet)",
        "wall_ms": run_total,
        "vmm_boot_full_cycle_ms": full_cycle,
        "targets": { "wall_ms_max_ratio_to_vmm_boot": RUN_TARGET_RATIO },
        "guest_init_ms": series(&measured_runs, |r| {
            r.report.as_ref()?.get("vmm")?.get("phases")?.get("guest_init_us")?.as_f64().map(|v| v / 1000.0)
        }),
    });
    for p in RUN_PHASES {
        run_out[p] = json!(series(&measured_runs, |r| run_phase(r, p)));
    }
    let unjailed_total = series(&unjailed_runs, |r| Some(r.wall_us as f64 / 1000.0));
    let mut jail = json!({
        "what": "isocell run -- true, jailed (default) against --no-jail; seccomp filters in both",
        "jailed_wall_ms": run_total,
        "unjailed_wall_ms": unjailed_total,
        "ratio_jailed_to_unjailed": ratio(run_total, unjailed_total),
    });
    for p in ["prepare_ms", "teardown_ms"] {
        jail[format!("jailed_{p}")] = json!(series(&measured_runs, |r| run_phase(r, p)));
        jail[format!("unjailed_{p}")] = json!(series(&unjailed_runs, |r| run_phase(r, p)));
    }
    run_out["jail_cost"] = jail;
    let mut evidence = json!({ "target_total_ms_max": EVIDENCE_TARGET_MS });
    for c in EVIDENCE_COSTS {
        evidence[c] = json!(series(&measured_runs, |r| evidence_cost(r, c)));
    }
    run_out["evidence"] = evidence;
    let native = native_evidence(args.runs)?;
    let native_series = |i: usize| summarize(&native.iter().map(|c| c[i]).collect::<Vec<_>>());
    let mut evidence_native = json!({
        "what": "the same evidence library calls per cell, natively on this machine, audit log on its disk",
        "target_total_ms_max": EVIDENCE_TARGET_MS,
    });
    for (i, c) in EVIDENCE_COSTS.iter().enumerate() {
        evidence_native[*c] = json!(native_series(i));
    }
    run_out["evidence_native"] = evidence_native;
    let base_runs = of_kind("base-");
    let img_runs = of_kind("img-");
    let base_wall = series(&base_runs, |r| Some(r.wall_us as f64 / 1000.0));
    let img_wall = series(&img_runs, |r| Some(r.wall_us as f64 / 1000.0));
    let cold_series = |i: usize| summarize(&img.cold.iter().map(|c| c[i]).collect::<Vec<_>>());
    let cached = summarize(&img.cached_ms);
    let mut image_out = json!({
        "what": "the python test image (Debian bookworm + python3-minimal, 2 layers) from a registry on 127.0.0.1: isocell image pull into an empty store (cold), finding it in the store (cached, what isocell run adds), and isocell run IMAGE -- true against the base image, alternating, same test host",
        "reference": img.reference,
        "layer_bytes": img.layer_bytes,
        "unpacked_bytes": img.unpacked_bytes,
        "block_image_bytes": img.block_bytes,
        "cold_pull_wall_ms": cold_series(0),
        "cold_fetch_ms": cold_series(1),
        "cold_convert_ms": cold_series(2),
        "cached_resolve_ms": cached,
        "target_cached_ms_max": CACHED_IMAGE_TARGET_MS,
        "base_image_run_wall_ms": base_wall,
        "container_image_run_wall_ms": img_wall,
        "ratio_container_to_base": ratio(img_wall, base_wall),
    });
    for p in RUN_PHASES {
        image_out[format!("base_{p}")] = json!(series(&base_runs, |r| run_phase(r, p)));
        image_out[format!("container_{p}")] = json!(series(&img_runs, |r| run_phase(r, p)));
    }
    run_out["container_image"] = image_out;
    let wall = |r: &StepResult| Some(r.wall_us as f64 / 1000.0);
    let run_cycle = series(&of_kind("dcycle-run-"), wall);
    let api_cycle = series(&of_kind("dcycle-api-"), wall);
    let warm_exec = series(&of_kind("warm-exec-"), wall);
    let concurrent = results.iter().find(|r| r.name == "concurrent-creates").map(|r| r.wall_us);
    let cells_per_s = concurrent.map(|us| 3.0 / (us as f64 / 1e6));
    run_out["daemon"] = json!({
        "what": "isocelld in the same host: `isocell run -- true` against `isocell cell create` + `cell exec -- true` + `cell rm` (alternating, client processes included); `cell exec -- true` in a warm cell; three clients creating a cell each at once",
        "run_true_wall_ms": run_cycle,
        "api_create_exec_delete_wall_ms": api_cycle,
        "ratio_api_cycle_to_run": ratio(api_cycle, run_cycle),
        "warm_exec_true_wall_ms": warm_exec,
        "ratio_warm_exec_to_run": ratio(warm_exec, run_cycle),
        "concurrent_creates": { "clients": 3, "wall_ms": concurrent.map(|us| us as f64 / 1000.0), "cells_per_s": cells_per_s },
    });
    run_out["samples"] =
        measured_runs.iter().map(|r| json!({ "wall_us": r.wall_us, "report": r.report })).collect();

    let dir = out_dir(&args)?;
    let path = dir.join("vmm-boot.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let run_path = dir.join("isocell-run.json");
    std::fs::write(&run_path, serde_json::to_string_pretty(&run_out)?)
        .with_context(|| format!("writing {}", run_path.display()))?;
    let row = print_row;
    println!("IsoCell VMM boot benchmark, {} host ({})", host.kind().name(), cpu_model());
    row("full cycle (spawn -> exit)", full_cycle, "ms");
    row("VM built", series(&measured, |r| ms(phase(r, "vm_built_us"))), "ms");
    row("guest init (boot timer)", series(&measured, |r| ms(phase(r, "guest_init_us"))), "ms");
    row("VM stopped", series(&measured, |r| ms(phase(r, "exit_us"))), "ms");
    row("VMM overhead (RSS - guest)", overhead, "KiB");
    println!("guest CPU variants (console on, kernel quiet), same host, alternating");
    for (name, idle, up, cycle) in &cpu_rows {
        row(&format!("  {name}: idle at init"), *idle, "s");
        row(&format!("  {name}: uptime at init"), *up, "s");
        row(&format!("  {name}: full cycle"), *cycle, "ms");
    }
    for (name, _, _, cycle) in &cpu_rows[1..] {
        if let Some(r) = ratio(given_cycle, *cycle) {
            println!("  full cycle as given / {name}: {r:.3}x (medians)");
        }
    }
    println!("\nisocelld, same host (client processes included)");
    row("`isocell run -- true`", run_cycle, "ms");
    row("API create + exec true + delete", api_cycle, "ms");
    row("exec true in a warm cell", warm_exec, "ms");
    if let Some(r) = ratio(warm_exec, run_cycle) {
        println!("  warm exec / isocell run: {r:.3}x (medians)");
    }
    if let Some(c) = cells_per_s {
        println!("  3 concurrent creates: {c:.2} cells/s");
    }
    println!("\n`isocell run -- true`, same host");
    row("wall (spawn -> exit)", run_total, "ms");
    for p in RUN_PHASES {
        row(
            &format!("  {}", p.trim_end_matches("_ms")),
            series(&measured_runs, |r| run_phase(r, p)),
            "ms",
        );
    }
    println!("jail cost (jailed against --no-jail, same host, alternating)");
    row("  jailed wall", run_total, "ms");
    row("  unjailed wall", unjailed_total, "ms");
    for p in ["prepare_ms", "teardown_ms"] {
        let name = p.trim_end_matches("_ms");
        row(&format!("  jailed {name}"), series(&measured_runs, |r| run_phase(r, p)), "ms");
        row(&format!("  unjailed {name}"), series(&unjailed_runs, |r| run_phase(r, p)), "ms");
    }
    if let Some(r) = ratio(run_total, unjailed_total) {
        println!("  jailed / unjailed: {r:.3}x (medians)");
    }
    println!("evidence per cell (policy, receipts, fsync'd audit appends), in the test host");
    for c in EVIDENCE_COSTS {
        row(
            &format!("  {}", c.trim_end_matches("_ms")),
            series(&measured_runs, |r| evidence_cost(r, c)),
            "ms",
        );
    }
    println!(
        "evidence per cell, natively on this machine (target total <= {EVIDENCE_TARGET_MS} ms)"
    );
    for (i, c) in EVIDENCE_COSTS.iter().enumerate() {
        row(&format!("  {}", c.trim_end_matches("_ms")), native_series(i), "ms");
    }
    if let (Some(r), Some(c)) = (run_total, full_cycle) {
        println!(
            "isocell run vs bare VMM boot cycle: {:.2}x (target <= {RUN_TARGET_RATIO})",
            r.median / c.median
        );
    }
    println!(
        "\ncontainer image (python test image, {} MB of layers, {} MB unpacked, {} MB block image)",
        img.layer_bytes / 1_000_000,
        img.unpacked_bytes / 1_000_000,
        img.block_bytes / 1_000_000
    );
    row("  cold pull (wall)", cold_series(0), "ms");
    row("    fetch", cold_series(1), "ms");
    row("    convert", cold_series(2), "ms");
    row(
        &format!("  cached: found in the store (target <= {CACHED_IMAGE_TARGET_MS} ms)"),
        cached,
        "ms",
    );
    row("  isocell run base image -- true", base_wall, "ms");
    row("  isocell run python image -- true", img_wall, "ms");
    if let Some(r) = ratio(img_wall, base_wall) {
        println!("  container image / base image: {r:.3}x (medians, same host, alternating)");
    }
    println!("results: {} and {}", path.display(), run_path.display());
    devices_report(&results, baseline.as_deref(), &args, &host, &dir)?;
    net_report(&results, &dir, &host)?;
    peers::report(&results, &dir, &host, &args)?;
    if host.kind() == HostKind::Nested {
        let t = Instant::now();
        machine::bench(args.runs, &host::Paths::discover()?.isocell, &host, &dir)?;
        say_took("the machine series", t);
    }
    let t = Instant::now();
    cri::bench(args.runs, &host, &dir)?;
    say_took("the Kubernetes series", t);
    Ok(())
}

/// Says on stderr how long `what` took since `start`: where a slow CI run's benchmark went.
fn say_took(what: &str, start: Instant) {
    eprintln!("isocell-bench: {what} took {:.0} s", start.elapsed().as_secs_f64());
}

/// The steps' wall time summed by series (a step's name without its run number), longest
/// first: where the benchmark's time goes.
fn series_seconds(results: &[StepResult]) -> String {
    let mut sums = std::collections::BTreeMap::<&str, u64>::new();
    for r in results {
        let series = r.name.trim_end_matches(|c: char| c.is_ascii_digit()).trim_end_matches('-');
        *sums.entry(series).or_default() += r.wall_us;
    }
    let mut by_series: Vec<_> = sums.into_iter().collect();
    by_series.sort_by_key(|s| std::cmp::Reverse(s.1));
    by_series
        .iter()
        .map(|(name, us)| format!("{name} {:.0}", *us as f64 / 1e6))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The steps of `prefix`'s series that count: the first of each kind warms caches.
pub(crate) fn measured_of(results: &[StepResult], prefix: &str) -> Vec<StepResult> {
    results.iter().filter(|r| r.name.starts_with(prefix)).skip(1).cloned().collect()
}

/// Runs `scenario` in `host`; any step that did not exit 0 fails the benchmark.
fn run_checked(host: &TestHost, scenario: &Scenario) -> Result<Vec<StepResult>> {
    let results = host.run(scenario)?;
    if let Some(bad) = results.iter().find(|r| r.exit_code != Some(0)) {
        bail!("a benchmark step failed:\n{}", bad.explain());
    }
    Ok(results)
}

/// The scenario's files: `--baseline-vmm` as `{baseline_vmm}`, where it was given.
fn baseline_file(baseline: &Option<PathBuf>) -> std::collections::BTreeMap<String, String> {
    baseline.iter().map(|p| ("baseline_vmm".to_owned(), p.display().to_string())).collect()
}

/// The device series: this VMM and the baseline (where there is one) alternate, so both see
/// the same host; one warm-up boot each.
fn devbench_steps(args: &Args, with_baseline: bool) -> Vec<Step> {
    let vmms = if with_baseline { DEVBENCH_VMMS.len() } else { 1 };
    (0..=args.device_runs).flat_map(|i| (0..vmms).map(move |v| devbench_step(i, v, args))).collect()
}

/// The device series' figures from `results` (this build, and the baseline where there is one,
/// as ratios of medians): written to `devices.json` in `dir` and printed.
fn devices_report(
    results: &[StepResult],
    baseline: Option<&std::path::Path>,
    args: &Args,
    host: &TestHost,
    dir: &std::path::Path,
) -> Result<()> {
    if let Some(why) =
        results.iter().filter(|r| r.name.starts_with("devbench-")).find_map(devbench_failure)
    {
        bail!("{why}");
    }
    let of_kind = |prefix: &str| measured_of(results, prefix);
    let dev_new = of_kind("devbench-new-");
    let dev_base = baseline.map(|_| of_kind("devbench-baseline-"));
    let exit_names: std::collections::BTreeSet<String> = dev_new
        .iter()
        .chain(dev_base.iter().flatten())
        .flat_map(|r| exit_counts(r).into_keys())
        .collect();
    let dev_new = dev_series(&dev_new, &exit_names);
    let dev_base = dev_base.map(|runs| dev_series(&runs, &exit_names));
    let mut dev_out = json!({
        "benchmark": "vmm-devices",
        "host": host.kind().name(),
        "host_cpu": cpu_model(),
        "runs": args.device_runs,
        "vcpus": args.cpus,
        "memory_mib": args.memory,
        "what": "the devbench guest (initramfs, vmlinux): dd of the 256 MiB data disk through virtio-blk with O_DIRECT in 1 MiB blocks (write with fsync, then read), 16 MiB guest->host over vsock until the host's count came back, timed in the guest (MB/s = 10^6 bytes/s); boot phases and VM exits by kind and device per boot from the VMM report (its 20 most frequent; unlisted count 0); this build and the baseline alternate in the same host",
        "block_bytes": DEVBENCH_DISK_BYTES,
        "vsock_bytes": DEVBENCH_VSOCK_BYTES,
        "new": dev_new.json(),
    });
    if let (Some(base), Some(path)) = (&dev_base, baseline) {
        let mut b = base.json();
        b["vmm"] = json!(path.display().to_string());
        dev_out["baseline"] = b;
        let mut ratios = json!({});
        for (((name, unit, _), n), b) in
            DEVBENCH_FIGURES.iter().zip(&dev_new.figures).zip(&base.figures)
        {
            ratios[format!("{name} ({unit})").trim_end_matches(" ()")] = json!(ratio(*n, *b));
        }
        dev_out["ratio_new_to_baseline"] = ratios;
    }
    let dev_path = dir.join("devices.json");
    std::fs::write(&dev_path, serde_json::to_string_pretty(&dev_out)?)
        .with_context(|| format!("writing {}", dev_path.display()))?;

    match baseline {
        Some(p) => println!(
            "\ndevices (devbench guest), this build against {}, same host, alternating",
            p.display()
        ),
        None => println!("\ndevices (devbench guest), same host"),
    }
    let base_figures = |i: usize| dev_base.as_ref().map(|b| b.figures[i]);
    for (i, (name, unit, _)) in DEVBENCH_FIGURES.iter().enumerate() {
        print_pair(name, dev_new.figures[i], base_figures(i), unit);
    }
    println!("VM exits per boot, by kind and device");
    let mut names: Vec<&String> = exit_names.iter().collect();
    let new_median = |n: &String| dev_new.exits.get(n).copied().flatten().map_or(0.0, |s| s.median);
    names.sort_by(|a, b| new_median(b).total_cmp(&new_median(a)));
    for name in names {
        let base = dev_base.as_ref().map(|b| b.exits.get(name).copied().flatten());
        print_pair(&format!("  {name}"), dev_new.exits.get(name).copied().flatten(), base, "");
    }
    println!("results: {}", dev_path.display());
    Ok(())
}

/// Where the JSON results go (made if missing).
fn out_dir(args: &Args) -> Result<PathBuf> {
    let dir = args.out.clone().unwrap_or_else(|| project_root().join("build/bench"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The network benchmark's HTTP server: busybox httpd on an address given to the loopback of a
/// network namespace the step makes (nothing outside is contacted), `payload.test` naming it.
const NET_SETUP: &str =
    "cd {work} && mkdir -p www && head -c 16777216 /dev/zero > www/payload.bin && \
    echo small > www/small.txt && echo '10.99.0.1 payload.test' > hosts && cat > ns.sh <<'NS'
ip link set lo up && ip addr add 10.99.0.1/32 dev lo
mkdir -p /etc && touch /etc/hosts && mount --bind {work}/hosts /etc/hosts
busybox httpd -f -p 10.99.0.1:8080 -h {work}/www & httpd=$!
";

/// Times, in the cell and on the host alike, one 16 MiB download and 20 small fetches (each a
/// new connection: connect latency plus one request), with a monotonic clock in microseconds.
const NET_TIMING: &str = "t=$($CLOCK); wget -q -O /dev/null http://payload.test:8080/payload.bin; echo ${P}download_us=$(( $($CLOCK) - t ))
t=$($CLOCK); for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do wget -q -O /dev/null http://payload.test:8080/small.txt; done; echo ${P}small20_us=$(( $($CLOCK) - t ))
";

/// Network steps: throughput and connect latency through the proxy against the same on the
/// host, and `isocell run -- true` with and without egress, alternating.
fn net_steps(runs: usize) -> Vec<Step> {
    let run = "ISOCELL_RUN_DIR={work}/run ISOCELL_STATE_DIR={work}/state {isocell} run";
    let mut steps = Vec::new();
    for i in 0..=runs.min(5) {
        let script = format!(
            "{NET_SETUP}CLOCK='{{hostile}} clock' P=host_\n{NET_TIMING}\
             cat > {{work}}/g.sh <<'G'\nCLOCK='/hostile clock' P=cell_\n{NET_TIMING}G\n\
             {run} --egress payload.test:8080 --input {{hostile}}:/hostile --input {{work}}/g.sh:/g.sh -- sh /g.sh\n\
             kill $httpd\nNS\nunshare -mn sh ns.sh"
        )
        .replace("\\n", "\n");
        steps.push(measured_step(format!("netbench-{i}"), &["sh", "-c", &script], 600, ""));
    }
    for i in 0..=runs {
        for (kind, extra) in [("off", ""), ("on", "--egress payload.test:8080 --publish 18080:80")]
        {
            let script = format!("{run} {extra} -- true");
            steps.push(plain_step(format!("netboot-{kind}-{i}"), &script, 300));
        }
    }
    steps
}

/// A shell step without a report file.
fn plain_step(name: String, script: &str, timeout_secs: u64) -> Step {
    Step { report_file: None, ..measured_step(name, &["sh", "-c", script], timeout_secs, "") }
}

/// Prints one row: the cell's median, the host's, and their ratio.
fn print_vs(
    label: &str,
    cell: Option<Summary>,
    host: Option<Summary>,
    unit: &str,
    names: (&str, &str),
) {
    let median = |s: Option<Summary>| s.map_or("-".to_owned(), |s| format!("{:.1}", s.median));
    let r = ratio(cell, host).map_or("-".to_owned(), |r| format!("{r:.3}x"));
    let n = cell.map_or(0, |s| s.n);
    println!(
        "{label:<34} {} {:>8} {unit:<5} {} {:>8}  ratio {r:>7}  (medians, n={n})",
        names.0,
        median(cell),
        names.1,
        median(host)
    );
}

/// A `key=N` figure from a step's output.
fn figure(r: &StepResult, key: &str) -> Option<f64> {
    r.stdout.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')?.trim().parse().ok())
}

fn net_report(results: &[StepResult], dir: &std::path::Path, host: &TestHost) -> Result<()> {
    let of_kind = |prefix: &str| measured_of(results, prefix);
    let bench = of_kind("netbench-");
    if let Some(bad) = bench.iter().find(|r| figure(r, "cell_download_us").is_none()) {
        bail!("the network benchmark step did not measure:\n{}", bad.explain());
    }
    let mib_s =
        |key: &'static str| move |r: &StepResult| figure(r, key).map(|us| 16.0 / (us / 1e6));
    let per_conn =
        |key: &'static str| move |r: &StepResult| figure(r, key).map(|us| us / 20.0 / 1000.0);
    let host_rate = series(&bench, mib_s("host_download_us"));
    let cell_rate = series(&bench, mib_s("cell_download_us"));
    let host_conn = series(&bench, per_conn("host_small20_us"));
    let cell_conn = series(&bench, per_conn("cell_small20_us"));
    let off = series(&of_kind("netboot-off-"), |r| Some(r.wall_us as f64 / 1000.0));
    let on = series(&of_kind("netboot-on-"), |r| Some(r.wall_us as f64 / 1000.0));
    let out = json!({
        "benchmark": "network",
        "host": host.kind().name(),
        "host_cpu": cpu_model(),
        "what": "16 MiB download and 20 small fetches (a connection each), in a cell through the egress proxy against the same wget on the host, in the same step; isocell run -- true with --egress and --publish against without, alternating",
        "download_mib_s": { "host": host_rate, "cell": cell_rate, "ratio_cell_to_host": ratio(cell_rate, host_rate) },
        "fetch_ms": { "host": host_conn, "cell": cell_conn, "ratio_cell_to_host": ratio(cell_conn, host_conn) },
        "run_true_ms": { "without_network": off, "with_network": on, "ratio_with_to_without": ratio(on, off) },
    });
    let path = dir.join("network.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nnetwork (egress proxy against the host's own loopback, same step)");
    print_vs("download 16 MiB", cell_rate, host_rate, "MiB/s", ("cell", "host"));
    print_vs("fetch (connect + small GET)", cell_conn, host_conn, "ms", ("cell", "host"));
    print_vs("isocell run -- true", on, off, "ms", ("network", "none"));
    println!("results: {}", path.display());
    Ok(())
}
