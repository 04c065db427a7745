//! Named snapshots on this host: a cell booted fresh, saved once its agent is ready and before
//! it ran anything, and started again any number of times.
//!
//! A snapshot lives in `STATE/snapshots/NAME/`, root's: the VMM's `memory` and `vm.json` (see
//! `isocell_vmm::snapshot`), readable only by root and the group jailed VMMs get when they
//! restore ([`isocell_jail::SNAPSHOT_READER_GID`]; directory 0750, files 0640; a snapshot holds
//! nothing a workload put there, since none ran), and [`MANIFEST`] (0600), which
//! says what the snapshot was booted from (the request, the launch measurement's components),
//! the digests of the two files and the CPU it was taken on. Starting a cell from it checks
//! the files against those digests (a changed byte is refused), the new cell's measured
//! kernel, initrd, image and VMM against the snapshot's (another one is refused) and, in the
//! VMM, the machine and the CPU. The digests go into the new cell's launch measurement and
//! its receipts say it was restored, from which snapshot.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isocell_evidence::measure::DigestCache;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cell::{open_evidence, Admitted, PolicyLoad, Verdict};
use crate::error::PlanError;
use crate::plan::SnapshotUse;
use crate::{vmm_process, Cancel, CellError, CellRequest, HostConfig, OutputSink};

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The VMM's files in a snapshot.
const MEMORY_FILE: &str = "memory";
const STATE_FILE: &str = "vm.json";
/// The manifest format (2: the agent's name).
const FORMAT: u32 = 2;
/// The components a restored cell must measure as its snapshot did.
const BOUND_COMPONENTS: [&str; 4] = ["kernel", "initrd", "root_image", "vmm"];

/// What a snapshot is, beside its files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// Its name.
    pub name: String,
    /// When it was taken (seconds since the Unix epoch).
    pub created_unix: u64,
    /// The request it was booted from (a cell started from it is planned from this again).
    pub request: CellRequest,
    /// The launch measurement's components at creation (kernel, initrd, image, VMM, ...).
    pub components: BTreeMap<String, String>,
    /// The launch digest of the cell that was saved.
    pub launch_digest: String,
    /// `sha256:HEX` of the memory file.
    pub memory_digest: String,
    /// `sha256:HEX` of the state file.
    pub state_digest: String,
    /// The host CPU's model name it was taken on (the VMM checks the CPUID itself).
    pub cpu_model: String,
    /// The saved agent's name, from its `Hello`: a restored copy goes on with the saved
    /// connection and says no hello of its own.
    pub agent: String,
}

/// What the saved cell was: its launch measurement and its agent.
struct Origin {
    components: BTreeMap<String, String>,
    launch_digest: String,
    agent: String,
}

/// Where this host keeps its snapshots.
pub fn store(host: &HostConfig) -> PathBuf {
    host.state_dir.join("snapshots")
}

fn invalid(message: String) -> CellError {
    CellError::Plan(PlanError::Invalid(message))
}

/// A snapshot name: 1 to 64 of lowercase letters, digits, `.`, `_` and `-`, starting with a
/// letter or digit.
pub fn check_name(name: &str) -> Result<(), CellError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "snapshot name {name:?}: use 1 to 64 lowercase letters, digits, '.', '_' or '-', \
             starting with a letter or digit"
        )))
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> CellError {
    CellError::Host(format!("cannot {what} {}: {e}", path.display()))
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Boots a fresh cell from `request`, waits for its agent, saves it as snapshot `name` and
/// ends it. The saved VM never resumes. Refuses a name already taken.
pub fn create(
    host: &HostConfig,
    name: &str,
    mut request: CellRequest,
    boot_timeout: Duration,
    cancel: &Cancel,
    sink: &mut dyn OutputSink,
) -> Result<Manifest, CellError> {
    check_name(name)?;
    if !request.network.is_none() {
        return Err(invalid(
            "a snapshot has no network: leave out --egress and --publish (every copy would \
             share the network setup of the saved cell)"
                .into(),
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(CellError::Host(
            "a snapshot is root's (its files are root's, readable by jailed VMMs only): run \
             isocell snapshot create as root"
                .into(),
        ));
    }
    let store = store(host);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&store)
        .map_err(|e| io("create", &store, e))?;
    let target = store.join(name);
    if target.exists() {
        return Err(invalid(format!(
            "a snapshot named {name} exists already: remove it first (isocell snapshot rm {name})"
        )));
    }
    sweep_staging(&store);
    let id = vmm_process::new_id();
    let staging = store.join(format!(".new-{id}"));
    fs::DirBuilder::new().mode(0o700).create(&staging).map_err(|e| io("create", &staging, e))?;
    let result = (|| {
        request.snapshot = SnapshotUse::Create(staging.clone());
        let policies = PolicyLoad::start(&host.state_dir, &[]);
        let mut ev = open_evidence(host, &id)?;
        let plan = crate::cell::plan(host, &id, request.clone(), &mut ev)?;
        if let Some(j) = &plan.jail {
            // The jailed VMM writes the snapshot as the cell's user.
            std::os::unix::fs::chown(&staging, Some(j.spec.uid), Some(j.spec.gid))
                .map_err(|e| io("hand over", &staging, e))?;
        }
        let admitted = Admitted::new(plan, ev, policies, None)?;
        let launch_digest = admitted.launch_digest().to_owned();
        let components = admitted.components().clone();
        let mut cell = admitted.start(host, &[format!("<snapshot {name}>")])?;
        let saved = (|| {
            let agent = cell.wait_ready(boot_timeout, cancel)?;
            cell.prepare_snapshot(boot_timeout)?;
            // The VMM asked for SIGUSR1 (--snapshot-save) and is still running.
            cell.signal_vmm(libc::SIGUSR1)
                .map_err(|e| CellError::Host(format!("cannot signal the VMM: {e}")))?;
            // Writing all of guest memory takes a while on a slow disk.
            let status = cell.wait_vmm_exit(Duration::from_secs(120));
            let reason =
                cell.vmm_report().and_then(|r| r["exit_reason"].as_str().map(str::to_owned));
            match (status, reason.as_deref()) {
                (Some(s), Some("saved")) if s.success() => Ok(agent),
                (s, r) => Err(CellError::Host(format!(
                    "the VMM did not save the cell (status {s:?}, reason {r:?})"
                ))),
            }
        })();
        let verdict = Verdict {
            exit_code: None,
            outcome: if saved.is_ok() { "snapshot_saved" } else { "failed" },
        };
        let ended = cell.delete(&verdict, sink);
        let agent = saved?;
        ended?;
        let cache = digest_cache(host);
        let origin = Origin { components, launch_digest, agent };
        finish(&staging, &target, name, request, origin, &cache)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// Removes what a `create` that was killed left: staging directories older than an hour (a
/// `create` takes seconds; a running one is far younger).
fn sweep_staging(store: &Path) {
    let Ok(entries) = fs::read_dir(store) else { return };
    for e in entries.flatten() {
        let stale = e.file_name().to_string_lossy().starts_with(".new-")
            && e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(3600)));
        if stale {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Takes the saved files root's alone, digests them and moves the snapshot into place.
fn finish(
    staging: &Path,
    target: &Path,
    name: &str,
    mut request: CellRequest,
    origin: Origin,
    cache: &DigestCache,
) -> Result<Manifest, CellError> {
    let readers = Some(isocell_jail::SNAPSHOT_READER_GID);
    // The directory was the jailed VMM's: take it back first, so nothing more appears in it,
    // then touch only what the VMM was to write, through descriptors that refuse links.
    std::os::unix::fs::chown(staging, Some(0), readers).map_err(|e| io("take", staging, e))?;
    fs::set_permissions(staging, fs::Permissions::from_mode(0o750))
        .map_err(|e| io("restrict", staging, e))?;
    let entries = fs::read_dir(staging).map_err(|e| io("list", staging, e))?;
    for entry in entries {
        let name = entry.map_err(|e| io("list", staging, e))?.file_name();
        if name != MEMORY_FILE && name != STATE_FILE {
            return Err(CellError::Host(format!(
                "the VMM left {name:?} in {}, which a snapshot never holds; not kept",
                staging.display()
            )));
        }
    }
    let mut digests = Vec::new();
    for file in [MEMORY_FILE, STATE_FILE] {
        let path = staging.join(file);
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io("open", &path, e))?;
        let meta = f.metadata().map_err(|e| io("inspect", &path, e))?;
        if !meta.is_file() || meta.nlink() != 1 {
            return Err(CellError::Host(format!(
                "{} is not a plain file of its own; not kept",
                path.display()
            )));
        }
        std::os::unix::fs::fchown(&f, Some(0), readers).map_err(|e| io("take", &path, e))?;
        f.set_permissions(fs::Permissions::from_mode(0o640))
            .map_err(|e| io("restrict", &path, e))?;
        // On disk before its digest is recorded: starts trust the digest cache while the
        // file's identity is unchanged, so what they map must be what was hashed.
        f.sync_all().map_err(|e| io("sync", &path, e))?;
        // Digest the very file just checked, through its descriptor. The digest goes into the
        // cache under the file's identity (device, inode, size, mtime, ctime), so starts find
        // it there until the file changes in any way (see `restore_request`).
        let own = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        digests.push(cache.file_digest(&own).map_err(|e| io("digest", &path, e))?);
    }
    request.snapshot = SnapshotUse::None;
    let manifest = Manifest {
        format: FORMAT,
        name: name.to_owned(),
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        request,
        components: origin.components,
        launch_digest: origin.launch_digest,
        memory_digest: digests[0].clone(),
        state_digest: digests[1].clone(),
        cpu_model: cpu_model(),
        agent: origin.agent,
    };
    let path = staging.join(MANIFEST);
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| CellError::Host(e.to_string()))?;
    fs::write(&path, text).map_err(|e| io("write", &path, e))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .map_err(|e| io("restrict", &path, e))?;
    fs::rename(staging, target).map_err(|e| io("move the snapshot to", target, e))?;
    Ok(manifest)
}

/// Reads snapshot `name`'s manifest.
pub fn manifest(host: &HostConfig, name: &str) -> Result<Manifest, CellError> {
    check_name(name)?;
    let dir = store(host).join(name);
    let path = dir.join(MANIFEST);
    let text = fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            invalid(format!("no snapshot named {name} on this host (isocell snapshot list)"))
        } else {
            io("read", &path, e)
        }
    })?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| invalid(format!("snapshot {name}: its manifest is damaged: {e}")))?;
    if m.format != FORMAT || m.name != name {
        return Err(invalid(format!(
            "snapshot {name}: its manifest is not one this isocell reads"
        )));
    }
    Ok(m)
}

/// The digest cache the launch measurement uses too (`STATE/digests`, root's).
fn digest_cache(host: &HostConfig) -> DigestCache {
    DigestCache::new(host.state_dir.join("digests"))
}

/// The request for a cell started from snapshot `name`: the snapshot's own request, with
/// its files checked against the manifest's digests. A file that changed is refused.
///
/// The check reads a file whole only when its identity (device, inode, size, mtime and
/// ctime, which no write, `chmod` or `utimes` leaves as it was) is not in the digest cache:
/// hashing 128 MiB on every start would cost more than the restore itself.
pub fn restore_request(host: &HostConfig, name: &str) -> Result<CellRequest, CellError> {
    let m = manifest(host, name)?;
    let dir = store(host).join(name);
    let cache = digest_cache(host);
    for (file, want) in [(MEMORY_FILE, &m.memory_digest), (STATE_FILE, &m.state_digest)] {
        let path = dir.join(file);
        let got = cache.file_digest(&path).map_err(|e| io("read", &path, e))?;
        if &got != want {
            return Err(invalid(format!(
                "snapshot {name}: {file} has changed since it was taken (digest {got}, the \
                 manifest says {want}); it is refused: take the snapshot again"
            )));
        }
    }
    let mut request = m.request.clone();
    request.snapshot = SnapshotUse::Restore {
        name: name.to_owned(),
        dir,
        memory_digest: m.memory_digest,
        state_digest: m.state_digest,
        components: m.components,
        agent: m.agent,
    };
    Ok(request)
}

/// Refuses a cell whose measured kernel, initrd, image or VMM is not the one snapshot `name`
/// was taken with.
pub fn check_components(
    name: &str,
    snapshot: &BTreeMap<String, String>,
    measured: &BTreeMap<String, String>,
) -> Result<(), CellError> {
    for key in BOUND_COMPONENTS {
        let (was, is) = (snapshot.get(key), measured.get(key));
        if was != is {
            return Err(invalid(format!(
                "snapshot {name} was taken with another {key} ({}), this cell's is {}: take \
                 the snapshot again with this {key}",
                was.map_or("none", String::as_str),
                is.map_or("none", String::as_str)
            )));
        }
    }
    Ok(())
}

/// Every snapshot on this host, by name.
pub fn list(host: &HostConfig) -> Vec<Manifest> {
    let Ok(entries) = fs::read_dir(store(host)) else { return Vec::new() };
    let mut all: Vec<Manifest> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .filter_map(|n| manifest(host, &n).ok())
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// Removes snapshot `name`.
pub fn remove(host: &HostConfig, name: &str) -> Result<(), CellError> {
    manifest(host, name)?;
    let dir = store(host).join(name);
    fs::remove_dir_all(&dir).map_err(|e| io("remove", &dir, e))
}

/// What `isocell snapshot list` prints for one snapshot.
pub fn describe(m: &Manifest) -> serde_json::Value {
    json!({
        "name": m.name,
        "created_unix": m.created_unix,
        "cpus": m.request.cpus,
        "memory_mib": m.request.memory.mib(),
        "memory_digest": m.memory_digest,
        "state_digest": m.state_digest,
        "kernel": m.components.get("kernel"),
        "root_image": m.components.get("root_image"),
        "cpu_model": m.cpu_model,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["base", "py3.12", "a-b_c", "0"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "Base", "-x", ".x", "a/b", "..", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn another_kernel_or_vmm_is_refused() {
        let snap: BTreeMap<String, String> =
            BOUND_COMPONENTS.iter().map(|k| (k.to_string(), format!("sha256:{k}"))).collect();
        let mut measured = snap.clone();
        measured.insert("vm_config".into(), "sha256:other".into());
        check_components("base", &snap, &measured).unwrap();
        measured.insert("kernel".into(), "sha256:new".into());
        let e = check_components("base", &snap, &measured).unwrap_err().to_string();
        assert!(e.contains("another kernel (sha256:kernel), this cell's is sha256:new"), "{e}");
    }
}
