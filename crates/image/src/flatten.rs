//! Layers → one flat tar stream: the hostile-input boundary of image conversion.
//!
//! Nothing here writes a file on the host. Pass one reads every layer (tar, gzip or zstd, told
//! apart by their magic bytes) into an in-memory tree of what the final root holds, applying
//! OCI whiteouts and opaque directories, and refuses, naming the layer and the entry, anything
//! that could reach outside the image root or blow up: `..` components, absolute names, an entry
//! written through a symlink an earlier entry planted, a hard link to a path that is not a
//! regular file already in the image, device nodes, more bytes or entries than the limits
//! allow. Pass two writes the tree as one tar stream (directories first, parents before
//! children; then symlinks and FIFOs; then file contents in layer order, each inode once with
//! its hard links right after it), which `mke2fs -d -` turns into the cell's root.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tar::{Archive, EntryType, Header};

/// Bounds on what an image may unpack to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of file contents across all layers.
    pub max_bytes: u64,
    /// Total tar entries across all layers (whiteouts included).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_bytes: 8 << 30, max_entries: 1_000_000 }
    }
}

/// One layer blob, already verified against its digest.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Where its bytes are.
    pub path: PathBuf,
    /// How errors name it: "layer 2 of 3 (sha256:abcd…)".
    pub label: String,
}

/// Why an image was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct FlattenError {
    /// The layer, as its label says.
    pub layer: String,
    /// The entry's name as the layer spells it, if the problem is one entry.
    pub entry: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for FlattenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.entry {
            Some(e) => write!(f, "{}, entry {e:?}: {}", self.layer, self.reason),
            None => write!(f, "{}: {}", self.layer, self.reason),
        }
    }
}

impl std::error::Error for FlattenError {}

/// Where a regular file's bytes are: (layer index, entry ordinal in that layer).
type Source = (usize, u64);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    /// A regular file; hard links share one source.
    File {
        source: Source,
        size: u64,
    },
    Symlink(Vec<u8>),
    Fifo,
}

#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
    /// The layer that put it here (whiteouts only hide lower layers).
    layer: usize,
}

/// The final contents of the image root, without file data.
#[derive(Debug, Default)]
pub struct Tree {
    /// Normalised relative path (no leading `/`, no `.` or `..`) → node.
    nodes: BTreeMap<Vec<u8>, Node>,
    /// Bytes of every path ever inserted (bounded by [`MAX_NAME_BYTES`]).
    name_bytes: u64,
    /// Directories made for entries whose parents were missing (they count as entries).
    implicit_dirs: u64,
}

/// What sizing the file system needs to know.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Inodes: directories, distinct files, symlinks, FIFOs.
    pub inodes: u64,
    /// Bytes of distinct regular files.
    pub file_bytes: u64,
    /// 4 KiB blocks the distinct regular files fill.
    pub file_blocks: u64,
    /// Symlinks too long to live in their inode (a block each).
    pub long_symlinks: u64,
    /// Bytes of all names (directory entries).
    pub name_bytes: u64,
    /// Directories.
    pub dirs: u64,
    /// Entries read across all layers.
    pub entries_read: u64,
}

/// Files the run configuration needs from the image (the user database).
#[derive(Debug, Default, Clone)]
pub struct Captured {
    /// `/etc/passwd`, if the image has one as a regular file of at most 1 MiB.
    pub passwd: Option<Vec<u8>>,
    /// `/etc/group`, likewise.
    pub group: Option<Vec<u8>>,
}

/// An extended attribute to set on one path after the file system is made (`mke2fs`'s tar
/// reader does not carry them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xattr {
    /// Path in the image, relative.
    pub path: Vec<u8>,
    /// Attribute name (`security.capability`).
    pub name: String,
    /// Value bytes.
    pub value: Vec<u8>,
}

const MAX_PATH: usize = 4095;
const MAX_COMPONENT: usize = 255;
const MAX_XATTRS_PER_ENTRY: usize = 64;
const MAX_XATTR_VALUE: usize = 64 * 1024;
const CAPTURE_MAX: u64 = 1 << 20;
const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// The most a tar stream may hold between two entries beyond the first entry's data: headers,
/// PAX extensions, long names. The `tar` crate reads those whole into memory, so this bounds
/// what a crafted header can make it allocate.
const HEADER_ALLOWANCE: u64 = 1 << 20;

/// A decompressed layer that may be read only as far as its budget: the budget is set each time
/// an entry is handed out (its data plus [`HEADER_ALLOWANCE`]), so a 100 GiB "long name" is an
/// error after 1 MiB, not an allocation.
struct Budgeted {
    inner: Box<dyn Read>,
    left: std::rc::Rc<std::cell::Cell<u64>>,
}

impl Read for Budgeted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left.get();
        if left == 0 {
            return Err(io::Error::other(
                "a tar header, name or extension is larger than 1 MiB (or an entry is longer than it says)",
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left.set(left - n as u64);
        Ok(n)
    }
}

/// What an entry of `size` bytes may make the stream read until the next entry.
fn allowance(size: u64) -> u64 {
    size.div_ceil(512).saturating_mul(512).saturating_add(HEADER_ALLOWANCE)
}

/// Opens a layer and undoes its compression (gzip or zstd by magic; otherwise plain tar); the
/// stream is read under a budget the caller renews per entry.
fn open_layer(layer: &Layer) -> io::Result<(Budgeted, std::rc::Rc<std::cell::Cell<u64>>)> {
    let mut r = BufReader::with_capacity(256 * 1024, File::open(&layer.path)?);
    let head = r.fill_buf()?;
    let inner: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
    } else {
        Box::new(r)
    };
    let left = std::rc::Rc::new(std::cell::Cell::new(HEADER_ALLOWANCE));
    Ok((Budgeted { inner, left: left.clone() }, left))
}

/// Whether a path can go on a `debugfs` command line between double quotes: UTF-8 with no
/// control characters, quotes or backslashes.
fn debugfs_safe(path: &[u8]) -> bool {
    std::str::from_utf8(path).is_ok()
        && !path.iter().any(|&b| b < 0x20 || b == 0x7f || b == b'"' || b == b'\\')
}

/// The most bytes all paths in the final tree may take (names are kept in memory).
const MAX_NAME_BYTES: u64 = 256 << 20;

/// Splits and checks an entry name: `./a/b` and `a/b/` become `a/b`; `..`, a leading `/`, a
/// NUL byte or an overlong name are refused. The root itself is the empty path.
fn normalise(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.starts_with(b"/") {
        return Err("the name is absolute; layer entries must be relative to the image root".into());
    }
    if raw.contains(&0) {
        return Err("the name contains a NUL byte".into());
    }
    if raw.len() > MAX_PATH {
        return Err(format!("the name is longer than {MAX_PATH} bytes"));
    }
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err("the name has a '..' component, which leaves the image root".into())
            }
            p if p.len() > MAX_COMPONENT => {
                return Err(format!("a name component is longer than {MAX_COMPONENT} bytes"))
            }
            p => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(p);
            }
        }
    }
    Ok(out)
}

fn parent_of(path: &[u8]) -> &[u8] {
    path.iter().rposition(|&b| b == b'/').map_or(&[][..], |i| &path[..i])
}

fn base_of(path: &[u8]) -> &[u8] {
    path.iter().rposition(|&b| b == b'/').map_or(path, |i| &path[i + 1..])
}

fn show(path: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(path))
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Dir => "directory",
        Kind::File { .. } => "regular file",
        Kind::Symlink(_) => "symlink",
        Kind::Fifo => "FIFO",
    }
}

impl Tree {
    /// Removes `path` and everything under it that a layer below `layer` put there.
    fn hide(&mut self, path: &[u8], layer: usize) {
        let mut prefix = path.to_vec();
        prefix.push(b'/');
        let below: Vec<Vec<u8>> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(_, n)| n.layer < layer)
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.nodes.remove(&k);
        }
        if !path.is_empty() && self.nodes.get(path).is_some_and(|n| n.layer < layer) {
            self.nodes.remove(path);
        }
    }

    /// Removes `path` and everything under it, whatever put it there.
    fn remove_all(&mut self, path: &[u8]) {
        let mut prefix = path.to_vec();
        prefix.push(b'/');
        let under: Vec<Vec<u8>> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in under {
            self.nodes.remove(&k);
        }
        self.nodes.remove(path);
    }

    /// Makes sure every ancestor of `path` is a directory, creating missing ones; refuses an
    /// ancestor that is a symlink (writing through it could land anywhere) or a file.
    fn ensure_parents(&mut self, path: &[u8], layer: usize) -> Result<(), String> {
        let mut end = 0;
        while let Some(off) = path[end..].iter().position(|&b| b == b'/') {
            let ancestor = &path[..end + off];
            match self.nodes.get_mut(ancestor) {
                // The directory now also holds this layer's entry: a whiteout or opaque marker
                // later in the same layer hides only what lower layers put there.
                Some(Node { kind: Kind::Dir, layer: l, .. }) => *l = (*l).max(layer),
                Some(Node { kind: Kind::Symlink(target), .. }) => {
                    return Err(format!(
                        "it would be written through {}, a symlink (to {:?}) an earlier entry \
                         made; an image may not write through links",
                        show(ancestor),
                        String::from_utf8_lossy(target)
                    ))
                }
                Some(n) => {
                    return Err(format!(
                        "its parent {} is a {}, not a directory",
                        show(ancestor),
                        kind_name(&n.kind)
                    ))
                }
                None => {
                    self.name_bytes += ancestor.len() as u64;
                    self.implicit_dirs += 1;
                    self.nodes.insert(
                        ancestor.to_vec(),
                        Node {
                            kind: Kind::Dir,
                            mode: 0o755,
                            uid: 0,
                            gid: 0,
                            mtime: 0,
                            xattrs: Vec::new(),
                            layer,
                        },
                    );
                }
            }
            end += off + 1;
        }
        Ok(())
    }

    /// Statistics for sizing the file system.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        let mut seen = std::collections::HashSet::new();
        for (path, n) in &self.nodes {
            s.name_bytes += base_of(path).len() as u64 + 8;
            match &n.kind {
                Kind::File { source, size } => {
                    if seen.insert(*source) {
                        s.inodes += 1;
                        s.file_bytes += size;
                        s.file_blocks += size.div_ceil(4096);
                    }
                }
                Kind::Symlink(t) if t.len() > 59 => {
                    s.inodes += 1;
                    s.long_symlinks += 1;
                }
                Kind::Dir => {
                    s.inodes += 1;
                    s.dirs += 1;
                }
                _ => s.inodes += 1,
            }
        }
        s
    }

    /// Extended attributes to apply after the file system is made, in path order.
    pub fn xattrs(&self) -> Vec<Xattr> {
        let mut out = Vec::new();
        for (path, n) in &self.nodes {
            for (name, value) in &n.xattrs {
                out.push(Xattr { path: path.clone(), name: name.clone(), value: value.clone() });
            }
        }
        out
    }

    /// Number of paths in the final root.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True for an empty root.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// An xattr name we can carry: printable, no quoting needed, a known namespace.
fn xattr_name_ok(name: &str) -> bool {
    let known = ["user.", "security.", "trusted."].iter().any(|p| name.starts_with(p));
    known
        && name.len() <= 255
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Pass one: reads every layer in order into the final tree.
pub fn index(layers: &[Layer], limits: &Limits) -> Result<(Tree, Stats), FlattenError> {
    let mut tree = Tree::default();
    let mut entries_read: u64 = 0;
    let mut bytes: u64 = 0;
    for (li, layer) in layers.iter().enumerate() {
        let fail = |entry: Option<String>, reason: String| FlattenError {
            layer: layer.label.clone(),
            entry,
            reason,
        };
        let (input, budget) =
            open_layer(layer).map_err(|e| fail(None, format!("cannot read it: {e}")))?;
        let mut archive = Archive::new(input);
        let entries =
            archive.entries().map_err(|e| fail(None, format!("not a tar stream: {e}")))?;
        // Whiteouts and opaque markers already applied in this layer: a repeat changes nothing
        // and would cost another scan of the subtree.
        let mut applied: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        for (ordinal, entry) in entries.enumerate() {
            let mut entry = entry
                .map_err(|e| fail(None, format!("bad tar data after {ordinal} entries: {e}")))?;
            budget.set(allowance(entry.size()));
            entries_read += 1;
            if entries_read + tree.implicit_dirs > limits.max_entries {
                return Err(fail(
                    None,
                    format!(
                        "the image has more than {} entries (the limit; raise it with \
                         --max-image-entries if this image is trusted)",
                        limits.max_entries
                    ),
                ));
            }
            let etype = entry.header().entry_type();
            if matches!(etype, EntryType::XGlobalHeader | EntryType::XHeader) {
                continue;
            }
            let raw = entry.path_bytes().into_owned();
            let name = String::from_utf8_lossy(&raw).into_owned();
            let refuse = |reason: String| fail(Some(name.clone()), reason);
            let path = normalise(&raw).map_err(refuse)?;
            let header = entry.header();
            let mode = header.mode().map_err(|e| refuse(format!("bad mode: {e}")))? & 0o7777;
            let uid = header.uid().map_err(|e| refuse(format!("bad uid: {e}")))?;
            let gid = header.gid().map_err(|e| refuse(format!("bad gid: {e}")))?;
            let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
                return Err(refuse(format!("owner {uid}:{gid} does not fit in 32 bits")));
            };
            let mtime = header.mtime().unwrap_or(0);
            let size = entry.size();
            // Every entry's data counts, whatever its type says it is.
            bytes = bytes.saturating_add(size);
            if bytes > limits.max_bytes {
                return Err(refuse(format!(
                    "the image unpacks to more than {} bytes (the limit; raise it with \
                     --max-image-bytes if this image is trusted)",
                    limits.max_bytes
                )));
            }
            tree.name_bytes += path.len() as u64;
            if tree.name_bytes > MAX_NAME_BYTES {
                return Err(refuse(format!(
                    "the image's file names take more than {MAX_NAME_BYTES} bytes"
                )));
            }

            // Whiteouts hide what lower layers put there and are not part of the image.
            let base = base_of(&path);
            if base == OPAQUE {
                if !applied.insert(path.clone()) {
                    continue;
                }
                let dir = parent_of(&path).to_vec();
                tree.ensure_parents(&path, li).map_err(refuse)?;
                tree.hide_children(&dir, li);
                continue;
            }
            if let Some(hidden) = base.strip_prefix(WHITEOUT) {
                if !applied.insert(path.clone()) {
                    continue;
                }
                if hidden.is_empty() || hidden == b"." || hidden == b".." {
                    return Err(refuse(format!(
                        "a whiteout of {:?} would hide the directory itself or its parent",
                        String::from_utf8_lossy(hidden)
                    )));
                }
                let mut target = parent_of(&path).to_vec();
                if !target.is_empty() {
                    target.push(b'/');
                }
                target.extend_from_slice(hidden);
                tree.ensure_parents(&target, li).map_err(refuse)?;
                tree.hide(&target, li);
                continue;
            }
            if path.is_empty() {
                // The root directory's own entry ("./"): nothing to place.
                continue;
            }
            tree.ensure_parents(&path, li).map_err(refuse)?;

            let mut xattrs = Vec::new();
            if let Ok(Some(pax)) = entry.pax_extensions() {
                for ext in pax {
                    let ext = ext.map_err(|e| refuse(format!("bad PAX header: {e}")))?;
                    let Ok(key) = ext.key() else { continue };
                    let Some(xname) = key.strip_prefix("SCHILY.xattr.") else { continue };
                    if !xattr_name_ok(xname) {
                        return Err(refuse(format!(
                            "extended attribute {xname:?} is not one a cell image can carry \
                             (user., security. or trusted., letters, digits, '.', '_', '-')"
                        )));
                    }
                    if ext.value_bytes().len() > MAX_XATTR_VALUE
                        || xattrs.len() >= MAX_XATTRS_PER_ENTRY
                    {
                        return Err(refuse("too many or too large extended attributes".into()));
                    }
                    bytes = bytes.saturating_add(ext.value_bytes().len() as u64);
                    xattrs.push((xname.to_owned(), ext.value_bytes().to_vec()));
                }
            }
            if !xattrs.is_empty() && !debugfs_safe(&path) {
                return Err(refuse(
                    "an entry with extended attributes has quotes, backslashes or control \
                     characters in its name"
                        .into(),
                ));
            }

            let kind = match etype {
                EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                    Kind::File { source: (li, ordinal as u64), size }
                }
                EntryType::Directory => Kind::Dir,
                EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| refuse("a symlink without a target".into()))?
                        .into_owned();
                    if target.is_empty() || target.contains(&0) || target.len() > MAX_PATH {
                        return Err(refuse("the symlink's target is empty or malformed".into()));
                    }
                    Kind::Symlink(target)
                }
                EntryType::Link => {
                    let raw_target = entry
                        .link_name_bytes()
                        .ok_or_else(|| refuse("a hard link without a target".into()))?
                        .into_owned();
                    let target = normalise(&raw_target).map_err(|r| {
                        refuse(format!(
                            "hard link to {:?}: {r}",
                            String::from_utf8_lossy(&raw_target)
                        ))
                    })?;
                    match tree.nodes.get(&target) {
                        Some(n @ Node { kind: Kind::File { .. }, .. }) => {
                            // A hard link is another name for the same inode: same bytes, same
                            // owner and mode.
                            let mut linked = n.clone();
                            linked.layer = li;
                            if !linked.xattrs.is_empty() && !debugfs_safe(&path) {
                                return Err(refuse(
                                    "a hard link to a file with extended attributes has quotes, \
                                     backslashes or control characters in its name"
                                        .into(),
                                ));
                            }
                            if tree.nodes.get(&path).is_some_and(|e| e.kind == Kind::Dir) {
                                tree.remove_all(&path);
                            }
                            tree.nodes.insert(path, linked);
                            continue;
                        }
                        Some(n) => {
                            return Err(refuse(format!(
                                "hard link to {}, which is a {}; only regular files may be \
                                 hard-linked",
                                show(&target),
                                kind_name(&n.kind)
                            )))
                        }
                        None => {
                            return Err(refuse(format!(
                                "hard link to {}, which is not in the image at that point",
                                show(&target)
                            )))
                        }
                    }
                }
                EntryType::Fifo => Kind::Fifo,
                EntryType::Char | EntryType::Block => {
                    return Err(refuse(
                        "a device node; cell images may not carry devices (the cell's /dev is \
                         its own)"
                            .into(),
                    ))
                }
                other => return Err(refuse(format!("unsupported tar entry type {other:?}"))),
            };

            let node = Node { kind, mode, uid, gid, mtime, xattrs, layer: li };
            match tree.nodes.get(&path) {
                // A directory over a directory keeps what is inside it.
                Some(Node { kind: Kind::Dir, .. }) if node.kind == Kind::Dir => {}
                Some(_) => tree.remove_all(&path),
                None => {}
            }
            tree.nodes.insert(path, node);
        }
    }
    let mut stats = tree.stats();
    stats.entries_read = entries_read;
    Ok((tree, stats))
}

impl Tree {
    /// An opaque directory: hides everything lower layers put under `dir`.
    fn hide_children(&mut self, dir: &[u8], layer: usize) {
        let mut prefix = dir.to_vec();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        let below: Vec<Vec<u8>> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, n)| n.layer < layer && k.as_slice() != dir)
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.nodes.remove(&k);
        }
    }
}

fn header_for(kind: EntryType, node: &Node, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(node.mode);
    h.set_uid(u64::from(node.uid));
    h.set_gid(u64::from(node.gid));
    h.set_mtime(node.mtime);
    h.set_size(size);
    h
}

fn os(path: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(path))
}

/// Pass two: writes `tree` as one tar stream to `out`, reading file contents from `layers`
/// (the same verified blobs pass one read). Returns the user database files it saw.
pub fn write_tar(tree: &Tree, layers: &[Layer], out: impl Write) -> Result<Captured, FlattenError> {
    let mut builder = tar::Builder::new(out);
    let io_fail = |what: &str, e: io::Error| FlattenError {
        layer: "the flattened image".into(),
        entry: None,
        reason: format!("{what}: {e}"),
    };
    // Directories, parents before children (a prefix sorts before its extensions).
    for (path, node) in &tree.nodes {
        if node.kind == Kind::Dir {
            let mut h = header_for(EntryType::Directory, node, 0);
            builder
                .append_data(&mut h, os(path), io::empty())
                .map_err(|e| io_fail("writing a directory", e))?;
        }
    }
    for (path, node) in &tree.nodes {
        match &node.kind {
            Kind::Symlink(target) => {
                let mut h = header_for(EntryType::Symlink, node, 0);
                builder
                    .append_link(&mut h, os(path), os(target))
                    .map_err(|e| io_fail("writing a symlink", e))?;
            }
            Kind::Fifo => {
                let mut h = header_for(EntryType::Fifo, node, 0);
                builder
                    .append_data(&mut h, os(path), io::empty())
                    .map_err(|e| io_fail("writing a FIFO", e))?;
            }
            _ => {}
        }
    }
    // Each distinct file once, in layer order, its other names right after it.
    let mut wanted: HashMap<Source, Vec<&Vec<u8>>> = HashMap::new();
    for (path, node) in &tree.nodes {
        if let Kind::File { source, .. } = node.kind {
            wanted.entry(source).or_default().push(path);
        }
    }
    let mut captured = Captured::default();
    for (li, layer) in layers.iter().enumerate() {
        let mut left = wanted.keys().filter(|(l, _)| *l == li).count();
        if left == 0 {
            continue;
        }
        let fail =
            |reason: String| FlattenError { layer: layer.label.clone(), entry: None, reason };
        let (input, budget) =
            open_layer(layer).map_err(|e| fail(format!("cannot read it again: {e}")))?;
        let mut archive = Archive::new(input);
        let entries = archive.entries().map_err(|e| fail(format!("not a tar stream: {e}")))?;
        for (ordinal, entry) in entries.enumerate() {
            let Some(names) = wanted.get(&(li, ordinal as u64)) else {
                // Still read through it: the stream has to be consumed in order.
                let entry = entry.map_err(|e| fail(format!("changed since it was read: {e}")))?;
                budget.set(allowance(entry.size()));
                continue;
            };
            let mut entry = entry.map_err(|e| fail(format!("changed since it was read: {e}")))?;
            budget.set(allowance(entry.size()));
            let first = names[0];
            let node = &tree.nodes[first];
            let Kind::File { size, .. } = node.kind else { continue };
            if entry.size() != size {
                return Err(fail("changed since it was read".into()));
            }
            let is_db = |n: &&&Vec<u8>| matches!(n.as_slice(), b"etc/passwd" | b"etc/group");
            let capture = names.iter().any(|n| is_db(&n)) && size <= CAPTURE_MAX;
            let mut h = header_for(EntryType::Regular, node, size);
            if capture {
                let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
                entry.read_to_end(&mut buf).map_err(|e| fail(format!("reading: {e}")))?;
                builder
                    .append_data(&mut h, os(first), &buf[..])
                    .map_err(|e| io_fail("writing a file", e))?;
                for n in names.iter().filter(|n| is_db(n)) {
                    if n.as_slice() == b"etc/passwd" {
                        captured.passwd = Some(buf.clone());
                    } else {
                        captured.group = Some(buf.clone());
                    }
                }
            } else {
                builder
                    .append_data(&mut h, os(first), &mut entry)
                    .map_err(|e| io_fail("writing a file", e))?;
            }
            for other in &names[1..] {
                let mut h = header_for(EntryType::Link, &tree.nodes[*other], 0);
                builder
                    .append_link(&mut h, os(other), os(first))
                    .map_err(|e| io_fail("writing a hard link", e))?;
            }
            left -= 1;
            if left == 0 {
                break;
            }
        }
        if left != 0 {
            return Err(fail("changed since it was read (entries missing)".into()));
        }
    }
    builder.into_inner().map_err(|e| io_fail("finishing the stream", e))?;
    Ok(captured)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One raw tar entry, with the name written byte for byte (the `tar` crate's own builder
    /// refuses the hostile names these tests need).
    pub struct E<'a> {
        pub name: &'a str,
        pub kind: EntryType,
        pub link: &'a str,
        pub data: &'a [u8],
        pub mode: u32,
        pub size: Option<u64>,
    }

    pub fn file<'a>(name: &'a str, data: &'a [u8]) -> E<'a> {
        E { name, kind: EntryType::Regular, link: "", data, mode: 0o644, size: None }
    }
    pub fn dir(name: &str) -> E<'_> {
        E { name, kind: EntryType::Directory, link: "", data: b"", mode: 0o755, size: None }
    }
    pub fn link<'a>(name: &'a str, kind: EntryType, to: &'a str) -> E<'a> {
        E { name, kind, link: to, data: b"", mode: 0o777, size: None }
    }

    pub fn tar_bytes(entries: &[E]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in entries {
            let mut h = Header::new_gnu();
            h.set_entry_type(e.kind);
            h.set_mode(e.mode);
            h.set_size(e.size.unwrap_or(e.data.len() as u64));
            h.set_mtime(1);
            h.set_uid(0);
            h.set_gid(0);
            let bytes = h.as_mut_bytes();
            bytes[..e.name.len()].copy_from_slice(e.name.as_bytes());
            bytes[157..157 + e.link.len()].copy_from_slice(e.link.as_bytes());
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(e.data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    pub fn layers(dir: &Path, each: &[Vec<E>]) -> Vec<Layer> {
        each.iter()
            .enumerate()
            .map(|(i, entries)| {
                let path = dir.join(format!("layer{i}"));
                let raw = tar_bytes(entries);
                // Every other layer gzip-compressed, to cover both readers.
                let bytes = if i % 2 == 1 {
                    let mut gz =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    gz.write_all(&raw).expect("gzip");
                    gz.finish().expect("gzip")
                } else {
                    raw
                };
                std::fs::write(&path, bytes).expect("write layer");
                Layer { path, label: format!("layer {} of {}", i + 1, each.len()) }
            })
            .collect()
    }

    fn flatten(each: &[Vec<E>]) -> Result<(Vec<(String, String)>, Captured), FlattenError> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ls = layers(tmp.path(), each);
        let (tree, _) = index(&ls, &Limits::default())?;
        let mut out = Vec::new();
        let captured = write_tar(&tree, &ls, &mut out)?;
        let mut listing = Vec::new();
        let mut archive = Archive::new(&out[..]);
        for e in archive.entries().expect("entries") {
            let mut e = e.expect("entry");
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let what = match e.header().entry_type() {
                EntryType::Directory => "dir".to_owned(),
                EntryType::Symlink | EntryType::Link => format!(
                    "{:?}->{}",
                    e.header().entry_type(),
                    String::from_utf8_lossy(&e.link_name_bytes().unwrap_or_default())
                ),
                _ => {
                    let mut s = String::new();
                    e.read_to_string(&mut s).expect("read");
                    s
                }
            };
            listing.push((name, what));
        }
        Ok((listing, captured))
    }

    fn refused(each: &[Vec<E>]) -> FlattenError {
        match flatten(each) {
            Ok(l) => panic!("accepted: {l:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn applies_layers_whiteouts_opaque_dirs_and_hard_links() {
        let (listing, captured) = flatten(&[
            vec![
                dir("./"),
                dir("./etc/"),
                file("./etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
                file("./etc/gone", b"x"),
                dir("./opaque/"),
                file("./opaque/old", b"x"),
                file("./bin/tool", b"v1"),
                link("./bin/alias", EntryType::Link, "bin/tool"),
                link("./lib", EntryType::Symlink, "usr/lib"),
            ],
            vec![
                file("etc/.wh.gone", b""),
                file("opaque/.wh..wh..opq", b""),
                file("opaque/new", b"n"),
                // Replacing the file does not change what the old hard link holds.
                file("bin/tool", b"v2"),
            ],
        ])
        .expect("flatten");
        let names: Vec<&str> = listing.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "etc", "opaque", "lib", "etc/passwd", "bin/alias", "opaque/new", "bin/tool"]
        );
        let get = |n: &str| listing.iter().find(|(p, _)| p == n).map(|(_, w)| w.as_str());
        assert_eq!(get("bin/alias"), Some("v1"));
        assert_eq!(get("bin/tool"), Some("v2"));
        assert_eq!(get("lib"), Some("Symlink->usr/lib"));
        assert!(captured.passwd.is_some_and(|p| p.starts_with(b"root:")));
    }

    #[test]
    fn hard_links_come_right_after_their_file() {
        let (listing, _) = flatten(&[vec![
            file("a", b"same"),
            link("b", EntryType::Link, "a"),
            link("c", EntryType::Link, "./a"),
        ]])
        .expect("flatten");
        assert_eq!(
            listing,
            [
                ("a".to_owned(), "same".to_owned()),
                ("b".to_owned(), "Link->a".to_owned()),
                ("c".to_owned(), "Link->a".to_owned())
            ]
        );
    }

    #[test]
    fn refuses_every_way_out_of_the_root() {
        let cases: Vec<(Vec<Vec<E>>, &str, &str)> = vec![
            (vec![vec![file("../escape", b"x")]], "../escape", "'..'"),
            (vec![vec![file("a/../../escape", b"x")]], "a/../../escape", "'..'"),
            (vec![vec![file("/etc/passwd", b"x")]], "/etc/passwd", "absolute"),
            (
                vec![vec![link("etc", EntryType::Symlink, "/host/etc"), file("etc/passwd", b"x")]],
                "etc/passwd",
                "symlink",
            ),
            (
                vec![vec![link("d", EntryType::Symlink, "..")], vec![file("d/x", b"x")]],
                "d/x",
                "symlink",
            ),
            (vec![vec![link("h", EntryType::Link, "../../etc/shadow")]], "h", "'..'"),
            (vec![vec![link("h", EntryType::Link, "/etc/shadow")]], "h", "absolute"),
            (vec![vec![link("h", EntryType::Link, "nowhere")]], "h", "not in the image"),
            (
                vec![vec![link("s", EntryType::Symlink, "/etc"), link("h", EntryType::Link, "s")]],
                "h",
                "only regular files",
            ),
            (vec![vec![file(".wh...", b"")]], ".wh...", "parent"),
            (vec![vec![file("a/.wh...", b"")]], "a/.wh...", "parent"),
            (
                vec![vec![E {
                    name: "dev/sda",
                    kind: EntryType::Block,
                    link: "",
                    data: b"",
                    mode: 0o600,
                    size: None,
                }]],
                "dev/sda",
                "device node",
            ),
            (
                vec![vec![E {
                    name: "null",
                    kind: EntryType::Char,
                    link: "",
                    data: b"",
                    mode: 0o666,
                    size: None,
                }]],
                "null",
                "device node",
            ),
            (vec![vec![file("f", b"x"), file("f/inside", b"y")]], "f/inside", "not a directory"),
        ];
        for (each, entry, why) in cases {
            let e = refused(&each);
            assert_eq!(e.entry.as_deref(), Some(entry), "{e}");
            assert!(e.reason.contains(why), "{entry}: {e}");
            assert!(e.layer.starts_with("layer "), "{e}");
        }
    }

    #[test]
    fn bounds_bytes_and_entries_before_reading_them() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // A 10 GiB file that is not there: the header alone is refused.
        let bomb = layers(
            tmp.path(),
            &[vec![E {
                name: "bomb",
                kind: EntryType::Regular,
                link: "",
                data: b"",
                mode: 0o644,
                size: Some(10 << 30),
            }]],
        );
        let e = index(&bomb, &Limits::default()).expect_err("bomb accepted");
        assert!(e.reason.contains("more than 8589934592 bytes"), "{e}");
        let many: Vec<E> = (0..20).map(|_| dir("d")).collect();
        let many = layers(tmp.path(), &[many]);
        let e = index(&many, &Limits { max_bytes: 1 << 20, max_entries: 10 }).expect_err("many");
        assert!(e.reason.contains("more than 10 entries"), "{e}");
    }

    #[test]
    fn names_that_could_break_out_of_debugfs_quoting_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_pax_extensions([("SCHILY.xattr.user.x", &b"1"[..])]).expect("pax");
        b.append_data(&mut h, "a", &b"a"[..]).expect("append");
        let mut raw = b.into_inner().expect("tar");
        raw.truncate(raw.len() - 1024);
        raw.extend(tar_bytes(&[link("x\" user.x\ndump /a /tmp/owned\n#", EntryType::Link, "a")]));
        let path = tmp.path().join("layer");
        std::fs::write(&path, raw).expect("write");
        let e = index(&[Layer { path, label: "layer 1 of 1".into() }], &Limits::default())
            .expect_err("a debugfs command in a name was accepted");
        assert!(e.reason.contains("quotes, backslashes or control characters"), "{e}");
    }

    #[test]
    fn a_huge_long_name_is_an_error_before_it_is_read_into_memory() {
        let zeros = vec![0u8; 4 << 20];
        let e = refused(&[vec![
            E {
                name: "././@LongLink",
                kind: EntryType::GNULongName,
                link: "",
                data: &zeros,
                mode: 0o644,
                size: None,
            },
            file("x", b"x"),
        ]]);
        assert!(e.reason.contains("larger than 1 MiB"), "{e}");
    }

    #[test]
    fn a_whiteout_keeps_what_its_own_layer_put_there() {
        let (listing, _) = flatten(&[
            vec![dir("x"), file("x/old", b"o")],
            vec![
                file("x/new", b"n"),
                file(".wh.x", b""),
                file("x/.wh..wh..opq", b""),
                file("x/.wh..wh..opq", b""),
            ],
        ])
        .expect("flatten");
        let names: Vec<&str> = listing.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x", "x/new"]);
    }

    #[test]
    fn a_corrupt_layer_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("junk");
        std::fs::write(&path, [0x1f, 0x8b, 0x08, 0, 1, 2, 3]).expect("write");
        let e = index(&[Layer { path, label: "layer 1 of 1".into() }], &Limits::default())
            .expect_err("junk accepted");
        assert_eq!(e.layer, "layer 1 of 1");
    }
}
