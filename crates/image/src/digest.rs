//! Content digests (`sha256:<64 hex>`, the only algorithm accepted) and a reader that checks
//! one while the bytes stream through it.

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

/// A validated `sha256:` digest.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

/// Why a string is not a digest we accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a sha256 digest (expected sha256: and 64 lowercase hex digits)")]
pub struct BadDigest(pub String);

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Self, BadDigest> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| BadDigest(s.to_owned()))?;
        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadDigest(s.to_owned()))
        }
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// The 64 hex digits, safe as a file name.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, as `docker images` shows an id.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = BadDigest;
    fn try_from(s: String) -> Result<Self, BadDigest> {
        Self::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

/// Hashes and counts bytes as they are read, and refuses to read past the expected size, so a
/// blob longer than its descriptor says is cut off rather than read to the end.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    expected_size: u64,
}

impl<R: Read> VerifyingReader<R> {
    /// Wraps `inner`, which should hold exactly `expected_size` bytes.
    pub fn new(inner: R, expected_size: u64) -> Self {
        Self { inner, hasher: Sha256::new(), read: 0, expected_size }
    }

    /// Reads whatever is left (which must be nothing beyond the size) and checks size and
    /// digest. `what` names the blob in the error.
    pub fn finish(mut self, expected: &Digest, what: &str) -> Result<(), String> {
        let mut sink = [0u8; 8192];
        loop {
            match self.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(format!("{what}: {e}")),
            }
        }
        let mut probe = [0u8; 1];
        if self.inner.read(&mut probe).map_err(|e| format!("{what}: {e}"))? != 0 {
            return Err(format!(
                "{what} is longer than the {} bytes its descriptor says",
                self.expected_size
            ));
        }
        if self.read != self.expected_size {
            return Err(format!(
                "{what} is truncated: {} of {} bytes",
                self.read, self.expected_size
            ));
        }
        let actual = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        if actual != expected.as_str() {
            return Err(format!(
                "{what} does not match its digest: expected {expected}, got {actual}"
            ));
        }
        Ok(())
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.expected_size - self.read;
        if left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Incremental hashing for blobs that arrive in chunks (a registry download).
#[derive(Default)]
pub struct Hasher {
    hasher: Sha256,
    len: u64,
}

impl Hasher {
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before any byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything added.
    pub fn finish(self) -> Digest {
        Digest(format!("sha256:{}", hex::encode(self.hasher.finalize())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_sha256() {
        let d = Digest::of(b"x");
        assert_eq!(Digest::parse(d.as_str()), Ok(d.clone()));
        assert!(Digest::parse("sha512:00").is_err());
        assert!(Digest::parse(&d.as_str().to_uppercase()).is_err());
        assert!(Digest::parse(&format!("{}/..", d.as_str())).is_err());
    }

    #[test]
    fn verifying_reader_catches_every_kind_of_lie() {
        let d = Digest::of(b"hello");
        let ok = VerifyingReader::new(&b"hello"[..], 5);
        assert_eq!(ok.finish(&d, "blob"), Ok(()));
        let short = VerifyingReader::new(&b"hell"[..], 5);
        assert!(short.finish(&d, "blob").expect_err("must fail").contains("truncated"));
        let long = VerifyingReader::new(&b"hello!"[..], 5);
        assert!(long.finish(&d, "blob").expect_err("must fail").contains("longer"));
        let wrong = VerifyingReader::new(&b"jello"[..], 5);
        assert!(wrong.finish(&d, "blob").expect_err("must fail").contains("does not match"));
    }
}
