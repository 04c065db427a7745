//! The service with real sockets: a TCP server on loopback stands for the outside, and the
//! test plays the VMM's part (the Unix sockets the agent's vsock streams arrive on).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use isocell_proto::net::{connect_line, MAX_LINE};
use simple_dns::{Packet, TYPE};

use super::*;

struct Fixture {
    dir: PathBuf,
    service: Option<Service>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.service.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(egress: &[String], publish: &[String]) -> Fixture {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "isocell-net-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let network = Network::parse(egress, publish).unwrap();
    let published = bind_published(&network).unwrap();
    let service = Service::start(Start {
        network,
        cell: "t".into(),
        client: None,
        audit: None,
        egress: Some(UnixListener::bind(dir.join("egress")).unwrap()),
        dns: Some(UnixListener::bind(dir.join("dns")).unwrap()),
        published,
        vsock_path: dir.join("vsock.sock"),
        resolve: |name| match name {
            "payload.test" => Ok(vec![std::net::Ipv4Addr::LOCALHOST]),
            _ => Err(std::io::Error::other("not found")),
        },
    });
    Fixture { dir, service: Some(service) }
}

impl Fixture {
    fn stop(mut self) -> Totals {
        self.service.take().unwrap().stop()
    }

    fn totals(&self) -> Totals {
        self.service.as_ref().unwrap().totals()
    }

    /// Opens an egress stream for `line` and returns it with the host's answer.
    fn ask(&self, line: &[u8]) -> (UnixStream, String) {
        let mut s = UnixStream::connect(self.dir.join("egress")).unwrap();
        s.write_all(line).unwrap();
        let answer = wire::read_line(&mut s).unwrap_or_default();
        (s, answer)
    }

    /// Asks the cell's DNS for `name`: (rcode, answers).
    fn resolve(&self, name: &str) -> (simple_dns::RCODE, usize) {
        let mut s = UnixStream::connect(self.dir.join("dns")).unwrap();
        let q = dns::query(1, name, TYPE::A).unwrap();
        s.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
        s.write_all(&q).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut reply = vec![0u8; u16::from_be_bytes(len).into()];
        s.read_exact(&mut reply).unwrap();
        let p = Packet::parse(&reply).unwrap();
        (p.rcode(), p.answers.len())
    }
}

/// A loopback server that answers each connection with `reply` and the bytes it was sent.
fn server(reply: &'static [u8]) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut got = Vec::new();
                let _ = c.read_to_end(&mut got);
                let _ = c.write_all(reply);
                let _ = c.write_all(&got);
            });
        }
    });
    port
}

#[test]
fn an_allowed_address_is_relayed_both_ways_and_counted() {
    let port = server(b"hello:");
    let f = start(&[format!("127.0.0.1:{port}")], &[]);
    let (mut s, answer) =
        f.ask(connect_line(format!("127.0.0.1:{port}").parse().unwrap()).as_bytes());
    assert_eq!(answer, "OK");
    let payload = vec![7u8; 1 << 20];
    s.write_all(&payload).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(&back[..6], b"hello:");
    assert_eq!(back[6..], payload[..]);
    drop(s);
    let t = f.stop();
    assert_eq!((t.egress_allowed, t.egress_denied), (1, 0));
    assert_eq!((t.bytes_out, t.bytes_in), (1 << 20, (1 << 20) + 6));
}

#[test]
fn other_ports_addresses_and_malformed_requests_are_denied_at_once() {
    let port = server(b"");
    let f = start(&[format!("127.0.0.1:{port}")], &[]);
    let line = |a: &str| connect_line(a.parse().unwrap());
    for (req, why) in [
        (line(&format!("127.0.0.1:{}", port.wrapping_add(1).max(1))), "no egress rule"),
        (line(&format!("127.0.0.2:{port}")), "no egress rule"),
        ("CONNECT nonsense\n".to_owned(), "malformed"),
        ("x".repeat(MAX_LINE * 4), "malformed"),
    ] {
        let (_, answer) = f.ask(req.as_bytes());
        assert!(answer.starts_with("DENIED") && answer.contains(why), "{req:?}: {answer}");
    }
    assert_eq!(f.totals().egress_denied, 4);
    assert_eq!(f.totals().egress_allowed, 0);
}

#[test]
fn a_name_rule_needs_the_host_to_have_resolved_it_and_the_request_to_name_it() {
    let port = server(b"HTTP/1.0 200 OK\r\n\r\n");
    let f = start(&[format!("payload.test:{port}")], &[]);
    let dest = connect_line(format!("127.0.0.1:{port}").parse().unwrap());
    let (_, answer) = f.ask(dest.as_bytes());
    assert!(answer.contains("no egress rule"), "not resolved yet: {answer}");

    assert_eq!(f.resolve("evil.example"), (simple_dns::RCODE::NameError, 0));
    let (rcode, answers) = f.resolve("payload.test");
    assert_eq!(rcode, simple_dns::RCODE::NoError);
    assert!(answers > 0);

    let (mut s, answer) = f.ask(dest.as_bytes());
    assert_eq!(answer, "OK");
    s.write_all(b"GET / HTTP/1.1\r\nHost: Payload.Test:80\r\n\r\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).unwrap();
    assert!(back.starts_with("HTTP/1.0 200 OK") && back.contains("Host: Payload.Test"), "{back}");

    // Same address, another name: the connection is cut before a byte reaches the server.
    let (mut s, answer) = f.ask(dest.as_bytes());
    assert_eq!(answer, "OK");
    s.write_all(b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n").unwrap();
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    assert!(!back.windows(5).any(|w| w == b"other"), "{}", String::from_utf8_lossy(&back));
    let t = f.stop();
    assert_eq!((t.egress_allowed, t.dns_answered, t.dns_refused), (1, 1, 1));
    assert!(t.egress_denied >= 1);
}

#[test]
fn a_server_that_speaks_first_is_heard_under_a_name_rule() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.write_all(b"220 hello\r\n").unwrap();
        let mut got = [0u8; 6];
        c.read_exact(&mut got).unwrap();
        c.write_all(&got).unwrap();
    });
    let f = start(&[format!("payload.test:{port}")], &[]);
    f.resolve("payload.test");
    let (mut s, answer) =
        f.ask(connect_line(format!("127.0.0.1:{port}").parse().unwrap()).as_bytes());
    assert_eq!(answer, "OK");
    let mut greeting = [0u8; 11];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"220 hello\r\n");
    s.write_all(b"QUIT\r\n").unwrap();
    let mut echo = [0u8; 6];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"QUIT\r\n", "not TLS, not HTTP: the address was resolved for the name");
}

#[test]
fn a_silent_or_flooding_guest_holds_only_its_own_slots() {
    let port = server(b"");
    let f = start(&[format!("127.0.0.1:{port}")], &[]);
    // Streams that never send their request line each hold a slot until the header timeout.
    let silent: Vec<UnixStream> =
        (0..MAX_EGRESS).map(|_| UnixStream::connect(f.dir.join("egress")).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let (_, answer) = f.ask(connect_line(format!("127.0.0.1:{port}").parse().unwrap()).as_bytes());
    assert!(answer.contains("too many connections"), "{answer}");
    // DNS has its own budget.
    assert_eq!(f.resolve("nothing.test").0, simple_dns::RCODE::NameError);
    drop(silent);
    let t0 = Instant::now();
    let t = f.stop();
    assert!(t0.elapsed() < STOP_PATIENCE + Duration::from_secs(1), "stop is bounded");
    assert!(t.egress_denied >= 1);
}

#[test]
fn published_ports_reach_the_cell_through_the_vmm_socket() {
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = probe.local_addr().unwrap().port();
    drop(probe);
    let f = start(&[], &[format!("{host_port}:80")]);
    // The VMM's part: a host-initiated connection, CONNECT to the agent's ingress port, and
    // the agent's part: the PORT line, then an echo.
    let vmm = UnixListener::bind(f.dir.join("vsock.sock")).unwrap();
    std::thread::spawn(move || {
        for c in vmm.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut w = c;
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                assert_eq!(line, format!("CONNECT {}\n", wire::INGRESS_PORT));
                w.write_all(b"OK 1234\n").unwrap();
                line.clear();
                r.read_line(&mut line).unwrap();
                if line == "PORT 80\n" {
                    w.write_all(b"OK\n").unwrap();
                    let mut rest = Vec::new();
                    r.read_to_end(&mut rest).unwrap();
                    w.write_all(&rest).unwrap();
                } else {
                    w.write_all(b"REFUSED wrong port\n").unwrap();
                }
            });
        }
    });
    let clients: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", host_port)).unwrap();
                let data = vec![i as u8; 100_000];
                c.write_all(&data).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                let mut back = Vec::new();
                c.read_to_end(&mut back).unwrap();
                assert_eq!(back, data);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let t = f.stop();
    assert_eq!((t.ingress, t.bytes_in, t.bytes_out), (20, 2_000_000, 2_000_000));
}

#[test]
fn a_published_port_in_use_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let n = Network::parse(&[], &[format!("{port}:80")]).unwrap();
    let e = bind_published(&n).unwrap_err();
    assert!(e.contains("cannot publish") && e.contains("another host port"), "{e}");
}
