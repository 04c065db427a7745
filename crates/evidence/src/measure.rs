//! The launch measurement: SHA-256 of everything that decides what a cell runs — kernel, initrd,
//! kernel command line, root image, the effective VM configuration, the VMM binary and its
//! seccomp filters — combined into one launch digest. Equal digests mean the same launch.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::canonical::{sha256_hex, to_canonical_string};

/// What goes into a launch.
pub struct LaunchInputs<'a> {
    /// Guest kernel.
    pub kernel: &'a Path,
    /// Initial ramdisk, if any.
    pub initrd: Option<&'a Path>,
    /// The full kernel command line the VMM will give the guest.
    pub cmdline: &'a str,
    /// Root image.
    pub image: &'a Path,
    /// The root image's digest when it is already known and the guest checks the image itself
    /// (a converted container image: its digest was taken at conversion and dm-verity's root
    /// hash is on the measured command line), so the file is not read again at each launch.
    pub image_digest: Option<&'a str>,
    /// For a container image: what it is (reference, manifest, config and block digests,
    /// verity root hash), measured as the `image` component.
    pub image_identity: Option<&'a serde_json::Value>,
    /// The effective VM configuration (as the VMM will read it).
    pub vm_config: &'a serde_json::Value,
    /// The VMM binary.
    pub vmm: &'a Path,
    /// The VMM's seccomp filters, serialised; `None` while the VMM installs none.
    pub seccomp: Option<&'a [u8]>,
}

/// The digests of each component and the launch digest over all of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LaunchMeasurement {
    /// Component name -> `sha256:HEX`.
    pub components: BTreeMap<String, String>,
    /// `sha256:HEX` of the canonical JSON of `components`.
    pub launch_digest: String,
}

/// Remembers file digests by identity (device, inode, size, modification and change times), so
/// an unchanged multi-megabyte kernel or image is not read again for every cell. Any change to
/// the file changes its change time, and so its key.
pub struct DigestCache {
    dir: PathBuf,
}

impl DigestCache {
    /// A cache stored in `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DigestCache { dir: dir.into() }
    }

    fn key(path: &Path) -> std::io::Result<String> {
        let m = std::fs::metadata(path)?;
        // The file's identity and version, not its name: the same inode reached through a
        // held descriptor (/proc/self/fd/N) is the same file.
        let id = format!(
            "{}|{}|{}|{}.{}|{}.{}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        );
        Ok(sha256_hex(id.as_bytes()))
    }

    /// `sha256:HEX` of the file, from the cache when the file is unchanged.
    pub fn file_digest(&self, path: &Path) -> std::io::Result<String> {
        let key = Self::key(path)?;
        let entry = self.dir.join(&key);
        if let Ok(text) = std::fs::read_to_string(&entry) {
            if text.starts_with("sha256:") && text.len() == 71 {
                return Ok(text);
            }
        }
        let digest = file_digest(path)?;
        // Best effort: a cache that cannot be written only costs time.
        if std::fs::create_dir_all(&self.dir).is_ok() {
            let tmp = self.dir.join(format!("{key}.{}.tmp", std::process::id()));
            if std::fs::write(&tmp, &digest).is_ok() {
                let _ = std::fs::rename(&tmp, &entry);
            }
        }
        Ok(digest)
    }
}

/// `sha256:HEX` of a file's contents.
pub fn file_digest(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Measures a launch. File digests go through `cache` when one is given.
pub fn measure(
    inputs: &LaunchInputs,
    cache: Option<&DigestCache>,
) -> Result<LaunchMeasurement, String> {
    let digest = |p: &Path| {
        match cache {
            Some(c) => c.file_digest(p),
            None => file_digest(p),
        }
        .map_err(|e| format!("cannot measure {}: {e}", p.display()))
    };
    let mut components = BTreeMap::new();
    components.insert("kernel".to_owned(), digest(inputs.kernel)?);
    if let Some(initrd) = inputs.initrd {
        components.insert("initrd".to_owned(), digest(initrd)?);
    }
    components
        .insert("cmdline".to_owned(), format!("sha256:{}", sha256_hex(inputs.cmdline.as_bytes())));
    let root_image = match inputs.image_digest {
        Some(d) => d.to_owned(),
        None => digest(inputs.image)?,
    };
    components.insert("root_image".to_owned(), root_image);
    if let Some(identity) = inputs.image_identity {
        let text = to_canonical_string(identity);
        components.insert("image".to_owned(), format!("sha256:{}", sha256_hex(text.as_bytes())));
    }
    let config = to_canonical_string(inputs.vm_config);
    components.insert("vm_config".to_owned(), format!("sha256:{}", sha256_hex(config.as_bytes())));
    components.insert("vmm".to_owned(), digest(inputs.vmm)?);
    components.insert(
        "seccomp".to_owned(),
        match inputs.seccomp {
            Some(bytes) => format!("sha256:{}", sha256_hex(bytes)),
            None => "none".to_owned(),
        },
    );
    let all = serde_json::to_value(&components).map_err(|e| e.to_string())?;
    let launch_digest = format!("sha256:{}", sha256_hex(to_canonical_string(&all).as_bytes()));
    Ok(LaunchMeasurement { components, launch_digest })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Files {
        dir: PathBuf,
    }
    impl Files {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("isocell-measure-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for f in ["kernel", "image", "vmm"] {
                std::fs::write(dir.join(f), format!("{f} v1")).unwrap();
            }
            Files { dir }
        }
        fn path(&self, f: &str) -> PathBuf {
            self.dir.join(f)
        }
        fn measure(
            &self,
            cmdline: &str,
            config: &serde_json::Value,
            cache: Option<&DigestCache>,
        ) -> String {
            let (k, i, v) = (self.path("kernel"), self.path("image"), self.path("vmm"));
            let inputs = LaunchInputs {
                image_digest: None,
                image_identity: None,
                kernel: &k,
                initrd: None,
                cmdline,
                image: &i,
                vm_config: config,
                vmm: &v,
                seccomp: None,
            };
            measure(&inputs, cache).unwrap().launch_digest
        }
    }
    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn the_digest_changes_with_each_input_and_only_then() {
        let f = Files::new("each");
        let cfg = serde_json::json!({"vcpus": 1, "memory_mib": 128});
        let base = f.measure("quiet", &cfg, None);
        assert_eq!(base, f.measure("quiet", &cfg, None), "stable for the same launch");
        // Key order in the config does not matter; values do.
        let reordered: serde_json::Value =
            serde_json::from_str(r#"{"memory_mib": 128, "vcpus": 1}"#).unwrap();
        assert_eq!(base, f.measure("quiet", &reordered, None));
        assert_ne!(base, f.measure("quiet ", &cfg, None), "command line");
        assert_ne!(
            base,
            f.measure("quiet", &serde_json::json!({"vcpus": 2, "memory_mib": 128}), None),
            "config"
        );
        for file in ["kernel", "image", "vmm"] {
            std::fs::write(f.path(file), format!("{file} v2")).unwrap();
            assert_ne!(base, f.measure("quiet", &cfg, None), "{file}");
            std::fs::write(f.path(file), format!("{file} v1")).unwrap();
            assert_eq!(base, f.measure("quiet", &cfg, None), "{file} restored");
        }
    }

    #[test]
    fn the_cache_follows_file_changes() {
        let f = Files::new("cache");
        let cache = DigestCache::new(f.path("cache"));
        let cfg = serde_json::json!({});
        let base = f.measure("x", &cfg, Some(&cache));
        assert_eq!(base, f.measure("x", &cfg, Some(&cache)));
        std::fs::write(f.path("image"), "image v2").unwrap();
        assert_ne!(base, f.measure("x", &cfg, Some(&cache)));
        assert_eq!(f.measure("x", &cfg, Some(&cache)), f.measure("x", &cfg, None));
    }

    #[test]
    fn a_container_image_is_measured_by_its_identity_without_reading_it() {
        let f = Files::new("identity");
        let (k, v) = (f.path("kernel"), f.path("vmm"));
        let missing = f.path("not-there");
        let cfg = serde_json::json!({});
        let with = |identity: &serde_json::Value, block: &str| {
            let inputs = LaunchInputs {
                image_digest: Some(block),
                image_identity: Some(identity),
                kernel: &k,
                initrd: None,
                cmdline: "c",
                image: &missing,
                vm_config: &cfg,
                vmm: &v,
                seccomp: None,
            };
            measure(&inputs, None).unwrap()
        };
        let a = serde_json::json!({"manifest_digest": "sha256:aa", "reference": "x:1"});
        let b = serde_json::json!({"manifest_digest": "sha256:bb", "reference": "x:1"});
        let m = with(&a, "sha256:11");
        assert_eq!(m.components["root_image"], "sha256:11");
        assert_eq!(m.launch_digest, with(&a, "sha256:11").launch_digest);
        assert_ne!(m.launch_digest, with(&b, "sha256:11").launch_digest);
        assert_ne!(m.launch_digest, with(&a, "sha256:22").launch_digest);
    }
}
