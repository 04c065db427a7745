//! The cell spec: what a user asks to run and under which constraints, as a TOML file
//! (`isocell run --spec FILE`). Command-line flags map onto the same fields.
//!
//! ```toml
//! image = "registry.example:5000/team/app@sha256:..."
//! command = ["python3", "/job/run.py"]
//! cpus = 2
//! memory = "512M"
//! timeout_secs = 600
//! env = { MODE = "batch" }
//! egress = ["api.internal.example:443", "10.20.0.0/16:5432"]   # see `network`
//! publish = ["8080:80"]
//!
//! [constraints]
//! jurisdictions = ["EU"]            # the host's jurisdiction must be one of these
//! classification = "confidential"   # public | internal | confidential | restricted
//! allowed_image_digests = ["sha256:..."]  # the image (manifest digest) must be one of these
//! max_lifetime_secs = 3600
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::MemorySize;

/// How sensitive the data a cell handles is, lowest first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    /// Public data.
    #[default]
    Public,
    /// Internal to the organisation.
    Internal,
    /// Confidential (personal data, for example).
    Confidential,
    /// Restricted (health records, classified data).
    Restricted,
}

impl Classification {
    /// The name used in files, flags and policies.
    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Public => "public",
            Classification::Internal => "internal",
            Classification::Confidential => "confidential",
            Classification::Restricted => "restricted",
        }
    }

    /// Parses a name as written in files and flags.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Public, Self::Internal, Self::Confidential, Self::Restricted]
            .into_iter()
            .find(|c| c.as_str() == s)
    }
}

/// Rules a cell must be admitted under.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// Jurisdictions the cell may run in (empty: any).
    #[serde(default)]
    pub jurisdictions: Vec<String>,
    /// Classification of the data the cell handles.
    #[serde(default)]
    pub classification: Classification,
    /// Allowed image digests, `sha256:HEX` (empty: any): a container image's manifest digest,
    /// or a block image's own digest. Also spelled `allowed_image_digests`.
    #[serde(default, alias = "allowed_image_digests")]
    pub image_digests: Vec<String>,
    /// The longest the cell may live, in seconds.
    #[serde(default)]
    pub max_lifetime_secs: Option<u64>,
}

/// A cell spec file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellSpec {
    /// The image: a container image (`registry.example/app:1.4`, `app@sha256:…`,
    /// `oci:DIR[:TAG]`, `oci-archive:FILE`, `docker-archive:FILE`) or the path of a block
    /// image. Relative paths are relative to the spec file.
    #[serde(default)]
    pub image: Option<String>,
    /// Replaces the image's Entrypoint (`""` removes it), as `--entrypoint` does.
    #[serde(default)]
    pub entrypoint: Option<String>,
    /// User (and group) to run as: a name or uid, optionally `:group`.
    #[serde(default)]
    pub user: Option<String>,
    /// Cell kernel.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// The command and its arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// vCPUs.
    #[serde(default)]
    pub cpus: Option<u64>,
    /// Guest memory, such as "512M" (or a number of MiB).
    #[serde(default)]
    pub memory: Option<MemorySize>,
    /// Environment of the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory in the cell.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Limit on the command's run time, seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Where the cell may connect (`--egress`): see [`crate::network`]. Empty: nowhere.
    #[serde(default)]
    pub egress: Vec<String>,
    /// Host ports forwarded into the cell (`--publish`).
    #[serde(default)]
    pub publish: Vec<String>,
    /// Admission constraints.
    #[serde(default)]
    pub constraints: Constraints,
}

impl CellSpec {
    /// Parses a spec file's text; relative image and kernel paths are resolved against `base`
    /// (the file's directory).
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let mut spec: CellSpec = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(p) = spec.kernel.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
        if let Some(image) = spec.image.as_mut() {
            *image = resolve_image_path(image, base);
        }
        Ok(spec)
    }
}

/// Makes the path in an image name absolute against `base`: a bare relative path
/// (`./root.img`), or the path of `oci:`, `oci-archive:` and `docker-archive:`. Registry
/// references are left alone.
fn resolve_image_path(image: &str, base: &Path) -> String {
    for prefix in ["oci:", "oci-archive:", "docker-archive:"] {
        if let Some(rest) = image.strip_prefix(prefix) {
            if !rest.starts_with('/') {
                return format!("{prefix}{}", base.join(rest).display());
            }
            return image.to_owned();
        }
    }
    if image.starts_with("./") || image.starts_with("../") {
        return base.join(image).display().to_string();
    }
    image.to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_a_full_spec_and_refuses_unknown_keys() {
        let spec: CellSpec = toml::from_str(
            r#"
            command = ["echo", "hi"]
            memory = "512M"
            env = { A = "1" }
            [constraints]
            jurisdictions = ["EU"]
            classification = "restricted"
            max_lifetime_secs = 60
            "#,
        )
        .unwrap();
        assert_eq!(spec.command, ["echo", "hi"]);
        assert_eq!(spec.constraints.classification, Classification::Restricted);
        assert!(toml::from_str::<CellSpec>("comand = []").is_err());
        assert!(toml::from_str::<CellSpec>("[constraints]\nclassification = \"secret\"").is_err());
    }

    #[test]
    fn image_names_keep_registry_references_and_resolve_paths() {
        let base = Path::new("/specs");
        let image = |i: &str| {
            CellSpec::parse(
                &format!("image = {i:?}\n[constraints]\nallowed_image_digests = []"),
                base,
            )
            .unwrap()
            .image
            .unwrap()
        };
        assert_eq!(image("registry.example:5000/app:1"), "registry.example:5000/app:1");
        assert_eq!(image("./root.img"), "/specs/./root.img");
        assert_eq!(image("oci:app:v1"), "oci:/specs/app:v1");
        assert_eq!(image("oci-archive:/abs/a.tar"), "oci-archive:/abs/a.tar");
    }
}
