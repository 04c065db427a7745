//! `isocell`: run a command in an ephemeral, hardware-isolated cell.
//!
//! `isocell run [OPTIONS] [IMAGE] -- COMMAND [ARGS...]` boots a KVM microVM with the cell kernel
//! and a read-only root image, runs the command through the in-guest agent with its output
//! streamed live, copies outputs back, destroys the cell and exits with the command's status.

// Writing to a closed or full stderr/stdout must never abort `isocell` (release builds abort on
// panic, skipping teardown and evidence): every message goes through `tell!` or `say!`.
#![deny(clippy::print_stderr, clippy::print_stdout)]

/// Writes a line to stderr; a stderr that cannot be written (closed, `/dev/full`) is ignored.
macro_rules! tell {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod client;
mod exit;
mod images;
mod inspect;
mod machine;
mod run;
mod snapshots;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use isocell_host::plan::HOSTNAME;
use isocell_host::{
    locate, transfer, CellImage, CellRequest, ContainerImage, HostConfig, RunRequest,
};
use isocell_spec::MemorySize;

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
    Run(Box<RunArgs>),
    /// This host's profile (identity, jurisdiction, signing key).
    #[command(subcommand)]
    Host(inspect::HostCmd),
    /// The audit log: show it, or verify it offline with the host's public key.
    #[command(subcommand)]
    Audit(inspect::AuditCmd),
    /// Cell receipts.
    #[command(subcommand)]
    Receipt(inspect::ReceiptCmd),
    /// A cell's attack surface as JSON: devices, seccomp rules per VMM thread, the jail.
    Surface(inspect::SurfaceArgs),
    /// Container images: pull, list, inspect, remove, prune.
    #[command(subcommand)]
    Image(images::ImageCmd),
    /// Long-lived cells through the daemon (isocelld): create, ls, inspect, exec, logs, rm.
    Cell(client::CellArgs),
    /// Snapshots: cells saved before they ran anything, started with `run --snapshot`.
    #[command(subcommand)]
    Snapshot(snapshots::SnapshotCmd),
    /// A managed VM for hosts without hardware virtualization: init, start, stop, status,
    /// exec, evidence, rm. While it runs, `isocell run` and `isocell cell` use it.
    Machine(machine::MachineArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// vCPUs (1-32) [default: the spec's, else 1].
    #[arg(long)]
    cpus: Option<u64>,
    /// Guest memory: MiB, or a size such as 512M or 2G [default: the spec's, else 256M].
    #[arg(long, value_parser = parse_memory)]
    memory: Option<MemorySize>,
    /// Environment variable for the command, K=V. Repeat for more.
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory of the command in the cell (absolute).
    #[arg(short, long)]
    workdir: Option<String>,
    /// User (and group) to run as in the cell: a name or UID, optionally :GROUP or :GID; names
    /// come from the image's /etc/passwd and /etc/group [default: the image's User, else root].
    #[arg(short, long)]
    user: Option<String>,
    /// Replace the image's Entrypoint with this program ("" removes it); the image's Cmd is then
    /// dropped too, as with `docker run --entrypoint`.
    #[arg(long)]
    entrypoint: Option<String>,
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
    /// The longest copying all --input files in may take, and separately all --output files
    /// out (exit status 125 after).
    #[arg(long, value_name = "SECS", default_value_t = transfer::DEFAULT_COPY_TIMEOUT_SECS)]
    copy_timeout: u64,
    /// The most bytes all --output copies together may write on this host (a size: 512M, 4G).
    #[arg(long, value_name = "SIZE", default_value = "4G")]
    output_max_bytes: String,
    /// The most files and directories all --output copies together may create.
    #[arg(long, value_name = "N", default_value_t = transfer::DEFAULT_OUTPUT_MAX_ENTRIES)]
    output_max_entries: u64,
    /// Forward standard input to the command.
    #[arg(short, long)]
    interactive: bool,
    /// Cell kernel (default: ISOCELL_KERNEL, or build/guest/vmlinux of this project).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The image (same as IMAGE).
    #[arg(long, conflicts_with = "image_arg")]
    image: Option<String>,
    /// Extra kernel command-line arguments for the cell (for debugging a cell or an image).
    #[arg(long, value_name = "ARGS")]
    kernel_args: Option<String>,
    /// A cell spec (TOML): resources, image, command, constraints. Flags override it.
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// Allowed jurisdiction for the cell (repeatable); the host's must be one of them.
    #[arg(long = "jurisdiction", value_name = "NAME")]
    jurisdictions: Vec<String>,
    /// Data classification: public, internal, confidential or restricted.
    #[arg(long)]
    classification: Option<String>,
    /// Allowed image digest, sha256:HEX (repeatable): a container image's manifest digest, or
    /// a block image's own digest.
    #[arg(long = "allow-image-digest", value_name = "DIGEST")]
    image_digests: Vec<String>,
    /// The longest the cell may live, in seconds (enforced by the VMM).
    #[arg(long, value_name = "SECS")]
    max_lifetime: Option<u64>,
    /// Where the cell may connect (repeatable): HOST:PORT, *.DOMAIN:PORT or A.B.C.D[/LEN]:PORT.
    /// Without it the cell has no network at all. Replaces the spec's `egress`.
    #[arg(long = "egress", value_name = "RULE")]
    egress: Vec<String>,
    /// Forward a host port into the cell (repeatable): [HOST_IP:]HOST_PORT:GUEST_PORT; the host
    /// IP defaults to 127.0.0.1. Replaces the spec's `publish`.
    #[arg(long = "publish", value_name = "[IP:]PORT:PORT")]
    publish: Vec<String>,
    /// An admission policy file (Cedar) to add to the default and the state directory's.
    #[arg(long = "policy", value_name = "FILE")]
    policies: Vec<PathBuf>,
    /// Run the VMM without its jail (namespaces, cgroup, unprivileged uid). Its seccomp filters
    /// stay. Recorded in the receipt; the default policy admits it for public data only.
    #[arg(long)]
    no_jail: bool,
    /// Write a JSON report of the run (phases, VMM boot timeline, memory) here.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Start the cell from this snapshot (isocell snapshot create) instead of booting it: its
    /// image, kernel, vCPUs and memory are the snapshot's, it has no network, and its RNG is
    /// reseeded from this host before the command runs. The default policy allows it for
    /// public and internal data only.
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with_all = ["image", "image_arg", "kernel", "kernel_args", "cpus", "memory", "egress", "publish"]
    )]
    snapshot: Option<String>,
    /// The image: a registry reference (registry.example:5000/team/app:1.4, debian:12,
    /// app@sha256:...), oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:REPO:TAG], or
    /// the path of a block image [default: ISOCELL_IMAGE, or this project's base image].
    #[arg(value_name = "IMAGE")]
    image_arg: Option<String>,
    #[command(flatten)]
    fetch: images::FetchArgs,
    /// The command and its arguments, after `--` (or `command` in the spec).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// `--memory`, parsed and range-checked once.
pub(crate) fn parse_memory(s: &str) -> Result<MemorySize, String> {
    s.parse().map_err(|e: isocell_spec::MemorySizeError| e.to_string())
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
    let bad = || {
        format!("--user {s:?}: a block image has no user database; give UID or UID:GID (numbers)")
    };
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// The longest any duration option may be: a year. Longer values are mistakes, and bounding
/// them here keeps every later sum of durations far from overflow.
const MAX_SECS: u64 = 365 * 86_400;

/// Checks a duration option: 1 second to a year.
fn seconds(flag: &str, secs: u64) -> Result<Duration, String> {
    if (1..=MAX_SECS).contains(&secs) {
        Ok(Duration::from_secs(secs))
    } else {
        Err(format!("{flag} {secs}: give between 1 and {MAX_SECS} seconds (a year)"))
    }
}

/// Parses a byte size: a number of bytes, or with K, M, G or T (powers of 1024).
fn parse_size(flag: &str, s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, 'K')) => (&t[..i], 10),
        Some((i, 'M')) => (&t[..i], 20),
        Some((i, 'G')) => (&t[..i], 30),
        Some((i, 'T')) => (&t[..i], 40),
        _ => (t, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{flag} {s:?}: give a size in bytes, or like 512M, 4G or 1T"))
}

/// Largest spec or policy file read (they are small text files; a device or a huge file given
/// by mistake must not be read without end).
const MAX_TEXT_FILE: u64 = 1 << 20;

/// Reads a small regular text file given on the command line, refusing devices, FIFOs and
/// anything over [`MAX_TEXT_FILE`].
fn read_text_file(flag: &str, path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let (f, meta) = transfer::open_regular(flag, path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_TEXT_FILE {
        return Err(format!(
            "{flag} {}: {} bytes is too large (at most {MAX_TEXT_FILE})",
            path.display(),
            meta.len()
        ));
    }
    let mut text = String::new();
    f.take(MAX_TEXT_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_TEXT_FILE {
        return Err(format!("{flag} {}: grew past {MAX_TEXT_FILE} bytes", path.display()));
    }
    Ok(text)
}

fn parse_inputs(items: &[String]) -> Result<Vec<(PathBuf, String)>, String> {
    items
        .iter()
        .map(|item| {
            let (host, guest) = match item.split_once(':') {
                Some((h, g)) => (PathBuf::from(h), Some(g.to_owned())),
                None => (PathBuf::from(item), None),
            };
            match std::fs::metadata(&host) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(format!(
                        "--input {item}: {} does not exist on this host",
                        host.display()
                    ))
                }
                Err(e) => return Err(format!("--input {item}: {e}")),
                Ok(m) if !m.is_file() && !m.is_dir() => {
                    return Err(format!(
                        "--input {item}: {} is not a regular file or directory (devices, FIFOs \
                         and sockets cannot be copied into a cell)",
                        host.display()
                    ))
                }
                Ok(_) => {}
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
            transfer::check_output_dest(&host).map_err(|e| format!("--output {item}: {e}"))?;
            Ok((guest, host))
        })
        .collect()
}

/// Where a checked `isocell run` goes.
enum Planned {
    /// Here, on this host's KVM.
    Local(Box<run::Run>),
    /// To the running `isocell machine`'s daemon, reached as this says.
    Machine(Box<machine::RemoteRun>, isocell_machine::Api),
}

fn options(mut args: RunArgs) -> Result<Planned, String> {
    let spec = match &args.spec {
        Some(path) => {
            let text = read_text_file("--spec", path)?;
            let base = path.parent().unwrap_or(Path::new("."));
            isocell_spec::CellSpec::parse(&text, base)
                .map_err(|e| format!("cell spec {} is invalid: {e}", path.display()))?
        }
        None => isocell_spec::CellSpec::default(),
    };
    // Flags win over the spec; the spec fills what flags leave out.
    if args.command.is_empty() {
        args.command = spec.command.clone();
    }
    let cpus_arg = args.cpus.or(spec.cpus).unwrap_or(1);
    let memory = args.memory.or(spec.memory).unwrap_or_default();
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.append(&mut args.env);
    args.env = env;
    args.workdir = args.workdir.or(spec.workdir.clone());
    args.timeout = args.timeout.or(spec.timeout_secs);
    args.kernel = args.kernel.or(spec.kernel.clone());
    if args.image.is_none() && args.image_arg.is_none() {
        args.image = spec.image.clone();
    }
    args.user = args.user.or(spec.user.clone());
    args.entrypoint = args.entrypoint.or(spec.entrypoint.clone());
    let mut constraints = spec.constraints.clone();
    if !args.jurisdictions.is_empty() {
        constraints.jurisdictions = args.jurisdictions.clone();
    }
    if let Some(c) = &args.classification {
        constraints.classification = isocell_spec::Classification::parse(c).ok_or_else(|| {
            format!("--classification {c:?}: use public, internal, confidential or restricted")
        })?;
    }
    if !args.image_digests.is_empty() {
        constraints.image_digests = args.image_digests.clone();
    }
    for d in &constraints.image_digests {
        let ok = d
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return Err(format!("image digest {d:?}: expected sha256: and 64 hex digits"));
        }
    }
    if args.max_lifetime.is_some() {
        constraints.max_lifetime_secs = args.max_lifetime;
    }
    if let Some(secs) = constraints.max_lifetime_secs {
        seconds("--max-lifetime", secs)?;
    }
    for p in &args.policies {
        read_text_file("--policy", p)?;
    }
    let egress = if args.egress.is_empty() { &spec.egress } else { &args.egress };
    let publish = if args.publish.is_empty() { &spec.publish } else { &args.publish };
    let network = isocell_spec::Network::parse(egress, publish).map_err(|e| e.to_string())?;
    let cpus = u8::try_from(cpus_arg)
        .ok()
        .filter(|n| (isocell_spec::vm::MIN_VCPUS..=isocell_spec::vm::MAX_VCPUS).contains(n))
        .ok_or_else(|| format!("--cpus {cpus_arg}: a cell has 1 to 32 vCPUs"))?;
    if let Some(w) = &args.workdir {
        if !w.starts_with('/') {
            return Err(format!("--workdir {w:?}: must be an absolute path in the cell"));
        }
    }
    let timeout = args.timeout.map(|t| seconds("--timeout", t)).transpose()?;
    let boot_timeout = seconds("--boot-timeout", args.boot_timeout)?;
    let copy_timeout = seconds("--copy-timeout", args.copy_timeout)?;
    let output_max_bytes = parse_size("--output-max-bytes", &args.output_max_bytes)?;
    let env = parse_env(&args.env)?;
    if let Some(machine) = machine::needed() {
        let api = machine?;
        let remote = through_machine(&args, constraints, egress, publish, cpus, memory, timeout)?;
        return Ok(Planned::Machine(Box::new(remote), api));
    }
    let snapshot = match &args.snapshot {
        Some(name) => {
            let fixed = spec.image.is_some()
                || spec.kernel.is_some()
                || spec.cpus.is_some()
                || spec.memory.is_some()
                || !spec.egress.is_empty()
                || !spec.publish.is_empty();
            if fixed {
                return Err(format!(
                    "--snapshot {name}: the cell's image, kernel, vCPUs, memory and network are \
                     the snapshot's; leave them out of the cell spec"
                ));
            }
            if !args.no_jail {
                need_root()?;
            }
            let host = HostConfig::discover(!args.no_jail).map_err(|e| e.to_string())?;
            Some(isocell_host::snapshot::restore_request(&host, name).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let image_name = args.image.as_deref().or(args.image_arg.as_deref());
    let parsed = image_name.map(isocell_image::ImageRef::parse).transpose()?;
    let (image, process) = match (&snapshot, parsed) {
        (Some(snap), _) => match &snap.image {
            CellImage::Container(c) => {
                (snap.image.clone(), Some(container_process(&c.resolved, &args, &env)?))
            }
            CellImage::Block(_) => (snap.image.clone(), None),
        },
        (None, None) => (CellImage::Block(locate::image(None).map_err(|e| e.to_string())?), None),
        (None, Some(isocell_image::ImageRef::Raw(p))) => {
            (CellImage::Block(locate::image(Some(&p)).map_err(|e| e.to_string())?), None)
        }
        (None, Some(r)) => {
            let resolved = images::resolve(&r, &args.fetch, false)?;
            let process = container_process(&resolved, &args, &env)?;
            let pinned = r.pinned_digest().is_some();
            (CellImage::Container(Box::new(ContainerImage { resolved, pinned })), Some(process))
        }
    };
    let process = match process {
        Some(p) => p,
        None => {
            if args.command.is_empty() {
                return Err(
                    "no command: give it after `--`, or as `command` in the cell spec".into()
                );
            }
            if args.entrypoint.is_some() {
                return Err(
                    "--entrypoint applies to container images; this is a block image".into()
                );
            }
            let (uid, gid) = parse_user(args.user.as_deref().unwrap_or("0:0"))?;
            isocell_image::runconfig::Process {
                argv: args.command.clone(),
                env,
                cwd: args.workdir.clone().unwrap_or_else(|| "/".into()),
                uid,
                gid,
                groups: Vec::new(),
                privileges: None,
            }
        }
    };
    let kernel = locate::kernel(args.kernel.as_deref()).map_err(|e| e.to_string())?;
    if !args.no_jail {
        need_root()?;
    }
    let host = HostConfig::discover(!args.no_jail).map_err(|e| e.to_string())?;
    let cell = match snapshot {
        // The snapshot's own cell, under this run's constraints.
        Some(snap) => CellRequest { max_lifetime_secs: None, constraints, ..snap },
        None => CellRequest {
            kernel,
            image,
            cpus,
            memory,
            kernel_args: args.kernel_args.unwrap_or_default(),
            max_lifetime_secs: None,
            constraints,
            network,
            snapshot: Default::default(),
            workload: None,
        },
    };
    let request = RunRequest {
        cell,
        process,
        inputs: parse_inputs(&args.inputs)?,
        outputs: parse_outputs(&args.outputs)?,
        timeout,
        boot_timeout,
        copy_timeout,
        output_max_bytes,
        output_max_entries: args.output_max_entries,
        policy_files: args.policies,
    };
    Ok(Planned::Local(Box::new(run::Run {
        host,
        request,
        interactive: args.interactive,
        report: args.report,
    })))
}

/// `isocell run` for the machine's daemon, which has its own kernel, policies and jail: the
/// options that name this host's files or change those are refused, each saying so.
fn through_machine(
    args: &RunArgs,
    constraints: isocell_spec::Constraints,
    egress: &[String],
    publish: &[String],
    cpus: u8,
    memory: MemorySize,
    timeout: Option<Duration>,
) -> Result<machine::RemoteRun, String> {
    if let Some(k) = &args.kernel {
        locate::kernel(Some(k)).map_err(|e| e.to_string())?;
    }
    let refuse = |flag: &str, why: &str| {
        Err(format!("{flag}: not available through the isocell machine ({why})"))
    };
    if args.kernel.is_some() || args.kernel_args.is_some() {
        return refuse("--kernel/--kernel-args", "cells there boot the machine's cell kernel");
    }
    if !args.policies.is_empty() {
        return refuse("--policy", "the machine's daemon admits by its own policies");
    }
    if args.no_jail {
        return refuse("--no-jail", "the machine's daemon always jails its cells");
    }
    if args.report.is_some() {
        return refuse("--report", "the phase report is made where the cell runs");
    }
    if args.entrypoint.is_some() {
        return refuse("--entrypoint", "give the whole command after `--`");
    }
    if !publish.is_empty() {
        return refuse(
            "--publish",
            "a port would open inside the machine, out of this host's reach",
        );
    }
    let image = args.image.as_deref().or(args.image_arg.as_deref());
    if let Some(name) = image {
        let local = ["oci:", "oci-archive:", "docker-archive:"].iter().any(|p| name.starts_with(p))
            || matches!(isocell_image::ImageRef::parse(name), Ok(isocell_image::ImageRef::Raw(_)));
        if local {
            return Err(format!(
                "image {name}: a file on this host cannot be run in the isocell machine; push it \
                 to a registry it can reach (this host's 127.0.0.1 is 10.0.2.2 from inside it)"
            ));
        }
    }
    if args.command.is_empty() {
        return Err("no command: give it after `--` (through the isocell machine the image's \
                    entrypoint is not prepended)"
            .into());
    }
    let image = image.map(|name| match machine::image_for_machine(name) {
        Some(there) => {
            tell!("isocell: image {name} is {there} from inside the isocell machine");
            there
        }
        None => name.to_owned(),
    });
    let mut create = serde_json::json!({ "constraints": constraints });
    match &args.snapshot {
        Some(name) => create["snapshot"] = serde_json::json!(name),
        None => {
            create["cpus"] = serde_json::json!(cpus);
            create["memory"] = serde_json::json!(memory.to_string());
            if let Some(i) = &image {
                create["image"] = serde_json::json!(i);
            }
            if !egress.is_empty() {
                create["egress"] = serde_json::json!(egress);
            }
        }
    }
    Ok(machine::RemoteRun {
        create,
        argv: args.command.clone(),
        env: args.env.clone(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        timeout: timeout.map(|t| t.as_secs()),
        interactive: args.interactive,
        inputs: parse_inputs(&args.inputs)?,
        outputs: parse_outputs(&args.outputs)?,
    })
}

/// The process a container image runs, from its configuration and the run's overrides.
fn container_process(
    resolved: &isocell_image::Resolved,
    args: &RunArgs,
    env: &[(String, String)],
) -> Result<isocell_image::runconfig::Process, String> {
    let (passwd, group) = isocell_image::Store::user_db(&resolved.dir);
    let overrides = isocell_image::runconfig::Overrides {
        entrypoint: args.entrypoint.clone(),
        command: args.command.clone(),
        env: env.to_vec(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
    };
    isocell_image::runconfig::plan(
        &resolved.record.run_config,
        &overrides,
        passwd.as_deref(),
        group.as_deref(),
        HOSTNAME,
    )
    .map_err(|e| format!("image {}: {e}", resolved.name))
}

/// The jail needs root to build.
pub(crate) fn need_root() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the cell's jail (namespaces, cgroup, an unprivileged uid) needs root: run \
             isocell as root, or pass --no-jail (public data only under the default policy)"
            .into());
    }
    Ok(())
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
        Command::Run(args) => match options(*args) {
            Err(e) => exit::fail(&e),
            Ok(Planned::Local(r)) => run::run(*r, started),
            Ok(Planned::Machine(r, api)) => machine::run(*r, &api),
        },
        Command::Host(cmd) => inspect::host(cmd),
        Command::Audit(cmd) => inspect::audit(cmd),
        Command::Receipt(cmd) => inspect::receipt(cmd),
        Command::Surface(args) => inspect::surface(args),
        Command::Image(cmd) => images::image(cmd),
        Command::Cell(args) => client::cell(args),
        Command::Snapshot(cmd) => snapshots::snapshot(cmd),
        Command::Machine(args) => machine::machine(args),
    };
    ExitCode::from(code)
}
