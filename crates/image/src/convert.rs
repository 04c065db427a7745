//! Flattened layers → the block image a cell boots: a read-only ext4 file system made by
//! `mke2fs -d -` straight from the tar stream (no unpacked tree on the host, no root needed),
//! extended attributes applied with `debugfs`, and a dm-verity hash tree appended by
//! `veritysetup format`, so the guest kernel checks every block it reads against the root hash
//! on the measured kernel command line.
//!
//! Reproducible: the same layers and manifest digest give the same bytes on any host. The file
//! system UUID, directory hash seed and verity salt are derived from the manifest digest, every
//! timestamp mke2fs invents is 0 (`E2FSPROGS_FAKE_TIME`, `SOURCE_DATE_EPOCH`), and the stream
//! order is fixed by [`crate::flatten`].

use std::fs::{self, File};
use std::io::{BufWriter, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::flatten::{self, Captured, Layer, Limits, Stats};

/// Block size of the file system and of the verity tree.
pub const BLOCK: u64 = 4096;

/// The dm-verity parameters of a converted image (format 1, no superblock, hash tree right after
/// the data in the same file).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verity {
    /// Root hash (hex), which the measured kernel command line carries.
    pub root_hash: String,
    /// Salt (hex), derived from the manifest digest.
    pub salt: String,
    /// 4 KiB data blocks (the file system).
    pub data_blocks: u64,
    /// The first hash block, in 4 KiB blocks from the start of the device.
    pub hash_start_block: u64,
}

impl Verity {
    /// The `dm-mod.create=` value that makes the guest kernel create `/dev/dm-0`, a read-only
    /// verity device over `device` (quoted: the table has spaces).
    pub fn dm_create(&self, device: &str) -> String {
        let sectors = self.data_blocks * (BLOCK / 512);
        format!(
            "dm-mod.create=\"isocell-root,,,ro,0 {sectors} verity 1 {device} {device} {BLOCK} \
             {BLOCK} {} {} sha256 {} {}\"",
            self.data_blocks, self.hash_start_block, self.root_hash, self.salt
        )
    }
}

/// What conversion made.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Converted {
    /// sha256 of the whole block image file (file system and hash tree), as booted.
    pub block_digest: Digest,
    /// Size of that file.
    pub block_bytes: u64,
    /// The verity parameters.
    pub verity: Verity,
}

/// Why conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The layers were refused.
    #[error("the image was refused: {0}")]
    Refused(#[from] flatten::FlattenError),
    /// A tool failed or is missing.
    #[error("{0}")]
    Tool(String),
    /// Host I/O.
    #[error("{0}")]
    Io(String),
}

fn derived(label: &str, manifest: &Digest) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(label.as_bytes());
    h.update(manifest.as_str().as_bytes());
    h.finalize().into()
}

/// A UUID string from 16 derived bytes (version 4 layout bits, so tools accept it).
fn uuid_for(manifest: &Digest) -> String {
    let mut b = derived("isocell-fs-uuid:", manifest);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(&b[..16]);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// File system size for what the tree holds: data and directory blocks, inode tables, group
/// metadata and slack, rounded up to 1 MiB. `grow` > 1 after a too-small attempt.
fn fs_bytes(stats: &Stats, inodes: u64, grow: f64) -> u64 {
    let blocks = stats.file_blocks + stats.dirs + stats.long_symlinks + stats.name_bytes / BLOCK;
    let data = blocks * BLOCK;
    let tables = inodes * 256;
    let estimate = data as f64 * 1.03 + tables as f64 + (6 << 20) as f64;
    let bytes = (estimate * grow) as u64;
    bytes.div_ceil(1 << 20) * (1 << 20)
}

/// `mke2fs`'s configuration, ours rather than the host's `/etc/mke2fs.conf`, so the same image
/// gets the same file system features (and bytes) on every host: ext4 with extents, checksums and
/// extended attributes; no journal, since the image is never written in the cell.
const MKE2FS_CONF: &str = "[defaults]
\tbase_features = sparse_super,large_file,filetype,dir_index,ext_attr
\tdefault_mntopts = user_xattr
\tblocksize = 4096
\tinode_size = 256
[fs_types]
\text4 = {
\t\tfeatures = extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

/// Runs `mke2fs` reading the flattened stream on its standard input.
fn make_fs(
    tree: &flatten::Tree,
    layers: &[Layer],
    manifest: &Digest,
    inodes: u64,
    bytes: u64,
    out: &Path,
    scratch: &Path,
) -> Result<Result<Captured, String>, ConvertError> {
    let uuid = uuid_for(manifest);
    let conf = scratch.join("mke2fs.conf");
    fs::write(&conf, MKE2FS_CONF)
        .map_err(|e| ConvertError::Io(format!("writing {}: {e}", conf.display())))?;
    let _ = fs::remove_file(out);
    let mut child = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0"])
        .args(["-O", "^has_journal,^resize_inode", "-L", "isocell-image", "-U", &uuid])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-E")
        .arg(format!("hash_seed={uuid},root_owner=0:0,lazy_itable_init=0,nodiscard"))
        .args(["-d", "-"])
        .arg(out)
        .arg(format!("{}k", bytes / 1024))
        .env("E2FSPROGS_FAKE_TIME", "0")
        .env("SOURCE_DATE_EPOCH", "0")
        .env("MKE2FS_CONFIG", &conf)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            ConvertError::Tool(format!(
                "cannot run mke2fs ({e}); install e2fsprogs 1.47.1 or later with libarchive13 \
                 (scripts/install-deps.sh)"
            ))
        })?;
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.take(64 * 1024).read_to_string(&mut s);
        }
        s
    });
    let written = match child.stdin.take() {
        Some(stdin) => flatten::write_tar(tree, layers, BufWriter::with_capacity(1 << 20, stdin)),
        None => return Err(ConvertError::Tool("mke2fs has no standard input".into())),
    };
    let status = child.wait().map_err(|e| ConvertError::Tool(format!("mke2fs: {e}")))?;
    let message = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(Ok(written?));
    }
    if message.contains("libarchive") {
        return Err(ConvertError::Tool(format!(
            "mke2fs cannot read tar streams here: {}; install libarchive13 and e2fsprogs 1.47.1 \
             or later (scripts/install-deps.sh)",
            message.trim()
        )));
    }
    // A stream cut short because mke2fs stopped reading is mke2fs's failure, not the image's.
    match written {
        Err(e) if !e.reason.contains("Broken pipe") && !e.reason.contains("writing") => {
            Err(e.into())
        }
        _ => Ok(Err(message.trim().to_owned())),
    }
}

/// Applies the extended attributes `mke2fs` could not (names were checked by the flattener:
/// no quotes, backslashes or control characters).
fn apply_xattrs(tree: &flatten::Tree, out: &Path, scratch: &Path) -> Result<(), ConvertError> {
    let xattrs = tree.xattrs();
    if xattrs.is_empty() {
        return Ok(());
    }
    let io = |e: std::io::Error| ConvertError::Io(format!("writing xattr commands: {e}"));
    let mut script = String::new();
    let quotable = |s: &str| !s.chars().any(|c| c.is_control() || c == '"' || c == '\\');
    let scratch_text = scratch.to_str().filter(|s| quotable(s)).ok_or_else(|| {
        ConvertError::Io(format!(
            "the work directory {} cannot be quoted for debugfs",
            scratch.display()
        ))
    })?;
    for (i, x) in xattrs.iter().enumerate() {
        // The flattener refused names debugfs could not take; checked again here, since a
        // name that broke out of its quotes would be a debugfs command run on this host.
        let path = std::str::from_utf8(&x.path).ok().filter(|p| quotable(p)).ok_or_else(|| {
            ConvertError::Io(format!(
                "{:?} cannot carry extended attributes",
                String::from_utf8_lossy(&x.path)
            ))
        })?;
        let value = scratch.join(format!("xattr-{i}"));
        fs::write(&value, &x.value).map_err(io)?;
        script
            .push_str(&format!("ea_set -f \"{scratch_text}/xattr-{i}\" \"/{path}\" {}\n", x.name));
    }
    let commands = scratch.join("xattrs.debugfs");
    fs::write(&commands, script).map_err(io)?;
    let output = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&commands)
        .arg(out)
        .env("E2FSPROGS_FAKE_TIME", "0")
        .env("SOURCE_DATE_EPOCH", "0")
        .output()
        .map_err(|e| ConvertError::Tool(format!("cannot run debugfs: {e}")))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let problems: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("debugfs ")).collect();
    if !output.status.success() || !problems.is_empty() {
        return Err(ConvertError::Tool(format!(
            "debugfs could not set extended attributes: {}",
            problems.join("; ")
        )));
    }
    Ok(())
}

/// Appends the verity hash tree after the file system and returns its parameters.
fn add_verity(out: &Path, manifest: &Digest, data_bytes: u64) -> Result<Verity, ConvertError> {
    let salt = hex::encode(derived("isocell-verity-salt:", manifest));
    let output = Command::new("veritysetup")
        .args(["format", "--no-superblock", "--hash=sha256"])
        .args(["--data-block-size=4096", "--hash-block-size=4096"])
        .arg(format!("--salt={salt}"))
        .arg(format!("--data-blocks={}", data_bytes / BLOCK))
        .arg(format!("--hash-offset={data_bytes}"))
        .arg(out)
        .arg(out)
        .output()
        .map_err(|e| {
            ConvertError::Tool(format!(
                "cannot run veritysetup ({e}); install cryptsetup-bin (scripts/install-deps.sh)"
            ))
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(ConvertError::Tool(format!(
            "veritysetup format failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let root_hash = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_owned())
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| ConvertError::Tool(format!("veritysetup printed no root hash: {stdout}")))?;
    Ok(Verity {
        root_hash,
        salt,
        data_blocks: data_bytes / BLOCK,
        hash_start_block: data_bytes / BLOCK,
    })
}

/// sha256 of a file.
pub fn file_digest(path: &Path) -> Result<(Digest, u64), std::io::Error> {
    let mut f = File::open(path)?;
    let mut h = crate::digest::Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let len = h.len();
    Ok((h.finish(), len))
}

/// Converts verified layers into a block image at `out`. `scratch` is an empty directory for
/// temporary files. Returns what was made, the image's user database files and the size of
/// its root.
pub fn convert(
    layers: &[Layer],
    manifest: &Digest,
    limits: &Limits,
    out: &Path,
    scratch: &Path,
) -> Result<(Converted, Captured, Stats), ConvertError> {
    let (tree, stats) = flatten::index(layers, limits)?;
    let inodes = (stats.inodes + 64).div_ceil(64) * 64;
    let mut grow = 1.0;
    let mut attempts = 0;
    let (captured, data_bytes) = loop {
        let bytes = fs_bytes(&stats, inodes, grow);
        match make_fs(&tree, layers, manifest, inodes, bytes, out, scratch)? {
            Ok(c) => break (c, bytes),
            Err(message)
                if attempts < 2 && (message.contains("llocat") || message.contains("space")) =>
            {
                attempts += 1;
                grow *= 1.5;
            }
            Err(message) => {
                let _ = fs::remove_file(out);
                return Err(ConvertError::Tool(format!("mke2fs failed: {message}")));
            }
        }
    };
    apply_xattrs(&tree, out, scratch)?;
    let verity = add_verity(out, manifest, data_bytes)?;
    let (block_digest, block_bytes) = file_digest(out)
        .map_err(|e| ConvertError::Io(format!("reading {}: {e}", out.display())))?;
    Ok((Converted { block_digest, block_bytes, verity }, captured, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flatten::tests::{dir, file, layers};

    #[test]
    fn the_same_image_converts_to_the_same_bytes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ls = layers(
            tmp.path(),
            &[
                vec![dir("etc"), file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")],
                vec![file("bin/hello", &[7u8; 10_000])],
            ],
        );
        let manifest = Digest::of(b"manifest");
        let mut seen = Vec::new();
        for i in 0..2 {
            let out = tmp.path().join(format!("img{i}"));
            let scratch = tmp.path().join(format!("scratch{i}"));
            fs::create_dir(&scratch).expect("scratch");
            let (c, captured, _) =
                convert(&ls, &manifest, &Limits::default(), &out, &scratch).expect("convert");
            assert!(captured.passwd.is_some());
            assert_eq!(c.verity.hash_start_block, c.verity.data_blocks);
            assert!(c.block_bytes > c.verity.data_blocks * BLOCK);
            seen.push(c);
        }
        assert_eq!(seen[0], seen[1]);
        // A different manifest digest gives a different UUID, salt and so root hash.
        let out = tmp.path().join("other");
        let (other, _, _) =
            convert(&ls, &Digest::of(b"other"), &Limits::default(), &out, tmp.path())
                .expect("convert");
        assert_ne!(other.verity.root_hash, seen[0].verity.root_hash);
    }

    #[test]
    fn owners_modes_and_xattrs_reach_the_file_system() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(4);
        h.set_mode(0o4755);
        h.set_uid(1234);
        h.set_gid(567);
        h.set_mtime(1_000_000);
        b.append_pax_extensions([
            ("SCHILY.xattr.security.capability", &[1u8, 0, 0, 2, 0, 0x20, 0, 0][..]),
            ("SCHILY.xattr.user.note", &b"hi"[..]),
        ])
        .expect("pax");
        b.append_data(&mut h, "bin/ping", &b"ping"[..]).expect("append");
        let layer = tmp.path().join("layer");
        std::fs::write(&layer, b.into_inner().expect("tar")).expect("write");
        let layers = [Layer { path: layer, label: "layer 1 of 1".into() }];
        let out = tmp.path().join("img");
        convert(&layers, &Digest::of(b"x"), &Limits::default(), &out, tmp.path()).expect("convert");
        let debugfs = |cmd: &str| {
            let o = Command::new("debugfs").arg("-R").arg(cmd).arg(&out).output().expect("debugfs");
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
        };
        let xattrs = debugfs("ea_list /bin/ping");
        assert!(xattrs.contains("security.capability") && xattrs.contains("user.note"), "{xattrs}");
        let stat = debugfs("stat /bin/ping");
        assert!(stat.contains("User:  1234") && stat.contains("Group:   567"), "{stat}");
        assert!(stat.contains("Mode:  04755"), "{stat}");
        let features = debugfs("stats");
        for f in ["ext_attr", "extent", "metadata_csum", "dir_index"] {
            assert!(features.contains(f), "{f} missing: {features}");
        }
        assert!(!features.contains("has_journal"), "{features}");
    }
}
