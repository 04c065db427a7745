//! Admission and the evidence commands, through the real `isocell` binary. A denial comes
//! before anything exists, so no guest is needed: the kernel and image are small files, and the
//! "VMM" is a script that leaves a mark if it is ever started.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;

mod common;
use common::{empty, text, Env};

impl Env {
    fn log(&self) -> PathBuf {
        self.dir.join("state/audit/audit.log")
    }
}

#[test]
fn a_denied_cell_never_starts_and_the_denial_is_logged() {
    let env = Env::new("admission", "deny");
    let init = env.isocell(&["host", "init", "--jurisdiction", "EU", "--operator", "acme"]);
    assert!(init.status.success(), "{}", text(&init));

    let out = env.isocell(&["run", "--jurisdiction", "US", "--", "true"]);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("default:jurisdiction"), "the denial names its policy: {stderr}");
    assert!(!env.vmm_started(), "the VMM must never start");
    assert!(empty(&env.dir.join("run")), "no cell directory may exist");
    assert!(empty(&env.dir.join("state/cells")), "no receipts for a cell that never ran");

    let entries = env.entries();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0]["kind"], "genesis", "host init starts the log");
    assert_eq!(entries[0]["data"]["jurisdiction"], "EU");
    let admission = &entries[1];
    assert_eq!(admission["kind"], "admission");
    assert_eq!(admission["data"]["decision"], "deny");
    assert_eq!(admission["data"]["policies"], serde_json::json!(["default:jurisdiction"]));

    // The spec file maps onto the same constraints as the flags.
    let spec = env.dir.join("cell.toml");
    fs::write(&spec, "command = [\"true\"]\n[constraints]\nclassification = \"restricted\"\n")
        .unwrap();
    let out = env.isocell(&["run", "--spec", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("default:restricted-needs-lifetime"));

    // A site policy is added to the default, and its id names it.
    let site = env.dir.join("small.cedar");
    fs::write(
        &site,
        "@id(\"small-cells\") forbid (principal, action, resource) when { context.cell.memory_mib > 512 };",
    )
    .unwrap();
    let out =
        env.isocell(&["run", "--memory", "1G", "--policy", site.to_str().unwrap(), "--", "true"]);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("small:small-cells"), "{}", text(&out));
    assert!(!env.vmm_started());

    // Unjailed cells only for public data.
    let out = env.isocell(&["run", "--no-jail", "--classification", "internal", "--", "true"]);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("default:jail-for-non-public"));

    let verify = env.isocell(&["audit", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(String::from_utf8_lossy(&verify.stdout).contains("5 entries"), "{}", text(&verify));
}

#[test]
fn audit_verify_pinpoints_a_changed_entry() {
    let env = Env::new("admission", "tamper");
    for _ in 0..3 {
        let out = env.isocell(&["run", "--jurisdiction", "Nowhere", "--", "true"]);
        assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    }
    let log = fs::read_to_string(env.log()).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "the first run set the host up: a genesis entry, then 3 denials");
    let changed =
        log.replacen("\"Nowhere\"", "\"Elsewhere\"", 2).replacen("\"Elsewhere\"", "\"Nowhere\"", 1);
    assert_ne!(changed, log);
    fs::write(env.log(), changed).unwrap();
    let verify = env.isocell(&["audit", "verify"]);
    assert_eq!(verify.status.code(), Some(1), "{}", text(&verify));
    assert!(String::from_utf8_lossy(&verify.stderr).contains("line 3"), "{}", text(&verify));

    // Another key does not verify this host's log.
    fs::write(env.log(), log).unwrap();
    let other = "11".repeat(32);
    let verify = env.isocell(&["audit", "verify", "--public-key", &other]);
    assert_ne!(verify.status.code(), Some(0), "{}", text(&verify));
}

#[test]
fn bad_evidence_options_are_refused_before_anything_is_written() {
    let env = Env::new("admission", "bad");
    for (args, expect) in [
        (&["run", "--classification", "secret", "--", "true"][..], "--classification"),
        (&["run", "--allow-image-digest", "sha256:zz", "--", "true"][..], "sha256:"),
        (&["run", "--max-lifetime", "0", "--", "true"][..], "--max-lifetime 0"),
        (&["run", "--policy", "/no/such.cedar", "--", "true"][..], "No such file"),
        (&["run", "--spec", "/no/such.toml"][..], "--spec /no/such.toml"),
    ] {
        let out = env.isocell(args);
        assert_eq!(out.status.code(), Some(125), "{args:?}\n{}", text(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains(expect), "{args:?}\n{}", text(&out));
    }
    assert!(!env.log().exists(), "nothing is logged for a run that was never asked for properly");
    let bad_policy = env.dir.join("bad.cedar");
    fs::write(&bad_policy, "permit(").unwrap();
    let out = env.isocell(&["run", "--policy", bad_policy.to_str().unwrap(), "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad"), "{}", text(&out));
    assert!(!env.vmm_started());
}

#[test]
fn surface_diff_shows_exposure_beyond_a_baseline() {
    let env = Env::new("admission", "surface");
    let out = env.isocell(&["surface"]);
    assert!(out.status.success(), "{}", text(&out));
    let surface: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["devices", "firmware", "cpu", "seccomp", "jail"] {
        assert!(!surface[key].is_null(), "{key} missing: {surface}");
    }
    // What describes the machine to the guest is part of what it can reach.
    let tables = surface["firmware"]["acpi"]["tables"].to_string();
    for sig in ["FACP", "APIC", "DSDT"] {
        assert!(tables.contains(sig), "{sig} missing: {tables}");
    }
    assert_eq!(surface["jail"]["no_new_privs"], true);
    let base = env.dir.join("base.json");
    fs::write(&base, &out.stdout).unwrap();
    let base = base.to_str().unwrap();

    let same = env.isocell(&["surface", "--diff", base]);
    assert_eq!(same.status.code(), Some(0), "{}", text(&same));
    let more = env.isocell(&["surface", "--cpus", "2", "--diff", base]);
    assert_eq!(more.status.code(), Some(1), "{}", text(&more));
    assert!(String::from_utf8_lossy(&more.stdout).contains("+ vm.vcpus = 2"), "{}", text(&more));
    let unjailed = env.isocell(&["surface", "--no-jail", "--diff", base]);
    assert_eq!(unjailed.status.code(), Some(1), "{}", text(&unjailed));
    assert!(String::from_utf8_lossy(&unjailed.stdout).contains("jail.enabled = false"));
    let missing = env.isocell(&["surface", "--diff", "/no/such.json"]);
    assert_eq!(missing.status.code(), Some(125), "{}", text(&missing));
}
