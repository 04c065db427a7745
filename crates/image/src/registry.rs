//! Pulling from a registry over the OCI distribution API, with `oci-client` (which does the
//! token dance). Credentials come from `$REGISTRY_AUTH_FILE`, podman's
//! `$XDG_RUNTIME_DIR/containers/auth.json` or Docker's `~/.docker/config.json`; plain HTTP only
//! for registries the user marked insecure. Every manifest and blob is hashed and counted as it
//! arrives and kept only when it matches its digest and size.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::digest::{Digest, Hasher};
use crate::oci::{self, Descriptor, Document};
use crate::store::{Store, StoreError};

/// How to reach registries.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// An auth file to use instead of the usual places.
    pub auth_file: Option<PathBuf>,
    /// Show per-layer progress bars (on a terminal).
    pub progress: bool,
}

/// The auth files looked at, in order.
fn auth_files(opts: &RegistryOptions) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = &opts.auth_file {
        files.push(f.clone());
        return files;
    }
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(f));
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(d).join("containers/auth.json"));
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        files.push(PathBuf::from(d).join("config.json"));
    } else if let Some(h) = std::env::var_os("HOME") {
        files.push(PathBuf::from(h).join(".docker/config.json"));
    }
    files
}

/// The credentials stored for `registry`, if any (`auth` as base64 `user:password`, or
/// `username` and `password`).
pub fn credentials(registry: &str, opts: &RegistryOptions) -> Result<RegistryAuth, String> {
    let mut keys =
        vec![registry.to_owned(), format!("https://{registry}"), format!("http://{registry}")];
    if registry == "docker.io"
        || registry == "index.docker.io"
        || registry == "registry-1.docker.io"
    {
        keys.extend([
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
        ]);
    }
    for file in auth_files(opts) {
        let Ok(bytes) = std::fs::read(&file) else { continue };
        let doc: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not valid JSON: {e}", file.display()))?;
        let Some(auths) = doc.get("auths").and_then(|a| a.as_object()) else { continue };
        for key in &keys {
            let Some(entry) =
                auths.get(key.as_str()).or_else(|| auths.get(key.trim_end_matches('/')))
            else {
                continue;
            };
            if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
                let decoded =
                    base64::engine::general_purpose::STANDARD.decode(auth.trim()).map_err(|e| {
                        format!("{}: the auth for {registry} is not base64: {e}", file.display())
                    })?;
                let text = String::from_utf8(decoded).map_err(|_| {
                    format!("{}: the auth for {registry} is not UTF-8", file.display())
                })?;
                let (user, pass) = text.split_once(':').ok_or_else(|| {
                    format!("{}: the auth for {registry} is not user:password", file.display())
                })?;
                return Ok(RegistryAuth::Basic(user.to_owned(), pass.to_owned()));
            }
            if let (Some(u), Some(p)) = (
                entry.get("username").and_then(|v| v.as_str()),
                entry.get("password").and_then(|v| v.as_str()),
            ) {
                return Ok(RegistryAuth::Basic(u.to_owned(), p.to_owned()));
            }
        }
    }
    Ok(RegistryAuth::Anonymous)
}

fn explain(registry: &str, e: impl std::fmt::Display, opts: &RegistryOptions) -> StoreError {
    let text = e.to_string();
    let lower = text.to_lowercase();
    let hint = if lower.contains("401")
        || lower.contains("authoriz")
        || lower.contains("authenticat")
    {
        " — the registry refused these credentials or wants some: put them in $REGISTRY_AUTH_FILE \
         or ~/.docker/config.json (docker login / podman login)"
    } else if text.contains("404") || text.contains("not found") || text.contains("NotFound") {
        " — check the repository name and tag"
    } else if !opts.insecure.iter().any(|i| i == registry)
        && (text.contains("error sending request")
            || text.contains("onnect")
            || text.contains("tls")
            || text.contains("TLS"))
    {
        " — if this registry speaks plain HTTP, mark it with --insecure-registry"
    } else {
        ""
    };
    StoreError::Image(format!("registry {registry}: {text}{hint}"))
}

/// Pulls `reference` into the store and returns its (linux/amd64) manifest digest. Blobs the
/// store already has are not fetched again.
pub fn pull(
    store: &Store,
    reference: &Reference,
    opts: &RegistryOptions,
) -> Result<Digest, StoreError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Io(format!("cannot start the pull: {e}")))?;
    runtime.block_on(pull_async(store, reference, opts))
}

async fn pull_async(
    store: &Store,
    reference: &Reference,
    opts: &RegistryOptions,
) -> Result<Digest, StoreError> {
    let registry = reference.resolve_registry().to_owned();
    let config = ClientConfig {
        protocol: ClientProtocol::HttpsExcept(opts.insecure.clone()),
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    };
    let client = Client::new(config);
    let auth = credentials(&registry, opts).map_err(StoreError::Image)?;

    // The manifest (or index) the reference names; its digest is computed here, never taken
    // from the registry's word.
    let (bytes, _) = client
        .pull_manifest_raw(reference, &auth, &oci::ACCEPTED_MANIFESTS)
        .await
        .map_err(|e| explain(&registry, e, opts))?;
    let first = Digest::of(&bytes);
    if let Some(pinned) = reference.digest() {
        if pinned != first.as_str() {
            return Err(StoreError::Verify(format!(
                "registry {registry} sent a manifest with digest {first} for {}, which pins {pinned}",
                reference.whole()
            )));
        }
    }
    store.put_blob(&first, bytes.len() as u64, &bytes[..], "the manifest")?;
    let manifest_digest = match oci::parse_document(&bytes, None).map_err(StoreError::Image)? {
        Document::Manifest(_) => first,
        Document::Index(index) => {
            let chosen = oci::select_platform(&index).map_err(StoreError::Image)?.clone();
            let by_digest = reference.clone_with_digest(chosen.digest.to_string());
            let (bytes, _) = client
                .pull_manifest_raw(&by_digest, &auth, &oci::ACCEPTED_MANIFESTS)
                .await
                .map_err(|e| explain(&registry, e, opts))?;
            store.put_blob(&chosen.digest, chosen.size, &bytes[..], "the linux/amd64 manifest")?;
            chosen.digest
        }
    };
    let bytes = store.read_document(&manifest_digest)?;
    let Document::Manifest(manifest) =
        oci::parse_document(&bytes, None).map_err(StoreError::Image)?
    else {
        return Err(StoreError::Image("an index inside an index is not supported".into()));
    };
    let bars = opts.progress.then(indicatif::MultiProgress::new);
    let mut blobs = vec![(manifest.config.clone(), "config".to_owned())];
    let total = manifest.layers.len();
    for (i, l) in manifest.layers.iter().enumerate() {
        blobs.push((l.clone(), format!("layer {}/{total}", i + 1)));
    }
    for (desc, what) in blobs {
        if store.has_blob(&desc.digest) {
            continue;
        }
        fetch_blob(store, &client, reference, &desc, &what, bars.as_ref()).await.map_err(|e| {
            match e {
                StoreError::Image(m) => explain(&registry, m, opts),
                other => other,
            }
        })?;
    }
    Ok(manifest_digest)
}

async fn fetch_blob(
    store: &Store,
    client: &Client,
    reference: &Reference,
    desc: &Descriptor,
    what: &str,
    bars: Option<&indicatif::MultiProgress>,
) -> Result<(), StoreError> {
    let bar = bars.map(|m| {
        let b = m.add(indicatif::ProgressBar::new(desc.size));
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{prefix:>12} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec}",
        ) {
            b.set_style(style);
        }
        b.set_prefix(what.to_owned());
        b
    });
    let mut stream = client
        .pull_blob_stream(reference, desc.digest.as_str())
        .await
        .map_err(|e| StoreError::Image(format!("{what} ({}): {e}", desc.digest)))?;
    let work = store.work_dir()?;
    let tmp = work.path().join("blob");
    let mut out =
        File::create(&tmp).map_err(|e| StoreError::Io(format!("{}: {e}", tmp.display())))?;
    let mut h = Hasher::default();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| StoreError::Image(format!("{what} ({}): {e}", desc.digest)))?;
        h.update(&chunk);
        if h.len() > desc.size {
            return Err(StoreError::Verify(format!(
                "{what} ({}) is longer than the {} bytes its descriptor says",
                desc.digest, desc.size
            )));
        }
        out.write_all(&chunk).map_err(|e| StoreError::Io(format!("{}: {e}", tmp.display())))?;
        if let Some(b) = &bar {
            b.set_position(h.len());
        }
    }
    if h.len() != desc.size {
        return Err(StoreError::Verify(format!(
            "{what} ({}) is truncated: {} of {} bytes",
            desc.digest,
            h.len(),
            desc.size
        )));
    }
    let got = h.finish();
    if got != desc.digest {
        return Err(StoreError::Verify(format!(
            "{what} does not match its digest: expected {}, got {got}",
            desc.digest
        )));
    }
    out.sync_all().map_err(|e| StoreError::Io(e.to_string()))?;
    store.adopt_blob(&desc.digest, &tmp)?;
    if let Some(b) = bar {
        b.finish();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_and_podman_auth_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("auth.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &file,
            format!(r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{b64}"}},"https://index.docker.io/v1/":{{"username":"bob","password":"pw"}}}}}}"#),
        )
        .expect("write");
        let opts = RegistryOptions { auth_file: Some(file), ..Default::default() };
        let basic = |u: &str, p: &str| RegistryAuth::Basic(u.into(), p.into());
        assert!(
            matches!(credentials("127.0.0.1:5000", &opts), Ok(a) if a == basic("alice", "s3cret"))
        );
        assert!(matches!(credentials("docker.io", &opts), Ok(a) if a == basic("bob", "pw")));
        assert!(matches!(credentials("elsewhere:1", &opts), Ok(RegistryAuth::Anonymous)));
    }
}
