//! The cell's network, carried over vsock (no network device in the VMM).
//!
//! - **Egress**: the agent redirects every outgoing TCP connection to a listener of its own,
//!   learns the original destination and opens one vsock stream per connection to the host's
//!   [`EGRESS_PORT`]. The stream starts with one request line, `CONNECT 10.1.2.3:443\n`; the
//!   host answers `OK\n` (then bytes flow both ways untouched) or `DENIED reason\n` (then it
//!   closes). Only IPv4 is carried.
//! - **DNS**: one vsock stream to the host's [`DNS_PORT`] carries DNS messages framed as DNS
//!   over TCP does (a big-endian `u16` length, then the message); the host answers each in turn.
//! - **Ingress** (published ports): the host opens a vsock stream to the agent's
//!   [`INGRESS_PORT`] and sends `PORT 80\n`; the agent connects to that port on the cell's
//!   loopback and answers `OK\n`, or `REFUSED reason\n` and closes.
//!
//! Header lines are at most [`MAX_LINE`] bytes with the newline; a longer or malformed one is
//! refused, never buffered without bound.

use std::net::SocketAddrV4;

/// vsock port on the host the agent dials for each outgoing TCP connection.
pub const EGRESS_PORT: u32 = 1026;
/// vsock port on the host that answers the cell's DNS queries.
pub const DNS_PORT: u32 = 1027;
/// vsock port in the cell on which the agent accepts the host's published-port connections.
pub const INGRESS_PORT: u32 = 1028;
/// Longest header line, newline included.
pub const MAX_LINE: usize = 64;
/// Largest DNS message carried (DNS over TCP allows 65535; a query is far smaller).
pub const MAX_DNS_MESSAGE: usize = 4096;

/// Why a header line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// More than [`MAX_LINE`] bytes came without a newline.
    #[error("header line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The stream ended before the newline.
    #[error("the stream ended inside the header line")]
    Truncated,
    /// The line is not what this end expects.
    #[error("malformed header line {0:?}")]
    Malformed(String),
}

/// The agent's egress request for `dest`.
pub fn connect_line(dest: SocketAddrV4) -> String {
    format!("CONNECT {dest}\n")
}

/// Parses an egress request line (without its newline).
pub fn parse_connect(line: &str) -> Result<SocketAddrV4, LineError> {
    line.strip_prefix("CONNECT ")
        .and_then(|rest| rest.parse::<SocketAddrV4>().ok())
        .filter(|a| a.port() != 0)
        .ok_or_else(|| LineError::Malformed(line.chars().take(MAX_LINE).collect()))
}

/// The host's published-port request for guest port `port`.
pub fn port_line(port: u16) -> String {
    format!("PORT {port}\n")
}

/// Parses a published-port request line (without its newline).
pub fn parse_port(line: &str) -> Result<u16, LineError> {
    line.strip_prefix("PORT ")
        .filter(|p| !p.starts_with('+') && !p.starts_with('0'))
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| LineError::Malformed(line.chars().take(MAX_LINE).collect()))
}

/// An answer line: `OK`, or a refusal with its reason (`DENIED ...`, `REFUSED ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Go ahead: bytes flow from here on.
    Ok,
    /// Refused, with the reason.
    Refused(String),
}

impl Answer {
    /// The line for this answer; a reason is cut to fit [`MAX_LINE`] and kept on one line.
    pub fn line(&self, word: &str) -> String {
        match self {
            Answer::Ok => "OK\n".into(),
            Answer::Refused(reason) => {
                let room = MAX_LINE - word.len() - 2;
                let reason: String =
                    reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
                let mut cut = reason.len().min(room);
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                format!("{word} {}\n", &reason[..cut])
            }
        }
    }

    /// Parses an answer line (without its newline).
    pub fn parse(line: &str) -> Answer {
        if line == "OK" {
            return Answer::Ok;
        }
        let reason = line.split_once(' ').map_or(line, |(_, r)| r);
        Answer::Refused(reason.to_owned())
    }
}

/// Reads one header line, byte by byte so nothing after the newline is consumed; at most
/// [`MAX_LINE`] bytes. Returns the line without its newline.
pub fn read_line(r: &mut impl std::io::Read) -> Result<String, std::io::Error> {
    let mut line = Vec::with_capacity(MAX_LINE);
    let mut byte = [0u8; 1];
    loop {
        if r.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                LineError::Truncated,
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() >= MAX_LINE {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, LineError::TooLong));
        }
    }
    String::from_utf8(line).map_err(|e| {
        let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
        std::io::Error::new(std::io::ErrorKind::InvalidData, LineError::Malformed(text))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn connect_lines_round_trip_and_fit() {
        let a: SocketAddrV4 = "255.255.255.255:65535".parse().unwrap();
        let line = connect_line(a);
        assert!(line.len() <= MAX_LINE);
        assert_eq!(parse_connect(line.trim_end()).unwrap(), a);
    }

    #[test]
    fn bad_connect_lines_are_refused() {
        for bad in [
            "",
            "CONNECT",
            "CONNECT x:1",
            "CONNECT 1.2.3.4",
            "CONNECT 1.2.3.4:0",
            "connect 1.2.3.4:80",
            "CONNECT [::1]:80",
            "CONNECT 1.2.3.4:80 extra",
        ] {
            assert!(parse_connect(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn port_lines_round_trip_and_bad_ones_are_refused() {
        assert_eq!(parse_port(port_line(8080).trim_end()).unwrap(), 8080);
        for bad in ["PORT", "PORT 0", "PORT 65536", "PORT +80", "PORT 080", "PORT -1", "port 80"] {
            assert!(parse_port(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn answers_fit_on_one_line() {
        let long = Answer::Refused("x\ny".repeat(100));
        let line = long.line("DENIED");
        assert!(line.len() <= MAX_LINE && line.ends_with('\n') && line.matches('\n').count() == 1);
        assert_eq!(Answer::parse(line.trim_end()), Answer::Refused("x y".repeat(100)[..55].into()));
        assert_eq!(Answer::parse("OK"), Answer::Ok);
        let multi = Answer::Refused("é".repeat(40)).line("DENIED");
        assert!(multi.len() <= MAX_LINE);
    }

    #[test]
    fn lines_are_bounded_and_stop_at_the_newline() {
        let mut input: &[u8] = b"CONNECT 1.2.3.4:5\nrest";
        assert_eq!(read_line(&mut input).unwrap(), "CONNECT 1.2.3.4:5");
        assert_eq!(input, b"rest");
        let long = vec![b'a'; 1000];
        assert_eq!(
            read_line(&mut long.as_slice()).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        assert_eq!(
            read_line(&mut &b"CONNECT"[..]).unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
        assert!(read_line(&mut &b"\xff\xfe\n"[..]).is_err());
    }
}
