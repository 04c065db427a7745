//! `isocell run`: admission checks, cell start, inputs, the command with its output streamed
//! live, outputs, teardown; timed phase by phase.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isocell_proto::{ExecRequest, ExitStatus, Message, MAX_CHUNK};
use serde::Serialize;

use crate::agent_link::{send_on, AgentLink};
use crate::cell::{Cell, CellSpec};
use crate::{exit, locate, transfer};

/// Everything `isocell run` was asked to do.
pub struct RunOptions {
    /// VMM binary.
    pub vmm: PathBuf,
    /// Cell kernel.
    pub kernel: PathBuf,
    /// Root image.
    pub image: PathBuf,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Environment of the command.
    pub env: Vec<(String, String)>,
    /// Working directory in the cell.
    pub workdir: Option<String>,
    /// User and group ids in the cell.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Host path -> cell path, copied in before the command.
    pub inputs: Vec<(PathBuf, String)>,
    /// Cell path -> host path, copied out after it.
    pub outputs: Vec<(String, PathBuf)>,
    /// Limit on the command's run time.
    pub timeout: Option<Duration>,
    /// Limit on boot up to the agent's hello.
    pub boot_timeout: Duration,
    /// Forward our standard input.
    pub interactive: bool,
    /// The command.
    pub argv: Vec<String>,
    /// Where to write the phase report.
    pub report: Option<PathBuf>,
    /// Extra kernel arguments.
    pub kernel_args: String,
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

#[derive(Serialize)]
struct Report<'a> {
    cell: &'a str,
    agent: &'a str,
    exit_code: u8,
    phases: &'a Phases,
    vmm: Option<serde_json::Value>,
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
    let mut phases = Phases::default();
    let spec = CellSpec {
        vmm: &opts.vmm,
        kernel: &opts.kernel,
        image: &opts.image,
        cpus: opts.cpus,
        memory_mib: opts.memory_mib,
        kernel_args: &opts.kernel_args,
        // A last-resort bound on the VM, well past every limit we enforce ourselves.
        max_lifetime_secs: opts.timeout.map(|t| t.as_secs() + opts.boot_timeout.as_secs() + 600),
    };
    let mut cell = match Cell::start(&locate::run_dir(), &spec) {
        Ok(c) => c,
        Err(e) => return exit::fail(&e),
    };
    let vmm_started = Instant::now();
    phases.prepare_ms = ms(vmm_started - started);

    let interrupted = || pending_signal(&signals).is_some();
    let stream = match cell.wait_for_agent(opts.boot_timeout, interrupted) {
        Ok(s) => s,
        Err(e) => {
            return match pending_signal(&signals) {
                Some(sig) => 128 + sig as u8,
                None => exit::fail(&e),
            }
        }
    };
    let connected = Instant::now();
    phases.boot_ms = ms(connected - vmm_started);

    let (mut link, agent) = match AgentLink::handshake(stream, opts.boot_timeout) {
        Ok(l) => l,
        Err(e) => return exit::fail(&format!("{e}{}", cell.diagnostics())),
    };
    for (host, guest) in &opts.inputs {
        if let Err(e) = transfer::put(&mut link, host, guest) {
            return exit::fail(&e);
        }
    }
    if let Some(sig) = pending_signal(&signals) {
        let _ = link.send(&Message::Shutdown);
        cell.stop(Duration::from_secs(5));
        return 128 + sig as u8;
    }
    let ready = Instant::now();
    phases.agent_ready_ms = ms(ready - connected);

    let outcome = match execute(&mut link, opts, &signals) {
        Ok(o) => o,
        Err(Failure { code, message }) => {
            eprintln!("isocell: {message}");
            let _ = link.send(&Message::Shutdown);
            cell.stop(Duration::from_secs(5));
            return code;
        }
    };
    let exited = Instant::now();
    phases.exec_ms = ms(exited - ready);

    let mut code = match outcome {
        Outcome::Exited(status) => status.shell_code().clamp(0, 255) as u8,
        Outcome::TimedOut => {
            eprintln!(
                "isocell: the command ran past --timeout {} s and was killed",
                opts.timeout.map_or(0, |t| t.as_secs())
            );
            exit::TIMED_OUT
        }
        Outcome::Interrupted(sig) => 128 + sig as u8,
    };
    if matches!(outcome, Outcome::Exited(_)) {
        for (guest, host) in &opts.outputs {
            if let Err(e) = transfer::get(&mut link, guest, host) {
                eprintln!("isocell: {e}");
                if code == 0 {
                    code = exit::ISOCELL_FAILED;
                }
            }
        }
    }
    let _ = link.send(&Message::Shutdown);
    drop(link);
    let status = cell.stop(Duration::from_secs(10));
    if !status.is_some_and(|s| s.success()) {
        eprintln!(
            "isocell: warning: the cell did not shut down cleanly (VMM {}){}",
            status.map_or("killed".into(), |s| s.to_string()),
            cell.diagnostics()
        );
    }
    let vmm_report = cell.vmm_report();
    let id = cell.id.clone();
    drop(cell);
    phases.teardown_ms = ms(exited.elapsed());
    phases.total_ms = ms(started.elapsed());
    if let Some(path) = &opts.report {
        let report =
            Report { cell: &id, agent: &agent, exit_code: code, phases: &phases, vmm: vmm_report };
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("isocell: cannot write the report {}: {e}", path.display());
        }
    }
    code
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
        argv: opts.argv.clone(),
        env: opts.env.clone(),
        cwd: opts.workdir.clone(),
        uid: opts.uid,
        gid: opts.gid,
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
