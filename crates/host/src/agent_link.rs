//! The host end of the protocol with a cell's agent, over the Unix socket the VMM connected.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isocell_proto::{write_frame, FrameBuffer, Message, PROTOCOL_VERSION};

/// A connection to an agent. Reads are done by one owner; writes may come from several threads
/// (stdin forwarding) and are whole frames under a lock.
pub struct AgentLink {
    reader: UnixStream,
    writer: Arc<Mutex<UnixStream>>,
    frames: FrameBuffer,
    buf: Vec<u8>,
}

/// Sends one frame through a shared writer.
pub fn send_on(writer: &Mutex<UnixStream>, msg: &Message) -> Result<(), String> {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *w, msg).map_err(|e| format!("the cell's agent is unreachable: {e}"))
}

impl AgentLink {
    /// Wraps the socket and runs the handshake: the agent says hello, we welcome it.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<(AgentLink, String), String> {
        let writer = stream.try_clone().map_err(|e| format!("agent socket: {e}"))?;
        let mut link = AgentLink {
            reader: stream,
            writer: Arc::new(Mutex::new(writer)),
            frames: FrameBuffer::new(),
            buf: vec![0; 256 * 1024],
        };
        let agent = match link.recv(timeout)? {
            Some(Message::Hello { version, agent }) if version == PROTOCOL_VERSION => agent,
            Some(Message::Hello { version, agent }) => {
                return Err(format!(
                    "the cell's agent ({agent}) speaks protocol version {version}, this isocell \
                     speaks {PROTOCOL_VERSION}: rebuild the base image with scripts/build-all.sh"
                ))
            }
            Some(other) => return Err(format!("the agent opened with {other:?} instead of Hello")),
            None => return Err("the agent connected but said nothing".into()),
        };
        link.send(&Message::Welcome { version: PROTOCOL_VERSION })?;
        Ok((link, agent))
    }

    /// Wraps a session connection (see [`crate::session`]): no handshake, the host speaks
    /// first.
    pub fn session(stream: UnixStream) -> Result<AgentLink, String> {
        let writer = stream.try_clone().map_err(|e| format!("session socket: {e}"))?;
        Ok(AgentLink {
            reader: stream,
            writer: Arc::new(Mutex::new(writer)),
            frames: FrameBuffer::new(),
            buf: vec![0; 256 * 1024],
        })
    }

    /// The shared writer, for other threads.
    pub fn writer(&self) -> Arc<Mutex<UnixStream>> {
        self.writer.clone()
    }

    /// Sends one message.
    pub fn send(&self, msg: &Message) -> Result<(), String> {
        send_on(&self.writer, msg)
    }

    /// The next message, waiting at most `wait`; `Ok(None)` if none came in time.
    pub fn recv(&mut self, wait: Duration) -> Result<Option<Message>, String> {
        self.recv_by(deadline_in(wait))
    }

    /// The next message, waiting until `deadline` at the latest; `Ok(None)` if none came.
    pub fn recv_by(&mut self, deadline: Instant) -> Result<Option<Message>, String> {
        loop {
            if let Some(m) =
                self.frames.next_message().map_err(|e| format!("bad frame from the agent: {e}"))?
            {
                return Ok(Some(m));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.reader
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| format!("agent socket: {e}"))?;
            match self.reader.read(&mut self.buf) {
                Ok(0) => return Err("the cell closed its connection".into()),
                Ok(n) => self.frames.push(&self.buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading from the agent: {e}")),
            }
        }
    }

    /// The next message, waiting as long as it takes (bounded by `limit`, an error after).
    pub fn expect(&mut self, limit: Duration, what: &str) -> Result<Message, String> {
        self.recv(limit)?
            .ok_or_else(|| format!("the agent did not answer {what} within {} s", limit.as_secs()))
    }

    /// The next message, by `deadline` (an error after).
    pub fn expect_by(&mut self, deadline: Instant, what: &str) -> Result<Message, String> {
        self.recv_by(deadline)?.ok_or_else(|| format!("the agent did not answer {what} in time"))
    }
}

/// `wait` from now, or as far as an `Instant` reaches: durations come from users and must
/// never overflow.
pub fn deadline_in(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}
