//! End-to-end tests of container images as cells (issue 11).
//!
//! This machine's side (no KVM needed): a real registry on 127.0.0.1 (Debian's
//! `docker-registry`), images the tests build from Debian packages (tests/images), pulls,
//! imports from OCI layouts and archives, hostile images, the cache (concurrent pulls, a pull
//! killed half way, prune), admission by digest. Then one test host runs every cell: python3 from
//! the registry image, its OCI archive and its docker archive; a scratch image with one static
//! binary and no shell, for docker run's Entrypoint/Cmd/Env/WorkingDir/User rules; the cell's
//! own /etc files; the measurement; and a tampered block image that dm-verity refuses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use isocell_e2e::{result_of, run_scenario, shell_step, test_images, Registry, Results};
use isocell_testhost::host::Paths;
use isocell_testhost::{Scenario, StepResult};

fn isocell_bin() -> PathBuf {
    Paths::discover().map(|p| p.isocell).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `isocell` on this machine with its own state directory.
fn isocell(state: &Path, args: &[&str]) -> Output {
    Command::new(isocell_bin())
        .args(args)
        .env("ISOCELL_STATE_DIR", state)
        .env("ISOCELL_RUN_DIR", state.join("run"))
        .env_remove("ISOCELL_INSECURE_REGISTRIES")
        .output()
        .unwrap_or_else(|e| panic!("cannot run isocell: {e}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn pull(state: &Path, args: &[&str]) -> String {
    let mut all = vec!["image", "pull"];
    all.extend_from_slice(args);
    let o = isocell(state, &all);
    assert!(o.status.success(), "isocell image pull {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn inspect(state: &Path, name: &str) -> serde_json::Value {
    let o = isocell(state, &["image", "inspect", name]);
    assert!(o.status.success(), "inspect {name}: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("inspect {name}: {e}"))
}

fn manifest_of(state: &Path, name: &str) -> String {
    inspect(state, name)["image"]["manifest_digest"].as_str().unwrap_or_default().to_owned()
}

/// Files left under `dir` (recursively), for "nothing left behind" checks.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

struct Setup {
    registry: Registry,
    images: PathBuf,
    /// This machine's state directory, with every test image pulled.
    state: PathBuf,
    /// Copies of the stores the cells use (no blobs): the good one and one with a flipped byte.
    run_store: PathBuf,
    tampered_store: PathBuf,
    python_ref: String,
    scratch_ref: String,
    scratch_user_ref: String,
    oci_archive_digest: String,
    docker_archive_digest: String,
    scratch_digest: String,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let images = test_images().unwrap_or_else(|e| panic!("building the test images: {e}"));
        let registry = Registry::start().unwrap_or_else(|e| panic!("starting the registry: {e}"));
        let addr = registry.addr();
        let layout = |n: &str| format!("oci:{}", images.join(n).display());
        for (src, dest) in [
            (format!("{}:latest", layout("python")), "isocell-test/python:latest"),
            (format!("{}:latest", layout("scratch")), "isocell-test/scratch:latest"),
            (format!("{}:user", layout("scratch")), "isocell-test/scratch:user"),
        ] {
            registry.push(&src, dest).unwrap_or_else(|e| panic!("push {dest}: {e}"));
        }
        let state = isocell_e2e::static_scratch("state");
        let python_ref = format!("{addr}/isocell-test/python:latest");
        let scratch_ref = format!("{addr}/isocell-test/scratch:latest");
        let scratch_user_ref = format!("{addr}/isocell-test/scratch:user");
        for r in [&python_ref, &scratch_ref, &scratch_user_ref] {
            pull(&state, &["--insecure-registry", &addr, r]);
        }
        let oci_archive =
            format!("oci-archive:{}", images.join("python.oci-archive.tar").display());
        let docker_archive =
            format!("docker-archive:{}", images.join("python.docker-archive.tar").display());
        pull(&state, &[&oci_archive]);
        pull(&state, &[&docker_archive]);
        let oci_archive_digest = manifest_of(&state, &oci_archive);
        let docker_archive_digest = manifest_of(&state, &docker_archive);
        let scratch_digest = manifest_of(&state, &scratch_ref);

        // What the cells need of the store: converted images and names, no blobs.
        let copy_store = |to: &Path| {
            isocell_testhost::registry::copy_converted(&state.join("images"), &to.join("images"))
                .unwrap_or_else(|e| panic!("{e}"));
        };
        let run_store = isocell_e2e::static_scratch("run-store");
        copy_store(&run_store);
        let tampered_store = isocell_e2e::static_scratch("tampered-store");
        copy_store(&tampered_store);
        // One byte of the file system's first block (its superblock), changed after conversion.
        let root = tampered_store
            .join("images/images")
            .join(scratch_digest.trim_start_matches("sha256:"))
            .join("root.img");
        let mut bytes = std::fs::read(&root).expect("read root.img");
        bytes[1024 + 0x78] ^= 0x01;
        std::fs::write(&root, bytes).expect("write root.img");
        Setup {
            registry,
            images,
            state,
            run_store,
            tampered_store,
            python_ref,
            scratch_ref,
            scratch_user_ref,
            oci_archive_digest,
            docker_archive_digest,
            scratch_digest,
        }
    })
}

const PY: &str = "python3 -c 'import sys; print(\"py\", 6 * 7, sys.version_info[0])'";

fn scenario(s: &Setup) -> Scenario {
    let prep = "mkdir -p {work}/state && ln -s {store}/images {work}/state/images";
    let run = format!(
        "{prep} && ISOCELL_RUN_DIR={{work}}/run ISOCELL_STATE_DIR={{work}}/state {{isocell}} run"
    );
    let tampered = "mkdir -p {work}/state && ln -s {tampered}/images {work}/state/images && \
                    ISOCELL_RUN_DIR={work}/run ISOCELL_STATE_DIR={work}/state {isocell} run";
    let receipt = "; grep -o '\"launch\": \"[^\"]*\"' {work}/r.json | cut -d'\"' -f4 | xargs cat";
    let (py, scratch, user) = (&s.python_ref, &s.scratch_ref, &s.scratch_user_ref);
    let steps = vec![
        shell_step("python-registry", &format!("{run} --report {{work}}/r.json {py} -- {PY}{receipt}"), 300),
        shell_step("python-registry-again", &format!("{run} --report {{work}}/r.json {py} -- {PY}{receipt}"), 300),
        shell_step("python-oci-archive", &format!("{run} {} -- {PY}", s.oci_archive_digest), 300),
        shell_step("python-docker-archive", &format!("{run} {} -- {PY}", s.docker_archive_digest), 300),
        shell_step(
            "python-layers-and-etc",
            &format!(
                "{run} {py} -- sh -c 'cat /etc/isocell-test; test -e /etc/debian_version && echo debian_version-present || echo debian_version-whited-out; \
                 ls /etc/isocell-opaque; echo hostname=$(cat /etc/hostname)/$(hostname); grep -c localhost /etc/hosts; \
                 touch /written && echo root-writable; pwd'"
            ),
            300,
        ),
        shell_step("python-user", &format!("{run} --user app {py} -- sh -c 'id -u; id -g; id -G; echo $HOME; pwd'"), 300),
        shell_step("scratch-defaults", &format!("{run} --report {{work}}/r.json {scratch}{receipt}"), 300),
        shell_step(
            "scratch-overrides",
            &format!("{run} -e FOO=mine -e NEW=1 -w /tmp --user 4242:7 {scratch} -- a b"),
            300,
        ),
        shell_step("scratch-entrypoint", &format!("{run} --entrypoint /probe {scratch}"), 300),
        shell_step("scratch-exit", &format!("{run} {scratch} -- exit=3"), 300),
        shell_step("scratch-image-user", &format!("{run} --report {{work}}/r.json {user}{receipt}"), 300),
        shell_step("tampered", &format!("{tampered} {} -- x", s.scratch_digest), 300),
    ];
    let files = BTreeMap::from([
        ("store".to_owned(), s.run_store.display().to_string()),
        ("tampered".to_owned(), s.tampered_store.display().to_string()),
    ]);
    Scenario { steps, files }
}

fn results() -> &'static Results {
    static RESULTS: OnceLock<Results> = OnceLock::new();
    RESULTS.get_or_init(|| run_scenario("images", &scenario(setup())))
}

fn ok(name: &str) -> &'static StepResult {
    let r = result_of(results(), name);
    assert_eq!(r.exit_code, Some(0), "{name}: {}", r.explain());
    r
}

/// The probe's report: argv, cwd, ids and environment.
fn probe(r: &StepResult) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in r.stdout.lines() {
        if let Some(kv) = line.strip_prefix("env:") {
            if let Some((k, v)) = kv.split_once('=') {
                out.insert(format!("env:{k}"), v.to_owned());
            }
        } else if let Some(rest) = line.strip_prefix("uid=") {
            // "uid=U gid=G groups=A,B"
            for part in format!("uid={rest}").split(' ') {
                if let Some((k, v)) = part.split_once('=') {
                    out.insert(k.to_owned(), v.to_owned());
                }
            }
        } else if let Some((k, v)) = line.split_once('=') {
            out.insert(k.to_owned(), v.to_owned());
        }
    }
    out
}

/// The launch receipt a step printed after its output.
fn receipt(r: &StepResult) -> serde_json::Value {
    let start = r.stdout.find("{\n").unwrap_or_else(|| panic!("no receipt in {}", r.stdout));
    let signed: serde_json::Value = serde_json::from_str(&r.stdout[start..])
        .unwrap_or_else(|e| panic!("receipt: {e}: {}", r.stdout));
    signed["receipt"].clone()
}

#[test]
fn python3_runs_from_the_registry_and_both_archives_alike() {
    let outputs: Vec<String> = ["python-registry", "python-oci-archive", "python-docker-archive"]
        .iter()
        .map(|n| ok(n).stdout.lines().next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(outputs[0], "py 42 3");
    assert!(outputs.iter().all(|o| o == &outputs[0]), "{outputs:?}");
}

#[test]
fn layers_whiteouts_and_the_cells_own_etc_files() {
    let out = &ok("python-layers-and-etc").stdout;
    for want in [
        "layer2",
        "debian_version-whited-out",
        "from-layer2",
        "hostname=cell/cell",
        "root-writable",
        "/srv/work",
    ] {
        assert!(out.contains(want), "{want} missing from {out}");
    }
    assert!(!out.contains("from-layer1"), "the opaque directory leaked a lower file: {out}");
}

#[test]
fn users_come_from_the_images_own_passwd_and_group() {
    let out: Vec<&str> = ok("python-user").stdout.lines().collect();
    assert_eq!(out, ["1000", "1000", "1000 2000", "/home/app", "/srv/work"]);
}

#[test]
fn entrypoint_cmd_env_workdir_and_user_follow_docker_run() {
    // Entrypoint + Cmd, the image's Env, WorkingDir created, root, HOME "/" without a passwd.
    let p = probe(ok("scratch-defaults"));
    assert_eq!(p["argv"], r#"["/probe","from-cmd"]"#);
    assert_eq!((p["cwd"].as_str(), p["uid"].as_str(), p["gid"].as_str()), ("/data", "0", "0"));
    assert_eq!(p["env:FOO"], "from-image");
    assert_eq!(p["env:PATH"], "/usr/bin:/bin");
    assert_eq!(p["env:HOME"], "/");
    assert_eq!(p["env:HOSTNAME"], "cell");
    // Arguments replace Cmd; -e overrides and adds; -w and --user override.
    let p = probe(ok("scratch-overrides"));
    assert_eq!(p["argv"], r#"["/probe","a","b"]"#);
    assert_eq!((p["env:FOO"].as_str(), p["env:NEW"].as_str()), ("mine", "1"));
    assert_eq!((p["cwd"].as_str(), p["uid"].as_str(), p["gid"].as_str()), ("/tmp", "4242", "7"));
    // --entrypoint drops the image's Cmd.
    assert_eq!(probe(ok("scratch-entrypoint"))["argv"], r#"["/probe"]"#);
    // The command's status is the cell's.
    assert_eq!(result_of(results(), "scratch-exit").exit_code, Some(3));
    // The image's own User.
    let p = probe(ok("scratch-image-user"));
    assert_eq!((p["uid"].as_str(), p["gid"].as_str()), ("1000", "2000"));
}

#[test]
fn the_measurement_names_the_image_and_changes_only_with_it() {
    let a = receipt(ok("python-registry"));
    let again = receipt(ok("python-registry-again"));
    let scratch = receipt(ok("scratch-defaults"));
    let user = receipt(ok("scratch-image-user"));
    assert_eq!(a["image"]["reference"], setup().python_ref.as_str());
    assert_eq!(a["image"]["verity"]["enabled"], true);
    for key in ["manifest_digest", "config_digest", "block_digest"] {
        assert!(a["image"][key].as_str().is_some_and(|d| d.starts_with("sha256:")), "{key}: {a}");
    }
    assert_eq!(a["launch_digest"], again["launch_digest"], "same image, same launch");
    assert_eq!(a["components"], again["components"]);
    assert_ne!(scratch["launch_digest"], user["launch_digest"], "another image, another launch");
    assert_ne!(scratch["components"]["image"], user["components"]["image"]);
    assert_eq!(scratch["components"]["kernel"], user["components"]["kernel"]);
    assert_eq!(scratch["components"]["vmm"], a["components"]["vmm"]);
}

#[test]
fn a_block_image_changed_after_conversion_fails_inside_the_cell() {
    let r = result_of(results(), "tampered");
    assert_ne!(r.exit_code, Some(0), "{}", r.explain());
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(all.contains("integrity"), "no clear error: {}", r.explain());
}

#[test]
fn conversion_is_reproducible_and_archives_match_the_registry() {
    let s = setup();
    let other = tempfile::tempdir().expect("tempdir");
    let layout = format!("oci:{}:latest", s.images.join("python").display());
    pull(other.path(), &[&layout]);
    let a = inspect(&s.state, &s.python_ref);
    let b = inspect(other.path(), &layout);
    assert_eq!(a["image"]["manifest_digest"], b["image"]["manifest_digest"]);
    assert_eq!(a["image"]["converted"], b["image"]["converted"], "same image, same block image");
    assert_eq!(a["image"]["manifest_digest"].as_str(), Some(s.oci_archive_digest.as_str()));
}

#[test]
fn credentials_from_an_auth_file_open_a_locked_registry() {
    let s = setup();
    let locked = Registry::start_with_auth("alice", "s3cret").expect("auth registry");
    let src = format!("oci:{}:latest", s.images.join("scratch").display());
    locked.push(&src, "private/scratch:1").expect("push");
    let state = tempfile::tempdir().expect("tempdir");
    let reference = format!("{}/private/scratch:1", locked.addr());
    let denied = isocell(
        state.path(),
        &["image", "pull", "--insecure-registry", &locked.addr(), &reference],
    );
    assert!(!denied.status.success());
    assert!(text(&denied).contains("credentials"), "{}", text(&denied));
    let auth = state.path().join("auth.json");
    let token = base64_encode(b"alice:s3cret");
    std::fs::write(&auth, format!(r#"{{"auths":{{"{}":{{"auth":"{token}"}}}}}}"#, locked.addr()))
        .expect("auth file");
    let auth = auth.display().to_string();
    pull(state.path(), &["--insecure-registry", &locked.addr(), "--authfile", &auth, &reference]);
    assert_eq!(manifest_of(state.path(), &reference), s.scratch_digest);
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn plain_http_only_for_registries_marked_insecure() {
    let s = setup();
    let state = tempfile::tempdir().expect("tempdir");
    let o = isocell(state.path(), &["image", "pull", &s.scratch_ref]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--insecure-registry"), "{}", text(&o));
    assert!(state.path().join("images/images").read_dir().is_ok_and(|mut d| d.next().is_none()));
}

/// Writes an OCI layout whose one layer is `tar` (uncompressed), for hostile-image tests.
fn layout_with_layer(dir: &Path, tar: &[u8]) {
    use sha2::{Digest, Sha256};
    let sha = |b: &[u8]| format!("sha256:{:x}", Sha256::digest(b));
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let put = |b: &[u8]| {
        let d = sha(b);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), b).expect("blob");
        d
    };
    let layer = put(tar);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/x"]}},"rootfs":{{"type":"layers","diff_ids":["{layer}"]}}}}"#
    );
    let config_d = put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_d}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{}}}]}}"#,
        config.len(),
        tar.len()
    );
    let manifest_d = put(manifest.as_bytes());
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_d}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"latest"}}}}]}}"#,
            manifest.len()
        ),
    )
    .expect("index");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
}

/// One raw tar entry with the name written byte for byte.
fn entry(name: &str, kind: u8, link: &str, data: &[u8], size: Option<u64>) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    let size = size.unwrap_or(data.len() as u64);
    if size < 1 << 33 {
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    } else {
        // GNU base-256 for sizes past 8 GiB: a set high bit, then big-endian bytes.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

#[test]
fn hostile_images_are_refused_and_leave_nothing_behind() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("dotdot", entry("../escape", b'0', "", b"x", None), "'..'"),
        ("absolute", entry("/etc/passwd", b'0', "", b"x", None), "absolute"),
        (
            "symlink-then-write",
            [entry("etc", b'2', "/", b"", None), entry("etc/passwd", b'0', "", b"x", None)]
                .concat(),
            "symlink",
        ),
        ("hardlink-out", entry("h", b'1', "../../etc/shadow", b"", None), "'..'"),
        ("whiteout-dotdot", entry("a/.wh...", b'0', "", b"", None), "parent"),
        ("device", entry("dev/sda", b'4', "", b"", None), "device node"),
        ("bomb", entry("bomb", b'0', "", b"", Some(10 << 30)), "more than"),
    ];
    for (name, mut tar, why) in cases {
        tar.resize(tar.len() + 1024, 0);
        let dir = tempfile::tempdir().expect("tempdir");
        layout_with_layer(dir.path(), &tar);
        let state = tempfile::tempdir().expect("tempdir");
        let o = isocell(state.path(), &["image", "pull", &format!("oci:{}", dir.path().display())]);
        let out = text(&o);
        assert!(!o.status.success(), "{name} was accepted");
        assert!(out.contains("layer 1 of 1") && out.contains(why), "{name}: {out}");
        let images = state.path().join("images");
        assert!(files_under(&images.join("images")).is_empty(), "{name} left an image");
        assert!(files_under(&images.join("tmp")).is_empty(), "{name} left work files");
    }
}

#[test]
fn a_blob_that_lies_about_its_digest_or_size_is_never_kept() {
    let s = setup();
    for (name, damage) in [("digest", 0usize), ("truncated", 1)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = dir.path().join("scratch");
        let ok = Command::new("cp").arg("-a").arg(s.images.join("scratch")).arg(&copy).status();
        assert!(ok.is_ok_and(|s| s.success()));
        // The largest blob is the layer.
        let layer = files_under(&copy.join("blobs"))
            .into_iter()
            .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .expect("a layer");
        let mut bytes = std::fs::read(&layer).expect("read");
        if damage == 0 {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
        } else {
            bytes.truncate(bytes.len() - 100);
        }
        std::fs::write(&layer, bytes).expect("write");
        let state = tempfile::tempdir().expect("tempdir");
        let o =
            isocell(state.path(), &["image", "pull", &format!("oci:{}:latest", copy.display())]);
        let out = text(&o);
        assert!(!o.status.success(), "{name}: accepted");
        let want = if damage == 0 { "does not match its digest" } else { "truncated" };
        assert!(out.contains(want), "{name}: {out}");
        let kept = files_under(&state.path().join("images/blobs"));
        assert!(
            kept.iter().all(|p| !p.ends_with(layer.file_name().unwrap_or_default())),
            "{name}: kept"
        );
        assert!(files_under(&state.path().join("images/images")).is_empty());
    }
}

#[test]
fn concurrent_pulls_convert_once_and_a_killed_pull_leaves_nothing_complete() {
    let s = setup();
    let state = tempfile::tempdir().expect("tempdir");
    let layout = format!("oci:{}:latest", s.images.join("python").display());
    let spawn = || {
        Command::new(isocell_bin())
            .args(["image", "pull", &layout])
            .env("ISOCELL_STATE_DIR", state.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    // Killed half way through its conversion: no image appears, and the next pull works.
    let mut victim = spawn();
    let tmp = state.path().join("images/tmp");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !files_under(&tmp).iter().any(|p| p.ends_with("root.img"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = victim.kill();
    let _ = victim.wait();
    assert!(
        files_under(&state.path().join("images/images")).is_empty(),
        "a killed pull left an image"
    );
    let ls = isocell(state.path(), &["image", "ls", "--json"]);
    assert_eq!(String::from_utf8_lossy(&ls.stdout).trim(), "[]");

    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().expect("wait"), b.wait_with_output().expect("wait"));
    assert!(a.status.success() && b.status.success(), "{} {}", text(&a), text(&b));
    let said = format!("{}{}", text(&a), text(&b));
    assert_eq!(said.matches("converted in").count(), 1, "converted twice: {said}");
    assert_eq!(said.matches("already converted").count(), 1, "{said}");
    assert!(files_under(&tmp).is_empty(), "work files left: {:?}", files_under(&tmp));

    // rm and prune free everything.
    let rm = isocell(state.path(), &["image", "rm", &layout]);
    assert!(rm.status.success(), "{}", text(&rm));
    assert!(files_under(&state.path().join("images/images")).is_empty());
    assert!(files_under(&state.path().join("images/blobs")).is_empty());
    pull(state.path(), &[&layout]);
    let prune = isocell(state.path(), &["image", "prune", "--keep-bytes", "0"]);
    assert!(prune.status.success(), "{}", text(&prune));
    assert!(files_under(&state.path().join("images/images")).is_empty(), "{}", text(&prune));
}

#[test]
fn admission_by_digest_starts_nothing_when_denied() {
    let s = setup();
    let state = s.state.as_path();
    let other = format!("sha256:{}", "0".repeat(64));
    let o = isocell(state, &["run", "--allow-image-digest", &other, &s.scratch_ref, "--", "x"]);
    assert_eq!(o.status.code(), Some(77), "{}", text(&o));
    assert!(text(&o).contains("image-digest"), "{}", text(&o));
    // A tag is not enough for confidential data; the same image by digest passes that rule.
    let o = isocell(state, &["run", "--classification", "confidential", &s.scratch_ref, "--", "x"]);
    assert_eq!(o.status.code(), Some(77), "{}", text(&o));
    assert!(text(&o).contains("classified-needs-pinned-image"), "{}", text(&o));
    let pinned = format!("{}@{}", s.scratch_ref.trim_end_matches(":latest"), s.scratch_digest);
    let o = isocell(
        state,
        &[
            "run",
            "--classification",
            "confidential",
            "--insecure-registry",
            &s.registry.addr(),
            &pinned,
            "--",
            "x",
        ],
    );
    assert!(!text(&o).contains("classified-needs-pinned-image"), "{}", text(&o));
    assert!(files_under(&state.join("run")).is_empty(), "a denied cell left files");
}
