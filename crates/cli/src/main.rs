//! `isocell`: run a command in an ephemeral, hardware-isolated cell.
//!
//! `isocell run [OPTIONS] [IMAGE] -- COMMAND [ARGS...]` boots a KVM microVM with the cell kernel
//! and a read-only root image, runs the command through the in-guest agent with its output
//! streamed live, copies outputs back, destroys the cell and exits with the command's status.

mod agent_link;
mod cell;
mod exit;
mod locate;
mod run;
mod transfer;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

/// Run commands in hardware-isolated, ephemeral microVMs.
#[derive(Parser, Debug)]
#[command(name = "isocell", version, after_help = exit::TABLE)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a cell, run COMMAND in it, stream its output, destroy the cell.
    #[command(after_help = exit::TABLE)]
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// vCPUs (1-32).
    #[arg(long, default_value_t = 1)]
    cpus: u64,
    /// Guest memory: MiB, or a size such as 512M or 2G.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// Environment variable for the command, K=V. Repeat for more.
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory of the command in the cell (absolute).
    #[arg(short, long)]
    workdir: Option<String>,
    /// User (and group) to run as in the cell: UID[:GID].
    #[arg(short, long, default_value = "0:0")]
    user: String,
    /// Copy a host file or directory in before the command: HOST[:GUEST]. GUEST defaults to
    /// HOST's absolute path. Repeat for more.
    #[arg(long = "input", value_name = "HOST[:GUEST]")]
    inputs: Vec<String>,
    /// Copy a cell file or directory out after the command: GUEST[:HOST]. HOST defaults to
    /// GUEST's last component in the current directory. Repeat for more.
    #[arg(long = "output", value_name = "GUEST[:HOST]")]
    outputs: Vec<String>,
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Give up if the cell's agent is not up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    boot_timeout: u64,
    /// Forward standard input to the command.
    #[arg(short, long)]
    interactive: bool,
    /// Cell kernel (default: ISOCELL_KERNEL, or build/guest/vmlinux of this project).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Root image (default: ISOCELL_IMAGE, or build/guest/rootfs.ext4 of this project).
    #[arg(long, conflicts_with = "image_arg")]
    image: Option<PathBuf>,
    /// Extra kernel command-line arguments for the cell (for debugging a cell or an image).
    #[arg(long, value_name = "ARGS")]
    kernel_args: Option<String>,
    /// Write a JSON report of the run (phases, VMM boot timeline, memory) here.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Root image to boot (same as --image).
    #[arg(value_name = "IMAGE")]
    image_arg: Option<PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn parse_env(items: &[String]) -> Result<Vec<(String, String)>, String> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
                Ok((k.to_owned(), v.to_owned()))
            }
            _ => Err(format!("--env {kv:?}: expected NAME=VALUE")),
        })
        .collect()
}

fn parse_user(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("--user {s:?}: expected UID or UID:GID (numbers)");
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn parse_inputs(items: &[String]) -> Result<Vec<(PathBuf, String)>, String> {
    items
        .iter()
        .map(|item| {
            let (host, guest) = match item.split_once(':') {
                Some((h, g)) => (PathBuf::from(h), Some(g.to_owned())),
                None => (PathBuf::from(item), None),
            };
            if !host.exists() {
                return Err(format!(
                    "--input {item}: {} does not exist on this host",
                    host.display()
                ));
            }
            let guest = match guest {
                Some(g) => g,
                None => absolute(&host)?
                    .to_str()
                    .ok_or_else(|| {
                        format!("--input {item}: give GUEST; the host path is not UTF-8")
                    })?
                    .to_owned(),
            };
            if !guest.starts_with('/') {
                return Err(format!("--input {item}: the cell path {guest:?} must be absolute"));
            }
            Ok((host, guest))
        })
        .collect()
}

fn parse_outputs(items: &[String]) -> Result<Vec<(String, PathBuf)>, String> {
    items
        .iter()
        .map(|item| {
            let (guest, host) = match item.split_once(':') {
                Some((g, h)) => (g.to_owned(), PathBuf::from(h)),
                None => {
                    let name = Path::new(item).file_name().ok_or_else(|| {
                        format!("--output {item}: give HOST; {item} has no file name")
                    })?;
                    (item.clone(), PathBuf::from(name))
                }
            };
            if !guest.starts_with('/') {
                return Err(format!("--output {item}: the cell path {guest:?} must be absolute"));
            }
            let parent =
                host.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(format!(
                    "--output {item}: directory {} does not exist",
                    parent.display()
                ));
            }
            Ok((guest, host))
        })
        .collect()
}

fn options(args: RunArgs) -> Result<run::RunOptions, String> {
    let cpus = u8::try_from(args.cpus)
        .ok()
        .filter(|n| (isocell_spec::vm::MIN_VCPUS..=isocell_spec::vm::MAX_VCPUS).contains(n))
        .ok_or_else(|| format!("--cpus {}: a cell has 1 to 32 vCPUs", args.cpus))?;
    let memory_mib =
        isocell_vmm::config::parse_memory_mib(&args.memory).map_err(|e| e.to_string())?;
    if !(isocell_spec::vm::MIN_MEMORY_MIB..=isocell_spec::vm::MAX_MEMORY_MIB).contains(&memory_mib)
    {
        return Err(format!("--memory {}: give between 32 MiB and 1 TiB", args.memory));
    }
    if let Some(w) = &args.workdir {
        if !w.starts_with('/') {
            return Err(format!("--workdir {w:?}: must be an absolute path in the cell"));
        }
    }
    if args.timeout == Some(0) {
        return Err("--timeout 0: give a positive number of seconds".into());
    }
    let (uid, gid) = parse_user(&args.user)?;
    let image_flag = args.image.as_deref().or(args.image_arg.as_deref());
    Ok(run::RunOptions {
        kernel: locate::kernel(args.kernel.as_deref())?,
        image: locate::image(image_flag)?,
        vmm: locate::vmm()?,
        cpus,
        memory_mib,
        env: parse_env(&args.env)?,
        workdir: args.workdir,
        uid,
        gid,
        inputs: parse_inputs(&args.inputs)?,
        outputs: parse_outputs(&args.outputs)?,
        timeout: args.timeout.map(Duration::from_secs),
        boot_timeout: Duration::from_secs(args.boot_timeout.max(1)),
        interactive: args.interactive,
        argv: args.command,
        report: args.report,
        kernel_args: args.kernel_args.unwrap_or_default(),
    })
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::ISOCELL_FAILED } else { 0 });
        }
    };
    let code = match cli.command {
        Command::Run(args) => match options(args) {
            Err(e) => exit::fail(&e),
            Ok(opts) => match isocell_vmm::host_check::check() {
                Err(e) => exit::fail(&format!(
                    "{e}\nOn this machine use the nested test host: scripts/run-cell.sh -- COMMAND"
                )),
                Ok(()) => run::run(&opts, started),
            },
        },
    };
    ExitCode::from(code)
}
