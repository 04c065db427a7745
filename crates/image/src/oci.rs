//! The OCI image format's documents, as much of them as a cell needs: index, manifest,
//! descriptor and image config (Docker's schema 2 equivalents are read the same way).
//! Parsed from bytes whose digest has already been checked.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// OCI image index.
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 2 manifest.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// OCI image config.
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Uncompressed OCI layer.
pub const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Every manifest kind we ask a registry for.
pub const ACCEPTED_MANIFESTS: [&str; 4] =
    [MEDIA_MANIFEST, MEDIA_INDEX, MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_LIST];

/// The largest manifest, index or config we read (they are small JSON documents).
pub const MAX_DOCUMENT_BYTES: u64 = 4 << 20;

/// A pointer to a blob.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the blob is.
    #[serde(default)]
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// For index entries: the platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (an OCI layout names tags with `org.opencontainers.image.ref.name`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A platform an index entry is for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    /// CPU architecture (`amd64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// Variant, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image index (or Docker manifest list).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Schema version (2).
    pub schema_version: u32,
    /// Media type, when given.
    #[serde(default)]
    pub media_type: Option<String>,
    /// The manifests.
    pub manifests: Vec<Descriptor>,
}

/// An image manifest (or Docker schema 2 manifest).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Schema version (2).
    pub schema_version: u32,
    /// Media type, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
}

/// The image config: the parts a cell uses.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ImageConfig {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// The run defaults.
    #[serde(default)]
    pub config: Option<RunConfig>,
}

/// What `docker run` takes from an image.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `Env` (`NAME=value`).
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// `WorkingDir`.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `User` (`name`, `uid`, `name:group`, `uid:gid`).
    #[serde(default)]
    pub user: Option<String>,
}

/// What a document turned out to be.
pub enum Document {
    /// An index: pick a manifest from it.
    Index(Index),
    /// A manifest.
    Manifest(Manifest),
}

/// Parses a manifest or index, by its media type or, when that is missing, by its shape.
pub fn parse_document(bytes: &[u8], media_type: Option<&str>) -> Result<Document, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        schema_version: Option<u32>,
    }
    let probe: Probe = serde_json::from_slice(bytes)
        .map_err(|e| format!("the manifest is not valid JSON: {e}"))?;
    if probe.schema_version != Some(2) {
        return Err(format!(
            "manifest schema version {:?} is not supported (only schema 2: OCI and Docker v2)",
            probe.schema_version
        ));
    }
    let kind = media_type.map(str::to_owned).or(probe.media_type);
    let is_index = match kind.as_deref() {
        Some(MEDIA_INDEX | MEDIA_DOCKER_LIST) => true,
        Some(MEDIA_MANIFEST | MEDIA_DOCKER_MANIFEST) => false,
        Some(other) if !other.is_empty() => {
            return Err(format!("media type {other} is not an image manifest or index"))
        }
        _ => probe.manifests.is_some(),
    };
    if is_index {
        serde_json::from_slice(bytes).map(Document::Index).map_err(|e| format!("bad index: {e}"))
    } else {
        serde_json::from_slice(bytes)
            .map(Document::Manifest)
            .map_err(|e| format!("bad manifest: {e}"))
    }
}

/// The linux/amd64 manifest of an index.
pub fn select_platform(index: &Index) -> Result<&Descriptor, String> {
    index
        .manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
        .ok_or_else(|| {
            let offered: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref().map(|p| format!("{}/{}", p.os, p.architecture)))
                .collect();
            format!(
                "the image has no linux/amd64 variant (it offers: {}); cells run linux/amd64",
                if offered.is_empty() { "no platforms".to_owned() } else { offered.join(", ") }
            )
        })
}

/// Checks what a manifest promises before anything is fetched: a cell image needs layers
/// and a linux/amd64 config.
pub fn check_config(config: &ImageConfig) -> Result<(), String> {
    if !config.os.is_empty() && config.os != "linux" {
        return Err(format!("the image is for {}, not linux", config.os));
    }
    if !config.architecture.is_empty() && config.architecture != "amd64" {
        return Err(format!(
            "the image is for {}, but cells run amd64; pull the linux/amd64 variant",
            config.architecture
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_index_from_manifest_and_picks_amd64() {
        let d = Digest::of(b"m");
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[
              {{"mediaType":"{MEDIA_MANIFEST}","digest":"{d}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},
              {{"mediaType":"{MEDIA_MANIFEST}","digest":"{d}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let Ok(Document::Index(i)) = parse_document(index.as_bytes(), None) else {
            panic!("not an index")
        };
        assert_eq!(select_platform(&i).map(|d| d.size), Ok(2));
        let only_arm = index.replace("\"amd64\"", "\"s390x\"");
        let Ok(Document::Index(i)) = parse_document(only_arm.as_bytes(), None) else {
            panic!("not an index")
        };
        let err = select_platform(&i).expect_err("must fail");
        assert!(err.contains("linux/arm64") && err.contains("linux/s390x"), "{err}");
        assert!(parse_document(br#"{"schemaVersion":1}"#, None).is_err());
    }
}
