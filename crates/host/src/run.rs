//! `isocell run` as one call: a fresh cell, inputs, one command with its output streamed,
//! outputs, teardown; timed phase by phase. Built from the [`Cell`](crate::Cell) phases, as the
//! daemon's operations are.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use isocell_image::runconfig::Process;
use serde::Serialize;
use serde_json::{json, Value};

use crate::cell::{open_evidence, Admitted, Cell, Ended, PolicyLoad, Termination, Verdict};
use crate::transfer::OutputBudget;
use crate::{vmm_process, Cancel, CellError, CellRequest, ExecFailure, HostConfig, OutputSink};

/// Everything one run is asked to do.
pub struct RunRequest {
    /// The cell.
    pub cell: CellRequest,
    /// What runs: the command with its environment, working directory and user.
    pub process: Process,
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
    /// Policy files beyond the default and the state directory's.
    pub policy_files: Vec<PathBuf>,
}

/// Milliseconds spent in each phase of one run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Phases {
    /// Checks, plan, admission, cell directory, VMM spawned.
    pub prepare_ms: f64,
    /// VMM start until the agent connected and said hello.
    pub boot_ms: f64,
    /// Inputs: the cell is ready for the command.
    pub agent_ready_ms: f64,
    /// Command start until its exit status arrived (all output delivered).
    pub exec_ms: f64,
    /// Outputs, shutdown, VMM exit and cleanup.
    pub teardown_ms: f64,
    /// From `started` to the end.
    pub total_ms: f64,
}

/// How a run went.
pub struct RunOutcome {
    /// The cell's id.
    pub cell: String,
    /// How the command ended, or why the run failed.
    pub result: Result<Termination, CellError>,
    /// An output copy that was refused (the command's status is then not the run's).
    pub output_error: Option<CellError>,
    /// The report: phases, evidence costs, receipts, the VMM's report.
    pub report: Value,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The bound the VMM enforces on a run's cell when the request gives none: well past every
/// limit the run enforces itself.
fn last_resort_lifetime(req: &RunRequest) -> Option<u64> {
    req.timeout.map(|t| {
        [req.boot_timeout, req.copy_timeout, req.copy_timeout, Duration::from_secs(600)]
            .iter()
            .fold(t.as_secs(), |sum, d| sum.saturating_add(d.as_secs()))
    })
}

/// Runs the request in a fresh cell. `started` is when the caller began (for the phases).
pub fn run(
    host: &HostConfig,
    mut req: RunRequest,
    stdin: Option<Box<dyn Read + Send>>,
    sink: &mut dyn OutputSink,
    cancel: &Cancel,
    started: Instant,
) -> RunOutcome {
    let id = vmm_process::new_id();
    if req.cell.max_lifetime_secs.is_none() {
        req.cell.max_lifetime_secs =
            req.cell.constraints.max_lifetime_secs.or_else(|| last_resort_lifetime(&req));
    }
    let mut phases = Phases::default();
    let policies = PolicyLoad::start(&host.state_dir, &req.policy_files);
    let cell = open_evidence(host, &id).and_then(|mut ev| {
        let plan = crate::cell::plan(host, &id, req.cell.clone(), &mut ev)?;
        Admitted::new(plan, ev, policies, None)?.start(host, &req.process.argv)
    });
    let mut cell = match cell {
        Ok(c) => c,
        Err(e) => {
            return RunOutcome { cell: id, result: Err(e), output_error: None, report: Value::Null }
        }
    };
    let vmm_started = Instant::now();
    phases.prepare_ms = ms(vmm_started - started);

    let mut output_error = None;
    let result = drive(&mut cell, &req, stdin, sink, cancel, &mut phases, &mut output_error);
    let t = Instant::now();
    let verdict = verdict(&result);
    let _ = cell.log("exit", json!({ "exit_code": verdict.exit_code, "outcome": verdict.outcome }));
    if let Err(e) = &result {
        if !matches!(e, CellError::Cancelled(_)) {
            let _ = cell.log("error", json!({ "message": e.to_string() }));
        }
    }
    let ended = cell.delete(&verdict, sink);
    phases.teardown_ms += ms(t.elapsed());
    phases.total_ms = ms(started.elapsed());
    let (result, report) = match ended {
        Ok(ended) => (result, report(&id, &verdict, &phases, &ended)),
        Err(e) => (result.and(Err(e)), Value::Null),
    };
    RunOutcome { cell: id, result, output_error, report }
}

/// The exit receipt's account of a run.
fn verdict(result: &Result<Termination, CellError>) -> Verdict {
    match result {
        Ok(Termination::Exited(status)) if !(0..=255).contains(&status.shell_code()) => {
            Verdict { exit_code: None, outcome: "no_exit_status" }
        }
        // A refused output has its own audit entry; the command itself exited.
        Ok(Termination::Exited(status)) => {
            Verdict { exit_code: Some(status.shell_code()), outcome: "exited" }
        }
        Ok(Termination::TimedOut) => Verdict { exit_code: None, outcome: "timed_out" },
        Ok(Termination::Cancelled(_)) | Err(CellError::Cancelled(_)) => {
            Verdict { exit_code: None, outcome: "interrupted" }
        }
        Err(CellError::Exec { kind: ExecFailure::NotFound, .. }) => {
            Verdict { exit_code: None, outcome: "not_found" }
        }
        Err(CellError::Exec { kind: ExecFailure::CannotExecute, .. }) => {
            Verdict { exit_code: None, outcome: "cannot_execute" }
        }
        Err(_) => Verdict { exit_code: None, outcome: "failed" },
    }
}

fn report(id: &str, verdict: &Verdict, phases: &Phases, ended: &Ended) -> Value {
    json!({
        "cell": id,
        "exit_code": verdict.exit_code,
        "outcome": verdict.outcome,
        "phases": phases,
        "evidence": ended.costs,
        "launch_digest": ended.launch_digest,
        "receipts": { "launch": ended.launch_receipt, "exit": ended.exit_receipt },
        "teardown_checks": ended.checks,
        "vmm": ended.vmm_report,
    })
}

/// From a started VMM to the command's end: agent, inputs, exec, outputs.
fn drive(
    cell: &mut Cell,
    req: &RunRequest,
    stdin: Option<Box<dyn Read + Send>>,
    sink: &mut dyn OutputSink,
    cancel: &Cancel,
    phases: &mut Phases,
    output_error: &mut Option<CellError>,
) -> Result<Termination, CellError> {
    let vmm_started = Instant::now();
    cell.wait_ready(req.boot_timeout, cancel)?;
    let connected = Instant::now();
    phases.boot_ms = ms(connected - vmm_started);
    let inputs_by = crate::cell::deadline(req.copy_timeout);
    for (host, guest) in &req.inputs {
        cell.put(host, guest, inputs_by)?;
    }
    if let Some(reason) = cancel.reason() {
        return Err(CellError::Cancelled(reason));
    }
    let ready = Instant::now();
    phases.agent_ready_ms = ms(ready - connected);
    let termination = cell.exec(&req.process, stdin, sink, req.timeout, cancel)?;
    phases.exec_ms = ms(ready.elapsed());
    match termination {
        Termination::Exited(status) if !(0..=255).contains(&status.shell_code()) => {
            // The agent had no real status for the command (or sent nonsense): the run failed,
            // and says so rather than passing as exit 0.
            sink.notice(&format!(
                "the cell reported no valid exit status for the command ({status:?})"
            ));
        }
        Termination::TimedOut => sink.notice(&format!(
            "the command ran past --timeout {} s and was killed",
            req.timeout.map_or(0, |t| t.as_secs())
        )),
        _ => {}
    }
    if matches!(termination, Termination::Exited(_)) {
        let mut budget =
            OutputBudget::new(req.output_max_bytes, req.output_max_entries, req.copy_timeout);
        for (guest, host) in &req.outputs {
            if let Err(e) = cell.get(guest, host, &mut budget) {
                sink.notice(&e.to_string());
                *output_error = Some(e);
                // The connection is out of step after a refused copy: no more outputs.
                break;
            }
        }
    }
    Ok(termination)
}
