//! The host's audit log: append-only, hash-chained, with signed heads and signed checkpoints.
//!
//! A log lives in one directory:
//!
//! * `audit.log`: one entry per line, each the canonical JSON of
//!   `{"cell","data","hash","kind","prev","seq","ts_ms"}`. `seq` counts from 0 without gaps,
//!   `prev` is the `hash` of the entry before (64 zeros for the first) and `hash` is the SHA-256
//!   of the entry's canonical JSON without its `hash` field. Editing, removing, inserting or
//!   reordering entries therefore breaks the chain.
//! * `audit.head`: the signed head, `{"hash","public_key","seq","signature"}`, naming the last
//!   entry. It is the anchor that makes truncation of the log detectable.
//! * `audit.head.pending`: the signed head of an entry being appended, present only while an
//!   append is under way or after a writer died in one.
//!
//! Every append holds an exclusive `flock` on `audit.log` and goes through three durable steps:
//! the signed head of the new entry is written to `audit.head.pending`, the entry is written with
//! one positioned write and synced, and the pending head is renamed over `audit.head`. A writer
//! that dies at any point leaves a log that [`verify`] accepts: the last entry matches either the
//! head or the pending head, and the bytes of a half-written line are a torn tail. The next writer
//! records such a tail in a `recovered_torn_tail` entry before its own, so the chain stays whole
//! and the tear stays on record.
//!
//! Entries of kind `checkpoint` carry a signature over the seq and hash of the entry before them,
//! so the signed history survives in the log itself, not only in the head.
//!
//! The signed head only proves that the log is as its last writer left it; whoever can delete
//! or replace files can delete both (a wiped log) or put back an older head over a truncated log
//! (a rollback), and both verify on their own. Rollback is caught by evidence kept elsewhere:
//! [`verify_expecting`] checks the log against [`Expectations`] — positions that signed
//! documents (receipts, a signed checkpoint an auditor kept from [`AuditLog::signed_checkpoint`])
//! name, a genesis entry the host wrote when it was set up, and other signs that a log existed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::canonical::{sha256_hex, to_canonical_string};

/// The file of entries, one canonical JSON line each.
pub const LOG_FILE: &str = "audit.log";
/// The signed head: seq and hash of the last entry.
pub const HEAD_FILE: &str = "audit.head";
/// The signed head of an entry being appended.
pub const PENDING_FILE: &str = "audit.head.pending";
/// The `prev` of the first entry.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The kind of a signed checkpoint entry.
pub const KIND_CHECKPOINT: &str = "checkpoint";
/// The kind of the entry that records the torn tail a dead writer left behind.
pub const KIND_RECOVERED: &str = "recovered_torn_tail";
/// The kind of the first entry of a host's log, written by [`AuditLog::genesis`] when the host is
/// set up. It may only be entry 0.
pub const KIND_GENESIS: &str = "genesis";

/// The fields of an entry, sorted.
const ENTRY_KEYS: [&str; 7] = ["cell", "data", "hash", "kind", "prev", "seq", "ts_ms"];
/// The fields of a head, sorted.
const HEAD_KEYS: [&str; 4] = ["hash", "public_key", "seq", "signature"];
/// The fields of a checkpoint's data, sorted.
const CHECKPOINT_KEYS: [&str; 4] = ["head_hash", "head_seq", "public_key", "signature"];

/// Why the audit log could not be opened or extended.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "lock", "write", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The last complete line of the log is not a valid entry, so the chain cannot be extended.
    #[error(
        "the last entry of {} is not valid ({reason}); refusing to extend the chain, \
         run `isocell audit verify`",
        path.display()
    )]
    CorruptTail {
        /// The log file.
        path: PathBuf,
        /// What is wrong with the entry.
        reason: String,
    },
    /// A checkpoint was asked for on a log without entries.
    #[error("{} has no entry to checkpoint", path.display())]
    Empty {
        /// The log file.
        path: PathBuf,
    },
    /// A caller tried to append an entry of a kind only the log itself writes.
    #[error("the entry kind {0:?} is reserved for the audit log itself")]
    ReservedKind(String),
    /// A public key in hex did not decode.
    #[error("bad Ed25519 public key: {0}")]
    BadKey(String),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AuditError + 'a {
    move |source| AuditError::Io { action, path: path.to_path_buf(), source }
}

/// A writer of one audit log directory. Cheap to open; any number of instances, in any number
/// of threads or processes, may append to the same directory.
pub struct AuditLog {
    dir: PathBuf,
    key: SigningKey,
}

impl AuditLog {
    /// Opens the audit log in `dir`, creating the directory (mode 0700) if it is missing.
    /// Entries and heads are signed with `key`.
    pub fn open(dir: &Path, key: SigningKey) -> Result<Self, AuditError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create", dir))?;
        Ok(Self { dir: dir.to_path_buf(), key })
    }

    /// Appends one entry and returns its `(seq, hash)`. Holds an exclusive `flock` on the log for
    /// the whole read-tail, append, fsync and head update, so concurrent writers are safe. A torn
    /// tail left by a dead writer is first recorded in a `recovered_torn_tail` entry.
    pub fn append(
        &self,
        kind: &str,
        cell: Option<&str>,
        data: Value,
    ) -> Result<(u64, String), AuditError> {
        if kind == KIND_CHECKPOINT || kind == KIND_RECOVERED || kind == KIND_GENESIS {
            return Err(AuditError::ReservedKind(kind.to_owned()));
        }
        self.with_writer(|w| w.commit(kind, cell, data))
    }

    /// Writes the genesis entry (seq 0) if the log has no entry yet and returns its
    /// `(seq, hash)`; on a log that has entries, writes nothing and returns `None`.
    pub fn genesis(&self, data: Value) -> Result<Option<(u64, String)>, AuditError> {
        self.with_writer(|w| match w.last {
            None => w.commit(KIND_GENESIS, None, data).map(Some),
            Some(_) => Ok(None),
        })
    }

    /// Appends a signed checkpoint entry (as [`AuditLog::checkpoint`]) and returns the signed
    /// head that names it, in the form of `audit.head`: canonical JSON of
    /// `{"hash","public_key","seq","signature"}` and a newline. An auditor who keeps this text
    /// off the host can later check with [`parse_checkpoint`] and [`verify_expecting`] that the
    /// log still extends it.
    pub fn signed_checkpoint(&self) -> Result<String, AuditError> {
        let (seq, hash) = self.checkpoint()?;
        Ok(signed_head_text(&self.key, seq, &hash))
    }

    /// Appends a signed checkpoint entry covering the current last entry; returns its
    /// `(seq, hash)`.
    pub fn checkpoint(&self) -> Result<(u64, String), AuditError> {
        self.with_writer(|w| {
            let last = w.last.clone().ok_or_else(|| AuditError::Empty { path: self.log_path() })?;
            let body = json!({"head_hash": last.hash, "head_seq": last.seq});
            let data = json!({
                "head_seq": last.seq,
                "head_hash": last.hash,
                "signature": sign_hex(&self.key, &body),
                "public_key": verifying_key_hex(&self.key.verifying_key()),
            });
            w.commit(KIND_CHECKPOINT, None, data)
        })
    }

    /// The path of `audit.log`.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// The path of `audit.head`.
    pub fn head_path(&self) -> PathBuf {
        self.dir.join(HEAD_FILE)
    }

    fn pending_path(&self) -> PathBuf {
        self.dir.join(PENDING_FILE)
    }

    /// Locks the log, reads its tail, records a torn tail if there is one, then runs `f`.
    /// The lock is released when the file is dropped, after `f` has updated the head.
    fn with_writer<T>(
        &self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        let path = self.log_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let file = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_err("lock", &path)(errno.into()))?;
        let tail = read_tail(&file).map_err(io_err("read", &path))?;
        let last = match tail.last_line {
            None => None,
            Some(line) => {
                let entry = parse_entry(&line).map_err(|(_, reason)| AuditError::CorruptTail {
                    path: path.clone(),
                    reason,
                })?;
                Some(Head { seq: entry.seq, hash: entry.hash })
            }
        };
        let mut writer = Writer { log: self, file: &file, end: tail.end, len: tail.len, last };
        if tail.len > tail.end {
            let mut torn = vec![0; (tail.len - tail.end) as usize];
            file.read_exact_at(&mut torn, tail.end).map_err(io_err("read", &path))?;
            let data = json!({
                "offset": tail.end,
                "len": tail.len - tail.end,
                "sha256": sha256_hex(&torn),
            });
            writer.commit(KIND_RECOVERED, None, data)?;
        }
        f(&mut writer)
    }
}

/// The seq and hash of an entry, as a head names them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    seq: u64,
    hash: String,
}

/// One locked append session.
struct Writer<'a> {
    log: &'a AuditLog,
    file: &'a File,
    /// Where the complete lines end: the next entry goes here.
    end: u64,
    /// The file's length (more than `end` while a torn tail is still there).
    len: u64,
    /// The last complete entry.
    last: Option<Head>,
}

impl Writer<'_> {
    /// Writes one entry after the last one: pending head, entry, head.
    fn commit(
        &mut self,
        kind: &str,
        cell: Option<&str>,
        data: Value,
    ) -> Result<(u64, String), AuditError> {
        let log_path = self.log.log_path();
        let (seq, prev) = match &self.last {
            None => (0, GENESIS_PREV.to_owned()),
            Some(h) => {
                let seq = h.seq.checked_add(1).ok_or_else(|| AuditError::CorruptTail {
                    path: log_path.clone(),
                    reason: "its seq is at the maximum".to_owned(),
                })?;
                (seq, h.hash.clone())
            }
        };
        let mut entry = json!({
            "seq": seq,
            "ts_ms": now_ms(),
            "kind": kind,
            "cell": cell,
            "data": data,
            "prev": prev,
        });
        let hash = sha256_hex(to_canonical_string(&entry).as_bytes());
        entry["hash"] = Value::String(hash.clone());
        let mut line = to_canonical_string(&entry);
        line.push('\n');

        // 1. The signed head of the new entry, durable before the entry is.
        let pending = self.log.pending_path();
        let head_text = signed_head_text(&self.log.key, seq, &hash);
        write_synced(&pending, head_text.as_bytes())?;
        sync_dir(&self.log.dir)?;

        // 2. The entry, in one write; a torn tail beyond it is cut off.
        self.file.write_all_at(line.as_bytes(), self.end).map_err(io_err("write", &log_path))?;
        let end = self.end + line.len() as u64;
        if self.len > end {
            self.file.set_len(end).map_err(io_err("truncate", &log_path))?;
        }
        self.file.sync_data().map_err(io_err("sync", &log_path))?;

        // 3. The pending head becomes the head.
        let head = self.log.head_path();
        fs::rename(&pending, &head).map_err(io_err("replace", &head))?;
        sync_dir(&self.log.dir)?;

        self.end = end;
        self.len = end;
        self.last = Some(Head { seq, hash: hash.clone() });
        Ok((seq, hash))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AuditError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))?;
    file.write_all_at(bytes, 0).map_err(io_err("write", path))?;
    file.sync_all().map_err(io_err("sync", path))
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync", dir))
}

/// The end of a log file: where its complete lines end, its length, and its last complete line.
struct Tail {
    end: u64,
    len: u64,
    last_line: Option<Vec<u8>>,
}

/// Reads backwards from the end of `file` until the last complete line is found.
fn read_tail(file: &File) -> io::Result<Tail> {
    const CHUNK: u64 = 8192;
    let len = file.metadata()?.len();
    // `buf` holds the bytes from `start` to the end of the file.
    let mut buf: Vec<u8> = Vec::new();
    let mut start = len;
    loop {
        if let Some(last_nl) = buf.iter().rposition(|&b| b == b'\n') {
            let line_start = buf[..last_nl].iter().rposition(|&b| b == b'\n');
            if line_start.is_some() || start == 0 {
                let from = line_start.map_or(0, |p| p + 1);
                return Ok(Tail {
                    end: start + last_nl as u64 + 1,
                    len,
                    last_line: Some(buf[from..last_nl].to_vec()),
                });
            }
        } else if start == 0 {
            return Ok(Tail { end: 0, len, last_line: None });
        }
        let n = CHUNK.min(start);
        start -= n;
        let mut chunk = vec![0; n as usize];
        file.read_exact_at(&mut chunk, start)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
    }
}

/// The lowercase hex of an Ed25519 public key, as heads and checkpoints carry it.
pub fn verifying_key_hex(key: &VerifyingKey) -> String {
    hex::encode(key.to_bytes())
}

/// Parses the lowercase hex of an Ed25519 public key (64 hex digits).
pub fn verifying_key_from_hex(text: &str) -> Result<VerifyingKey, AuditError> {
    let bytes = lower_hex::<32>(text.trim())
        .ok_or_else(|| AuditError::BadKey("expected 64 lowercase hex digits".to_owned()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| AuditError::BadKey(e.to_string()))
}

/// Decodes exactly `N` bytes from lowercase hex; anything else (uppercase included) is `None`,
/// so that one value has one spelling.
fn lower_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    (hex::encode(out) == text).then_some(out)
}

fn sign_hex(key: &SigningKey, body: &Value) -> String {
    hex::encode(key.sign(to_canonical_string(body).as_bytes()).to_bytes())
}

fn check_signature(key: &VerifyingKey, body: &Value, signature: &str) -> Result<(), String> {
    let bytes =
        lower_hex::<64>(signature).ok_or("the signature is not 64 bytes of lowercase hex")?;
    key.verify_strict(to_canonical_string(body).as_bytes(), &Signature::from_bytes(&bytes))
        .map_err(|_| "the signature does not verify".to_owned())
}

/// The text of `audit.head` for the entry `(seq, hash)`: canonical JSON and a newline.
fn signed_head_text(key: &SigningKey, seq: u64, hash: &str) -> String {
    let body = json!({"hash": hash, "seq": seq});
    let head = json!({
        "seq": seq,
        "hash": hash,
        "signature": sign_hex(key, &body),
        "public_key": verifying_key_hex(&key.verifying_key()),
    });
    to_canonical_string(&head) + "\n"
}

/// `v` as an object with exactly the fields `keys` (sorted).
fn exact_object<'a>(v: &'a Value, keys: &[&str]) -> Result<&'a Map<String, Value>, String> {
    let map = v.as_object().ok_or("not a JSON object")?;
    let mut have: Vec<&str> = map.keys().map(String::as_str).collect();
    have.sort_unstable();
    if have != keys {
        return Err(format!("has the fields {have:?}, expected {keys:?}"));
    }
    Ok(map)
}

/// Parses and checks a head file against `key`: a signed checkpoint, in canonical form.
fn parse_head(bytes: &[u8], key: &VerifyingKey) -> Result<Head, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8")?;
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    exact_object(&v, &HEAD_KEYS)?;
    if to_canonical_string(&v) + "\n" != text {
        return Err("not in canonical form".to_owned());
    }
    let Checkpoint { seq, hash } = parse_checkpoint(bytes, key)?;
    Ok(Head { seq, hash })
}

/// The position a signed checkpoint names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    /// The seq of the entry.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

/// Parses a signed checkpoint (the text of [`AuditLog::signed_checkpoint`], or a copy of
/// `audit.head`; any JSON formatting) and checks its signature against `key`.
pub fn parse_checkpoint(bytes: &[u8], key: &VerifyingKey) -> Result<Checkpoint, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let map = exact_object(&v, &HEAD_KEYS)?;
    let (Some(seq), Some(hash), Some(public_key), Some(signature)) = (
        map["seq"].as_u64(),
        map["hash"].as_str(),
        map["public_key"].as_str(),
        map["signature"].as_str(),
    ) else {
        return Err("a field has the wrong type".to_owned());
    };
    if public_key != verifying_key_hex(key) {
        return Err(format!("signed by another key ({public_key})"));
    }
    check_signature(key, &json!({"hash": hash, "seq": seq}), signature)?;
    Ok(Checkpoint { seq, hash: hash.to_owned() })
}

/// An entry whose form and own hash have been checked (not yet its place in the chain).
struct Entry {
    seq: u64,
    kind: String,
    prev: String,
    hash: String,
    data: Value,
}

/// Parses one line (without its newline) and checks its form and hash. The error carries the
/// entry's seq when it could be read.
fn parse_entry(line: &[u8]) -> Result<Entry, (Option<u64>, String)> {
    let text = std::str::from_utf8(line).map_err(|_| (None, "not UTF-8".to_owned()))?;
    let v: Value = serde_json::from_str(text).map_err(|e| (None, format!("not JSON: {e}")))?;
    let seq = v.get("seq").and_then(Value::as_u64);
    let fail = |reason: String| (seq, reason);
    let map = exact_object(&v, &ENTRY_KEYS).map_err(fail)?;
    if to_canonical_string(&v) != text {
        return Err(fail("not in canonical form".to_owned()));
    }
    let (Some(seq), Some(_), Some(kind), Some(prev), Some(hash), true) = (
        map["seq"].as_u64(),
        map["ts_ms"].as_u64(),
        map["kind"].as_str(),
        map["prev"].as_str(),
        map["hash"].as_str(),
        map["cell"].is_null() || map["cell"].is_string(),
    ) else {
        return Err(fail("a field has the wrong type".to_owned()));
    };
    let mut body = map.clone();
    body.remove("hash");
    if sha256_hex(to_canonical_string(&Value::Object(body)).as_bytes()) != hash {
        return Err(fail("the hash does not match the entry's content".to_owned()));
    }
    Ok(Entry {
        seq,
        kind: kind.to_owned(),
        prev: prev.to_owned(),
        hash: hash.to_owned(),
        data: map["data"].clone(),
    })
}

/// Checks a checkpoint's data: it covers `prev` and is signed by `key`.
fn check_checkpoint(data: &Value, prev: Option<&Head>, key: &VerifyingKey) -> Result<(), String> {
    let prev = prev.ok_or("a checkpoint cannot be the first entry")?;
    let map = exact_object(data, &CHECKPOINT_KEYS).map_err(|e| format!("checkpoint data {e}"))?;
    let (Some(head_seq), Some(head_hash), Some(public_key), Some(signature)) = (
        map["head_seq"].as_u64(),
        map["head_hash"].as_str(),
        map["public_key"].as_str(),
        map["signature"].as_str(),
    ) else {
        return Err("checkpoint data has a field of the wrong type".to_owned());
    };
    if head_seq != prev.seq || head_hash != prev.hash {
        return Err(format!(
            "the checkpoint covers seq {head_seq}, not the entry before it (seq {})",
            prev.seq
        ));
    }
    if public_key != verifying_key_hex(key) {
        return Err(format!("checkpoint signed by another key ({public_key})"));
    }
    let body = json!({"head_hash": head_hash, "head_seq": head_seq});
    check_signature(key, &body, signature).map_err(|e| format!("checkpoint: {e}"))
}

/// The result of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Entries whose form, hash and place in the chain were verified (those before `problem`).
    pub entries: u64,
    /// Checkpoint entries among them, each with a verified signature.
    pub checkpoints: u64,
    /// Positions named from outside the log ([`Expectations::anchors`]: receipts, a kept
    /// checkpoint) that were found in it with the named hash.
    pub anchors: u64,
    /// Bytes after the last newline: a writer died in the middle of an entry. Not a problem by
    /// itself; the next append records it.
    pub torn_tail: Option<TornTail>,
    /// The last entry is anchored by `audit.head.pending`, not `audit.head`: a writer died after
    /// writing its entry and before promoting the head. Not a problem by itself.
    pub pending_head: bool,
    /// The first thing wrong, if any.
    pub problem: Option<Problem>,
}

impl Report {
    /// Whether the log verified: no problem was found.
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// Bytes after the last complete line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TornTail {
    /// Where the torn bytes start.
    pub offset: u64,
    /// How many there are.
    pub len: u64,
}

/// The first thing wrong with an audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The 1-based line of the entry at fault (for a missing entry, the line where it should be);
    /// 0 when the fault is in `audit.head` or the files cannot be read.
    pub line: u64,
    /// The seq of that entry, when known.
    pub seq: Option<u64>,
    /// The byte offset of that line in `audit.log`.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            return f.write_str(&self.reason);
        }
        write!(f, "line {}", self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, " at byte {}: {}", self.offset, self.reason)
    }
}

fn file_problem(reason: String) -> Problem {
    Problem { line: 0, seq: None, offset: 0, reason }
}

/// The log, head and pending head, read under a shared lock so no append is half seen.
struct Snapshot {
    log: Vec<u8>,
    head: Option<Vec<u8>>,
    pending: Option<Vec<u8>>,
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, AuditError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

fn read_snapshot(dir: &Path) -> Result<Snapshot, AuditError> {
    let path = dir.join(LOG_FILE);
    let lock = match File::open(&path) {
        Ok(file) => Some(
            Flock::lock(file, FlockArg::LockShared)
                .map_err(|(_, errno)| io_err("lock", &path)(errno.into()))?,
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("open", &path)(e)),
    };
    let mut log = Vec::new();
    if let Some(file) = &lock {
        let mut file: &File = file;
        file.read_to_end(&mut log).map_err(io_err("read", &path))?;
    }
    let head = read_optional(&dir.join(HEAD_FILE))?;
    let pending = read_optional(&dir.join(PENDING_FILE))?;
    drop(lock);
    Ok(Snapshot { log, head, pending })
}

/// The complete, parseable lines of the log in `dir`, for display (a missing log has none).
/// Lines that do not parse and a torn tail are left out; [`verify`] reports them.
pub fn read_entries(dir: &Path) -> Result<Vec<Value>, AuditError> {
    let log = read_snapshot(dir)?.log;
    let complete = log.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    Ok(log[..complete]
        .split_inclusive(|&b| b == b'\n')
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect())
}

/// Verifies the log in `dir` against `public_key`: every entry's form, hash and place in the
/// chain, every checkpoint's signature, and the signed head against the last entry. Stops at
/// the first problem.
///
/// A log verifies on its own even after it was wiped (no files at all) or rolled back (an older
/// head put back over a truncated log); [`verify_expecting`] also checks it against evidence kept
/// elsewhere.
pub fn verify(dir: &Path, public_key: &VerifyingKey) -> Report {
    verify_expecting(dir, public_key, &Expectations::default())
}

/// A position in the log that a signed document names: the entry with this seq must be in the
/// log and have this hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// What names it, for the report ("receipt /var/lib/isocell/cells/ID/launch.json").
    pub source: String,
    /// The entry's seq.
    pub seq: u64,
    /// The entry's hash.
    pub hash: String,
}

/// What is known about the log from outside it, for [`verify_expecting`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectations {
    /// Entry 0 must be a genesis entry, for the reason given (a host writes its genesis entry
    /// before its profile, so a host with a profile has one).
    pub genesis: Option<String>,
    /// Signs that a log existed here (cell records, a profile), each said in words: the log must
    /// not be empty.
    pub existed: Vec<String>,
    /// Positions that signed documents name: each must be in the log with the named hash.
    pub anchors: Vec<Anchor>,
}

/// Verifies the log as [`verify`] does, then against `expect`: a log that must have existed is
/// not empty, entry 0 is the genesis entry if one is expected, and every anchor names an entry
/// that is in the log with that hash. An anchor beyond the log's end or with another hash means
/// the log was truncated or rolled back (or rewritten and re-signed), and the problem names the
/// anchor's source.
pub fn verify_expecting(dir: &Path, public_key: &VerifyingKey, expect: &Expectations) -> Report {
    let mut report = Report::default();
    let mut chain =
        Chain { wanted: expect.anchors.iter().map(|a| a.seq).collect(), ..Chain::default() };
    let result = verify_into(dir, public_key, &mut report, &mut chain)
        .and_then(|()| check_expectations(expect, &chain, &mut report));
    if let Err(problem) = result {
        report.problem = Some(problem);
    }
    report
}

/// What [`verify_into`] learns about the chain for [`check_expectations`].
#[derive(Default)]
struct Chain {
    /// The seqs whose hashes are wanted.
    wanted: BTreeSet<u64>,
    /// Their hashes, for those in the log.
    hashes: BTreeMap<u64, String>,
    /// The byte offset of each entry.
    offsets: Vec<u64>,
    /// Where the complete lines end.
    end: u64,
    /// The kind of entry 0.
    first_kind: Option<String>,
}

fn check_expectations(
    expect: &Expectations,
    chain: &Chain,
    report: &mut Report,
) -> Result<(), Problem> {
    let count = report.entries;
    if count == 0 {
        let mut why: Vec<String> = expect.genesis.iter().chain(&expect.existed).cloned().collect();
        why.extend(
            expect
                .anchors
                .iter()
                .take(3)
                .map(|a| format!("{} names entry seq {}", a.source, a.seq)),
        );
        if expect.anchors.len() > 3 {
            why.push(format!("{} more signed positions", expect.anchors.len() - 3));
        }
        if !why.is_empty() {
            return Err(file_problem(format!(
                "the log is empty or missing, but a log existed here ({}): the log was wiped, \
                 truncated or rolled back",
                why.join("; ")
            )));
        }
    }
    let at = |seq: u64, reason: String| Problem {
        line: seq.saturating_add(1),
        seq: Some(seq),
        offset: usize::try_from(seq)
            .ok()
            .and_then(|i| chain.offsets.get(i).copied())
            .unwrap_or(chain.end),
        reason,
    };
    if let Some(why) = &expect.genesis {
        let first = chain.first_kind.as_deref().unwrap_or_default();
        if first != KIND_GENESIS {
            return Err(at(
                0,
                format!(
                    "entry 0 is a {first:?} entry, not the genesis entry that {why} requires: \
                     the log was wiped and restarted (or was started before hosts wrote a \
                     genesis entry)"
                ),
            ));
        }
    }
    for anchor in &expect.anchors {
        match chain.hashes.get(&anchor.seq) {
            None => {
                return Err(at(
                    anchor.seq,
                    format!(
                        "{} names entry seq {}, but the log has only {count} entries: the log \
                         was truncated or rolled back",
                        anchor.source, anchor.seq
                    ),
                ))
            }
            Some(hash) if *hash != anchor.hash => {
                return Err(at(
                    anchor.seq,
                    format!(
                        "{} names entry seq {} with hash {}, but that entry's hash is {hash}: \
                         the log was truncated or rolled back (and written again)",
                        anchor.source, anchor.seq, anchor.hash
                    ),
                ))
            }
            Some(_) => report.anchors += 1,
        }
    }
    Ok(())
}

fn verify_into(
    dir: &Path,
    key: &VerifyingKey,
    report: &mut Report,
    chain: &mut Chain,
) -> Result<(), Problem> {
    let snap = read_snapshot(dir).map_err(|e| file_problem(e.to_string()))?;
    let complete = snap.log.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    if complete < snap.log.len() {
        report.torn_tail =
            Some(TornTail { offset: complete as u64, len: (snap.log.len() - complete) as u64 });
    }
    chain.end = complete as u64;

    // The chain.
    let mut last: Option<Head> = None;
    let mut offset = 0u64;
    for (i, line) in snap.log[..complete].split_inclusive(|&b| b == b'\n').enumerate() {
        let at =
            |seq: Option<u64>, reason: String| Problem { line: i as u64 + 1, seq, offset, reason };
        let entry = parse_entry(&line[..line.len() - 1]).map_err(|(seq, r)| at(seq, r))?;
        let seq = Some(entry.seq);
        let (want_seq, want_prev) = match &last {
            None => (0, GENESIS_PREV),
            Some(h) => (h.seq.saturating_add(1), h.hash.as_str()),
        };
        if entry.seq != want_seq {
            return Err(at(seq, format!("seq is {}, expected {want_seq}", entry.seq)));
        }
        if entry.prev != want_prev {
            return Err(at(seq, "prev is not the hash of the entry before".to_owned()));
        }
        if entry.kind == KIND_CHECKPOINT {
            check_checkpoint(&entry.data, last.as_ref(), key).map_err(|r| at(seq, r))?;
            report.checkpoints += 1;
        }
        if entry.kind == KIND_RECOVERED && entry.data.get("offset") != Some(&json!(offset)) {
            return Err(at(seq, "the recorded torn tail did not start here".to_owned()));
        }
        if entry.kind == KIND_GENESIS && entry.seq != 0 {
            return Err(at(seq, "a genesis entry can only be the first entry".to_owned()));
        }
        if entry.seq == 0 {
            chain.first_kind = Some(entry.kind.clone());
        }
        if chain.wanted.contains(&entry.seq) {
            chain.hashes.insert(entry.seq, entry.hash.clone());
        }
        report.entries += 1;
        chain.offsets.push(offset);
        offset += line.len() as u64;
        last = Some(Head { seq: entry.seq, hash: entry.hash });
    }

    // The anchor.
    let head = match &snap.head {
        None => None,
        Some(bytes) => {
            Some(parse_head(bytes, key).map_err(|r| file_problem(format!("{HEAD_FILE}: {r}")))?)
        }
    };
    if (head.is_none() && last.is_none()) || (head.is_some() && head == last) {
        return Ok(());
    }
    let pending = snap.pending.and_then(|bytes| parse_head(&bytes, key).ok());
    let next_seq = head.as_ref().map_or(0, |h| h.seq.saturating_add(1));
    if pending.as_ref().is_some_and(|p| p.seq == next_seq) && pending == last {
        report.pending_head = true;
        return Ok(());
    }
    let count = report.entries;
    let offsets = &chain.offsets;
    let at_line = |n: u64, reason: String| Problem {
        line: n + 1,
        seq: Some(n),
        offset: offsets.get(n as usize).copied().unwrap_or(complete as u64),
        reason,
    };
    let Some(head) = head else {
        return Err(at_line(0, format!("{HEAD_FILE} is missing but the log has {count} entries")));
    };
    let want = head.seq.saturating_add(1);
    Err(if count < want {
        at_line(
            count,
            format!("truncated: the signed head says {want} entries, the log has {count}"),
        )
    } else if count > want {
        at_line(
            want,
            format!("entries after the signed head: it covers {want} entries, the log has {count}"),
        )
    } else {
        at_line(head.seq, "the last entry is not the one the signed head names".to_owned())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("isocell-audit-unit-{}-{n}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn lines(dir: &Path) -> Vec<String> {
        fs::read_to_string(dir.join(LOG_FILE)).unwrap().lines().map(str::to_owned).collect()
    }

    #[test]
    fn entries_have_the_documented_form() {
        let tmp = TempDir::new("form");
        let log = AuditLog::open(&tmp.0, key(1)).unwrap();
        let (s0, h0) = log.append("boot", Some("cell-1"), json!({"b": 2, "a": 1})).unwrap();
        let (s1, h1) = log.append("host", None, json!(null)).unwrap();
        assert_eq!((s0, s1), (0, 1));

        let lines = lines(&tmp.0);
        assert_eq!(lines.len(), 2);
        let first: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(to_canonical_string(&first), lines[0]);
        assert_eq!(first["seq"], 0);
        assert_eq!(first["kind"], "boot");
        assert_eq!(first["cell"], "cell-1");
        assert_eq!(first["data"], json!({"a": 1, "b": 2}));
        assert_eq!(first["prev"], GENESIS_PREV);
        assert_eq!(first["hash"], h0.as_str());
        let mut body = first.as_object().unwrap().clone();
        body.remove("hash");
        assert_eq!(sha256_hex(to_canonical_string(&Value::Object(body)).as_bytes()), h0);

        let second: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["prev"], h0.as_str());
        assert_eq!(second["cell"], Value::Null);

        let head_text = fs::read_to_string(log.head_path()).unwrap();
        let head = parse_head(head_text.as_bytes(), &key(1).verifying_key()).unwrap();
        assert_eq!(head, Head { seq: 1, hash: h1 });
        assert!(!tmp.0.join(PENDING_FILE).exists());
        assert!(verify(&tmp.0, &key(1).verifying_key()).ok());
    }

    #[test]
    fn entries_with_floats_extend_and_verify() {
        // Float text must parse back to the same value, or the chain could not be extended.
        let tmp = TempDir::new("floats");
        let log = AuditLog::open(&tmp.0, key(1)).unwrap();
        let mut x = 0.1_f64;
        for i in 0..200 {
            x = x * 1.37 + f64::from(i) / 7.0;
            log.append("measure", None, json!({"ms": x, "third": 1.0 / 3.0, "whole": 5000.0}))
                .unwrap();
        }
        let report = verify(&tmp.0, &key(1).verifying_key());
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.entries, 200);
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = TempDir::new("mode");
        let log = AuditLog::open(&tmp.0.join("a/b"), key(1)).unwrap();
        log.append("x", None, json!({})).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tmp.0.join("a/b")), 0o700);
        assert_eq!(mode(&log.log_path()), 0o600);
        assert_eq!(mode(&log.head_path()), 0o600);
    }

    #[test]
    fn checkpoint_signs_the_entry_before_it() {
        let tmp = TempDir::new("checkpoint");
        let log = AuditLog::open(&tmp.0, key(2)).unwrap();
        assert!(matches!(log.checkpoint(), Err(AuditError::Empty { .. })));
        let (_, h0) = log.append("a", None, json!(1)).unwrap();
        let (seq, _) = log.checkpoint().unwrap();
        assert_eq!(seq, 1);
        let entry: Value = serde_json::from_str(&lines(&tmp.0)[1]).unwrap();
        assert_eq!(entry["kind"], KIND_CHECKPOINT);
        assert_eq!(entry["data"]["head_seq"], 0);
        assert_eq!(entry["data"]["head_hash"], h0.as_str());
        let vk = key(2).verifying_key();
        assert_eq!(entry["data"]["public_key"], verifying_key_hex(&vk).as_str());
        let body = json!({"head_hash": h0, "head_seq": 0});
        check_signature(&vk, &body, entry["data"]["signature"].as_str().unwrap()).unwrap();

        let report = verify(&tmp.0, &vk);
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.entries, report.checkpoints), (2, 1));
    }

    #[test]
    fn reserved_kinds_are_refused() {
        let tmp = TempDir::new("reserved");
        let log = AuditLog::open(&tmp.0, key(1)).unwrap();
        for kind in [KIND_CHECKPOINT, KIND_RECOVERED, KIND_GENESIS] {
            assert!(matches!(log.append(kind, None, json!({})), Err(AuditError::ReservedKind(_))));
        }
    }

    #[test]
    fn empty_missing_and_headless() {
        let tmp = TempDir::new("empty");
        let vk = key(1).verifying_key();
        let report = verify(&tmp.0, &vk);
        assert!(report.ok());
        assert_eq!(report.entries, 0);
        assert!(read_entries(&tmp.0).unwrap().is_empty());

        let log = AuditLog::open(&tmp.0, key(1)).unwrap();
        log.append("a", None, json!({})).unwrap();
        // A head without a log: everything was cut.
        fs::remove_file(log.log_path()).unwrap();
        let problem = verify(&tmp.0, &vk).problem.unwrap();
        assert!(problem.reason.starts_with("truncated"), "{problem}");
        // A log without a head.
        fs::write(log.log_path(), "").unwrap();
        fs::remove_file(log.head_path()).unwrap();
        log.append("a", None, json!({})).unwrap();
        fs::remove_file(log.head_path()).unwrap();
        let problem = verify(&tmp.0, &vk).problem.unwrap();
        assert!(problem.reason.contains("is missing"), "{problem}");
    }

    #[test]
    fn another_key_is_refused() {
        let tmp = TempDir::new("otherkey");
        let log = AuditLog::open(&tmp.0, key(1)).unwrap();
        log.append("a", None, json!({})).unwrap();
        let report = verify(&tmp.0, &key(9).verifying_key());
        assert_eq!(report.problem.unwrap().line, 0);
        log.checkpoint().unwrap();
        let report = verify(&tmp.0, &key(9).verifying_key());
        let problem = report.problem.unwrap();
        assert_eq!((problem.line, problem.seq), (2, Some(1)));
        assert!(problem.reason.contains("another key"), "{problem}");
    }

    #[test]
    fn a_pending_head_anchors_one_entry_past_the_head() {
        let tmp = TempDir::new("pending");
        let vk = key(3).verifying_key();
        let log = AuditLog::open(&tmp.0, key(3)).unwrap();
        log.append("a", None, json!(0)).unwrap();
        let old_head = fs::read(log.head_path()).unwrap();
        log.append("b", None, json!(1)).unwrap();
        // As if the writer died between writing entry 1 and renaming its pending head.
        fs::copy(log.head_path(), tmp.0.join(PENDING_FILE)).unwrap();
        fs::write(log.head_path(), &old_head).unwrap();
        let report = verify(&tmp.0, &vk);
        assert!(report.ok() && report.pending_head, "{report:?}");

        // The same, before the very first head.
        let tmp2 = TempDir::new("pending-first");
        let log2 = AuditLog::open(&tmp2.0, key(3)).unwrap();
        log2.append("a", None, json!(0)).unwrap();
        fs::rename(log2.head_path(), tmp2.0.join(PENDING_FILE)).unwrap();
        assert!(verify(&tmp2.0, &vk).pending_head);

        // A pending head does not vouch for two entries past the head.
        log.append("c", None, json!(2)).unwrap();
        fs::copy(log.head_path(), tmp.0.join(PENDING_FILE)).unwrap();
        fs::write(log.head_path(), &old_head).unwrap();
        let problem = verify(&tmp.0, &vk).problem.unwrap();
        assert!(problem.reason.starts_with("entries after"), "{problem}");
        assert_eq!((problem.line, problem.seq), (2, Some(1)));

        // The next append continues from the log, not from the stale head.
        log.append("d", None, json!(3)).unwrap();
        let report = verify(&tmp.0, &vk);
        assert!(report.ok() && !report.pending_head, "{report:?}");
        assert_eq!(report.entries, 4);
    }

    #[test]
    fn a_long_torn_tail_is_recorded_and_cut() {
        let tmp = TempDir::new("longtorn");
        let vk = key(4).verifying_key();
        let log = AuditLog::open(&tmp.0, key(4)).unwrap();
        log.append("a", None, json!(0)).unwrap();
        let before = fs::metadata(log.log_path()).unwrap().len();
        let torn = vec![b'x'; 20_000];
        let mut bytes = fs::read(log.log_path()).unwrap();
        bytes.extend_from_slice(&torn);
        fs::write(log.log_path(), &bytes).unwrap();
        let report = verify(&tmp.0, &vk);
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.torn_tail, Some(TornTail { offset: before, len: 20_000 }));

        log.append("b", None, json!(1)).unwrap();
        let report = verify(&tmp.0, &vk);
        assert!(report.ok() && report.torn_tail.is_none(), "{report:?}");
        assert_eq!(report.entries, 3);
        let entries = read_entries(&tmp.0).unwrap();
        assert_eq!(entries[1]["kind"], KIND_RECOVERED);
        assert_eq!(entries[1]["data"]["offset"], before);
        assert_eq!(entries[1]["data"]["len"], 20_000);
        assert_eq!(entries[1]["data"]["sha256"], sha256_hex(&torn).as_str());
        assert_eq!(entries[2]["kind"], "b");
    }

    #[test]
    fn a_corrupt_last_entry_is_not_extended() {
        let tmp = TempDir::new("corrupt");
        let log = AuditLog::open(&tmp.0, key(1)).unwrap();
        log.append("a", None, json!(0)).unwrap();
        let text = fs::read_to_string(log.log_path()).unwrap();
        fs::write(log.log_path(), text.replace("\"a\"", "\"b\"")).unwrap();
        let err = log.append("c", None, json!(1)).unwrap_err();
        assert!(matches!(err, AuditError::CorruptTail { .. }), "{err}");
        assert!(err.to_string().contains("audit.log"), "{err}");
    }

    #[test]
    fn tail_reading_crosses_chunks() {
        let tmp = TempDir::new("chunks");
        let log = AuditLog::open(&tmp.0, key(1)).unwrap();
        let big = "y".repeat(20_000);
        log.append("big", None, json!(big)).unwrap();
        log.append("big", None, json!(big)).unwrap();
        let (seq, _) = log.append("small", None, json!(0)).unwrap();
        assert_eq!(seq, 2);
        assert!(verify(&tmp.0, &key(1).verifying_key()).ok());
    }

    #[test]
    fn key_hex_round_trips() {
        let vk = key(5).verifying_key();
        let text = verifying_key_hex(&vk);
        assert_eq!(verifying_key_from_hex(&text).unwrap(), vk);
        assert!(verifying_key_from_hex(&text.to_uppercase()).is_err());
        assert!(verifying_key_from_hex("00").is_err());
    }

    #[test]
    fn problems_read_well() {
        let p = Problem { line: 3, seq: Some(2), offset: 400, reason: "bad".to_owned() };
        assert_eq!(p.to_string(), "line 3 (seq 2) at byte 400: bad");
    }
}
