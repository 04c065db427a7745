//! What the lifecycle needs from the host, given to it rather than looked up: where state and
//! run directories are, which VMM, jailer and agent initramfs to use. [`HostConfig::discover`]
//! is the one place that reads the environment; a daemon may build the value from its own
//! configuration file instead.

use std::path::PathBuf;

use crate::locate;

/// The host side of every cell this process starts.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HostConfig {
    /// The state directory: host profile and key, policies, audit log, cell records.
    pub state_dir: PathBuf,
    /// The directory holding one subdirectory per running cell.
    pub run_dir: PathBuf,
    /// `isocell-vmm`.
    pub vmm: PathBuf,
    /// `isocell-jailer`; `None` runs VMMs unjailed (recorded in every receipt).
    pub jailer: Option<PathBuf>,
    /// The agent's initramfs, which every cell boots with.
    pub agent_initrd: PathBuf,
    /// Test aid: a VMM thread kind whose thread makes a forbidden system call right after its
    /// seccomp filter is installed (`--seccomp-probe`).
    pub seccomp_probe: Option<String>,
}

/// A host file or program the lifecycle needs could not be found.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DiscoverError(#[from] pub locate::LocateError);

impl HostConfig {
    /// Finds everything the usual way: `ISOCELL_STATE_DIR`, `ISOCELL_RUN_DIR`, `ISOCELL_VMM`,
    /// `ISOCELL_JAILER`, `ISOCELL_AGENT_INITRD`, else the defaults next to this program or in
    /// this project's `build/guest`. `jailed: false` leaves the jailer out.
    pub fn discover(jailed: bool) -> Result<HostConfig, DiscoverError> {
        Ok(HostConfig {
            state_dir: locate::state_dir(),
            run_dir: locate::run_dir(),
            vmm: locate::vmm()?,
            jailer: if jailed { Some(locate::jailer()?) } else { None },
            agent_initrd: locate::agent_initrd(None)?,
            seccomp_probe: std::env::var("ISOCELL_TEST_SECCOMP_PROBE").ok(),
        })
    }
}
