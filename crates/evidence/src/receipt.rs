//! Signed receipts: a launch receipt when a cell starts and an exit receipt when it is gone, each
//! a canonical JSON document signed with the host's Ed25519 key, verifiable offline with only the
//! public key.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::{json, Value};

use crate::canonical::to_canonical_string;

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
}
