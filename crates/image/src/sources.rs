//! Images on disk: an OCI layout directory, an OCI archive (a layout in a tar) and a
//! `docker save` archive. Each is imported into the [`Store`]: every blob is copied in with its
//! digest and size checked, and the result is the manifest digest the store can convert.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use serde::Deserialize;

use crate::digest::{Digest, Hasher};
use crate::oci::{self, Descriptor, Document, Index, Manifest};
use crate::store::{Store, StoreError};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn image_err(s: impl Into<String>) -> StoreError {
    StoreError::Image(s.into())
}

/// Picks the entry of a layout's `index.json` that `selector` names: a tag
/// (`org.opencontainers.image.ref.name`), `@sha256:…`, or nothing (the only entry, else
/// `latest`).
fn select<'a>(
    index: &'a Index,
    selector: Option<&str>,
    source: &str,
) -> Result<&'a Descriptor, StoreError> {
    let tags: Vec<&str> = index
        .manifests
        .iter()
        .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
        .collect();
    let found = match selector {
        Some(s) if s.starts_with('@') => {
            let want = Digest::parse(&s[1..]).map_err(|e| image_err(e.to_string()))?;
            index.manifests.iter().find(|d| d.digest == want)
        }
        Some(tag) => {
            index.manifests.iter().find(|d| d.annotations.get(REF_NAME).is_some_and(|t| t == tag))
        }
        None if index.manifests.len() == 1 => index.manifests.first(),
        None => index
            .manifests
            .iter()
            .find(|d| d.annotations.get(REF_NAME).is_some_and(|t| t == "latest")),
    };
    found.ok_or_else(|| {
        image_err(format!(
            "{source} has no image {}; it has {}",
            selector.unwrap_or("(no tag given, and more than one image without a 'latest')"),
            if tags.is_empty() {
                "no tagged images".to_owned()
            } else {
                format!("tags {}", tags.join(", "))
            }
        ))
    })
}

/// Resolves a descriptor whose blob the store has into an image manifest (choosing linux/amd64
/// from an index) and checks that its config and layers are there too.
fn resolve_in_store(
    store: &Store,
    desc: &Descriptor,
    fetch: &mut dyn FnMut(&Descriptor) -> Result<(), StoreError>,
) -> Result<Digest, StoreError> {
    fetch(desc)?;
    let bytes = store.read_document(&desc.digest)?;
    let manifest_digest =
        match oci::parse_document(&bytes, Some(desc.media_type.as_str()).filter(|m| !m.is_empty()))
            .map_err(StoreError::Image)?
        {
            Document::Index(i) => {
                let chosen = oci::select_platform(&i).map_err(StoreError::Image)?.clone();
                fetch(&chosen)?;
                chosen.digest
            }
            Document::Manifest(_) => desc.digest.clone(),
        };
    let bytes = store.read_document(&manifest_digest)?;
    let Document::Manifest(m) = oci::parse_document(&bytes, None).map_err(StoreError::Image)?
    else {
        return Err(image_err(format!(
            "{manifest_digest} is an index inside an index; not supported"
        )));
    };
    fetch(&m.config)?;
    for l in &m.layers {
        fetch(l)?;
    }
    Ok(manifest_digest)
}

fn read_small(mut r: impl Read, what: &str) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::new();
    (&mut r)
        .take(oci::MAX_DOCUMENT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| image_err(format!("{what}: {e}")))?;
    if bytes.len() as u64 > oci::MAX_DOCUMENT_BYTES {
        return Err(image_err(format!("{what} is larger than 4 MiB")));
    }
    Ok(bytes)
}

fn parse_index(bytes: &[u8], source: &str) -> Result<Index, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| image_err(format!("{source}: index.json is not an OCI index: {e}")))
}

/// Imports from an OCI image layout directory.
pub fn import_layout(
    store: &Store,
    dir: &Path,
    selector: Option<&str>,
) -> Result<Digest, StoreError> {
    let source = format!("the OCI layout {}", dir.display());
    let layout = std::fs::read(dir.join("oci-layout")).map_err(|e| {
        image_err(format!("{source}: no oci-layout file ({e}); is it an OCI image layout?"))
    })?;
    if !String::from_utf8_lossy(&layout).contains("\"imageLayoutVersion\"") {
        return Err(image_err(format!("{source}: oci-layout has no imageLayoutVersion")));
    }
    let index_file = File::open(dir.join("index.json"))
        .map_err(|e| image_err(format!("{source}: index.json: {e}")))?;
    let index = parse_index(&read_small(index_file, "index.json")?, &source)?;
    let desc = select(&index, selector, &source)?.clone();
    let mut fetch = |d: &Descriptor| -> Result<(), StoreError> {
        if store.has_blob(&d.digest) {
            return Ok(());
        }
        let path = dir.join("blobs/sha256").join(d.digest.hex());
        let f = File::open(&path)
            .map_err(|e| image_err(format!("{source}: blob {} is missing: {e}", d.digest)))?;
        store.put_blob(
            &d.digest,
            d.size,
            BufReader::new(f),
            &format!("{source}: blob {}", d.digest),
        )?;
        Ok(())
    };
    resolve_in_store(store, &desc, &mut fetch)
}

/// The entry name without a leading `./`.
fn entry_name(e: &tar::Entry<'_, impl Read>) -> String {
    let raw = String::from_utf8_lossy(&e.path_bytes()).into_owned();
    raw.trim_start_matches("./").to_owned()
}

/// Imports from a tar archive of an OCI layout (`podman save --format oci-archive`,
/// `skopeo copy … oci-archive:`). Every blob in it is checked against its name.
pub fn import_oci_archive(
    store: &Store,
    file: &Path,
    selector: Option<&str>,
) -> Result<Digest, StoreError> {
    let source = format!("the OCI archive {}", file.display());
    let f = File::open(file).map_err(|e| image_err(format!("{source}: {e}")))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, f));
    let mut index = None;
    let mut sizes = HashMap::new();
    for entry in
        archive.entries().map_err(|e| image_err(format!("{source}: not a tar file: {e}")))?
    {
        let mut entry = entry.map_err(|e| image_err(format!("{source}: {e}")))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = entry_name(&entry);
        if name == "index.json" {
            index = Some(read_small(&mut entry, "index.json")?);
        } else if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            let d = Digest::parse(&format!("sha256:{hex}"))
                .map_err(|e| image_err(format!("{source}: {e}")))?;
            let size = entry.size();
            store.put_blob(&d, size, &mut entry, &format!("{source}: blob {d}"))?;
            sizes.insert(d, size);
        }
    }
    let index = index
        .ok_or_else(|| image_err(format!("{source} has no index.json; is it an OCI archive?")))?;
    let index = parse_index(&index, &source)?;
    let desc = select(&index, selector, &source)?.clone();
    let mut fetch = |d: &Descriptor| -> Result<(), StoreError> {
        match sizes.get(&d.digest) {
            Some(&s) if s == d.size => Ok(()),
            Some(&s) => Err(StoreError::Verify(format!(
                "{source}: blob {} has {s} bytes, its descriptor says {}",
                d.digest, d.size
            ))),
            None if store.has_blob(&d.digest) => Ok(()),
            None => Err(image_err(format!("{source}: blob {} is missing", d.digest))),
        }
    };
    resolve_in_store(store, &desc, &mut fetch)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Imports from a `docker save` archive: its files are hashed as they are copied, and an OCI
/// manifest is written for the image (so the manifest digest is ours, stable for the archive's
/// contents).
pub fn import_docker_archive(
    store: &Store,
    file: &Path,
    selector: Option<&str>,
) -> Result<Digest, StoreError> {
    let source = format!("the docker archive {}", file.display());
    let f = File::open(file).map_err(|e| image_err(format!("{source}: {e}")))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, f));
    let mut manifest_json = None;
    let mut files: HashMap<String, (Digest, u64, bool)> = HashMap::new();
    // `docker save` (and skopeo) name layers `<id>/layer.tar` as symlinks to `<diffid>.tar`.
    let mut links: HashMap<String, String> = HashMap::new();
    let work = store.work_dir()?;
    for (n, entry) in archive
        .entries()
        .map_err(|e| image_err(format!("{source}: not a tar file: {e}")))?
        .enumerate()
    {
        let mut entry = entry.map_err(|e| image_err(format!("{source}: {e}")))?;
        if entry.header().entry_type() == tar::EntryType::Symlink {
            let name = entry_name(&entry);
            if let Some(target) = entry.link_name_bytes() {
                let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                let mut parts: Vec<String> =
                    dir.split('/').filter(|p| !p.is_empty()).map(str::to_owned).collect();
                for p in String::from_utf8_lossy(&target).split('/') {
                    match p {
                        "" | "." => {}
                        ".." => {
                            parts.pop();
                        }
                        p => parts.push(p.to_owned()),
                    }
                }
                links.insert(name, parts.join("/"));
            }
            continue;
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = entry_name(&entry);
        if name == "manifest.json" {
            manifest_json = Some(read_small(&mut entry, "manifest.json")?);
            continue;
        }
        if name == "repositories" || name.ends_with("/json") || name.ends_with("VERSION") {
            continue;
        }
        let tmp = work.path().join(format!("f{n}"));
        let mut out =
            File::create(&tmp).map_err(|e| StoreError::Io(format!("{}: {e}", tmp.display())))?;
        let mut h = Hasher::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut gzip = false;
        loop {
            let k =
                entry.read(&mut buf).map_err(|e| image_err(format!("{source}: {name}: {e}")))?;
            if k == 0 {
                break;
            }
            if h.is_empty() {
                gzip = buf[..k].starts_with(&[0x1f, 0x8b]);
            }
            h.update(&buf[..k]);
            std::io::Write::write_all(&mut out, &buf[..k])
                .map_err(|e| StoreError::Io(e.to_string()))?;
        }
        out.sync_all().map_err(|e| StoreError::Io(format!("{}: {e}", tmp.display())))?;
        let size = h.len();
        let d = h.finish();
        if !store.has_blob(&d) {
            store.adopt_blob(&d, &tmp)?;
        }
        files.insert(name, (d, size, gzip));
    }
    let manifest_json = manifest_json.ok_or_else(|| {
        image_err(format!("{source} has no manifest.json; is it a docker save archive?"))
    })?;
    let entries: Vec<DockerManifestEntry> = serde_json::from_slice(&manifest_json)
        .map_err(|e| image_err(format!("{source}: manifest.json: {e}")))?;
    let entry = match selector {
        Some(tag) => entries.iter().find(|e| {
            e.repo_tags
                .iter()
                .flatten()
                .any(|t| t == tag || t.strip_prefix("docker.io/").is_some_and(|x| x == tag))
        }),
        None if entries.len() == 1 => entries.first(),
        None => None,
    }
    .ok_or_else(|| {
        let tags: Vec<String> =
            entries.iter().flat_map(|e| e.repo_tags.clone().unwrap_or_default()).collect();
        image_err(format!(
            "{source}: no image {} in it (it has: {})",
            selector.unwrap_or("given, and it holds several"),
            tags.join(", ")
        ))
    })?;
    let lookup = |name: &str| {
        let mut n = name.trim_start_matches("./").to_owned();
        // Follow the archive's own symlinks, a few hops at most.
        for _ in 0..8 {
            match links.get(&n) {
                Some(t) => n = t.clone(),
                None => break,
            }
        }
        files.get(&n).cloned().ok_or_else(|| image_err(format!("{source}: {name} is missing")))
    };
    let (config_digest, config_size, _) = lookup(&entry.config)?;
    let config_bytes = store.read_document(&config_digest)?;
    let _: oci::ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| image_err(format!("{source}: the image config: {e}")))?;
    let mut layers = Vec::new();
    for l in &entry.layers {
        let (digest, size, gzip) = lookup(l)?;
        let media_type = if gzip {
            format!("{}+gzip", oci::MEDIA_LAYER_TAR)
        } else {
            oci::MEDIA_LAYER_TAR.to_owned()
        };
        layers.push(Descriptor {
            media_type,
            digest,
            size,
            platform: None,
            annotations: Default::default(),
        });
    }
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_MANIFEST.to_owned()),
        config: Descriptor {
            media_type: oci::MEDIA_CONFIG.to_owned(),
            digest: config_digest,
            size: config_size,
            platform: None,
            annotations: Default::default(),
        },
        layers,
    };
    let bytes = serde_json::to_vec(&manifest).map_err(|e| StoreError::Io(e.to_string()))?;
    let digest = Digest::of(&bytes);
    store.put_blob(&digest, bytes.len() as u64, &bytes[..], "the manifest")?;
    Ok(digest)
}
