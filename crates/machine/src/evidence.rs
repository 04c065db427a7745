//! Copying a machine's evidence out to this host. What the machine sends, or what its disk
//! holds, is written by a guest and treated as hostile: only regular files and directories are
//! made, with modes 0644 and 0755, under names that stay inside the destination, within a
//! count and size bound. No link, device or set-id file is ever created here.

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::{io, sbin, MachineError};

/// The most files and directories one copy makes.
const MAX_ENTRIES: u64 = 1_000_000;
/// The most bytes one copy writes.
const MAX_BYTES: u64 = 16 << 30;

fn bad(what: impl std::fmt::Display) -> MachineError {
    MachineError::Failed(format!("the machine's evidence: {what}"))
}

/// `name` as a path below the destination: normal components only.
fn relative(name: &Path) -> Result<PathBuf, MachineError> {
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return Err(bad(format!("{}: a name that leaves the directory", name.display()))),
        }
    }
    Ok(out)
}

/// Counts what a copy made against the bounds.
#[derive(Default)]
struct Budget {
    entries: u64,
    bytes: u64,
}

impl Budget {
    fn entry(&mut self) -> Result<(), MachineError> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(bad(format!("more than {MAX_ENTRIES} files")));
        }
        Ok(())
    }
}

/// Makes `path` and any missing parents, mode 0755 (the umask may only narrow it).
fn make_dir(path: &Path) -> Result<(), MachineError> {
    // Recursive creation already accepts a directory that exists.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(io(format!("creating {}", path.display())))
}

/// Writes `from` as a new file at `path` (mode 0644), within the budget.
fn write_file(
    path: &Path,
    from: &mut dyn std::io::Read,
    budget: &mut Budget,
) -> Result<(), MachineError> {
    if let Some(parent) = path.parent() {
        make_dir(parent)?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))?;
    let left = MAX_BYTES.saturating_sub(budget.bytes);
    let n = std::io::copy(&mut from.take(left + 1), &mut f)
        .map_err(io(format!("writing {}", path.display())))?;
    budget.bytes += n;
    if budget.bytes > MAX_BYTES {
        return Err(bad(format!("more than {MAX_BYTES} bytes")));
    }
    Ok(())
}

/// Extracts a tar archive from the machine into `dest`.
pub fn untar(archive: &[u8], dest: &Path) -> Result<(), MachineError> {
    let mut budget = Budget::default();
    let mut a = tar::Archive::new(archive);
    for entry in a.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let name = entry.path().map_err(bad)?.into_owned();
        let rel = relative(&name)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        let target = dest.join(&rel);
        if kind.is_dir() {
            budget.entry()?;
            make_dir(&target)?;
        } else if kind.is_file() {
            budget.entry()?;
            write_file(&target, &mut entry, &mut budget)?;
        }
        // Anything else (links, devices, FIFOs) is not evidence and is left out.
    }
    Ok(())
}

/// Fails if the ext4 image at `disk` has a journal still to replay (a machine that was killed):
/// debugfs reads past it, so some of what was written would be missing.
pub fn check_clean(disk: &Path) -> Result<(), MachineError> {
    let out = Command::new(sbin("dumpe2fs")).arg("-h").arg(disk).output().map_err(|e| {
        MachineError::Failed(format!("cannot run dumpe2fs ({e}); install e2fsprogs"))
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let features = text.lines().find(|l| l.starts_with("Filesystem features:")).unwrap_or("");
    if !out.status.success() {
        return Err(MachineError::Failed(format!(
            "{} is not a readable ext4 image: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    if features.split_whitespace().any(|f| f == "needs_recovery") {
        return Err(MachineError::NotRunning(
            "its disk was not cleanly unmounted and its journal is still to be replayed; \
             `isocell machine start` replays it, then `stop` it or copy the evidence while it runs"
                .into(),
        ));
    }
    Ok(())
}

/// Dumps `names` (files or directories at the disk's root) from the ext4 image `disk` into
/// `stage` (private, new) with debugfs, which opens it read-only.
pub fn dump(disk: &Path, stage: &Path, names: &[&str]) -> Result<(), MachineError> {
    let mut cmds = String::new();
    for name in names {
        cmds.push_str(&format!("rdump \"/{name}\" \"{}\"\n", stage.display()));
    }
    let cmdfile = stage.join(".debugfs");
    fs::write(&cmdfile, cmds).map_err(io("writing the debugfs commands"))?;
    let out = Command::new(sbin("debugfs")).arg("-f").arg(&cmdfile).arg(disk).output();
    let _ = fs::remove_file(&cmdfile);
    let out = out.map_err(|e| {
        MachineError::Failed(format!("cannot run debugfs ({e}); install e2fsprogs"))
    })?;
    if !out.status.success() {
        return Err(MachineError::Failed(format!(
            "debugfs could not read {}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Copies the regular files and directories of `from` (a private staging directory) into
/// `dest`, with this host's modes; anything else is left out.
pub fn copy_tree(from: &Path, dest: &Path) -> Result<(), MachineError> {
    let mut budget = Budget::default();
    let mut dirs = vec![(from.to_path_buf(), dest.to_path_buf())];
    while let Some((src, dst)) = dirs.pop() {
        for e in fs::read_dir(&src).map_err(io(format!("reading {}", src.display())))? {
            let e = e.map_err(io(format!("reading {}", src.display())))?;
            let meta = e.metadata().map_err(io(format!("reading {}", e.path().display())))?;
            let to = dst.join(e.file_name());
            if meta.is_dir() {
                budget.entry()?;
                make_dir(&to)?;
                dirs.push((e.path(), to));
            } else if meta.is_file() {
                budget.entry()?;
                let mut f = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(e.path())
                    .map_err(io(format!("reading {}", e.path().display())))?;
                write_file(&to, &mut f, &mut budget)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h
    }

    #[test]
    fn only_files_and_directories_come_out_with_our_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let tar = archive(|b| {
            b.append_data(&mut header(tar::EntryType::Directory, 0, 0o7777), "audit", &[][..])
                .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 3, 0o6755),
                "audit/audit.log",
                &b"abc"[..],
            )
            .unwrap();
            let mut link = header(tar::EntryType::Symlink, 0, 0o777);
            b.append_link(&mut link, "escape", "/etc").unwrap();
            b.append_data(&mut header(tar::EntryType::Char, 0, 0o666), "dev", &[][..]).unwrap();
        });
        untar(&tar, tmp.path()).unwrap();
        assert_eq!(fs::read(tmp.path().join("audit/audit.log")).unwrap(), b"abc");
        let mode = fs::metadata(tmp.path().join("audit/audit.log")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o644);
        assert!(fs::symlink_metadata(tmp.path().join("escape")).is_err());
        assert!(fs::symlink_metadata(tmp.path().join("dev")).is_err());
    }

    /// Everything under `dir`: only directories and regular files, none set-id, sticky or
    /// writable by others.
    fn only_plain_entries(dir: &Path) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let meta = fs::symlink_metadata(e.path()).unwrap();
            let mode = meta.permissions().mode();
            assert_eq!(mode & 0o7022, 0, "{}: mode {mode:o}", e.path().display());
            if meta.is_dir() {
                only_plain_entries(&e.path());
            } else {
                assert!(meta.is_file(), "{}: {:?}", e.path().display(), meta.file_type());
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// A hostile archive (random bytes, or a valid one with random bytes overwritten)
        /// extracts or fails; either way nothing lands outside the destination and nothing
        /// but plain files and directories lands inside it.
        #[test]
        fn a_hostile_archive_makes_only_plain_entries_inside_the_destination(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            patches in
                proptest::collection::vec((0usize..8192, proptest::prelude::any::<u8>()), 0..24),
            use_valid in proptest::prelude::any::<bool>(),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let dest = tmp.path().join("dest");
            fs::create_dir(&dest).unwrap();
            let mut bytes = if use_valid {
                archive(|b| {
                    let mut dir = header(tar::EntryType::Directory, 0, 0o755);
                    b.append_data(&mut dir, "audit", &[][..]).unwrap();
                    let mut file = header(tar::EntryType::Regular, 5, 0o644);
                    b.append_data(&mut file, "audit/log", &b"entry"[..]).unwrap();
                    let mut link = header(tar::EntryType::Symlink, 0, 0o777);
                    b.append_link(&mut link, "audit/up", "../..").unwrap();
                    let mut setuid = header(tar::EntryType::Regular, 2, 0o4755);
                    b.append_data(&mut setuid, "cells/c1/launch.json", &b"{}"[..]).unwrap();
                })
            } else {
                raw
            };
            for (at, byte) in patches {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = byte;
                }
            }
            let _ = untar(&bytes, &dest);
            let outside: Vec<_> =
                fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            proptest::prop_assert_eq!(outside, vec![std::ffi::OsString::from("dest")]);
            only_plain_entries(&dest);
        }
    }

    #[test]
    fn names_that_leave_the_directory_are_refused() {
        assert!(relative(Path::new("../x")).is_err());
        assert!(relative(Path::new("/etc/passwd")).is_err());
        assert_eq!(relative(Path::new("./a/b")).unwrap(), PathBuf::from("a/b"));
    }

    #[test]
    fn a_staged_tree_is_copied_without_its_links() {
        let tmp = tempfile::tempdir().unwrap();
        let (from, to) = (tmp.path().join("from"), tmp.path().join("to"));
        fs::create_dir_all(from.join("cells/c1")).unwrap();
        fs::write(from.join("cells/c1/launch.json"), "{}").unwrap();
        fs::set_permissions(from.join("cells/c1/launch.json"), fs::Permissions::from_mode(0o4755))
            .unwrap();
        std::os::unix::fs::symlink("/etc/shadow", from.join("host.pub")).unwrap();
        fs::create_dir(&to).unwrap();
        copy_tree(&from, &to).unwrap();
        let copied = to.join("cells/c1/launch.json");
        assert_eq!(fs::read_to_string(&copied).unwrap(), "{}");
        assert_eq!(fs::metadata(&copied).unwrap().permissions().mode() & 0o7777, 0o644);
        assert!(fs::symlink_metadata(to.join("host.pub")).is_err());
    }
}
