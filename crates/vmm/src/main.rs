//! `isocell-vmm`: boots one microVM from a JSON config file and/or flags, and exits with a
//! status that says why the VM stopped (see the exit status table in `--help`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use isocell_spec::VmConfig;
use isocell_vmm::exit::{EXIT_BAD_CONFIG, EXIT_NO_HARDWARE_VIRT, EXIT_VMM_ERROR};
use isocell_vmm::report::RunReport;
use isocell_vmm::timeline::{Phase, Timeline};
use isocell_vmm::{config, host_check, seccomp, BuildError};

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  the guest rebooted or powered off (ACPI S5), or SIGTERM stopped the VM
  1  the VMM failed
  2  invalid configuration or flags, or a snapshot that does not fit; no VM was created
  3  the guest kernel panicked
  4  the guest crashed a vCPU (triple fault, KVM internal error)
  5  this host has no hardware virtualization behind /dev/kvm
  6  the VM ran past --max-lifetime and was stopped";

/// Boot one KVM microVM.
#[derive(Parser, Debug)]
#[command(name = "isocell-vmm", version, after_help = EXIT_STATUS_HELP)]
struct Args {
    /// JSON VM configuration; flags given as well override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Guest kernel (ELF vmlinux or bzImage).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Number of vCPUs (1-32).
    #[arg(long)]
    cpus: Option<u64>,
    /// Guest memory: MiB, or a size such as 256M or 2G.
    #[arg(long)]
    memory: Option<String>,
    /// Extra kernel command-line arguments.
    #[arg(long)]
    boot_args: Option<String>,
    /// Serial console: stdout, off or file:PATH.
    #[arg(long)]
    console: Option<String>,
    /// A block device: id=ID,path=PATH[,ro][,root]. Repeat for more.
    #[arg(long = "drive")]
    drives: Vec<String>,
    /// A virtio-vsock device: cid=CID,uds=PATH (PATH must not exist; guest connections to host
    /// port P go to PATH_P).
    #[arg(long)]
    vsock: Option<String>,
    /// Leave out the virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// Stop the VM after this many seconds.
    #[arg(long)]
    max_lifetime: Option<u64>,
    /// Start from the snapshot in DIR (written by --snapshot-save with the same configuration)
    /// instead of booting the kernel: guest memory is mapped copy-on-write from DIR/memory and
    /// never written back.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// On SIGUSR1, pause the VM, save its memory and complete state into DIR (an existing
    /// directory) and exit with status 0. The saved VM never resumes.
    #[arg(long, value_name = "DIR")]
    snapshot_save: Option<PathBuf>,
    /// Write a JSON run report (exit reason, boot phases, memory) here when the VM stops.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print the machine as JSON (devices, kernel command line, MP table and ACPI tables, the
    /// CPUID vCPU 0 sees), and exit without booting.
    #[arg(long)]
    describe: bool,
    /// Print the seccomp rules of every VMM thread kind as JSON, and exit.
    #[arg(long)]
    describe_seccomp: bool,
    /// Print, as one line of JSON, the CPUID choices vCPU 0 of a VM with VCPUS vCPUs would see on
    /// this host (what `isocell surface` shows as `cpu`), and exit; needs no configuration.
    #[arg(long, value_name = "VCPUS")]
    describe_cpuid: Option<u8>,
    /// The caller already ran the host check (no kvm-pvm, vmx/svm present) where it can see
    /// /proc/cpuinfo and /sys; a jailed VMM cannot. /dev/kvm's capabilities are still checked.
    #[arg(long)]
    host_checked: bool,
    /// What a system call off a thread's seccomp list does: kill (the default: SIGSYS ends the
    /// VMM), trap (prints which thread made which call and exits with 159) or log (allowed,
    /// recorded in the kernel's audit log). trap and log are for debugging only.
    #[arg(long, value_enum, default_value_t = seccomp::Mode::Kill, value_name = "MODE")]
    seccomp: seccomp::Mode,
    /// Test aid: a thread of this kind (main, vcpu, virtio-blk, virtio-rng, virtio-vsock)
    /// makes a forbidden syscall right after installing its filter, so the VMM dies with SIGSYS.
    #[arg(long, hide = true, value_name = "KIND")]
    seccomp_probe: Option<String>,
}

fn build_config(args: &Args) -> Result<VmConfig, config::ConfigError> {
    let mut c = match &args.config {
        Some(path) => config::from_file(path)?,
        None => {
            let kernel = args.kernel.clone().ok_or_else(|| {
                config::ConfigError::Flag("no kernel: give --kernel PATH or --config FILE".into())
            })?;
            VmConfig::new(kernel)
        }
    };
    if let Some(k) = &args.kernel {
        c.kernel = k.clone();
    }
    if let Some(i) = &args.initrd {
        c.initrd = Some(i.clone());
    }
    if let Some(n) = args.cpus {
        c.vcpus = u8::try_from(n).map_err(|_| isocell_spec::VmConfigError::VcpuCount(n))?;
    }
    if let Some(m) = &args.memory {
        c.memory_mib = config::parse_memory_mib(m)?;
    }
    if let Some(b) = &args.boot_args {
        c.boot_args = b.clone();
    }
    if let Some(con) = &args.console {
        c.console = config::parse_console(con)?;
    }
    for d in &args.drives {
        c.drives.push(config::parse_drive(d)?);
    }
    if let Some(v) = &args.vsock {
        c.vsock = Some(config::parse_vsock(v)?);
    }
    if args.no_rng {
        c.rng = false;
    }
    if let Some(s) = args.max_lifetime {
        c.max_lifetime_secs = Some(s);
    }
    Ok(c)
}

/// Prints an error with its chain of causes, once.
fn print_error(err: &dyn std::error::Error) {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    eprintln!("isocell-vmm: error: {msg}");
}

fn run(args: Args, timeline: Arc<Timeline>) -> u8 {
    if let Some(vcpus) = args.describe_cpuid {
        let cpuid = isocell_vmm::describe_cpuid(vcpus, false);
        println!("{}", serde_json::to_string(&cpuid).unwrap_or_default());
        return 0;
    }
    let plan_and_config = build_config(&args).and_then(|c| config::check(&c).map(|p| (c, p)));
    let (cfg, plan) = match plan_and_config {
        Ok(v) => v,
        Err(e) => {
            print_error(&e);
            return EXIT_BAD_CONFIG as u8;
        }
    };
    if args.describe_seccomp {
        println!("{}", serde_json::to_string_pretty(&seccomp::describe()).unwrap_or_default());
        return 0;
    }
    if let Some(kind) = &args.seccomp_probe {
        match seccomp::ThreadKind::from_name(kind) {
            Some(k) => seccomp::set_probe(k),
            None => {
                let kinds: Vec<&str> = seccomp::ThreadKind::ALL.iter().map(|k| k.name()).collect();
                eprintln!(
                    "isocell-vmm: error: --seccomp-probe {kind:?}: use one of {}",
                    kinds.join(", ")
                );
                return EXIT_BAD_CONFIG as u8;
            }
        }
    }
    if let Err(e) = seccomp::set_mode(args.seccomp) {
        print_error(&e);
        return EXIT_VMM_ERROR as u8;
    }
    if args.describe {
        let description = isocell_vmm::describe(&cfg, &plan);
        println!("{}", serde_json::to_string_pretty(&description).unwrap_or_default());
        return 0;
    }
    let host_check = if args.host_checked { Ok(()) } else { host_check::check() };
    if let Err(e) = host_check {
        print_error(&e);
        return EXIT_NO_HARDWARE_VIRT as u8;
    }
    timeline.mark(Phase::ConfigChecked);

    if let Some(dir) = &args.snapshot_save {
        if !dir.is_dir() {
            eprintln!(
                "isocell-vmm: error: --snapshot-save {}: not a directory (create it first)",
                dir.display()
            );
            return EXIT_BAD_CONFIG as u8;
        }
    }
    let options = isocell_vmm::BootOptions {
        restore: args.restore.as_deref(),
        save_to: args.snapshot_save.as_deref(),
    };
    let stopped = match isocell_vmm::boot(&cfg, &plan, timeline.clone(), options) {
        Ok(s) => s,
        Err(e) => {
            print_error(&e);
            return match e {
                BuildError::Host(_) => EXIT_NO_HARDWARE_VIRT as u8,
                // A snapshot that does not fit is refused before anything ran: like a bad
                // configuration.
                BuildError::Snapshot(_)
                | BuildError::Vcpu(isocell_vmm::vstate::vcpu::VcpuError::Mismatch(..))
                | BuildError::Vm(isocell_vmm::vstate::vm::VmError::SnapshotMemory(_)) => {
                    EXIT_BAD_CONFIG as u8
                }
                _ => EXIT_VMM_ERROR as u8,
            };
        }
    };
    let code = stopped.exit.code();
    if code != 0 {
        eprintln!("isocell-vmm: {} (exit status {code})", stopped.exit);
    }
    if let Some(path) = &args.report {
        let report = RunReport {
            exit_reason: stopped.exit.kind().to_owned(),
            exit_detail: stopped.exit.to_string(),
            exit_code: code,
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            phases: timeline.phases(),
            memory: stopped.memory,
            exit_counts: stopped.exit_counts.iter().take(20).cloned().collect(),
            negotiated_features: stopped.negotiated_features.clone(),
        };
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("isocell-vmm: error: cannot write the report {}: {e}", path.display());
        }
    }
    code as u8
}

fn main() -> ExitCode {
    let timeline = Arc::new(Timeline::new(Instant::now()));
    // Before any thread exists: see `seccomp::prepare_process`.
    if let Err(e) = seccomp::prepare_process() {
        print_error(&e);
        return ExitCode::from(EXIT_VMM_ERROR as u8);
    }
    // SIGTERM stops the VM from here on, even one still being built (see `exit::Wakeup`).
    if let Err(e) = isocell_vmm::exit::Wakeup::get() {
        eprintln!("isocell-vmm: cannot handle SIGTERM: {e}");
        return ExitCode::from(EXIT_VMM_ERROR as u8);
    }
    // Guest memory must never end up in a core file.
    // SAFETY: setrlimit reads the struct we pass and changes only this process's limit.
    unsafe {
        let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_BAD_CONFIG as u8 } else { 0 });
        }
    };
    ExitCode::from(run(args, timeline))
}
