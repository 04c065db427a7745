//! Sessions: connections the host opens to a running cell's agent, any number at once, each
//! carrying one command (`ExecSession`), a wait for one (`WaitSession`), a signal, or file
//! operations. They go through the VMM's vsock device: connect to the cell's `vsock.sock`,
//! write `CONNECT 1025\n`, read `OK PORT\n`, then speak the protocol. A session's command
//! outlives its connection, so a daemon that restarts finds it again by id.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isocell_image::runconfig::Process;
use isocell_proto::{ExitStatus, Message, WindowSize, SESSION_PORT};

use crate::agent_link::{send_on, AgentLink};
use crate::confine::host_dirs;
use crate::{command, CellError};

/// Longest `OK PORT\n` answer read from the VMM.
const MAX_ANSWER: usize = 32;

/// How long a connection may take to be accepted by the agent.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// Where a running cell takes session connections.
#[derive(Debug, Clone)]
pub struct SessionSocket(PathBuf);

impl SessionSocket {
    /// The session socket of cell `id` under `run_dir`.
    pub fn of(run_dir: &Path, id: &str) -> SessionSocket {
        let (_, shared, _) = host_dirs(run_dir, id);
        SessionSocket(shared.join("vsock.sock"))
    }

    /// Opens a connection to the agent's session port.
    pub fn connect(&self) -> Result<AgentLink, CellError> {
        let gone = |e: std::io::Error| {
            CellError::Agent(format!("the cell cannot be reached ({}): {e}", self.0.display()))
        };
        let mut s = UnixStream::connect(&self.0).map_err(gone)?;
        s.set_read_timeout(Some(CONNECT_LIMIT)).map_err(gone)?;
        s.write_all(format!("CONNECT {SESSION_PORT}\n").as_bytes()).map_err(gone)?;
        // Byte by byte: nothing after the line may be taken from the stream here.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < MAX_ANSWER {
            match s.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) => line.push(byte[0]),
                Ok(_) => {
                    return Err(CellError::Agent(
                        "the cell's agent refused a session connection".into(),
                    ))
                }
                Err(e) => return Err(gone(e)),
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(CellError::Agent(format!(
                "the VMM answered {:?} to a session connection",
                String::from_utf8_lossy(&line)
            )));
        }
        s.set_read_timeout(None).map_err(gone)?;
        Ok(AgentLink::session(s)?)
    }

    /// Starts `process` as session `id` (on a terminal of `tty` if given). Returns the
    /// connection to stream its output from (see [`command::stream`]), an input handle, and
    /// its pid in the cell.
    pub fn exec(
        &self,
        id: u64,
        process: &Process,
        tty: Option<WindowSize>,
        stdin: bool,
    ) -> Result<(AgentLink, SessionInput, u32), CellError> {
        let mut link = self.connect()?;
        let start = Message::ExecSession {
            id,
            tty,
            exec: command::request(process, stdin || tty.is_some()),
        };
        let pid = command::start(&mut link, &start)?;
        let input = SessionInput(link.writer());
        Ok((link, input, pid))
    }

    /// Waits until session `id` has ended and returns its status (at once if it has).
    pub fn wait(&self, id: u64) -> Result<ExitStatus, CellError> {
        let mut link = self.connect()?;
        link.send(&Message::WaitSession { id })?;
        loop {
            match link.recv(Duration::from_secs(3600))? {
                Some(Message::Exited(status)) => return Ok(status),
                Some(Message::Error { message }) => return Err(CellError::Agent(message)),
                Some(other) => {
                    return Err(CellError::Agent(format!("unexpected reply {other:?} to a wait")))
                }
                None => {}
            }
        }
    }

    /// Sends `signal` to session `id`'s processes.
    pub fn signal(&self, id: u64, signal: i32) -> Result<(), CellError> {
        let mut link = self.connect()?;
        link.send(&Message::SignalSession { id, signal })?;
        match link.expect(CONNECT_LIMIT, "a signal")? {
            Message::Done => Ok(()),
            Message::Error { message } => Err(CellError::Agent(message)),
            other => Err(CellError::Agent(format!("unexpected reply {other:?} to a signal"))),
        }
    }
}

/// The input side of a session: standard input, terminal size, signals. Cheap to clone; used
/// from any thread while another streams the output.
#[derive(Clone)]
pub struct SessionInput(Arc<Mutex<UnixStream>>);

impl SessionInput {
    fn send(&self, m: &Message) -> Result<(), CellError> {
        Ok(send_on(&self.0, m)?)
    }

    /// Bytes for the command's standard input.
    pub fn stdin(&self, bytes: &[u8]) -> Result<(), CellError> {
        for chunk in bytes.chunks(isocell_proto::MAX_CHUNK) {
            self.send(&Message::Stdin(chunk.to_vec()))?;
        }
        Ok(())
    }

    /// Closes the command's standard input.
    pub fn close_stdin(&self) -> Result<(), CellError> {
        self.send(&Message::StdinEof)
    }

    /// Resizes the command's terminal.
    pub fn resize(&self, size: WindowSize) -> Result<(), CellError> {
        self.send(&Message::Resize(size))
    }

    /// Sends a signal to the command's process group.
    pub fn signal(&self, signal: i32) -> Result<(), CellError> {
        self.send(&Message::Signal(signal))
    }
}
