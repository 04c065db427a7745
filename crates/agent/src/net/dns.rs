//! The cell's name server: a UDP socket on 127.0.0.1:53 whose queries go, one at a time, to the
//! host's [`DNS_PORT`] on one persistent vsock stream, framed as DNS over TCP.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use isocell_proto::net::{DNS_PORT, MAX_DNS_MESSAGE};
use isocell_spec::vm::VSOCK_HOST_CID;
use vsock::VsockStream;

/// How long the host may take to answer one query.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds 127.0.0.1:53 and answers queries on a thread of its own.
pub fn start() -> Result<(), String> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 53))
        .map_err(|e| format!("listen on 127.0.0.1:53: {e}"))?;
    std::thread::Builder::new()
        .name("dns".into())
        .spawn(move || serve(&socket))
        .map(drop)
        .map_err(|e| format!("dns thread: {e}"))
}

fn serve(socket: &UdpSocket) {
    let mut host: Option<VsockStream> = None;
    // One byte more than the largest message, to tell a too-large datagram from a full one.
    let mut buf = vec![0u8; MAX_DNS_MESSAGE + 1];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let Some(query) = buf.get(..n).filter(|q| !q.is_empty() && q.len() <= MAX_DNS_MESSAGE)
        else {
            continue;
        };
        match ask(&mut host, query) {
            Ok(reply) => {
                let _ = socket.send_to(&reply, from);
            }
            // The stream may be out of step now (a late answer): start a new one next time.
            Err(_) => host = None,
        }
    }
}

/// Sends `query` to the host (connecting first if need be) and reads its answer.
fn ask(host: &mut Option<VsockStream>, query: &[u8]) -> io::Result<Vec<u8>> {
    let stream = match host {
        Some(s) => s,
        None => {
            let s = VsockStream::connect_with_cid_port(VSOCK_HOST_CID as u32, DNS_PORT)?;
            s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
            host.insert(s)
        }
    };
    stream.write_all(&frame(query)?)?;
    read_frame(stream)
}

/// `message` framed as DNS over TCP: its length (big-endian u16), then the message.
fn frame(message: &[u8]) -> io::Result<Vec<u8>> {
    let len = u16::try_from(message.len())
        .ok()
        .filter(|_| message.len() <= MAX_DNS_MESSAGE)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "DNS message too large"))?;
    Ok([&len.to_be_bytes()[..], message].concat())
}

/// Reads one framed message; one longer than [`MAX_DNS_MESSAGE`] is an error.
fn read_frame(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len)?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > MAX_DNS_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "DNS answer too large"));
    }
    let mut message = vec![0u8; len];
    r.read_exact(&mut message)?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn messages_are_framed_with_a_big_endian_length() {
        assert_eq!(frame(&[7; 300]).unwrap()[..3], [1, 44, 7]);
        assert_eq!(frame(&[]).unwrap(), [0, 0]);
        assert!(frame(&vec![0; MAX_DNS_MESSAGE + 1]).is_err());
        let framed = frame(b"answer").unwrap();
        assert_eq!(read_frame(&mut framed.as_slice()).unwrap(), b"answer");
    }

    #[test]
    fn short_or_oversized_answers_are_errors() {
        assert!(read_frame(&mut &[0u8][..]).is_err());
        assert!(read_frame(&mut &[0u8, 5, 1, 2][..]).is_err());
        let too_big = u16::try_from(MAX_DNS_MESSAGE + 1).unwrap().to_be_bytes();
        let input = [&too_big[..], &vec![0; MAX_DNS_MESSAGE + 1]].concat();
        assert_eq!(
            read_frame(&mut input.as_slice()).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
