//! `isocell host`, `isocell audit` and `isocell receipt`: the host profile, and offline
//! verification of the evidence with nothing but the host's public key.

use std::path::{Path, PathBuf};

use clap::Subcommand;

/// Prints a line to stdout; a closed pipe (`isocell audit show | head`) is not an error.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
use ed25519_dalek::VerifyingKey;
use isocell_evidence::{audit, receipt};

use crate::exit;
use isocell_host::locate::{self, state_dir};
use isocell_host::state::Host;
use isocell_host::{confine, CellImage, CellPlan, CellRequest, HostConfig};

/// `isocell host ...`
#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// Write this host's profile (and a signing key if there is none).
    Init {
        /// Legal jurisdiction of this host (for example EU, DE, US).
        #[arg(long)]
        jurisdiction: String,
        /// Zone or site.
        #[arg(long, default_value = "unspecified")]
        zone: String,
        /// Who operates this host.
        #[arg(long, default_value = "unspecified")]
        operator: String,
        /// Replace an existing profile (the signing key is kept).
        #[arg(long)]
        force: bool,
    },
    /// Print the profile and the public key.
    Show,
}

/// `isocell audit ...`
#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Verify the audit log's hash chain, checkpoints and signed head, and that it was not wiped
    /// or rolled back: every receipt under the state directory must name an entry that is in
    /// the log, and with --since the log must extend a signed checkpoint kept from before.
    /// Reports the first problem.
    Verify(VerifyArgs),
    /// Append a signed checkpoint to the audit log and print it (JSON) for an auditor to keep
    /// off this host; `isocell audit verify --since FILE` later checks that the log extends it.
    Checkpoint {
        /// Also write the checkpoint to this file.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Print the audit log's entries as JSON lines.
    Show {
        /// Audit directory (default: the state directory's).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `isocell receipt ...`
#[derive(Subcommand, Debug)]
pub enum ReceiptCmd {
    /// Verify a launch or exit receipt's signature.
    Verify {
        /// The receipt file.
        file: PathBuf,
        /// Trusted public key: 64 hex digits, or a file holding them (default: this host's).
        #[arg(long)]
        public_key: Option<String>,
    },
}

/// `isocell surface`
#[derive(clap::Args, Debug)]
pub struct SurfaceArgs {
    /// The stored surface of a cell that ran (its id, from the receipts), instead of a new
    /// cell's.
    #[arg(long, value_name = "ID")]
    cell: Option<String>,
    /// vCPUs of the cell to describe.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory of the cell to describe: MiB, or a size such as 512M [default: 256M].
    #[arg(long, value_parser = crate::parse_memory)]
    memory: Option<isocell_spec::MemorySize>,
    /// Describe a cell started with --no-jail.
    #[arg(long)]
    no_jail: bool,
    /// Describe a cell with this egress rule (repeatable), as `isocell run --egress`.
    #[arg(long = "egress", value_name = "RULE")]
    egress: Vec<String>,
    /// Describe a cell with this published port (repeatable), as `isocell run --publish`.
    #[arg(long = "publish", value_name = "[IP:]PORT:PORT")]
    publish: Vec<String>,
    /// Compare with this surface (JSON); print what the cell exposes beyond it and exit 1 if
    /// there is anything.
    #[arg(long, value_name = "BASELINE")]
    diff: Option<PathBuf>,
}

/// Where to find the log and which key to trust.
#[derive(clap::Args, Debug)]
pub struct KeyArgs {
    /// Audit directory (default: the state directory's).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Trusted public key: 64 hex digits, or a file holding them (default: this host's).
    #[arg(long)]
    public_key: Option<String>,
}

/// `isocell audit verify`
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    keys: KeyArgs,
    /// State directory whose profile and receipts (`cells/*/{launch,exit}.json`) are checked
    /// against the log (default: the state directory, unless --dir names another log).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A signed checkpoint taken earlier (`isocell audit checkpoint`, or a copy of
    /// audit.head): the log must still have the entry it names, with the same hash.
    #[arg(long, value_name = "CHECKPOINT_FILE")]
    since: Option<PathBuf>,
}

fn public_key(arg: Option<&str>) -> Result<VerifyingKey, String> {
    let text = match arg {
        Some(a) if a.len() == 64 && a.bytes().all(|b| b.is_ascii_hexdigit()) => a.to_owned(),
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the public key {path}: {e}"))?,
        None => {
            let path = state_dir().join("host.pub");
            std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "cannot read {}: {e}; give the trusted key with --public-key",
                    path.display()
                )
            })?
        }
    };
    receipt::parse_public_key(&text)
}

/// Runs `isocell host`.
pub fn host(cmd: HostCmd) -> u8 {
    let dir = state_dir();
    let result = match cmd {
        HostCmd::Init { jurisdiction, zone, operator, force } => {
            Host::init(&dir, &jurisdiction, &zone, &operator, force).map(|_| ())
        }
        HostCmd::Show => Host::load_or_init(&dir).map(|h| {
            let p = &h.profile;
            say!(
                "host_id = {:?}\njurisdiction = {:?}\nzone = {:?}\noperator = {:?}",
                p.host_id,
                p.jurisdiction,
                p.zone,
                p.operator
            );
            say!("public_key = {:?}", hex::encode(h.key.verifying_key().to_bytes()));
            say!("state_dir = {:?}", dir.display().to_string());
        }),
    };
    match result {
        Ok(()) => 0,
        Err(e) => exit::fail(&e.to_string()),
    }
}

/// Runs `isocell audit`.
pub fn audit(cmd: AuditCmd) -> u8 {
    match cmd {
        AuditCmd::Verify(args) => verify_audit(args),
        AuditCmd::Checkpoint { out } => match checkpoint(out.as_deref()) {
            Ok(text) => {
                say!("{}", text.trim_end());
                0
            }
            Err(e) => exit::fail(&e),
        },
        AuditCmd::Show { dir } => {
            let dir = dir.unwrap_or_else(|| state_dir().join("audit"));
            match audit::read_entries(&dir) {
                Ok(entries) => {
                    for e in entries {
                        say!("{e}");
                    }
                    0
                }
                Err(e) => exit::fail(&e.to_string()),
            }
        }
    }
}

/// Appends a signed checkpoint to this host's log and returns it, written to `out` too.
fn checkpoint(out: Option<&Path>) -> Result<String, String> {
    let host = Host::load(&state_dir()).map_err(|e| e.to_string())?;
    let log = audit::AuditLog::open(&host.dir.join("audit"), host.key.clone())
        .map_err(|e| format!("cannot open the audit log: {e}"))?;
    let text = log.signed_checkpoint().map_err(|e| format!("cannot checkpoint: {e}"))?;
    if let Some(path) = out {
        std::fs::write(path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(text)
}

/// What `isocell audit verify` knows from outside the log: the state directory's profile and
/// receipts, and a checkpoint kept from before.
fn expectations(
    args: &VerifyArgs,
    state: Option<&Path>,
    key: &VerifyingKey,
) -> Result<audit::Expectations, String> {
    let mut expect = audit::Expectations::default();
    if let Some(state) = state {
        let profile = state.join(isocell_host::state::PROFILE_FILE);
        if profile.exists() {
            expect.genesis = Some(format!("the host profile {}", profile.display()));
        }
        let cells = state.join("cells");
        let scan = receipt::scan_cells(&cells, key)?;
        if scan.cells > 0 {
            expect.existed.push(format!(
                "{} holds the records of {} cells",
                cells.display(),
                scan.cells
            ));
        }
        if !scan.unanchored.is_empty() {
            tell!(
                "isocell: note: {} receipts name no audit position (written before receipts did), \
                 for example {}",
                scan.unanchored.len(),
                scan.unanchored[0].display()
            );
        }
        expect.anchors = scan.anchors;
    }
    if let Some(path) = &args.since {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the checkpoint {}: {e}", path.display()))?;
        let cp = audit::parse_checkpoint(&bytes, key)
            .map_err(|e| format!("checkpoint {}: {e}", path.display()))?;
        expect.anchors.push(audit::Anchor {
            source: format!("the signed checkpoint {}", path.display()),
            seq: cp.seq,
            hash: cp.hash,
        });
    }
    Ok(expect)
}

/// Runs `isocell audit verify`.
fn verify_audit(args: VerifyArgs) -> u8 {
    let key = match public_key(args.keys.public_key.as_deref()) {
        Ok(k) => k,
        Err(e) => return exit::fail(&e),
    };
    let (dir, state) = match (&args.keys.dir, &args.state_dir) {
        (None, s) => {
            let s = s.clone().unwrap_or_else(state_dir);
            (s.join("audit"), Some(s))
        }
        (Some(d), s) => (d.clone(), s.clone()),
    };
    if state.is_none() {
        tell!(
            "isocell: note: no --state-dir for the log in {}: no receipts were cross-checked, so \
             a wiped or rolled-back log is caught only with --since",
            dir.display()
        );
    }
    let expect = match expectations(&args, state.as_deref(), &key) {
        Ok(e) => e,
        Err(e) => {
            tell!("isocell: audit log FAILED: {e}");
            return 1;
        }
    };
    let report = audit::verify_expecting(&dir, &key, &expect);
    if let Some(t) = &report.torn_tail {
        tell!(
            "isocell: note: {} bytes at offset {} are a torn final entry (a writer stopped mid-append); everything before verifies",
            t.len, t.offset
        );
    }
    match &report.problem {
        None => {
            say!(
                "audit log OK: {} entries, {} signed checkpoints, {} receipt and checkpoint \
                 positions cross-checked",
                report.entries,
                report.checkpoints,
                report.anchors
            );
            0
        }
        Some(p) if p.line == 0 => {
            tell!("isocell: audit log FAILED: {}", p.reason);
            1
        }
        Some(p) => {
            tell!(
                "isocell: audit log FAILED at line {} (seq {}, byte {}): {}",
                p.line,
                p.seq.map_or("?".into(), |s| s.to_string()),
                p.offset,
                p.reason
            );
            1
        }
    }
}

/// Runs `isocell receipt`.
pub fn receipt(cmd: ReceiptCmd) -> u8 {
    let ReceiptCmd::Verify { file, public_key: key_arg } = cmd;
    let key = match public_key(key_arg.as_deref()) {
        Ok(k) => k,
        Err(e) => return exit::fail(&e),
    };
    let doc = match read_json(&file) {
        Ok(d) => d,
        Err(e) => return exit::fail(&e),
    };
    match receipt::verify(&doc, &key) {
        Ok(()) => {
            say!(
                "receipt OK: {} receipt of cell {}",
                doc["receipt"]["kind"],
                doc["receipt"]["cell"]
            );
            0
        }
        Err(e) => {
            tell!("isocell: receipt {} FAILED: {e}", file.display());
            1
        }
    }
}

/// A JSON file; the error names the file.
fn read_json(path: &Path) -> Result<serde_json::Value, String> {
    std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| format!("not JSON: {e}")))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs `isocell surface`.
pub fn surface(args: SurfaceArgs) -> u8 {
    match surface_of(&args) {
        Ok(current) => match &args.diff {
            None => {
                say!("{}", serde_json::to_string_pretty(&current).unwrap_or_default());
                0
            }
            Some(path) => {
                let baseline = match read_json(path) {
                    Ok(b) => b,
                    Err(e) => return exit::fail(&format!("baseline {e}")),
                };
                let extra = confine::beyond(&current, &baseline);
                if extra.is_empty() {
                    say!("nothing beyond the baseline {}", path.display());
                    return 0;
                }
                say!("beyond the baseline {}:", path.display());
                for fact in &extra {
                    say!("+ {fact}");
                }
                1
            }
        },
        Err(e) => exit::fail(&e),
    }
}

fn surface_of(args: &SurfaceArgs) -> Result<serde_json::Value, String> {
    if let Some(id) = &args.cell {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!("--cell {id:?}: a cell id is letters and digits"));
        }
        let path = state_dir().join("cells").join(id).join("surface.json");
        return read_json(&path).map_err(|e| format!("no stored surface for cell {id}: {e}"));
    }
    let host = HostConfig {
        state_dir: state_dir(),
        run_dir: locate::run_dir(),
        vmm: locate::vmm().map_err(|e| e.to_string())?,
        // Described, not run: the jailer need not be here.
        jailer: (!args.no_jail).then(|| PathBuf::from("isocell-jailer")),
        agent_initrd: locate::agent_initrd(None).map_err(|e| e.to_string())?,
        seccomp_probe: None,
    };
    let request = CellRequest {
        kernel: locate::kernel(None).map_err(|e| e.to_string())?,
        image: CellImage::Block(locate::image(None).map_err(|e| e.to_string())?),
        cpus: args.cpus,
        memory: args.memory.unwrap_or_default(),
        kernel_args: String::new(),
        max_lifetime_secs: None,
        constraints: Default::default(),
        network: isocell_spec::Network::parse(&args.egress, &args.publish)
            .map_err(|e| e.to_string())?,
        snapshot: Default::default(),
        workload: None,
    };
    let plan = CellPlan::new(&host, "surface", request).map_err(|e| e.to_string())?;
    Ok(plan.surface(None))
}
