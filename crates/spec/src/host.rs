//! The host profile: who and where this host is, for admission policy and receipts. Kept as
//! TOML in the state directory (`host.toml`) next to the host's Ed25519 signing key.

use serde::{Deserialize, Serialize};

/// This host's identity and location.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostProfile {
    /// Stable host id.
    pub host_id: String,
    /// Legal jurisdiction the host is in (for example "EU", "DE", "US").
    pub jurisdiction: String,
    /// Availability zone or site.
    pub zone: String,
    /// Who operates the host.
    pub operator: String,
    /// File holding the 32-byte Ed25519 signing key seed (relative: to the state directory).
    pub signing_key: String,
    /// Set when this host is an `isocell machine`: a VM on another host. Not stored in
    /// `host.toml`; the machine's boot passes it in (`ISOCELL_MACHINE`), so receipts and
    /// admission see which outer host the cells really run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineIdentity>,
}

/// What an `isocell machine` says about itself: that it is nested, and on which host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineIdentity {
    /// The machine's own id, fixed when it was created (`isocell machine init`).
    pub machine_id: String,
    /// The outer host's name (its hostname when the machine started).
    pub outer_host: String,
    /// The outer host's kernel release.
    pub outer_kernel: String,
    /// How the outer host runs the machine: `kvm` (hardware) or `tcg` (emulated, with emulated
    /// AMD SVM giving the machine its own KVM).
    pub accelerator: String,
}
