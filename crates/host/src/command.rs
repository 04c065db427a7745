//! One command on an agent connection, the same on the cell's control connection (`isocell
//! run`) and on a session connection (the daemon): start it, stream its output to a sink, stop
//! it past its time limit or when cancelled.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isocell_image::runconfig::Process;
use isocell_proto::{ExecRequest, Message, MAX_CHUNK};

use crate::agent_link::{send_on, AgentLink};
use crate::{Cancel, CancelReason, CellError, ExecFailure, OutputSink, Termination};

/// How long the agent is given to confirm a command started.
const EXEC_START_LIMIT: Duration = Duration::from_secs(60);

/// After asking the agent to kill a command, how long to wait for it to say so.
const KILL_CONFIRM_LIMIT: Duration = Duration::from_secs(5);

/// The protocol's form of a process.
pub fn request(process: &Process, stdin: bool) -> ExecRequest {
    ExecRequest {
        argv: process.argv.clone(),
        env: process.env.clone(),
        cwd: Some(process.cwd.clone()),
        uid: process.uid,
        gid: process.gid,
        groups: process.groups.clone(),
        stdin,
        privileges: process.privileges,
    }
}

/// Sends `start` (an `Exec` or `ExecSession`) and waits for the agent to confirm the command
/// started. Returns its pid in the cell.
pub fn start(link: &mut AgentLink, start: &Message) -> Result<u32, CellError> {
    link.send(start)?;
    match link.expect(EXEC_START_LIMIT, "the command start")? {
        Message::Started { pid } => Ok(pid),
        Message::ExecFailed { errno, message } => {
            let kind = match errno {
                libc::ENOENT => ExecFailure::NotFound,
                libc::EACCES | libc::ENOEXEC | libc::EPERM | libc::EISDIR => {
                    ExecFailure::CannotExecute
                }
                _ => ExecFailure::Other,
            };
            Err(CellError::Exec { kind, message })
        }
        Message::Error { message } => Err(CellError::Exec { kind: ExecFailure::Other, message }),
        other => Err(CellError::Agent(format!("unexpected reply {other:?} to exec"))),
    }
}

/// Streams a started command's output into `sink` until it exits. Past `timeout`, or when
/// `cancel` fires, the command is killed (SIGKILL to its process group) — except when the
/// reason is [`CancelReason::Detached`]: then streaming stops and the command goes on.
pub fn stream(
    link: &mut AgentLink,
    sink: &mut dyn OutputSink,
    timeout: Option<Duration>,
    cancel: &Cancel,
) -> Result<Termination, CellError> {
    let started = Instant::now();
    let mut stopping: Option<(Termination, Instant)> = None;
    loop {
        match link.recv(Duration::from_millis(50))? {
            Some(Message::Stdout(bytes)) => sink.stdout(&bytes),
            Some(Message::Stderr(bytes)) => sink.stderr(&bytes),
            Some(Message::Exited(status)) => {
                return Ok(stopping.map_or(Termination::Exited(status), |(t, _)| t))
            }
            Some(other) => {
                return Err(CellError::Agent(format!(
                    "unexpected message {other:?} from the agent"
                )))
            }
            None => {}
        }
        if let Some((t, since)) = &stopping {
            // The agent was told to kill the command; if it cannot say so, stop waiting.
            if since.elapsed() > KILL_CONFIRM_LIMIT {
                return Ok(*t);
            }
            continue;
        }
        let why = match cancel.reason() {
            Some(CancelReason::Detached) => {
                return Err(CellError::Cancelled(CancelReason::Detached))
            }
            Some(reason) => Some(Termination::Cancelled(reason)),
            None if timeout.is_some_and(|t| started.elapsed() > t) => Some(Termination::TimedOut),
            None => None,
        };
        if let Some(t) = why {
            link.send(&Message::Signal(libc::SIGKILL))?;
            stopping = Some((t, Instant::now()));
        }
    }
}

/// Copies `input` to the command until it ends (a thread, so a blocked read never holds up the
/// output).
pub fn forward_stdin(mut input: Box<dyn Read + Send>, writer: Arc<Mutex<UnixStream>>) {
    let _ = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            match input.read(&mut buf) {
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
