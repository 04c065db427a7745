//! Runs the steps of a scenario on the host it finds itself on (the nested host, or this machine
//! when it has hardware KVM) and reports one [`StepResult`] per step.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The process id of the step running now (0 between steps, -1 while one is being spawned):
/// what [`reap_orphans`] leaves to the step's own wait.
static STEP_CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Reaps orphans, as an init does: the runner is PID 1 of the nested host (or the subreaper of
/// its steps in a machine), and a process whose parent died before waiting for it (a VMM whose
/// jailer was killed) is this process's to reap.
/// Every exited child but the current step is reaped; the step's own exit is left for its wait.
/// Runs forever on a thread of its own.
pub fn reap_orphans() {
    let _ = std::thread::Builder::new().name("reaper".into()).spawn(|| loop {
        loop {
            // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid with WNOWAIT only looks at an exited child; `info` is ours.
            let r = unsafe {
                libc::waitid(
                    libc::P_ALL,
                    0,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            // SAFETY: si_pid is set by a successful waitid (0 when no child has exited).
            let pid = unsafe { info.si_pid() };
            let step = STEP_CHILD.load(std::sync::atomic::Ordering::SeqCst);
            if r != 0 || pid == 0 || step == -1 || pid == step {
                break;
            }
            // SAFETY: reaps exactly the exited child waitid named.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        }
        std::thread::sleep(Duration::from_millis(200));
    });
}

use crate::scenario::{guest_results, Scenario, Step, StepResult};

/// How much of a step's stdout and stderr is kept.
const OUTPUT_TAIL: u64 = 64 * 1024;

/// Named host paths that replace `{name}` placeholders.
pub type Assets = BTreeMap<String, PathBuf>;

fn substitute(text: &str, assets: &Assets, work: &Path) -> String {
    let mut s = text.replace("{work}", &work.to_string_lossy());
    for (name, path) in assets {
        s = s.replace(&format!("{{{name}}}"), &path.to_string_lossy());
    }
    s
}

fn tail(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len > OUTPUT_TAIL {
            use std::io::{Seek, SeekFrom};
            let _ = f.seek(SeekFrom::Start(len - OUTPUT_TAIL));
        }
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// SHA-256 of a file, in hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Runs one step in `work_root/<name>`.
pub fn run_step(step: &Step, assets: &Assets, work_root: &Path, host: &str) -> StepResult {
    let work = work_root.join(&step.name);
    let mut result = StepResult {
        name: step.name.clone(),
        exit_code: None,
        signal: None,
        timed_out: false,
        wall_us: 0,
        stdout: String::new(),
        stderr: String::new(),
        report: None,
        guest_results: Vec::new(),
        hashes: BTreeMap::new(),
        host: host.to_owned(),
        error: None,
    };
    if let Err(e) = std::fs::create_dir_all(&work) {
        result.error = Some(format!("cannot create {}: {e}", work.display()));
        return result;
    }
    for (path, size) in &step.create_files {
        let path = substitute(path, assets, &work);
        if let Err(e) = File::create(&path).and_then(|f| f.set_len(*size)) {
            result.error = Some(format!("cannot create {path}: {e}"));
            return result;
        }
    }
    for (path, text) in &step.write_files {
        let path = substitute(path, assets, &work);
        if let Err(e) = std::fs::write(&path, substitute(text, assets, &work)) {
            result.error = Some(format!("cannot write {path}: {e}"));
            return result;
        }
    }
    let argv: Vec<String> = step.argv.iter().map(|a| substitute(a, assets, &work)).collect();
    let Some((program, args)) = argv.split_first() else {
        result.error = Some("empty argv".into());
        return result;
    };
    let (out_path, err_path) = (work.join("stdout"), work.join("stderr"));
    STEP_CHILD.store(-1, std::sync::atomic::Ordering::SeqCst);
    let spawned = File::create(&out_path).and_then(|out| {
        let err = File::create(&err_path)?;
        let start = Instant::now();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        Ok((start, child))
    });
    let (start, mut child) = match spawned {
        Ok(v) => {
            STEP_CHILD
                .store(i32::try_from(v.1.id()).unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
            v
        }
        Err(e) => {
            STEP_CHILD.store(0, std::sync::atomic::Ordering::SeqCst);
            result.error = Some(format!("cannot run {program}: {e}"));
            return result;
        }
    };
    let deadline = Duration::from_secs(step.timeout_secs);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() >= deadline => {
                result.timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => {
                result.error = Some(format!("wait failed: {e}"));
                break None;
            }
        }
    };
    STEP_CHILD.store(0, std::sync::atomic::Ordering::SeqCst);
    result.wall_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    if let Some(s) = status {
        result.exit_code = s.code();
        result.signal = s.signal();
    }
    result.stdout = tail(&out_path);
    result.stderr = tail(&err_path);
    result.guest_results = guest_results(&result.stdout);
    if let Some(report) = &step.report_file {
        let path = substitute(report, assets, &work);
        result.report =
            std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok());
    }
    for path in &step.hash_files {
        let full = substitute(path, assets, &work);
        if let Ok(h) = sha256_file(Path::new(&full)) {
            result.hashes.insert(path.clone(), h);
        }
    }
    // The step's scratch files (disk images, logs) are not needed once reported.
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Runs every step in order, handing each result to `sink` as soon as it exists.
pub fn run_scenario(
    scenario: &Scenario,
    assets: &Assets,
    work_root: &Path,
    host: &str,
    mut sink: impl FnMut(&StepResult),
) {
    for step in &scenario.steps {
        let r = run_step(step, assets, work_root, host);
        eprintln!(
            "isocell-testhost: step {}: exit {:?} signal {:?}{} in {:.2} s",
            r.name,
            r.exit_code,
            r.signal,
            if r.timed_out { " (timed out)" } else { "" },
            r.wall_us as f64 / 1e6
        );
        sink(&r);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn step(name: &str, argv: &[&str], timeout_secs: u64) -> Step {
        Step::new(name, argv, timeout_secs)
    }

    #[test]
    fn captures_status_output_and_files() {
        let scratch = tempfile::Builder::new().prefix("isocell-runner-").tempdir().unwrap();
        let root = scratch.path();
        let mut s = step(
            "write",
            &[
                "/bin/sh",
                "-c",
                "echo 'ISOCELL-RESULT {\"x\": 1}'; echo err >&2; printf abc > {work}/f; exit 3",
            ],
            30,
        );
        s.hash_files = vec!["{work}/f".into()];
        let r = run_step(&s, &Assets::new(), root, "direct");
        assert_eq!(r.exit_code, Some(3), "{}", r.explain());
        assert_eq!(r.guest_result()["x"], 1);
        assert_eq!(r.stderr.trim(), "err");
        assert_eq!(
            r.hashes["{work}/f"],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(!root.join("write").exists());
    }

    #[test]
    fn kills_at_the_timeout() {
        let scratch = tempfile::Builder::new().prefix("isocell-runner-").tempdir().unwrap();
        let r = run_step(
            &step("hang", &["/bin/sleep", "100"], 1),
            &Assets::new(),
            scratch.path(),
            "direct",
        );
        assert!(r.timed_out);
        assert_eq!(r.signal, Some(9));
        assert!(r.wall_us < 50_000_000);
    }

    #[test]
    fn substitutes_assets() {
        let mut a = Assets::new();
        a.insert("vmm".into(), "/x/isocell-vmm".into());
        assert_eq!(
            substitute("{vmm} --report {work}/r", &a, Path::new("/w")),
            "/x/isocell-vmm --report /w/r"
        );
    }
}
