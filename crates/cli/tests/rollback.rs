//! `isocell audit verify` against a wiped or rolled-back log, through the real binary; and the
//! evidence of a denial by a policy that errored. Denied cells write audit entries without a
//! VMM, so no KVM is needed; the receipts a booted cell would leave are signed here with the
//! host's key, in the form `isocell run` writes them.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;
use std::process::Output;

use ed25519_dalek::SigningKey;
use serde_json::{json, Value};

mod common;
use common::{text, Env};

impl Env {
    fn audit_file(&self, name: &str) -> PathBuf {
        self.state().join("audit").join(name)
    }

    /// A cell denied by the default policy: two audit entries' worth of work, none booted.
    fn deny(&self) {
        let out = self.isocell(&["run", "--jurisdiction", "Nowhere", "--", "true"]);
        assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    }

    /// Signs a receipt for `cell` naming the audit entry `seq`, as `isocell run` would have, and
    /// stores it in the cell's record. Returns its path.
    fn receipt(&self, cell: &str, seq: u64) -> PathBuf {
        let entry = &self.entries()[usize::try_from(seq).unwrap()];
        let seed = fs::read_to_string(self.state().join("host.key")).unwrap();
        let seed: [u8; 32] = hex::decode(seed.trim()).unwrap().try_into().unwrap();
        let body = json!({
            "kind": "launch",
            "version": 1,
            "cell": cell,
            "audit": { "seq": seq, "entry_hash": entry["hash"] },
        });
        let doc = isocell_evidence::receipt::sign(&body, &SigningKey::from_bytes(&seed));
        let dir = self.state().join("cells").join(cell);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("launch.json");
        fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        path
    }

    fn verify(&self, extra: &[&str]) -> Output {
        let mut args = vec!["audit", "verify"];
        args.extend_from_slice(extra);
        self.isocell(&args)
    }
}

fn failed_with(out: &Output, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("audit log FAILED"), "{}", text(out));
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} missing\n{}", text(out));
    }
}

#[test]
fn a_wiped_log_never_verifies_as_empty() {
    let env = Env::new("rollback", "wiped");
    let init = env.isocell(&["host", "init", "--jurisdiction", "EU"]);
    assert!(init.status.success(), "{}", text(&init));
    env.deny();
    env.deny();
    let receipt = env.receipt("c0ffee", 2);
    let ok = env.verify(&[]);
    assert!(ok.status.success(), "{}", text(&ok));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(stdout.contains("audit log OK: 3 entries"), "{}", text(&ok));
    assert!(stdout.contains("1 receipt and checkpoint positions"), "{}", text(&ok));
    // A replaced profile is recorded, not a second genesis.
    let again = env.isocell(&["host", "init", "--jurisdiction", "DE", "--force"]);
    assert!(again.status.success(), "{}", text(&again));
    let entries = env.entries();
    assert_eq!(
        (&entries[0]["kind"], &entries[3]["kind"]),
        (&json!("genesis"), &json!("host_init"))
    );
    assert_eq!(entries[3]["data"]["jurisdiction"], "DE");
    let ok = env.verify(&[]);
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OK: 4 entries"), "{}", text(&ok));

    fs::remove_file(env.audit_file("audit.log")).unwrap();
    fs::remove_file(env.audit_file("audit.head")).unwrap();
    let out = env.verify(&[]);
    failed_with(&out, &["wiped", &receipt.display().to_string()]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("OK"), "{}", text(&out));

    // Without the receipt, the host profile still says there was a log.
    fs::remove_dir_all(env.state().join("cells")).unwrap();
    failed_with(&env.verify(&[]), &["wiped", "host.toml"]);

    // Replacing the profile does not bless the wipe with a new genesis entry.
    let again = env.isocell(&["host", "init", "--jurisdiction", "EU", "--force"]);
    assert!(again.status.success(), "{}", text(&again));
    failed_with(&env.verify(&[]), &["line 1", "\"host_init\" entry, not the genesis entry"]);
    // Nor does a run that starts the log again.
    fs::remove_file(env.audit_file("audit.log")).unwrap();
    fs::remove_file(env.audit_file("audit.head")).unwrap();
    env.deny();
    failed_with(&env.verify(&[]), &["line 1", "\"admission\" entry, not the genesis entry"]);
}

#[test]
fn a_rolled_back_log_fails_against_receipts_and_a_kept_checkpoint() {
    let env = Env::new("rollback", "rollback");
    let init = env.isocell(&["host", "init", "--jurisdiction", "EU"]);
    assert!(init.status.success(), "{}", text(&init));
    env.deny();
    let old_log = fs::read(env.audit_file("audit.log")).unwrap();
    let old_head = fs::read(env.audit_file("audit.head")).unwrap();
    env.deny();

    // The auditor takes a signed checkpoint and keeps it.
    let cp = env.dir.join("checkpoint.json");
    let out = env.isocell(&["audit", "checkpoint", "--out", cp.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kept: Value = serde_json::from_slice(&fs::read(&cp).unwrap()).unwrap();
    assert_eq!(printed, kept);
    assert_eq!(kept["seq"], 3, "genesis, two denials, then the checkpoint entry");
    assert_eq!(env.entries()[3]["kind"], "checkpoint");

    let receipt = env.receipt("c0ffee", 2);
    env.deny();
    let since = ["--since", cp.to_str().unwrap()];
    for args in [&[][..], &since[..]] {
        let ok = env.verify(args);
        assert!(ok.status.success(), "{args:?}\n{}", text(&ok));
        assert!(String::from_utf8_lossy(&ok.stdout).contains("5 entries"), "{}", text(&ok));
    }

    // Roll back: the log cut to before the second denial, and the head of that time restored.
    fs::write(env.audit_file("audit.log"), &old_log).unwrap();
    fs::write(env.audit_file("audit.head"), &old_head).unwrap();
    // The log alone cannot tell.
    let dir = env.state().join("audit");
    let alone = env.verify(&["--dir", dir.to_str().unwrap()]);
    assert!(alone.status.success(), "{}", text(&alone));
    assert!(String::from_utf8_lossy(&alone.stderr).contains("no receipts were cross-checked"));
    // The receipt can.
    failed_with(
        &env.verify(&[]),
        &["truncated or rolled back", &receipt.display().to_string(), "seq 2"],
    );
    // So can the state directory named explicitly.
    let state = env.state();
    failed_with(
        &env.verify(&["--dir", dir.to_str().unwrap(), "--state-dir", state.to_str().unwrap()]),
        &["truncated or rolled back"],
    );

    // Without receipts, the kept checkpoint can.
    fs::remove_dir_all(env.state().join("cells")).unwrap();
    let plain = env.verify(&[]);
    assert!(plain.status.success(), "{}", text(&plain));
    failed_with(&env.verify(&since), &["truncated or rolled back", "checkpoint.json", "seq 3"]);
    // Also when the rolled-back log has grown again past the checkpoint's position.
    env.deny();
    env.deny();
    env.deny();
    failed_with(&env.verify(&since), &["truncated or rolled back", "checkpoint.json", "hash"]);

    // A checkpoint that does not verify is a failure, not a pass.
    let forged = fs::read_to_string(&cp).unwrap().replace("\"seq\":3", "\"seq\":2");
    fs::write(&cp, forged).unwrap();
    failed_with(&env.verify(&since), &["checkpoint.json", "signature"]);
    let missing = env.verify(&["--since", "/no/such/checkpoint"]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
}

#[test]
fn a_checkpoint_needs_a_host() {
    let env = Env::new("rollback", "nohost");
    let out = env.isocell(&["audit", "checkpoint"]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never set up"), "{}", text(&out));
    assert!(!env.state().join("host.toml").exists(), "nothing was set up behind the user's back");
}

#[test]
fn a_denial_by_a_policy_that_errors_names_that_policy() {
    let env = Env::new("rollback", "errored");
    let broken = env.dir.join("broken.cedar");
    fs::write(
        &broken,
        "@id(\"typo\") forbid (principal, action, resource) when { context.cell.nope == 1 };",
    )
    .unwrap();
    let out = env.isocell(&["run", "--policy", broken.to_str().unwrap(), "--", "true"]);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken:typo errored"), "{}", text(&out));
    assert!(!stderr.contains("allow-cells"), "the permit did not decide: {}", text(&out));

    let entries = env.entries();
    let admission = entries.iter().find(|e| e["kind"] == "admission").unwrap();
    assert_eq!(admission["data"]["decision"], "deny");
    assert_eq!(admission["data"]["policies"], json!(["broken:typo"]));
    assert_eq!(admission["data"]["errored"], json!(["broken:typo"]));
    let reason = admission["data"]["reason"].as_str().unwrap();
    assert!(reason.contains("errored") && !reason.contains("allow-cells"), "{reason}");
}
