//! Copying files in (`--input`) and out (`--output`). Paths come from the host, which the cell
//! trusts; they are still required to be absolute so a mistake cannot land relative to `/`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
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

/// Opens `name` in the directory `dir` (or `name` as an absolute path when `dir` is `None`)
/// without following a final symlink and without blocking, and says what was opened. The type
/// of the opened file decides, never a directory listing's: a device or FIFO bind-mounted over
/// a regular file shows as a regular file in the listing.
fn open_entry(dir: Option<&File>, name: &std::ffi::OsStr) -> std::io::Result<(File, fs::Metadata)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(name.as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let at = dir.map_or(libc::AT_FDCWD, AsRawFd::as_raw_fd);
    let flags =
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: openat with a descriptor we hold (or AT_FDCWD) and a NUL-terminated name.
    let fd = unsafe { libc::openat(at, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat just returned this descriptor and nothing else owns it.
    let f = unsafe { File::from_raw_fd(fd) };
    let meta = f.metadata()?;
    Ok((f, meta))
}

/// Sends a file or a directory tree: `Entry` for each item (paths relative to `path`; the root
/// itself is "."), each file followed by its `Data` and `DataEnd`. Only regular files and
/// directories are sent; links, devices, FIFOs and sockets in a tree are skipped, and are an
/// error at the root.
pub fn get_path(path: &str, link: &Link) -> Result<(), String> {
    let p = absolute(path)?;
    let (f, meta) = open_entry(None, p.as_os_str()).map_err(|e| format!("{path}: {e}"))?;
    if meta.is_dir() {
        send_dir(f, &meta, Path::new("."), link)
    } else if meta.is_file() {
        send_file(f, &meta, ".", link)
    } else {
        Err(format!("{path}: only regular files and directories can be copied out"))
    }
}

fn send_dir(dir: File, meta: &fs::Metadata, rel: &Path, link: &Link) -> Result<(), String> {
    link.send(&Message::Entry {
        path: rel.to_string_lossy().into_owned(),
        kind: EntryKind::Dir,
        mode: meta.permissions().mode(),
        size: 0,
    });
    // The listing is read through the descriptor already opened, not the path again.
    let listing = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let mut names: Vec<_> = fs::read_dir(&listing)
        .map_err(|e| format!("{}: {e}", rel.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in names {
        let child_rel = rel.join(&name);
        let Ok((f, m)) = open_entry(Some(&dir), &name) else { continue };
        if m.is_dir() {
            send_dir(f, &m, &child_rel, link)?;
        } else if m.is_file() {
            send_file(f, &m, &child_rel.to_string_lossy(), link)?;
        }
        // Symlinks, devices, FIFOs and sockets are not copied out.
    }
    Ok(())
}

/// Sends exactly the size announced: a file that grows is cut at it, one that shrinks comes
/// up short (and the host refuses it).
fn send_file(f: File, meta: &fs::Metadata, rel: &str, link: &Link) -> Result<(), String> {
    let size = meta.len();
    link.send(&Message::Entry {
        path: rel.to_owned(),
        kind: EntryKind::File,
        mode: meta.permissions().mode(),
        size,
    });
    let mut f = f.take(size);
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
                return Err(format!("read {rel}: {e}"));
            }
        }
    }
    link.send(&Message::DataEnd);
    Ok(())
}
