//! What the tests of the real `isocell` binary share: a scratch environment with a stand-in
//! kernel and image (small files) and a stand-in "VMM" that leaves a mark if it is ever started.
//! None of these tests boots a guest.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A scratch directory for one test, removed when dropped.
pub struct Env {
    pub dir: PathBuf,
}

impl Env {
    /// A fresh environment for test `name` of `suite`.
    pub fn new(suite: &str, name: &str) -> Env {
        let dir =
            std::env::temp_dir().join(format!("isocell-{suite}-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("run")).unwrap();
        fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        fs::write(dir.join("rootfs.ext4"), b"image").unwrap();
        let vmm = dir.join("vmm");
        fs::write(&vmm, format!("#!/bin/sh\ntouch {}/vmm-was-started\n", dir.display())).unwrap();
        fs::set_permissions(&vmm, fs::Permissions::from_mode(0o755)).unwrap();
        Env { dir }
    }

    /// `isocell ARGS` in this environment, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_isocell"));
        c.args(args)
            .env("ISOCELL_STATE_DIR", self.state())
            .env("ISOCELL_RUN_DIR", self.dir.join("run"))
            .env("ISOCELL_KERNEL", self.dir.join("vmlinux"))
            .env("ISOCELL_IMAGE", self.dir.join("rootfs.ext4"))
            .env("ISOCELL_VMM", self.dir.join("vmm"))
            .env("ISOCELL_JAILER", self.dir.join("vmm"))
            .stdin(Stdio::null());
        c
    }

    /// Runs `isocell ARGS` in this environment.
    pub fn isocell(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// The state directory (audit log, keys, cell records).
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// A path in the scratch directory, as text.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// The audit log's entries, as `isocell audit show` prints them.
    pub fn entries(&self) -> Vec<serde_json::Value> {
        let out = self.isocell(&["audit", "show"]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Whether the stand-in VMM was ever started.
    pub fn vmm_started(&self) -> bool {
        self.dir.join("vmm-was-started").exists()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// An output's status and streams, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether a directory is empty (or missing).
pub fn empty(dir: &Path) -> bool {
    fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(true)
}
