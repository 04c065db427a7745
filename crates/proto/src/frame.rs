//! Frames: a little-endian `u32` body length, then the body. Blocking [`read_frame`] and
//! [`write_frame`], and [`FrameBuffer`] for non-blocking readers.

use std::io::{self, ErrorKind, Read, Write};

use crate::codec::{decode, encode_body, DecodeError};
use crate::message::Message;
use crate::MAX_FRAME_LEN;

/// Bytes in the length prefix.
const PREFIX_LEN: usize = 4;

/// Why [`read_frame`] got no message.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The reader failed.
    #[error("reading a frame: {0}")]
    Io(#[from] io::Error),
    /// The frame is too long or its body is not a message.
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    TruncatedFrame,
}

/// Whole frame: `u32` little-endian body length, then the body.
///
/// A body longer than [`MAX_FRAME_LEN`] is still produced (receivers refuse it); senders keep
/// data messages to [`MAX_CHUNK`](crate::MAX_CHUNK) bytes.
///
/// # Panics
///
/// If the body or one of its fields is longer than `u32::MAX` bytes.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut frame = vec![0; PREFIX_LEN];
    encode_body(msg, &mut frame);
    let len = u32::try_from(frame.len() - PREFIX_LEN).expect("frame body longer than u32::MAX");
    frame[..PREFIX_LEN].copy_from_slice(&len.to_le_bytes());
    frame
}

/// Blocking: reads one frame and decodes it. `Ok(None)` on clean EOF at a frame boundary; a
/// length above [`MAX_FRAME_LEN`] is an error before any allocation.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Message>, ReadError> {
    let mut prefix = [0; PREFIX_LEN];
    let mut filled = 0;
    while filled < PREFIX_LEN {
        match r.read(&mut prefix[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(ReadError::TruncatedFrame),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLong { len, max: MAX_FRAME_LEN }.into());
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => ReadError::TruncatedFrame,
        _ => ReadError::Io(e),
    })?;
    Ok(Some(decode(&body)?))
}

/// Writes `msg` as one frame, with a single `write_all`.
pub fn write_frame<W: Write>(w: &mut W, msg: &Message) -> io::Result<()> {
    w.write_all(&encode(msg))
}

/// Incremental decoder for non-blocking readers: [`push`](Self::push) what arrived, then call
/// [`next_message`](Self::next_message) until it returns `Ok(None)`.
///
/// A frame whose body is not a message is consumed and reported, and decoding goes on with the
/// next frame. An oversize length prefix loses the frame boundaries for good: the buffer is
/// emptied, later pushes are dropped and every call returns the same error.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    /// Received bytes; those before `start` are consumed.
    buf: Vec<u8>,
    /// Start of the first unconsumed frame in `buf`.
    start: usize,
    /// The oversize length that stopped this buffer, if one did.
    oversize: Option<usize>,
}

impl FrameBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.oversize.is_some() {
            return;
        }
        // Drop consumed frames once per push rather than once per message.
        self.buf.drain(..self.start);
        self.start = 0;
        self.buf.extend_from_slice(bytes);
    }

    /// Next complete message, if any. An oversize length prefix is an error as soon as the 4
    /// prefix bytes are in, so the buffer never grows beyond [`MAX_FRAME_LEN`] + 4 + one push.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        if let Some(len) = self.oversize {
            return Err(DecodeError::TooLong { len, max: MAX_FRAME_LEN });
        }
        let pending = &self.buf[self.start..];
        let Some((prefix, rest)) = pending.split_first_chunk::<PREFIX_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(*prefix) as usize;
        if len > MAX_FRAME_LEN {
            self.oversize = Some(len);
            self.buf = Vec::new();
            self.start = 0;
            return Err(DecodeError::TooLong { len, max: MAX_FRAME_LEN });
        }
        let Some(body) = rest.get(..len) else {
            return Ok(None);
        };
        let msg = decode(body);
        self.start += PREFIX_LEN + len;
        msg.map(Some)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::samples;

    fn stream() -> Vec<u8> {
        samples::all().iter().flat_map(encode).collect()
    }

    /// Yields `data`, then fails the test if anyone reads on.
    struct ReadOnce<'a>(Option<&'a [u8]>);

    impl Read for ReadOnce<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let data = self.0.take().expect("read past the length prefix");
            out[..data.len()].copy_from_slice(data);
            Ok(data.len())
        }
    }

    #[test]
    fn frames_round_trip_through_read_and_write() {
        let mut wire = Vec::new();
        for msg in samples::all() {
            write_frame(&mut wire, &msg).unwrap();
        }
        assert_eq!(wire, stream());
        let mut r = wire.as_slice();
        for msg in samples::all() {
            assert_eq!(read_frame(&mut r).unwrap(), Some(msg));
        }
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn clean_eof_is_none() {
        assert!(read_frame(&mut io::empty()).unwrap().is_none());
    }

    #[test]
    fn eof_inside_a_frame_is_truncated_frame() {
        let frame = encode(&Message::Error { message: "boom".into() });
        for end in 1..frame.len() {
            let err = read_frame(&mut &frame[..end]).unwrap_err();
            assert!(matches!(err, ReadError::TruncatedFrame), "cut at {end}: {err:?}");
        }
    }

    #[test]
    fn read_frame_refuses_oversize_prefix_before_reading_the_body() {
        for len in [MAX_FRAME_LEN as u32 + 1, u32::MAX] {
            let prefix = len.to_le_bytes();
            let err = read_frame(&mut ReadOnce(Some(&prefix))).unwrap_err();
            assert!(matches!(
                err,
                ReadError::Decode(DecodeError::TooLong { len: l, max: MAX_FRAME_LEN }) if l == len as usize
            ));
        }
    }

    #[test]
    fn read_frame_reports_bad_bodies() {
        let err = read_frame(&mut [1, 0, 0, 0, 99].as_slice()).unwrap_err();
        assert!(matches!(err, ReadError::Decode(DecodeError::UnknownTag(99))));
    }

    #[test]
    fn frame_buffer_takes_bytes_one_at_a_time() {
        let mut fb = FrameBuffer::new();
        let mut got = Vec::new();
        for byte in stream() {
            fb.push(&[byte]);
            while let Some(msg) = fb.next_message().unwrap() {
                got.push(msg);
            }
        }
        assert_eq!(got, samples::all());
        assert!(fb.next_message().unwrap().is_none());
    }

    #[test]
    fn frame_buffer_takes_many_frames_at_once() {
        let mut fb = FrameBuffer::new();
        fb.push(&stream());
        for msg in samples::all() {
            assert_eq!(fb.next_message(), Ok(Some(msg)));
        }
        assert_eq!(fb.next_message(), Ok(None));
        fb.push(&[]);
        assert!(fb.buf.is_empty());
    }

    #[test]
    fn frame_buffer_refuses_oversize_prefix_at_once() {
        let mut fb = FrameBuffer::new();
        fb.push(&[0xff, 0xff, 0xff]);
        assert_eq!(fb.next_message(), Ok(None));
        fb.push(&[0xff]);
        let too_long = DecodeError::TooLong { len: u32::MAX as usize, max: MAX_FRAME_LEN };
        assert_eq!(fb.next_message(), Err(too_long.clone()));
        // Poisoned: nothing more is kept or decoded.
        fb.push(&encode(&Message::Done));
        assert_eq!(fb.buf.capacity(), 0);
        assert_eq!(fb.next_message(), Err(too_long));
    }

    #[test]
    fn frame_buffer_skips_a_bad_body_and_goes_on() {
        let mut fb = FrameBuffer::new();
        fb.push(&[1, 0, 0, 0, 99]);
        fb.push(&encode(&Message::Done));
        assert_eq!(fb.next_message(), Err(DecodeError::UnknownTag(99)));
        assert_eq!(fb.next_message(), Ok(Some(Message::Done)));
        assert_eq!(fb.next_message(), Ok(None));
    }

    #[test]
    fn frame_buffer_holds_a_maximal_frame() {
        let msg = Message::Data(vec![1; MAX_FRAME_LEN - 5]);
        let frame = encode(&msg);
        assert_eq!(frame.len(), MAX_FRAME_LEN + PREFIX_LEN);
        let mut fb = FrameBuffer::new();
        for piece in frame.chunks(crate::MAX_CHUNK) {
            assert_eq!(fb.next_message(), Ok(None));
            fb.push(piece);
        }
        assert_eq!(fb.next_message(), Ok(Some(msg)));
    }
}
