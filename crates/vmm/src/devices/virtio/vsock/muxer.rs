//! The host side of virtio-vsock as Unix sockets ("hybrid vsock", the model Firecracker
//! documents): guest stream connections are spliced onto Unix stream sockets.
//!
//! - host-initiated: a host process connects to `uds_path` and writes `CONNECT PORT\n`; the VMM
//!   asks the guest for a connection to PORT and, once the guest accepts, answers `OK LOCAL\n`
//!   on the socket, after which bytes flow both ways. A refusal closes the socket.
//! - guest-initiated: a guest connection to host port P is connected to the socket listening at
//!   `uds_path` + `_P`; if nobody listens there the guest gets a reset.
//!
//! Everything the guest sends is untrusted. Each connection buffers at most [`CONN_BUF_SIZE`]
//! bytes towards the host (the credit the guest is given; a guest that sends beyond it is reset),
//! control packets waiting for guest receive buffers are capped, and connections are capped: a
//! flooding or malformed guest only loses its own connections.
//!
//! Each direction ends on its own, as TCP's do: a host socket shut for writing is a
//! `SHUTDOWN` of the host's sending side only, and the guest may go on sending; a guest that
//! closes while bytes for the host are still buffered has them delivered before the host
//! socket ends (a guest reset, before it finished sending, drops them). A Unix socket cannot
//! carry a reset: the host reads an aborted connection's end as an ordinary end of file.
//!
//! Connections are served in turn (round robin), so one busy connection cannot starve the
//! others. A connection cannot hold its slot for ever: the guest has [`CONNECT_TIMEOUT`] to
//! answer a host's request, and once the host side has
//! finished, the guest has [`SHUTDOWN_TIMEOUT`] to reset it, and a connection the guest shut in
//! one direction must move a byte at least every [`HALF_CLOSED_IDLE`].
//!
//! This type knows nothing of virtqueues: the device moves [`Header`]s and payloads between it
//! and the guest's queues. The sockets are registered with an epoll set that the device's event
//! thread waits on.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// The host's context id.
pub const HOST_CID: u64 = isocell_spec::vm::VSOCK_HOST_CID;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type supported.
pub const TYPE_STREAM: u16 = 1;
/// Packet operations (virtio spec 5.10.6).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset or refused.
    pub const RST: u16 = 3;
    /// The sender will receive and/or send no more.
    pub const SHUTDOWN: u16 = 4;
    /// Payload.
    pub const RW: u16 = 5;
    /// The sender's buffer space changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;

/// Bytes buffered per connection towards the host, advertised to the guest as its credit.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Most connections at once; more are refused with a reset.
pub const MAX_CONNECTIONS: usize = 256;
/// Most host sockets that have connected but not yet sent their `CONNECT` line.
const MAX_PENDING_HOST: usize = 64;
/// Most control packets waiting for guest receive buffers; more are dropped.
const MAX_CONTROL_PACKETS: usize = 1024;
/// Longest `CONNECT PORT\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Host-side ports for host-initiated connections are allocated from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long the guest has to answer a host-initiated connection request.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest has to reset a connection after the host side finished it.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection the guest shut in one direction may go without moving a byte.
pub const HALF_CLOSED_IDLE: Duration = Duration::from_secs(30);
/// Epoll token of the listening socket; connection tokens start above it.
const LISTENER_TOKEN: u64 = 0;

/// A vsock packet header, in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// A guest-initiated connection as a snapshot saves it: its ports and the protocol's counters,
/// so the guest's socket, restored with guest memory, goes on with a new host peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConnection {
    /// The host port the guest connected to (the listener at `uds_path` + `_PORT`).
    pub host_port: u32,
    /// The guest's port.
    pub guest_port: u32,
    /// Guest bytes delivered to the host.
    pub fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub rx_cnt: u32,
    /// The guest's receive buffer, and how much of what it was sent it has consumed.
    pub peer_buf_alloc: u32,
    /// (See `peer_buf_alloc`.)
    pub peer_fwd_cnt: u32,
    /// A credit update was owed to the guest.
    pub credit_update_due: bool,
}

/// A connection is named by its host-side and guest-side ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    local_port: u32,
    peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated; the request went to the guest and no answer came yet.
    Connecting,
    /// Data flows.
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// Bytes for the host socket not yet written, oldest first.
    to_host: VecDeque<u8>,
    /// The first `uncounted` bytes of `to_host` are ours (the `OK` line), not guest credit.
    uncounted: usize,
    /// Guest bytes delivered to the host socket (wrapping, as the protocol counts).
    fwd_cnt: u32,
    /// The guest's receive buffer size and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest (wrapping).
    rx_cnt: u32,
    /// The host socket may have bytes to read (cleared when a read would block).
    host_readable: bool,
    /// The host socket reached end of file or failed; it is out of the epoll set.
    host_done: bool,
    /// The host socket hung up; it is out of the epoll set, but may still hold bytes to read.
    hung_up: bool,
    /// The host shut its socket for writing (end of file, no hang-up): the guest was told the
    /// host sends no more, and may still send.
    host_send_shut: bool,
    guest_send_shut: bool,
    guest_rcv_shut: bool,
    credit_update_due: bool,
    /// Events currently registered for the socket.
    interest: EventSet,
    /// When the host side's end was sent to the guest, which must answer with a reset.
    shutdown_sent: Option<Instant>,
    /// When bytes last moved either way (for connections the guest half-closed).
    last_progress: Instant,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State, peer: &Header) -> Self {
        Conn {
            stream,
            token,
            state,
            to_host: VecDeque::new(),
            uncounted: 0,
            fwd_cnt: 0,
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: peer.fwd_cnt,
            rx_cnt: 0,
            host_readable: false,
            host_done: false,
            hung_up: false,
            host_send_shut: false,
            guest_send_shut: false,
            guest_rcv_shut: false,
            credit_update_due: false,
            interest: EventSet::empty(),
            shutdown_sent: None,
            last_progress: Instant::now(),
        }
    }

    /// When the connection is given up if nothing changes, if ever.
    fn deadline(&self) -> Option<Instant> {
        if self.state == State::Connecting {
            return Some(self.last_progress + CONNECT_TIMEOUT);
        }
        if let Some(sent) = self.shutdown_sent {
            return Some(sent + SHUTDOWN_TIMEOUT);
        }
        (self.guest_send_shut || self.guest_rcv_shut).then(|| self.last_progress + HALF_CLOSED_IDLE)
    }

    /// Both sides have finished sending, everything is delivered, and the guest, whose end is
    /// still open, has not been told yet (see [`Muxer::host_finished`]).
    fn both_sent(&self) -> bool {
        self.host_send_shut
            && self.guest_send_shut
            && self.to_host.is_empty()
            && !self.host_done
            && !self.draining()
    }

    /// Nothing in flight towards the host and neither side has begun to end it: the
    /// connection can be saved with a snapshot and go on with another host peer.
    fn idle(&self) -> bool {
        self.state == State::Established
            && self.to_host.is_empty()
            && self.uncounted == 0
            && !self.host_done
            && !self.hung_up
            && !self.host_send_shut
            && !self.guest_send_shut
            && !self.guest_rcv_shut
            && self.shutdown_sent.is_none()
    }

    /// The guest closed its end and only bytes for the host are left to deliver.
    fn draining(&self) -> bool {
        self.guest_send_shut && self.guest_rcv_shut
    }

    /// How many more bytes the guest can take on this connection.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_to_read(&self) -> bool {
        self.state == State::Established
            && !self.host_done
            && !self.host_send_shut
            && !self.guest_rcv_shut
    }

    fn wanted_interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        // A draining connection reads (and drops) what the host still sends, so a host that
        // writes before it reads is not stuck behind a full socket buffer.
        if (self.wants_to_read() && !self.host_readable)
            || (self.draining() && !self.host_send_shut)
        {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Writes what it can of `to_host`. `Err` means the socket is broken.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.last_progress = Instant::now();
                    self.to_host.drain(..n);
                    let ours = n.min(self.uncounted);
                    self.uncounted -= ours;
                    let before = self.fwd_cnt;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ours) as u32);
                    // Tell the guest about freed space once a quarter of its window opened up
                    // (if it still sends).
                    if !self.guest_send_shut
                        && self.fwd_cnt.wrapping_sub(before) > 0
                        && self.to_host.len() <= (CONN_BUF_SIZE / 4) as usize
                    {
                        self.credit_update_due = true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.guest_send_shut {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }
}

struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// All vsock connections of one VM and the host sockets behind them.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Arc<Epoll>,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Key>,
    pending: HashMap<u64, PendingHost>,
    control: VecDeque<(Key, u16, u32)>,
    /// Every connection once, in the order they are next served.
    turns: VecDeque<Key>,
    next_token: u64,
    next_local_port: u32,
}

impl Muxer {
    /// Binds the listening socket at `uds_path` (which must not exist).
    pub fn new(guest_cid: u64, uds_path: &Path) -> std::io::Result<Self> {
        let listener = UnixListener::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        let epoll = Arc::new(Epoll::new()?);
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending: HashMap::new(),
            control: VecDeque::new(),
            turns: VecDeque::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// The epoll set holding every socket; readable when [`Muxer::poll`] has work.
    pub fn epoll(&self) -> Arc<Epoll> {
        self.epoll.clone()
    }

    /// The descriptor of the epoll set, for the device's worker to wait on.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Drops every connection and pending host socket (the driver was reset: the guest's side
    /// of them is gone). The listening socket stays.
    pub fn clear(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        for (_, p) in self.pending.drain() {
            let fd = p.stream.as_raw_fd();
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.control.clear();
        self.turns.clear();
    }

    /// The next host port a host-initiated connection gets.
    pub fn next_local_port(&self) -> u32 {
        self.next_local_port
    }

    /// Continues numbering host ports from `port` (a restored device).
    pub fn set_next_local_port(&mut self, port: u32) {
        self.next_local_port = port.max(FIRST_LOCAL_PORT);
    }

    /// The connections, for a snapshot of a paused guest; `Err` says why the device cannot be
    /// saved now: a snapshot holds only idle connections the guest opened (its agent's), and no
    /// packet owed to the guest but a credit update. Bytes the host had written and the guest
    /// not yet taken are not kept: they were for a host that the restored cell does not have.
    pub fn save_connections(&self) -> Result<Vec<SavedConnection>, String> {
        if let Some((key, op, _)) = self.control.front() {
            return Err(format!(
                "a packet (operation {op}) for the guest's vsock port {} is still queued",
                key.peer_port
            ));
        }
        if !self.pending.is_empty() {
            return Err("a host connection to the guest is being set up".into());
        }
        let mut saved: Vec<SavedConnection> = Vec::with_capacity(self.conns.len());
        for (key, c) in &self.conns {
            if key.local_port >= FIRST_LOCAL_PORT || !c.idle() {
                return Err(format!(
                    "the vsock connection between host port {} and guest port {} is busy",
                    key.local_port, key.peer_port
                ));
            }
            saved.push(SavedConnection {
                host_port: key.local_port,
                guest_port: key.peer_port,
                fwd_cnt: c.fwd_cnt,
                rx_cnt: c.rx_cnt,
                peer_buf_alloc: c.peer_buf_alloc,
                peer_fwd_cnt: c.peer_fwd_cnt,
                credit_update_due: c.credit_update_due,
            });
        }
        saved.sort_by_key(|c| (c.host_port, c.guest_port));
        Ok(saved)
    }

    /// Takes back connections a snapshot saved: each is connected to this host's listener on
    /// its port, as the guest's connection request was when it was made. A listener that is
    /// not there is an error (the restored guest's socket would hang on a peer that is gone).
    pub fn restore_connections(&mut self, saved: &[SavedConnection]) -> Result<(), String> {
        if saved.len() > MAX_CONNECTIONS {
            return Err(format!(
                "{} vsock connections saved, at most {MAX_CONNECTIONS}",
                saved.len()
            ));
        }
        for s in saved {
            let key = Key { local_port: s.host_port, peer_port: s.guest_port };
            if key.local_port >= FIRST_LOCAL_PORT {
                return Err(format!(
                    "saved vsock connection {}:{} is not one a guest opens",
                    s.host_port, s.guest_port
                ));
            }
            if self.conns.contains_key(&key) {
                return Err(format!(
                    "vsock connection {}:{} is saved twice",
                    s.host_port, s.guest_port
                ));
            }
            let stream = connect_nonblocking(&self.listener_path(key.local_port)).map_err(|e| {
                format!(
                    "cannot reconnect the guest's vsock connection to host port {}: {e}",
                    s.host_port
                )
            })?;
            let token = self.token();
            self.register(stream.as_raw_fd(), token, EventSet::IN)
                .map_err(|e| format!("vsock epoll: {e}"))?;
            let peer = Header {
                buf_alloc: s.peer_buf_alloc,
                fwd_cnt: s.peer_fwd_cnt,
                ..Header::default()
            };
            let mut conn = Conn::new(stream, token, State::Established, &peer);
            conn.interest = EventSet::IN;
            conn.fwd_cnt = s.fwd_cnt;
            conn.rx_cnt = s.rx_cnt;
            conn.credit_update_due = s.credit_update_due;
            self.insert(key, token, conn);
        }
        Ok(())
    }

    /// How long until a connection's deadline passes ([`Muxer::poll`] then resets it).
    pub fn next_deadline(&self) -> Option<Duration> {
        let soonest = self.conns.values().filter_map(Conn::deadline).min()?;
        Some(soonest.saturating_duration_since(Instant::now()))
    }

    /// Resets the connections whose deadline has passed.
    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.reset(key);
        }
    }

    /// Handles whatever the host sockets have ready, without blocking, and gives up
    /// connections past their deadline.
    pub fn poll(&mut self) {
        self.expire();
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(_) => return,
        };
        for ev in &events[..n] {
            let token = ev.data();
            let set = ev.event_set();
            if token == LISTENER_TOKEN {
                self.accept_host();
            } else if self.pending.contains_key(&token) {
                self.read_connect_line(token);
            } else if let Some(key) = self.tokens.get(&token).copied() {
                self.host_event(key, set);
            }
        }
    }

    /// Handles one packet the guest sent. Nothing the guest sends can fail here: bad packets are
    /// dropped or answered with a reset.
    pub fn guest_packet(&mut self, h: &Header, data: &[u8]) {
        // A packet claiming another source or aimed elsewhere is not ours to route.
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            return;
        }
        let key = Key { local_port: h.dst_port, peer_port: h.src_port };
        if h.type_ != TYPE_STREAM {
            if h.op != op::RST {
                self.queue_control(key, op::RST, 0);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match h.op {
                op::REQUEST => self.guest_connect(key, h),
                op::RST => {}
                _ => self.queue_control(key, op::RST, 0),
            }
            return;
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        let mut reset = false;
        match (h.op, conn.state) {
            (op::RESPONSE, State::Connecting) => {
                conn.state = State::Established;
                let line = format!("OK {}\n", key.local_port);
                conn.uncounted += line.len();
                conn.to_host.extend(line.as_bytes());
                reset = conn.flush().is_err();
            }
            (op::RW, State::Established) => {
                let buffered = conn.to_host.len() - conn.uncounted;
                if conn.guest_send_shut || buffered + data.len() > CONN_BUF_SIZE as usize {
                    // Data after its own shutdown, or beyond the credit it was given.
                    reset = true;
                } else {
                    conn.to_host.extend(data);
                    reset = conn.flush().is_err();
                }
            }
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, _) => conn.credit_update_due = true,
            (op::SHUTDOWN, _) => {
                conn.guest_send_shut |= h.flags & SHUTDOWN_SEND != 0;
                conn.guest_rcv_shut |= h.flags & SHUTDOWN_RCV != 0;
                reset = conn.flush().is_err();
                if !reset && conn.both_sent() {
                    self.host_finished(key);
                    return;
                }
                if !reset && conn.draining() {
                    // The guest closed: it is told the connection is over at once, and what
                    // it sent before is still delivered (see `host_event`) if the host can
                    // still take it.
                    if conn.to_host.is_empty() || conn.host_done || conn.hung_up {
                        reset = true;
                    } else {
                        self.queue_control(key, op::RST, 0);
                    }
                }
            }
            // A reset after the guest closed its end is its own clean-up; what it sent first
            // is still delivered. Before that, a reset aborts: the host socket just closes.
            (op::RST, _) if conn.draining() => return,
            (op::RST, _) => {
                self.remove(key);
                return;
            }
            _ => reset = true,
        }
        if reset {
            self.reset(key);
        } else {
            self.sync_interest(key);
        }
    }

    /// Whether [`Muxer::next_packet`] would produce something.
    pub fn has_packet(&self) -> bool {
        !self.control.is_empty()
            || self.conns.values().any(|c| {
                c.credit_update_due || (c.host_readable && c.wants_to_read() && c.peer_credit() > 0)
            })
    }

    /// The next packet for the guest, with up to `buf.len()` payload bytes written to `buf`.
    pub fn next_packet(&mut self, buf: &mut [u8]) -> Option<Header> {
        if let Some((key, op, flags)) = self.control.pop_front() {
            return Some(self.header(key, op, flags, 0));
        }
        // Each connection gets one turn at most, starting after the one served last.
        for _ in 0..self.turns.len() {
            let Some(key) = self.turns.pop_front() else { break };
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            self.turns.push_back(key);
            let credit = conn.peer_credit() as usize;
            if conn.host_readable && conn.wants_to_read() && credit > 0 && !buf.is_empty() {
                let want = buf.len().min(credit);
                match conn.stream.read(&mut buf[..want]) {
                    Ok(0) if conn.hung_up => self.host_finished(key),
                    Ok(0) => self.host_shut_send(key),
                    Ok(n) => {
                        conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                        conn.last_progress = Instant::now();
                        return Some(self.header(key, op::RW, 0, n as u32));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        conn.host_readable = false;
                        self.sync_interest(key);
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => self.reset(key),
                }
                if let Some((key, op, flags)) = self.control.pop_front() {
                    return Some(self.header(key, op, flags, 0));
                }
            }
            if let Some(conn) = self.conns.get(&key) {
                if conn.credit_update_due {
                    return Some(self.header(key, op::CREDIT_UPDATE, 0, 0));
                }
            }
        }
        None
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn header(&mut self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = match self.conns.get_mut(&key) {
            Some(c) => {
                c.credit_update_due = false;
                c.fwd_cnt
            }
            None => 0,
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt,
        }
    }

    fn queue_control(&mut self, key: Key, op: u16, flags: u32) {
        if self.control.len() < MAX_CONTROL_PACKETS {
            self.control.push_back((key, op, flags));
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            self.queue_control(key, op::RST, 0);
            return;
        }
        let Ok(stream) = connect_nonblocking(&self.listener_path(key.local_port)) else {
            self.queue_control(key, op::RST, 0);
            return;
        };
        let token = self.token();
        if self.register(stream.as_raw_fd(), token, EventSet::IN).is_err() {
            self.queue_control(key, op::RST, 0);
            return;
        }
        let mut conn = Conn::new(stream, token, State::Established, h);
        conn.interest = EventSet::IN;
        self.insert(key, token, conn);
        self.queue_control(key, op::RESPONSE, 0);
    }

    /// Where the host listens for guest connections to its port `port`.
    fn listener_path(&self, port: u32) -> PathBuf {
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    fn accept_host(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.pending.len() >= MAX_PENDING_HOST || stream.set_nonblocking(true).is_err() {
                continue; // dropped: the host peer sees the socket close
            }
            let token = self.token();
            if self.register(stream.as_raw_fd(), token, EventSet::IN).is_ok() {
                self.pending.insert(token, PendingHost { stream, line: Vec::new() });
            }
        }
    }

    /// Reads a pending host socket's `CONNECT PORT\n` one byte at a time, so nothing after the
    /// line is consumed.
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else { return };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&p.line),
                Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => break None, // EOF, error or an over-long line
            }
        };
        let Some(p) = self.pending.remove(&token) else { return };
        let Some(peer_port) = port.filter(|_| self.conns.len() < MAX_CONNECTIONS) else {
            self.deregister(p.stream.as_raw_fd());
            return;
        };
        let local_port = self.allocate_local_port();
        let key = Key { local_port, peer_port };
        let conn = Conn::new(p.stream, token, State::Connecting, &Header::default());
        self.insert(key, token, conn);
        self.sync_interest(key);
        self.queue_control(key, op::REQUEST, 0);
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return port;
            }
        }
    }

    fn host_event(&mut self, key: Key, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
            conn.host_readable = true;
        }
        if conn.draining() && set.contains(EventSet::IN) {
            // Nobody in the guest will read these bytes any more.
            let mut sink = [0u8; 4096];
            loop {
                match conn.stream.read(&mut sink) {
                    Ok(0) => {
                        conn.host_send_shut = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        if set.contains(EventSet::OUT) && conn.flush().is_err() {
            self.reset(key);
            return;
        }
        if conn.draining() && conn.to_host.is_empty() {
            // Everything the closed guest sent is delivered (and the socket shut for writing).
            self.remove(key);
            return;
        }
        if conn.both_sent() {
            self.host_finished(key);
            return;
        }
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            if conn.state == State::Connecting || conn.draining() {
                self.reset(key);
                return;
            }
            // Hang-ups repeat until the socket leaves the epoll set; what is left to read is
            // still read by `next_packet`, which then reports the end to the guest.
            conn.host_readable = true;
            conn.hung_up = true;
            let fd = conn.stream.as_raw_fd();
            let finished = !conn.wants_to_read();
            self.deregister(fd);
            if finished {
                self.host_finished(key);
            }
            return;
        }
        self.sync_interest(key);
    }

    /// The host shut its socket for writing: the guest hears that the host sends nothing more,
    /// and its own bytes still go to the host. Once both have finished sending, the connection
    /// ends.
    fn host_shut_send(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        conn.host_send_shut = true;
        conn.host_readable = false;
        conn.last_progress = Instant::now();
        if conn.both_sent() {
            return self.host_finished(key);
        }
        self.queue_control(key, op::SHUTDOWN, SHUTDOWN_SEND);
        self.sync_interest(key);
    }

    /// The host side is over (its socket hung up, or both sides finished sending): tell the
    /// guest, which answers with a reset.
    fn host_finished(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        let fd = conn.stream.as_raw_fd();
        let registered = !conn.host_done && !conn.hung_up;
        conn.host_done = true;
        conn.host_readable = false;
        conn.shutdown_sent = Some(Instant::now());
        if registered {
            self.deregister(fd);
        }
        self.queue_control(key, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
    }

    fn sync_interest(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if conn.host_done || conn.hung_up {
            return;
        }
        let want = conn.wanted_interest();
        if want != conn.interest {
            let ev = EpollEvent::new(want, conn.token);
            if self.epoll.ctl(ControlOperation::Modify, conn.stream.as_raw_fd(), ev).is_ok() {
                conn.interest = want;
            }
        }
    }

    fn register(&self, fd: RawFd, token: u64, set: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
    }

    fn deregister(&self, fd: RawFd) {
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn insert(&mut self, key: Key, token: u64, conn: Conn) {
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        self.turns.retain(|k| *k != key);
        self.turns.push_back(key);
    }

    fn remove(&mut self, key: Key) {
        self.turns.retain(|k| *k != key);
        if let Some(conn) = self.conns.remove(&key) {
            self.tokens.remove(&conn.token);
            if !conn.host_done && !conn.hung_up {
                self.deregister(conn.stream.as_raw_fd());
            }
        }
    }

    /// Ends the connection and resets the guest's end, unless the guest closed it already
    /// (draining: it was answered then).
    fn reset(&mut self, key: Key) {
        let draining = self.conns.get(&key).is_some_and(Conn::draining);
        self.remove(key);
        if !draining {
            self.queue_control(key, op::RST, 0);
        }
    }
}

/// Connects to the host listener at `path` without ever waiting: a listener whose queue is full
/// (a host service that does not keep up, or a guest flooding it) is a refusal, not a stall of
/// the device's worker.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.trim_end_matches('\r').strip_prefix("CONNECT ")?;
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::net::UnixListener;
    use std::time::Duration;

    use super::*;

    const CID: u64 = 3;

    /// A socket path in a scratch directory that is removed when the returned guard drops.
    fn temp_path(name: &str) -> (tempfile::TempDir, PathBuf) {
        let dir =
            tempfile::Builder::new().prefix(&format!("isocell-vsock-{name}-")).tempdir().unwrap();
        let path = dir.path().join("v.sock");
        (dir, path)
    }

    fn from_guest(op: u16, local: u32, peer: u32, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: peer,
            dst_port: local,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    fn drain(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..100 {
            m.poll();
            while let Some(h) = m.next_packet(&mut buf) {
                out.push((h, buf[..h.len as usize].to_vec()));
            }
            if !out.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    }

    #[test]
    fn guest_connects_to_a_host_listener_and_data_flows_both_ways() {
        let (_dir, path) = temp_path("guest");
        let mut m = Muxer::new(CID, &path).unwrap();
        let listener = UnixListener::bind(format!("{}_1024", path.display())).unwrap();
        m.guest_packet(&from_guest(op::REQUEST, 1024, 5000, 0), &[]);
        let (mut host, _) = listener.accept().unwrap();
        let pkts = drain(&mut m);
        assert_eq!(pkts[0].0.op, op::RESPONSE);
        assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (1024, 5000));

        m.guest_packet(&from_guest(op::RW, 1024, 5000, 5), b"hello");
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");

        host.write_all(b"world").unwrap();
        let pkts = drain(&mut m);
        assert_eq!(pkts[0].0.op, op::RW);
        assert_eq!(pkts[0].1, b"world");
        assert_eq!(pkts[0].0.fwd_cnt, 5);

        drop(host);
        let pkts = drain(&mut m);
        assert_eq!(pkts.last().unwrap().0.op, op::SHUTDOWN);
        m.guest_packet(&from_guest(op::RST, 1024, 5000, 0), &[]);
        assert_eq!(m.connection_count(), 0);
    }

    /// A snapshot keeps an idle guest connection with its counters; the restored muxer
    /// connects it to the new host's listener, and bytes flow on as if nothing happened.
    #[test]
    fn an_idle_guest_connection_goes_on_with_a_new_host_after_restore() {
        let (_dir, path) = temp_path("saved");
        let mut m = Muxer::new(CID, &path).unwrap();
        let listener = UnixListener::bind(format!("{}_52", path.display())).unwrap();
        m.guest_packet(&from_guest(op::REQUEST, 52, 7000, 0), &[]);
        let (mut old_host, _) = listener.accept().unwrap();
        assert_eq!(drain(&mut m)[0].0.op, op::RESPONSE);
        m.guest_packet(&from_guest(op::RW, 52, 7000, 5), b"hello");
        let mut got = [0u8; 5];
        old_host.read_exact(&mut got).unwrap();
        old_host.write_all(b"abc").unwrap();
        assert_eq!(drain(&mut m)[0].1, b"abc");

        let saved = m.save_connections().unwrap();
        assert_eq!(saved.len(), 1);
        let c = &saved[0];
        assert_eq!((c.host_port, c.guest_port, c.fwd_cnt, c.rx_cnt), (52, 7000, 5, 3));

        // The new host has no listener yet: refused, with the port in the error.
        let (_dir2, path2) = temp_path("restored");
        let mut r = Muxer::new(CID, &path2).unwrap();
        let err = r.restore_connections(&saved).unwrap_err();
        assert!(err.contains("host port 52"), "{err}");
        let listener2 = UnixListener::bind(format!("{}_52", path2.display())).unwrap();
        r.restore_connections(&saved).unwrap();
        let (mut new_host, _) = listener2.accept().unwrap();
        // The host speaks first; the guest's packet carries the counters on.
        new_host.write_all(b"reseed").unwrap();
        let pkts = drain(&mut r);
        assert_eq!((pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port), (op::RW, 52, 7000));
        assert_eq!((pkts[0].1.as_slice(), pkts[0].0.fwd_cnt), (&b"reseed"[..], 5));
        r.guest_packet(&from_guest(op::RW, 52, 7000, 4), b"done");
        let mut got = [0u8; 4];
        new_host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"done");
        // A connection that exists already is not restored over.
        assert!(r.restore_connections(&saved).is_err());
    }

    /// A connection in the middle of ending, or a packet still owed to the guest, is no state
    /// to save: the device says why instead.
    #[test]
    fn a_busy_vsock_is_not_saved() {
        let (_dir, path) = temp_path("busy");
        let mut m = Muxer::new(CID, &path).unwrap();
        let _listener = UnixListener::bind(format!("{}_52", path.display())).unwrap();
        m.guest_packet(&from_guest(op::REQUEST, 52, 7001, 0), &[]);
        // The RESPONSE is not delivered yet.
        assert!(m.save_connections().unwrap_err().contains("still queued"));
        drain(&mut m);
        assert!(m.save_connections().is_ok());
        m.guest_packet(&shutdown_from_guest(52, 7001, SHUTDOWN_SEND), &[]);
        assert!(m.save_connections().unwrap_err().contains("busy"));
        // A host-initiated connection cannot be handed to a new host.
        let (_dir, path) = temp_path("busy-host");
        let mut m = Muxer::new(CID, &path).unwrap();
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        let req = drain(&mut m)[0].0;
        m.guest_packet(&from_guest(op::RESPONSE, req.src_port, 52, 0), &[]);
        assert!(m.save_connections().unwrap_err().contains("busy"));
    }

    #[test]
    fn host_connects_to_a_guest_port() {
        let (_dir, path) = temp_path("host");
        let mut m = Muxer::new(CID, &path).unwrap();
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        let pkts = drain(&mut m);
        let req = pkts[0].0;
        assert_eq!((req.op, req.dst_port, req.dst_cid), (op::REQUEST, 52, CID));
        let mut resp = from_guest(op::RESPONSE, req.src_port, 52, 0);
        resp.flags = 0;
        m.guest_packet(&resp, &[]);
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, format!("OK {}\n", req.src_port).as_bytes());
        m.guest_packet(&from_guest(op::RW, req.src_port, 52, 3), b"abc");
        let mut got = [0u8; 3];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
    }

    #[test]
    fn refusals_and_hostile_packets() {
        let (_dir, path) = temp_path("hostile");
        let mut m = Muxer::new(CID, &path).unwrap();
        // Nobody listens on port 7: reset.
        m.guest_packet(&from_guest(op::REQUEST, 7, 1, 0), &[]);
        assert_eq!(drain(&mut m)[0].0.op, op::RST);
        // Spoofed source: dropped silently.
        let mut spoof = from_guest(op::REQUEST, 7, 1, 0);
        spoof.src_cid = 99;
        m.guest_packet(&spoof, &[]);
        assert!(!m.has_packet());
        // Data for a connection that does not exist: reset.
        m.guest_packet(&from_guest(op::RW, 9, 9, 1), b"x");
        assert_eq!(drain(&mut m)[0].0.op, op::RST);
        // A datagram type: reset.
        let mut dgram = from_guest(op::REQUEST, 9, 9, 0);
        dgram.type_ = 2;
        m.guest_packet(&dgram, &[]);
        assert_eq!(drain(&mut m)[0].0.op, op::RST);
        // A host that sends garbage instead of CONNECT is dropped.
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"HELLO\n").unwrap();
        for _ in 0..20 {
            m.poll();
        }
        let mut b = [0u8; 1];
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(host.read(&mut b).unwrap(), 0);
        // Control packets waiting for buffers are capped.
        for i in 0..5000 {
            m.guest_packet(&from_guest(op::RW, 100, i, 0), &[]);
        }
        assert_eq!(m.control.len(), MAX_CONTROL_PACKETS);
    }

    /// Two connections with host data waiting are served in turn, not one until it runs dry.
    #[test]
    fn busy_connections_take_turns() {
        let (_dir, path) = temp_path("turns");
        let mut m = Muxer::new(CID, &path).unwrap();
        let listener = UnixListener::bind(format!("{}_7", path.display())).unwrap();
        let mut hosts = Vec::new();
        for peer in [1, 2] {
            m.guest_packet(&from_guest(op::REQUEST, 7, peer, 0), &[]);
            let (h, _) = listener.accept().unwrap();
            hosts.push(h);
        }
        let _ = drain(&mut m);
        for (h, byte) in hosts.iter_mut().zip([1u8, 2]) {
            h.write_all(&[byte; 32 * 1024]).unwrap();
        }
        for _ in 0..20 {
            m.poll();
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut buf = [0u8; 1024];
        let mut order = Vec::new();
        while order.len() < 8 {
            let Some(h) = m.next_packet(&mut buf) else { break };
            if h.op == op::RW {
                order.push(h.dst_port);
            }
        }
        assert_eq!(order.len(), 8, "{order:?}");
        assert!(order.windows(2).all(|w| w[0] != w[1]), "not in turn: {order:?}");
    }

    /// A guest that never answers the host side's end with a reset loses the connection after
    /// the timeout; so does a half-closed connection that moves nothing.
    #[test]
    fn half_closed_connections_expire() {
        let (_dir, path) = temp_path("expire");
        let mut m = Muxer::new(CID, &path).unwrap();
        let listener = UnixListener::bind(format!("{}_8", path.display())).unwrap();
        m.guest_packet(&from_guest(op::REQUEST, 8, 1, 0), &[]);
        let (host, _) = listener.accept().unwrap();
        m.guest_packet(&from_guest(op::REQUEST, 8, 2, 0), &[]);
        let (_host2, _) = listener.accept().unwrap();
        let _ = drain(&mut m);
        assert_eq!(m.next_deadline(), None);
        drop(host);
        let pkts = drain(&mut m);
        assert_eq!(pkts.last().unwrap().0.op, op::SHUTDOWN);
        assert!(m.next_deadline().unwrap() <= SHUTDOWN_TIMEOUT);
        let mut shut = from_guest(op::SHUTDOWN, 8, 2, 0);
        shut.flags = SHUTDOWN_SEND;
        m.guest_packet(&shut, &[]);
        // Move both deadlines into the past rather than wait for them.
        let long_ago = Instant::now() - HALF_CLOSED_IDLE - Duration::from_secs(1);
        for c in m.conns.values_mut() {
            c.shutdown_sent = c.shutdown_sent.map(|_| long_ago);
            c.last_progress = long_ago;
        }
        m.poll();
        assert_eq!(m.connection_count(), 0);
        let resets = m.control.iter().filter(|c| c.1 == op::RST).count();
        assert_eq!(resets, 2);
    }

    fn shutdown_from_guest(local: u32, peer: u32, flags: u32) -> Header {
        Header { flags, ..from_guest(op::SHUTDOWN, local, peer, 0) }
    }

    /// A host that shuts its socket for writing (a client that sent its request) still gets
    /// everything the guest sends after that; the guest hears only that the host sends no more.
    #[test]
    fn a_host_half_close_leaves_the_guest_sending() {
        let (_dir, path) = temp_path("half");
        let mut m = Muxer::new(CID, &path).unwrap();
        let listener = UnixListener::bind(format!("{}_9", path.display())).unwrap();
        m.guest_packet(&from_guest(op::REQUEST, 9, 3, 0), &[]);
        let (mut host, _) = listener.accept().unwrap();
        let _ = drain(&mut m);
        host.write_all(b"request").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let pkts = drain(&mut m);
        assert_eq!(pkts[0].1, b"request");
        let shut = pkts.iter().find(|p| p.0.op == op::SHUTDOWN).expect("a shutdown");
        assert_eq!(shut.0.flags, SHUTDOWN_SEND, "only the host's sending side ends");
        assert_eq!(m.connection_count(), 1);

        m.guest_packet(&from_guest(op::RW, 9, 3, 8), b"response");
        m.guest_packet(&shutdown_from_guest(9, 3, SHUTDOWN_SEND), &[]);
        let mut got = Vec::new();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"response");
        // Both sides are done: the guest is told, and its reset ends the connection.
        let pkts = drain(&mut m);
        assert_eq!(pkts.last().map(|p| (p.0.op, p.0.flags)), Some((op::SHUTDOWN, 3)));
        m.guest_packet(&from_guest(op::RST, 9, 3, 0), &[]);
        assert_eq!(m.connection_count(), 0);
    }

    /// A guest that closes while its bytes wait for a slow host loses none of them; one that
    /// resets before it finished sending aborts, and the host socket just closes.
    #[test]
    fn a_guest_close_delivers_what_it_sent_and_a_reset_does_not() {
        let (_dir, path) = temp_path("close");
        let mut m = Muxer::new(CID, &path).unwrap();
        let listener = UnixListener::bind(format!("{}_6", path.display())).unwrap();
        let mut hosts = Vec::new();
        for peer in [1, 2] {
            m.guest_packet(&from_guest(op::REQUEST, 6, peer, 0), &[]);
            hosts.push(listener.accept().unwrap().0);
        }
        let _ = drain(&mut m);
        // More than the host socket's buffer holds, so some waits in the muxer.
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        while m.conns.values().any(|c| c.to_host.is_empty()) && sent < 16 {
            for peer in [1, 2] {
                m.guest_packet(&from_guest(op::RW, 6, peer, chunk.len() as u32), &chunk);
            }
            sent += 1;
        }
        assert!(m.conns.values().all(|c| !c.to_host.is_empty()), "bytes wait for the host");
        m.guest_packet(&shutdown_from_guest(6, 1, SHUTDOWN_SEND | SHUTDOWN_RCV), &[]);
        m.guest_packet(&from_guest(op::RST, 6, 2, 0), &[]);
        // The closed guest is answered with one reset; the resetting one is not.
        let resets: Vec<u32> =
            m.control.iter().filter(|c| c.1 == op::RST).map(|c| c.0.peer_port).collect();
        assert_eq!(resets, [1]);
        // A reset after its close is the guest's clean-up: the bytes still go.
        m.guest_packet(&from_guest(op::RST, 6, 1, 0), &[]);
        assert_eq!(m.connection_count(), 1);
        assert!(m.next_packet(&mut [0u8; 64]).is_some_and(|h| h.op == op::RST));
        assert!(m.next_packet(&mut [0u8; 64]).is_none(), "no credit updates for a closed guest");

        let mut closed = hosts.pop().unwrap();
        let mut kept = hosts.pop().unwrap();
        // A host that writes before it reads: what it sends now is dropped, not waited for.
        let reader = std::thread::spawn(move || {
            kept.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            kept.write_all(&vec![1u8; 1 << 20])?;
            let mut got = Vec::new();
            kept.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            kept.read_to_end(&mut got).map(|_| got)
        });
        for _ in 0..400 {
            m.poll();
            if m.connection_count() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let got = reader.join().unwrap().unwrap();
        assert_eq!(got.len(), sent * chunk.len());
        assert!(got.chunks(chunk.len()).all(|c| c == chunk.as_slice()));
        assert_eq!(m.connection_count(), 0);
        // The reset one ended at once: whatever had reached its socket, then end of file.
        let mut got = Vec::new();
        closed.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        closed.read_to_end(&mut got).expect("closed, not left open");
    }

    #[test]
    fn a_guest_exceeding_its_credit_is_reset() {
        let (_dir, path) = temp_path("credit");
        let mut m = Muxer::new(CID, &path).unwrap();
        let _listener = UnixListener::bind(format!("{}_5", path.display())).unwrap();
        m.guest_packet(&from_guest(op::REQUEST, 5, 1, 0), &[]);
        let _ = drain(&mut m);
        // Nobody reads the host side: the socket buffer fills, then our buffer, then reset.
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..64 {
            m.guest_packet(&from_guest(op::RW, 5, 1, chunk.len() as u32), &chunk);
            if m.connection_count() == 0 {
                break;
            }
        }
        assert_eq!(m.connection_count(), 0);
        assert_eq!(m.control.back().map(|c| c.1), Some(op::RST));
    }
}
