//! `--input` and `--output`: copying files and directory trees into a cell before the command
//! and out of it afterwards. What comes out of a cell is untrusted: entry paths are checked to
//! stay inside the destination.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use isocell_proto::{EntryKind, Message, MAX_CHUNK};

use crate::agent_link::AgentLink;

/// How long one reply may take (large files move at tens of MB/s even nested).
const REPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// Copies `host` (a file or a directory tree) to `guest` in the cell.
pub fn put(link: &mut AgentLink, host: &Path, guest: &str) -> Result<(), String> {
    let meta = fs::metadata(host).map_err(|e| format!("--input {}: {e}", host.display()))?;
    if meta.is_dir() {
        put_dir(link, host, guest)
    } else {
        put_file(link, host, guest, meta.permissions().mode(), meta.len())
    }
}

fn put_dir(link: &mut AgentLink, host: &Path, guest: &str) -> Result<(), String> {
    let mode = fs::metadata(host).map(|m| m.permissions().mode()).unwrap_or(0o755);
    link.send(&Message::MakeDir { path: guest.to_owned(), mode })?;
    reply(link, guest)?;
    let mut entries: Vec<_> = fs::read_dir(host)
        .map_err(|e| format!("--input {}: {e}", host.display()))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            return Err(format!("--input: {} has a name that is not UTF-8", e.path().display()));
        };
        let child = format!("{}/{name}", guest.trim_end_matches('/'));
        let meta = fs::metadata(e.path())
            .map_err(|err| format!("--input {}: {err}", e.path().display()))?;
        if meta.is_dir() {
            put_dir(link, &e.path(), &child)?;
        } else if meta.is_file() {
            put_file(link, &e.path(), &child, meta.permissions().mode(), meta.len())?;
        }
    }
    Ok(())
}

fn put_file(
    link: &mut AgentLink,
    host: &Path,
    guest: &str,
    mode: u32,
    size: u64,
) -> Result<(), String> {
    let mut f = File::open(host).map_err(|e| format!("--input {}: {e}", host.display()))?;
    link.send(&Message::PutFile { path: guest.to_owned(), mode, size })?;
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut sent = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("--input {}: {e}", host.display()))?;
        if n == 0 {
            break;
        }
        sent += n as u64;
        link.send(&Message::Data(buf[..n].to_vec()))?;
    }
    link.send(&Message::DataEnd)?;
    if sent != size {
        return Err(format!("--input {}: the file changed while it was copied", host.display()));
    }
    reply(link, guest)
}

fn reply(link: &mut AgentLink, what: &str) -> Result<(), String> {
    match link.expect(REPLY_TIMEOUT, what)? {
        Message::Done => Ok(()),
        Message::Error { message } => Err(format!("in the cell: {message}")),
        other => Err(format!("unexpected reply {other:?} for {what}")),
    }
}

/// Checks a relative path from the cell: no `..`, no root, nothing odd.
fn safe_relative(rel: &str) -> Result<PathBuf, String> {
    let p = Path::new(rel);
    let ok = p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if ok && !rel.is_empty() {
        Ok(p.to_owned())
    } else {
        Err(format!("the cell sent an unsafe path {rel:?}; refused"))
    }
}

/// Copies `guest` (file or tree) out of the cell to `host`.
pub fn get(link: &mut AgentLink, guest: &str, host: &Path) -> Result<(), String> {
    link.send(&Message::GetPath { path: guest.to_owned() })?;
    let mut current: Option<(File, PathBuf)> = None;
    loop {
        match link.expect(REPLY_TIMEOUT, guest)? {
            Message::Entry { path, kind, mode, .. } => {
                let rel = safe_relative(&path)?;
                let mut target =
                    if rel == Path::new(".") { host.to_owned() } else { host.join(&rel) };
                // A single file copied onto an existing directory lands inside it.
                if rel == Path::new(".") && kind == EntryKind::File && target.is_dir() {
                    target = target.join(Path::new(guest).file_name().unwrap_or_default());
                }
                match kind {
                    EntryKind::Dir => {
                        fs::create_dir_all(&target)
                            .map_err(|e| format!("--output {}: {e}", target.display()))?;
                    }
                    EntryKind::File => {
                        let f = File::create(&target)
                            .map_err(|e| format!("--output {}: {e}", target.display()))?;
                        let _ = f.set_permissions(fs::Permissions::from_mode(mode & 0o777));
                        current = Some((f, target));
                    }
                }
            }
            Message::Data(bytes) => match &mut current {
                Some((f, target)) => f
                    .write_all(&bytes)
                    .map_err(|e| format!("--output {}: {e}", target.display()))?,
                None => return Err("the cell sent data without a file".into()),
            },
            Message::DataEnd => current = None,
            Message::Done => return Ok(()),
            Message::Error { message } => return Err(format!("--output {guest}: {message}")),
            other => return Err(format!("unexpected message {other:?} while copying {guest} out")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_from_the_cell_stay_inside() {
        assert!(safe_relative("a/b.txt").is_ok());
        assert!(safe_relative(".").is_ok());
        assert!(safe_relative("../etc/passwd").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a/../../x").is_err());
        assert!(safe_relative("").is_err());
    }
}
