//! Canonical JSON: one exact byte string per value, so that a value can be hashed and signed and a
//! verifier can rebuild the same bytes. The form is compact (no whitespace) with the keys of every
//! object sorted by their bytes, at every depth. It does not depend on how `serde_json` orders
//! maps (its `preserve_order` feature), because the walk below sorts the keys itself.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The canonical JSON text of `v`: compact, object keys sorted by bytes, recursively.
pub fn to_canonical_string(v: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    write_value(&mut out, v);
    // Only whole strings and ASCII punctuation were written: always UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The lowercase hex SHA-256 digest of `bytes` (64 characters).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes straight into bytes with serde_json's serializer: going through `fmt` (and a `Value`
/// per key) cost every cell some 2 M instructions in its audit entries, receipts and measurement.
fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_leaf(out, key);
                out.push(b':');
                write_value(out, item);
            }
            out.push(b'}');
        }
        // Null, booleans, numbers and strings: serde_json's compact text is already canonical.
        leaf => write_leaf(out, leaf),
    }
}

fn write_leaf<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, leaf: &T) {
    // Writing into a Vec cannot fail, and a leaf or a key always serializes.
    let _ = serde_json::to_writer(&mut *out, leaf);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn sorts_keys_recursively_and_is_compact() {
        let v = json!({"b": 1, "a": {"z": [3, {"y": null, "x": true}], "c": "s"}, "A": -2.5});
        assert_eq!(
            to_canonical_string(&v),
            r#"{"A":-2.5,"a":{"c":"s","z":[3,{"x":true,"y":null}]},"b":1}"#
        );
    }

    #[test]
    fn sorts_by_bytes_not_by_characters() {
        // 'é' is U+00E9 (0xC3 0xA9 in UTF-8), 'z' is 0x7A, '~' is 0x7E.
        let v = json!({"é": 1, "~": 2, "z": 3, "": 4});
        assert_eq!(to_canonical_string(&v), r#"{"":4,"z":3,"~":2,"é":1}"#);
    }

    #[test]
    fn escapes_strings_and_keys() {
        let v = json!({"k\"\n": "line\nbreak \"quoted\" \\ \u{1}"});
        let text = to_canonical_string(&v);
        assert_eq!(text, r#"{"k\"\n":"line\nbreak \"quoted\" \\ \u0001"}"#);
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v);
    }

    #[test]
    fn round_trips_to_the_same_text() {
        let v = json!({"seq": 18446744073709551615u64, "n": -1, "f": 0.1, "e": [], "o": {}});
        let text = to_canonical_string(&v);
        let again: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(to_canonical_string(&again), text);
        assert_eq!(text, r#"{"e":[],"f":0.1,"n":-1,"o":{},"seq":18446744073709551615}"#);
    }

    #[test]
    fn sha256_of_known_inputs() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
