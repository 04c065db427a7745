//! Runs a scenario's steps on the host it is started on and writes one JSON result line per
//! step. Inside the nested host it is started by the init script and powers the host off at the
//! end.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use isocell_testhost::runner::{run_scenario, Assets};
use isocell_testhost::Scenario;

/// Run test-host steps here.
#[derive(Parser)]
struct Args {
    /// Scenario JSON.
    #[arg(long)]
    scenario: PathBuf,
    /// Where result lines go (a file, or the nested host's result serial port).
    #[arg(long)]
    results: PathBuf,
    /// Scratch directory for the steps.
    #[arg(long)]
    work: PathBuf,
    /// "direct" or "nested", recorded in each result.
    #[arg(long)]
    host: String,
    /// NAME=PATH replacing {NAME} in the steps.
    #[arg(long = "asset")]
    assets: Vec<String>,
    /// Power the machine off when done (nested host only).
    #[arg(long)]
    poweroff: bool,
    /// Write a byte here every second while running (the nested host's heartbeat serial port),
    /// so the machine outside can tell a frozen host from a long step.
    #[arg(long)]
    heartbeat: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(path) = &args.heartbeat {
        start_heartbeat(path);
    }
    let outcome = run(&args);
    if let Err(e) = &outcome {
        eprintln!("isocell-testhost-runner: {e:#}");
    }
    if args.poweroff {
        power_off();
    }
    outcome
}

fn run(args: &Args) -> Result<()> {
    let text = std::fs::read_to_string(&args.scenario)
        .with_context(|| format!("reading {}", args.scenario.display()))?;
    let scenario: Scenario = serde_json::from_str(&text).context("parsing the scenario")?;
    let mut assets = Assets::new();
    for a in &args.assets {
        let (name, path) =
            a.split_once('=').with_context(|| format!("--asset {a:?} is not NAME=PATH"))?;
        assets.insert(name.to_owned(), PathBuf::from(path));
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.results)
        .with_context(|| format!("opening {}", args.results.display()))?;
    run_scenario(&scenario, &assets, &args.work, &args.host, |r| {
        if let Ok(line) = serde_json::to_string(r) {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
    Ok(())
}

/// A thread that writes one byte a second to `path` for as long as the process lives.
fn start_heartbeat(path: &std::path::Path) {
    let mut port = match std::fs::OpenOptions::new().append(true).open(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("isocell-testhost-runner: no heartbeat ({}: {e})", path.display());
            return;
        }
    };
    std::thread::spawn(move || loop {
        let _ = port.write_all(b".");
        let _ = port.flush();
        std::thread::sleep(std::time::Duration::from_secs(1));
    });
}

fn power_off() {
    // SAFETY: sync() has no preconditions; it flushes filesystem buffers.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with RB_POWER_OFF takes no pointers; as PID 1 of the nested host we
    // are allowed to and want to stop the machine here.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
}
