//! Connections carried between the cell's TCP and the host's vsock: egress (a program's
//! redirected connection, dialled out through the host) and ingress (the host's connection to
//! a published port). Each connection has its own threads; a bounded number run at once.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use isocell_proto::net::{connect_line, parse_port, read_line, Answer, EGRESS_PORT, INGRESS_PORT};
use isocell_spec::vm::VSOCK_HOST_CID;
use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use vsock::{VsockListener, VsockStream, VMADDR_CID_ANY};

/// Most connections relayed at once in each direction; more are reset (egress) or refused
/// (ingress).
pub const MAX_RELAYS: usize = 1024;
/// Bytes copied at a time in each direction.
const BUFFER: usize = 64 * 1024;
/// How long the host may take to answer a `CONNECT` (it dials out in the meantime).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an ingress connection may take to name its port. Only the host can connect, and it
/// names the port at once, but under load (a hundred connections at once in an emulated cell)
/// the line can take seconds to arrive: 5 s once refused one of them.
const INGRESS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the cell's program may take to accept it: a server whose listen backlog is full
/// drops the SYN and TCP retries it (after 1, then 3 s more, ...), as for any client.
const INGRESS_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A count of running relays, bounded by [`MAX_RELAYS`].
struct Slots(AtomicUsize);

/// One taken slot, given back when dropped.
struct Slot(&'static Slots);

impl Slots {
    fn take(&'static self) -> Option<Slot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_RELAYS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

static EGRESS_SLOTS: Slots = Slots(AtomicUsize::new(0));
static INGRESS_SLOTS: Slots = Slots(AtomicUsize::new(0));

/// Closes a TCP connection with a reset (linger 0), so its program sees an error at once.
fn reset(tcp: TcpStream) {
    let _ = setsockopt(&tcp, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 });
}

/// The two ends a relay joins.
trait End: Read + Write {
    /// Shuts the connection down, ignoring errors (it may be gone already).
    fn shut(&self, how: Shutdown);
}

impl End for TcpStream {
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

impl End for VsockStream {
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

/// Copies `from` to `to` until `from` ends, then shuts `to` for writing. On an error either
/// way both ends are shut completely, so the other direction ends too.
fn copy(mut from: impl End, mut to: impl End) {
    let mut buf = vec![0u8; BUFFER];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                to.shut(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    from.shut(Shutdown::Both);
    to.shut(Shutdown::Both);
}

/// Relays bytes both ways between `tcp` and `vsock` until both directions are done. If that
/// cannot start, `tcp` is reset.
fn relay(tcp: TcpStream, vsock: VsockStream) {
    let (tcp_in, vsock_out) = match (tcp.try_clone(), vsock.try_clone()) {
        (Ok(t), Ok(v)) => (t, v),
        _ => return reset(tcp),
    };
    let upstream =
        std::thread::Builder::new().name("relay".into()).spawn(move || copy(tcp_in, vsock_out));
    match upstream {
        Ok(up) => {
            copy(vsock, tcp);
            let _ = up.join();
        }
        // The closure (with its clones) is dropped, so this is the last descriptor: a reset.
        Err(_) => reset(tcp),
    }
}

/// The destination a redirected connection was headed for.
fn original_destination(tcp: &TcpStream) -> Option<SocketAddrV4> {
    getsockopt(tcp, sockopt::OriginalDst).ok().map(|sin| from_sockaddr_in(&sin))
}

/// A `sockaddr_in` (network byte order fields) as an address.
fn from_sockaddr_in(sin: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)), u16::from_be(sin.sin_port))
}

/// Asks the host to connect to `dest`; the stream to relay on if it did.
fn dial_out(dest: SocketAddrV4) -> io::Result<VsockStream> {
    let mut vsock = VsockStream::connect_with_cid_port(VSOCK_HOST_CID as u32, EGRESS_PORT)?;
    vsock.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    vsock.write_all(connect_line(dest).as_bytes())?;
    match Answer::parse(&read_line(&mut vsock)?) {
        Answer::Ok => {
            vsock.set_read_timeout(None)?;
            Ok(vsock)
        }
        Answer::Refused(reason) => Err(io::Error::new(io::ErrorKind::PermissionDenied, reason)),
    }
}

/// Serves one redirected connection.
fn egress(tcp: TcpStream) {
    // A connection to the listener itself (or not redirected at all) gets nothing.
    let Some(dest) = original_destination(&tcp).filter(|d| !d.ip().is_loopback()) else {
        return reset(tcp);
    };
    match dial_out(dest) {
        Ok(vsock) => relay(tcp, vsock),
        Err(_) => reset(tcp),
    }
}

/// Accepts connections with `accept` on a thread called `name` for the rest of the agent's
/// life, each served by `serve` on its own thread while it holds one of `slots`; one past the
/// limit goes to `busy`. If no thread can be made for one, it is dropped (closed).
fn accept_loop<S: Send + 'static>(
    name: &str,
    mut accept: impl FnMut() -> io::Result<S> + Send + 'static,
    slots: &'static Slots,
    busy: fn(S),
    serve: fn(S),
) -> Result<(), String> {
    let conn_name = format!("{name}-conn");
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || loop {
            let Ok(conn) = accept() else {
                // Out of descriptors or memory: let some connections end.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let Some(slot) = slots.take() else {
                busy(conn);
                continue;
            };
            let _ = std::thread::Builder::new().name(conn_name.clone()).spawn(move || {
                let _slot = slot;
                serve(conn);
            });
        })
        .map(drop)
        .map_err(|e| format!("{name} thread: {e}"))
}

/// Serves the egress listener for the rest of the agent's life.
pub fn serve_egress(listener: TcpListener) -> Result<(), String> {
    accept_loop("egress", move || listener.accept().map(|(s, _)| s), &EGRESS_SLOTS, reset, egress)
}

/// Serves one connection from the host to a published port.
fn ingress(mut vsock: VsockStream) {
    let refuse = |vsock: &mut VsockStream, reason: String| {
        let _ = vsock.write_all(Answer::Refused(reason).line("REFUSED").as_bytes());
    };
    let _ = vsock.set_read_timeout(Some(INGRESS_TIMEOUT));
    let port = match read_line(&mut vsock) {
        Ok(line) => match parse_port(&line) {
            Ok(port) => port,
            Err(e) => return refuse(&mut vsock, e.to_string()),
        },
        Err(e) => return refuse(&mut vsock, e.to_string()),
    };
    let _ = vsock.set_read_timeout(None);
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpStream::connect_timeout(&target, INGRESS_CONNECT_TIMEOUT) {
        Ok(tcp) => match vsock.write_all(Answer::Ok.line("OK").as_bytes()) {
            Ok(()) => relay(tcp, vsock),
            Err(_) => reset(tcp),
        },
        Err(e) => refuse(&mut vsock, e.to_string()),
    }
}

/// Accepts the host's published-port connections for the rest of the agent's life.
pub fn listen_ingress() -> Result<(), String> {
    let listener = VsockListener::bind_with_cid_port(VMADDR_CID_ANY, INGRESS_PORT)
        .map_err(|e| format!("listen: {e}"))?;
    let busy = |mut vsock: VsockStream| {
        let busy = Answer::Refused(format!("{MAX_RELAYS} connections are open"));
        let _ = vsock.write_all(busy.line("REFUSED").as_bytes());
    };
    accept_loop("ingress", move || listener.accept().map(|(s, _)| s), &INGRESS_SLOTS, busy, ingress)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn original_destinations_come_in_network_order() {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 443u16.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(Ipv4Addr::new(93, 184, 216, 34)).to_be() },
            sin_zero: [0; 8],
        };
        assert_eq!(from_sockaddr_in(&sin), "93.184.216.34:443".parse().unwrap());
    }

    #[test]
    fn slots_are_bounded_and_given_back() {
        static SLOTS: Slots = Slots(AtomicUsize::new(0));
        let taken: Vec<Slot> = (0..MAX_RELAYS).map_while(|_| SLOTS.take()).collect();
        assert_eq!(taken.len(), MAX_RELAYS);
        assert!(SLOTS.take().is_none());
        drop(taken);
        assert!(SLOTS.take().is_some());
        assert_eq!(SLOTS.0.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_relay_copies_both_ways_and_passes_on_end_of_stream() {
        // Both ends are TCP here (vsock needs a VM); `copy` is the same code either way.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut a = TcpStream::connect(addr).unwrap();
        let (a_far, _) = listener.accept().unwrap();
        let mut b = TcpStream::connect(addr).unwrap();
        let (b_far, _) = listener.accept().unwrap();
        let (a2, b2) = (a_far.try_clone().unwrap(), b_far.try_clone().unwrap());
        let one = std::thread::spawn(move || copy(a_far, b_far));
        let two = std::thread::spawn(move || copy(b2, a2));
        a.write_all(b"ping").unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping");
        b.write_all(b"pong").unwrap();
        drop(b);
        let mut got = Vec::new();
        a.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"pong");
        one.join().unwrap();
        two.join().unwrap();
    }
}
