//! The Kubernetes series (`cri.json`): a pod's start to its container running, through
//! containerd's CRI plugin and the shim (`isocell-cri`, the calls kubelet makes), against
//! `isocell run` of the same image to its command starting (the run's wall time less the
//! command and the teardown). Same image, same state directory (both conversions cached after
//! the warm-up), one nested host, alternating.

use std::path::Path;

use anyhow::{bail, Context, Result};
use isocell_testhost::containerd;
use isocell_testhost::stats::summarize;
use isocell_testhost::{Scenario, Step, StepResult, TestHost};
use serde_json::json;

use crate::{print_row, ratio, run_phase};

/// Each pod boots a cell under emulation after a fresh containerd: at most this many runs.
const MAX_RUNS: usize = 4;

/// Both series keep their converted images here, so the warm-up converts and the rest reuse.
const STATE: &str = "/tmp/isocell-bench-cri-state";

fn step(name: String, script: String, report: Option<&str>) -> Step {
    Step { report_file: report.map(str::to_owned), ..Step::new(name, &["sh", "-c", &script], 600) }
}

fn pod_ms(r: &StepResult) -> Option<f64> {
    r.stdout
        .lines()
        .find_map(|l| l.strip_prefix("pod_to_running_ms="))
        .and_then(|v| v.trim().parse().ok())
}

fn run_to_command_ms(r: &StepResult) -> Option<f64> {
    let wall = r.wall_us as f64 / 1000.0;
    Some(wall - run_phase(r, "exec_ms")? - run_phase(r, "teardown_ms")?)
}

/// Runs the series and writes `cri.json` into `out`.
pub fn bench(runs: usize, host: &TestHost, out: &Path) -> Result<()> {
    let runs = runs.min(MAX_RUNS);
    eprintln!("isocell-bench: Kubernetes series: {runs} pods and `isocell run`s (+1 warm-up each)");
    let tmp = tempfile::tempdir()?;
    let files = containerd::files(tmp.path()).map_err(anyhow::Error::msg)?;
    let pod =
        "mkdir -p $D/logs\n{cri} --log-dir $D/logs --handler isocell --image $IMG -- sleep 600\n\
               kill $CPID; wait $CPID";
    // Each pod step's prelude puts the e2fsprogs wrappers in /isocell/bin, where the
    // `isocell run` steps after it find them too.
    let mut steps = Vec::new();
    for i in 0..=runs {
        let name = format!("pod-{i}");
        let script = format!("STATE={STATE}\n{}", containerd::script(&name, true, pod));
        steps.push(step(name, script, None));
        let run = format!(
            "PATH=/isocell/bin:$PATH ISOCELL_STATE_DIR={STATE} exec {{isocell}} run --report {{work}}/run.json oci-archive:{{image}} -- true"
        );
        steps.push(step(format!("run-{i}"), run, Some("{work}/run.json")));
    }
    let results = host.run(&Scenario { steps, files })?;
    if let Some(bad) =
        results.iter().find(|r| r.exit_code != Some(0) || r.stdout.contains("failed="))
    {
        bail!("a Kubernetes series step failed:\n{}", bad.explain());
    }
    let measured = |prefix: &str| -> Vec<&StepResult> {
        results.iter().filter(|r| r.name.starts_with(prefix) && !r.name.ends_with("-0")).collect()
    };
    let pods: Vec<f64> = measured("pod-").into_iter().filter_map(pod_ms).collect();
    let run_list: Vec<f64> = measured("run-").into_iter().filter_map(run_to_command_ms).collect();
    if pods.len() != runs || run_list.len() != runs {
        bail!(
            "the Kubernetes series did not report every run ({} pods, {} runs)",
            pods.len(),
            run_list.len()
        );
    }
    let (pods, run_list) = (summarize(&pods), summarize(&run_list));
    let over = ratio(pods, run_list);
    println!("\nthe same image to its command running (ms):");
    print_row("pod through CRI and the shim", pods, "ms");
    print_row("isocell run", run_list, "ms");
    if let Some(r) = over {
        println!("pod start to container running / isocell run to its command: {r:.2}x");
    }
    let doc = json!({
        "series": "busybox image, to the command running",
        "pod_to_running_ms": pods,
        "isocell_run_to_command_ms": run_list,
        "pod_over_run": over,
        "runs": runs,
    });
    let path = out.join("cri.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
