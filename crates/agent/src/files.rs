//! Copying files in (`--input`) and out (`--output`). Paths come from the host, which the cell
//! trusts; they are still required to be absolute so a mistake cannot land relative to `/`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use isocell_proto::{EntryKind, Message, MAX_CHUNK};

use crate::Link;

fn absolute(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p.to_owned())
    } else {
        Err(format!("{path}: paths in the cell must be absolute"))
    }
}

/// Creates a directory (and its parents).
pub fn make_dir(path: &str, mode: u32) -> Result<(), String> {
    let p = absolute(path)?;
    fs::create_dir_all(&p).map_err(|e| format!("create directory {path}: {e}"))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| format!("chmod {path}: {e}"))
}

/// Receives a file's bytes: `next` yields the `Data` frames until `DataEnd`.
pub fn put_file(
    path: &str,
    mode: u32,
    size: u64,
    mut next: impl FnMut() -> Option<Message>,
) -> Result<(), String> {
    let p = absolute(path)?;
    let mut file = match p.parent().map(fs::create_dir_all) {
        Some(Err(e)) => Err(format!("create the directory of {path}: {e}")),
        _ => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode & 0o7777)
            .open(&p)
            .map_err(|e| format!("create {path}: {e}")),
    };
    // The data is consumed even when the file cannot be written, to stay in step.
    let mut written = 0u64;
    loop {
        match next() {
            Some(Message::Data(bytes)) => {
                if let Ok(f) = &mut file {
                    if let Err(e) = f.write_all(&bytes) {
                        file = Err(format!("write {path}: {e}"));
                    }
                }
                written += bytes.len() as u64;
            }
            Some(Message::DataEnd) => break,
            _ => return Err(format!("{path}: the transfer was cut short")),
        }
    }
    let file = file?;
    if written != size {
        return Err(format!("{path}: received {written} bytes, expected {size}"));
    }
    file.sync_all().map_err(|e| format!("write {path}: {e}"))
}

/// Sends a file or a directory tree: `Entry` for each item (paths relative to `path`; the root
/// itself is "."), each file followed by its `Data` and `DataEnd`.
pub fn get_path(path: &str, link: &Link) -> Result<(), String> {
    let p = absolute(path)?;
    let meta = fs::symlink_metadata(&p).map_err(|e| format!("{path}: {e}"))?;
    if meta.is_dir() {
        send_dir(&p, Path::new("."), link)
    } else if meta.is_file() {
        send_file(&p, ".", link)
    } else {
        Err(format!("{path}: only regular files and directories can be copied out"))
    }
}

fn send_dir(dir: &Path, rel: &Path, link: &Link) -> Result<(), String> {
    let mode = fs::metadata(dir).map(|m| m.permissions().mode()).unwrap_or(0o755);
    link.send(&Message::Entry {
        path: rel.to_string_lossy().into_owned(),
        kind: EntryKind::Dir,
        mode,
        size: 0,
    });
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let child_rel = rel.join(e.file_name());
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            send_dir(&e.path(), &child_rel, link)?;
        } else if ft.is_file() {
            send_file(&e.path(), &child_rel.to_string_lossy(), link)?;
        }
        // Symlinks, devices and sockets are not copied out.
    }
    Ok(())
}

fn send_file(path: &Path, rel: &str, link: &Link) -> Result<(), String> {
    let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = f.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
    link.send(&Message::Entry {
        path: rel.to_owned(),
        kind: EntryKind::File,
        mode: meta.permissions().mode(),
        size: meta.len(),
    });
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                link.send(&Message::Data(buf[..n].to_vec()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // The entry is already announced: end it, then report.
                link.send(&Message::DataEnd);
                return Err(format!("read {}: {e}", path.display()));
            }
        }
    }
    link.send(&Message::DataEnd);
    Ok(())
}
