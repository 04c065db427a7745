//! What name a connection's first bytes ask for: the server name of a TLS ClientHello, or the
//! `Host` header of an HTTP/1 request. The bytes are the guest's: every length is checked and
//! nothing here can panic or read past what was given.

/// The most bytes looked at before deciding.
pub const MAX_SNIFF: usize = 16 * 1024 + 5;

/// What the first bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// Not enough yet to tell.
    NeedMore,
    /// A TLS ClientHello, with its server name if it gives one.
    Tls(Option<String>),
    /// An HTTP/1 request, with its `Host` (port removed) if it gives exactly one name.
    Http(Option<String>),
    /// The HTTP/2 cleartext preface: the name is inside compressed headers, unseen.
    Http2,
    /// Neither: a protocol whose names the proxy cannot see.
    Other,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Looks at the first bytes of a connection. `NeedMore` only while fewer than [`MAX_SNIFF`]
/// bytes were given; at that size the answer is final.
///
/// Only the first request of an HTTP/1 connection is seen: a server that serves another site
/// to a later request on the same connection is not stopped here (TLS is, by its server name).
pub fn sniff(buf: &[u8]) -> Sniffed {
    match buf {
        [0x16, ..] => return tls(buf),
        // Another TLS record first (an alert, change cipher spec, data): lenient servers skip
        // or take it, so it is TLS whose name cannot be read here.
        [0x14 | 0x15 | 0x17] => return Sniffed::NeedMore,
        [0x14 | 0x15 | 0x17, v, ..] if *v < 0x10 => return Sniffed::Tls(None),
        _ => {}
    }
    // Servers skip empty lines before a request, so the proxy does too.
    let start = buf.iter().position(|b| *b != b'\r' && *b != b'\n').unwrap_or(buf.len());
    let buf = &buf[start..];
    if buf.is_empty() {
        return if start >= MAX_SNIFF { Sniffed::Other } else { Sniffed::NeedMore };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Sniffed::Http2 } else { Sniffed::NeedMore };
    }
    // A request line is a method token (any: servers route WebDAV or made-up methods by Host
    // too), a space, and, once the line is whole, an `HTTP/` version at its end.
    let token = buf.iter().take_while(|b| b.is_ascii_alphabetic() || **b == b'-' || **b == b'_');
    let token = token.count();
    if token == buf.len() {
        return if token < 32 { Sniffed::NeedMore } else { Sniffed::Other };
    }
    if token == 0 || buf[token] != b' ' {
        return Sniffed::Other;
    }
    let Some(line_end) = buf.iter().position(|b| *b == b'\n') else {
        return if buf.len() + start >= MAX_SNIFF {
            Sniffed::Http(None)
        } else {
            Sniffed::NeedMore
        };
    };
    let line = &buf[..line_end];
    if !line.windows(6).any(|w| w == b" HTTP/") {
        return Sniffed::Other;
    }
    // The head ends at an empty line, whether lines end in CRLF or (as lenient servers take
    // it) a bare LF.
    let end = [find(buf, b"\r\n\r\n"), find(buf, b"\n\n")].into_iter().flatten().min();
    match end {
        Some(end) => Sniffed::Http(host_of(&buf[..end])),
        None if buf.len() + start >= MAX_SNIFF => Sniffed::Http(None),
        None => Sniffed::NeedMore,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The one name a request head asks for: its `Host`, which an absolute-form target
/// (`GET http://name/`) must agree with. `None` when there is no name, or more than one.
fn host_of(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request = lines.next()?;
    if text.bytes().zip(text.bytes().skip(1)).any(|(a, b)| a == b'\r' && b != b'\n') {
        return None; // a bare CR: servers split lines differently
    }
    let mut hosts = lines.filter_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case("host").then(|| value.trim())
    });
    let host = hosts.next()?;
    if hosts.next().is_some() {
        return None; // two Host headers: ambiguous, so no name
    }
    let name = strip_port(host).and_then(normal)?;
    // The target: origin form (`/path`) and `*` name nothing; an absolute form (`scheme://`)
    // or authority form (CONNECT's `name:port`) names a host, which must be the same.
    let mut words = request.split_ascii_whitespace();
    let method = words.next()?;
    let target = words.next()?.to_ascii_lowercase();
    if target.starts_with('/') || target == "*" {
        return Some(name);
    }
    let authority = match target.split_once("://") {
        Some((_, rest)) => rest.split(['/', '?', '#']).next()?,
        None if method.eq_ignore_ascii_case("CONNECT") => target.as_str(),
        None => return None,
    };
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    (strip_port(authority).and_then(normal)? == name).then_some(name)
}

/// `name:port` or `name` → `name`.
fn strip_port(host: &str) -> Option<&str> {
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => Some(h),
        Some(_) => None,
        None => Some(host),
    }
}

fn normal(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    isocell_spec::network::valid_name(&name).then_some(name)
}

/// A cursor over the guest's bytes that fails instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn tls(buf: &[u8]) -> Sniffed {
    if buf.len() < 5 {
        return Sniffed::NeedMore;
    }
    if buf[1] != 3 {
        return Sniffed::Tls(None); // a handshake record of another version: no name read
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + len {
        return if buf.len() >= MAX_SNIFF { Sniffed::Tls(None) } else { Sniffed::NeedMore };
    }
    Sniffed::Tls(client_hello_name(&buf[5..5 + len]))
}

/// The server name of a ClientHello handshake message (RFC 8446 4.1.2, RFC 6066 3).
fn client_hello_name(msg: &[u8]) -> Option<String> {
    let mut r = Reader { buf: msg };
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.take(3)?;
    let len = (usize::from(len[0]) << 16) | (usize::from(len[1]) << 8) | usize::from(len[2]);
    let mut r = Reader { buf: r.take(len)? };
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut exts = Reader { buf: r.vec16()? };
    let mut server_name = None;
    while !exts.buf.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        match kind {
            0 if server_name.is_none() => {
                let mut list = Reader { buf: Reader { buf: data }.vec16()? };
                while !list.buf.is_empty() {
                    let name_type = list.u8()?;
                    let name = list.vec16()?;
                    if name_type == 0 {
                        server_name = Some(normal(std::str::from_utf8(name).ok()?)?);
                        break;
                    }
                }
            }
            0 => return None, // two server name extensions
            // Encrypted Client Hello: the server would route by the hidden inner name.
            0xfe0d | 0xffce => return None,
            _ => {}
        }
    }
    server_name
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A minimal ClientHello record naming `name`.
    pub fn client_hello(name: &str) -> Vec<u8> {
        client_hello_with(name, None)
    }

    /// The same with one more (empty) extension of type `extra`.
    fn client_hello_with(name: &str, extra: Option<u16>) -> Vec<u8> {
        let mut sni = Vec::new();
        sni.extend((name.len() as u16 + 3).to_be_bytes());
        sni.push(0);
        sni.extend((name.len() as u16).to_be_bytes());
        sni.extend(name.as_bytes());
        let mut exts = vec![0, 0];
        exts.extend((sni.len() as u16).to_be_bytes());
        exts.extend(sni);
        if let Some(kind) = extra {
            exts.extend(kind.to_be_bytes());
            exts.extend([0, 0]);
        }
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.extend([0, 0, 2, 0x13, 1, 1, 0]);
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn tls_server_names_are_read_whole_or_not_at_all() {
        let hello = client_hello("API.Example.EU");
        assert_eq!(sniff(&hello), Sniffed::Tls(Some("api.example.eu".into())));
        for cut in 1..hello.len() {
            assert_eq!(sniff(&hello[..cut]), Sniffed::NeedMore, "{cut}");
        }
        // Encrypted Client Hello: the outer name is not the one served.
        assert_eq!(sniff(&client_hello_with("ok.test", Some(0xfe0d))), Sniffed::Tls(None));
        assert_eq!(
            sniff(&client_hello_with("ok.test", Some(0x002b))),
            Sniffed::Tls(Some("ok.test".into()))
        );
        // Other records first, or another version: TLS without a readable name.
        assert_eq!(sniff(&[0x15, 3, 1, 0, 2, 1, 0x5a]), Sniffed::Tls(None));
        assert_eq!(sniff(&[0x16, 0, 1, 0, 2, 1, 0]), Sniffed::Tls(None));
        assert_eq!(sniff(&[0x15]), Sniffed::NeedMore);
        let mut bad = hello.clone();
        bad[9 + 34] = 0xff; // the session id's length, past the end
        assert_eq!(sniff(&bad), Sniffed::Tls(None));
    }

    #[test]
    fn http_hosts_lose_their_port_and_ambiguity_gives_no_name() {
        let req = b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nhost: Payload.Test:8080\r\n\r\nbody";
        assert_eq!(sniff(req), Sniffed::Http(Some("payload.test".into())));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a\r\n"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), Sniffed::Http(None));
        let two = b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n";
        assert_eq!(sniff(two), Sniffed::Http(None));
        assert_eq!(sniff(b"GE"), Sniffed::NeedMore);
        // Any method, any spacing, any scheme and CONNECT's authority are read.
        let webdav = b"PROPFIND / HTTP/1.1\r\nHost: evil.test\r\n\r\n";
        assert_eq!(sniff(webdav), Sniffed::Http(Some("evil.test".into())));
        let spaced = b"GET  http://evil.test/ HTTP/1.1\r\nHost: ok.test\r\n\r\n";
        assert_eq!(sniff(spaced), Sniffed::Http(None));
        let scheme = b"GET foo://evil.test/ HTTP/1.1\r\nHost: ok.test\r\n\r\n";
        assert_eq!(sniff(scheme), Sniffed::Http(None));
        let connect = b"CONNECT evil.test:443 HTTP/1.1\r\nHost: ok.test\r\n\r\n";
        assert_eq!(sniff(connect), Sniffed::Http(None));
        let star = b"OPTIONS * HTTP/1.1\r\nHost: ok.test\r\n\r\n";
        assert_eq!(sniff(star), Sniffed::Http(Some("ok.test".into())));
        assert_eq!(sniff(b"HELO mail.test\r\n"), Sniffed::Other, "not an HTTP line");
        assert_eq!(sniff(b"PROPFIND / HT"), Sniffed::NeedMore);
        // What lenient servers accept is read as they read it.
        let lf = b"\r\nGET / HTTP/1.1\nHost: evil.test\n\n";
        assert_eq!(sniff(lf), Sniffed::Http(Some("evil.test".into())));
        let pipelined =
            b"GET / HTTP/1.1\nHost: evil.test\n\nGET / HTTP/1.1\r\nHost: ok.test\r\n\r\n";
        assert_eq!(sniff(pipelined), Sniffed::Http(Some("evil.test".into())));
        let absolute = b"GET http://evil.test/x HTTP/1.1\r\nHost: ok.test\r\n\r\n";
        assert_eq!(sniff(absolute), Sniffed::Http(None));
        let agreeing = b"GET http://OK.test:80/x HTTP/1.1\r\nHost: ok.test\r\n\r\n";
        assert_eq!(sniff(agreeing), Sniffed::Http(Some("ok.test".into())));
        assert_eq!(sniff(b"GET / HTTP/1.1\rHost: a.test\r\n\r\n"), Sniffed::Http(None));
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Sniffed::Http2);
        assert_eq!(sniff(b"PRI * HT"), Sniffed::NeedMore);
        assert_eq!(sniff(b"\r\n"), Sniffed::NeedMore);
        assert_eq!(sniff(b"SSH-2.0-OpenSSH\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"\0\0\0\x08\x04\xd2\x16\x2f"), Sniffed::Other);
        let mut endless = b"GET / HTTP/1.1\r\n".to_vec();
        endless.resize(MAX_SNIFF, b'a');
        assert_eq!(sniff(&endless), Sniffed::Http(None));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..2000usize {
            let mut buf = vec![0u8; len % 700];
            for b in buf.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            if let Some(first) = buf.first_mut() {
                *first = [0x16, b'G', b'P', 0][len % 4];
            }
            let _ = sniff(&buf);
        }
    }
}
