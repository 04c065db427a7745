//! Hostile host input, through the real `isocell` binary: every `isocell run` option and spec
//! field with out-of-range, huge, empty, wrong-type and special-file values. Each gets its
//! documented exit status and a clear message, starts nothing and leaves nothing. None of this
//! needs a guest: the kernel and image are small files, and the "VMM" is a script that leaves a
//! mark if it is ever started.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::process::{Output, Stdio};

mod common;
use common::Env;

impl Env {
    fn run(&self, args: &[&str]) -> Output {
        self.isocell(args)
    }

    /// Nothing was started and nothing is left in the run directory.
    fn assert_nothing_left(&self, what: &str) {
        assert!(!self.vmm_started(), "{what}: a VMM was started");
        let left: Vec<_> = fs::read_dir(self.dir.join("run")).unwrap().collect();
        assert!(left.is_empty(), "{what}: left {left:?} in the run directory");
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn every_bad_option_is_refused_with_a_clear_message() {
    let env = Env::new("hostile", "options");
    let fifo = env.path("fifo");
    let c = std::ffi::CString::new(fifo.clone()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::os::unix::fs::symlink(env.path("loop"), env.path("loop")).unwrap();
    fs::write(env.path("big.toml"), vec![b'#'; 2 << 20]).unwrap();
    fs::write(env.path("huge-timeout.toml"), "timeout_secs = 18446744073709551615\n").unwrap();
    fs::write(env.path("bad-field.toml"), "cpus = \"many\"\n").unwrap();
    let input_fifo = format!("{fifo}:/f");
    let input_loop = format!("{}:/l", env.path("loop"));
    let spec_big = env.path("big.toml");
    let spec_huge = env.path("huge-timeout.toml");
    let spec_bad = env.path("bad-field.toml");
    let long_name = format!("{}:443", "a".repeat(300));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--timeout", "18446744073709550936"], "between 1 and"),
        (vec!["--timeout", "0"], "between 1 and"),
        (vec!["--timeout", "-1"], "'-1'"),
        (vec!["--timeout", ""], "--timeout"),
        (vec!["--boot-timeout", "18446744073709551615"], "between 1 and"),
        (vec!["--copy-timeout", "0"], "between 1 and"),
        (vec!["--max-lifetime", "9223372036854775808"], "between 1 and"),
        (vec!["--max-lifetime", "0"], "between 1 and"),
        (vec!["--cpus", "0"], "1 to 32 vCPUs"),
        (vec!["--cpus", "99999999999999999999999"], "--cpus"),
        (vec!["--memory", "2T"], "1 TiB"),
        // Accepted as a size (before: "give MiB as a number"), then more than this host has.
        (vec!["--memory", "1T"], "more than this host's"),
        (vec!["--memory", ""], "--memory"),
        (vec!["--memory", "lots"], "--memory"),
        (vec!["--memory", "99999999999999999999G"], "--memory"),
        (vec!["--output-max-bytes", "x"], "--output-max-bytes"),
        (vec!["--output-max-bytes", "99999999999T"], "--output-max-bytes"),
        (vec!["--input", "/dev/zero:/z"], "not a regular file or directory"),
        (vec!["--input", &input_fifo], "not a regular file or directory"),
        (vec!["--input", &input_loop], "symbolic links"),
        (vec!["--input", "/no/such/file:/x"], "does not exist"),
        (vec!["--output", "/x:/no/such/dir/x"], "does not exist"),
        (vec!["--output", "relative:/tmp/x"], "must be absolute"),
        (vec!["--spec", "/dev/zero"], "not a regular file"),
        (vec!["--spec", &fifo], "not a regular file"),
        (vec!["--spec", &spec_big], "too large"),
        (vec!["--spec", &spec_huge], "between 1 and"),
        (vec!["--spec", &spec_bad], "invalid"),
        (vec!["--policy", "/dev/zero"], "not a regular file"),
        (vec!["--image", "/dev/null"], "not a regular file"),
        (vec!["--kernel", "/no/such/kernel"], "does not exist"),
        (vec!["--env", "=x"], "NAME=VALUE"),
        (vec!["--user", "root"], "--user"),
        (vec!["--workdir", "relative"], "absolute"),
        (vec!["--allow-image-digest", "sha256:zz"], "64 hex digits"),
        (vec!["--classification", "secret"], "--classification"),
        (vec!["--egress", ""], "egress rule"),
        (vec!["--egress", &long_name], "not a host name"),
        (vec!["--egress", "[::1]:443"], "IPv6"),
        (vec!["--egress", "10.0.0.1/8:80"], "host bits"),
        (vec!["--egress", "*.com:443"], "too wide"),
        (vec!["--publish", "99999:80"], "not a port"),
        (vec!["--publish", "8080:80", "--publish", "8080:81"], "published twice"),
        (vec!["--snapshot", ""], "snapshot name"),
        (vec!["--snapshot", "../../etc"], "snapshot name"),
        (vec!["--snapshot", &long_name], "snapshot name"),
        (vec!["--snapshot", "missing"], "no snapshot named missing"),
        (vec!["--snapshot", "base", "--cpus", "2"], "cannot be used with"),
        (vec!["--snapshot", "base", "--egress", "example.com:443"], "cannot be used with"),
    ];
    let mut wrong = Vec::new();
    for (flags, expect) in cases {
        let mut args = vec!["run", "--no-jail"];
        args.extend(flags.iter().copied());
        args.extend(["--", "true"]);
        let out = env.run(&args);
        let what = flags.join(" ");
        let message = stderr(&out);
        if out.status.code() != Some(125) || !message.contains(expect) || message.len() > 2000 {
            wrong.push(format!("{what}: {:?} {message}", out.status.code()));
        }
        env.assert_nothing_left(&what);
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn an_unwritable_stderr_changes_no_exit_status() {
    let env = Env::new("hostile", "stderr");
    let full = || fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    // Denied (public data only without a jail): 77, not an abort.
    let out = env
        .command(&["run", "--no-jail", "--classification", "confidential", "--", "true"])
        .stderr(full())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(77));
    // A bad option: 125.
    let out =
        env.command(&["run", "--timeout", "0", "--", "true"]).stderr(full()).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    // Closed stderr.
    let out = env
        .command(&["run", "--no-jail", "--classification", "confidential", "--", "true"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(77));
    env.assert_nothing_left("stderr");
}
