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
}
