//! Runs a scenario's steps on the host it is started on and writes one JSON result line per
//! step. Inside the nested host it is started by the init script and powers the host off at the
//! end; in a long-lived machine it is started through `isocell machine exec`.

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
    /// Where result lines go: a file, or `ioport:PORT` (the nested host's debug console, an
    /// output-only I/O port that raises no interrupts; see `results_port`).
    #[arg(long)]
    results: PathBuf,
    /// Scratch directory for the steps.
    #[arg(long)]
    work: PathBuf,
    /// "direct", "nested" or "machine", recorded in each result.
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
    // Orphans of the steps (a VMM whose jailer was killed) are ours to reap: as PID 1 of the
    // nested host, and as their subreaper in a long-lived machine, where init would leave them.
    if std::process::id() != 1 {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and changes only this process.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    isocell_testhost::runner::reap_orphans();
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
    let mut out: Box<dyn Write> =
        match args.results.to_str().and_then(|s| s.strip_prefix("ioport:")) {
            Some(port) => Box::new(results_port(port)?),
            None => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&args.results)
                    .with_context(|| format!("opening {}", args.results.display()))?,
            ),
        };
    run_scenario(&scenario, &assets, &args.work, &args.host, |r| {
        if let Ok(line) = serde_json::to_string(r) {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
    Ok(())
}

/// An output-only I/O port (QEMU's `isa-debugcon`) as a writer.
///
/// Result lines carry each step's console (up to 64 KiB), so over a 16550 UART a scenario of
/// console-on guests cost the nested host hundreds of thousands of UART interrupts (768017 in one
/// 46-step run). The debug console takes a whole line in one `rep outsb` and raises none.
struct IoPort(u16);

fn results_port(text: &str) -> Result<IoPort> {
    let port = u16::from_str_radix(text.trim_start_matches("0x"), 16)
        .with_context(|| format!("ioport:{text} is not a hex port number"))?;
    // SAFETY: ioperm changes only this process's I/O permission bitmap.
    if unsafe { libc::ioperm(libc::c_ulong::from(port), 1, 1) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("ioperm({port:#x})"));
    }
    let mut p = IoPort(port);
    // A line break first, so nothing the firmware left on the port joins the first result.
    p.write_all(b"\n")?;
    Ok(p)
}

impl Write for IoPort {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: ioperm granted this port; `rep outsb` reads exactly `buf.len()` bytes from
        // `buf` (the direction flag is clear, as the ABI guarantees) and writes only the port.
        unsafe {
            std::arch::asm!(
                "rep outsb",
                in("dx") self.0,
                inout("rsi") buf.as_ptr() => _,
                inout("rcx") buf.len() => _,
                options(nostack, preserves_flags, readonly)
            );
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
