//! The daemon's configuration file (`/etc/isocell/isocelld.toml` by default; every key is
//! optional) and what it resolves to.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tls::TlsConfig;

/// The configuration file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// The API's Unix socket.
    pub socket: PathBuf,
    /// The group that may use the socket besides root (mode 0660); if the group does not
    /// exist, only root may.
    pub socket_group: String,
    /// The state directory (audit log, receipts, images, the daemon's database).
    pub state_dir: Option<PathBuf>,
    /// The run directory (one subdirectory per running cell).
    pub run_dir: Option<PathBuf>,
    /// Run cells' VMMs jailed (namespaces, cgroup, unprivileged uid); needs root.
    pub jail: bool,
    /// Share of the host's memory (after `reserved_memory_mib`) that cells together may take.
    pub memory_overcommit: f64,
    /// vCPUs cells together may have, per host CPU.
    pub cpu_overcommit: f64,
    /// Memory kept for the host and the daemon, MiB.
    pub reserved_memory_mib: u64,
    /// A cell with no API activity and no running command for this long is deleted
    /// (0: never), unless its create says otherwise.
    pub idle_timeout_secs: u64,
    /// Limit on a cell's boot, to its agent's hello.
    pub boot_timeout_secs: u64,
    /// Largest JSON request body.
    pub max_body_bytes: usize,
    /// Registries spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// The optional TCP listener, TLS with client certificates (none by default).
    pub tls: Option<TlsConfig>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: PathBuf::from("/run/isocell/isocelld.sock"),
            socket_group: "isocell".into(),
            state_dir: None,
            run_dir: None,
            jail: true,
            memory_overcommit: 1.0,
            cpu_overcommit: 4.0,
            reserved_memory_mib: 512,
            idle_timeout_secs: 3600,
            boot_timeout_secs: 120,
            max_body_bytes: 1 << 20,
            insecure_registries: Vec::new(),
            tls: None,
        }
    }
}

impl DaemonConfig {
    /// Reads the file at `path`; a missing default file means all defaults.
    pub fn load(path: &Path, explicit: bool) -> Result<DaemonConfig, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(DaemonConfig::default())
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let c: DaemonConfig =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if !(c.memory_overcommit > 0.0 && c.memory_overcommit <= 4.0) {
            return Err(format!(
                "{}: memory_overcommit {} must be above 0 and at most 4",
                path.display(),
                c.memory_overcommit
            ));
        }
        if !(c.cpu_overcommit > 0.0 && c.cpu_overcommit <= 64.0) {
            return Err(format!(
                "{}: cpu_overcommit {} must be above 0 and at most 64",
                path.display(),
                c.cpu_overcommit
            ));
        }
        Ok(c)
    }

    /// Memory all cells together may have, MiB, on a host with `host_mib`.
    pub fn memory_limit_mib(&self, host_mib: u64) -> u64 {
        (host_mib.saturating_sub(self.reserved_memory_mib) as f64 * self.memory_overcommit) as u64
    }

    /// vCPUs all cells together may have, on a host with `cpus`.
    pub fn cpu_limit(&self, cpus: u64) -> u64 {
        ((cpus as f64) * self.cpu_overcommit).max(1.0) as u64
    }
}
