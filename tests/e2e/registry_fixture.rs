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
