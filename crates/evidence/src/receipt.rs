//! Signed receipts: a launch receipt when a cell starts and an exit receipt when it is gone, each
//! a canonical JSON document signed with the host's Ed25519 key, verifiable offline with only the
//! public key.
//!
//! A receipt names, inside its signed body, the audit log position of the latest entry written
//! for its cell before it was signed: `"audit": {"entry_hash": HEX, "seq": N}`. Receipts leave
//! the host with the cell's results, so a log that no longer has that entry, or has another one
//! there, was truncated or rolled back ([`scan_cells`] and [`crate::audit::verify_expecting`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::{json, Value};

use crate::audit::Anchor;
use crate::canonical::to_canonical_string;

/// The receipts a cell's record may hold, in the order they are written.
pub const RECEIPT_FILES: [&str; 2] = ["launch.json", "exit.json"];

/// Wraps `receipt` with its signature: `{"receipt": ..., "signature": HEX, "public_key": HEX}`.
/// The signature covers the canonical JSON of `receipt`.
pub fn sign(receipt: &Value, key: &SigningKey) -> Value {
    let bytes = to_canonical_string(receipt);
    let signature = key.sign(bytes.as_bytes());
    json!({
        "receipt": receipt,
        "signature": hex::encode(signature.to_bytes()),
        "public_key": hex::encode(key.verifying_key().to_bytes()),
    })
}

/// Checks a signed receipt against the trusted `public_key`. The error says what is wrong.
pub fn verify(doc: &Value, public_key: &VerifyingKey) -> Result<(), String> {
    let obj = doc.as_object().ok_or("not a signed receipt: expected a JSON object")?;
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["public_key", "receipt", "signature"] {
        return Err(format!(
            "not a signed receipt: fields are {keys:?}, expected public_key, receipt, signature"
        ));
    }
    let receipt = &obj["receipt"];
    let embedded = obj["public_key"].as_str().ok_or("public_key is not a string")?;
    if embedded != hex::encode(public_key.to_bytes()) {
        return Err("the receipt names a different signing key than the trusted public key".into());
    }
    let sig_hex = obj["signature"].as_str().ok_or("signature is not a string")?;
    let sig_bytes: [u8; 64] = hex::decode(sig_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("signature is not 64 bytes of hex")?;
    let signature = Signature::from_bytes(&sig_bytes);
    public_key.verify(to_canonical_string(receipt).as_bytes(), &signature).map_err(|_| {
        "the signature does not match the receipt: it was altered or signed by another key"
            .to_owned()
    })
}

/// The audit log position a signed receipt names: `Some((seq, entry_hash))`, or `None` for a
/// receipt without one (written before receipts named their position). Call [`verify`] first:
/// this reads the receipt, it does not check it.
pub fn audit_position(doc: &Value) -> Result<Option<(u64, String)>, String> {
    let audit = match doc.get("receipt").and_then(|r| r.get("audit")) {
        None | Some(Value::Null) => return Ok(None),
        Some(a) => a,
    };
    let bad =
        || "its audit position is not {\"entry_hash\": 64 lowercase hex, \"seq\": N}".to_owned();
    let map = audit.as_object().ok_or_else(bad)?;
    if map.len() != 2 {
        return Err(bad());
    }
    let seq = map.get("seq").and_then(Value::as_u64).ok_or_else(bad)?;
    let hash = map.get("entry_hash").and_then(Value::as_str).ok_or_else(bad)?;
    let lower_hex =
        hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !lower_hex {
        return Err(bad());
    }
    Ok(Some((seq, hash.to_owned())))
}

/// What [`scan_cells`] found under a state directory's `cells/`.
#[derive(Debug, Default)]
pub struct CellScan {
    /// Cell records (directories), with or without receipts.
    pub cells: usize,
    /// Receipts whose signature verified.
    pub receipts: usize,
    /// The audit positions they name, each with the receipt's path as its source.
    pub anchors: Vec<Anchor>,
    /// Verified receipts that name no audit position.
    pub unanchored: Vec<PathBuf>,
}

/// Reads every `cells/*/{launch,exit}.json` under `cells_dir` (a missing directory has none),
/// checks each receipt's signature against `public_key` and collects the audit positions they
/// name. The error names the first receipt that cannot be read, is not JSON, does not verify or
/// names a malformed position.
pub fn scan_cells(cells_dir: &Path, public_key: &VerifyingKey) -> Result<CellScan, String> {
    let mut scan = CellScan::default();
    let entries = match fs::read_dir(cells_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(format!("cannot read {}: {e}", cells_dir.display())),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", cells_dir.display()))?;
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    scan.cells = dirs.len();
    for dir in dirs {
        for name in RECEIPT_FILES {
            let path = dir.join(name);
            let text = match fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("cannot read the receipt {}: {e}", path.display())),
            };
            let fail = |what: String| format!("receipt {}: {what}", path.display());
            let doc: Value =
                serde_json::from_slice(&text).map_err(|e| fail(format!("not JSON: {e}")))?;
            verify(&doc, public_key).map_err(fail)?;
            scan.receipts += 1;
            match audit_position(&doc).map_err(fail)? {
                Some((seq, hash)) => scan.anchors.push(Anchor {
                    source: format!("receipt {}", path.display()),
                    seq,
                    hash,
                }),
                None => scan.unanchored.push(path),
            }
        }
    }
    Ok(scan)
}

/// Parses a public key from 64 hex characters.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("a public key is 64 hex characters (32 bytes)")?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("invalid Ed25519 public key: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_receipt_verifies_and_any_change_fails() {
        let k = key(7);
        let receipt =
            json!({"kind": "launch", "cell": "abc", "launch_digest": "sha256:00", "n": 3});
        let doc = sign(&receipt, &k);
        verify(&doc, &k.verifying_key()).unwrap();
        // Re-serialised with other key order still verifies (canonical form).
        let text = serde_json::to_string_pretty(&doc).unwrap();
        verify(&serde_json::from_str(&text).unwrap(), &k.verifying_key()).unwrap();
        // Flip every byte of the serialised document: each variant is refused or unparsable.
        let compact = serde_json::to_string(&doc).unwrap().into_bytes();
        for i in 0..compact.len() {
            let mut b = compact.clone();
            b[i] ^= 0x01;
            if let Ok(v) = serde_json::from_slice::<Value>(&b) {
                if v == doc {
                    continue; // a flip in insignificant whitespace is not a change
                }
                assert!(verify(&v, &k.verifying_key()).is_err(), "flip at {i} verified");
            }
        }
        assert!(verify(&doc, &key(8).verifying_key()).is_err());
    }

    #[test]
    fn audit_positions_are_read_strictly() {
        let h = "ab".repeat(32);
        let pos = |audit: Value| audit_position(&json!({"receipt": {"audit": audit}}));
        assert_eq!(pos(json!({"seq": 4, "entry_hash": h})).unwrap(), Some((4, h.clone())));
        assert_eq!(pos(Value::Null).unwrap(), None);
        assert_eq!(audit_position(&json!({"receipt": {}})).unwrap(), None);
        assert_eq!(audit_position(&json!(7)).unwrap(), None);
        for bad in [
            json!({"seq": -1, "entry_hash": h}),
            json!({"seq": 1, "entry_hash": h.to_uppercase()}),
            json!({"seq": 1, "entry_hash": "ab"}),
            json!({"seq": 1, "entry_hash": h, "more": 1}),
            json!({"seq": 1}),
            json!("seq 1"),
        ] {
            assert!(pos(bad.clone()).is_err(), "{bad}");
        }
    }
}
