//! The host end of the protocol with a cell's agent, over the Unix socket the VMM connected.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isocell_proto::{write_frame, DecodeError, FrameBuffer, Message, PROTOCOL_VERSION};

/// Why the connection to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentLinkError {
    /// A frame could not be written.
    #[error("the cell's agent is unreachable: {0}")]
    Unreachable(#[source] std::io::Error),
    /// The control socket could not be set up.
    #[error("agent socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A session socket could not be set up.
    #[error("session socket: {0}")]
    SessionSocket(#[source] std::io::Error),
    /// The agent speaks another protocol version.
    #[error(
        "the cell's agent ({agent}) speaks protocol version {version}, this isocell speaks \
         {ours}: rebuild the base image with scripts/build-all.sh",
        ours = PROTOCOL_VERSION
    )]
    Version {
        /// The agent's name.
        agent: String,
        /// Its protocol version.
        version: u16,
    },
    /// The agent's first message was not `Hello`.
    #[error("the agent opened with {0:?} instead of Hello")]
    NoHello(Box<Message>),
    /// The agent connected but sent nothing in time.
    #[error("the agent connected but said nothing")]
    Silent,
    /// The agent sent bytes that are not a frame.
    #[error("bad frame from the agent: {0}")]
    BadFrame(#[source] DecodeError),
    /// The cell closed the connection.
    #[error("the cell closed its connection")]
    Closed,
    /// Reading failed.
    #[error("reading from the agent: {0}")]
    Read(#[source] std::io::Error),
    /// No answer to `what` within `secs` seconds.
    #[error("the agent did not answer {what} within {secs} s")]
    NoAnswerWithin {
        /// What was waited for.
        what: String,
        /// The limit.
        secs: u64,
    },
    /// No answer to `what` by the deadline.
    #[error("the agent did not answer {what} in time")]
    NoAnswer {
        /// What was waited for.
        what: String,
    },
}

/// A connection to an agent. Reads are done by one owner; writes may come from several threads
/// (stdin forwarding) and are whole frames under a lock.
pub struct AgentLink {
    reader: UnixStream,
    writer: Arc<Mutex<UnixStream>>,
    frames: FrameBuffer,
    buf: Vec<u8>,
}

/// Sends one frame through a shared writer.
pub fn send_on(writer: &Mutex<UnixStream>, msg: &Message) -> Result<(), AgentLinkError> {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *w, msg).map_err(AgentLinkError::Unreachable)
}

impl AgentLink {
    /// Wraps the socket and runs the handshake: the agent says hello, we welcome it.
    pub fn handshake(
        stream: UnixStream,
        timeout: Duration,
    ) -> Result<(AgentLink, String), AgentLinkError> {
        let mut link = Self::without_handshake(stream).map_err(AgentLinkError::Socket)?;
        let agent = match link.recv(timeout)? {
            Some(Message::Hello { version, agent }) if version == PROTOCOL_VERSION => agent,
            Some(Message::Hello { version, agent }) => {
                return Err(AgentLinkError::Version { agent, version })
            }
            Some(other) => return Err(AgentLinkError::NoHello(Box::new(other))),
            None => return Err(AgentLinkError::Silent),
        };
        link.send(&Message::Welcome { version: PROTOCOL_VERSION })?;
        Ok((link, agent))
    }

    /// Wraps a session connection (see [`crate::session`]): no handshake, the host speaks
    /// first.
    pub fn session(stream: UnixStream) -> Result<AgentLink, AgentLinkError> {
        Self::without_handshake(stream).map_err(AgentLinkError::SessionSocket)
    }

    /// Wraps the connection a restored cell's agent goes on with (it said hello to the host
    /// that took the snapshot): no handshake, the host speaks first.
    pub fn resumed(stream: UnixStream) -> Result<AgentLink, AgentLinkError> {
        Self::without_handshake(stream).map_err(AgentLinkError::Socket)
    }

    fn without_handshake(stream: UnixStream) -> std::io::Result<AgentLink> {
        let writer = stream.try_clone()?;
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
    pub fn send(&self, msg: &Message) -> Result<(), AgentLinkError> {
        send_on(&self.writer, msg)
    }

    /// The next message, waiting at most `wait`; `Ok(None)` if none came in time.
    pub fn recv(&mut self, wait: Duration) -> Result<Option<Message>, AgentLinkError> {
        self.recv_by(deadline_in(wait))
    }

    /// The next message, waiting until `deadline` at the latest; `Ok(None)` if none came.
    pub fn recv_by(&mut self, deadline: Instant) -> Result<Option<Message>, AgentLinkError> {
        loop {
            if let Some(m) = self.frames.next_message().map_err(AgentLinkError::BadFrame)? {
                return Ok(Some(m));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.reader
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(AgentLinkError::Socket)?;
            match self.reader.read(&mut self.buf) {
                Ok(0) => return Err(AgentLinkError::Closed),
                Ok(n) => self.frames.push(&self.buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(AgentLinkError::Read(e)),
            }
        }
    }

    /// The next message, waiting as long as it takes (bounded by `limit`, an error after).
    pub fn expect(&mut self, limit: Duration, what: &str) -> Result<Message, AgentLinkError> {
        self.recv(limit)?.ok_or_else(|| AgentLinkError::NoAnswerWithin {
            what: what.to_owned(),
            secs: limit.as_secs(),
        })
    }

    /// The next message, by `deadline` (an error after).
    pub fn expect_by(&mut self, deadline: Instant, what: &str) -> Result<Message, AgentLinkError> {
        self.recv_by(deadline)?.ok_or_else(|| AgentLinkError::NoAnswer { what: what.to_owned() })
    }
}

/// `wait` from now, or as far as an `Instant` reaches: durations come from users and must
/// never overflow.
pub fn deadline_in(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}
