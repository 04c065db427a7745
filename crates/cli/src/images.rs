//! `isocell image pull | ls | inspect | rm | prune`, and finding the image `isocell run` boots.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use isocell_image::{ImageRef, Limits, PullPolicy, RegistryOptions, Resolved, Store};
use serde_json::json;

use crate::{exit, parse_size};

/// Where to get images from and how much they may unpack to (shared by `run` and `image pull`).
#[derive(Args, Debug, Clone, Default)]
pub struct FetchArgs {
    /// A registry (HOST[:PORT]) to reach over plain HTTP instead of HTTPS; repeatable. Also
    /// ISOCELL_INSECURE_REGISTRIES (comma-separated).
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// Registry credentials file (default: $REGISTRY_AUTH_FILE, podman's auth.json, then
    /// ~/.docker/config.json).
    #[arg(long = "authfile", value_name = "FILE")]
    pub auth_file: Option<PathBuf>,
    /// The most bytes an image's layers may unpack to (a size: 512M, 8G).
    #[arg(long, value_name = "SIZE", default_value = "8G")]
    pub max_image_bytes: String,
    /// The most entries (files, directories, links) an image's layers may hold.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub max_image_entries: u64,
    /// Always fetch the image again, even if the store has it under this name.
    #[arg(long)]
    pub pull: bool,
    /// The image store's size bound: after a new image is converted, the least recently used
    /// others are removed until the store fits (a size; also ISOCELL_IMAGE_STORE_MAX).
    #[arg(long, value_name = "SIZE")]
    pub store_max: Option<String>,
}

impl FetchArgs {
    fn registry(&self) -> RegistryOptions {
        let mut insecure = self.insecure_registries.clone();
        if let Ok(list) = std::env::var("ISOCELL_INSECURE_REGISTRIES") {
            insecure.extend(
                list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned),
            );
        }
        RegistryOptions {
            insecure,
            auth_file: self.auth_file.clone(),
            progress: std::io::stderr().is_terminal(),
        }
    }

    fn limits(&self) -> Result<Limits, String> {
        Ok(Limits {
            max_bytes: parse_size("--max-image-bytes", &self.max_image_bytes)?,
            max_entries: self.max_image_entries,
        })
    }

    fn store_max(&self) -> Result<u64, String> {
        let from_env = std::env::var("ISOCELL_IMAGE_STORE_MAX").ok();
        match self.store_max.as_deref().or(from_env.as_deref()) {
            Some(s) => parse_size("--store-max", s),
            None => Ok(DEFAULT_STORE_MAX),
        }
    }
}

/// The image store's default size bound.
const DEFAULT_STORE_MAX: u64 = 50 << 30;

/// The store in the state directory.
pub fn store() -> Result<Store, String> {
    Store::open(&isocell_host::locate::state_dir()).map_err(|e| e.to_string())
}

/// Fetches and converts an image as `run` or `pull` needs it, then keeps the store within its
/// bound (never removing this image).
pub fn resolve(image: &ImageRef, args: &FetchArgs, always: bool) -> Result<Resolved, String> {
    let store = store()?;
    let policy = if always || args.pull { PullPolicy::Always } else { PullPolicy::Missing };
    let resolved = isocell_image::resolve(&store, image, policy, &args.registry(), &args.limits()?)
        .map_err(|e| format!("image {}: {e}", image.name()))?;
    if resolved.converted {
        let bound = args.store_max()?;
        if store.total_bytes() > bound {
            if let Ok(removed) = store.prune(Some(bound), Some(&resolved.record.manifest_digest)) {
                for r in removed {
                    tell!("isocell: image store over {bound} bytes: {r}");
                }
            }
        }
    }
    Ok(resolved)
}

/// `isocell image …`.
#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Fetch an image (registry, oci:DIR, oci-archive:FILE, docker-archive:FILE), check every
    /// blob, and convert it into a cell image.
    Pull {
        /// The image.
        image: String,
        #[command(flatten)]
        fetch: FetchArgs,
    },
    /// The images in the store.
    Ls {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Everything the store knows about an image, as JSON.
    Inspect {
        /// The image, by the name it was pulled with, or its manifest digest.
        image: String,
    },
    /// Remove a name; its image goes when no other name needs it.
    Rm {
        /// The image name.
        image: String,
    },
    /// Remove images no name points at and blobs no image needs; with --keep-bytes, also the
    /// least recently used images until the store fits.
    Prune {
        /// Keep the store at most this large (a size: 10G).
        #[arg(long, value_name = "SIZE")]
        keep_bytes: Option<String>,
    },
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A name as the store keeps it (`debian` is `docker.io/library/debian:latest`), or as given
/// when it does not parse.
fn normal_name(name: &str) -> String {
    ImageRef::parse(name).map_or_else(|_| name.to_owned(), |r| r.name())
}

/// The record for a name or a manifest digest.
fn find(
    store: &Store,
    name: &str,
) -> Result<(String, isocell_image::ImageRecord, PathBuf), String> {
    if let Ok(d) = isocell_image::Digest::parse(name) {
        if let Some((r, dir)) = store.image(&d) {
            return Ok((name.to_owned(), r, dir));
        }
    }
    let normal = normal_name(name);
    let digest = store
        .get_ref(&normal)
        .or_else(|| store.get_ref(name))
        .ok_or_else(|| format!("no image {name} in the store (see `isocell image ls`)"))?;
    let (r, dir) = store.image(&digest).ok_or_else(|| {
        format!("{name} points at {digest}, which is not converted; pull it again")
    })?;
    Ok((normal, r, dir))
}

/// Runs an `isocell image` command.
pub fn image(cmd: ImageCmd) -> u8 {
    match image_inner(cmd) {
        Ok(()) => 0,
        Err(e) => exit::fail(&e),
    }
}

fn image_inner(cmd: ImageCmd) -> Result<(), String> {
    match cmd {
        ImageCmd::Pull { image, fetch } => {
            let r = ImageRef::parse(&image)?;
            if let ImageRef::Raw(p) = &r {
                return Err(format!(
                    "{} is a block image; it needs no pull (isocell run {} -- ...)",
                    p.display(),
                    p.display()
                ));
            }
            let resolved = resolve(&r, &fetch, true)?;
            say(&format!(
                "{} {} (fetched in {} ms, {})",
                resolved.name,
                resolved.record.manifest_digest,
                resolved.fetch_ms,
                if resolved.converted {
                    format!("converted in {} ms", resolved.convert_ms)
                } else {
                    "already converted".to_owned()
                }
            ));
            Ok(())
        }
        ImageCmd::Ls { json } => {
            let store = store()?;
            let images = store.images();
            let refs = store.refs();
            if json {
                let list: Vec<_> = images
                    .iter()
                    .map(|(r, bytes)| {
                        json!({
                            "names": refs.iter().filter(|x| x.manifest_digest == r.manifest_digest).map(|x| &x.name).collect::<Vec<_>>(),
                            "manifest_digest": r.manifest_digest,
                            "block_bytes": r.converted.block_bytes,
                            "store_bytes": bytes,
                            "converted_at": r.converted_at,
                        })
                    })
                    .collect();
                say(&serde_json::to_string_pretty(&list).unwrap_or_default());
                return Ok(());
            }
            say(&format!("{:<60} {:<14} {:>10}", "NAME", "MANIFEST", "SIZE"));
            for (r, bytes) in &images {
                let names: Vec<&str> = refs
                    .iter()
                    .filter(|x| x.manifest_digest == r.manifest_digest)
                    .map(|x| x.name.as_str())
                    .collect();
                let names = if names.is_empty() { vec!["<none>"] } else { names };
                for n in names {
                    say(&format!(
                        "{n:<60} {:<14} {:>10}",
                        r.manifest_digest.short(),
                        human(*bytes)
                    ));
                }
            }
            Ok(())
        }
        ImageCmd::Inspect { image } => {
            let store = store()?;
            let (name, record, dir) = find(&store, &image)?;
            let v = json!({
                "name": name,
                "image": record,
                "root_image": Store::root_image(&dir),
                "dm_verity": record.converted.verity.dm_create("/dev/vda"),
            });
            say(&serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        }
        ImageCmd::Rm { image } => {
            let store = store()?;
            let normal = normal_name(&image);
            let name = if store.get_ref(&normal).is_some() { normal } else { image };
            for line in store.remove(&name).map_err(|e| e.to_string())? {
                say(&line);
            }
            Ok(())
        }
        ImageCmd::Prune { keep_bytes } => {
            let store = store()?;
            let keep = keep_bytes.map(|k| parse_size("--keep-bytes", &k)).transpose()?;
            let removed = store.prune(keep, None).map_err(|e| e.to_string())?;
            for line in &removed {
                say(line);
            }
            say(&format!("the image store holds {}", human(store.total_bytes())));
            Ok(())
        }
    }
}

fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout(), "{line}");
}
