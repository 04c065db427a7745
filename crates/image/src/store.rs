//! The local image store, under the state directory's `images/`:
//!
//! ```text
//! blobs/sha256/<hex>      every blob kept, each checked against its digest before it lands
//! images/<manifest-hex>/  one converted image: root.img (ext4 + verity tree), image.json,
//!                         passwd and group (the image's user database, for User), last-used
//! refs/<sha256 of name>   a name (registry reference, oci:DIR:TAG, ...) → manifest digest
//! locks/<manifest-hex>    held while that image is converted, so concurrent pulls work once
//! tmp/<pid>-<n>/          work in progress; an entry only appears in images/ by rename when
//!                         complete, and a killed conversion's leftovers are swept
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::convert::{self, Converted};
use crate::digest::{Digest, VerifyingReader};
use crate::flatten::{Layer, Limits};
use crate::oci::{self, ImageConfig, Manifest, RunConfig};

/// A converted image, as `image.json` records it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// The manifest's digest: the image's identity.
    pub manifest_digest: Digest,
    /// The config blob's digest.
    pub config_digest: Digest,
    /// Layer digests, bottom first.
    pub layers: Vec<Digest>,
    /// Bytes of the layers as stored (compressed).
    pub layer_bytes: u64,
    /// What the image runs by default.
    pub run_config: RunConfig,
    /// The block image.
    pub converted: Converted,
    /// Seconds since the epoch when it was converted.
    pub converted_at: u64,
    /// Milliseconds the conversion took.
    pub convert_ms: u64,
    /// Inodes and bytes of the flattened root.
    pub files: u64,
    /// Bytes of file contents.
    pub file_bytes: u64,
}

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Host I/O on the store.
    #[error("image store: {0}")]
    Io(String),
    /// A blob did not match its digest or size.
    #[error("{0}")]
    Verify(String),
    /// The image is malformed or not for cells.
    #[error("{0}")]
    Image(String),
    /// Conversion failed.
    #[error(transparent)]
    Convert(#[from] convert::ConvertError),
    /// No such image.
    #[error("{0}")]
    NotFound(String),
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> StoreError {
    move |e| StoreError::Io(format!("{what}: {e}"))
}

/// A name → manifest mapping (`refs/`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefRecord {
    /// The name as the user gave it, normalised.
    pub name: String,
    /// The manifest it points at.
    pub manifest_digest: Digest,
}

/// The store.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn mkdir(p: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(p).map_err(io_err(p.display()))
}

/// Holds an exclusive `flock` until dropped.
pub struct Lock(#[allow(dead_code)] File);

fn lock(path: &Path) -> Result<Lock, StoreError> {
    lock_as(path, libc::LOCK_EX)
}

/// Locks `path` (created if missing, never deleted: a waiter holds the inode) with `op`.
fn lock_as(path: &Path, op: libc::c_int) -> Result<Lock, StoreError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path.display()))?;
    // SAFETY: flock on a descriptor this function owns; blocking until the lock is free.
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        return Err(StoreError::Io(format!(
            "lock {}: {}",
            path.display(),
            io::Error::last_os_error()
        )));
    }
    Ok(Lock(f))
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks whether the process exists.
    unsafe {
        libc::kill(pid, 0) == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
}

/// A directory in `tmp/` that is removed when dropped unless it was kept by a rename.
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

impl Store {
    /// The store under `state_dir/images`, created if missing; leftovers of killed work are
    /// swept.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let root = state_dir.join("images");
        for sub in ["blobs/sha256", "images", "refs", "locks", "tmp"] {
            mkdir(&root.join(sub))?;
        }
        let store = Self { root };
        store.sweep_tmp();
        Ok(store)
    }

    /// Held (shared) while an image is fetched, converted and named, and (exclusive) while `rm`
    /// and `prune` decide what nothing needs: a blob or image on its way in is never collected.
    pub fn using(&self) -> Result<Lock, StoreError> {
        lock_as(&self.root.join("locks/store"), libc::LOCK_SH)
    }

    fn collecting(&self) -> Result<Lock, StoreError> {
        lock_as(&self.root.join("locks/store"), libc::LOCK_EX)
    }

    /// Where the store lives.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes work directories whose process is gone (a conversion killed half way).
    fn sweep_tmp(&self) {
        let Ok(entries) = fs::read_dir(self.root.join("tmp")) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_none_or(|p| !pid_alive(p)) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// A fresh work directory.
    pub fn work_dir(&self) -> Result<WorkDir, StoreError> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self.root.join("tmp").join(format!("{}-{n}-{}", std::process::id(), now_secs()));
        mkdir(&path)?;
        Ok(WorkDir { path })
    }

    /// The path of a blob (which may not exist).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Whether a blob is already kept.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Copies `reader` into the store as blob `d`, checking size and digest on the way; nothing
    /// that fails the check is kept.
    pub fn put_blob(
        &self,
        d: &Digest,
        size: u64,
        reader: impl Read,
        what: &str,
    ) -> Result<PathBuf, StoreError> {
        let dest = self.blob_path(d);
        if dest.is_file() {
            return Ok(dest);
        }
        let work = self.work_dir()?;
        let tmp = work.path().join("blob");
        let mut out = File::create(&tmp).map_err(io_err(tmp.display()))?;
        let mut v = VerifyingReader::new(reader, size);
        io::copy(&mut v, &mut out).map_err(|e| StoreError::Verify(format!("{what}: {e}")))?;
        v.finish(d, what).map_err(StoreError::Verify)?;
        out.sync_all().map_err(io_err(tmp.display()))?;
        fs::rename(&tmp, &dest).map_err(io_err(dest.display()))?;
        Ok(dest)
    }

    /// Adopts a file already checked to hold blob `d` (a registry download).
    pub fn adopt_blob(&self, d: &Digest, file: &Path) -> Result<PathBuf, StoreError> {
        let dest = self.blob_path(d);
        fs::rename(file, &dest).map_err(io_err(dest.display()))?;
        Ok(dest)
    }

    /// Reads a small blob (manifest, config), checking its digest again.
    pub fn read_document(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(d);
        let f = File::open(&path)
            .map_err(|e| StoreError::NotFound(format!("blob {d} is not in the store: {e}")))?;
        let mut bytes = Vec::new();
        f.take(oci::MAX_DOCUMENT_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err(path.display()))?;
        if bytes.len() as u64 > oci::MAX_DOCUMENT_BYTES {
            return Err(StoreError::Image(format!("document {d} is larger than 4 MiB")));
        }
        if &Digest::of(&bytes) != d {
            return Err(StoreError::Verify(format!(
                "stored blob {d} no longer matches its digest"
            )));
        }
        Ok(bytes)
    }

    fn image_dir(&self, d: &Digest) -> PathBuf {
        self.root.join("images").join(d.hex())
    }

    /// The converted image of a manifest, if the store has it (complete).
    pub fn image(&self, d: &Digest) -> Option<(ImageRecord, PathBuf)> {
        let dir = self.image_dir(d);
        let bytes = fs::read(dir.join("image.json")).ok()?;
        let record: ImageRecord = serde_json::from_slice(&bytes).ok()?;
        (record.manifest_digest == *d).then_some((record, dir))
    }

    /// The block image file of a converted image.
    pub fn root_image(dir: &Path) -> PathBuf {
        dir.join("root.img")
    }

    /// The image's `/etc/passwd` and `/etc/group`, as converted.
    pub fn user_db(dir: &Path) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        (fs::read(dir.join("passwd")).ok(), fs::read(dir.join("group")).ok())
    }

    /// Marks an image used now (prune removes the least recently used first).
    pub fn touch(&self, d: &Digest) {
        let _ = fs::write(self.image_dir(d).join("last-used"), now_secs().to_string());
    }

    fn last_used(&self, d: &Digest) -> u64 {
        fs::read_to_string(self.image_dir(d).join("last-used"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Converts the image whose manifest, config and layers are in the store, unless a complete
    /// conversion is already there. Concurrent callers for one manifest wait for each other and
    /// the second finds the work done. The flag says whether this call converted it.
    pub fn ensure_converted(
        &self,
        manifest_digest: &Digest,
        limits: &Limits,
    ) -> Result<(ImageRecord, PathBuf, bool), StoreError> {
        if let Some((r, d)) = self.image(manifest_digest) {
            return Ok((r, d, false));
        }
        let _lock = lock(&self.root.join("locks").join(manifest_digest.hex()))?;
        if let Some((r, d)) = self.image(manifest_digest) {
            return Ok((r, d, false));
        }
        let manifest_bytes = self.read_document(manifest_digest)?;
        let manifest: Manifest =
            match oci::parse_document(&manifest_bytes, None).map_err(StoreError::Image)? {
                oci::Document::Manifest(m) => m,
                oci::Document::Index(_) => {
                    return Err(StoreError::Image(format!(
                        "{manifest_digest} is an index, not an image manifest"
                    )))
                }
            };
        let config_bytes = self.read_document(&manifest.config.digest)?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| StoreError::Image(format!("the image config is not valid: {e}")))?;
        oci::check_config(&config).map_err(StoreError::Image)?;
        if manifest.layers.is_empty() {
            return Err(StoreError::Image("the image has no layers".into()));
        }
        let total = manifest.layers.len();
        let mut layers = Vec::with_capacity(total);
        let mut layer_bytes = 0;
        for (i, l) in manifest.layers.iter().enumerate() {
            let path = self.blob_path(&l.digest);
            let meta = fs::metadata(&path).map_err(|_| {
                StoreError::NotFound(format!(
                    "layer {} of {total} ({}) is not in the store",
                    i + 1,
                    l.digest
                ))
            })?;
            if meta.len() != l.size {
                return Err(StoreError::Verify(format!(
                    "stored layer {} does not have its {} bytes",
                    l.digest, l.size
                )));
            }
            layer_bytes += l.size;
            layers
                .push(Layer { path, label: format!("layer {} of {total} ({})", i + 1, l.digest) });
        }
        let work = self.work_dir()?;
        let out_dir = work.path().join("image");
        mkdir(&out_dir)?;
        let scratch = work.path().join("scratch");
        mkdir(&scratch)?;
        let started = std::time::Instant::now();
        let (converted, captured, stats) = convert::convert(
            &layers,
            manifest_digest,
            limits,
            &Self::root_image(&out_dir),
            &scratch,
        )?;
        let record = ImageRecord {
            manifest_digest: manifest_digest.clone(),
            config_digest: manifest.config.digest.clone(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            layer_bytes,
            run_config: config.config.unwrap_or_default(),
            converted,
            converted_at: now_secs(),
            convert_ms: started.elapsed().as_millis() as u64,
            files: stats.inodes,
            file_bytes: stats.file_bytes,
        };
        let write = |name: &str, bytes: &[u8]| -> Result<(), StoreError> {
            let p = out_dir.join(name);
            let mut f = File::create(&p).map_err(io_err(p.display()))?;
            f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io_err(p.display()))
        };
        if let Some(p) = &captured.passwd {
            write("passwd", p)?;
        }
        if let Some(g) = &captured.group {
            write("group", g)?;
        }
        let json = serde_json::to_vec_pretty(&record).map_err(|e| StoreError::Io(e.to_string()))?;
        write("image.json", &json)?;
        File::open(Self::root_image(&out_dir))
            .and_then(|f| f.sync_all())
            .map_err(io_err("root.img"))?;
        let dest = self.image_dir(manifest_digest);
        fs::rename(&out_dir, &dest).map_err(io_err(dest.display()))?;
        self.touch(manifest_digest);
        Ok((record, dest, true))
    }

    fn ref_path(&self, name: &str) -> PathBuf {
        self.root.join("refs").join(Digest::of(name.as_bytes()).hex())
    }

    /// Points `name` at a manifest.
    pub fn set_ref(&self, name: &str, manifest_digest: &Digest) -> Result<(), StoreError> {
        let record = RefRecord { name: name.to_owned(), manifest_digest: manifest_digest.clone() };
        let work = self.work_dir()?;
        let tmp = work.path().join("ref");
        let json = serde_json::to_vec(&record).map_err(|e| StoreError::Io(e.to_string()))?;
        fs::write(&tmp, json).map_err(io_err(tmp.display()))?;
        let dest = self.ref_path(name);
        fs::rename(&tmp, &dest).map_err(io_err(dest.display()))
    }

    /// The manifest a name points at.
    pub fn get_ref(&self, name: &str) -> Option<Digest> {
        let bytes = fs::read(self.ref_path(name)).ok()?;
        let r: RefRecord = serde_json::from_slice(&bytes).ok()?;
        (r.name == name).then_some(r.manifest_digest)
    }

    /// Every name, sorted.
    pub fn refs(&self) -> Vec<RefRecord> {
        let mut out: Vec<RefRecord> = fs::read_dir(self.root.join("refs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Every converted image.
    pub fn images(&self) -> Vec<(ImageRecord, u64)> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.root.join("images")).into_iter().flatten().flatten() {
            let Ok(d) = Digest::parse(&format!("sha256:{}", e.file_name().to_string_lossy()))
            else {
                continue;
            };
            if let Some((record, dir)) = self.image(&d) {
                out.push((record, dir_bytes(&dir)));
            }
        }
        out.sort_by(|a, b| a.0.manifest_digest.cmp(&b.0.manifest_digest));
        out
    }

    /// Removes a name; when no other name points at its image, the image and the blobs only it
    /// used go too. Returns what was removed.
    pub fn remove(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let _collecting = self.collecting()?;
        let digest = self.get_ref(name).ok_or_else(|| {
            StoreError::NotFound(format!(
                "no image named {name} in the store (see `isocell image ls`)"
            ))
        })?;
        fs::remove_file(self.ref_path(name)).map_err(io_err(name))?;
        let mut removed = vec![format!("untagged {name}")];
        if !self.refs().iter().any(|r| r.manifest_digest == digest) {
            removed.extend(self.remove_image(&digest)?);
            removed.extend(self.collect_blobs()?);
        }
        Ok(removed)
    }

    fn remove_image(&self, d: &Digest) -> Result<Vec<String>, StoreError> {
        let dir = self.image_dir(d);
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let _lock = lock(&self.root.join("locks").join(d.hex()))?;
        // Renamed away first, so a half-removed image never looks complete.
        let work = self.work_dir()?;
        fs::rename(&dir, work.path().join("gone")).map_err(io_err(dir.display()))?;
        drop(work);
        Ok(vec![format!("deleted image {d}")])
    }

    /// Removes blobs that no named image's manifest needs.
    fn collect_blobs(&self) -> Result<Vec<String>, StoreError> {
        let mut keep = std::collections::HashSet::new();
        for r in self.refs() {
            keep.insert(r.manifest_digest.clone());
            if let Ok(bytes) = self.read_document(&r.manifest_digest) {
                match oci::parse_document(&bytes, None) {
                    Ok(oci::Document::Manifest(m)) => {
                        keep.insert(m.config.digest);
                        keep.extend(m.layers.into_iter().map(|l| l.digest));
                    }
                    Ok(oci::Document::Index(i)) => {
                        keep.extend(i.manifests.into_iter().map(|m| m.digest))
                    }
                    Err(_) => {}
                }
            }
        }
        let mut removed = Vec::new();
        for e in fs::read_dir(self.root.join("blobs/sha256")).map_err(io_err("blobs"))?.flatten() {
            let Ok(d) = Digest::parse(&format!("sha256:{}", e.file_name().to_string_lossy()))
            else {
                continue;
            };
            if !keep.contains(&d) && fs::remove_file(e.path()).is_ok() {
                removed.push(format!("deleted blob {d}"));
            }
        }
        Ok(removed)
    }

    /// Frees space: images no name points at, then (with `keep_bytes`) the least recently used
    /// images and their names until the store holds at most that many bytes; then unneeded
    /// blobs. `spare` is never removed (the image about to run).
    pub fn prune(
        &self,
        keep_bytes: Option<u64>,
        spare: Option<&Digest>,
    ) -> Result<Vec<String>, StoreError> {
        let _collecting = self.collecting()?;
        let named: std::collections::HashSet<Digest> =
            self.refs().into_iter().map(|r| r.manifest_digest).collect();
        let mut removed = Vec::new();
        for (record, _) in self.images() {
            if !named.contains(&record.manifest_digest) && Some(&record.manifest_digest) != spare {
                removed.extend(self.remove_image(&record.manifest_digest)?);
            }
        }
        if let Some(limit) = keep_bytes {
            let mut images = self.images();
            images.sort_by_key(|(r, _)| self.last_used(&r.manifest_digest));
            for (record, _) in images {
                if self.total_bytes() <= limit {
                    break;
                }
                if Some(&record.manifest_digest) == spare {
                    continue;
                }
                for r in
                    self.refs().into_iter().filter(|r| r.manifest_digest == record.manifest_digest)
                {
                    let _ = fs::remove_file(self.ref_path(&r.name));
                    removed.push(format!("untagged {}", r.name));
                }
                removed.extend(self.remove_image(&record.manifest_digest)?);
                removed.extend(self.collect_blobs()?);
            }
        }
        removed.extend(self.collect_blobs()?);
        Ok(removed)
    }

    /// Bytes the store holds (blobs and images).
    pub fn total_bytes(&self) -> u64 {
        dir_bytes(&self.root)
    }
}

/// Bytes allocated under a directory (files only, links not followed).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                use std::os::unix::fs::MetadataExt;
                total += m.blocks() * 512;
            }
        }
    }
    total
}
