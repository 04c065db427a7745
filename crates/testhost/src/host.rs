//! The test host: where hardware KVM exists, scenarios run directly on this machine; elsewhere
//! they run inside a nested host, Debian's kernel under QEMU TCG with emulated AMD SVM, which
//! gives a real /dev/kvm, booted for the scenario; or, where `ISOCELL_TESTHOST_MACHINE` names a
//! started `isocell machine` (the same nested host made durable), inside that machine, which
//! saves a boot per scenario. Every way, the same runner executes the same steps and the results
//! come back as [`StepResult`]s.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::scenario::{Scenario, StepResult};

/// Failure of the test host itself (not of a step).
#[derive(Debug, thiserror::Error)]
pub enum TestHostError {
    /// An input the host needs has not been built.
    #[error("{what} is missing at {path}: {fix}")]
    Missing {
        /// What is missing.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The command that builds it.
        fix: &'static str,
    },
    /// Local I/O failed.
    #[error("{0}")]
    Io(String),
    /// The nested host or runner stopped before reporting every step.
    #[error("the {host} test host reported {got} of {want} steps ({why})\n--- host console (last 60 lines) ---\n{console}")]
    Incomplete {
        /// "nested" or "direct".
        host: &'static str,
        /// Results received.
        got: usize,
        /// Steps in the scenario.
        want: usize,
        /// Why it stopped.
        why: String,
        /// Tail of the host console.
        console: String,
    },
}

/// Where the scenario runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// On this machine, which has hardware KVM.
    Direct,
    /// Inside a QEMU TCG nested host booted for the scenario.
    Nested,
    /// Inside a long-lived `isocell machine` (a nested host that serves many scenarios).
    Machine,
}

impl HostKind {
    /// "direct" or "nested".
    pub fn name(self) -> &'static str {
        match self {
            HostKind::Direct => "direct",
            HostKind::Nested => "nested",
            HostKind::Machine => "machine",
        }
    }

    /// Whether this host has hardware KVM of its own (scenarios run on it directly).
    pub fn has_hardware_kvm(self) -> bool {
        self == HostKind::Direct
    }
}

/// The files the test host works with.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The `isocell-vmm` binary.
    pub vmm: PathBuf,
    /// The `isocell` command line (finds `isocell-vmm` and `isocell-jailer` next to itself).
    pub isocell: PathBuf,
    /// The `isocell-jailer` binary.
    pub jailer: PathBuf,
    /// The `isocell-testhost-runner` binary.
    pub runner: PathBuf,
    /// `isocell-hostile`, the attacker the tests pass into cells.
    pub hostile: PathBuf,
    /// The daemon, `isocelld`.
    pub isocelld: PathBuf,
    /// The per-cell supervisor the daemon starts.
    pub supervisor: PathBuf,
    /// containerd's shim, `containerd-shim-isocell-v2`.
    pub shim: PathBuf,
    /// Cell kernel, bzImage.
    pub bzimage: PathBuf,
    /// Cell kernel, ELF vmlinux.
    pub vmlinux: PathBuf,
    /// The ACPI-only guest kernel (bzImage): devices and CPUs from ACPI tables alone.
    pub acpi_bzimage: PathBuf,
    /// Base image.
    pub rootfs: PathBuf,
    /// Base image as an initramfs (cpio).
    pub initrd: PathBuf,
    /// The agent's initramfs (cpio), which `isocell run` boots cells with.
    pub agent_initrd: PathBuf,
    /// Nested host kernel directory (`vmlinuz`, `modules/`).
    pub nested_host: PathBuf,
}

/// The project root (where `build/` and `target/` live).
pub fn project_root() -> PathBuf {
    match std::env::var_os("ISOCELL_ROOT") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .canonicalize()
            .unwrap_or_else(|_| PathBuf::from(".")),
    }
}

fn require(path: PathBuf, what: &'static str, fix: &'static str) -> Result<PathBuf, TestHostError> {
    if path.exists() {
        Ok(path)
    } else {
        Err(TestHostError::Missing { what, path, fix })
    }
}

impl Paths {
    /// Finds everything under the project root (binaries: `ISOCELL_BIN_DIR`, else the release
    /// build).
    pub fn discover() -> Result<Self, TestHostError> {
        let root = project_root();
        let bin = std::env::var_os("ISOCELL_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/x86_64-unknown-linux-gnu/release"));
        let build = root.join("build");
        const BUILD_BINS: &str = "run `cargo build --release --workspace --bins`";
        Ok(Paths {
            vmm: require(bin.join("isocell-vmm"), "isocell-vmm", BUILD_BINS)?,
            isocell: require(bin.join("isocell"), "isocell", BUILD_BINS)?,
            jailer: require(bin.join("isocell-jailer"), "isocell-jailer", BUILD_BINS)?,
            runner: require(
                bin.join("isocell-testhost-runner"),
                "isocell-testhost-runner",
                BUILD_BINS,
            )?,
            hostile: require(bin.join("isocell-hostile"), "isocell-hostile", BUILD_BINS)?,
            isocelld: require(bin.join("isocelld"), "isocelld", BUILD_BINS)?,
            supervisor: require(bin.join("isocell-supervisor"), "isocell-supervisor", BUILD_BINS)?,
            shim: require(
                bin.join("containerd-shim-isocell-v2"),
                "containerd-shim-isocell-v2",
                BUILD_BINS,
            )?,
            bzimage: require(
                build.join("guest/bzImage"),
                "the cell kernel",
                "run guest/build-kernel.sh",
            )?,
            vmlinux: require(
                build.join("guest/vmlinux"),
                "the cell kernel (vmlinux)",
                "run guest/build-kernel.sh",
            )?,
            acpi_bzimage: require(
                build.join("guest/acpi/bzImage"),
                "the ACPI-only guest kernel",
                "run guest/build-kernel.sh acpi",
            )?,
            rootfs: require(
                build.join("guest/rootfs.ext4"),
                "the base image",
                "run guest/build-rootfs.sh",
            )?,
            initrd: require(
                build.join("guest/initrd.cpio"),
                "the base initramfs",
                "run guest/build-rootfs.sh",
            )?,
            agent_initrd: require(
                build.join("guest/agent-initrd.cpio"),
                "the agent initramfs",
                "run guest/build-rootfs.sh",
            )?,
            nested_host: build.join("nested-host"),
        })
    }
}

/// A place to run scenarios.
#[derive(Clone, Debug)]
pub struct TestHost {
    kind: HostKind,
    paths: Paths,
    /// How many frozen nested hosts one scenario may replace.
    max_restarts: u32,
    /// The directory of the started `isocell machine` that [`HostKind::Machine`] runs in.
    machine: Option<PathBuf>,
}

impl TestHost {
    /// Uses this machine if it has hardware KVM; otherwise the started `isocell machine` whose
    /// directory `ISOCELL_TESTHOST_MACHINE` names, if it does, else a nested host per scenario.
    /// `ISOCELL_TESTHOST=direct|nested|machine` forces one.
    pub fn detect() -> Result<Self, TestHostError> {
        let paths = Paths::discover()?;
        let machine = std::env::var_os("ISOCELL_TESTHOST_MACHINE")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from);
        let kind = match std::env::var("ISOCELL_TESTHOST").as_deref() {
            Ok("nested") => HostKind::Nested,
            Ok("direct") => HostKind::Direct,
            Ok("machine") => HostKind::Machine,
            _ if isocell_vmm::host_check::check().is_ok() => HostKind::Direct,
            _ if machine.is_some() => HostKind::Machine,
            _ => HostKind::Nested,
        };
        if kind == HostKind::Machine && machine.is_none() {
            return Err(TestHostError::Io(
                "ISOCELL_TESTHOST=machine needs ISOCELL_TESTHOST_MACHINE, the directory of a \
                 started `isocell machine` (scripts/e2e.sh starts one per lane)"
                    .into(),
            ));
        }
        if kind != HostKind::Direct {
            require(
                paths.nested_host.join("vmlinuz"),
                "the nested host kernel",
                "run scripts/prepare-nested-host.sh",
            )?;
            if let Some(old) = qemu_version().filter(|v| v.0 < 8) {
                eprintln!(
                    "isocell-testhost: warning: QEMU {}.{} freezes the nested host now and then \
                     (the harness replaces it, slowly); scripts/install-deps.sh installs QEMU 10",
                    old.0, old.1
                );
            }
        }
        Ok(TestHost { kind, paths, max_restarts: MAX_NESTED_RESTARTS, machine })
    }

    /// Boots a fresh nested host for each scenario even where a long-lived machine serves the
    /// others: for a scenario about the host itself (how a new one behaves over many boots).
    pub fn fresh_host(mut self) -> Self {
        if self.kind == HostKind::Machine {
            self.kind = HostKind::Nested;
        }
        self
    }

    /// Makes a frozen nested host fail the scenario instead of being replaced: for a scenario
    /// whose point is that the host never freezes.
    pub fn without_restarts(mut self) -> Self {
        self.max_restarts = 0;
        self
    }

    /// Where scenarios run.
    pub fn kind(&self) -> HostKind {
        self.kind
    }

    /// The cell kernel (ELF vmlinux) the scenarios boot.
    pub fn vmlinux(&self) -> &Path {
        &self.paths.vmlinux
    }

    /// Runs `scenario`; returns one result per step, in order.
    pub fn run(&self, scenario: &Scenario) -> Result<Vec<StepResult>, TestHostError> {
        let tmp = TempDir::new()?;
        match self.kind {
            HostKind::Direct => self.run_direct(scenario, tmp.path()),
            HostKind::Nested => {
                self.run_with_restarts(scenario, tmp.path(), |s, dir| self.boot_nested(s, dir))
            }
            HostKind::Machine => {
                let machine = self.machine.clone().unwrap_or_default();
                self.run_with_restarts(scenario, tmp.path(), |s, dir| {
                    self.run_in_machine(s, dir, &machine)
                })
            }
        }
    }

    fn run_direct(
        &self,
        scenario: &Scenario,
        tmp: &Path,
    ) -> Result<Vec<StepResult>, TestHostError> {
        let scenario_path = tmp.join("scenario.json");
        write_json(&scenario_path, scenario)?;
        let results = tmp.join("results.jsonl");
        let assets = [
            ("vmm", &self.paths.vmm),
            ("isocell", &self.paths.isocell),
            ("hostile", &self.paths.hostile),
            ("isocelld", &self.paths.isocelld),
            ("bzimage", &self.paths.bzimage),
            ("vmlinux", &self.paths.vmlinux),
            ("acpi_bzimage", &self.paths.acpi_bzimage),
            ("rootfs", &self.paths.rootfs),
            ("initrd", &self.paths.initrd),
            ("agent_initrd", &self.paths.agent_initrd),
        ];
        let mut cmd = Command::new(&self.paths.runner);
        cmd.arg("--scenario").arg(&scenario_path).arg("--results").arg(&results);
        cmd.arg("--work").arg(tmp.join("steps")).arg("--host").arg("direct");
        for (name, path) in assets {
            cmd.arg("--asset").arg(format!("{name}={}", path.display()));
        }
        for (name, path) in &scenario.files {
            cmd.arg("--asset").arg(format!("{name}={path}"));
        }
        let status =
            cmd.status().map_err(|e| TestHostError::Io(format!("cannot run the runner: {e}")))?;
        collect(&results, scenario, &format!("runner exited with {status}"))
    }

    /// Runs `scenario` through `attempt` (one nested host or one run in the machine), and
    /// the steps that are left again after a host that froze.
    fn run_with_restarts(
        &self,
        scenario: &Scenario,
        tmp: &Path,
        attempt: impl Fn(&Scenario, &Path) -> Result<HostRun, TestHostError>,
    ) -> Result<Vec<StepResult>, TestHostError> {
        let mut results: Vec<StepResult> = Vec::new();
        let mut restarts = 0;
        let mut fruitless = 0;
        loop {
            let remaining = Scenario {
                steps: scenario.steps[results.len()..].to_vec(),
                files: scenario.files.clone(),
            };
            let dir = tmp.join(format!("boot{restarts}"));
            std::fs::create_dir_all(&dir).map_err(|e| TestHostError::Io(e.to_string()))?;
            let boot = attempt(&remaining, &dir)?;
            let got = boot.results.len();
            results.extend(boot.results);
            if results.len() >= scenario.steps.len() {
                return Ok(results);
            }
            // The nested host itself (not a step: those have their own timeouts) froze. QEMU's
            // emulated SVM does this now and then; a fresh (or restarted) host runs the steps
            // that are left. A step that freezes every host it runs on still fails the run.
            fruitless = if got == 0 { fruitless + 1 } else { 0 };
            if boot.hung && restarts < self.max_restarts && fruitless < MAX_FRUITLESS_RESTARTS {
                restarts += 1;
                eprintln!(
                    "isocell-testhost: the {} host stopped responding after {got} step(s) ({}); \
                     restarting it for the {} remaining step(s). Its console ended with:\n{}",
                    self.kind.name(),
                    boot.why,
                    scenario.steps.len() - results.len(),
                    tail_lines(&boot.console, 8)
                );
                continue;
            }
            return Err(TestHostError::Incomplete {
                host: self.kind.name(),
                got: results.len(),
                want: scenario.steps.len(),
                why: boot.why,
                console: tail_lines(&boot.console, 60),
            });
        }
    }

    /// Boots one nested host for `scenario` and watches its progress.
    fn boot_nested(&self, scenario: &Scenario, tmp: &Path) -> Result<HostRun, TestHostError> {
        let initramfs = self.build_initramfs(scenario, tmp)?;
        let console = tmp.join("console.log");
        let results = tmp.join("results.jsonl");
        let heartbeat = tmp.join("heartbeat");
        let monitor = tmp.join("monitor.sock");
        // One CPU by default, the configuration with the fewest freezes under QEMU 7.2 (two
        // locked up every few cells there); ISOCELL_NESTED_CPUS=2 chooses two. Extra kernel
        // arguments (ISOCELL_NESTED_APPEND, say "loglevel=7") help diagnose the host itself.
        let cpus = std::env::var("ISOCELL_NESTED_CPUS").unwrap_or_else(|_| "1".into());
        let memory = std::env::var("ISOCELL_NESTED_MEMORY_MIB").unwrap_or_else(|_| "2048".into());
        let extra_args = std::env::var("ISOCELL_NESTED_APPEND").unwrap_or_default();
        let tcg_thread =
            std::env::var("ISOCELL_NESTED_TCG_THREAD").unwrap_or_else(|_| "multi".into());
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", &format!("tcg,thread={tcg_thread}"), "-cpu", "EPYC,+svm,+npt"])
            .args(["-smp", &cpus, "-m", &memory])
            .args(["-nographic", "-nodefaults", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("file:{}", heartbeat.display()))
            // Results leave through the debug console, which raises no interrupts (see the
            // runner's `IoPort`).
            .arg("-chardev")
            .arg(format!("file,id=results,path={}", results.display()))
            .arg("-device")
            .arg(format!("isa-debugcon,iobase={RESULTS_PORT:#x},chardev=results"))
            .arg("-monitor")
            .arg(format!("unix:{},server,nowait", monitor.display()))
            .arg("-kernel")
            .arg(self.paths.nested_host.join("vmlinuz"))
            .arg("-initrd")
            .arg(&initramfs)
            .arg("-append")
            .arg(format!("console=ttyS0 quiet panic=-1 {NESTED_TICK} {extra_args}").trim_end())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                TestHostError::Io(format!(
                    "cannot start qemu-system-x86_64 (run scripts/install-deps.sh): {e}"
                ))
            })?;
        let mut watch = HostWatch::new(&results, &heartbeat);
        let (why, hung) = loop {
            let stalled = watch.stalled(scenario);
            match child.try_wait() {
                Ok(Some(status)) => break (format!("QEMU exited with {status}"), false),
                Ok(None) => match stalled {
                    Some(what) => {
                        // What the frozen host's CPU was doing, before it is gone.
                        let state = frozen_cpu_state(&monitor);
                        if !state.is_empty() {
                            eprintln!("isocell-testhost: the frozen nested host's CPU:\n{state}");
                        }
                        let _ = child.kill();
                        let _ = child.wait();
                        break (format!("{what}; QEMU killed"), true);
                    }
                    None => std::thread::sleep(Duration::from_millis(100)),
                },
                Err(e) => break (format!("wait failed: {e}"), false),
            }
        };
        if watch.longest_silence > Duration::from_secs(5) {
            eprintln!(
                "isocell-testhost: the nested host's heartbeat was once silent for {:.1} s",
                watch.longest_silence.as_secs_f64()
            );
        }
        let console_text = std::fs::read_to_string(&console).unwrap_or_default();
        let text = std::fs::read_to_string(&results).unwrap_or_default();
        Ok(HostRun { results: parse_results(&text), why, hung, console: console_text })
    }

    /// Runs `scenario` in the started machine at `machine`. Its files go in as they would go
    /// into a nested host (the same archive, unpacked under `/e2e/`), the runner runs there
    /// with the nested host's environment and streams its result lines back, and then the
    /// machine is checked for anything the scenario left (cell processes, mounts, cgroups),
    /// which fails the scenario, and the scenario's directory is removed. A machine that stops
    /// responding is restarted (`isocell machine stop` and `start`) and reported as hung.
    fn run_in_machine(
        &self,
        scenario: &Scenario,
        tmp: &Path,
        machine: &Path,
    ) -> Result<HostRun, TestHostError> {
        let io = |what: &str| {
            let what = format!("{what} (machine {})", machine.display());
            move |e: std::io::Error| TestHostError::Io(format!("{what}: {e}"))
        };
        // One scenario at a time in a machine (the check after one would take another's
        // processes for leftovers): a lock on the machine's directory itself, which the machine's
        // own commands do not take (they lock a file in it).
        let lock = std::fs::File::open(machine).map_err(io("opening the machine's directory"))?;
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock on a descriptor this function owns; released when `lock` is dropped.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io("locking the machine's directory")(std::io::Error::last_os_error()));
        }
        // Short (cells' sockets live below it): this process, its scenario and its attempt.
        let name = |p: Option<&Path>| {
            let name = p.and_then(Path::file_name).unwrap_or_default().to_string_lossy();
            name.trim_start_matches("isocell-testhost-").to_owned()
        };
        let id: String = format!("{}-{}", name(tmp.parent()), name(Some(tmp)))
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let root = format!("/e2e/{id}");
        let top = format!("{root}/isocell");
        let archive = self.machine_archive(scenario, tmp, machine, &id)?;
        let Some(archive) = archive else {
            return self.restart_machine(machine, "asking what it holds timed out", vec![], tmp);
        };
        // Large files arrive in `incoming/` and join `cache/` only once the archive is whole;
        // the scenario gets its own copies, which its steps may change.
        let prepare = format!(
            "mkdir -p /e2e && cd /e2e && rm -rf incoming {root} && cpio -i -d -m && mkdir -p cache && \
             for f in incoming/*; do [ ! -e \"$f\" ] || mv \"$f\" cache/; done && cd {root} && \
             while read -r sum path; do cp -p /e2e/cache/$sum \"$path\" || exit 1; done < cached && \
             {CGROUP_DIRS} > {root}/cgroups.before"
        );
        let archive = std::fs::File::open(&archive).map_err(io("reading the scenario archive"))?;
        // A machine that cannot take the scenario (it died, or its exec channel is gone) is
        // restarted like a frozen one; the restart limits still end a hopeless run.
        match self.machine_exec(machine, &["sh", "-c", &prepare], Some(archive), tmp)? {
            None => {
                return self.restart_machine(
                    machine,
                    "copying the scenario in timed out",
                    vec![],
                    tmp,
                )
            }
            Some((true, _)) => {}
            Some((false, why)) => {
                let why = format!("copying the scenario in failed: {}", why.trim());
                return self.restart_machine(machine, &why, vec![], tmp);
            }
        }

        let results = tmp.join("results.jsonl");
        let log = tmp.join("runner.log");
        // The runner gets a fresh /tmp and /run of its own, as a new nested host has: nothing
        // of the machine's (its daemon's socket) or of an earlier scenario shows, and what the
        // steps leave there goes with the namespace.
        let mut argv: Vec<String> = vec![
            "unshare".into(),
            "-m".into(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            "mount --make-rprivate / && mount -t tmpfs -o size=80% tmpfs /tmp && \
             mount -t tmpfs -o mode=0755 tmpfs /run && exec \"$@\""
                .into(),
            "sh".into(),
            "env".into(),
            "-i".into(),
            "PATH=/bin".into(),
            format!("ISOCELL_KERNEL={top}/guest/vmlinux"),
            format!("ISOCELL_IMAGE={top}/guest/rootfs.ext4"),
            format!("ISOCELL_AGENT_INITRD={top}/guest/agent-initrd.cpio"),
            "ISOCELL_STATE_DIR=/tmp/isocell-state".into(),
            format!("{top}/bin/isocell-testhost-runner"),
            "--scenario".into(),
            format!("{top}/scenario.json"),
            "--results".into(),
            // Not /dev/stdout: the machine's /dev is a bare devtmpfs, without that link.
            "/proc/self/fd/1".into(),
            "--work".into(),
            "/tmp/steps".into(),
            "--host".into(),
            "machine".into(),
        ];
        argv.extend(runner_assets(&top, scenario));
        let mut child = self
            .machine_command(machine, "exec")
            .arg("--")
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&results).map_err(io("creating the results file"))?)
            .stderr(std::fs::File::create(&log).map_err(io("creating the runner's log"))?)
            .spawn()
            .map_err(io("running isocell machine exec"))?;
        let heartbeat = machine.join("heartbeat");
        let mut watch = HostWatch::new(&results, &heartbeat);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(TestHostError::Io(format!("waiting for the runner: {e}"))),
            }
            if let Some(what) = watch.stalled(scenario) {
                let _ = child.kill();
                let _ = child.wait();
                let got = parse_results(&std::fs::read_to_string(&results).unwrap_or_default());
                return self.restart_machine(machine, &what, got, tmp);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let got = parse_results(&std::fs::read_to_string(&results).unwrap_or_default());
        let why = format!(
            "the runner in the machine exited with {status}: {}",
            tail_lines(&std::fs::read_to_string(&log).unwrap_or_default(), 8)
        );

        // A machine that died under the scenario cannot be checked: it is replaced, and the
        // steps that did not report run again in the new one.
        let check = format!("r={root}\n{}", LEFTOVER_CHECK.replace("@CGROUP_DIRS@", CGROUP_DIRS));
        let output = match self.machine_exec(machine, &["sh", "-c", &check], None, tmp)? {
            Some((true, output)) => output,
            _ => {
                let why = format!("the check for leftovers failed after this: {why}");
                return self.restart_machine(machine, &why, got, tmp);
            }
        };
        match output.lines().find_map(|l| l.strip_prefix("left:")).map(str::trim) {
            Some("") => {}
            Some(left) => {
                // The steps that failed are the likely cause: said with the leftovers, since
                // this error stands for every result.
                let failed: Vec<String> = got
                    .iter()
                    .filter(|r| r.exit_code != Some(0) || r.timed_out)
                    .map(|r| {
                        format!("{} (exit {:?}, timed out {})", r.name, r.exit_code, r.timed_out)
                    })
                    .collect();
                return Err(TestHostError::Io(format!(
                    "the scenario left this behind in the machine (now removed): {left}; \
                     steps that failed: {}",
                    if failed.is_empty() { "none".to_owned() } else { failed.join(", ") }
                )));
            }
            None => {
                return Err(TestHostError::Io(format!(
                    "cannot check the machine at {} for leftovers: {}",
                    machine.display(),
                    output.trim()
                )))
            }
        }
        let console = std::fs::read_to_string(machine.join("console.log")).unwrap_or_default();
        Ok(HostRun { results: got, why, hung: false, console })
    }

    /// The archive for `scenario` in the machine: the nested host's files under `ID/`, where
    /// each large file is replaced by a line "SHA256 PATH" in `ID/cached`, and the large files
    /// the machine does not hold yet under `incoming/SHA256`. `None` if the machine did not say
    /// what it holds.
    fn machine_archive(
        &self,
        scenario: &Scenario,
        tmp: &Path,
        machine: &Path,
        id: &str,
    ) -> Result<Option<PathBuf>, TestHostError> {
        let io = |e: std::io::Error| TestHostError::Io(format!("staging for the machine: {e}"));
        let stage = self.stage(scenario, tmp)?;
        let upload = tmp.join("upload");
        let own = upload.join(id);
        std::fs::create_dir_all(upload.join("incoming")).map_err(io)?;
        std::fs::rename(&stage, &own).map_err(io)?;
        let held = match self.machine_exec(
            machine,
            &["sh", "-c", "ls /e2e/cache 2>/dev/null"],
            None,
            tmp,
        )? {
            Some((_, list)) => list,
            None => return Ok(None),
        };
        let held: std::collections::BTreeSet<&str> = held.split_whitespace().collect();
        let mut large = Vec::new();
        large_files(&own, &own, &mut large).map_err(io)?;
        let mut cached = String::new();
        for path in large {
            let file = own.join(&path);
            let sum = crate::runner::sha256_file(&file).map_err(io)?;
            let incoming = upload.join("incoming").join(&sum);
            if held.contains(sum.as_str()) || incoming.exists() {
                std::fs::remove_file(&file).map_err(io)?;
            } else {
                std::fs::rename(&file, &incoming).map_err(io)?;
            }
            cached.push_str(&format!("{sum} {}\n", path.display()));
        }
        std::fs::write(own.join("cached"), cached).map_err(io)?;
        let out = tmp.join("upload.cpio");
        pack(&upload, &out)?;
        Ok(Some(out))
    }

    /// `isocell machine SUB --dir MACHINE`.
    fn machine_command(&self, machine: &Path, sub: &str) -> Command {
        let mut cmd = Command::new(&self.paths.isocell);
        cmd.args(["machine", sub, "--dir"]).arg(machine);
        cmd
    }

    /// Runs a short command in the machine (stdin from `input`); whether it succeeded and its
    /// output (stdout, then stderr), or `None` if it did not end within two minutes.
    fn machine_exec(
        &self,
        machine: &Path,
        argv: &[&str],
        input: Option<std::fs::File>,
        tmp: &Path,
    ) -> Result<Option<(bool, String)>, TestHostError> {
        let mut cmd = self.machine_command(machine, "exec");
        if input.is_some() {
            cmd.arg("-i");
        }
        cmd.arg("--").args(argv);
        call(cmd, input, Duration::from_secs(120), &tmp.join("exec.out"))
    }

    /// Replaces a machine that stopped responding; the scenario's steps that are left run
    /// again in it.
    fn restart_machine(
        &self,
        machine: &Path,
        why: &str,
        results: Vec<StepResult>,
        tmp: &Path,
    ) -> Result<HostRun, TestHostError> {
        let console = std::fs::read_to_string(machine.join("console.log")).unwrap_or_default();
        let run = |sub: &str| {
            let log = tmp.join(format!("machine-{sub}.log"));
            call(self.machine_command(machine, sub), None, MACHINE_START_WITHIN, &log)
        };
        let _ = run("stop")?;
        match run("start")? {
            Some((true, _)) => {}
            started => {
                let said = started.map_or("it did not answer in time".into(), |s| s.1);
                return Err(TestHostError::Io(format!(
                    "the machine at {} stopped responding ({why}) and did not start again: {}",
                    machine.display(),
                    said.trim()
                )));
            }
        }
        Ok(HostRun { results, why: why.to_owned(), hung: true, console })
    }

    fn build_initramfs(&self, scenario: &Scenario, tmp: &Path) -> Result<PathBuf, TestHostError> {
        let stage = self.stage(scenario, tmp)?;
        let out = tmp.join("initramfs.cpio");
        pack(&stage, &out)?;
        Ok(out)
    }

    /// Lays out, in `tmp/stage`, what a nested host for `scenario` holds: busybox, KVM's
    /// modules, the runner and the programs, kernels and images the steps name, the
    /// scenario's own files, the scenario and the init script.
    fn stage(&self, scenario: &Scenario, tmp: &Path) -> Result<PathBuf, TestHostError> {
        let stage = tmp.join("stage");
        let io = |e: std::io::Error| {
            TestHostError::Io(format!("building the nested host initramfs: {e}"))
        };
        for dir in ["bin", "modules", "isocell/bin", "isocell/guest"] {
            std::fs::create_dir_all(stage.join(dir)).map_err(io)?;
        }
        let busybox = require(
            PathBuf::from("/bin/busybox"),
            "busybox-static",
            "run scripts/install-deps.sh",
        )?;
        let text = serde_json::to_string(scenario).unwrap_or_default();
        let mut copies = vec![
            (busybox, stage.join("bin/busybox")),
            (self.paths.runner.clone(), stage.join("isocell/bin/isocell-testhost-runner")),
            (self.paths.vmm.clone(), stage.join("isocell/bin/isocell-vmm")),
            (self.paths.isocell.clone(), stage.join("isocell/bin/isocell")),
            (self.paths.jailer.clone(), stage.join("isocell/bin/isocell-jailer")),
            (self.paths.bzimage.clone(), stage.join("isocell/guest/bzImage")),
            (self.paths.rootfs.clone(), stage.join("isocell/guest/rootfs.ext4")),
        ];
        // The 17 MB vmlinux only travels when a step uses it.
        if text.contains("{vmlinux}") || text.contains("{isocell}") || text.contains("{isocelld}") {
            copies.push((self.paths.vmlinux.clone(), stage.join("isocell/guest/vmlinux")));
        }
        // `isocell run` boots every cell with the agent's initramfs (ISOCELL_AGENT_INITRD).
        if text.contains("{agent_initrd}")
            || text.contains("{isocell}")
            || text.contains("{isocelld}")
        {
            copies.push((
                self.paths.agent_initrd.clone(),
                stage.join("isocell/guest/agent-initrd.cpio"),
            ));
        }
        if text.contains("{acpi_bzimage}") {
            copies
                .push((self.paths.acpi_bzimage.clone(), stage.join("isocell/guest/acpi-bzImage")));
        }
        if text.contains("{initrd}") {
            copies.push((self.paths.initrd.clone(), stage.join("isocell/guest/initrd.cpio")));
        }
        if text.contains("{hostile}") {
            copies.push((self.paths.hostile.clone(), stage.join("isocell/bin/isocell-hostile")));
        }
        // The daemon finds its supervisor next to itself.
        if text.contains("{isocelld}") {
            copies.push((self.paths.isocelld.clone(), stage.join("isocell/bin/isocelld")));
            copies.push((
                self.paths.supervisor.clone(),
                stage.join("isocell/bin/isocell-supervisor"),
            ));
        }
        for m in MODULES {
            copies.push((
                self.paths.nested_host.join("modules").join(format!("{m}.ko")),
                stage.join(format!("modules/{m}.ko")),
            ));
        }
        for (from, to) in copies {
            std::fs::copy(&from, &to)
                .map_err(|e| TestHostError::Io(format!("copying {}: {e}", from.display())))?;
        }
        // The scenario's own files, copied whole (a directory with its tree, links kept).
        for (name, path) in &scenario.files {
            let valid = !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                return Err(TestHostError::Io(format!(
                    "scenario file name {name:?} is not a word"
                )));
            }
            std::fs::create_dir_all(stage.join("isocell/files")).map_err(io)?;
            let to = stage.join("isocell/files").join(name);
            let status = Command::new("cp")
                .arg("-a")
                .arg(path)
                .arg(&to)
                .status()
                .map_err(|e| TestHostError::Io(format!("copying {path}: {e}")))?;
            if !status.success() {
                return Err(TestHostError::Io(format!(
                    "copying {path} into the nested host failed"
                )));
            }
        }
        std::fs::write(stage.join("isocell/scenario.json"), text).map_err(io)?;
        let init = stage.join("init");
        let kvm_amd =
            std::env::var("ISOCELL_NESTED_KVM_AMD").unwrap_or_else(|_| KVM_AMD_PARAMS.to_owned());
        let init_text = NESTED_INIT
            .replace("@KVM_AMD_PARAMS@", &kvm_amd)
            .replace("@ASSETS@", &runner_assets("/isocell", scenario).join(" "));
        std::fs::write(&init, init_text).map_err(io)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        Ok(stage)
    }
}

/// Runs `cmd` (stdin from `input`) for at most `limit`, its stdout and stderr into `log`;
/// whether it succeeded and what it wrote, or `None` if it did not end in time (it is killed).
fn call(
    mut cmd: Command,
    input: Option<std::fs::File>,
    limit: Duration,
    log: &Path,
) -> Result<Option<(bool, String)>, TestHostError> {
    let file = std::fs::File::create(log)
        .map_err(|e| TestHostError::Io(format!("{}: {e}", log.display())))?;
    let err = file.try_clone().map_err(|e| TestHostError::Io(e.to_string()))?;
    let child = cmd
        .stdin(input.map_or_else(Stdio::null, Stdio::from))
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| TestHostError::Io(format!("cannot run {:?}: {e}", cmd.get_program())))?;
    let Some(status) = wait_within(child, limit) else {
        return Ok(None);
    };
    Ok(Some((status.success(), std::fs::read_to_string(log).unwrap_or_default())))
}

/// Waits for `child` at most `limit`; kills it and says `None` past that.
fn wait_within(mut child: std::process::Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// How long `isocell machine stop` or `start` may take when the harness replaces a machine.
const MACHINE_START_WITHIN: Duration = Duration::from_secs(240);

/// Packs the tree at `dir` into the newc cpio archive `out`.
fn pack(dir: &Path, out: &Path) -> Result<(), TestHostError> {
    let status = Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . | cpio --quiet -o -H newc > \"$2\"")
        .args(["sh", &dir.to_string_lossy(), &out.to_string_lossy()])
        .status()
        .map_err(|e| {
            TestHostError::Io(format!("cannot run cpio (scripts/install-deps.sh): {e}"))
        })?;
    if !status.success() {
        return Err(TestHostError::Io("cpio failed (run scripts/install-deps.sh)".into()));
    }
    Ok(())
}

/// Files this large (programs, kernels, images) go to a machine once and are kept there by
/// content; smaller ones travel with each scenario.
const CACHED_FROM: u64 = 1 << 20;

/// The regular files under `dir` of at least [`CACHED_FROM`] bytes, as paths relative to it.
fn large_files(dir: &Path, under: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = std::fs::symlink_metadata(entry.path())?;
        if meta.is_dir() {
            large_files(&entry.path(), under, out)?;
        } else if meta.is_file() && meta.len() >= CACHED_FROM {
            out.push(entry.path().strip_prefix(under).unwrap_or(&entry.path()).to_owned());
        }
    }
    Ok(())
}

/// The (major, minor) version of `qemu-system-x86_64`, if it runs and says.
pub fn qemu_version() -> Option<(u32, u32)> {
    let out = Command::new("qemu-system-x86_64").arg("--version").output().ok()?;
    parse_qemu_version(&String::from_utf8_lossy(&out.stdout))
}

/// Reads "QEMU emulator version 10.0.2 (Debian ...)".
fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Watches a running nested host for progress. Each step has its own timeout inside the host, so
/// out here a result is due within that timeout plus a margin (more for the first, which
/// includes booting the host). A frozen host is caught sooner: the runner beats once a second on
/// its own serial port, and a silent heartbeat means no process in the host can run.
struct HostWatch<'a> {
    results: &'a Path,
    heartbeat: &'a Path,
    started: Instant,
    /// Results reported so far, and when the last one came.
    done: usize,
    last_progress: Instant,
    /// Heartbeat bytes seen so far (0: the runner has not started), and when the last came.
    beats: u64,
    last_beat: Instant,
    longest_silence: Duration,
}

impl<'a> HostWatch<'a> {
    fn new(results: &'a Path, heartbeat: &'a Path) -> Self {
        let now = Instant::now();
        HostWatch {
            results,
            heartbeat,
            started: now,
            done: 0,
            last_progress: now,
            beats: 0,
            last_beat: now,
            longest_silence: Duration::ZERO,
        }
    }

    /// Reads the host's progress; says why it counts as frozen, if it does.
    fn stalled(&mut self, scenario: &Scenario) -> Option<String> {
        let reported = std::fs::read_to_string(self.results)
            .map(|t| t.lines().filter(|l| l.starts_with('{')).count())
            .unwrap_or(0);
        if reported > self.done {
            self.done = reported;
            self.last_progress = Instant::now();
        }
        let beats = std::fs::metadata(self.heartbeat).map_or(0, |m| m.len());
        if beats > self.beats {
            if self.beats == 0 && self.started.elapsed() > Duration::from_secs(30) {
                eprintln!(
                    "isocell-testhost: the nested host took {:.1} s to start its runner",
                    self.started.elapsed().as_secs_f64()
                );
            }
            if self.beats > 0 {
                self.longest_silence = self.longest_silence.max(self.last_beat.elapsed());
            }
            self.beats = beats;
            self.last_beat = Instant::now();
        }
        let allowance = scenario.steps.get(self.done).map_or(60, |s| s.timeout_secs + 60)
            + if self.done == 0 { 120 } else { 0 };
        if self.beats == 0 && self.started.elapsed() > FIRST_HEARTBEAT_WITHIN {
            Some(format!("its runner did not start within {} s", FIRST_HEARTBEAT_WITHIN.as_secs()))
        } else if self.beats > 0 && self.last_beat.elapsed() > HEARTBEAT_SILENCE {
            Some(format!("no heartbeat for {} s", HEARTBEAT_SILENCE.as_secs()))
        } else if self.last_progress.elapsed() > Duration::from_secs(allowance) {
            Some(format!("no result for {allowance} s"))
        } else {
            None
        }
    }
}

/// Asks QEMU's monitor (a Unix socket) for the nested host's CPU state: registers (is it halted,
/// with interrupts enabled?), its local APIC (is the timer armed, is a vector pending in IRR?) and
/// the PICs. Empty if the monitor does not answer within a few seconds.
fn frozen_cpu_state(monitor: &Path) -> String {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let Ok(mut sock) = UnixStream::connect(monitor) else { return String::new() };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = sock.write_all(b"info registers\ninfo lapic\ninfo pic\ninfo irq\n");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && out.len() < 64 * 1024 {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Quiet for half a second after the last command's answer: done.
                if String::from_utf8_lossy(&out).contains("info irq") && !out.is_empty() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).replace('\r', "")
}

/// How many times a frozen nested host is replaced in one scenario before the run fails.
const MAX_NESTED_RESTARTS: u32 = 6;

/// How many nested hosts in a row may freeze before reporting a single result.
const MAX_FRUITLESS_RESTARTS: u32 = 3;

/// How long the runner's heartbeat may be silent before the nested host counts as frozen. It
/// beats every second; a busy but healthy host has never been seen to miss more than a few.
const HEARTBEAT_SILENCE: Duration = Duration::from_secs(45);

/// How long the nested host may take to boot and start its runner (it takes seconds).
const FIRST_HEARTBEAT_WITHIN: Duration = Duration::from_secs(120);

/// What one nested host, or one run in the machine, produced.
struct HostRun {
    results: Vec<StepResult>,
    why: String,
    hung: bool,
    console: String,
}

fn parse_results(text: &str) -> Vec<StepResult> {
    text.lines().filter_map(|l| serde_json::from_str(l.trim()).ok()).collect()
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The I/O port of the nested host's results channel (QEMU `isa-debugcon`; NESTED_INIT passes
/// the same number to the runner). Not 0x402, where SeaBIOS writes its own log.
const RESULTS_PORT: u16 = 0x4f0;

/// The nested host's timer runs periodically, not one-shot (no tickless idle, no high-resolution
/// timers). QEMU 10.0's emulated SVM can lose the wake-up of the nested host's LAPIC timer
/// interrupt: `helper_vmrun` updates the vCPU's `interrupt_request` without the big lock, racing
/// the timer's `CPU_INTERRUPT_POLL` from the main loop (made atomic upstream in QEMU 10.2,
/// "cpu-common: use atomic access for interrupt_request"). The vector then sits in IRR and, with
/// a one-shot timer, nothing ever raises it again: the host froze within 1-46 console-on boots.
/// A periodic timer raises it again at the next tick, so a lost wake-up costs one tick (4 ms):
/// 50 console-on boots ran without a freeze (tests/e2e/console_storm.rs).
const NESTED_TICK: &str = "nohz=off highres=off";

/// Parameters for the nested host's kvm-amd (`ISOCELL_NESTED_KVM_AMD` overrides).
const KVM_AMD_PARAMS: &str = "";

/// Modules that give the nested host KVM, in load order.
const MODULES: [&str; 4] = ["irqbypass", "kvm", "ccp", "kvm-amd"];

/// Lists a host's cgroups but the cells' parent (which the first cell creates and every cell
/// shares): those a scenario leaves are the difference. The root is listed too, so the list is
/// never empty (busybox grep takes an empty pattern file as matching everything).
const CGROUP_DIRS: &str = "find /sys/fs/cgroup -type d ! -path /sys/fs/cgroup/isocell | sort";

/// After a scenario in the machine (`$r`, its directory): names and removes what it left (the
/// processes of cells, daemons, shims and test tools; mounts under `$r`; new cgroups), then
/// removes `$r`. Prints a line `left:` followed by what it found (nothing when nothing was
/// left). The machine's own daemon (started with its config in /isocell/etc) is not the
/// scenario's.
const LEFTOVER_CHECK: &str = r#"left=
for p in /proc/[0-9]*; do
  pid=${p#/proc/}
  [ $pid = $$ ] && continue
  read -r c < $p/comm 2>/dev/null || continue
  # The machine's own processes all live in its first mount namespace (but the kernel's devtmpfs
  # thread); anything else in another one is the scenario's (its runner's, or a cell's jail).
  [ "$c" = kdevtmpfs ] && continue
  if [ $p/ns/mnt -ef /proc/$$/ns/mnt ]; then
    case $c in
      isocell-vmm|isocell-jailer|isocell-supervi*|isocell-hostile|isocell-testhos*|containerd*|ctr) ;;
      isocelld) grep -q /isocell/etc/isocelld.toml $p/cmdline 2>/dev/null && continue ;;
      *) continue ;;
    esac
  fi
  grep -q '^State:.*Z' $p/status 2>/dev/null && continue
  left="$left process:$c"
  kill -9 $pid 2>/dev/null
done
[ -n "$left" ] && sleep 1
for m in $(awk -v r="$r" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r); do
  left="$left mount:$m"
  umount -l $m 2>/dev/null
done
@CGROUP_DIRS@ > $r/cgroups.after
for g in $(grep -vxF -f $r/cgroups.before $r/cgroups.after | sort -r); do
  left="$left cgroup:$g"
  [ -e $g/cgroup.kill ] && echo 1 > $g/cgroup.kill
  rmdir $g 2>/dev/null
done
rm -rf $r
echo "left:$left"
"#;

/// PID 1 of the nested host: mounts, loads KVM, hands over to the runner (which powers off).
const NESTED_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=80% tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# Loopback up, for tests that serve on 127.0.0.1 (the daemon's TLS listener).
ip link set lo up || echo "isocell-testhost: loopback did not come up"
for m in irqbypass kvm ccp kvm-amd; do
  args=; [ $m = kvm-amd ] && args="@KVM_AMD_PARAMS@"
  insmod /modules/$m.ko $args || echo "isocell-testhost: insmod $m $args failed"
done
echo "isocell-testhost: kvm-amd $(for p in /sys/module/kvm_amd/parameters/*; do printf '%s=%s ' ${p##*/} $(cat $p); done)" 
[ -c /dev/kvm ] || echo "isocell-testhost: /dev/kvm did not appear"
export ISOCELL_KERNEL=/isocell/guest/vmlinux ISOCELL_IMAGE=/isocell/guest/rootfs.ext4 ISOCELL_STATE_DIR=/tmp/isocell-state
export ISOCELL_AGENT_INITRD=/isocell/guest/agent-initrd.cpio
exec /isocell/bin/isocell-testhost-runner --scenario /isocell/scenario.json \
  --results ioport:0x4f0 --heartbeat /dev/ttyS1 --work /tmp/steps --host nested --poweroff \
  @ASSETS@
"#;

/// The runner's `--asset` arguments for the files staged under `top` (the layout
/// `build_initramfs` makes): the test host's own, then the scenario's.
fn runner_assets(top: &str, scenario: &Scenario) -> Vec<String> {
    let own = [
        ("vmm", "bin/isocell-vmm"),
        ("isocell", "bin/isocell"),
        ("hostile", "bin/isocell-hostile"),
        ("isocelld", "bin/isocelld"),
        ("bzimage", "guest/bzImage"),
        ("vmlinux", "guest/vmlinux"),
        ("acpi_bzimage", "guest/acpi-bzImage"),
        ("rootfs", "guest/rootfs.ext4"),
        ("initrd", "guest/initrd.cpio"),
        ("agent_initrd", "guest/agent-initrd.cpio"),
    ];
    let own = own.iter().map(|(name, path)| format!("{name}={top}/{path}"));
    let files = scenario.files.keys().map(|name| format!("{name}={top}/files/{name}"));
    own.chain(files).flat_map(|a| ["--asset".to_owned(), a]).collect()
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), TestHostError> {
    let text = serde_json::to_string(value).map_err(|e| TestHostError::Io(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| TestHostError::Io(format!("{}: {e}", path.display())))
}

/// Reads the runner's result lines and checks every step reported.
fn collect(
    results: &Path,
    scenario: &Scenario,
    why: &str,
) -> Result<Vec<StepResult>, TestHostError> {
    let got = parse_results(&std::fs::read_to_string(results).unwrap_or_default());
    if got.len() < scenario.steps.len() {
        return Err(TestHostError::Incomplete {
            host: "direct",
            got: got.len(),
            want: scenario.steps.len(),
            why: why.to_owned(),
            console: String::new(),
        });
    }
    Ok(got)
}

/// A temporary directory removed on drop, whatever happens.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, TestHostError> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("isocell-testhost-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(|e| TestHostError::Io(format!("{}: {e}", path.display())))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `results` as pretty JSON (for the CLI).
pub fn print_results(results: &[StepResult]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string_pretty(results).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::parse_qemu_version;

    #[test]
    fn reads_qemu_versions() {
        let v10 = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright";
        assert_eq!(parse_qemu_version(v10), Some((10, 0)));
        let v7 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)";
        assert_eq!(parse_qemu_version(v7), Some((7, 2)));
        assert_eq!(parse_qemu_version("qemu: command not found"), None);
        assert_eq!(parse_qemu_version(""), None);
    }
}
