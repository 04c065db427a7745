//! The image tests' fixtures work: the test images build, a real registry starts on 127.0.0.1,
//! takes pushes that keep the images' manifests byte for byte (same digests), enforces basic
//! auth when asked, and leaves neither a process nor a directory behind once dropped.

use std::path::Path;

use isocell_e2e::{layout_digest, test_images, Registry};

/// Whether process `pid` still exists as the registry (not reaped, or reused by another program).
fn registry_running(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| String::from_utf8_lossy(&cmdline).contains("docker-registry"))
        .unwrap_or(false)
}

#[test]
fn pushed_images_keep_their_manifest_digests() {
    let images = test_images().expect("test images");
    let registry = Registry::start().expect("registry");
    for (layout, tag, dest) in [
        ("python", "latest", "isocell-test/python:latest"),
        ("scratch", "latest", "isocell-test/scratch:latest"),
        ("scratch", "user", "isocell-test/scratch:user"),
    ] {
        let layout = images.join(layout);
        let src = format!("oci:{}:{tag}", layout.display());
        let pushed = registry.push(&src, dest).unwrap_or_else(|e| {
            panic!("push {src}: {e}\nregistry log:\n{}", registry.log());
        });
        assert_eq!(pushed, format!("{}/{dest}", registry.addr()));
        let want = layout_digest(&layout, tag).expect("layout digest");
        let got = registry.remote_digest(dest).expect("skopeo inspect");
        assert_eq!(got, want, "{src} pushed as {pushed}");
    }
    // The two scratch tags differ only in their configs: distinct manifests.
    assert_ne!(
        registry.remote_digest("isocell-test/scratch:latest").expect("inspect latest"),
        registry.remote_digest("isocell-test/scratch:user").expect("inspect user"),
    );
}

#[test]
fn archives_hold_the_same_image() {
    let images = test_images().expect("test images");
    let registry = Registry::start().expect("registry");
    let oci = format!("oci-archive:{}:latest", images.join("python.oci-archive.tar").display());
    registry.push(&oci, "from/oci-archive:latest").expect("push the OCI archive");
    assert_eq!(
        registry.remote_digest("from/oci-archive:latest").expect("inspect"),
        layout_digest(&images.join("python"), "latest").expect("layout digest"),
        "an OCI archive copied unchanged keeps the layout's manifest"
    );
    // A docker archive holds uncompressed layers and a Docker config: another manifest, but the
    // same layers (diff ids) and the same configuration.
    let docker = format!("docker-archive:{}", images.join("python.docker-archive.tar").display());
    registry.push(&docker, "from/docker-archive:latest").expect("push the docker archive");
    let inspect = |repo_tag: &str| -> serde_json::Value {
        let args = [
            "inspect".to_owned(),
            "--config".into(),
            "--tls-verify=false".into(),
            registry.docker_ref(repo_tag),
        ];
        let out = isocell_e2e::registry::skopeo(&args).expect("skopeo inspect --config");
        serde_json::from_str(&out).expect("config JSON")
    };
    let from_oci = inspect("from/oci-archive:latest");
    let from_docker = inspect("from/docker-archive:latest");
    assert_eq!(from_oci["rootfs"], from_docker["rootfs"]);
    for key in ["Env", "Cmd", "WorkingDir"] {
        assert_eq!(from_oci["config"][key], from_docker["config"][key], "{key}");
    }
    assert_eq!(from_oci["config"]["WorkingDir"], "/srv/work");
}

#[test]
fn auth_registry_refuses_pushes_without_credentials() {
    let images = test_images().expect("test images");
    let registry = Registry::start_with_auth("isocell", "s3cret pass").expect("registry with auth");
    assert_eq!(registry.creds(), Some(("isocell", "s3cret pass")));
    let src = format!("oci:{}:latest", images.join("scratch").display());
    let pushed = registry.push(&src, "private/scratch:latest").expect("push with credentials");
    assert_eq!(
        registry.remote_digest("private/scratch:latest").expect("inspect with credentials"),
        layout_digest(&images.join("scratch"), "latest").expect("layout digest"),
    );
    let anonymous = isocell_e2e::registry::skopeo(&[
        "inspect".into(),
        "--tls-verify=false".into(),
        "--no-creds".into(),
        format!("docker://{pushed}"),
    ]);
    assert!(anonymous.is_err(), "anonymous inspect succeeded: {anonymous:?}");
    let wrong = isocell_e2e::registry::skopeo(&[
        "inspect".into(),
        "--tls-verify=false".into(),
        "--creds=isocell:wrong".into(),
        format!("docker://{pushed}"),
    ]);
    assert!(wrong.is_err(), "inspect with a wrong password succeeded: {wrong:?}");
}

#[test]
fn dropping_the_registry_stops_it_and_removes_its_directory() {
    let registry = Registry::start().expect("registry");
    let (pid, dir, addr) = (registry.pid(), registry.dir().to_owned(), registry.addr());
    assert!(registry_running(pid), "registry {pid} not running");
    assert!(dir.join("config.yml").is_file());
    drop(registry);
    assert!(!registry_running(pid), "registry {pid} still running after drop");
    assert!(!Path::new(&dir).exists(), "{} left behind", dir.display());
    assert!(std::net::TcpStream::connect(&addr).is_err(), "{addr} still answers");
}

/// Not a test of its own: run by the one below in a process of its own, it starts a registry,
/// says where its directory is and exits without dropping it (as a registry held in a static).
#[test]
#[ignore = "run by a_registry_never_dropped_goes_with_its_process"]
fn start_a_registry_and_exit_without_dropping_it() {
    let registry = Registry::start().expect("registry");
    println!("registry_dir={}", registry.dir().display());
    std::mem::forget(registry);
    std::process::exit(0);
}

#[test]
fn a_registry_never_dropped_goes_with_its_process() {
    let exe = std::env::current_exe().expect("this test binary");
    let out = std::process::Command::new(exe)
        .args(["--ignored", "--exact", "start_a_registry_and_exit_without_dropping_it"])
        .args(["--nocapture", "--test-threads=1"])
        .output()
        .expect("run the helper test");
    let text = String::from_utf8_lossy(&out.stdout);
    let dir = text
        .lines()
        .find_map(|l| l.split("registry_dir=").nth(1))
        .unwrap_or_else(|| panic!("no directory in {text}"));
    // Its process is gone: the registry ends and its directory goes, within a few seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while Path::new(dir).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!Path::new(dir).exists(), "{dir} left behind");
    let running = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c).contains(dir));
    assert!(!running, "a registry for {dir} still runs");
}
