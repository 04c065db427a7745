//! The machine series (`machine.json`): `isocell run -- true` on this host through a warm
//! `isocell machine`, against the same command in a fresh nested host per run (what such a
//! host paid before the machine), against the bare cell boot inside the machine (the same
//! command run in the machine itself). All three in one run, alternating.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use isocell_testhost::stats::{summarize, Summary};
use isocell_testhost::{Scenario, Step, TestHost};
use serde_json::{json, Value};

use crate::{print_row, ratio};

/// Target: a run through a warm machine at most this multiple of the bare boot inside it.
const MACHINE_TARGET_RATIO: f64 = 1.3;

/// Fresh nested hosts are slow (a whole host boot each): at most this many.
const MAX_FRESH_RUNS: usize = 3;

/// One timed command; its wall time in ms, failing on a non-zero status.
fn timed(cmd: &mut Command, what: &str) -> Result<f64> {
    let t = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().with_context(|| what.to_owned())?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!(
            "{what} failed ({:?}):\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(ms)
}

struct Isocell {
    bin: PathBuf,
    dir: PathBuf,
}

impl Isocell {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).env("ISOCELL_MACHINE_DIR", &self.dir);
        c
    }
}

/// Runs the series and writes `machine.json` into `out`.
pub fn bench(runs: usize, isocell: &Path, host: &TestHost, out: &Path) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let m = Isocell { bin: isocell.to_owned(), dir: tmp.path().join("machine") };
    timed(&mut m.cmd(&["machine", "init", "--memory", "2G", "--disk", "2G"]), "machine init")?;
    let started = timed(&mut m.cmd(&["machine", "start"]), "machine start");
    let result = started.and_then(|start_ms| series(runs, &m, host, start_ms, out));
    let _ = m.cmd(&["machine", "rm", "--force"]).output();
    result
}

fn series(runs: usize, m: &Isocell, host: &TestHost, start_ms: f64, out: &Path) -> Result<()> {
    let fresh_runs = runs.min(MAX_FRESH_RUNS);
    eprintln!(
        "isocell-bench: machine series: {runs} runs through the machine and inside it, {fresh_runs} in fresh nested hosts (+1 warm-up each)"
    );
    let (mut warm, mut bare, mut exec, mut fresh) = (vec![], vec![], vec![], vec![]);
    for i in 0..=runs {
        let w = timed(&mut m.cmd(&["run", "--", "true"]), "isocell run through the machine")?;
        let b = timed(
            &mut m.cmd(&["machine", "exec", "--", "/isocell/bin/isocell", "run", "--", "true"]),
            "isocell run inside the machine",
        )?;
        // What `machine exec` itself costs, so the bare figure can be told without it.
        let e = timed(&mut m.cmd(&["machine", "exec", "--", "true"]), "machine exec true")?;
        if i > 0 {
            warm.push(w);
            bare.push(b);
            exec.push(e);
        }
        if i <= fresh_runs {
            let step = Step::new(format!("fresh-{i}"), &["{isocell}", "run", "--", "true"], 300);
            let t = Instant::now();
            let results = host.run(&Scenario { steps: vec![step], ..Default::default() })?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if let Some(bad) = results.iter().find(|r| r.exit_code != Some(0)) {
                bail!("isocell run in a fresh nested host failed:\n{}", bad.explain());
            }
            if i > 0 {
                fresh.push(ms);
            }
        }
    }
    let (warm, bare, exec, fresh) =
        (summarize(&warm), summarize(&bare), summarize(&exec), summarize(&fresh));
    let bare_net = bare.zip(exec).map(|(b, e)| Summary { median: b.median - e.median, ..b });
    let warm_vs_bare = ratio(warm, bare_net);
    let fresh_vs_warm = ratio(fresh, warm);
    println!("\n`isocell run -- true` on a host without hardware virtualization (ms):");
    print_row("through a warm machine", warm, "ms");
    print_row("bare, inside the machine", bare, "ms");
    print_row("machine exec of `true`", exec, "ms");
    print_row("in a fresh nested host", fresh, "ms");
    println!("machine start (cold, to its daemon answering): {start_ms:.0} ms");
    if let Some(r) = warm_vs_bare {
        let verdict = if r <= MACHINE_TARGET_RATIO { "met" } else { "NOT met" };
        println!(
            "warm machine / bare boot inside it (less the exec's own cost): {r:.2}x (target {MACHINE_TARGET_RATIO}x: {verdict})"
        );
    }
    if let Some(r) = fresh_vs_warm {
        println!("a fresh nested host per run / a warm machine: {r:.1}x");
    }
    let doc: Value = json!({
        "series": "isocell run -- true",
        "warm_machine_ms": warm,
        "bare_in_machine_ms": bare,
        "machine_exec_true_ms": exec,
        "bare_in_machine_less_exec_ms": bare_net.map(|s| s.median),
        "fresh_nested_host_ms": fresh,
        "machine_start_ms": start_ms,
        "warm_over_bare": warm_vs_bare,
        "target_warm_over_bare": MACHINE_TARGET_RATIO,
        "fresh_over_warm": fresh_vs_warm,
    });
    let path = out.join("machine.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
