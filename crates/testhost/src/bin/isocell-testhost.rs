//! `isocell-testhost`: run the VMM, or a scenario, on real KVM (directly or in the nested host).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use isocell_testhost::{host, Scenario, Step, TestHost};

/// Run IsoCell VMs on real KVM: directly where this machine has hardware virtualization, inside
/// a QEMU TCG nested host otherwise.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Say which host scenarios would run on.
    Info,
    /// Run `isocell-vmm ARGS`; {bzimage}, {vmlinux}, {rootfs} and {work} are replaced with paths
    /// on the test host. Prints the guest console and exits with the VMM's status.
    Vmm {
        /// Kill the VMM after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Arguments for isocell-vmm.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run `isocell ARGS` (for example `run -- echo hi`); the cell kernel and base image are
    /// the project's. Prints its output and exits with its status.
    Isocell {
        /// Kill it after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// An image store (a state directory's `images/`) whose converted images the nested
        /// host's isocell should have: pull on this machine, run in the nested host.
        #[arg(long, value_name = "DIR")]
        images: Option<PathBuf>,
        /// Arguments for isocell.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run a scenario file and print the results as JSON.
    Run {
        /// Scenario JSON.
        scenario: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("isocell-testhost: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let th = TestHost::detect()?;
    match cli.command {
        Cmd::Info => {
            println!("{}", th.kind().name());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vmm { timeout, args } => run_one(&th, "vmm", timeout, args, None),
        Cmd::Isocell { timeout, images, args } => run_one(&th, "isocell", timeout, args, images),
        Cmd::Run { scenario } => {
            let text = std::fs::read_to_string(&scenario)
                .with_context(|| format!("reading {}", scenario.display()))?;
            let scenario: Scenario = serde_json::from_str(&text).context("parsing the scenario")?;
            let results = th.run(&scenario)?;
            host::print_results(&results);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs `{program} ARGS` as one step on the test host, prints what it printed and returns its
/// exit status.
fn run_one(
    th: &TestHost,
    program: &str,
    timeout: u64,
    args: Vec<String>,
    images: Option<PathBuf>,
) -> Result<ExitCode> {
    let nested = !th.kind().has_hardware_kvm();
    if nested {
        eprintln!("isocell-testhost: no hardware virtualization here; running inside the nested host (QEMU TCG, 10-15x slower)");
    }
    let mut argv = vec![format!("{{{program}}}")];
    let mut files = std::collections::BTreeMap::new();
    // The nested host gets a copy of the store's converted images and names (not its blobs),
    // linked where its isocell keeps images. A direct host already has the store itself.
    let copy = tempfile::tempdir().context("a temporary directory")?;
    if let (Some(dir), true) = (&images, nested) {
        let store = copy.path().join("images");
        isocell_testhost::registry::copy_converted(dir, &store).map_err(anyhow::Error::msg)?;
        files.insert("images".to_owned(), store.display().to_string());
        argv = vec![
            "sh".into(),
            "-c".into(),
            r#"mkdir -p "$ISOCELL_STATE_DIR" && ln -sfn {images} "$ISOCELL_STATE_DIR/images" && exec "$0" "$@""#.into(),
            format!("{{{program}}}"),
        ];
    }
    argv.extend(args);
    let step = Step::new(program, &argv, timeout);
    let results = th.run(&Scenario { steps: vec![step], files })?;
    let r = results.into_iter().next().context("no result")?;
    print!("{}", r.stdout);
    eprint!("{}", r.stderr);
    if r.timed_out {
        eprintln!("isocell-testhost: {program} was killed after {timeout} s");
    }
    if let Some(e) = &r.error {
        eprintln!("isocell-testhost: {e}");
    }
    Ok(ExitCode::from(r.exit_code.and_then(|c| u8::try_from(c).ok()).unwrap_or(1)))
}
