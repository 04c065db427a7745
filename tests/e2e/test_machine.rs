//! The long-lived test machine is no less strict than a fresh nested host: a scenario that
//! leaves a process or a cgroup behind in it fails, naming them, and they are gone before the
//! next scenario. Runs only where the lane has a machine (`scripts/e2e.sh` without hardware
//! virtualization); elsewhere every scenario gets a fresh host and there is nothing to check.

use isocell_e2e::shell_step;
use isocell_testhost::{HostKind, Scenario, TestHost};

const LEAK_CGROUP: &str = "/sys/fs/cgroup/isocell-e2e-leak";

#[test]
fn a_scenario_that_leaves_something_in_the_machine_fails_and_the_next_finds_it_clean() {
    let host = TestHost::detect().unwrap_or_else(|e| panic!("{e}"));
    if host.kind() != HostKind::Machine {
        eprintln!("scenarios run on a {} host here, one fresh host each", host.kind().name());
        return;
    }
    // A server and a plain `sleep` still running, and a cgroup still there, when the step and
    // the runner have ended (the `sleep` is found by the mount namespace it shares with the
    // runner, not by its name).
    let leaky = Scenario {
        steps: vec![shell_step(
            "leak",
            &format!(
                "({{hostile}} http-serve 18080 {{rootfs}} >/dev/null 2>&1 &) && \
                 (sleep 600 >/dev/null 2>&1 &) && mkdir {LEAK_CGROUP}"
            ),
            60,
        )],
        ..Default::default()
    };
    let err = match host.run(&leaky) {
        Ok(r) => panic!("a scenario that left a server and a cgroup passed: {r:?}"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("left this behind"), "{err}");
    assert!(err.contains("process:isocell-hostile"), "{err}");
    assert!(err.contains("process:sleep"), "{err}");
    assert!(err.contains(&format!("cgroup:{LEAK_CGROUP}")), "{err}");

    let after = Scenario {
        steps: vec![shell_step(
            "after",
            &format!(
                "sleepers=$(for p in /proc/[0-9]*; do \
                   [ \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\" = 'sleep 600 ' ] && echo $p; done); \
                 echo servers=$(pidof isocell-hostile | wc -w) sleepers=$(echo $sleepers | wc -w) \
                 cgroup=$(test -d {LEAK_CGROUP} && echo yes || echo no)"
            ),
            60,
        )],
        ..Default::default()
    };
    let results = host.run(&after).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(results[0].exit_code, Some(0), "{:?}", results[0]);
    assert_eq!(results[0].stdout.trim(), "servers=0 sleepers=0 cgroup=no", "{:?}", results[0]);
}
