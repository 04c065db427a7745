//! `isocell run` on a terminal: signals become a cancellation, the command's output goes to our
//! stdout and stderr, the run's result becomes our exit status. The run itself is
//! [`isocell_host::run`].

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use isocell_host::{
    Cancel, CancelReason, CellError, ExecFailure, HostConfig, OutputSink, RunRequest, Termination,
};

use crate::exit;

/// A checked `isocell run` command line.
pub struct Run {
    /// Where the VMM, jailer, state and run directories are.
    pub host: HostConfig,
    /// The run.
    pub request: RunRequest,
    /// Forward our standard input.
    pub interactive: bool,
    /// Where to write the phase report.
    pub report: Option<PathBuf>,
}

/// Our terminal: output as it comes, notices as `isocell: ...` lines on stderr. A stdout or
/// stderr that cannot be written is ignored (it must not change the exit status).
pub(crate) struct Terminal;

impl OutputSink for Terminal {
    fn stdout(&mut self, bytes: &[u8]) {
        let mut out = std::io::stdout();
        let _ = out.write_all(bytes).and_then(|()| out.flush());
    }
    fn stderr(&mut self, bytes: &[u8]) {
        let _ = std::io::stderr().write_all(bytes);
    }
    fn notice(&mut self, line: &str) {
        tell!("isocell: {line}");
    }
}

/// SIGINT, SIGTERM and SIGHUP cancel the run (it then tears the cell down in order).
pub(crate) fn cancel_on_signals() -> Cancel {
    let cancel = Cancel::new();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let c = cancel.clone();
        // SAFETY: the handler only does one atomic compare-exchange, which is
        // async-signal-safe.
        let _ = unsafe {
            signal_hook::low_level::register(sig, move || c.cancel(CancelReason::Signal(sig)))
        };
    }
    cancel
}

/// Runs the command in a fresh cell and returns the exit status for `isocell` itself.
pub fn run(r: Run, started: Instant) -> u8 {
    let cancel = cancel_on_signals();
    let stdin: Option<Box<dyn std::io::Read + Send>> =
        if r.interactive { Some(Box::new(std::io::stdin())) } else { None };
    let outcome = isocell_host::run(&r.host, r.request, stdin, &mut Terminal, &cancel, started);
    if let Some(path) = &r.report {
        if !outcome.report.is_null() {
            let text = serde_json::to_string_pretty(&outcome.report).unwrap_or_default();
            if let Err(e) = std::fs::write(path, text) {
                tell!("isocell: cannot write the report {}: {e}", path.display());
            }
        }
    }
    match outcome.result {
        Ok(t) => match (status_of(t), outcome.output_error) {
            (0, Some(_)) => exit::ISOCELL_FAILED,
            (code, _) => code,
        },
        Err(e) => error_status(&e),
    }
}

/// The shell's view of how the command ended.
fn status_of(t: Termination) -> u8 {
    match t {
        Termination::Exited(status) => {
            u8::try_from(status.shell_code()).unwrap_or(exit::ISOCELL_FAILED)
        }
        Termination::TimedOut => exit::TIMED_OUT,
        Termination::Cancelled(reason) => cancelled(reason),
    }
}

fn cancelled(reason: CancelReason) -> u8 {
    match reason {
        CancelReason::Signal(s) => u8::try_from(s).map_or(exit::ISOCELL_FAILED, |s| 128 + s),
        CancelReason::Deleted | CancelReason::Detached => exit::ISOCELL_FAILED,
    }
}

/// Says what went wrong and gives the status for it.
pub(crate) fn error_status(e: &CellError) -> u8 {
    if let CellError::Cancelled(reason) = e {
        return cancelled(*reason);
    }
    tell!("isocell: error: {e}");
    match e {
        CellError::Denied(_) => exit::DENIED,
        CellError::Exec { kind: ExecFailure::NotFound, .. } => exit::NOT_FOUND,
        CellError::Exec { kind: ExecFailure::CannotExecute, .. } => exit::CANNOT_EXECUTE,
        _ => exit::ISOCELL_FAILED,
    }
}
