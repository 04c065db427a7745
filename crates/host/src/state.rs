//! The state directory (`ISOCELL_STATE_DIR`, default `/var/lib/isocell` for root, else
//! `~/.local/state/isocell`): the host profile and signing key, policies, the audit log, digest
//! cache and one record per cell (its receipts). Unlike a cell's run directory, it is kept.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use isocell_evidence::audit::{verifying_key_hex, AuditError, AuditLog};
use isocell_spec::{HostProfile, MachineIdentity};
use serde_json::json;

use crate::error::io;

/// The host profile's file in the state directory. Its presence means the host was set up, and
/// so that its audit log starts with a genesis entry (see [`Host::init`]).
pub const PROFILE_FILE: &str = "host.toml";

/// Why the state directory, the host profile or its key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file system or process operation failed.
    #[error(transparent)]
    Io(#[from] crate::error::PathError),
    /// The host profile does not exist ([`Host::load`]).
    #[error("{} does not exist: this host was never set up (`isocell host init`)", path.display())]
    NotSetUp {
        /// The profile's path.
        path: PathBuf,
    },
    /// The machine identity file (`ISOCELL_MACHINE`) cannot be parsed.
    #[error("the machine identity {} is invalid: {message}", path.display())]
    BadMachine {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// The profile does not parse.
    #[error(
        "{} is invalid: {source}; fix it or recreate it with `isocell host init`",
        path.display()
    )]
    BadProfile {
        /// The profile's path.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: toml::de::Error,
    },
    /// The signing key named by the profile is not a key.
    #[error("{} is not a 32-byte hex Ed25519 seed", path.display())]
    BadKey {
        /// The key's path.
        path: PathBuf,
    },
    /// The key kept by `init` is not a key.
    #[error("{} is not a 32-byte hex seed", path.display())]
    BadSeed {
        /// The key's path.
        path: PathBuf,
    },
    /// A profile exists and `init` was not forced.
    #[error("{} exists; add --force to replace it", path.display())]
    Exists {
        /// The profile's path.
        path: PathBuf,
    },
    /// The audit log could not be opened.
    #[error("cannot open the audit log: {0}")]
    OpenAudit(#[source] AuditError),
    /// The audit log's genesis entry could not be written.
    #[error("cannot write the audit log's genesis entry: {0}")]
    Genesis(#[source] AuditError),
    /// An entry could not be appended to the audit log.
    #[error("cannot write the audit log: {0}")]
    AppendAudit(#[source] AuditError),
    /// The profile could not be serialized.
    #[error(transparent)]
    Serialize(#[from] toml::ser::Error),
}

fn mkdir(dir: &Path) -> Result<(), StateError> {
    Ok(fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("create", dir))?)
}

fn random_bytes<const N: usize>() -> Result<[u8; N], StateError> {
    let mut b = [0u8; N];
    let urandom = Path::new("/dev/urandom");
    fs::File::open(urandom).and_then(|mut f| f.read_exact(&mut b)).map_err(io("read", urandom))?;
    Ok(b)
}

/// The host profile and its signing key.
pub struct Host {
    /// The profile.
    pub profile: HostProfile,
    /// The key receipts and checkpoints are signed with.
    pub key: SigningKey,
    /// The state directory they came from.
    pub dir: PathBuf,
}

/// Holds the state directory's lock (`host.lock`) until dropped, so that two first runs at once
/// do not both create a key and a profile.
fn lock_state(dir: &Path) -> Result<fs::File, StateError> {
    mkdir(dir)?;
    let lock_path = dir.join("host.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io("open", &lock_path))?;
    // SAFETY: flock on a descriptor we own; it is released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io("lock", &lock_path)(std::io::Error::last_os_error()).into());
    }
    Ok(lock)
}

/// The environment variable that names an `isocell machine`'s identity file (TOML, a
/// [`MachineIdentity`]); the machine's init sets it for everything it starts.
pub const MACHINE_ENV: &str = "ISOCELL_MACHINE";

/// This host's identity as an `isocell machine`, if `ISOCELL_MACHINE` names one. A named file
/// that cannot be read is an error: evidence must never silently drop that the host is nested.
fn machine_identity() -> Result<Option<MachineIdentity>, StateError> {
    let Some(path) = std::env::var_os(MACHINE_ENV).map(PathBuf::from) else { return Ok(None) };
    let text = fs::read_to_string(&path).map_err(io("read the machine identity", &path))?;
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| StateError::BadMachine { path, message: e.to_string() })
}

impl Host {
    /// Loads `host.toml` and the key it names from `dir`, creating a profile with
    /// "unspecified" jurisdiction, zone and operator and a fresh key on first use.
    pub fn load_or_init(dir: &Path) -> Result<Host, StateError> {
        let _lock = lock_state(dir)?;
        if !dir.join(PROFILE_FILE).exists() {
            return Host::init_locked(dir, "unspecified", "unspecified", "unspecified", false);
        }
        Host::load_existing(dir)
    }

    /// Loads an existing profile and its key; an error if the host was never set up.
    pub fn load(dir: &Path) -> Result<Host, StateError> {
        let _lock = lock_state(dir)?;
        if !dir.join(PROFILE_FILE).exists() {
            return Err(StateError::NotSetUp { path: dir.join(PROFILE_FILE) });
        }
        Host::load_existing(dir)
    }

    fn load_existing(dir: &Path) -> Result<Host, StateError> {
        let profile_path = dir.join(PROFILE_FILE);
        let text = fs::read_to_string(&profile_path).map_err(io("read", &profile_path))?;
        let mut profile: HostProfile = toml::from_str(&text)
            .map_err(|source| StateError::BadProfile { path: profile_path.clone(), source })?;
        profile.machine = machine_identity()?;
        let key_path = dir.join(&profile.signing_key);
        let hex_seed =
            fs::read_to_string(&key_path).map_err(io("read the signing key", &key_path))?;
        let seed: [u8; 32] = hex::decode(hex_seed.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| StateError::BadKey { path: key_path.clone() })?;
        Ok(Host { profile, key: SigningKey::from_bytes(&seed), dir: dir.to_owned() })
    }

    /// Writes a new profile (and a new key unless one exists and `keep_key`), refusing to
    /// replace an existing profile unless `force`.
    pub fn init(
        dir: &Path,
        jurisdiction: &str,
        zone: &str,
        operator: &str,
        force: bool,
    ) -> Result<Host, StateError> {
        let _lock = lock_state(dir)?;
        Host::init_locked(dir, jurisdiction, zone, operator, force)
    }

    /// [`Host::init`], with the state lock held by the caller.
    fn init_locked(
        dir: &Path,
        jurisdiction: &str,
        zone: &str,
        operator: &str,
        force: bool,
    ) -> Result<Host, StateError> {
        mkdir(dir)?;
        let profile_path = dir.join(PROFILE_FILE);
        if profile_path.exists() && !force {
            return Err(StateError::Exists { path: profile_path });
        }
        let key_path = dir.join("host.key");
        let key = match fs::read_to_string(&key_path) {
            Ok(text) => {
                let seed: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| StateError::BadSeed { path: key_path.clone() })?;
                SigningKey::from_bytes(&seed)
            }
            Err(_) => {
                let key = SigningKey::from_bytes(&random_bytes::<32>()?);
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&key_path)
                    .map_err(io("create", &key_path))?;
                f.write_all(hex::encode(key.to_bytes()).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(io("write", &key_path))?;
                key
            }
        };
        let pub_path = dir.join("host.pub");
        fs::write(&pub_path, hex::encode(key.verifying_key().to_bytes()) + "\n")
            .map_err(io("write", &pub_path))?;
        let profile = HostProfile {
            host_id: hex::encode(random_bytes::<8>()?),
            jurisdiction: jurisdiction.to_owned(),
            zone: zone.to_owned(),
            operator: operator.to_owned(),
            signing_key: "host.key".to_owned(),
            machine: machine_identity()?,
        };
        // The log's genesis entry, durable before the profile exists. So a profile implies a
        // log that starts with a genesis entry, and `isocell audit verify` can tell a log that
        // was wiped (empty) or wiped and started again (entry 0 not a genesis) on a host that
        // has a profile, even with no receipt to cross-check. A genesis is written only where a
        // profile is created for the first time: writing one whenever the log is found empty
        // (say, on the next run, or when --force replaces a profile) would bless exactly the
        // wipe it is meant to expose. A replaced profile is recorded as a `host_init` entry
        // instead (a changed jurisdiction or operator is itself evidence); on a wiped log that
        // entry comes first, and verification still fails.
        let audit =
            AuditLog::open(&dir.join("audit"), key.clone()).map_err(StateError::OpenAudit)?;
        let facts = json!({
            "host_id": profile.host_id,
            "jurisdiction": profile.jurisdiction,
            "zone": profile.zone,
            "operator": profile.operator,
            "public_key": verifying_key_hex(&key.verifying_key()),
        });
        let wrote_genesis = !profile_path.exists()
            && audit.genesis(facts.clone()).map_err(StateError::Genesis)?.is_some();
        if !wrote_genesis {
            audit.append("host_init", None, facts).map_err(StateError::AppendAudit)?;
        }
        // The machine identity is the boot's to say, never the file's.
        let text = toml::to_string(&HostProfile { machine: None, ..profile.clone() })?;
        let tmp = dir.join("host.toml.tmp");
        fs::write(&tmp, text)
            .and_then(|()| fs::rename(&tmp, &profile_path))
            .map_err(io("write", &profile_path))?;
        Ok(Host { profile, key, dir: dir.to_owned() })
    }

    /// The directory that keeps one cell's records.
    pub fn cell_record_dir(&self, cell_id: &str) -> Result<PathBuf, StateError> {
        let d = self.dir.join("cells").join(cell_id);
        mkdir(&d)?;
        Ok(d)
    }
}
