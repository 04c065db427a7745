//! `isocell run`: admission checks, cell start, inputs, the command with its output streamed
//! live, outputs, teardown; timed phase by phase.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isocell_proto::{ExecRequest, ExitStatus, Message, MAX_CHUNK};
use serde::Serialize;

use isocell_evidence::measure::{measure, DigestCache, LaunchInputs};
use isocell_evidence::policy::{AdmissionRequest, Policies};
use isocell_spec::Constraints;
use isocell_vmm::device_manager::DevicePlan;
use serde_json::{json, Value};

use crate::agent_link::{send_on, AgentLink};
use crate::cell::{self, Cell, CellSpec};
use crate::confine;
use crate::evidence::{ms_since, CellEvidence};
use crate::state::{self, Host};
use crate::{exit, locate, transfer};

/// Everything `isocell run` was asked to do.
pub struct RunOptions {
    /// VMM binary.
    pub vmm: PathBuf,
    /// The jailer; `None` runs the VMM unjailed (`--no-jail`).
    pub jailer: Option<PathBuf>,
    /// Cell kernel.
    pub kernel: PathBuf,
    /// The block image the cell boots.
    pub image: PathBuf,
    /// The container image it was converted from, if any.
    pub container: Option<ContainerImage>,
    /// What runs: the command with its environment, working directory and user.
    pub process: isocell_image::runconfig::Process,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Host path -> cell path, copied in before the command.
    pub inputs: Vec<(PathBuf, String)>,
    /// Cell path -> host path, copied out after it.
    pub outputs: Vec<(String, PathBuf)>,
    /// Limit on the command's run time.
    pub timeout: Option<Duration>,
    /// Limit on boot up to the agent's hello.
    pub boot_timeout: Duration,
    /// Limit on copying all inputs in, and separately on copying all outputs out.
    pub copy_timeout: Duration,
    /// Cap on the bytes all outputs together may write.
    pub output_max_bytes: u64,
    /// Cap on the files and directories all outputs together may create.
    pub output_max_entries: u64,
    /// Forward our standard input.
    pub interactive: bool,
    /// Where to write the phase report.
    pub report: Option<PathBuf>,
    /// Extra kernel arguments.
    pub kernel_args: String,
    /// Admission constraints (from the spec and flags).
    pub constraints: Constraints,
    /// Policy files beyond the default and the state directory's.
    pub policy_files: Vec<PathBuf>,
}

/// A container image converted for the cell.
pub struct ContainerImage {
    /// The image, as the store holds it.
    pub resolved: isocell_image::Resolved,
    /// Its name pins a digest.
    pub pinned: bool,
}

/// Milliseconds spent in each phase of one run.
#[derive(Debug, Default, Serialize)]
pub struct Phases {
    /// Checks, cell directory, VMM spawned.
    pub prepare_ms: f64,
    /// VMM start until the agent connected.
    pub boot_ms: f64,
    /// Handshake and inputs: the cell is ready for the command.
    pub agent_ready_ms: f64,
    /// Command start until its exit status arrived (all output delivered).
    pub exec_ms: f64,
    /// Outputs, shutdown, VMM exit and cleanup.
    pub teardown_ms: f64,
    /// From the start of `isocell run` to the end.
    pub total_ms: f64,
}

/// Why the command stopped.
enum Outcome {
    Exited(ExitStatus),
    TimedOut,
    Interrupted(i32),
}

/// Which terminating signal arrived, if any (0: none).
fn install_signal_flags() -> Arc<[AtomicBool; 3]> {
    let flags = Arc::new([AtomicBool::new(false), AtomicBool::new(false), AtomicBool::new(false)]);
    for (i, sig) in
        [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP]
            .into_iter()
            .enumerate()
    {
        let f = flags.clone();
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe {
            signal_hook::low_level::register(sig, move || f[i].store(true, Ordering::SeqCst))
        };
    }
    flags
}

fn pending_signal(flags: &[AtomicBool; 3]) -> Option<i32> {
    let sigs = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    flags.iter().zip(sigs).find(|(f, _)| f.load(Ordering::SeqCst)).map(|(_, s)| s)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the command in a fresh cell and returns the exit code for `isocell` itself.
pub fn run(opts: &RunOptions, started: Instant) -> u8 {
    let signals = install_signal_flags();
    let id = cell::new_id();
    let host = match Host::load_or_init(&state::state_dir()) {
        Ok(h) => h,
        Err(e) => return exit::fail(&e),
    };
    let mut ev = match CellEvidence::open(host, &id) {
        Ok(e) => e,
        Err(e) => return exit::fail(&e),
    };
    let code = run_cell(opts, started, &id, &mut ev, &signals);
    // A denial is already in the log as its admission decision; any other failure is an error.
    if let Err(e) = code.as_ref() {
        if e.code != exit::DENIED {
            let _ = ev.log("error", json!({ "message": e.message }));
        }
    }
    match code {
        Ok(c) => c,
        Err(f) => {
            tell!("isocell: error: {}", f.message);
            f.code
        }
    }
}

/// What the cell's image is, for the measurement and the receipts: a container image by its
/// reference and digests, with dm-verity on; a block image by its path (its digest is the
/// measurement's `root_image`).
fn image_identity(opts: &RunOptions) -> Value {
    match &opts.container {
        Some(c) => {
            let r = &c.resolved.record;
            json!({
                "kind": "oci",
                "reference": c.resolved.name,
                "manifest_digest": r.manifest_digest,
                "config_digest": r.config_digest,
                "block_digest": r.converted.block_digest,
                "verity": { "enabled": true, "root_hash": r.converted.verity.root_hash },
            })
        }
        None => json!({ "kind": "raw", "path": opts.image, "verity": { "enabled": false } }),
    }
}

/// Admission, measurement, the cell's life and its evidence.
fn run_cell(
    opts: &RunOptions,
    started: Instant,
    id: &str,
    ev: &mut CellEvidence,
    signals: &[AtomicBool; 3],
) -> Result<u8, Failure> {
    let mut phases = Phases::default();
    let run_dir = locate::run_dir();
    for stale in cell::sweep_stale(&run_dir) {
        let _ = ev.log("cleanup", json!({ "stale_cell": stale }));
    }
    let initrd = locate::agent_initrd(None)?;
    let from = confine::Binaries {
        kernel: &opts.kernel,
        initrd: &initrd,
        image: &opts.image,
        vmm: &opts.vmm,
        jailer: opts.jailer.as_deref(),
    };
    // Jailed cells run exactly the files measured here (see `Pinned`).
    let pinned = match opts.jailer {
        Some(_) => Some(confine::Pinned::open(&from)?),
        None => None,
    };
    let (view, jail) =
        confine::plan(&run_dir, id, &from, pinned.as_ref(), opts.cpus, opts.memory_mib);
    let measured_paths = pinned.as_ref().map(confine::Pinned::own_paths);
    let (kernel_src, image_src, vmm_src) = match &measured_paths {
        Some((k, i, v)) => (k.as_path(), i.as_path(), v.as_path()),
        None => (opts.kernel.as_path(), opts.image.as_path(), opts.vmm.as_path()),
    };
    let initrd_src =
        pinned.as_ref().map_or_else(|| initrd.clone(), confine::Pinned::own_initrd_path);
    // A container image boots through dm-verity: the kernel builds /dev/dm-0 over the image's
    // disk from the measured command line and refuses any block that differs from conversion.
    let (root_device, extra_boot_args) = match &opts.container {
        Some(c) => (
            "/dev/dm-0".to_owned(),
            c.resolved.record.converted.verity.dm_create(cell::IMAGE_DEVICE),
        ),
        None => (cell::IMAGE_DEVICE.to_owned(), String::new()),
    };
    let spec = CellSpec {
        root_device,
        extra_boot_args,
        cpus: opts.cpus,
        memory_mib: opts.memory_mib,
        kernel_args: opts.kernel_args.clone(),
        // The spec's lifetime bound is enforced by the VMM itself; without one, a last-resort
        // bound well past every limit we enforce here.
        max_lifetime_secs: opts.constraints.max_lifetime_secs.or(opts.timeout.map(|t| {
            [opts.boot_timeout, opts.copy_timeout, opts.copy_timeout, Duration::from_secs(600)]
                .iter()
                .fold(t.as_secs(), |sum, d| sum.saturating_add(d.as_secs()))
        })),
        ..CellSpec::default()
    };
    let config = cell::vm_config(&view, &spec);
    let plan = DevicePlan::new(&config).map_err(|e| Failure::from(e.to_string()))?;
    let cmdline = isocell_vmm::kernel_cmdline(&config, &plan);
    let seccomp =
        isocell_evidence::canonical::to_canonical_string(&isocell_vmm::seccomp::describe());
    // The confinement is part of what was launched; per-cell values (uid, paths) are not.
    let confinement = json!({
        "jailed": jail.is_some(),
        "namespaces": jail.as_ref().map(|_| isocell_jail::NAMESPACES),
        "files": jail.as_ref().map(|j| j.spec.mounts.iter().map(|m| json!([m.jail, m.writable, m.exec])).collect::<Vec<_>>()),
        "device_nodes": jail.as_ref().map(|j| j.spec.devices.clone()),
        "rlimits": jail.as_ref().map(|j| j.spec.rlimits.clone()),
        "cgroup": jail.as_ref().map(|j| j.limits.clone()),
    });

    let image_identity = image_identity(opts);
    let block_digest =
        opts.container.as_ref().map(|c| c.resolved.record.converted.block_digest.to_string());

    // Measure and decide before anything exists.
    let t = Instant::now();
    let cache = DigestCache::new(ev.host.dir.join("digests"));
    let measurement = measure(
        &LaunchInputs {
            image_digest: block_digest.as_deref(),
            image_identity: opts.container.as_ref().map(|_| &image_identity),
            kernel: kernel_src,
            initrd: Some(&initrd_src),
            cmdline: &cmdline,
            image: image_src,
            vm_config: &json!({
                "vm": cell::measured_config(&config, &view),
                "confinement": confinement,
            }),
            vmm: vmm_src,
            seccomp: Some(seccomp.as_bytes()),
        },
        Some(&cache),
    )?;
    ev.costs.measure_ms += ms_since(t);
    let t = Instant::now();
    let policies = Policies::load_standard(&ev.host.dir.join("policies"), &opts.policy_files);
    ev.costs.policy_ms += ms_since(t);
    let c = &opts.constraints;
    let profile = &ev.host.profile;
    let request = AdmissionRequest {
        cell_id: id.to_owned(),
        host_id: profile.host_id.clone(),
        host_jurisdiction: profile.jurisdiction.clone(),
        host_zone: profile.zone.clone(),
        operator: profile.operator.clone(),
        cpus: opts.cpus.into(),
        memory_mib: opts.memory_mib,
        image_digest: match &opts.container {
            Some(c) => c.resolved.record.manifest_digest.to_string(),
            None => measurement.components.get("root_image").cloned().unwrap_or_default(),
        },
        image_reference: match &opts.container {
            Some(c) => c.resolved.name.clone(),
            None => opts.image.display().to_string(),
        },
        image_kind: if opts.container.is_some() { "oci" } else { "raw" }.to_owned(),
        image_reference_pinned: opts.container.as_ref().is_some_and(|c| c.pinned),
        jurisdictions: c.jurisdictions.clone(),
        classification: c.classification.as_str().to_owned(),
        classification_level: c.classification as i64,
        image_digests: c.image_digests.clone(),
        max_lifetime_secs: c.max_lifetime_secs,
        jailed: jail.is_some(),
    };
    let decision = ev.admit(policies, &request, &measurement)?;
    if !decision.allowed {
        return Err(Failure {
            code: exit::DENIED,
            message: format!("admission {}; no cell was started", decision.explain()),
        });
    }
    if let Some(host) = isocell_vmm::config::host_memory_mib() {
        if opts.memory_mib > host {
            return Err(format!(
                "--memory {} MiB is more than this host's {host} MiB; give less",
                opts.memory_mib
            )
            .into());
        }
    }
    if let Err(e) = isocell_vmm::host_check::check() {
        return Err(format!(
            "{e}\nOn this machine use the nested test host: scripts/run-cell.sh -- COMMAND"
        )
        .into());
    }

    let mut cell = Cell::start(&run_dir, id, &opts.vmm, &config, jail.as_ref())?;
    let vmm_started = Instant::now();
    phases.prepare_ms = ms(vmm_started - started);
    let vmm_pid = cell.vmm_pid(Duration::from_secs(5));
    let receipt =
        ev.launched(&measurement, &decision, &opts.process.argv, vmm_pid, &image_identity)?;

    let result = drive(opts, &mut cell, ev, signals, &mut phases, vmm_started);
    let (code, outcome) = match &result {
        Ok((code, outcome)) => (*code, *outcome),
        Err(f) => (f.code, "failed"),
    };
    let t = Instant::now();
    let vmm_report = cell.vmm_report();
    let (checks, oom_kills) = cell.teardown();
    phases.teardown_ms += ms_since(t);
    let checks = serde_json::to_value(&checks).unwrap_or_default();
    let negotiated = vmm_report.as_ref().and_then(|r| r.get("negotiated_features"));
    let surface = confine::surface(&config, &plan, jail.as_ref(), negotiated);
    let surface_path = ev.write_record("surface.json", &surface)?;
    let ended = json!({
        "surface": surface_path,
        "surface_sha256": isocell_evidence::canonical::sha256_hex(
            isocell_evidence::canonical::to_canonical_string(&surface).as_bytes(),
        ),
        "oom_kills": oom_kills,
    });
    let exit_receipt = ev.ended(code, outcome, &checks, ended)?;
    if checks.as_object().is_some_and(|o| o.values().any(|v| v != &Value::Bool(true))) {
        tell!("isocell: warning: a teardown check failed: {checks}");
    }
    phases.total_ms = ms(started.elapsed());
    if let Some(path) = &opts.report {
        let report = json!({
            "cell": id,
            "exit_code": code,
            "outcome": outcome,
            "phases": phases,
            "evidence": ev.costs,
            "launch_digest": measurement.launch_digest,
            "receipts": { "launch": receipt, "exit": exit_receipt },
            "vmm": vmm_report,
        });
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text) {
            tell!("isocell: cannot write the report {}: {e}", path.display());
        }
    }
    result.map(|(code, _)| code)
}

/// From a started VMM to the command's end: agent, inputs, exec, outputs, shutdown request.
fn drive(
    opts: &RunOptions,
    cell: &mut Cell,
    ev: &mut CellEvidence,
    signals: &[AtomicBool; 3],
    phases: &mut Phases,
    vmm_started: Instant,
) -> Result<(u8, &'static str), Failure> {
    let interrupted = || pending_signal(signals).is_some();
    let stream = match cell.wait_for_agent(opts.boot_timeout, interrupted) {
        Ok(s) => s,
        Err(e) => {
            return match pending_signal(signals) {
                Some(sig) => Ok((128 + sig as u8, "interrupted")),
                None => Err(e.into()),
            }
        }
    };
    let connected = Instant::now();
    phases.boot_ms = ms(connected - vmm_started);
    let (mut link, agent) = AgentLink::handshake(stream, opts.boot_timeout)
        .map_err(|e| Failure::from(format!("{e}{}", cell.diagnostics())))?;
    ev.log("start", json!({ "agent": agent, "boot_ms": phases.boot_ms.round() as u64 }))?;
    let inputs_by = crate::agent_link::deadline_in(opts.copy_timeout);
    for (host, guest) in &opts.inputs {
        if let Err(e) = transfer::put(&mut link, host, guest, inputs_by) {
            abandon(&link, cell);
            return Err(e.into());
        }
    }
    if let Some(sig) = pending_signal(signals) {
        abandon(&link, cell);
        return Ok((128 + sig as u8, "interrupted"));
    }
    let ready = Instant::now();
    phases.agent_ready_ms = ms(ready - connected);

    let argv_digest = isocell_evidence::canonical::sha256_hex(
        serde_json::to_string(&opts.process.argv).unwrap_or_default().as_bytes(),
    );
    ev.log("exec", json!({ "program": opts.process.argv.first(), "argv_sha256": argv_digest }))?;
    let outcome = match execute(&mut link, opts, signals) {
        Ok(o) => o,
        Err(f) => {
            abandon(&link, cell);
            return Err(f);
        }
    };
    let exited = Instant::now();
    phases.exec_ms = ms(exited - ready);

    let (mut code, what) = match outcome {
        Outcome::Exited(status) => {
            match u8::try_from(status.shell_code()) {
                Ok(code) => (code, "exited"),
                Err(_) => {
                    // The agent had no real status for the command (or sent nonsense): the run
                    // failed, and says so rather than passing as exit 0.
                    tell!("isocell: the cell reported no valid exit status for the command ({status:?})");
                    (exit::ISOCELL_FAILED, "no_exit_status")
                }
            }
        }
        Outcome::TimedOut => {
            tell!(
                "isocell: the command ran past --timeout {} s and was killed",
                opts.timeout.map_or(0, |t| t.as_secs())
            );
            (exit::TIMED_OUT, "timed_out")
        }
        Outcome::Interrupted(sig) => (128 + sig as u8, "interrupted"),
    };
    ev.log("exit", json!({ "exit_code": code, "outcome": what }))?;
    if what == "exited" {
        let mut budget = transfer::OutputBudget::new(
            opts.output_max_bytes,
            opts.output_max_entries,
            opts.copy_timeout,
        );
        for (guest, host) in &opts.outputs {
            if let Err(e) = transfer::get(&mut link, guest, host, &mut budget) {
                tell!("isocell: {e}");
                ev.log("output_refused", json!({ "output": guest, "reason": e }))?;
                if code == 0 {
                    code = exit::ISOCELL_FAILED;
                }
                // The connection is out of step after a refused copy: no more outputs.
                break;
            }
        }
    }
    let _ = link.send(&Message::Shutdown);
    drop(link);
    let status = cell.stop(Duration::from_secs(10));
    if !status.is_some_and(|s| s.success()) {
        tell!(
            "isocell: warning: the cell did not shut down cleanly (VMM {}){}",
            status.map_or("killed".into(), |s| s.to_string()),
            cell.diagnostics()
        );
    }
    phases.teardown_ms = ms(exited.elapsed());
    Ok((code, what))
}

/// Ends a run early: asks the agent to power the cell off, and stops the VMM if it does not
/// within a few seconds.
fn abandon(link: &AgentLink, cell: &mut Cell) {
    let _ = link.send(&Message::Shutdown);
    cell.stop(Duration::from_secs(5));
}

struct Failure {
    code: u8,
    message: String,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure { code: exit::ISOCELL_FAILED, message }
    }
}

/// Starts the command and streams its output until it exits, times out or we are interrupted.
fn execute(
    link: &mut AgentLink,
    opts: &RunOptions,
    signals: &[AtomicBool; 3],
) -> Result<Outcome, Failure> {
    link.send(&Message::Exec(ExecRequest {
        argv: opts.process.argv.clone(),
        env: opts.process.env.clone(),
        cwd: Some(opts.process.cwd.clone()),
        uid: opts.process.uid,
        gid: opts.process.gid,
        groups: opts.process.groups.clone(),
        stdin: opts.interactive,
    }))?;
    match link.expect(Duration::from_secs(60), "the command start")? {
        Message::Started { .. } => {}
        Message::ExecFailed { errno, message } => {
            let code = match errno {
                libc::ENOENT => exit::NOT_FOUND,
                libc::EACCES | libc::ENOEXEC | libc::EPERM | libc::EISDIR => exit::CANNOT_EXECUTE,
                _ => exit::ISOCELL_FAILED,
            };
            return Err(Failure { code, message });
        }
        other => return Err(format!("unexpected reply {other:?} to exec").into()),
    }
    let started = Instant::now();
    if opts.interactive {
        forward_stdin(link.writer());
    }
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    let mut stopping: Option<(Outcome, Instant)> = None;
    loop {
        match link.recv(Duration::from_millis(50))? {
            Some(Message::Stdout(bytes)) => {
                let _ = stdout.write_all(&bytes).and_then(|()| stdout.flush());
            }
            Some(Message::Stderr(bytes)) => {
                let _ = stderr.write_all(&bytes);
            }
            Some(Message::Exited(status)) => {
                return Ok(match stopping {
                    Some((o, _)) => o,
                    None => Outcome::Exited(status),
                })
            }
            Some(other) => {
                return Err(format!("unexpected message {other:?} from the agent").into())
            }
            None => {}
        }
        if let Some((_, since)) = &stopping {
            // The agent was told to kill the command; if it cannot say so, stop waiting.
            if since.elapsed() > Duration::from_secs(5) {
                return Ok(stopping.map_or(Outcome::TimedOut, |(o, _)| o));
            }
            continue;
        }
        let why = if let Some(sig) = pending_signal(signals) {
            Some(Outcome::Interrupted(sig))
        } else if opts.timeout.is_some_and(|t| started.elapsed() > t) {
            Some(Outcome::TimedOut)
        } else {
            None
        };
        if let Some(o) = why {
            link.send(&Message::Signal(libc::SIGKILL))?;
            stopping = Some((o, Instant::now()));
        }
    }
}

/// Copies our standard input to the command until it ends.
fn forward_stdin(writer: Arc<std::sync::Mutex<std::os::unix::net::UnixStream>>) {
    let _ = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = send_on(&writer, &Message::StdinEof);
                    return;
                }
                Ok(n) => {
                    if send_on(&writer, &Message::Stdin(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
}
