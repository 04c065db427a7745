//! The body encoding of a [`Message`].
//!
//! A body is one tag byte, then the fields in order:
//!
//! | field | encoding |
//! |---|---|
//! | `u16`, `u32`, `u64`, `i32` | little-endian, fixed width |
//! | `bool` | one byte, 0 or 1 |
//! | bytes, `String` | `u32` length, then the bytes (strings are UTF-8) |
//! | `Option<T>` | one byte, 0 (none) or 1 followed by the value |
//! | `Vec<T>` | `u32` count, then the items |
//! | [`ExitStatus`], [`EntryKind`] | a tag byte, then the fields |
//!
//! Every value has exactly one encoding, and nothing may follow the message.

use crate::message::{EntryKind, ExecRequest, ExitStatus, Message, Privileges, WindowSize};
use crate::{MAX_FRAME_LEN, MAX_GROUPS};

/// Why a frame body is not a valid message.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The body ends in the middle of a field (or a length or count points past its end).
    #[error("message body ends early")]
    Truncated,
    /// The first byte names no message.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// A frame is larger than the protocol allows.
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Length of the frame body.
        len: usize,
        /// The limit, [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// A string field is not UTF-8.
    #[error("string field is not valid UTF-8")]
    BadUtf8,
    /// Bytes are left after a complete message.
    #[error("{0} bytes left after the message")]
    TrailingBytes(usize),
    /// A bool, option or enum tag byte has a value it may not have; names the field kind.
    #[error("invalid {0} byte")]
    BadValue(&'static str),
    /// An `Exec` names more supplementary groups than [`MAX_GROUPS`].
    #[error("{0} supplementary groups exceed the limit of {MAX_GROUPS}")]
    TooManyGroups(usize),
}

/// Message tags, the first byte of a body.
mod tag {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const EXEC: u8 = 3;
    pub const STDIN: u8 = 4;
    pub const STDIN_EOF: u8 = 5;
    pub const SIGNAL: u8 = 6;
    pub const STDOUT: u8 = 7;
    pub const STDERR: u8 = 8;
    pub const STARTED: u8 = 9;
    pub const EXEC_FAILED: u8 = 10;
    pub const EXITED: u8 = 11;
    pub const PUT_FILE: u8 = 12;
    pub const MAKE_DIR: u8 = 13;
    pub const GET_PATH: u8 = 14;
    pub const ENTRY: u8 = 15;
    pub const DATA: u8 = 16;
    pub const DATA_END: u8 = 17;
    pub const DONE: u8 = 18;
    pub const ERROR: u8 = 19;
    pub const SHUTDOWN: u8 = 20;
    pub const EXEC_SESSION: u8 = 21;
    pub const RESIZE: u8 = 22;
    pub const WAIT_SESSION: u8 = 23;
    pub const SIGNAL_SESSION: u8 = 24;
    pub const PREPARE_SNAPSHOT: u8 = 25;
    pub const RESEED: u8 = 26;
    pub const MAKE_READ_ONLY: u8 = 27;
}

/// Appends the body of `msg` to `out`.
///
/// # Panics
///
/// If a single string or byte field, or a list, holds more than `u32::MAX` elements.
/// (An `Exec` with more than [`MAX_GROUPS`] groups encodes, but the other side refuses it.)
pub(crate) fn encode_body(msg: &Message, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    match msg {
        Message::Hello { version, agent } => {
            w.u8(tag::HELLO);
            w.u16(*version);
            w.bytes(agent.as_bytes());
        }
        Message::Welcome { version } => {
            w.u8(tag::WELCOME);
            w.u16(*version);
        }
        Message::Exec(req) => {
            w.u8(tag::EXEC);
            w.exec(req);
        }
        Message::Stdin(data) => {
            w.u8(tag::STDIN);
            w.bytes(data);
        }
        Message::StdinEof => w.u8(tag::STDIN_EOF),
        Message::Signal(signal) => {
            w.u8(tag::SIGNAL);
            w.i32(*signal);
        }
        Message::Stdout(data) => {
            w.u8(tag::STDOUT);
            w.bytes(data);
        }
        Message::Stderr(data) => {
            w.u8(tag::STDERR);
            w.bytes(data);
        }
        Message::Started { pid } => {
            w.u8(tag::STARTED);
            w.u32(*pid);
        }
        Message::ExecFailed { errno, message } => {
            w.u8(tag::EXEC_FAILED);
            w.i32(*errno);
            w.bytes(message.as_bytes());
        }
        Message::Exited(status) => {
            w.u8(tag::EXITED);
            let (kind, value) = match *status {
                ExitStatus::Code(code) => (0, code),
                ExitStatus::Signal(signal) => (1, signal),
            };
            w.u8(kind);
            w.i32(value);
        }
        Message::PutFile { path, mode, size } => {
            w.u8(tag::PUT_FILE);
            w.bytes(path.as_bytes());
            w.u32(*mode);
            w.u64(*size);
        }
        Message::MakeDir { path, mode } => {
            w.u8(tag::MAKE_DIR);
            w.bytes(path.as_bytes());
            w.u32(*mode);
        }
        Message::GetPath { path } => {
            w.u8(tag::GET_PATH);
            w.bytes(path.as_bytes());
        }
        Message::Entry { path, kind, mode, size } => {
            w.u8(tag::ENTRY);
            w.bytes(path.as_bytes());
            w.u8(match kind {
                EntryKind::File => 0,
                EntryKind::Dir => 1,
            });
            w.u32(*mode);
            w.u64(*size);
        }
        Message::Data(data) => {
            w.u8(tag::DATA);
            w.bytes(data);
        }
        Message::DataEnd => w.u8(tag::DATA_END),
        Message::Done => w.u8(tag::DONE),
        Message::Error { message } => {
            w.u8(tag::ERROR);
            w.bytes(message.as_bytes());
        }
        Message::Shutdown => w.u8(tag::SHUTDOWN),
        Message::ExecSession { id, tty, exec } => {
            w.u8(tag::EXEC_SESSION);
            w.u64(*id);
            match tty {
                None => w.u8(0),
                Some(size) => {
                    w.u8(1);
                    w.window(*size);
                }
            }
            w.exec(exec);
        }
        Message::Resize(size) => {
            w.u8(tag::RESIZE);
            w.window(*size);
        }
        Message::WaitSession { id } => {
            w.u8(tag::WAIT_SESSION);
            w.u64(*id);
        }
        Message::SignalSession { id, signal } => {
            w.u8(tag::SIGNAL_SESSION);
            w.u64(*id);
            w.i32(*signal);
        }
        Message::PrepareSnapshot => w.u8(tag::PREPARE_SNAPSHOT),
        Message::MakeReadOnly { path } => {
            w.u8(tag::MAKE_READ_ONLY);
            w.bytes(path.as_bytes());
        }
        Message::Reseed { entropy, unix_time_ns } => {
            w.u8(tag::RESEED);
            w.bytes(entropy);
            w.u64(*unix_time_ns);
        }
    }
}

/// Decodes one frame body (without the length prefix). Total: never panics; allocation bounded
/// by `body.len()`.
pub fn decode(body: &[u8]) -> Result<Message, DecodeError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(DecodeError::TooLong { len: body.len(), max: MAX_FRAME_LEN });
    }
    let mut r = Reader(body);
    let msg = match r.u8()? {
        tag::HELLO => Message::Hello { version: r.u16()?, agent: r.string()? },
        tag::WELCOME => Message::Welcome { version: r.u16()? },
        tag::EXEC => Message::Exec(r.exec()?),
        tag::STDIN => Message::Stdin(r.bytes()?.to_vec()),
        tag::STDIN_EOF => Message::StdinEof,
        tag::SIGNAL => Message::Signal(r.i32()?),
        tag::STDOUT => Message::Stdout(r.bytes()?.to_vec()),
        tag::STDERR => Message::Stderr(r.bytes()?.to_vec()),
        tag::STARTED => Message::Started { pid: r.u32()? },
        tag::EXEC_FAILED => Message::ExecFailed { errno: r.i32()?, message: r.string()? },
        tag::EXITED => Message::Exited(match r.u8()? {
            0 => ExitStatus::Code(r.i32()?),
            1 => ExitStatus::Signal(r.i32()?),
            _ => return Err(DecodeError::BadValue("exit status kind")),
        }),
        tag::PUT_FILE => Message::PutFile { path: r.string()?, mode: r.u32()?, size: r.u64()? },
        tag::MAKE_DIR => Message::MakeDir { path: r.string()?, mode: r.u32()? },
        tag::GET_PATH => Message::GetPath { path: r.string()? },
        tag::ENTRY => Message::Entry {
            path: r.string()?,
            kind: match r.u8()? {
                0 => EntryKind::File,
                1 => EntryKind::Dir,
                _ => return Err(DecodeError::BadValue("entry kind")),
            },
            mode: r.u32()?,
            size: r.u64()?,
        },
        tag::DATA => Message::Data(r.bytes()?.to_vec()),
        tag::DATA_END => Message::DataEnd,
        tag::DONE => Message::Done,
        tag::ERROR => Message::Error { message: r.string()? },
        tag::SHUTDOWN => Message::Shutdown,
        tag::EXEC_SESSION => {
            let id = r.u64()?;
            let tty = match r.u8()? {
                0 => None,
                1 => Some(r.window()?),
                _ => return Err(DecodeError::BadValue("option")),
            };
            Message::ExecSession { id, tty, exec: r.exec()? }
        }
        tag::RESIZE => Message::Resize(r.window()?),
        tag::WAIT_SESSION => Message::WaitSession { id: r.u64()? },
        tag::SIGNAL_SESSION => Message::SignalSession { id: r.u64()?, signal: r.i32()? },
        tag::PREPARE_SNAPSHOT => Message::PrepareSnapshot,
        tag::MAKE_READ_ONLY => Message::MakeReadOnly { path: r.string()? },
        tag::RESEED => Message::Reseed { entropy: r.bytes()?.to_vec(), unix_time_ns: r.u64()? },
        unknown => return Err(DecodeError::UnknownTag(unknown)),
    };
    match r.0.len() {
        0 => Ok(msg),
        left => Err(DecodeError::TrailingBytes(left)),
    }
}

/// Appends encoded fields to a buffer.
struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// A length or count, as `u32`.
    fn len(&mut self, len: usize) {
        self.u32(u32::try_from(len).expect("protocol field longer than u32::MAX"));
    }

    fn bytes(&mut self, v: &[u8]) {
        self.len(v.len());
        self.0.extend_from_slice(v);
    }

    fn window(&mut self, size: WindowSize) {
        self.u16(size.rows);
        self.u16(size.cols);
    }

    fn exec(&mut self, req: &ExecRequest) {
        self.len(req.argv.len());
        for arg in &req.argv {
            self.bytes(arg.as_bytes());
        }
        self.len(req.env.len());
        for (key, value) in &req.env {
            self.bytes(key.as_bytes());
            self.bytes(value.as_bytes());
        }
        match &req.cwd {
            None => self.u8(0),
            Some(cwd) => {
                self.u8(1);
                self.bytes(cwd.as_bytes());
            }
        }
        self.u32(req.uid);
        self.u32(req.gid);
        self.len(req.groups.len());
        for group in &req.groups {
            self.u32(*group);
        }
        self.u8(u8::from(req.stdin));
        match &req.privileges {
            None => self.u8(0),
            Some(p) => {
                self.u8(1);
                for set in [p.bounding, p.effective, p.permitted, p.inheritable, p.ambient] {
                    self.u64(set);
                }
                self.u8(u8::from(p.no_new_privs));
            }
        }
    }
}

/// Takes fields off the front of a body; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn window(&mut self) -> Result<WindowSize, DecodeError> {
        Ok(WindowSize { rows: self.u16()?, cols: self.u16()? })
    }

    fn exec(&mut self) -> Result<ExecRequest, DecodeError> {
        // Each argument takes at least its 4-byte length, each variable two of them.
        let argc = self.count(4)?;
        let mut argv = Vec::with_capacity(argc);
        for _ in 0..argc {
            argv.push(self.string()?);
        }
        let envc = self.count(8)?;
        let mut env = Vec::with_capacity(envc);
        for _ in 0..envc {
            env.push((self.string()?, self.string()?));
        }
        let cwd = match self.u8()? {
            0 => None,
            1 => Some(self.string()?),
            _ => return Err(DecodeError::BadValue("option")),
        };
        let uid = self.u32()?;
        let gid = self.u32()?;
        let groupc = self.count(4)?;
        if groupc > MAX_GROUPS {
            return Err(DecodeError::TooManyGroups(groupc));
        }
        let mut groups = Vec::with_capacity(groupc);
        for _ in 0..groupc {
            groups.push(self.u32()?);
        }
        let stdin = self.bool()?;
        let privileges = match self.u8()? {
            0 => None,
            1 => Some(Privileges {
                bounding: self.u64()?,
                effective: self.u64()?,
                permitted: self.u64()?,
                inheritable: self.u64()?,
                ambient: self.u64()?,
                no_new_privs: self.bool()?,
            }),
            _ => return Err(DecodeError::BadValue("option")),
        };
        Ok(ExecRequest { argv, env, cwd, uid, gid, groups, stdin, privileges })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.0.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::BadValue("bool")),
        }
    }

    /// A length-prefixed byte string, borrowed from the body (checked before any copy).
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.bytes()?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| DecodeError::BadUtf8)
    }

    /// A list count, refused if the rest of the body cannot hold that many items of at least
    /// `min_item_len` bytes each, so preallocating it is bounded by the body length.
    fn count(&mut self, min_item_len: usize) -> Result<usize, DecodeError> {
        let count = self.u32()? as usize;
        if count.saturating_mul(min_item_len) > self.0.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{encode, samples};

    fn body(msg: &Message) -> Vec<u8> {
        encode(msg)[4..].to_vec()
    }

    #[test]
    fn every_sample_round_trips() {
        for msg in samples::all() {
            assert_eq!(decode(&body(&msg)), Ok(msg));
        }
    }

    #[test]
    fn fields_have_the_documented_layout() {
        let msg = Message::Hello { version: 1, agent: "a".into() };
        assert_eq!(body(&msg), [tag::HELLO, 1, 0, 1, 0, 0, 0, b'a']);
        let msg = Message::Exited(ExitStatus::Signal(9));
        assert_eq!(body(&msg), [tag::EXITED, 1, 9, 0, 0, 0]);
    }

    #[test]
    fn truncated_bodies_are_refused() {
        for msg in samples::all() {
            let body = body(&msg);
            for end in 0..body.len() {
                assert_eq!(
                    decode(&body[..end]),
                    Err(DecodeError::Truncated),
                    "{msg:?} cut at {end}"
                );
            }
        }
    }

    #[test]
    fn unknown_tags_are_refused() {
        assert_eq!(decode(&[0]), Err(DecodeError::UnknownTag(0)));
        assert_eq!(decode(&[28]), Err(DecodeError::UnknownTag(28)));
        assert_eq!(decode(&[255, 1, 2]), Err(DecodeError::UnknownTag(255)));
    }

    #[test]
    fn bad_utf8_is_refused() {
        let body = [tag::GET_PATH, 2, 0, 0, 0, 0xc3, 0x28];
        assert_eq!(decode(&body), Err(DecodeError::BadUtf8));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        assert_eq!(decode(&[tag::DONE, 0, 0]), Err(DecodeError::TrailingBytes(2)));
        let mut long = body(&Message::Started { pid: 1 });
        long.push(0);
        assert_eq!(decode(&long), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn bad_bool_option_and_enum_bytes_are_refused() {
        let exec = Message::Exec(ExecRequest {
            argv: vec![],
            env: vec![],
            cwd: None,
            uid: 0,
            gid: 0,
            groups: vec![],
            stdin: false,
            privileges: None,
        });
        let mut bad_bool = body(&exec);
        let stdin_flag = bad_bool.len() - 2; // the last byte says there are no privileges
        bad_bool[stdin_flag] = 2;
        assert_eq!(decode(&bad_bool), Err(DecodeError::BadValue("bool")));
        let mut bad_option = body(&exec);
        bad_option[9] = 7; // after tag, argc and envc
        assert_eq!(decode(&bad_option), Err(DecodeError::BadValue("option")));
        assert_eq!(
            decode(&[tag::EXITED, 2, 0, 0, 0, 0]),
            Err(DecodeError::BadValue("exit status kind"))
        );
        let entry = [tag::ENTRY, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode(&entry), Err(DecodeError::BadValue("entry kind")));
    }

    #[test]
    fn huge_lengths_and_counts_are_refused_before_allocating() {
        // A 4 GiB string in a 5-byte body.
        assert_eq!(decode(&[tag::DATA, 0xff, 0xff, 0xff, 0xff]), Err(DecodeError::Truncated));
        // 4 G arguments: refused by the count check, not by running out mid-loop.
        let mut exec = vec![tag::EXEC, 0xff, 0xff, 0xff, 0xff];
        exec.extend_from_slice(&[0; 64]);
        assert_eq!(decode(&exec), Err(DecodeError::Truncated));
        // Two env pairs need at least 16 bytes; 15 are there.
        let mut env = vec![tag::EXEC, 0, 0, 0, 0, 2, 0, 0, 0];
        env.extend_from_slice(&[0; 15]);
        assert_eq!(decode(&env), Err(DecodeError::Truncated));
    }

    #[test]
    fn supplementary_groups_are_bounded() {
        let exec = |groups: Vec<u32>| {
            Message::Exec(ExecRequest {
                argv: vec![],
                env: vec![],
                cwd: None,
                uid: 1,
                gid: 2,
                groups,
                stdin: false,
                privileges: None,
            })
        };
        let most = exec((0..MAX_GROUPS as u32).collect());
        assert_eq!(decode(&body(&most)), Ok(most));
        let too_many = body(&exec((0..=MAX_GROUPS as u32).collect()));
        assert_eq!(decode(&too_many), Err(DecodeError::TooManyGroups(MAX_GROUPS + 1)));
        // A huge count in a short body is refused as truncated before any allocation.
        let mut huge = vec![tag::EXEC, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0];
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(decode(&huge), Err(DecodeError::Truncated));
        // Layout: after uid and gid, a u32 count and the ids, the stdin flag, then the
        // privileges' option byte.
        let one = body(&exec(vec![7]));
        assert_eq!(&one[one.len() - 10..], [1, 0, 0, 0, 7, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn oversize_bodies_are_refused() {
        let msg = Message::Data(vec![0; MAX_FRAME_LEN]);
        let body = body(&msg);
        assert_eq!(body.len(), MAX_FRAME_LEN + 5);
        assert_eq!(
            decode(&body),
            Err(DecodeError::TooLong { len: MAX_FRAME_LEN + 5, max: MAX_FRAME_LEN })
        );
        let fits = Message::Data(vec![0; MAX_FRAME_LEN - 5]);
        assert_eq!(decode(&self::body(&fits)), Ok(fits));
    }
}
