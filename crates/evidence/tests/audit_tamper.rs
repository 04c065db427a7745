//! The audit log against tampering, truncation, crashed writers and concurrent writers.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::{SigningKey, VerifyingKey};
use isocell_evidence::audit::{self, AuditLog, Report, HEAD_FILE, LOG_FILE};
use serde_json::json;

/// Set in the child process of `a_killed_writer_leaves_a_verifiable_log`: the log to write to.
const CHILD_ENV: &str = "ISOCELL_AUDIT_CHILD_DIR";

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir()
            .join(format!("isocell-audit-tamper-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The fixed key of these tests (also the child writer's).
fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn public() -> VerifyingKey {
    key().verifying_key()
}

/// Six entries and a checkpoint.
fn build_log(dir: &Path) -> AuditLog {
    let log = AuditLog::open(dir, key()).unwrap();
    log.append("host_start", None, json!({"version": "0.1.0"})).unwrap();
    log.append("admitted", Some("c1"), json!({"policy": "p", "ok": true})).unwrap();
    log.append("launched", Some("c1"), json!({"digest": "ab".repeat(32)})).unwrap();
    log.append("exec", Some("c1"), json!({"argv": ["sh", "-c", "echo \"hi\"\n"]})).unwrap();
    log.append("exited", Some("c1"), json!({"code": 0, "ms": 12.5})).unwrap();
    log.append("torn_down", Some("c1"), json!(null)).unwrap();
    log.checkpoint().unwrap();
    log
}

/// Runs `verify` with `bytes` as the content of `path`, then restores the original.
fn verify_with(dir: &Path, path: &Path, original: &[u8], bytes: &[u8]) -> Report {
    fs::write(path, bytes).unwrap();
    let report = audit::verify(dir, &public());
    fs::write(path, original).unwrap();
    report
}

fn log_lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
}

#[test]
fn a_clean_log_verifies_and_reads_back() {
    let tmp = TempDir::new("clean");
    build_log(&tmp.0);
    let report = audit::verify(&tmp.0, &public());
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.entries, report.checkpoints), (7, 1));
    assert_eq!(report.torn_tail, None);
    assert!(!report.pending_head);

    let entries = audit::read_entries(&tmp.0).unwrap();
    let kinds: Vec<&str> = entries.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["host_start", "admitted", "launched", "exec", "exited", "torn_down", "checkpoint"]
    );
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["seq"], i as u64);
    }
    assert_eq!(entries[3]["data"]["argv"][2], "echo \"hi\"\n");
}

#[test]
fn every_byte_flip_of_the_log_is_detected() {
    let tmp = TempDir::new("flip-log");
    let log = build_log(&tmp.0);
    let path = log.log_path();
    let original = fs::read(&path).unwrap();
    // One bit per byte: a digit becomes its neighbour, a letter its neighbour, '"' becomes '#'.
    for i in 0..original.len() {
        let mut bytes = original.clone();
        bytes[i] ^= 0x01;
        let report = verify_with(&tmp.0, &path, &original, &bytes);
        assert!(!report.ok(), "flip at byte {i} not detected: {report:?}");
    }
    assert!(audit::verify(&tmp.0, &public()).ok());
}

#[test]
fn every_byte_flip_of_the_head_is_detected() {
    let tmp = TempDir::new("flip-head");
    let log = build_log(&tmp.0);
    let path = log.head_path();
    let original = fs::read(&path).unwrap();
    // One bit per byte, and the case bit of every hex letter (hex has one spelling here).
    let flips = (0..original.len()).map(|i| (i, 0x01u8)).chain(
        (0..original.len()).filter(|&i| matches!(original[i], b'a'..=b'f')).map(|i| (i, 0x20)),
    );
    for (i, mask) in flips {
        let mut bytes = original.clone();
        bytes[i] ^= mask;
        let report = verify_with(&tmp.0, &path, &original, &bytes);
        let problem = report.problem.expect("head flip not detected");
        assert_eq!(problem.line, 0, "flip {mask:#x} at byte {i}: {problem}");
        assert!(problem.reason.starts_with(HEAD_FILE), "{problem}");
    }
    assert!(audit::verify(&tmp.0, &public()).ok());
}

#[test]
fn deleting_any_entry_is_detected() {
    let tmp = TempDir::new("delete");
    let log = build_log(&tmp.0);
    let path = log.log_path();
    let original = fs::read(&path).unwrap();
    let lines = log_lines(&original);
    for skip in 0..lines.len() {
        let bytes: Vec<u8> = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .flat_map(|(_, l)| l.iter().copied())
            .collect();
        let report = verify_with(&tmp.0, &path, &original, &bytes);
        let problem = report.problem.expect("deletion not detected");
        // A gap is found at the entry after it; the last entry's removal is found by the head.
        assert_eq!(problem.line, skip as u64 + 1, "deleting line {}: {problem}", skip + 1);
    }
}

#[test]
fn swapping_adjacent_entries_is_detected() {
    let tmp = TempDir::new("swap");
    let log = build_log(&tmp.0);
    let path = log.log_path();
    let original = fs::read(&path).unwrap();
    let lines = log_lines(&original);
    for i in 0..lines.len() - 1 {
        let mut swapped = lines.clone();
        swapped.swap(i, i + 1);
        let report = verify_with(&tmp.0, &path, &original, &swapped.concat());
        let problem = report.problem.expect("swap not detected");
        assert_eq!(problem.line, i as u64 + 1, "swapping lines {} and {}", i + 1, i + 2);
    }
}

#[test]
fn truncation_at_every_offset_is_detected() {
    let tmp = TempDir::new("truncate");
    let log = build_log(&tmp.0);
    let path = log.log_path();
    let original = fs::read(&path).unwrap();
    for cut in 0..original.len() {
        let report = verify_with(&tmp.0, &path, &original, &original[..cut]);
        let problem = report.problem.expect("truncation not detected");
        assert!(
            problem.reason.starts_with("truncated: the signed head says 7 entries"),
            "cut at {cut}: {problem}"
        );
    }
    // Without the log at all.
    fs::remove_file(&path).unwrap();
    let problem = audit::verify(&tmp.0, &public()).problem.unwrap();
    assert!(problem.reason.contains("the log has 0"), "{problem}");
}

#[test]
fn a_torn_tail_after_the_head_is_reported_then_recovered() {
    let tmp = TempDir::new("torn");
    let log = build_log(&tmp.0);
    let path = log.log_path();
    let original = fs::read(&path).unwrap();
    let lines = log_lines(&original);
    // Half of a line, as a writer killed in the middle of its write would leave.
    let half = &lines[1][..lines[1].len() / 2];
    fs::write(&path, [original.as_slice(), half].concat()).unwrap();

    let report = audit::verify(&tmp.0, &public());
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.entries, 7);
    let torn = report.torn_tail.unwrap();
    assert_eq!((torn.offset, torn.len), (original.len() as u64, half.len() as u64));
    assert_eq!(audit::read_entries(&tmp.0).unwrap().len(), 7);

    let (seq, _) = log.append("after", Some("c2"), json!({})).unwrap();
    assert_eq!(seq, 8);
    let report = audit::verify(&tmp.0, &public());
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.entries, report.torn_tail), (9, None));
    let entries = audit::read_entries(&tmp.0).unwrap();
    let recovered = &entries[7];
    assert_eq!(recovered["kind"], "recovered_torn_tail");
    assert_eq!(recovered["data"]["offset"], original.len() as u64);
    assert_eq!(recovered["data"]["len"], half.len() as u64);
    assert_eq!(recovered["data"]["sha256"], isocell_evidence::canonical::sha256_hex(half).as_str());
    assert_eq!(entries[8]["kind"], "after");
}

#[test]
fn concurrent_writers_keep_one_chain() {
    let tmp = TempDir::new("threads");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let dir = tmp.0.clone();
            std::thread::spawn(move || {
                let log = AuditLog::open(&dir, key()).unwrap();
                for i in 0..25 {
                    log.append("tick", Some(&format!("t{t}")), json!({"i": i})).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let report = audit::verify(&tmp.0, &public());
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.entries, 100);
    let entries = audit::read_entries(&tmp.0).unwrap();
    for t in 0..4 {
        let cell = format!("t{t}");
        let mine: Vec<u64> = entries
            .iter()
            .filter(|e| e["cell"] == cell.as_str())
            .map(|e| e["data"]["i"].as_u64().unwrap())
            .collect();
        assert_eq!(mine, (0..25).collect::<Vec<u64>>(), "thread {t}");
    }
}

/// Not a test of its own: the child writer of `a_killed_writer_leaves_a_verifiable_log`. Without
/// `ISOCELL_AUDIT_CHILD_DIR` it returns at once; with it, it appends until killed.
#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let log = AuditLog::open(Path::new(&dir), key()).unwrap();
    for i in 0u64.. {
        log.append("tick", Some("child"), json!({"i": i, "pad": "z".repeat(300)})).unwrap();
        if i % 7 == 6 {
            log.checkpoint().unwrap();
        }
    }
}

#[test]
fn a_killed_writer_leaves_a_verifiable_log() {
    let tmp = TempDir::new("killed");
    let exe = std::env::current_exe().unwrap();
    let mut entries = 0;
    for (round, delay_ms) in [50u64, 120, 200].into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &tmp.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Let it write a few entries past the ones of earlier rounds first.
        let log_path = tmp.0.join(LOG_FILE);
        let started = Instant::now();
        let count = || fs::read(&log_path).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count());
        while count() < entries + 3 && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let report = audit::verify(&tmp.0, &public());
        assert!(report.ok(), "round {round}: {report:?}");
        assert!(report.entries as usize > entries, "round {round}: no progress");
        entries = report.entries as usize;
    }
    // Whatever the last kill left, the next append repairs it.
    AuditLog::open(&tmp.0, key()).unwrap().append("after", None, json!({})).unwrap();
    let report = audit::verify(&tmp.0, &public());
    assert!(report.ok(), "{report:?}");
    assert!(report.torn_tail.is_none() && !report.pending_head, "{report:?}");
    assert!(report.checkpoints > 0, "{report:?}");
}
