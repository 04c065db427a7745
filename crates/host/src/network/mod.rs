//! A cell's network, on the host side, in the process that supervises the cell (never the
//! VMM, which keeps an empty network namespace and AF_UNIX-only seccomp rules).
//!
//! - **Egress**: each connection the agent relays arrives on the cell's `vsock.sock_1026`
//!   with its destination; it is judged against the allowlist ([`allow`]), then connected from
//!   this host's network, or refused at once. A connection allowed by a name rule must also
//!   name that name in its TLS server name or HTTP `Host` ([`sniff`]).
//! - **DNS** on `vsock.sock_1027` ([`dns`]): only allowed names are answered.
//! - **Published ports**: a TCP listener per `--publish`, each connection relayed into the cell
//!   through a host-initiated vsock connection to the agent's ingress port.
//!
//! Every connection, allowed or not, and every DNS answer is an audit event (a denial is
//! written before the guest hears it); a guest that
//! floods denials gets them counted in `network_suppressed` events past a rate, not one fsync
//! each. Connections are bounded per cell; a slow or silent guest holds only its own slots.

pub mod allow;
pub mod dns;
pub mod sniff;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use isocell_evidence::audit::AuditLog;
use isocell_proto::net::{self as wire, Answer};
use isocell_spec::network::{Network, Publish};
use serde_json::{json, Value};

use allow::Allowlist;
use sniff::{sniff, Sniffed, MAX_SNIFF};

/// Most connections of each kind one cell may have open at once: egress, published ports and
/// DNS streams each have their own budget, so neither the cell nor outside clients can use up
/// the other's. Together they stay below the VMM's 256 vsock connections, so the proxy, not the
/// VMM, is the one that refuses, and says why.
pub const MAX_EGRESS: usize = 120;
/// See [`MAX_EGRESS`].
pub const MAX_INGRESS: usize = 110;
/// See [`MAX_EGRESS`].
pub const MAX_DNS_STREAMS: usize = 4;
/// How long the guest has to send a request line, and an upstream to accept a connection.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to answer for a published port: it allows 30 s for the port
/// line to arrive and 30 s for the cell's server to accept.
const INGRESS_ANSWER: Duration = Duration::from_secs(70);
/// At most this many rate-limited audit events per second (denials, DNS), after a burst.
const EVENTS_PER_SEC: f64 = 50.0;
const EVENT_BURST: f64 = 200.0;
/// How long `stop` waits for connections to end after shutting them down.
const STOP_PATIENCE: Duration = Duration::from_secs(3);

/// The cell's network counters, for its exit receipt.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Totals {
    /// Egress connections allowed and connected.
    pub egress_allowed: u64,
    /// Egress connections denied (by the allowlist, a name check, a malformed request or the
    /// connection limit) or that could not be connected.
    pub egress_denied: u64,
    /// Connections through published ports.
    pub ingress: u64,
    /// Bytes from the cell out (egress sent, ingress answered).
    pub bytes_out: u64,
    /// Bytes into the cell.
    pub bytes_in: u64,
    /// DNS queries answered with addresses or no data.
    pub dns_answered: u64,
    /// DNS queries refused (NXDOMAIN for names outside the allowlist, malformed queries).
    pub dns_refused: u64,
    /// Audit events folded into `network_suppressed` counts by the rate limit.
    pub events_suppressed: u64,
}

/// Where a cell's network events go.
struct Events {
    audit: Option<AuditLog>,
    cell: String,
    client: Option<String>,
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
}

impl Events {
    /// Writes `data` as a `kind` event; a rate-limited event past the budget is only counted.
    fn emit(&mut self, kind: &str, mut data: Value, limited: bool, totals: &Mutex<Totals>) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * EVENTS_PER_SEC).min(EVENT_BURST);
        self.refilled = now;
        if limited {
            if self.tokens < 1.0 {
                self.suppressed += 1;
                lock(totals).events_suppressed += 1;
                return;
            }
            self.tokens -= 1.0;
        }
        self.flush_suppressed();
        if let (Some(c), Some(o)) = (&self.client, data.as_object_mut()) {
            o.insert("client".into(), Value::String(c.clone()));
        }
        if let Some(audit) = &self.audit {
            let _ = audit.append(kind, Some(&self.cell), data);
        }
    }

    fn flush_suppressed(&mut self) {
        if self.suppressed > 0 {
            let data =
                json!({ "count": self.suppressed, "why": "rate limit on denials and DNS events" });
            self.suppressed = 0;
            if let Some(audit) = &self.audit {
                let _ = audit.append("network_suppressed", Some(&self.cell), data);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the service's threads share.
struct Shared {
    list: Mutex<Allowlist>,
    events: Mutex<Events>,
    totals: Mutex<Totals>,
    /// Open connections: their sockets, so `stop` can shut them down.
    open: Mutex<Open>,
    drained: Condvar,
    next_id: AtomicU64,
    stopping: AtomicBool,
    /// The VMM's socket for host-initiated connections (published ports).
    vsock_path: PathBuf,
    resolve: Resolver,
}

/// The kinds of connection, each with its own budget.
#[derive(Clone, Copy)]
enum Kind {
    Egress,
    Ingress,
    Dns,
}

impl Kind {
    fn budget(self) -> usize {
        match self {
            Kind::Egress => MAX_EGRESS,
            Kind::Ingress => MAX_INGRESS,
            Kind::Dns => MAX_DNS_STREAMS,
        }
    }
}

/// The open connections: each one's sockets (duplicates, close-on-exec), and counts by kind.
#[derive(Default)]
struct Open {
    sockets: HashMap<u64, Vec<socket2::Socket>>,
    counts: [usize; 3],
}

/// A connection's place in its kind's budget; freed (and its sockets forgotten) on drop.
struct Slot {
    shared: Arc<Shared>,
    id: u64,
    kind: Kind,
}

impl Slot {
    /// A slot, or why there is none.
    fn take(shared: &Arc<Shared>, kind: Kind) -> Result<Slot, &'static str> {
        let mut open = lock(&shared.open);
        if shared.stopping.load(Ordering::Acquire) {
            return Err("the cell is stopping");
        }
        if open.counts[kind as usize] >= kind.budget() {
            return Err("too many connections (the cell's limit)");
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        open.sockets.insert(id, Vec::new());
        open.counts[kind as usize] += 1;
        Ok(Slot { shared: shared.clone(), id, kind })
    }

    /// Remembers a socket of this connection, to shut it down at `stop` (at once if `stop`
    /// has begun: a connect that finished late does not outlive the cell).
    fn track(&self, fd: &impl AsFd) {
        if let Ok(dup) = fd.as_fd().try_clone_to_owned() {
            let sock = socket2::Socket::from(dup);
            let mut open = lock(&self.shared.open);
            if self.shared.stopping.load(Ordering::Acquire) {
                let _ = sock.shutdown(Shutdown::Both);
            }
            if let Some(v) = open.sockets.get_mut(&self.id) {
                v.push(sock);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = lock(&self.shared.open);
        open.sockets.remove(&self.id);
        open.counts[self.kind as usize] -= 1;
        if open.sockets.is_empty() {
            self.shared.drained.notify_all();
        }
    }
}

/// A cell's running network service. [`Service::stop`] (or dropping it) ends every
/// connection and thread.
pub struct Service {
    shared: Arc<Shared>,
    listeners: Vec<socket2::Socket>,
    threads: Vec<JoinHandle<()>>,
}

/// The TCP listeners of a cell's published ports, bound before its VMM starts so a port in
/// use is an error before anything runs.
pub fn bind_published(network: &Network) -> Result<Vec<(Publish, TcpListener)>, String> {
    network
        .publish
        .iter()
        .map(|p| {
            let at = SocketAddr::from((p.host_ip, p.host_port));
            TcpListener::bind(at).map(|l| (p.clone(), l)).map_err(|e| {
                format!("cannot publish {at} (--publish {p}): {e}; choose another host port")
            })
        })
        .collect()
}

/// Everything a service is started with.
pub struct Start {
    /// The cell's network.
    pub network: Network,
    /// The cell's id, named in its audit events.
    pub cell: String,
    /// The daemon client the cell belongs to, if any.
    pub client: Option<String>,
    /// Where events go (`None`: nowhere, for tests).
    pub audit: Option<AuditLog>,
    /// The listener on `vsock.sock_EGRESS_PORT` (with egress rules).
    pub egress: Option<UnixListener>,
    /// The listener on `vsock.sock_DNS_PORT` (with egress rules).
    pub dns: Option<UnixListener>,
    /// Published ports and their listeners.
    pub published: Vec<(Publish, TcpListener)>,
    /// The VMM's socket for host-initiated vsock connections.
    pub vsock_path: PathBuf,
    /// How names are looked up: [`dns::host_lookup`] (tests give their own).
    pub resolve: Resolver,
}

/// Looks a name up for the cell's DNS.
pub type Resolver = fn(&str) -> std::io::Result<Vec<std::net::Ipv4Addr>>;

impl Service {
    /// Starts serving; the events of the cell's network go to `start.audit` as they happen.
    pub fn start(start: Start) -> Service {
        let shared = Arc::new(Shared {
            list: Mutex::new(Allowlist::new(start.network.egress.clone())),
            events: Mutex::new(Events {
                audit: start.audit,
                cell: start.cell,
                client: start.client,
                tokens: EVENT_BURST,
                refilled: Instant::now(),
                suppressed: 0,
            }),
            totals: Mutex::new(Totals::default()),
            open: Mutex::new(Open::default()),
            drained: Condvar::new(),
            next_id: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            vsock_path: start.vsock_path,
            resolve: start.resolve,
        });
        let mut service = Service { shared, listeners: Vec::new(), threads: Vec::new() };
        if let Some(l) = start.egress {
            service.serve_unix(l, "egress", egress);
        }
        if let Some(l) = start.dns {
            service.serve_unix(l, "dns", dns_stream);
        }
        for (publish, l) in start.published {
            if !service.keep(&l) {
                continue;
            }
            let shared = service.shared.clone();
            service.spawn("publish", move || {
                for conn in l.incoming() {
                    if shared.stopping.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(conn) = conn else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let (shared, publish) = (shared.clone(), publish.clone());
                    let _ = std::thread::Builder::new()
                        .name("ingress".into())
                        .spawn(move || ingress(&shared, &publish, conn));
                }
            });
        }
        service
    }

    /// Keeps a duplicate (close-on-exec) of a listener, to shut it down at `stop`. False if
    /// there is none (out of descriptors): then the listener is not served at all, since
    /// `stop` could not end its thread.
    fn keep(&mut self, l: &impl AsFd) -> bool {
        match l.as_fd().try_clone_to_owned() {
            Ok(dup) => {
                self.listeners.push(socket2::Socket::from(dup));
                true
            }
            Err(_) => false,
        }
    }

    fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) {
        if let Ok(h) = std::thread::Builder::new().name(name.into()).spawn(f) {
            self.threads.push(h);
        }
    }

    fn serve_unix(
        &mut self,
        l: UnixListener,
        name: &'static str,
        handle: fn(&Arc<Shared>, UnixStream),
    ) {
        if !self.keep(&l) {
            return;
        }
        let shared = self.shared.clone();
        self.spawn(name, move || {
            for conn in l.incoming() {
                if shared.stopping.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let shared = shared.clone();
                let _ = std::thread::Builder::new().name(name.into()).spawn(move || {
                    handle(&shared, conn);
                });
            }
        });
    }

    /// The counters so far.
    pub fn totals(&self) -> Totals {
        lock(&self.shared.totals).clone()
    }

    /// Stops accepting, shuts every open connection down, waits (briefly) for them to end and
    /// for their events to be written, and returns the totals.
    pub fn stop(mut self) -> Totals {
        self.stop_inner();
        self.totals()
    }

    fn stop_inner(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        for l in self.listeners.drain(..) {
            // Shutting a listening socket down wakes its accept with an error.
            let _ = l.shutdown(Shutdown::Both);
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        let deadline = Instant::now() + STOP_PATIENCE;
        let mut open = lock(&self.shared.open);
        for socks in open.sockets.values() {
            for s in socks {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        while !open.sockets.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            open = self
                .shared
                .drained
                .wait_timeout(open, left)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
        drop(open);
        // A thread still inside a host lookup or a connect gets no say after the receipt.
        let mut events = lock(&self.shared.events);
        events.flush_suppressed();
        events.audit = None;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if !self.shared.stopping.load(Ordering::Acquire) {
            self.stop_inner();
        }
    }
}

/// Copies `from` to `to` until EOF, then shuts `to`'s write side (both sides of both on an
/// error); returns the bytes copied.
fn pump(mut from: impl Read + AsFd, mut to: impl Write + AsFd) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    let failed = loop {
        match from.read(&mut buf) {
            Ok(0) => break false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break true,
            Ok(k) => {
                if to.write_all(&buf[..k]).is_err() {
                    break true;
                }
                n += k as u64;
            }
        }
    };
    let how = if failed { Shutdown::Both } else { Shutdown::Write };
    let _ = socket2::SockRef::from(&to).shutdown(how);
    if failed {
        let _ = socket2::SockRef::from(&from).shutdown(Shutdown::Both);
    }
    n
}

/// Starts the host-to-cell direction of a relay; `None` (both shut down) if no thread could be
/// made, so the connection ends instead of hanging.
fn start_back(cell: &UnixStream, host: &TcpStream) -> Option<JoinHandle<u64>> {
    let shut = || {
        let _ = cell.shutdown(Shutdown::Both);
        let _ = host.shutdown(Shutdown::Both);
    };
    let (Ok(cell_w), Ok(host_r)) = (cell.try_clone(), host.try_clone()) else {
        shut();
        return None;
    };
    let h = std::thread::Builder::new().name("relay".into()).spawn(move || pump(host_r, cell_w));
    h.map_err(|_| shut()).ok()
}

/// The cell-to-host direction, `first` (bytes already read from the cell) sent ahead; then
/// waits for `back`. Returns (bytes out of the cell, bytes into it).
fn finish(
    cell: UnixStream,
    mut host: TcpStream,
    first: &[u8],
    back: JoinHandle<u64>,
) -> (u64, u64) {
    let sent = match host.write_all(first) {
        Ok(()) => first.len() as u64 + pump(cell, host),
        Err(_) => {
            let _ = cell.shutdown(Shutdown::Both);
            let _ = host.shutdown(Shutdown::Both);
            0
        }
    };
    (sent, back.join().unwrap_or(0))
}

/// Answers a refusal, then reads (and drops) what the cell still sends, briefly: closing on
/// unread bytes would have the VMM reset the stream, and the answer could be lost with it.
fn refuse(conn: &mut UnixStream, word: &str, reason: &str) {
    let _ = conn.write_all(Answer::Refused(reason.to_owned()).line(word).as_bytes());
    let _ = conn.shutdown(Shutdown::Write);
    let end = Instant::now() + Duration::from_millis(500);
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    while left > 0 {
        let wait = end.saturating_duration_since(Instant::now());
        if wait.is_zero() || conn.set_read_timeout(Some(wait)).is_err() {
            break;
        }
        match conn.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// One egress connection from the cell.
fn egress(shared: &Arc<Shared>, mut conn: UnixStream) {
    let started = Instant::now();
    let mut event = json!({ "direction": "egress" });
    let slot = match Slot::take(shared, Kind::Egress) {
        Ok(s) => s,
        Err(why) => {
            deny(shared, event, why);
            return refuse(&mut conn, "DENIED", why);
        }
    };
    slot.track(&conn);
    let _ = conn.set_read_timeout(Some(HEADER_TIMEOUT));
    let dest = match wire::read_line(&mut conn)
        .map_err(|e| e.to_string())
        .and_then(|l| wire::parse_connect(&l).map_err(|e| e.to_string()))
    {
        Ok(d) => d,
        Err(e) => {
            deny(shared, event, &format!("malformed request: {e}"));
            return refuse(&mut conn, "DENIED", "malformed request");
        }
    };
    event["dest"] = json!(dest.to_string());
    event["port"] = json!(dest.port());
    let decision = lock(&shared.list).decide(dest);
    let Some(rule) = decision.rule.clone() else {
        let reason = decision.reason.unwrap_or_default();
        deny(shared, event, &reason);
        return refuse(&mut conn, "DENIED", &reason);
    };
    event["rule"] = json!(rule);
    event["name"] = json!(decision.name);
    let upstream = match TcpStream::connect_timeout(&SocketAddr::V4(dest), CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            deny(shared, event, &format!("allowed, but cannot connect: {e}"));
            return refuse(&mut conn, "DENIED", &format!("cannot connect: {e}"));
        }
    };
    slot.track(&upstream);
    let _ = upstream.set_nodelay(true);
    let _ = conn.set_read_timeout(None);
    if conn.write_all(b"OK\n").is_err() {
        return deny(shared, event, "the cell went away");
    }
    // The upstream may speak first (SMTP, MySQL), so that direction flows from here on.
    let Some(back) = start_back(&conn, &upstream) else {
        return deny(shared, event, "no thread for the relay");
    };
    // A name rule: the first bytes must name an allowed name (TLS server name, HTTP Host)
    // before any of them goes out.
    let (first, verdict) = if decision.names.is_empty() {
        (Vec::new(), Ok(()))
    } else {
        first_bytes(&mut conn, &decision.names)
    };
    let (out, inn) = match verdict {
        Ok(()) => finish(conn, upstream, &first, back),
        Err(reason) => {
            let _ = upstream.shutdown(Shutdown::Both);
            let _ = conn.shutdown(Shutdown::Both);
            // What the upstream sent before the refusal did reach the cell.
            let inn = back.join().unwrap_or(0);
            lock(&shared.totals).bytes_in += inn;
            event["bytes_in"] = json!(inn);
            return deny(shared, event, &reason);
        }
    };
    relayed(shared, event, started, (out, inn), Kind::Egress);
    drop(slot);
}

/// Counts a relayed connection of `kind` with its bytes (out of the cell, into it) and writes
/// its `allowed` event.
fn relayed(
    shared: &Shared,
    mut event: Value,
    started: Instant,
    (out, inn): (u64, u64),
    kind: Kind,
) {
    {
        let mut t = lock(&shared.totals);
        match kind {
            Kind::Ingress => t.ingress += 1,
            Kind::Egress | Kind::Dns => t.egress_allowed += 1,
        }
        t.bytes_out += out;
        t.bytes_in += inn;
    }
    event["verdict"] = json!("allowed");
    event["bytes_out"] = json!(out);
    event["bytes_in"] = json!(inn);
    event["duration_ms"] = json!(started.elapsed().as_millis() as u64);
    lock(&shared.events).emit("network", event, false, &shared.totals);
}

/// Reads the cell's first bytes until [`sniff`] can tell, and checks the name they give.
fn first_bytes(
    conn: &mut UnixStream,
    names: &std::collections::BTreeSet<String>,
) -> (Vec<u8>, Result<(), String>) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let seen = sniff(&buf);
        let name = match seen {
            Sniffed::NeedMore => {
                let want = (MAX_SNIFF - buf.len()).min(chunk.len());
                match conn.read(&mut chunk[..want]) {
                    // Nothing sent at all: nothing to check. A head cut short is refused: a
                    // server may still act on what it got.
                    Ok(0) | Err(_) if buf.is_empty() => return (buf, Ok(())),
                    Ok(0) | Err(_) => {
                        return (buf, Err("the connection ended inside its first request".into()))
                    }
                    Ok(k) => {
                        buf.extend_from_slice(&chunk[..k]);
                        continue;
                    }
                }
            }
            Sniffed::Other => return (buf, Ok(())),
            Sniffed::Http2 => {
                return (buf, Err("HTTP/2 without TLS under a name rule: no name to check".into()))
            }
            Sniffed::Tls(n) => ("TLS server name", n),
            Sniffed::Http(n) => ("HTTP Host", n),
        };
        let verdict = match name {
            (what, Some(n)) if names.contains(&n) => {
                let _ = what;
                Ok(())
            }
            (what, Some(n)) => Err(format!(
                "{what} {n:?} is not the allowed name ({})",
                names.iter().cloned().collect::<Vec<_>>().join(", ")
            )),
            (what, None) => Err(format!("no {what}: a name rule needs one")),
        };
        return (buf, verdict);
    }
}

fn deny(shared: &Arc<Shared>, mut event: Value, reason: &str) {
    lock(&shared.totals).egress_denied += 1;
    event["verdict"] = json!("denied");
    event["reason"] = json!(reason);
    lock(&shared.events).emit("network", event, true, &shared.totals);
}

/// The cell's DNS stream: framed queries in, framed answers out, in turn.
fn dns_stream(shared: &Arc<Shared>, mut conn: UnixStream) {
    let Ok(slot) = Slot::take(shared, Kind::Dns) else { return };
    slot.track(&conn);
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len == 0 || len > wire::MAX_DNS_MESSAGE {
            return;
        }
        let mut query = vec![0u8; len];
        if conn.read_exact(&mut query).is_err() {
            return;
        }
        let Some((reply, answered)) = dns::answer(&query, &shared.list, &shared.resolve) else {
            return;
        };
        let refused = matches!(answered.result, "nxdomain" | "formerr");
        {
            let mut t = lock(&shared.totals);
            if refused {
                t.dns_refused += 1;
            } else {
                t.dns_answered += 1;
            }
        }
        let event = json!({
            "name": answered.name,
            "qtype": answered.qtype,
            "result": answered.result,
            "addresses": answered.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        });
        lock(&shared.events).emit("dns", event, true, &shared.totals);
        let Ok(n) = u16::try_from(reply.len()) else { return };
        let mut framed = n.to_be_bytes().to_vec();
        framed.extend(reply);
        if conn.write_all(&framed).is_err() {
            return;
        }
    }
}

/// A host-initiated vsock connection to the agent's ingress port, through the VMM's socket.
/// The VMM sheds host sockets past a few dozen waiting at once, so a burst of clients is
/// retried a few times before a client is turned away.
fn vmm_connect(vsock_path: &std::path::Path) -> Result<UnixStream, String> {
    let mut last = String::new();
    for wait_ms in [0, 20, 100, 500] {
        std::thread::sleep(Duration::from_millis(wait_ms));
        let mut s = match UnixStream::connect(vsock_path) {
            Ok(s) => s,
            Err(e) => {
                last = format!("vsock: {e}");
                continue;
            }
        };
        let _ = s.set_read_timeout(Some(HEADER_TIMEOUT));
        if let Err(e) = s.write_all(format!("CONNECT {}\n", wire::INGRESS_PORT).as_bytes()) {
            last = format!("vsock: {e}");
            continue;
        }
        match wire::read_line(&mut s) {
            Ok(ok) if ok.starts_with("OK ") => return Ok(s),
            Ok(other) => return Err(format!("the cell does not take published ports ({other})")),
            Err(e) => last = format!("the cell's agent: {e}"),
        }
    }
    Err(last)
}

/// One connection to a published port: into the cell through the agent's ingress port.
fn ingress(shared: &Arc<Shared>, publish: &Publish, client: TcpStream) {
    let started = Instant::now();
    let event = json!({
        "direction": "ingress",
        "published": publish.to_string(),
        "from": client.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
    });
    let refused = |event: Value, reason: String| {
        let mut event = event;
        event["verdict"] = json!("refused");
        event["reason"] = json!(reason);
        lock(&shared.events).emit("network", event, true, &shared.totals);
    };
    let slot = match Slot::take(shared, Kind::Ingress) {
        Ok(s) => s,
        Err(why) => return refused(event, why.into()),
    };
    slot.track(&client);
    let _ = client.set_nodelay(true);
    let cell = (|| -> Result<UnixStream, String> {
        let mut s = vmm_connect(&shared.vsock_path)?;
        slot.track(&s);
        s.write_all(wire::port_line(publish.guest_port).as_bytes()).map_err(|e| e.to_string())?;
        // The agent gives the cell's server a while to accept (a full backlog is retried by
        // TCP), so wait longer than that for its answer.
        s.set_read_timeout(Some(INGRESS_ANSWER)).map_err(|e| e.to_string())?;
        match Answer::parse(&wire::read_line(&mut s).map_err(|e| e.to_string())?) {
            Answer::Ok => {}
            Answer::Refused(r) => {
                return Err(format!("nothing serves port {} in the cell: {r}", publish.guest_port))
            }
        }
        s.set_read_timeout(None).map_err(|e| e.to_string())?;
        Ok(s)
    })();
    let cell = match cell {
        Ok(c) => c,
        Err(reason) => {
            let _ = client.shutdown(Shutdown::Both);
            return refused(event, reason);
        }
    };
    let Some(back) = start_back(&cell, &client) else {
        return refused(event, "no thread for the relay".into());
    };
    let (out, inn) = finish(cell, client, &[], back);
    relayed(shared, event, started, (out, inn), Kind::Ingress);
    drop(slot);
}

#[cfg(test)]
mod tests;
