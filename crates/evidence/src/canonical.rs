//! Canonical JSON: one exact byte string per value, so that a value can be hashed and signed and a
//! verifier can rebuild the same bytes. The form is compact (no whitespace) with the keys of every
//! object sorted by their bytes, at every depth. It does not depend on how `serde_json` orders
//! maps (its `preserve_order` feature), because the walk below sorts the keys itself.

use std::fmt::Write;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The canonical JSON text of `v`: compact, object keys sorted by bytes, recursively.
pub fn to_canonical_string(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    out
}

/// The lowercase hex SHA-256 digest of `bytes` (64 characters).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, key);
                out.push(':');
                if let Some(item) = map.get(key) {
                    write_value(out, item);
                }
            }
            out.push('}');
        }
        // Null, booleans, numbers and strings: serde_json's compact text is already canonical.
        leaf => {
            // Writing into a String cannot fail.
            let _ = write!(out, "{leaf}");
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    // Writing into a String cannot fail.
    let _ = write!(out, "{}", Value::from(s));
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
