//! End-to-end tests of snapshots: `isocell snapshot create` saves a booted cell once its agent
//! is ready, and `isocell run --snapshot` starts copies of it. Every step shares one state
//! directory in the nested host (or this machine), so the scenario runs in order.

use std::sync::OnceLock;

use isocell_e2e::{result_of, run_scenario, shell_step, Results};
use isocell_testhost::{Scenario, StepResult};
use serde_json::Value;

/// Milliseconds since boot, for timings in busybox's shell (its `date` has no %N).
const NOW: &str = "now() { awk '{printf \"%d\", $1 * 1000}' /proc/uptime; };";

/// Shared by every step: the snapshot store is in the state directory.
const ENV: &str = "ISOCELL_RUN_DIR=/tmp/snap-run ISOCELL_STATE_DIR=/tmp/snap-state";

fn scenario() -> Scenario {
    let isocell = format!("{ENV} {{isocell}}");
    let run = format!("{isocell} run");
    let cold = format!("{run} --memory 128M");
    let warm = format!("{run} --snapshot base");
    // The same commands cold and restored: their output must match.
    let same = |label: &str, cmd: &str| {
        format!(
            "echo '== {label} cold'; {cold} {cmd}; echo \"rc=$?\"; \
             echo '== {label} restored'; {warm} {cmd}; echo \"rc=$?\"; "
        )
    };
    let mut same_results = String::from(
        "exec 2>&1; head -c 3000000 /dev/urandom > /tmp/in.bin; echo input=$(sha256sum /tmp/in.bin | cut -c1-64); ",
    );
    same_results.push_str(&same("echo", "-- echo hello-from-a-cell"));
    same_results.push_str(&same("exit", "-- sh -c 'exit 42'"));
    same_results.push_str(&same("streams", "-- sh -c 'echo to-stdout; echo to-stderr >&2' 2>&1"));
    same_results.push_str(&same(
        "input",
        "--input /tmp/in.bin:/data/in.bin -- sh -c 'sha256sum /data/in.bin | cut -c1-64'",
    ));
    same_results.push_str(&same(
        "output",
        "--output /tmp/o.bin:/tmp/out.bin -- sh -c 'echo produced > /tmp/o.bin' && cat /tmp/out.bin",
    ));
    same_results
        .push_str(&same("identity", "-- sh -c 'hostname; cat /etc/resolv.conf | wc -l; id'"));
    same_results.push_str(&same("not-found", "-- no-such-command"));
    Scenario {
        steps: vec![
            shell_step(
                "create",
                &format!(
                    "exec 2>&1; {NOW} t0=$(now); {isocell} snapshot create base --memory 128M; echo \"rc=$?\"; \
                     echo create_ms=$(( $(now) - t0 )); \
                     {isocell} snapshot list; ls -ln /tmp/snap-state/snapshots/base; \
                     stat -c 'dir=%a' /tmp/snap-state/snapshots/base; \
                     {isocell} snapshot create base --memory 128M; echo \"again rc=$?\"; \
                     {isocell} snapshot create Bad/Name; echo \"bad-name rc=$?\"; \
                     {warm}-missing -- true; echo \"missing rc=$?\"; \
                     echo leftover_files=$(ls -A /tmp/snap-run | wc -l) staging=$(ls -A /tmp/snap-state/snapshots | grep -c '^\\.')"
                ),
                300,
            ),
            shell_step("same-results", &same_results, 600),
            shell_step(
                "clones",
                &format!(
                    "exec 2>&1; for i in 1 2; do ({warm} -- sh -c 'head -c 32 /dev/urandom | od -An -tx1 | tr -d \" \\n\"; echo; \
                       cat /proc/sys/kernel/random/boot_id; date +%s; echo mine-$$ > /tmp/w; ls /tmp' > /tmp/clone$i.out; \
                       echo $? > /tmp/clone$i.rc) & done; wait; \
                     for i in 1 2; do echo \"clone$i rc=$(cat /tmp/clone$i.rc)\"; sed \"s/^/clone$i /\" /tmp/clone$i.out; done; \
                     echo host_time=$(date +%s)"
                ),
                300,
            ),
            shell_step(
                "evidence",
                &format!(
                    "exec 2>&1; {warm} --report /tmp/r.json -- true; echo \"rc=$?\"; \
                     l=$(ls -t /tmp/snap-state/cells/*/launch.json | head -n 1); \
                     {isocell} receipt verify $l && echo receipt-ok; {isocell} audit verify && echo audit-ok; \
                     echo launch-receipt; cat $l; echo; echo restore-report; cat /tmp/r.json"
                ),
                180,
            ),
            shell_step(
                "twenty",
                &format!(
                    "exec 2>&1; {NOW} m=/tmp/snap-state/snapshots/base/memory; before=$(sha256sum $m | cut -c1-64); \
                     for i in $(seq 1 20); do {warm} -- true || echo \"cell $i failed\"; done; \
                     after=$(sha256sum $m | cut -c1-64); \
                     echo before=$before after=$after; grep -o '\"memory_digest\": *\"[^\"]*\"' /tmp/snap-state/snapshots/base/manifest.json; \
                     echo leftover_files=$(ls -A /tmp/snap-run | wc -l)"
                ),
                600,
            ),
            shell_step(
                "daemon",
                &format!(
                    "exec 2>&1; D=/tmp/snap-daemon; mkdir -p $D; export ISOCELL_HOST=unix://$D/d.sock; \
                     printf 'socket = \"%s\"\\nstate_dir = \"/tmp/snap-state\"\\nrun_dir = \"%s\"\\nidle_timeout_secs = 0\\n' $D/d.sock $D/run > $D/d.toml; \
                     ({{isocelld}} --config $D/d.toml 2> $D/daemon.log &); \
                     for i in $(seq 300); do {isocell} cell ls > /dev/null 2>&1 && break; sleep 0.1; done; \
                     id=$({isocell} cell create --snapshot base); echo \"create rc=$?\"; \
                     {isocell} cell ls | grep -c 'snapshot:base' | sed 's/^/listed=/'; \
                     {isocell} cell exec $id -- sh -c 'echo random=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d \" \\n\")'; \
                     {isocell} cell exec $id -- sh -c 'echo second-exec-ok'; \
                     {isocell} cell create --snapshot base --cpus 2; echo \"conflict rc=$?\"; \
                     {isocell} cell create --snapshot nope; echo \"missing rc=$?\"; \
                     {isocell} cell rm $id > /dev/null; echo \"rm rc=$?\"; \
                     for p in $(pidof isocelld); do grep -q $D/d.toml /proc/$p/cmdline && kill $p; done; \
                     l=$(ls -t /tmp/snap-state/cells/*/launch.json | head -n 1); echo restored_in_receipt=$(grep -c 'restored' $l)"
                ),
                300,
            ),
            shell_step(
                "refusals",
                &format!(
                    "exec 2>&1; {warm} --classification confidential -- true; echo \"classified rc=$?\"; \
                     m=/tmp/snap-state/snapshots/base/memory; \
                     orig=$(dd if=$m bs=1 skip=1048576 count=1 2>/dev/null | od -An -tu1 | tr -d ' '); \
                     printf '\\377' | dd of=$m bs=1 seek=1048576 conv=notrunc 2>/dev/null; \
                     [ \"$orig\" = 255 ] && printf '\\000' | dd of=$m bs=1 seek=1048576 conv=notrunc 2>/dev/null; \
                     {warm} -- true; echo \"tampered rc=$?\"; \
                     cp {{vmlinux}} /tmp/k2 && {isocell} snapshot create k2 --memory 128M --kernel /tmp/k2 >/dev/null; echo \"k2 rc=$?\"; \
                     printf 'x' >> /tmp/k2; {run} --snapshot k2 -- true; echo \"other-kernel rc=$?\"; \
                     {isocell} snapshot rm k2; echo \"rm rc=$?\"; {isocell} snapshot list | grep -c k2"
                ),
                300,
            ),
        ],
        ..Default::default()
    }
}

fn results() -> &'static Results {
    static RESULTS: OnceLock<Results> = OnceLock::new();
    RESULTS.get_or_init(|| run_scenario("snapshot", &scenario()))
}

fn step(name: &str) -> &'static StepResult {
    let r = result_of(results(), name);
    eprintln!("{}", r.stdout);
    r
}

#[test]
fn the_daemon_creates_cells_from_a_snapshot() {
    let r = step("daemon");
    let out = &r.stdout;
    assert!(out.contains("create rc=0"), "{}", r.explain());
    assert!(out.contains("listed=1"), "the cell list names the snapshot\n{}", r.explain());
    let random = out.lines().find_map(|l| l.strip_prefix("random=")).unwrap_or_default();
    assert_eq!(random.len(), 32, "{}", r.explain());
    assert!(out.contains("second-exec-ok"), "{}", r.explain());
    // A create that also names what the snapshot fixes never reaches the daemon; one naming a
    // snapshot that does not exist is refused by it.
    assert!(
        out.contains("conflict rc=125") && out.contains("cannot be used with"),
        "{}",
        r.explain()
    );
    assert!(
        out.contains("missing rc=125") && out.contains("no snapshot named nope"),
        "{}",
        r.explain()
    );
    assert!(out.contains("rm rc=0"), "{}", r.explain());
    assert!(!out.contains("restored_in_receipt=0"), "{}", r.explain());
}

fn lines_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    text.split(marker).nth(1).map_or_else(Vec::new, |t| t.lines().skip(1).collect())
}

#[test]
fn a_snapshot_is_created_root_only_and_a_bad_request_is_refused() {
    let r = step("create");
    let out = &r.stdout;
    assert!(out.contains("\nrc=0") || out.starts_with("rc=0"), "{}", r.explain());
    assert!(out.contains("\"name\":\"base\""), "{}", r.explain());
    assert!(out.contains("dir=750"), "{}", r.explain());
    // Root's; the VMM's files readable by the snapshot readers' group too, the manifest not.
    // isocell_jail::SNAPSHOT_READER_GID, 0x7100_0000.
    let readers = "-rw-r----- 1 0 1895825408";
    for (f, owner) in
        [("manifest.json", "-rw------- 1 0 0"), ("memory", readers), ("vm.json", readers)]
    {
        let line = out.lines().find(|l| l.ends_with(f)).unwrap_or_default();
        let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(line.starts_with(owner), "{f}: {line}\n{}", r.explain());
    }
    assert!(out.contains("again rc=125") && out.contains("exists already"), "{}", r.explain());
    assert!(out.contains("bad-name rc=125"), "{}", r.explain());
    assert!(out.contains("missing rc=125") && out.contains("no snapshot named"), "{}", r.explain());
    assert!(out.contains("leftover_files=0 staging=0"), "{}", r.explain());
}

#[test]
fn a_restored_cell_gives_the_same_results_as_a_cold_one() {
    let r = step("same-results");
    let out = &r.stdout;
    for label in ["echo", "exit", "streams", "input", "output", "identity", "not-found"] {
        let cold: Vec<&str> = lines_after(out, &format!("== {label} cold"))
            .into_iter()
            .take_while(|l| !l.starts_with("== "))
            .collect();
        let warm: Vec<&str> = lines_after(out, &format!("== {label} restored"))
            .into_iter()
            .take_while(|l| !l.starts_with("== "))
            .collect();
        assert!(!cold.is_empty(), "{label}\n{}", r.explain());
        // stdout and stderr are separate streams: their lines may interleave either way.
        let (mut cold, mut warm) = (cold, warm);
        cold.sort_unstable();
        warm.sort_unstable();
        assert_eq!(cold, warm, "{label}\n{}", r.explain());
    }
    assert!(out.contains("hello-from-a-cell\nrc=0"), "{}", r.explain());
    assert!(out.contains("rc=42"), "{}", r.explain());
    assert!(out.contains("rc=127"), "{}", r.explain());
    let input = out.lines().find_map(|l| l.strip_prefix("input=")).unwrap_or("none");
    assert_eq!(out.matches(input).count(), 3, "{}", r.explain());
}

#[test]
fn two_clones_read_different_random_bytes_and_keep_their_own_writes_and_clock() {
    let r = step("clones");
    let out = &r.stdout;
    assert!(out.contains("clone1 rc=0") && out.contains("clone2 rc=0"), "{}", r.explain());
    let field = |clone: &str, n: usize| -> String {
        out.lines()
            .filter_map(|l| l.strip_prefix(&format!("{clone} ")))
            .filter(|l| !l.starts_with("rc="))
            .nth(n)
            .unwrap_or_default()
            .to_owned()
    };
    // First read of /dev/urandom, and the boot id, differ between the copies.
    assert_eq!(field("clone1", 0).len(), 64, "{}", r.explain());
    assert_ne!(field("clone1", 0), field("clone2", 0), "{}", r.explain());
    assert_ne!(field("clone1", 1), field("clone2", 1), "{}", r.explain());
    // The clock was set from the host's, not left where the snapshot stopped it.
    let host: i64 =
        out.lines().find_map(|l| l.strip_prefix("host_time=")?.parse().ok()).unwrap_or(0);
    for clone in ["clone1", "clone2"] {
        let t: i64 = field(clone, 2).parse().unwrap_or(0);
        assert!((host - t).abs() < 120, "{clone} clock {t}, host {host}\n{}", r.explain());
        // Each sees only its own /tmp file.
        assert_eq!(field(clone, 3), "w", "{}", r.explain());
    }
}

#[test]
fn a_restored_cell_says_so_in_its_receipt_and_measurement() {
    let r = step("evidence");
    let out = &r.stdout;
    assert!(out.contains("rc=0") && out.contains("receipt-ok") && out.contains("audit-ok"));
    let receipt: Value = out
        .split("launch-receipt")
        .nth(1)
        .and_then(|t| t.split("restore-report").next())
        .and_then(|j| serde_json::from_str(j.trim()).ok())
        .unwrap_or_else(|| panic!("no launch receipt\n{}", r.explain()));
    let body = &receipt["receipt"];
    assert_eq!(body["start"]["kind"], "restored", "{receipt}");
    assert_eq!(body["start"]["snapshot"], "base", "{receipt}");
    assert!(body["start"]["memory_digest"].as_str().is_some_and(|d| d.starts_with("sha256:")));
}

#[test]
fn twenty_cells_leave_the_snapshot_unchanged_and_nothing_behind() {
    let r = step("twenty");
    let out = &r.stdout;
    assert!(!out.contains("failed"), "{}", r.explain());
    let pair = out.lines().find(|l| l.starts_with("before=")).unwrap_or_default();
    let (before, after) = pair.split_once(" after=").unwrap_or_default();
    assert_eq!(before.trim_start_matches("before="), after, "{}", r.explain());
    assert!(out.contains(&format!("sha256:{after}")), "manifest digest\n{}", r.explain());
    assert!(out.contains("leftover_files=0"), "{}", r.explain());
}

#[test]
fn classified_data_a_tampered_snapshot_and_another_kernel_are_refused() {
    let r = step("refusals");
    let out = &r.stdout;
    assert!(out.contains("classified rc=77"), "{}", r.explain());
    assert!(out.contains("classified-needs-cold-boot"), "{}", r.explain());
    assert!(out.contains("tampered rc=125") && out.contains("has changed since it was taken"));
    assert!(out.contains("k2 rc=0"), "{}", r.explain());
    assert!(out.contains("other-kernel rc=125"), "{}", r.explain());
    assert!(out.contains("was taken with another kernel"), "{}", r.explain());
    assert!(out.contains("rm rc=0\n0"), "{}", r.explain());
}
