//! `isocell machine`: cells on hosts without hardware virtualization.
//!
//! A machine is the nested test host made durable: Debian's kernel with KVM under QEMU (KVM when
//! this host has it, TCG with emulated AMD SVM otherwise), the IsoCell binaries, cell kernel and
//! base image in its initramfs, `isocelld` running, and its state directory (audit log, host
//! key, images, the daemon's database) on a persistent ext4 disk image, so evidence survives
//! `stop` and `start`. This host reaches it only through two loopback-only ports that QEMU
//! forwards: the daemon's TLS API (client certificates made by `init`, kept in the machine's
//! directory) and a token-guarded debugging exec ([`exec`]).
//!
//! Files, in the machine directory (mode 0700): `machine.json` (what `init` chose), `disk.img`,
//! the TLS files and exec token, and while it runs `run.json` (QEMU's pid and ports),
//! `initramfs.cpio`, `console.log`, `heartbeat` (one byte a second from the machine) and
//! `monitor.sock`.

pub mod boot;
pub mod certs;
mod evidence;
pub mod exec;

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Why a machine command failed; every message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// No machine was created.
    #[error("there is no isocell machine at {}: create one with `isocell machine init`", .0.display())]
    NotCreated(PathBuf),
    /// `init` found one.
    #[error("an isocell machine already exists at {}: use it (`isocell machine start`), or remove it first (`isocell machine rm`)", .0.display())]
    Exists(PathBuf),
    /// The machine is not running.
    #[error("the isocell machine is not running ({0}); start it with `isocell machine start`")]
    NotRunning(String),
    /// A bad option value.
    #[error("{0}")]
    Invalid(String),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Something else failed; the text says what.
    #[error("{0}")]
    Failed(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MachineError {
    let what = what.into();
    move |source| MachineError::Io { what, source }
}

/// The smallest and largest values `init` accepts.
pub mod limits {
    /// vCPUs of the machine.
    pub const CPUS: std::ops::RangeInclusive<u32> = 1..=64;
    /// Its memory, MiB: room for the host's tmpfs (the initramfs) and at least one cell.
    pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 1280..=(1 << 20);
    /// Its state disk, MiB.
    pub const DISK_MIB: std::ops::RangeInclusive<u64> = 256..=(16 << 20);
}

/// What `init` chose; fixed for the machine's life (`rm` and `init` again to change it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// State disk size, MiB.
    pub disk_mib: u64,
    /// The machine's id, in its evidence (`host.machine.machine_id` of its receipts).
    pub machine_id: String,
    /// The jurisdiction, zone and operator of its host profile (first boot).
    pub jurisdiction: String,
    /// Zone or site.
    pub zone: String,
    /// Operator.
    pub operator: String,
    /// No network beyond the two forwarded ports: the machine (and its cells' egress) cannot
    /// reach this host's loopback or anything else. Otherwise it reaches what this host
    /// reaches, through QEMU's user network (10.0.2.2 is this host's loopback).
    #[serde(default)]
    pub isolated: bool,
}

/// A started machine: written by `start`, removed by `stop`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RunState {
    /// QEMU's pid.
    pub pid: i32,
    /// This host's loopback port for the daemon's TLS API.
    pub api_port: u16,
    /// This host's loopback port for `machine exec`.
    pub exec_port: u16,
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// When it started, ms since the epoch.
    pub started_ms: u64,
    /// When QEMU started, in clock ticks since this host booted: with `pid`, names the process.
    pub pid_start: u64,
}

/// What `status` finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not started (or stopped cleanly).
    Stopped,
    /// QEMU runs and beats, but the daemon does not answer yet.
    Starting,
    /// The daemon answers.
    Running,
    /// QEMU runs but the machine's heartbeat has been silent this long.
    Hung(Duration),
    /// QEMU is gone without `stop`.
    Died,
}

impl State {
    /// One word for it.
    pub fn name(&self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Running => "running",
            State::Hung(_) => "hung",
            State::Died => "died",
        }
    }
}

/// How long the heartbeat may be silent before the machine counts as hung (the nested test
/// host's rule: a healthy, busy host has never missed more than a few seconds);
/// `ISOCELL_MACHINE_HANG_SECS` changes it.
pub fn hang_after() -> Duration {
    let secs = std::env::var("ISOCELL_MACHINE_HANG_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s| *s > 0)
        .unwrap_or(45);
    Duration::from_secs(secs)
}

/// How long a machine may take from QEMU's start to its daemon answering
/// (`ISOCELL_MACHINE_START_SECS`, default 300).
fn start_limit() -> Duration {
    Duration::from_secs(
        std::env::var("ISOCELL_MACHINE_START_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300),
    )
}

/// The guest-side ports QEMU forwards to.
pub const GUEST_API_PORT: u16 = 7443;
/// See [`GUEST_API_PORT`].
pub const GUEST_EXEC_PORT: u16 = 7444;

/// An `isocell machine`, by its directory.
#[derive(Debug, Clone)]
pub struct Machine {
    dir: PathBuf,
}

/// The default machine directory: `ISOCELL_MACHINE_DIR`, else `/var/lib/isocell-machine` for
/// root, else `$XDG_STATE_HOME/isocell/machine` (`~/.local/state/isocell/machine`).
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ISOCELL_MACHINE_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/isocell-machine");
    }
    let state = std::env::var_os("XDG_STATE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".local/state")
    });
    state.join("isocell/machine")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Random bytes from the kernel.
pub(crate) fn random_hex(n: usize) -> Result<String, MachineError> {
    let mut b = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(io("reading /dev/urandom"))?;
    Ok(hex::encode(b))
}

/// Writes a file only its owner can read, replacing any.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), MachineError> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("creating {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(io(format!("writing {}", path.display())))
}

/// When `pid` started, in clock ticks since boot (`/proc/PID/stat` field 22): with the pid,
/// it names one process for good, whatever pids are reused.
fn process_start(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is a QEMU whose `-pidfile` is the one in `dir`.
fn is_qemu_of(pid: i32, dir: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let pidfile = dir.join("qemu.pid");
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2).any(|w| w[0] == b"-pidfile" && w[1] == pidfile.as_os_str().as_encoded_bytes())
}

/// Finds programs in the sbin directories too, which are not in a user's PATH on Debian.
fn sbin(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A free loopback TCP port (free now; QEMU binds it moments later and fails clearly if not).
fn free_port() -> Result<u16, MachineError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    l.local_addr().map(|a| a.port()).map_err(io("finding a free port"))
}

impl Machine {
    /// The machine in `dir` (which may not exist yet), made absolute: the path is part of how
    /// its QEMU is told apart from other processes.
    pub fn at(dir: PathBuf) -> Machine {
        Machine { dir: std::path::absolute(&dir).unwrap_or(dir) }
    }

    /// Whether `run`'s QEMU is still the live process it was.
    fn alive(&self, run: &RunState) -> bool {
        is_qemu_of(run.pid, &self.dir) && process_start(run.pid) == Some(run.pid_start)
    }

    /// Holds off other `isocell machine` commands on this machine while it is held.
    fn lock(&self) -> Result<fs::File, MachineError> {
        use std::os::fd::AsRawFd as _;
        let path = self.file("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        // SAFETY: flock on a descriptor we own; released when `f` is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(MachineError::Invalid(
                "another `isocell machine` command is working on this machine; wait for it to finish".into(),
            ));
        }
        Ok(f)
    }

    /// An error unless `init` made the machine (its configuration need not parse: `stop` and
    /// `rm` must work on a damaged one).
    fn must_exist(&self) -> Result<(), MachineError> {
        if self.exists() {
            Ok(())
        } else {
            Err(MachineError::NotCreated(self.dir.clone()))
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file in its directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether `init` made it.
    pub fn exists(&self) -> bool {
        self.file("machine.json").is_file()
    }

    /// Its configuration.
    pub fn config(&self) -> Result<MachineConfig, MachineError> {
        let path = self.file("machine.json");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MachineError::NotCreated(self.dir.clone()))
            }
            Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
        };
        serde_json::from_str(&text).map_err(|e| {
            MachineError::Failed(format!(
                "{} is damaged ({e}); remove the machine (`isocell machine rm`) and create it again",
                path.display()
            ))
        })
    }

    /// Creates the machine: its directory, a formatted state disk, TLS certificates and the
    /// exec token. It does not start it.
    pub fn init(&self, config: &MachineConfig) -> Result<(), MachineError> {
        if !limits::CPUS.contains(&config.cpus) {
            return Err(MachineError::Invalid(format!(
                "--cpus {}: a machine has {} to {} vCPUs",
                config.cpus,
                limits::CPUS.start(),
                limits::CPUS.end()
            )));
        }
        if !limits::MEMORY_MIB.contains(&config.memory_mib) {
            return Err(MachineError::Invalid(format!(
                "--memory {} MiB: give {} MiB to {} MiB (the machine holds its own tmpfs and its cells)",
                config.memory_mib,
                limits::MEMORY_MIB.start(),
                limits::MEMORY_MIB.end()
            )));
        }
        if !limits::DISK_MIB.contains(&config.disk_mib) {
            return Err(MachineError::Invalid(format!(
                "--disk {} MiB: give {} MiB to {} MiB",
                config.disk_mib,
                limits::DISK_MIB.start(),
                limits::DISK_MIB.end()
            )));
        }
        for (flag, v) in [
            ("--jurisdiction", &config.jurisdiction),
            ("--zone", &config.zone),
            ("--operator", &config.operator),
        ] {
            let ok = !v.is_empty()
                && v.len() <= 64
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Err(MachineError::Invalid(format!(
                    "{flag} {v:?}: give 1-64 letters, digits, '-', '_' or '.'"
                )));
            }
        }
        if self.exists() {
            return Err(MachineError::Exists(self.dir.clone()));
        }
        // A new directory, or an empty one (made private): never one with other files in it,
        // which a failed init or `rm` would otherwise touch.
        match fs::read_dir(&self.dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(MachineError::Invalid(format!(
                        "{} is not empty; give a new or empty directory for the machine",
                        self.dir.display()
                    )));
                }
                use std::os::unix::fs::PermissionsExt as _;
                fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
                    .map_err(io(format!("making {} private", self.dir.display())))?;
            }
            Err(_) => fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(io(format!("creating {}", self.dir.display())))?,
        }
        let made = self.init_files(config);
        if made.is_err() {
            // Nothing half-made is left behind: the directory was new or empty.
            self.remove_files();
        }
        made
    }

    /// Every file a machine keeps in its directory.
    const FILES: [&'static str; 16] = [
        "machine.json",
        "disk.img",
        "ca.pem",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
        "exec.token",
        "host.pub",
        "run.json",
        "initramfs.cpio",
        "console.log",
        "heartbeat",
        "qemu.pid",
        "lock",
        "evidence.debugfs",
    ];

    /// Removes the machine's files and then its directory if that left it empty.
    fn remove_files(&self) {
        for f in Self::FILES {
            let _ = fs::remove_file(self.file(f));
        }
        for d in ["stage", "evidence.stage"] {
            let _ = fs::remove_dir_all(self.file(d));
        }
        // What an interrupted private write left.
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name().as_encoded_bytes().ends_with(b".tmp") {
                let _ = fs::remove_file(e.path());
            }
        }
        let _ = fs::remove_dir(&self.dir);
    }

    fn init_files(&self, config: &MachineConfig) -> Result<(), MachineError> {
        let disk = self.file("disk.img");
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&disk)
            .map_err(io(format!("creating {}", disk.display())))?;
        f.set_len(config.disk_mib << 20).map_err(io(format!("sizing {}", disk.display())))?;
        drop(f);
        let out = std::process::Command::new(sbin("mke2fs"))
            .args(["-q", "-F", "-t", "ext4", "-L", "isocell-state", "-m", "0"])
            .arg(&disk)
            .output()
            .map_err(|e| {
                MachineError::Failed(format!(
                    "cannot run mke2fs ({e}); install e2fsprogs (scripts/install-deps.sh)"
                ))
            })?;
        if !out.status.success() {
            return Err(MachineError::Failed(format!(
                "mke2fs could not format {}: {}",
                disk.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        certs::make(&self.dir)?;
        write_private(&self.file("exec.token"), random_hex(32)?.as_bytes())?;
        let text = serde_json::to_string_pretty(config).unwrap_or_default();
        write_private(&self.file("machine.json"), text.as_bytes())
    }

    /// Its run state, if `start` left one.
    pub fn run_state(&self) -> Option<RunState> {
        let text = fs::read_to_string(self.file("run.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// What it is doing now.
    pub fn state(&self) -> Result<(State, Option<RunState>), MachineError> {
        self.config()?;
        let Some(run) = self.run_state() else { return Ok((State::Stopped, None)) };
        if !self.alive(&run) {
            return Ok((State::Died, Some(run)));
        }
        let uptime = Duration::from_millis(now_ms().saturating_sub(run.started_ms));
        let heartbeat = fs::metadata(self.file("heartbeat")).ok().filter(|m| m.len() > 0);
        let (silent, limit) = match heartbeat {
            // Beating: the time since the last beat.
            Some(m) => {
                (m.modified().ok().and_then(|t| t.elapsed().ok()).unwrap_or_default(), hang_after())
            }
            // Not beating yet: its kernel is still booting, until the start limit.
            None => (uptime.saturating_sub(start_limit()), Duration::ZERO),
        };
        if silent > limit {
            return Ok((State::Hung(silent), Some(run)));
        }
        let ready = exec::ping(run.exec_port, &self.token()?).unwrap_or(false);
        Ok((if ready { State::Running } else { State::Starting }, Some(run)))
    }

    /// The exec token.
    pub(crate) fn token(&self) -> Result<String, MachineError> {
        let path = self.file("exec.token");
        fs::read_to_string(&path)
            .map(|t| t.trim().to_owned())
            .map_err(io(format!("reading {}", path.display())))
    }

    /// The last `n` lines of its console.
    pub fn console_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(self.file("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Boots the machine and waits until its daemon answers. A machine that died or hung is
    /// replaced (said on `say`): its disk's journal makes the state consistent again.
    pub fn start(&self, say: &mut dyn FnMut(&str)) -> Result<RunState, MachineError> {
        let config = self.config()?;
        let _lock = self.lock()?;
        match self.state()? {
            (State::Running | State::Starting, Some(run)) => {
                return Err(MachineError::Invalid(format!(
                    "the isocell machine is already running (QEMU pid {}); `isocell machine stop` first to restart it",
                    run.pid
                )))
            }
            (State::Hung(silent), Some(run)) => {
                say(&format!(
                    "the machine (QEMU pid {}) has not answered for {} s; killing it and starting it again",
                    run.pid,
                    silent.as_secs()
                ));
                self.kill(&run)?;
            }
            (State::Died, Some(run)) => say(&format!(
                "the machine (QEMU pid {}) died without `stop`; starting it again (its disk is recovered from its journal). Its console ended with:\n{}",
                run.pid,
                self.console_tail(10)
            )),
            _ => {}
        }
        let _ = fs::remove_file(self.file("run.json"));
        // A new token for every boot: one that leaked stops working at the next start.
        write_private(&self.file("exec.token"), random_hex(32)?.as_bytes())?;
        let stage = boot::stage(self, &config)?;
        let accelerator = boot::accelerator();
        let mut tries = 0;
        let run = loop {
            tries += 1;
            match self.launch(&config, &stage, accelerator) {
                Ok(run) => break run,
                // Another program took a port between our check and QEMU's bind: new ports.
                Err(MachineError::Failed(e)) if tries < 3 && e.contains("forwarding") => continue,
                Err(e) => return Err(e),
            }
        };
        let text = serde_json::to_string_pretty(&run).unwrap_or_default();
        write_private(&self.file("run.json"), text.as_bytes())?;
        // A machine that never gets ready is stopped again, not left half-started.
        let ready = self
            .wait_ready(&run)
            .and_then(|()| self.check_kvm(&run))
            .and_then(|()| self.fetch_public_key(&run));
        match ready {
            Ok(()) => Ok(run),
            Err(e) => {
                if self.kill(&run).is_ok() {
                    let _ = fs::remove_file(self.file("run.json"));
                }
                Err(e)
            }
        }
    }

    /// Starts QEMU (it daemonizes once the machine is set up) on two fresh loopback ports.
    fn launch(
        &self,
        config: &MachineConfig,
        initramfs: &Path,
        accelerator: boot::Accelerator,
    ) -> Result<RunState, MachineError> {
        let api_port = free_port()?;
        let exec_port = loop {
            let p = free_port()?;
            if p != api_port {
                break p;
            }
        };
        for f in ["console.log", "heartbeat", "qemu.pid"] {
            let _ = fs::remove_file(self.file(f));
        }
        let argv = boot::qemu_argv(self, config, initramfs, accelerator, api_port, exec_port);
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| {
                MachineError::Failed(format!(
                    "cannot start {} ({e}); install QEMU (scripts/install-deps.sh)",
                    argv[0]
                ))
            })?;
        if !out.status.success() {
            return Err(MachineError::Failed(format!(
                "QEMU did not start the machine: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let pid: i32 = fs::read_to_string(self.file("qemu.pid"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| {
                MachineError::Failed(format!(
                    "QEMU started but wrote no pid file ({}); find the qemu-system process whose -pidfile is in that directory and end it",
                    self.file("qemu.pid").display()
                ))
            })?;
        let pid_start = process_start(pid).unwrap_or(0);
        Ok(RunState {
            pid,
            api_port,
            exec_port,
            accelerator: accelerator.name().into(),
            started_ms: now_ms(),
            pid_start,
        })
    }

    fn wait_ready(&self, run: &RunState) -> Result<(), MachineError> {
        let started = Instant::now();
        let limit = start_limit();
        let token = self.token()?;
        loop {
            if !self.alive(run) {
                return Err(MachineError::Failed(format!(
                    "the machine stopped while starting. Its console ended with:\n{}",
                    self.console_tail(20)
                )));
            }
            if exec::ping(run.exec_port, &token).unwrap_or(false) {
                return Ok(());
            }
            let heartbeat = fs::metadata(self.file("heartbeat")).ok();
            let beating = heartbeat.as_ref().is_some_and(|m| m.len() > 0);
            let silent = heartbeat
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            if beating && silent > hang_after() {
                return Err(MachineError::Failed(format!(
                    "the machine stopped responding while starting (no heartbeat for {} s); console:\n{}",
                    silent.as_secs(),
                    self.console_tail(20)
                )));
            }
            if started.elapsed() > limit {
                return Err(MachineError::Failed(format!(
                    "the machine did not get ready within {} s; console:\n{}",
                    limit.as_secs(),
                    self.console_tail(20)
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Fails, saying why, if the machine has no /dev/kvm (no cell could run in it).
    fn check_kvm(&self, run: &RunState) -> Result<(), MachineError> {
        let argv = ["test".to_owned(), "-c".to_owned(), "/dev/kvm".to_owned()];
        let (code, _, _) = exec::capture(run.exec_port, &self.token()?, &argv)?;
        if code == 0 {
            return Ok(());
        }
        Err(MachineError::Failed(format!(
            "the machine has no /dev/kvm, so no cell can run in it ({}); its console:\n{}",
            if run.accelerator == "kvm" {
                "with hardware acceleration the outer host must allow nested virtualization: kvm_amd or kvm_intel `nested=1`"
            } else {
                "its kernel did not load KVM"
            },
            self.console_tail(20)
        )))
    }

    /// Stops the machine: its daemon and cells end, its disk is synced and unmounted, and it
    /// powers off; killed if it does not within `grace`.
    pub fn stop(&self, grace: Duration) -> Result<Option<(RunState, bool)>, MachineError> {
        self.must_exist()?;
        let _lock = self.lock()?;
        self.stop_locked(grace)
    }

    /// [`Machine::stop`] with the lock held; the run it ended and whether it was still alive.
    fn stop_locked(&self, grace: Duration) -> Result<Option<(RunState, bool)>, MachineError> {
        let Some(run) = self.run_state() else { return Ok(None) };
        let was_alive = self.alive(&run);
        if was_alive {
            let asked = self.token().and_then(|t| exec::shutdown(run.exec_port, &t)).is_ok();
            let deadline = Instant::now() + if asked { grace } else { Duration::ZERO };
            while self.alive(&run) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            self.kill(&run)?;
        }
        for f in ["run.json", "initramfs.cpio", "qemu.pid"] {
            let _ = fs::remove_file(self.file(f));
        }
        Ok(Some((run, was_alive)))
    }

    /// Kills `run`'s QEMU if it is still alive; an error if it will not die.
    fn kill(&self, run: &RunState) -> Result<(), MachineError> {
        if !self.alive(run) {
            return Ok(());
        }
        // SAFETY: kill(2) with a pid we just checked is this machine's QEMU.
        unsafe { libc::kill(run.pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.alive(run) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.alive(run) {
            return Err(MachineError::Failed(format!(
                "QEMU (pid {}) did not end after SIGKILL; its record is kept in {}",
                run.pid,
                self.file("run.json").display()
            )));
        }
        Ok(())
    }

    /// Removes the machine: stops it if it runs, then deletes its files (disk included) and
    /// its directory if nothing else is in it.
    pub fn remove(&self) -> Result<(), MachineError> {
        self.must_exist()?;
        let lock = self.lock()?;
        self.stop_locked(Duration::from_secs(30))?;
        drop(lock);
        self.remove_files();
        if self.dir.exists() {
            return Err(MachineError::Failed(format!(
                "removed the machine's files; {} has other files in it and is left",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// What a client of its daemon needs: the loopback port, and the CA, certificate and key
    /// files.
    pub fn api(&self) -> Result<Api, MachineError> {
        let (state, run) = self.state()?;
        match (state, run) {
            (State::Running, Some(run)) => Ok(Api {
                port: run.api_port,
                ca: self.file("ca.pem"),
                cert: self.file("client.pem"),
                key: self.file("client.key"),
            }),
            (State::Hung(s), _) => Err(MachineError::NotRunning(format!(
                "it has not answered for {} s; `isocell machine start` replaces it",
                s.as_secs()
            ))),
            (State::Died, _) => Err(MachineError::NotRunning("it died".into())),
            (State::Starting, _) => Err(MachineError::NotRunning("it is still starting".into())),
            (_, _) => Err(MachineError::NotRunning("it is stopped".into())),
        }
    }

    /// Runs `argv` in the machine (not in a cell), streaming its output to ours; its status.
    pub fn exec(&self, argv: &[String], stdin: bool) -> Result<i32, MachineError> {
        let (state, run) = self.state()?;
        let run = match (state, run) {
            (State::Running | State::Starting, Some(run)) => run,
            (s, _) => return Err(MachineError::NotRunning(s.name().into())),
        };
        exec::run(run.exec_port, &self.token()?, argv, stdin)
    }
}

/// A new machine id (16 hex digits).
pub fn new_id() -> Result<String, MachineError> {
    random_hex(8)
}

/// The state files `evidence` copies out (what `isocell audit verify` reads).
const EVIDENCE: [&str; 4] = ["host.toml", "host.pub", "audit", "cells"];

impl Machine {
    /// The machine's host public key (hex), as `start` last read it from the machine.
    pub fn host_public_key(&self) -> Option<String> {
        let text = fs::read_to_string(self.file("host.pub")).ok()?;
        let key = text.trim();
        (key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit())).then(|| key.to_owned())
    }

    /// Seconds since `run` started.
    pub fn uptime_secs(&self, run: &RunState) -> u64 {
        now_ms().saturating_sub(run.started_ms) / 1000
    }

    /// Reads the machine's public key from it and keeps a copy in its directory.
    fn fetch_public_key(&self, run: &RunState) -> Result<(), MachineError> {
        let argv = ["cat".to_owned(), "/var/lib/isocell/host.pub".to_owned()];
        let (code, out, err) = exec::capture(run.exec_port, &self.token()?, &argv)?;
        if code != 0 {
            return Err(MachineError::Failed(format!(
                "the machine has no host key: {}",
                String::from_utf8_lossy(&err).trim()
            )));
        }
        write_private(&self.file("host.pub"), &out)
    }

    /// Copies the machine's evidence (profile, public key, audit log, receipts) into `dest`
    /// (new or empty; made private): from the running machine, or from a stopped one's disk
    /// (read-only). What comes out is treated as hostile: regular files and directories only,
    /// with modes 0644 and 0755, under names that stay inside `dest`.
    pub fn export_evidence(&self, dest: &Path) -> Result<(), MachineError> {
        self.config()?;
        let _lock = self.lock()?;
        match fs::read_dir(dest).map(|mut entries| entries.next().is_some()) {
            Ok(true) => {
                return Err(MachineError::Invalid(format!(
                    "{} is not empty; give a new or empty directory",
                    dest.display()
                )))
            }
            Ok(false) => {}
            Err(_) => fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dest)
                .map_err(io(format!("creating {}", dest.display())))?,
        }
        let copied = self.copy_evidence(dest);
        if copied.is_err() {
            // `dest` was new or empty: what is in it now is this copy's.
            for e in fs::read_dir(dest).into_iter().flatten().flatten() {
                let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
            }
        }
        copied
    }

    fn copy_evidence(&self, dest: &Path) -> Result<(), MachineError> {
        let (state, run) = self.state()?;
        match (state, run) {
            (State::Running | State::Starting, Some(run)) => {
                let script = format!(
                    "cd /var/lib/isocell && tar -cf - $(for f in {}; do [ -e $f ] && echo $f; done)",
                    EVIDENCE.join(" ")
                );
                let argv = ["sh".to_owned(), "-c".to_owned(), script];
                let (code, tar, err) = exec::capture(run.exec_port, &self.token()?, &argv)?;
                if code != 0 {
                    return Err(MachineError::Failed(format!(
                        "reading the machine's evidence: {}",
                        String::from_utf8_lossy(&err).trim()
                    )));
                }
                evidence::untar(&tar, dest)
            }
            (State::Hung(_), _) => Err(MachineError::NotRunning(
                "it is hung; `isocell machine stop` it to read its disk".into(),
            )),
            (State::Died, _) => Err(MachineError::NotRunning(
                "it died, and its disk's journal may hold entries not yet in place; \
                 `isocell machine start` replays it, then try again"
                    .into(),
            )),
            _ => {
                evidence::check_clean(&self.file("disk.img"))?;
                let stage = self.file("evidence.stage");
                let _ = fs::remove_dir_all(&stage);
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&stage)
                    .map_err(io(format!("creating {}", stage.display())))?;
                let copied = evidence::dump(&self.file("disk.img"), &stage, &EVIDENCE)
                    .and_then(|()| evidence::copy_tree(&stage, dest));
                let _ = fs::remove_dir_all(&stage);
                copied?;
                if !dest.join("host.pub").is_file() || !dest.join("audit").is_dir() {
                    return Err(MachineError::Failed(
                        "the machine's disk has no host profile or audit log yet (was it ever started?)"
                            .into(),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// How to reach a running machine's daemon.
#[derive(Debug, Clone)]
pub struct Api {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The CA that signed its certificate.
    pub ca: PathBuf,
    /// This host's client certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// Whether this host can run cells itself (hardware virtualization); the reason if not.
pub fn hardware_virtualization() -> Result<(), String> {
    isocell_vmm_model::host_check::check().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config() -> MachineConfig {
        MachineConfig {
            cpus: 1,
            memory_mib: 1536,
            disk_mib: 256,
            machine_id: "m1".into(),
            jurisdiction: "EU".into(),
            zone: "lab".into(),
            operator: "ops".into(),
            isolated: false,
        }
    }

    #[test]
    fn bad_sizes_and_names_are_refused_before_anything_is_made() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Machine::at(tmp.path().join("m"));
        for (c, needle) in [
            (MachineConfig { cpus: 0, ..config() }, "--cpus 0"),
            (MachineConfig { memory_mib: 64, ..config() }, "--memory 64 MiB"),
            (MachineConfig { disk_mib: 1, ..config() }, "--disk 1 MiB"),
            (MachineConfig { jurisdiction: "E U".into(), ..config() }, "--jurisdiction"),
        ] {
            let e = m.init(&c).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert!(!m.dir().exists());
        }
    }

    #[test]
    fn a_machine_that_was_never_made_says_how_to_make_it() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Machine::at(tmp.path().join("none"));
        let e = m.state().unwrap_err().to_string();
        assert!(e.contains("isocell machine init"), "{e}");
        let e = m.stop(Duration::from_secs(1)).unwrap_err().to_string();
        assert!(e.contains("isocell machine init"), "{e}");
    }

    #[test]
    fn init_makes_a_private_directory_with_a_formatted_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Machine::at(tmp.path().join("m"));
        if std::process::Command::new("mke2fs").arg("-V").output().is_err() {
            eprintln!("no mke2fs here");
            return;
        }
        m.init(&config()).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(fs::metadata(m.dir()).unwrap().permissions().mode() & 0o777, 0o700);
        for f in ["client.key", "server.key", "exec.token", "machine.json"] {
            assert_eq!(fs::metadata(m.file(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
        }
        assert_eq!(m.config().unwrap(), config());
        assert_eq!(m.state().unwrap().0, State::Stopped);
        assert!(m.init(&config()).unwrap_err().to_string().contains("already exists"));
        // A run state whose QEMU is gone is a machine that died.
        let run = RunState {
            pid: i32::MAX,
            api_port: 1,
            exec_port: 2,
            accelerator: "tcg".into(),
            started_ms: 0,
            pid_start: 0,
        };
        fs::write(m.file("run.json"), serde_json::to_string(&run).unwrap()).unwrap();
        assert_eq!(m.state().unwrap().0, State::Died);
        m.remove().unwrap();
        assert!(!m.dir().exists());
    }
}
