//! End-to-end test of `isocell machine` on this host: a real machine (QEMU, the nested host's
//! kernel, isocelld inside) through its whole life, with `isocell run` and `isocell cell` going
//! through it transparently, its evidence verified from out here, a crash and a hang recovered,
//! and nothing left behind. One machine for all of it: each boot costs tens of seconds under
//! emulation.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use isocell_testhost::host::Paths;
use isocell_testhost::TestHost;
use serde_json::Value;

struct Machine {
    isocell: PathBuf,
    dir: PathBuf,
}

impl Machine {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.isocell);
        c.args(args).env("ISOCELL_MACHINE_DIR", &self.dir).env_remove("ISOCELL_HOST");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("isocell: {e}"))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "isocell {args:?}: {}", explain(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["machine", "status", "--json"])).unwrap_or(Value::Null)
    }

    fn pid(&self) -> i32 {
        self.status()["pid"].as_i64().and_then(|p| i32::try_from(p).ok()).unwrap_or(0)
    }

    fn evidence(&self, into: &Path) {
        self.ok(&["machine", "evidence", &into.display().to_string()]);
        let dir = into.display().to_string();
        let key = into.join("host.pub").display().to_string();
        self.ok(&["audit", "verify", "--state-dir", &dir, "--public-key", &key]);
    }
}

/// A failed assertion still leaves no machine running.
impl Drop for Machine {
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = self.run(&["machine", "rm", "--force"]);
        }
    }
}

fn explain(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn qemu_running(dir: &Path) -> bool {
    std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("qemu-system") && c.contains(&*dir.to_string_lossy())
        })
    })
}

fn audit_entries(dir: &Path) -> usize {
    let log = std::fs::read_to_string(dir.join("audit/audit.log")).unwrap_or_default();
    log.lines().filter(|l| l.starts_with('{')).count()
}

fn launch_receipts(dir: &Path) -> Vec<Value> {
    std::fs::read_dir(dir.join("cells"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("launch.json")).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect()
}

#[test]
fn a_machine_runs_cells_for_this_host_keeps_its_evidence_and_recovers() {
    let host = TestHost::detect().unwrap_or_else(|e| panic!("{e}"));
    if host.kind().has_hardware_kvm() {
        eprintln!("this host has hardware virtualization: `isocell run` needs no machine here");
        return;
    }
    let paths = Paths::discover().unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let m = Machine { isocell: paths.isocell, dir: tmp.path().join("machine") };

    // Before it exists: every command says to create it; `isocell run` says to start one.
    let out = m.run(&["machine", "start"]);
    assert_eq!(out.status.code(), Some(125), "{}", explain(&out));
    assert!(explain(&out).contains("isocell machine init"), "{}", explain(&out));
    let out = m.run(&["run", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", explain(&out));
    assert!(explain(&out).contains("isocell machine start"), "{}", explain(&out));
    let out = m.run(&["machine", "init", "--memory", "64M"]);
    assert!(explain(&out).contains("--memory 64 MiB"), "{}", explain(&out));
    assert!(!m.dir.exists(), "a refused init leaves nothing");

    m.ok(&["machine", "init", "--memory", "1536M", "--disk", "1G", "--jurisdiction", "EU"]);
    let out = m.run(&["machine", "init"]);
    assert!(explain(&out).contains("already exists"), "{}", explain(&out));
    assert_eq!(m.status()["state"], "stopped");

    let t = Instant::now();
    m.ok(&["machine", "start"]);
    eprintln!("machine start: {:.1} s", t.elapsed().as_secs_f64());
    let status = m.status();
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["accelerator"], "tcg", "{status}");
    let key = status["host_key"].as_str().unwrap_or_default().to_owned();
    assert_eq!(key.len(), 64, "{status}");
    let machine_id = status["machine_id"].as_str().unwrap_or_default().to_owned();
    // The forwarded ports are on loopback only.
    let api = status["api"].as_str().unwrap_or_default();
    assert!(api.starts_with("https://127.0.0.1:"), "{status}");

    // `isocell run` goes through the machine, saying so once; output, status and stdin stream.
    let out = m.run(&["run", "--", "sh", "-c", "echo hello from $(uname -n); exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", explain(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello from"), "{}", explain(&out));
    let said = String::from_utf8_lossy(&out.stderr).matches("isocell machine").count();
    assert_eq!(said, 1, "{}", explain(&out));
    let mut child = m
        .cmd(&["run", "-i", "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("stdin"));
        stdin.write_all(b"through the machine\n").unwrap_or_else(|e| panic!("{e}"));
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "THROUGH THE MACHINE\n", "{}", explain(&out));
    // --input and --output, under other names than the files have.
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(work.join("in.txt"), "payload\n").unwrap_or_else(|e| panic!("{e}"));
    let input = format!("{}:/tmp/data.txt", work.join("in.txt").display());
    let output = format!("/tmp/result.txt:{}", work.join("got.txt").display());
    let out = m.run(&[
        "run",
        "--input",
        &input,
        "--output",
        &output,
        "--",
        "sh",
        "-c",
        "wc -c < /tmp/data.txt > /tmp/result.txt",
    ]);
    assert!(out.status.success(), "{}", explain(&out));
    let got = std::fs::read_to_string(work.join("got.txt")).unwrap_or_default();
    assert_eq!(got.trim(), "8", "{}", explain(&out));
    // Refused with a reason: what names this host's files or changes the machine's rules.
    let out = m.run(&["run", "--no-jail", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", explain(&out));
    assert!(explain(&out).contains("--no-jail: not available through the isocell machine"));

    // `isocell cell` uses the machine's daemon too.
    let id = m.ok(&["cell", "create"]).trim().to_owned();
    let out = m.ok(&["cell", "exec", &id, "--", "cat", "/proc/cmdline"]);
    assert!(out.contains("isocell"), "{out}");
    assert!(m.ok(&["cell", "ls"]).contains(&id));
    m.ok(&["cell", "rm", &id]);

    // A command in the machine itself.
    let out = m.run(&["machine", "exec", "--", "sh", "-c", "ls /dev/kvm; exit 4"]);
    assert_eq!(out.status.code(), Some(4), "{}", explain(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("/dev/kvm"), "{}", explain(&out));

    // The evidence, verified out here with the machine's key; receipts say where cells ran.
    let first = tmp.path().join("evidence-1");
    m.evidence(&first);
    assert_eq!(std::fs::read_to_string(first.join("host.pub")).unwrap_or_default().trim(), key);
    let receipts = launch_receipts(&first);
    assert!(receipts.len() >= 4, "{receipts:?}");
    for r in &receipts {
        let machine = &r["receipt"]["host"]["machine"];
        assert_eq!(machine["machine_id"], machine_id.as_str(), "{r}");
        assert_eq!(machine["accelerator"], "tcg", "{r}");
        assert!(machine["outer_host"].as_str().is_some_and(|h| !h.is_empty()), "{r}");
        assert_eq!(r["receipt"]["host"]["jurisdiction"], "EU", "{r}");
    }
    let entries = audit_entries(&first);

    // Stop and start: the log and key survive, and the log verifies and has grown.
    m.ok(&["machine", "stop"]);
    assert_eq!(m.status()["state"], "stopped");
    assert!(!qemu_running(&m.dir));
    let stopped = tmp.path().join("evidence-stopped");
    m.evidence(&stopped);
    assert_eq!(audit_entries(&stopped), entries, "the stopped machine's disk has the whole log");
    m.ok(&["machine", "start"]);
    assert_eq!(m.status()["host_key"], key.as_str());
    m.ok(&["run", "--", "true"]);
    let second = tmp.path().join("evidence-2");
    m.evidence(&second);
    assert!(audit_entries(&second) > entries);

    // A crash: seen, reported, and `start` recovers.
    let pid = m.pid();
    // SAFETY: kill(2) on the machine's QEMU, which this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(m.status()["state"], "died");
    let out = m.run(&["run", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", explain(&out));
    assert!(explain(&out).contains("isocell machine start"), "{}", explain(&out));
    let out = m.run(&["machine", "start"]);
    assert!(out.status.success() && explain(&out).contains("died"), "{}", explain(&out));
    m.ok(&["run", "--", "true"]);

    // A hang (QEMU stopped): seen by its silent heartbeat, and `start` replaces it.
    let pid = m.pid();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(10));
    // A short hang threshold for this one look, so the hang is seen in seconds.
    let out =
        m.cmd(&["machine", "status", "--json"]).env("ISOCELL_MACHINE_HANG_SECS", "8").output();
    let status: Value =
        out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or(Value::Null);
    assert_eq!(status["state"], "hung", "{status}");
    let out = m
        .cmd(&["machine", "start"])
        .env("ISOCELL_MACHINE_HANG_SECS", "8")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success() && explain(&out).contains("has not answered"),
        "{}",
        explain(&out)
    );
    m.ok(&["run", "--", "true"]);
    let last = tmp.path().join("evidence-3");
    m.evidence(&last);

    // Removed: nothing left.
    let out = m.run(&["machine", "rm"]);
    assert!(explain(&out).contains("--force"), "{}", explain(&out));
    m.ok(&["machine", "rm", "--force"]);
    assert!(!m.dir.exists());
    assert!(!qemu_running(&m.dir));
}
