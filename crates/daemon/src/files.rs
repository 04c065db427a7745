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

/// A relative name from an uploaded tar: normal components only.
fn upload_name(p: &Path) -> Result<String, String> {
    let ok = p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    let s = p.to_str().ok_or_else(|| format!("{}: names must be UTF-8", p.display()))?;
    if !ok || s.is_empty() {
        return Err(format!("{s:?}: names in the tar must be relative, without `..`"));
    }
    Ok(p.components().filter_map(|c| c.as_os_str().to_str()).collect::<Vec<_>>().join("/"))
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
        let mut entries = 0u64;
        for e in tar::Archive::new(&mut f)
            .entries()
            .map_err(|e| ApiError::bad_request(format!("not a tar stream: {e}")))?
        {
            let e = e.map_err(|e| ApiError::bad_request(format!("not a tar stream: {e}")))?;
            let path = e.path().map_err(|e| ApiError::bad_request(e.to_string()))?.into_owned();
            upload_name(&path).map_err(ApiError::bad_request)?;
            let kind = e.header().entry_type();
            if !(kind.is_file() || kind.is_dir()) {
                return Err(ApiError::bad_request(format!(
                    "{}: only files and directories can be copied into a cell",
                    path.display()
                )));
            }
            entries += 1;
            if entries > MAX_ENTRIES {
                return Err(ApiError::bad_request(format!("more than {MAX_ENTRIES} entries")));
            }
        }
        // Pass two: into the cell.
        f.rewind().map_err(|e| ApiError::internal(e.to_string()))?;
        let mut link = socket
            .connect()
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "cell_failed", e.to_string()))?;
        let by = isocell_host::cell::deadline(TRANSFER_LIMIT);
        let in_cell = |e: String| ApiError::new(StatusCode::BAD_GATEWAY, "cell_failed", e);
        transfer::make_dir(&mut link, &dest, 0o755, by).map_err(in_cell)?;
        let base = if dest == "/" { String::new() } else { dest.clone() };
        for e in
            tar::Archive::new(&mut f).entries().map_err(|e| ApiError::internal(e.to_string()))?
        {
            let e = e.map_err(|e| ApiError::internal(e.to_string()))?;
            let name = upload_name(&e.path().map_err(|e| ApiError::internal(e.to_string()))?)
                .map_err(ApiError::bad_request)?;
            let target = format!("{base}/{name}");
            let mode = e.header().mode().unwrap_or(0o644);
            if e.header().entry_type().is_dir() {
                transfer::make_dir(&mut link, &target, mode, by).map_err(in_cell)?;
            } else {
                let size = e.header().size().map_err(|e| ApiError::bad_request(e.to_string()))?;
                transfer::put_reader(&mut link, e, size, mode, &target, by).map_err(in_cell)?;
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
                e.trim_start_matches("--output ").to_owned(),
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
    use super::*;

    #[test]
    fn uploaded_names_stay_beneath_their_destination() {
        assert_eq!(upload_name(Path::new("tree/sub/f.txt")).as_deref(), Ok("tree/sub/f.txt"));
        assert_eq!(upload_name(Path::new("./tree/")).as_deref(), Ok("tree"));
        for bad in ["../etc/passwd", "/etc/passwd", "tree/../../x", ""] {
            assert!(upload_name(Path::new(bad)).is_err(), "{bad}");
        }
        assert!(cell_path("relative").is_err());
        assert!(cell_path("/a\0b").is_err());
        assert_eq!(cell_path("/data/").ok().as_deref(), Some("/data"));
        assert_eq!(cell_path("/").ok().as_deref(), Some("/"));
    }
}
