//! The protocol between the host and the agent inside a cell.
//!
//! The agent connects to the host over vsock ([`AGENT_PORT`]) and the two sides exchange
//! [`Message`]s. Each message travels as one frame: a little-endian `u32` body length, then the
//! body (a tag byte and the fields in order, see [`codec`]). Decoding is total: any input gives
//! a message or a [`DecodeError`], never a panic, and allocation is bounded by the input length.

pub mod codec;
pub mod frame;
pub mod message;
pub mod net;

pub use codec::{decode, DecodeError};
pub use frame::{encode, read_frame, write_frame, FrameBuffer, ReadError};
pub use message::{EntryKind, ExecRequest, ExitStatus, Message, Privileges, WindowSize};

/// Version of this protocol, exchanged in `Hello` and `Welcome`. 2: `ExecRequest::groups`.
/// 3: sessions (`ExecSession`, `Resize`, `WaitSession`, `SignalSession`) on [`SESSION_PORT`].
/// 4: snapshots (`PrepareSnapshot`, `Reseed`). 5: `ExecRequest::privileges`, `MakeReadOnly`.
/// 6: a restored copy keeps the saved cell's connection (no new `Hello`; `Reseed` first).
pub const PROTOCOL_VERSION: u16 = 6;
/// Largest frame body accepted (bytes after the 4-byte length prefix).
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// Largest data chunk senders put in one Stdout/Stderr/Stdin/Data message.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Most supplementary groups an `Exec` may carry (Linux allows 65536; images need a handful).
pub const MAX_GROUPS: usize = 256;
/// vsock port on the host (CID 2) the agent connects to when it is ready.
pub const AGENT_PORT: u32 = 1024;
/// vsock port in the cell on which the agent accepts session connections from the host: each
/// starts with `ExecSession`, `WaitSession`, `SignalSession` or a file operation.
pub const SESSION_PORT: u32 = 1025;

/// Entry point shared by the cargo-fuzz target and the property tests: decodes arbitrary bytes
/// both as a body and as a frame stream. It must never panic; it asserts what must hold instead:
/// the encoding is canonical (a body that decodes re-encodes to the same bytes), and
/// [`FrameBuffer`] (fed at once or byte by byte) and [`read_frame`] agree on the stream.
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(msg) = decode(data) {
        assert_eq!(&encode(&msg)[4..], data, "decoded body does not re-encode to itself");
    }

    let whole = drain(FrameBuffer::new(), [data]);
    let bytewise = drain(FrameBuffer::new(), data.chunks(1));
    assert_eq!(whole, bytewise, "FrameBuffer depends on how the input is split");

    let mut reader = data;
    let mut read = Vec::new();
    while let Ok(Some(msg)) = read_frame(&mut reader) {
        read.push(msg);
    }
    assert_eq!(whole, read, "FrameBuffer and read_frame disagree");
}

/// Messages `buf` yields from `pieces`, up to its first error or the end of the input.
fn drain<'a>(mut buf: FrameBuffer, pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<Message> {
    let mut out = Vec::new();
    for piece in pieces {
        buf.push(piece);
        loop {
            match buf.next_message() {
                Ok(Some(msg)) => out.push(msg),
                Ok(None) => break,
                Err(_) => return out,
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod samples {
    use crate::{
        EntryKind, ExecRequest, ExitStatus, Message, Privileges, WindowSize, PROTOCOL_VERSION,
    };

    /// One or more values of every message, with empty, non-ASCII and extreme fields.
    pub fn all() -> Vec<Message> {
        vec![
            Message::Hello { version: PROTOCOL_VERSION, agent: "isocell-agent 0.1.0".into() },
            Message::Welcome { version: u16::MAX },
            Message::Exec(ExecRequest {
                argv: vec!["/bin/sh".into(), "-c".into(), "echo hé".into()],
                env: vec![("PATH".into(), "/bin".into()), (String::new(), String::new())],
                cwd: Some("/work".into()),
                uid: 1000,
                gid: u32::MAX,
                groups: vec![1000, 0, u32::MAX],
                stdin: true,
                privileges: Some(Privileges {
                    bounding: u64::MAX,
                    effective: 1 << 21,
                    permitted: 0,
                    inheritable: 5,
                    ambient: 1 << 63,
                    no_new_privs: true,
                }),
            }),
            Message::Exec(ExecRequest {
                argv: vec![],
                env: vec![],
                cwd: None,
                uid: 0,
                gid: 0,
                groups: vec![],
                stdin: false,
                privileges: None,
            }),
            Message::Stdin(b"input\n".to_vec()),
            Message::StdinEof,
            Message::Signal(-9),
            Message::Stdout(vec![0, 255, 10]),
            Message::Stderr(vec![]),
            Message::Started { pid: 42 },
            Message::ExecFailed { errno: 2, message: "No such file or directory".into() },
            Message::Exited(ExitStatus::Code(i32::MIN)),
            Message::Exited(ExitStatus::Signal(15)),
            Message::PutFile { path: "/tmp/a".into(), mode: 0o644, size: u64::MAX },
            Message::MakeDir { path: "/tmp/d".into(), mode: 0o755 },
            Message::GetPath { path: "/etc".into() },
            Message::MakeReadOnly { path: "/config".into() },
            Message::Entry {
                path: "/etc/hosts".into(),
                kind: EntryKind::File,
                mode: 0o644,
                size: 9,
            },
            Message::Entry { path: "/etc".into(), kind: EntryKind::Dir, mode: 0o755, size: 0 },
            Message::Data(vec![7; 1000]),
            Message::DataEnd,
            Message::Done,
            Message::Error { message: "✗ failed".into() },
            Message::Shutdown,
            Message::ExecSession {
                id: u64::MAX,
                tty: Some(WindowSize { rows: 24, cols: 80 }),
                exec: ExecRequest {
                    argv: vec!["sh".into()],
                    env: vec![],
                    cwd: None,
                    uid: 0,
                    gid: 0,
                    groups: vec![],
                    stdin: true,
                    privileges: None,
                },
            },
            Message::ExecSession {
                id: 0,
                tty: None,
                exec: ExecRequest {
                    argv: vec![],
                    env: vec![],
                    cwd: Some(String::new()),
                    uid: 1,
                    gid: 2,
                    groups: vec![3],
                    stdin: false,
                    privileges: None,
                },
            },
            Message::Resize(WindowSize { rows: 0, cols: u16::MAX }),
            Message::WaitSession { id: 7 },
            Message::SignalSession { id: 7, signal: i32::MIN },
            Message::PrepareSnapshot,
            Message::Reseed { entropy: vec![9; 64], unix_time_ns: u64::MAX },
        ]
    }
}
