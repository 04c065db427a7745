//! The real `isocell-jailer` on this machine (it needs root, as in production), with a static
//! busybox standing in for the VMM: what the jailed program sees, who it runs as, and that a
//! pinned file is the one mounted even after its path was replaced.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use isocell_jail::{cell_uid, kvm_device, urandom_device, BindMount, JailSpec, Rlimits, CELL_DIR};

const BUSYBOX: &str = "/bin/busybox";

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn setup(name: &str) -> Dir {
    let dir = std::env::temp_dir().join(format!("isocell-jailer-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("root")).unwrap();
    fs::create_dir_all(dir.join("cell")).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    Dir(dir)
}

fn spec(dir: &Path, kernel: BindMount, script: &str) -> JailSpec {
    let uid = cell_uid("jailer-test");
    std::os::unix::fs::chown(dir.join("cell"), Some(uid), Some(uid)).unwrap();
    JailSpec {
        cell_id: "jailer-test".into(),
        root: dir.join("root"),
        cgroup: None,
        // The jailer dies with this test process, as with `isocell`.
        parent: Some(std::process::id()),
        uid,
        gid: uid,
        groups: Vec::new(),
        mounts: vec![
            BindMount {
                host: BUSYBOX.into(),
                jail: "/bin/busybox".into(),
                writable: false,
                exec: true,
                pinned: None,
            },
            kernel,
            BindMount {
                host: dir.join("cell"),
                jail: CELL_DIR.into(),
                writable: true,
                exec: false,
                pinned: None,
            },
        ],
        devices: vec![kvm_device(), urandom_device()],
        rlimits: Rlimits::default(),
        argv: vec!["/bin/busybox".into(), "sh".into(), "-c".into(), script.into()],
    }
}

/// Runs the jailer on `spec`; None when this test cannot run here (not root, no busybox).
fn jail(dir: &Path, spec: &JailSpec) -> Option<(i32, String, String)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new(BUSYBOX).exists() {
        eprintln!("skipped: the jailer needs root and {BUSYBOX} (scripts/install-deps.sh)");
        return None;
    }
    let path = dir.join("jail.json");
    fs::write(&path, serde_json::to_string(spec).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_isocell-jailer")).arg(&path).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    // The jailer's stdout carries only the jailed process's pid (for the cell's receipt); the
    // jailed program's stdout and stderr both go to the jailer's stderr.
    let code = out.status.code().unwrap_or(-1);
    let report = text(&out.stdout);
    if code == 0 {
        assert!(report.trim_end().parse::<u32>().is_ok() && report.ends_with('\n'), "{report:?}");
    }
    let program = text(&out.stderr);
    Some((code, program.clone(), program))
}

fn kernel(host: &Path, pinned: Option<PathBuf>) -> BindMount {
    BindMount {
        host: host.into(),
        jail: "/boot/vmlinux".into(),
        writable: false,
        exec: false,
        pinned,
    }
}

#[test]
fn the_jailed_program_sees_only_its_files_and_has_no_privileges() {
    let dir = setup("view");
    fs::write(dir.0.join("vmlinux"), "kernel").unwrap();
    let script = "/bin/busybox find / -path /proc -prune -o -print | /bin/busybox sort; \
                  echo ==; /bin/busybox id -u; /bin/busybox grep -E '^(Cap|NoNewPrivs)' /proc/self/status; \
                  echo ==; /bin/busybox cat /etc/shadow 2>&1; echo x > /boot/vmlinux 2>&1; \
                  echo y > /cell/written && echo cell-writable; /bin/busybox ls /proc | /bin/busybox wc -l";
    let s = spec(&dir.0, kernel(&dir.0.join("vmlinux"), None), script);
    let Some((code, out, err)) = jail(&dir.0, &s) else { return };
    assert_eq!(code, 0, "{out}\n{err}");
    let parts: Vec<&str> = out.split("==\n").collect();
    let files: Vec<&str> = parts[0].lines().collect();
    let mut expected = s.visible_paths();
    expected.retain(|p| p != "/proc");
    expected.push("/".into());
    expected.sort();
    let mut seen: Vec<String> =
        files.iter().filter(|f| **f != "/proc").map(|f| f.to_string()).collect();
    seen.sort();
    assert_eq!(seen, expected, "{out}");
    assert!(parts[1].starts_with(&format!("{}\n", s.uid)), "{out}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(parts[1].contains(&format!("{set}:\t0000000000000000")), "{set}: {out}");
    }
    assert!(parts[1].contains("NoNewPrivs:\t1"), "{out}");
    assert!(parts[2].contains("No such file"), "{out}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(parts[2].contains("cell-writable"), "{out}");
    assert_eq!(fs::read_to_string(dir.0.join("cell/written")).unwrap(), "y\n");
}

#[test]
fn a_pinned_file_is_mounted_even_after_its_path_is_replaced() {
    let dir = setup("pinned");
    let path = dir.0.join("vmlinux");
    fs::write(&path, "measured").unwrap();
    let held = fs::File::open(&path).unwrap();
    // The path now names another file; the held descriptor still names the measured one.
    fs::rename(&path, dir.0.join("vmlinux.old")).unwrap();
    fs::write(&path, "swapped").unwrap();
    let pinned = PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), held.as_raw_fd()));
    let s = spec(&dir.0, kernel(&path, Some(pinned)), "/bin/busybox cat /boot/vmlinux");
    let Some((code, out, err)) = jail(&dir.0, &s) else { return };
    assert_eq!((code, out.as_str()), (0, "measured"), "{err}");
}

#[test]
fn a_file_the_cell_uid_cannot_read_is_named_by_its_host_path() {
    let dir = setup("unreadable");
    let path = dir.0.join("vmlinux");
    fs::write(&path, "secret").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let s = spec(&dir.0, kernel(&path, None), "true");
    let Some((code, _, err)) = jail(&dir.0, &s) else { return };
    assert_eq!(code, isocell_jail::EXIT_JAIL_FAILED, "{err}");
    assert!(err.contains(&path.display().to_string()) && err.contains("chmod o+r"), "{err}");
}

#[test]
fn a_jailer_whose_starter_is_gone_starts_nothing() {
    let dir = setup("orphan");
    fs::write(dir.0.join("vmlinux"), "kernel").unwrap();
    let mut s = spec(&dir.0, kernel(&dir.0.join("vmlinux"), None), "echo ran");
    // Not the pid that started it: as if `isocell` had died before the jailer armed its
    // parent-death signal.
    s.parent = Some(u32::MAX);
    let Some((code, out, err)) = jail(&dir.0, &s) else { return };
    assert_eq!(code, isocell_jail::EXIT_JAIL_FAILED, "{out}\n{err}");
    assert!(err.contains("is gone") && !out.contains("ran"), "{err}");
}
