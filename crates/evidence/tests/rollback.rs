//! A wiped or rolled-back audit log, caught by what was kept outside it: receipts that name log
//! positions, a signed checkpoint an auditor kept, the genesis entry a host writes at setup.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use ed25519_dalek::{SigningKey, VerifyingKey};
use isocell_evidence::audit::{
    self, Anchor, AuditLog, Expectations, Report, HEAD_FILE, KIND_GENESIS, LOG_FILE,
};
use isocell_evidence::canonical::{sha256_hex, to_canonical_string};
use isocell_evidence::receipt;
use serde_json::json;

/// A fresh state directory under the system temp dir, removed on drop.
struct State(PathBuf);

impl State {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir()
            .join(format!("isocell-rollback-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn audit(&self) -> PathBuf {
        self.0.join("audit")
    }

    fn cells(&self) -> PathBuf {
        self.0.join("cells")
    }

    /// Signs a receipt for `cell` naming the log position `(seq, hash)`, as the CLI does.
    fn receipt(&self, cell: &str, name: &str, seq: u64, hash: &str) -> PathBuf {
        let body = json!({
            "kind": name.trim_end_matches(".json"),
            "cell": cell,
            "audit": {"seq": seq, "entry_hash": hash},
        });
        let dir = self.cells().join(cell);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let doc = receipt::sign(&body, &key());
        fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        path
    }

    /// What `isocell audit verify` expects of this state directory.
    fn expectations(&self) -> Expectations {
        let scan = receipt::scan_cells(&self.cells(), &public()).unwrap();
        let mut expect = Expectations {
            genesis: Some("the host profile".to_owned()),
            anchors: scan.anchors,
            ..Expectations::default()
        };
        if scan.cells > 0 {
            expect.existed.push(format!("{} cell records", scan.cells));
        }
        expect
    }

    fn verify(&self) -> Report {
        audit::verify_expecting(&self.audit(), &public(), &self.expectations())
    }
}

impl Drop for State {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[11; 32])
}

fn public() -> VerifyingKey {
    key().verifying_key()
}

/// A host's log: its genesis, then two cells, each with launch and exit receipts naming its
/// latest entry before they were signed, and a checkpoint. Returns the log and head bytes as
/// they were after the first cell (the "older" state an attacker puts back).
fn two_cells(state: &State) -> (Vec<u8>, Vec<u8>) {
    let log = AuditLog::open(&state.audit(), key()).unwrap();
    log.genesis(json!({"host_id": "h1"})).unwrap().unwrap();
    let mut older = None;
    for cell in ["c1", "c2"] {
        let (seq, hash) =
            log.append("admission", Some(cell), json!({"decision": "allow"})).unwrap();
        state.receipt(cell, "launch.json", seq, &hash);
        log.append("create", Some(cell), json!({})).unwrap();
        let (seq, hash) = log.append("exit", Some(cell), json!({"exit_code": 0})).unwrap();
        state.receipt(cell, "exit.json", seq, &hash);
        log.append("teardown", Some(cell), json!({})).unwrap();
        log.checkpoint().unwrap();
        if older.is_none() {
            older = Some((
                fs::read(state.audit().join(LOG_FILE)).unwrap(),
                fs::read(state.audit().join(HEAD_FILE)).unwrap(),
            ));
        }
    }
    older.unwrap()
}

fn problem(report: &Report) -> String {
    report.problem.as_ref().map(ToString::to_string).unwrap_or_default()
}

#[test]
fn an_intact_log_verifies_against_its_receipts() {
    let state = State::new("intact");
    two_cells(&state);
    let report = state.verify();
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.entries, report.checkpoints, report.anchors), (11, 2, 4));
    let entries = audit::read_entries(&state.audit()).unwrap();
    assert_eq!(entries[0]["kind"], KIND_GENESIS);
}

#[test]
fn a_wiped_log_with_receipts_fails() {
    let state = State::new("wiped");
    two_cells(&state);
    fs::remove_file(state.audit().join(LOG_FILE)).unwrap();
    fs::remove_file(state.audit().join(HEAD_FILE)).unwrap();
    // On its own, nothing is wrong with no log at all.
    let alone = audit::verify(&state.audit(), &public());
    assert!(alone.ok() && alone.entries == 0, "{alone:?}");
    // With the receipts, the log must have existed.
    let report = state.verify();
    let text = problem(&report);
    assert!(!report.ok(), "a wiped log verified: {report:?}");
    assert!(text.contains("wiped"), "{text}");
    assert!(text.contains("c1/launch.json"), "the receipt is named: {text}");

    // The receipts gone too: the cell records and the host's genesis still say a log existed.
    for cell in ["c1", "c2"] {
        for name in receipt::RECEIPT_FILES {
            fs::remove_file(state.cells().join(cell).join(name)).unwrap();
        }
    }
    let text = problem(&state.verify());
    assert!(text.contains("2 cell records") && text.contains("wiped"), "{text}");
    fs::remove_dir_all(state.cells()).unwrap();
    let text = problem(&state.verify());
    assert!(text.contains("the host profile") && text.contains("wiped"), "{text}");

    // A log wiped and started again has no genesis entry.
    let log = AuditLog::open(&state.audit(), key()).unwrap();
    log.append("admission", Some("c3"), json!({})).unwrap();
    assert!(audit::verify(&state.audit(), &public()).ok());
    let report = state.verify();
    let text = problem(&report);
    assert!(text.contains("not the genesis entry"), "{text}");
    assert_eq!(report.problem.unwrap().line, 1);
}

#[test]
fn a_truncated_log_with_an_older_head_fails_against_receipts() {
    let state = State::new("rollback");
    let (old_log, old_head) = two_cells(&state);
    fs::write(state.audit().join(LOG_FILE), &old_log).unwrap();
    fs::write(state.audit().join(HEAD_FILE), &old_head).unwrap();
    // The older head anchors the truncated log: on its own it verifies.
    let alone = audit::verify(&state.audit(), &public());
    assert!(alone.ok(), "{alone:?}");
    assert_eq!(alone.entries, 6);
    // The second cell's receipts name entries that are gone.
    let report = state.verify();
    let text = problem(&report);
    assert!(text.contains("truncated or rolled back"), "{text}");
    assert!(text.contains("c2/launch.json"), "{text}");
    let p = report.problem.unwrap();
    assert_eq!((p.line, p.seq), (7, Some(6)));
}

#[test]
fn a_rolled_back_and_rewritten_log_fails_on_the_hash() {
    let state = State::new("rewritten");
    let (old_log, old_head) = two_cells(&state);
    fs::write(state.audit().join(LOG_FILE), &old_log).unwrap();
    fs::write(state.audit().join(HEAD_FILE), &old_head).unwrap();
    // New entries where the second cell's were: the seqs exist again, with other hashes.
    let log = AuditLog::open(&state.audit(), key()).unwrap();
    for i in 0..6 {
        log.append("admission", Some("c9"), json!({"i": i})).unwrap();
    }
    assert!(audit::verify(&state.audit(), &public()).ok());
    let text = problem(&state.verify());
    assert!(text.contains("c2/launch.json names entry seq 6 with hash"), "{text}");
    assert!(text.contains("truncated or rolled back"), "{text}");
}

#[test]
fn a_kept_checkpoint_catches_a_rollback_without_receipts() {
    let state = State::new("since");
    let log = AuditLog::open(&state.audit(), key()).unwrap();
    log.genesis(json!({})).unwrap();
    log.append("admission", Some("c1"), json!({})).unwrap();
    let old_log = fs::read(state.audit().join(LOG_FILE)).unwrap();
    let old_head = fs::read(state.audit().join(HEAD_FILE)).unwrap();
    log.append("admission", Some("c2"), json!({})).unwrap();
    let cp_text = log.signed_checkpoint().unwrap();
    // The text is the signed head of the checkpoint entry, as `audit.head` holds it.
    assert_eq!(cp_text.as_bytes(), fs::read(state.audit().join(HEAD_FILE)).unwrap());
    let cp = audit::parse_checkpoint(cp_text.as_bytes(), &public()).unwrap();
    assert_eq!(cp.seq, 3);
    let since = |cp: &audit::Checkpoint| Expectations {
        anchors: vec![Anchor {
            source: "checkpoint cp.json".into(),
            seq: cp.seq,
            hash: cp.hash.clone(),
        }],
        ..Expectations::default()
    };
    // The log extends it, now and after more entries.
    log.append("admission", Some("c3"), json!({})).unwrap();
    let report = audit::verify_expecting(&state.audit(), &public(), &since(&cp));
    assert!(report.ok() && report.anchors == 1, "{report:?}");

    // Rolled back to before it.
    fs::write(state.audit().join(LOG_FILE), &old_log).unwrap();
    fs::write(state.audit().join(HEAD_FILE), &old_head).unwrap();
    assert!(audit::verify(&state.audit(), &public()).ok());
    let report = audit::verify_expecting(&state.audit(), &public(), &since(&cp));
    let text = problem(&report);
    assert!(text.contains("checkpoint cp.json names entry seq 3"), "{text}");
    assert!(text.contains("truncated or rolled back"), "{text}");

    // A checkpoint must be signed by the trusted key, and any change to it is refused.
    let other = SigningKey::from_bytes(&[12; 32]).verifying_key();
    assert!(audit::parse_checkpoint(cp_text.as_bytes(), &other).is_err());
    let forged = cp_text.replace("\"seq\":3", "\"seq\":2");
    assert_ne!(forged, cp_text);
    let err = audit::parse_checkpoint(forged.as_bytes(), &public()).unwrap_err();
    assert!(err.contains("signature"), "{err}");
    assert!(audit::parse_checkpoint(b"{\"seq\":1}", &public()).is_err());
    assert!(audit::parse_checkpoint(b"\xff", &public()).is_err());
    // Pretty-printed is fine: the signature covers the values, not the spelling.
    let v: serde_json::Value = serde_json::from_str(&cp_text).unwrap();
    let pretty = serde_json::to_string_pretty(&v).unwrap();
    assert_eq!(audit::parse_checkpoint(pretty.as_bytes(), &public()).unwrap(), cp);
}

#[test]
fn receipts_that_do_not_verify_are_named() {
    let state = State::new("badreceipt");
    two_cells(&state);
    let path = state.cells().join("c2/exit.json");
    let text = fs::read_to_string(&path).unwrap();
    // Pointing a receipt at another position breaks its signature.
    let moved = text.replace("\"seq\": 8", "\"seq\": 1");
    assert_ne!(moved, text);
    fs::write(&path, moved).unwrap();
    let err = receipt::scan_cells(&state.cells(), &public()).unwrap_err();
    assert!(err.contains("c2/exit.json") && err.contains("signature"), "{err}");
    fs::write(&path, "not json").unwrap();
    let err = receipt::scan_cells(&state.cells(), &public()).unwrap_err();
    assert!(err.contains("c2/exit.json") && err.contains("not JSON"), "{err}");
    // A receipt of another host's key is not this host's evidence.
    fs::write(&path, &text).unwrap();
    let other = SigningKey::from_bytes(&[12; 32]).verifying_key();
    assert!(receipt::scan_cells(&state.cells(), &other).is_err());
    // Nothing to scan is no error.
    let scan = receipt::scan_cells(&state.0.join("nowhere"), &public()).unwrap();
    assert_eq!((scan.cells, scan.receipts), (0, 0));
}

#[test]
fn genesis_is_written_once_and_only_first() {
    let state = State::new("genesis");
    let log = AuditLog::open(&state.audit(), key()).unwrap();
    assert_eq!(log.genesis(json!({})).unwrap().map(|(s, _)| s), Some(0));
    assert_eq!(log.genesis(json!({})).unwrap(), None, "a log with entries gets no genesis");
    assert!(log.append(KIND_GENESIS, None, json!({})).is_err(), "genesis is reserved");
    assert!(state.verify().ok());

    // A genesis entry anywhere but first is refused by the plain verifier, even with its
    // chain, hash and head in order.
    let entries = audit::read_entries(&state.audit()).unwrap();
    let mut body = json!({
        "seq": 1,
        "ts_ms": 0,
        "kind": KIND_GENESIS,
        "cell": null,
        "data": {},
        "prev": entries[0]["hash"],
    });
    let hash = sha256_hex(to_canonical_string(&body).as_bytes());
    body["hash"] = json!(hash);
    let mut bytes = fs::read(state.audit().join(LOG_FILE)).unwrap();
    bytes.extend_from_slice((to_canonical_string(&body) + "\n").as_bytes());
    fs::write(state.audit().join(LOG_FILE), bytes).unwrap();
    let report = audit::verify(&state.audit(), &public());
    let p = report.problem.unwrap();
    assert_eq!(p.line, 2, "{p}");
    assert!(p.reason.contains("genesis entry can only be the first"), "{p}");
}
