//! Files into and out of a running cell as tar streams, over a session connection of their own.
//! Uploads are checked whole before anything reaches the cell (only files and directories,
//! relative names without `..`); downloads go through the same checks as `isocell run
//! --output` (every name from the cell checked, opened beneath a staging directory without
//! following links, bounded in bytes, entries and time) and are then packed as a tar.

use std::io::{Seek, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use futures_util::StreamExt;
use isocell_host::session::SessionSocket;
use isocell_host::transfer::{self, OutputBudget};

use crate::cells::{blocking, App};
use crate::db::CellRow;
use crate::error::ApiError;

/// Largest upload or download, bytes.
pub const MAX_TRANSFER_BYTES: u64 = 4 << 30;
/// Most files and directories in one transfer.
const MAX_ENTRIES: u64 = 100_000;
/// Longest one transfer may take inside the cell.
const TRANSFER_LIMIT: Duration = Duration::from_secs(600);

/// A scratch file or directory under the state directory, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

fn scratch(app: &App, what: &str) -> Result<Scratch, ApiError> {
    let dir = app.host.state_dir.join("tmp");
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiError::internal(format!("{}: {e}", dir.display())))?;
    Ok(Scratch(dir.join(format!("{what}-{}", isocell_host::vmm_process::new_id()))))
}

/// Checks a cell path given by a client.
pub fn cell_path(path: &str) -> Result<String, ApiError> {
    if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
        return Err(ApiError::bad_request(format!(
            "path {path:?}: give an absolute path in the cell"
        )));
    }
    Ok(path.trim_end_matches('/').to_owned()).map(|p| if p.is_empty() { "/".into() } else { p })
}

fn running(row: &CellRow) -> Result<(), ApiError> {
    if row.state == "running" {
        Ok(())
    } else {
        Err(ApiError::conflict(format!(
            "cell {} is {}; files move only in running cells",
            row.id, row.state
        )))
    }
}

/// Where an uploaded entry goes beneath the destination: `None` for the destination itself
/// (`.` or `./`), else a relative name of normal components joined by `/`.
fn upload_name(p: &Path) -> Result<Option<String>, String> {
    let s = p.to_str().ok_or_else(|| format!("{}: names must be UTF-8", p.display()))?;
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => parts.push(n.to_str().unwrap_or_default()),
            Component::CurDir => {}
            _ => return Err(format!("{s:?}: names in the tar must be relative, without `..`")),
        }
    }
    if s.is_empty() {
        return Err("an entry without a name: names in the tar must be relative paths".into());
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// One checked entry of an upload: where it goes and what it is.
#[derive(Debug, PartialEq)]
enum Upload {
    Dir { name: String, mode: u32 },
    File { name: String, mode: u32, size: u64 },
}

/// Checks one tar entry of an upload: only files and directories, with a safe name. The
/// destination itself (`.`) may appear as a directory and is skipped (`None`).
fn check_entry<R: std::io::Read>(e: &tar::Entry<'_, R>) -> Result<Option<Upload>, String> {
    let path = e.path().map_err(|err| format!("an entry's name: {err}"))?;
    let name = upload_name(&path)?;
    let header = e.header();
    let kind = header.entry_type();
    let mode =
        header.mode().map_err(|err| format!("{}: its mode: {err}", path.display()))? & 0o7777;
    match (name, kind.is_dir(), kind.is_file()) {
        (None, true, _) => Ok(None),
        (Some(name), true, _) => Ok(Some(Upload::Dir { name, mode })),
        (Some(name), _, true) => {
            let size =
                header.size().map_err(|err| format!("{}: its size: {err}", path.display()))?;
            Ok(Some(Upload::File { name, mode, size }))
        }
        (None, ..) => Err(format!("{}: only a directory may name the destination", path.display())),
        (Some(_), ..) => Err(format!(
            "{}: only files and directories can be copied into a cell (this is {kind:?})",
            path.display()
        )),
    }
}

/// Pass one over an upload: every entry checked before the cell sees any. Returns how many
/// entries will be copied.
fn check_upload<R: std::io::Read>(tar: R) -> Result<u64, String> {
    let mut archive = tar::Archive::new(tar);
    let mut entries = 0u64;
    for e in archive.entries().map_err(|e| format!("not a tar stream: {e}"))? {
        let e = e.map_err(|e| format!("not a tar stream: {e}"))?;
        if check_entry(&e)?.is_some() {
            entries += 1;
        }
        if entries > MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries; send the tree in parts"));
        }
    }
    Ok(entries)
}

/// Extracts an uploaded tar (the body) under `dest` in cell `row`.
pub async fn upload(app: &Arc<App>, row: &CellRow, dest: &str, body: Body) -> Result<(), ApiError> {
    running(row)?;
    let file = scratch(app, "upload")?;
    let mut out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&file.0)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?;
        total += chunk.len() as u64;
        if total > MAX_TRANSFER_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("an upload may be at most {MAX_TRANSFER_BYTES} bytes; send it in parts"),
            ));
        }
        out.write_all(&chunk).map_err(|e| ApiError::internal(e.to_string()))?;
    }
    let socket = SessionSocket::of(&app.host.run_dir, &row.id);
    let dest = dest.to_owned();
    blocking(move || {
        let _keep = &file;
        let mut f = out;
        // Pass one: every entry is a file or directory with a safe name, before the cell sees
        // anything.
        f.rewind().map_err(|e| ApiError::internal(e.to_string()))?;
        check_upload(&mut f).map_err(ApiError::bad_request)?;
        // Pass two: into the cell.
        f.rewind().map_err(|e| ApiError::internal(e.to_string()))?;
        let mut link = socket
            .connect()
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "cell_failed", e.to_string()))?;
        let by = isocell_host::cell::deadline(TRANSFER_LIMIT);
        let in_cell = |e: transfer::TransferError| {
            ApiError::new(StatusCode::BAD_GATEWAY, "cell_failed", e.to_string())
        };
        transfer::make_dir(&mut link, &dest, 0o755, by).map_err(in_cell)?;
        let base = if dest == "/" { String::new() } else { dest.clone() };
        let mut archive = tar::Archive::new(&mut f);
        for e in archive.entries().map_err(|e| ApiError::internal(e.to_string()))? {
            let e = e.map_err(|e| ApiError::internal(e.to_string()))?;
            match check_entry(&e).map_err(ApiError::bad_request)? {
                None => {}
                Some(Upload::Dir { name, mode }) => {
                    transfer::make_dir(&mut link, &format!("{base}/{name}"), mode, by)
                        .map_err(in_cell)?;
                }
                Some(Upload::File { name, mode, size }) => {
                    let target = format!("{base}/{name}");
                    transfer::put_reader(&mut link, e, size, mode, &target, by).map_err(in_cell)?;
                }
            }
        }
        Ok(())
    })
    .await?
}

/// A tar stream of `path` (file or tree) in cell `row`.
pub async fn download(app: &Arc<App>, row: &CellRow, path: &str) -> Result<Body, ApiError> {
    running(row)?;
    let name = Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ApiError::bad_request(format!("path {path:?}: name a file or directory")))?
        .to_owned();
    let staging = scratch(app, "download")?;
    let tar_file = scratch(app, "download-tar")?;
    let socket = SessionSocket::of(&app.host.run_dir, &row.id);
    let guest = path.to_owned();
    let file = blocking(move || {
        std::fs::create_dir_all(&staging.0).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut link = socket
            .connect()
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "cell_failed", e.to_string()))?;
        let mut budget = OutputBudget::new(MAX_TRANSFER_BYTES, MAX_ENTRIES, TRANSFER_LIMIT);
        let local = staging.0.join(&name);
        transfer::get(&mut link, &guest, &local, &mut budget).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "cell_failed",
                e.to_string().trim_start_matches("--output ").to_owned(),
            )
        })?;
        let out =
            std::fs::File::create(&tar_file.0).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut b = tar::Builder::new(out);
        b.follow_symlinks(false);
        let meta =
            std::fs::symlink_metadata(&local).map_err(|e| ApiError::internal(e.to_string()))?;
        let packed = if meta.is_dir() {
            b.append_dir_all(&name, &local)
        } else {
            b.append_path_with_name(&local, &name)
        };
        packed
            .and_then(|()| b.finish())
            .map_err(|e| ApiError::internal(format!("packing: {e}")))?;
        drop(b);
        let f = std::fs::File::open(&tar_file.0).map_err(|e| ApiError::internal(e.to_string()))?;
        // The open file outlives its name: both scratch paths go now.
        drop(tar_file);
        drop(staging);
        Ok::<_, ApiError>(f)
    })
    .await??;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Ok(Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uploaded_names_stay_beneath_their_destination() {
        let name = |p: &str| upload_name(Path::new(p));
        assert_eq!(name("tree/sub/f.txt"), Ok(Some("tree/sub/f.txt".into())));
        assert_eq!(name("./tree/"), Ok(Some("tree".into())));
        assert_eq!(name("./"), Ok(None));
        for bad in ["../etc/passwd", "/etc/passwd", "tree/../../x", "a/..", ""] {
            assert!(name(bad).is_err(), "{bad}");
        }
        assert!(cell_path("relative").is_err());
        assert!(cell_path("/a\0b").is_err());
        assert_eq!(cell_path("/data/").ok().as_deref(), Some("/data"));
        assert_eq!(cell_path("/").ok().as_deref(), Some("/"));
    }

    /// One entry of a generated tar: raw name bytes (written into the header as they are, so
    /// names the tar crate's own writer would refuse get through) and an entry type.
    fn tar_of(entries: &[(String, u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            let raw = &mut h.as_gnu_mut().unwrap().name;
            let n = name.len().min(raw.len());
            raw[..n].copy_from_slice(&name.as_bytes()[..n]);
            h.set_entry_type(tar::EntryType::new(*kind));
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            if *kind == b'1' || *kind == b'2' {
                h.set_link_name("../../etc/shadow").unwrap();
            }
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend_from_slice(&[0; 1024]);
        out
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-z0-9_.-]{1,8}",
            1 => Just("..".to_owned()),
            1 => Just(".".to_owned()),
            1 => Just(String::new()),
        ]
    }

    fn entry() -> impl Strategy<Value = (String, u8, Vec<u8>)> {
        let name = (proptest::bool::weighted(0.1), proptest::collection::vec(segment(), 1..5))
            .prop_map(|(absolute, parts)| {
                format!("{}{}", if absolute { "/" } else { "" }, parts.join("/"))
            });
        // Regular file, directory, hard link, symlink, character device, FIFO.
        let kind = proptest::sample::select(vec![b'0', b'0', b'5', b'5', b'1', b'2', b'3', b'6']);
        (name, kind, proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(n, k, d)| {
            if k == b'0' {
                (n, k, d)
            } else {
                (n, k, Vec::new())
            }
        })
    }

    /// Whether the daemon should take `name` of type `kind`, decided without the tar crate.
    fn acceptable(name: &str, kind: u8) -> bool {
        let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
        if name.is_empty() || name.starts_with('/') || parts.contains(&"..") {
            return false;
        }
        match kind {
            b'5' => true,
            b'0' => !parts.is_empty(),
            _ => false,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever bytes a client sends, checking them returns an answer and never panics.
        #[test]
        fn any_bytes_get_an_answer(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = check_upload(&bytes[..]);
        }

        /// A generated upload is taken exactly when every entry is a file or directory with a
        /// relative name without `..`; every name taken stays beneath the destination.
        #[test]
        fn uploads_are_taken_exactly_when_every_entry_is_safe(
            entries in proptest::collection::vec(entry(), 1..8)
        ) {
            let tar = tar_of(&entries);
            let want = entries.iter().all(|(n, k, _)| acceptable(n, *k));
            let got = check_upload(&tar[..]);
            prop_assert_eq!(got.is_ok(), want, "{:?} -> {:?}", entries, got);
            if want {
                let mut archive = tar::Archive::new(&tar[..]);
                for e in archive.entries().unwrap() {
                    let name = match check_entry(&e.unwrap()).unwrap() {
                        None => continue,
                        Some(Upload::Dir { name, .. } | Upload::File { name, .. }) => name,
                    };
                    let target = PathBuf::from(format!("/dest/{name}"));
                    prop_assert!(target.components().skip(2).all(|c| matches!(c, Component::Normal(_))));
                    prop_assert!(target.starts_with("/dest/"));
                }
            }
        }

        /// A generated upload cut short or with one bit changed never panics, and whatever is
        /// taken passes the independent check above.
        #[test]
        fn damaged_uploads_never_slip_through(
            entries in proptest::collection::vec(entry(), 1..4),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut tar = tar_of(&entries);
            let at = flip.index(tar.len());
            tar[at] ^= 1 << bit;
            tar.truncate(cut.index(tar.len() + 1));
            if check_upload(&tar[..]).is_ok() {
                let mut archive = tar::Archive::new(&tar[..]);
                for e in archive.entries().unwrap() {
                    let Ok(e) = e else { break };
                    let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                    let kind = e.header().entry_type().as_byte();
                    prop_assert!(acceptable(&name, kind), "{name:?} of type {kind} slipped through");
                }
            }
        }
    }
}
