//! A root file system tree on this host (what containerd's snapshotter prepares for a container)
//! as an image in the [`Store`]: the tree becomes one uncompressed layer, written in a fixed
//! order with owners, modes and file times but no access or directory times, so the same tree
//! always gives the same layer digest and so the same manifest digest. The store's conversion (and its cache)
//! then treat it like any pulled image: a second container of the same tree converts nothing.
//!
//! Extended attributes (file capabilities in `security.capability`, `user.*`, `trusted.*`) go
//! into the layer as PAX `SCHILY.xattr.*` records, as `docker save` writes them, so a binary
//! that needs a capability keeps it in the cell. The host's own labels (`security.selinux` and
//! the other security modules'), an overlay's `trusted.overlay.*` and ACLs are not the image's
//! and are left out.
//!
//! The tree is not trusted: symbolic links are recorded, never followed, and the layer goes
//! through the same flattening and limits as a registry's.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::digest::{Digest, Hasher};
use crate::oci::{
    Descriptor, ImageConfig, Manifest, MEDIA_CONFIG, MEDIA_LAYER_TAR, MEDIA_MANIFEST,
};
use crate::store::{Store, StoreError};

/// What [`import_tree`] made.
#[derive(Debug, Clone)]
pub struct ImportedTree {
    /// The manifest digest, for [`Store::ensure_converted`].
    pub manifest: Digest,
    /// Entries written to the layer.
    pub entries: u64,
    /// Bytes of the layer.
    pub layer_bytes: u64,
}

/// Hashes everything written through it.
struct Hashing<W: Write> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn io_err(what: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |e| StoreError::Io(format!("{}: {e}", what.display()))
}

/// Writes the tree under `root` as a tar stream into `out`, entries sorted by name. Returns
/// the number of entries.
fn write_layer<W: Write>(root: &Path, out: W) -> Result<(u64, W), StoreError> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut entries = 0u64;
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err(&dir))?;
        names.sort();
        // Subdirectories go on the stack in reverse so they come out in name order.
        let mut subdirs = Vec::new();
        for name in names {
            let path = root.join(&rel).join(&name);
            let name = rel.join(&name);
            let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            let ft = meta.file_type();
            if ft.is_socket() {
                // A socket has no tar form and no meaning in a fresh root.
                continue;
            }
            let mut h = tar::Header::new_ustar();
            h.set_mode(meta.mode() & 0o7777);
            h.set_uid(meta.uid().into());
            h.set_gid(meta.gid().into());
            // A directory's time is when a snapshotter copied it (containerd's native snapshotter
            // copies the image's tree for every container), not the image's: left out, so the
            // same image is the same layer. Files and links keep theirs.
            h.set_mtime(if ft.is_dir() { 0 } else { meta.mtime().max(0) as u64 });
            h.set_size(0);
            entries += 1;
            let xattrs = image_xattrs(&path)?;
            if !xattrs.is_empty() {
                let records = xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
                b.append_pax_extensions(records).map_err(io_err(&path))?;
            }
            if ft.is_dir() {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, &name, io::empty()).map_err(io_err(&path))?;
                subdirs.push(name);
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(io_err(&path))?;
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, &name, &target).map_err(io_err(&path))?;
            } else if ft.is_file() {
                let key = (meta.dev(), meta.ino());
                if meta.nlink() > 1 {
                    if let Some(first) = links.get(&key) {
                        h.set_entry_type(tar::EntryType::Link);
                        b.append_link(&mut h, &name, first).map_err(io_err(&path))?;
                        continue;
                    }
                    links.insert(key, name.clone());
                }
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(meta.len());
                let f = File::open(&path).map_err(io_err(&path))?;
                b.append_data(&mut h, &name, f).map_err(io_err(&path))?;
            } else {
                let kind = if ft.is_fifo() {
                    tar::EntryType::Fifo
                } else if ft.is_char_device() {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                h.set_entry_type(kind);
                let rdev = meta.rdev();
                h.set_device_major(libc::major(rdev)).map_err(io_err(&path))?;
                h.set_device_minor(libc::minor(rdev)).map_err(io_err(&path))?;
                b.append_data(&mut h, &name, io::empty()).map_err(io_err(&path))?;
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    let out = b.into_inner().map_err(io_err(root))?;
    Ok((entries, out))
}

/// Whether an extended attribute is the image's rather than this host's: user attributes, file
/// capabilities and trusted attributes, but not the host's security labels (SELinux, SMACK,
/// AppArmor, IMA/EVM) or the metadata an overlay keeps in its upper directory.
fn image_owned(name: &str) -> bool {
    name.starts_with("user.")
        || name == "security.capability"
        || (name.starts_with("trusted.") && !name.starts_with("trusted.overlay."))
}

/// The extended attributes of `path` (not of a link's target) that belong to the image, as
/// PAX record names, in name order.
fn image_xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        // A file system without extended attributes has none to carry.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut out = Vec::new();
    for name in names {
        let Some(name) = name.to_str() else { continue };
        if !image_owned(name) {
            continue;
        }
        if let Some(value) = xattr::get(path, name).map_err(io_err(path))? {
            out.push((format!("SCHILY.xattr.{name}"), value));
        }
    }
    out.sort();
    Ok(out)
}

/// Imports the tree under `root` into `store` as a one-layer linux/amd64 image (see the module
/// documentation). Its blobs are kept like any image's; convert it with
/// [`Store::ensure_converted`].
pub fn import_tree(store: &Store, root: &Path) -> Result<ImportedTree, StoreError> {
    let meta = fs::metadata(root).map_err(io_err(root))?;
    if !meta.is_dir() {
        return Err(StoreError::Image(format!("{} is not a directory", root.display())));
    }
    let work = store.work_dir()?;
    let tmp = work.path().join("layer.tar");
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    let hashing = Hashing { inner: BufWriter::new(file), hasher: Hasher::default() };
    let (entries, mut hashing) = write_layer(root, hashing)?;
    hashing.flush().map_err(io_err(&tmp))?;
    let layer_bytes = hashing.hasher.len();
    let layer = hashing.hasher.finish();
    let file = hashing.inner.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    if store.has_blob(&layer) {
        let _ = fs::remove_file(&tmp);
    } else {
        store.adopt_blob(&layer, &tmp)?;
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [layer.as_str()] },
    });
    // Checked like any image's config on conversion; parsing here catches a mistake early.
    let _: ImageConfig = serde_json::from_value(config.clone())
        .map_err(|e| StoreError::Image(format!("the tree's image config: {e}")))?;
    let config_bytes = serde_json::to_vec(&config).map_err(|e| StoreError::Io(e.to_string()))?;
    let config_digest = Digest::of(&config_bytes);
    store.put_blob(&config_digest, config_bytes.len() as u64, &config_bytes[..], "config")?;
    let descriptor = |media: &str, digest: Digest, size: u64| Descriptor {
        media_type: media.to_owned(),
        digest,
        size,
        platform: None,
        annotations: Default::default(),
    };
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_MANIFEST.to_owned()),
        config: descriptor(MEDIA_CONFIG, config_digest, config_bytes.len() as u64),
        layers: vec![descriptor(MEDIA_LAYER_TAR, layer, layer_bytes)],
    };
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|e| StoreError::Io(e.to_string()))?;
    let manifest_digest = Digest::of(&manifest_bytes);
    store.put_blob(
        &manifest_digest,
        manifest_bytes.len() as u64,
        &manifest_bytes[..],
        "manifest",
    )?;
    Ok(ImportedTree { manifest: manifest_digest, entries, layer_bytes })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn tree(dir: &Path) {
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::write(dir.join("bin/tool"), vec![7u8; 20_000]).unwrap();
        fs::set_permissions(dir.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::hard_link(dir.join("bin/tool"), dir.join("bin/tool2")).unwrap();
        symlink("/etc/passwd", dir.join("bin/escape")).unwrap();
        symlink("../../../../etc/shadow", dir.join("etc/up")).unwrap();
    }

    #[test]
    fn the_same_tree_gives_the_same_manifest_and_converts_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("state")).unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        tree(&a);
        tree(&b);
        let first = import_tree(&store, &a).unwrap();
        let second = import_tree(&store, &b).unwrap();
        assert_eq!(first.manifest, second.manifest);
        assert_eq!(first.entries, 7);
        let limits = crate::Limits::default();
        let (_, _, converted) = store.ensure_converted(&first.manifest, &limits).unwrap();
        assert!(converted);
        let (_, _, converted) = store.ensure_converted(&second.manifest, &limits).unwrap();
        assert!(!converted, "a second container of the same tree converts nothing");
        // A changed byte is another image.
        fs::write(b.join("etc/passwd"), "root:x:0:0::/root:/bin/ash\n").unwrap();
        assert_ne!(import_tree(&store, &b).unwrap().manifest, first.manifest);
    }

    #[test]
    fn links_are_recorded_not_followed_and_hard_links_are_links() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        tree(&root);
        let (_, bytes) = write_layer(&root, Vec::new()).unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            let link = e.link_name().unwrap().map(|l| l.display().to_string());
            seen.push((path, e.header().entry_type(), link, e.header().mode().unwrap()));
        }
        let find = |p: &str| seen.iter().find(|s| s.0.trim_end_matches('/') == p).unwrap();
        assert_eq!(find("bin/escape").1, tar::EntryType::Symlink);
        assert_eq!(find("bin/escape").2.as_deref(), Some("/etc/passwd"));
        assert_eq!(find("etc/up").2.as_deref(), Some("../../../../etc/shadow"));
        assert_eq!(find("bin/tool").3, 0o4755);
        assert_eq!(find("bin/tool2").1, tar::EntryType::Link);
    }

    #[test]
    fn extended_attributes_are_carried_and_host_labels_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        tree(&root);
        // `trusted.*` needs root, as a snapshotter has; `user.*` works for anyone.
        xattr::set(root.join("bin/tool"), "user.origin", b"image").unwrap();
        xattr::set(root.join("etc"), "user.dir", b"d").unwrap();
        // Root may label a file on a host without SELinux too, as a labelled host would.
        xattr::set(root.join("etc/passwd"), "security.selinux", b"system_u:object_r:etc_t:s0")
            .unwrap();
        xattr::set(root.join("etc"), "trusted.overlay.opaque", b"y").unwrap();
        // cap_net_raw+ep, as `setcap` writes it (VFS_CAP_REVISION_2 with the effective flag).
        let mut cap = Vec::new();
        for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
            cap.extend_from_slice(&word.to_le_bytes());
        }
        xattr::set(root.join("bin/tool"), "security.capability", &cap).unwrap();
        // A socket is left out, and its attributes must not land on the entry after it.
        let sock = std::os::unix::net::UnixListener::bind(root.join("bin/sock")).unwrap();
        xattr::set(root.join("bin/sock"), "trusted.stray", b"s").unwrap();
        let (_, bytes) = write_layer(&root, Vec::new()).unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut found = Vec::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            if let Some(pax) = e.pax_extensions().unwrap() {
                for r in pax {
                    let r = r.unwrap();
                    found.push((
                        path.clone(),
                        r.key().unwrap().to_owned(),
                        r.value_bytes().to_vec(),
                    ));
                }
            }
        }
        let want = |p: &str, k: &str, v: &[u8]| {
            found.iter().any(|f| f.0.trim_end_matches('/') == p && f.1 == k && f.2 == v)
        };
        assert!(want("bin/tool", "SCHILY.xattr.user.origin", b"image"), "{found:?}");
        assert!(want("etc", "SCHILY.xattr.user.dir", b"d"), "{found:?}");
        assert!(want("bin/tool", "SCHILY.xattr.security.capability", &cap), "{found:?}");
        assert!(!found.iter().any(|f| f.1.contains("selinux")), "{found:?}");
        assert!(!found.iter().any(|f| f.1.contains("overlay")), "{found:?}");
        assert!(!found.iter().any(|f| f.1.contains("stray")), "{found:?}");
        assert!(!found.iter().any(|f| f.0.contains("sock")), "{found:?}");
        drop(sock);
        // In name order within an entry, so the same tree is the same layer.
        let tool: Vec<_> = found.iter().filter(|f| f.0 == "bin/tool").map(|f| &f.1).collect();
        assert_eq!(tool, ["SCHILY.xattr.security.capability", "SCHILY.xattr.user.origin"]);
        // The flattener reads them back as the file's attributes.
        let path = tmp.path().join("layer.tar");
        fs::write(&path, &bytes).unwrap();
        let layer = crate::flatten::Layer { path, label: "the tree's layer".into() };
        let (t, _) = crate::flatten::index(&[layer], &crate::Limits::default()).unwrap();
        let x = t.xattrs();
        assert!(x.iter().any(|x| x.path.ends_with(b"bin/tool") && x.name == "user.origin"));
    }

    #[test]
    fn a_file_is_not_a_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("state")).unwrap();
        fs::write(tmp.path().join("f"), "x").unwrap();
        let e = import_tree(&store, &tmp.path().join("f")).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }
}
