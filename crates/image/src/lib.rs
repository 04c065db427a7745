//! Container images as cell images.
//!
//! An image comes from a registry (pulled with `oci-client`), an OCI layout directory, an
//! OCI archive or a `docker save` archive. Every blob is checked against its digest before it is
//! kept ([`digest`]); the layers are flattened into one tar stream with every hostile trick
//! refused ([`flatten`]); the stream becomes a reproducible, read-only ext4 image with a
//! dm-verity hash tree ([`convert`]), cached by manifest digest in the state directory
//! ([`store`]). [`runconfig`] applies the image's Entrypoint, Cmd, Env, WorkingDir and User the
//! way `docker run` does.

pub mod convert;
pub mod digest;
pub mod flatten;
pub mod oci;
pub mod reference;
pub mod registry;
pub mod runconfig;
pub mod sources;
pub mod store;
pub mod tree;

pub use digest::Digest;

use std::path::PathBuf;
use std::time::Instant;

pub use flatten::Limits;
pub use reference::ImageRef;
pub use registry::RegistryOptions;
pub use store::{ImageRecord, Store, StoreError};

/// When to contact the image's source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    /// Only when the store has no image under that name (`isocell run`).
    Missing,
    /// Always (`isocell image pull`): a tag may have moved.
    Always,
}

/// An image ready to boot.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Resolved {
    /// The name it was asked for by, normalised.
    pub name: String,
    /// Its record.
    pub record: ImageRecord,
    /// Its directory in the store.
    pub dir: PathBuf,
    /// Whether the source was contacted (pulled or imported) this time.
    pub fetched: bool,
    /// Whether it was converted this time.
    pub converted: bool,
    /// Milliseconds spent fetching.
    pub fetch_ms: u64,
    /// Milliseconds spent converting.
    pub convert_ms: u64,
}

impl Resolved {
    /// The block image to boot.
    pub fn root_image(&self) -> PathBuf {
        Store::root_image(&self.dir)
    }
}

/// Finds, fetches and converts an image (not a raw block image: the caller handles those).
pub fn resolve(
    store: &Store,
    image: &ImageRef,
    policy: PullPolicy,
    registry: &RegistryOptions,
    limits: &Limits,
) -> Result<Resolved, StoreError> {
    let name = image.name();
    let started = Instant::now();
    let _using = store.using()?;
    // A digest-pinned name needs no source when the store has that image (or, for a pinned
    // index, the manifest that name was resolved to before).
    let cached = image
        .pinned_digest()
        .filter(|d| store.image(d).is_some())
        .or_else(|| store.get_ref(&name).filter(|d| store.image(d).is_some()));
    let (manifest, fetched) = match cached {
        Some(d) if policy == PullPolicy::Missing => (d, false),
        _ => {
            let d = match image {
                ImageRef::Registry(r) => registry::pull(store, r, registry)?,
                ImageRef::OciLayout(dir, sel) => {
                    sources::import_layout(store, dir, sel.as_deref())?
                }
                ImageRef::OciArchive(f, sel) => {
                    sources::import_oci_archive(store, f, sel.as_deref())?
                }
                ImageRef::DockerArchive(f, sel) => {
                    sources::import_docker_archive(store, f, sel.as_deref())?
                }
                ImageRef::Stored(d) => {
                    return Err(StoreError::NotFound(format!(
                        "no image with manifest digest {d} in the store (see `isocell image ls`)"
                    )))
                }
                ImageRef::Raw(p) => {
                    return Err(StoreError::Image(format!(
                        "{} is a block image, not a container image",
                        p.display()
                    )))
                }
            };
            (d, true)
        }
    };
    let fetch_ms = started.elapsed().as_millis() as u64;
    let (record, dir, converted) = store.ensure_converted(&manifest, limits)?;
    store.set_ref(&name, &manifest)?;
    store.touch(&manifest);
    Ok(Resolved {
        name,
        convert_ms: if converted { record.convert_ms } else { 0 },
        record,
        dir,
        fetched,
        converted,
        fetch_ms,
    })
}
