//! The hostile-guest campaign, end to end: `isocell-hostile` runs as root in real cells, freezes
//! the agent and speaks the protocol itself, writes garbage to every virtio-mmio register, and
//! touches a million unmapped addresses. Each run must end within its deadline with a clear
//! outcome, the VMM within its memory limit, a concurrent cell untouched, nothing left behind,
//! and the receipts and the audit log complete. All cells run in one scenario, so the nested
//! host boots once for this file.

use std::sync::OnceLock;

use isocell_e2e::{result_of, run_scenario, shell_step, Results};
use isocell_testhost::{Scenario, StepResult};

/// After a run: what is left behind, and whether the evidence is complete (the audit log
/// verifies and every cell that started has a verifying exit receipt).
const AFTER: &str = "echo leftover_vmms=$(ps -o args | grep -c '^[^ ]*isocell-vm[m]'); \
     echo leftover_files=$(ls -A {work}/run | wc -l); \
     echo leftover_cgroups=$(find /sys/fs/cgroup/isocell -mindepth 1 -type d 2>/dev/null | wc -l); \
     ISOCELL_STATE_DIR={work}/state {isocell} audit verify >/dev/null && echo audit=ok; \
     n=0; for f in {work}/state/cells/*/exit.json; do \
       ISOCELL_STATE_DIR={work}/state {isocell} receipt verify $f >/dev/null && n=$((n+1)); done; \
     echo exit_receipts=$n; \
     grep -ho '\"outcome\": *\"[a-z_]*\"' {work}/state/cells/*/exit.json | tr -d ' \"' | sed 's/^/receipt_/'; \
     grep -h -A5 '\"teardown_checks\"' {work}/state/cells/*/exit.json | grep -c false | sed 's/^/failed_checks=/'";

/// `isocell run` with the attacker passed in and ARGS, its status, then `then` (more shell) and
/// the checks of [`AFTER`].
fn run(args: &str, then: &str) -> String {
    format!(
        "ISOCELL_RUN_DIR={{work}}/run ISOCELL_STATE_DIR={{work}}/state {{isocell}} run \
         --input {{hostile}}:/hostile {args}; echo status=$?; {then} {AFTER}"
    )
}

fn scenario() -> Scenario {
    let mut unmapped = shell_step(
        "million-unmapped-reads",
        &run(
            "--report {work}/r.json -- /hostile unmapped 1000000",
            "grep -o '\"oom_kills\": *[0-9]*' {work}/state/cells/*/exit.json | tr -d ' \"';",
        ),
        900,
    );
    unmapped.report_file = Some("{work}/r.json".into());
    Scenario {
        steps: vec![
            shell_step(
                "silence-after-exit",
                &run(
                    "--copy-timeout 5 --output /o:{work}/out -- /hostile protocol silence",
                    "echo out_exists=$(test -e {work}/out && echo yes || echo no);",
                ),
                300,
            ),
            shell_step(
                "oversize-output",
                &run(
                    "--output /o:{work}/out -- /hostile protocol oversize",
                    "echo left_in_work=$(ls -A {work} | grep -v -e '^run$' -e '^state$' -e '^stdout$' -e '^stderr$' | tr '\\n' ' ').;",
                ),
                300,
            ),
            shell_step(
                "dotdot-output",
                &format!(
                    "mkdir -p {{work}}/d; {}",
                    run(
                        "--output /o:{work}/d/out -- /hostile protocol dotdot",
                        "echo escaped=$(ls {work}/escape {work}/d/escape 2>/dev/null | wc -l) \
                         left_in_d=$(ls -A {work}/d | wc -l);",
                    )
                ),
                300,
            ),
            shell_step(
                "output-flood",
                &run("--timeout 10 -- /hostile protocol flood > /dev/null", ""),
                300,
            ),
            shell_step("no-exit-status", &run("-- /hostile protocol no-status", ""), 300),
            shell_step("garbage-frame", &run("-- /hostile protocol garbage", ""), 300),
            shell_step(
                "mmio-garbage-beside-a-peer",
                // The peer reads its stdin until the attack has ended (the host then closes the
                // FIFO), so it is running for the whole attack, not only the first seconds.
                &format!(
                    "mkfifo {{work}}/peer.in; \
                     (ISOCELL_RUN_DIR={{work}}/peer-run ISOCELL_STATE_DIR={{work}}/peer-state {{isocell}} run -i \
                     -- sh -c 'cat > /dev/null; echo peer-untouched' < {{work}}/peer.in > {{work}}/peer.out 2>&1; \
                     echo $? > {{work}}/peer.rc) & exec 3> {{work}}/peer.in; {}",
                    run(
                        "--timeout 60 -- /hostile mmio",
                        "exec 3>&-; wait; echo peer=$(cat {work}/peer.out) rc=$(cat {work}/peer.rc);"
                    )
                ),
                400,
            ),
            unmapped,
            shell_step(
                "special-files-in-an-output",
                &run(
                    "--output /o:{work}/special -- sh -c 'mkdir /o && echo plain > /o/a && \
                     touch /o/zero && mount --bind /dev/zero /o/zero && mkfifo /o/fifo && \
                     ln -s /etc/passwd /o/link'",
                    "echo copied=$(ls -A {work}/special | tr '\\n' ' ').;",
                ),
                300,
            ),
            shell_step(
                "sparse-file-over-the-cap",
                &run(
                    "--output-max-bytes 64M --output /big:{work}/big -- truncate -s 4G /big",
                    "echo big_exists=$(test -e {work}/big && echo yes || echo no);",
                ),
                300,
            ),
        ],
        ..Default::default()
    }
}

fn results() -> &'static Results {
    static RESULTS: OnceLock<Results> = OnceLock::new();
    RESULTS.get_or_init(|| run_scenario("hostile guest", &scenario()))
}

/// The step's result, with what every hostile run must show: it ended with `status`, left
/// nothing behind, and left complete, verifying evidence with every teardown check passed.
fn attacked(name: &str, status: &str, outcome: &str) -> &'static StepResult {
    let r = result_of(results(), name);
    for want in [
        format!("status={status}"),
        "leftover_vmms=0".into(),
        "leftover_files=0".into(),
        "leftover_cgroups=0".into(),
        "audit=ok".into(),
        "exit_receipts=1".into(),
        format!("receipt_outcome:{outcome}"),
        "failed_checks=0".into(),
    ] {
        assert!(r.stdout.contains(&want), "{name}: no {want:?}\n{}", r.explain());
    }
    r
}

#[test]
fn silence_after_exit_is_bounded_by_the_copy_timeout() {
    let r = attacked("silence-after-exit", "125", "exited");
    assert!(r.stderr.contains("--copy-timeout 5"), "{}", r.explain());
    assert!(r.stdout.contains("out_exists=no"), "{}", r.explain());
}

#[test]
fn an_output_larger_than_declared_is_refused_and_nothing_is_left() {
    let r = attacked("oversize-output", "125", "exited");
    assert!(r.stderr.contains("more than the 1 bytes it declared"), "{}", r.explain());
    assert!(r.stdout.contains("left_in_work=."), "{}", r.explain());
}

#[test]
fn an_output_path_with_dotdot_is_refused() {
    let r = attacked("dotdot-output", "125", "exited");
    assert!(r.stderr.contains("unsafe path"), "{}", r.explain());
    assert!(r.stdout.contains("escaped=0 left_in_d=0"), "{}", r.explain());
}

#[test]
fn an_output_flood_still_times_out() {
    attacked("output-flood", "124", "timed_out");
}

#[test]
fn a_missing_exit_status_is_a_failure_not_success() {
    let r = attacked("no-exit-status", "125", "no_exit_status");
    assert!(r.stderr.contains("no valid exit status"), "{}", r.explain());
}

#[test]
fn a_garbage_frame_fails_the_run_cleanly() {
    let r = attacked("garbage-frame", "125", "failed");
    assert!(r.stderr.contains("bad frame"), "{}", r.explain());
}

#[test]
fn mmio_garbage_kills_at_most_its_own_cell() {
    let r = result_of(results(), "mmio-garbage-beside-a-peer");
    assert!(r.stdout.contains("peer=peer-untouched rc=0"), "{}", r.explain());
    for want in ["leftover_vmms=0", "leftover_files=0", "leftover_cgroups=0", "audit=ok"] {
        assert!(r.stdout.contains(want), "no {want:?}\n{}", r.explain());
    }
    assert!(r.stdout.contains("exit_receipts=1"), "{}", r.explain());
    assert!(r.stdout.contains("failed_checks=0"), "{}", r.explain());
}

#[test]
fn a_million_unmapped_reads_do_not_grow_the_vmm() {
    let r = attacked("million-unmapped-reads", "0", "exited");
    assert!(r.stdout.contains("read 1000000 unmapped addresses"), "{}", r.explain());
    assert!(r.stdout.contains("oom_kills:0"), "{}", r.explain());
    // The exits were counted, in one fixed bucket, and the VMM's own memory stayed small
    // (before: one map entry per address, 33 -> 96 MB, OOM-killed in the jail's cgroup).
    let vmm = &r.report.as_ref().expect("the run report")["vmm"];
    let unmapped_reads = vmm["exit_counts"]
        .as_array()
        .and_then(|counts| {
            counts.iter().find(|c| c[0] == "mmio_read unmapped").and_then(|c| c[1].as_u64())
        })
        .unwrap_or(0);
    assert!(unmapped_reads >= 1_000_000, "{vmm}");
    let overhead = vmm["memory"]["vmm_overhead_kib"].as_u64().unwrap_or(u64::MAX);
    assert!(overhead < 16 * 1024, "VMM overhead {overhead} KiB: {vmm}");
}

#[test]
fn devices_fifos_and_links_in_an_output_are_not_copied() {
    // Before: the bind-mounted /dev/zero was streamed until the host's disk was full.
    let r = attacked("special-files-in-an-output", "0", "exited");
    assert!(r.stdout.contains("copied=a ."), "{}", r.explain());
}

#[test]
fn a_sparse_file_over_the_byte_cap_is_refused_before_it_is_copied() {
    let r = attacked("sparse-file-over-the-cap", "125", "exited");
    assert!(r.stderr.contains("--output-max-bytes"), "{}", r.explain());
    assert!(r.stdout.contains("big_exists=no"), "{}", r.explain());
}
