//! containerd in the test host, for the shim's end-to-end tests and benchmark: Debian's
//! containerd and ctr staged with their libraries, the shim and `isocell-cri`, a busybox OCI
//! archive built here, and the shell prelude that starts containerd in a step.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::host::{project_root, Paths};

/// The image the tests run, as `ctr images import` names it.
pub const IMAGE: &str = "docker.io/isocell/busybox:test";

/// Commands the image links to busybox.
const APPLETS: &[&str] = &["sh", "echo", "cat", "sleep", "id", "ls", "pwd", "env", "true", "kill"];

/// What every step starts with: containerd (staged with its libraries) on a private root, the
/// shim on its PATH, and helpers.
const PRELUDE_TEXT: &str = r#"
set -u
C={containerd}
D=/tmp/ctd-$STEP; rm -rf $D; mkdir -p $D /run/containerd
cp {shim} /isocell/bin/containerd-shim-isocell-v2
# The shim converts a container's root with e2fsprogs and veritysetup, found on its PATH.
for p in mke2fs debugfs veritysetup; do
  printf '#!/bin/busybox sh\nexec %s/lib/ld-linux-x86-64.so.2 --library-path %s/lib %s/bin/%s "$@"\n' $C $C $C $p > /isocell/bin/$p
  chmod +x /isocell/bin/$p
done
export PATH=/isocell/bin:$PATH
export ISOCELL_KERNEL={vmlinux} ISOCELL_AGENT_INITRD={agent_initrd}
export ISOCELL_STATE_DIR=${STATE:-$D/isocell} ISOCELL_RUN_DIR=$D/cells
export CONTAINERD_SNAPSHOTTER=native
cat > $D/config.toml <<CONF
version = 2
root = "$D/root"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
CONF
if [ -z "${CRI:-}" ]; then
  sed -i '2i disabled_plugins = ["io.containerd.grpc.v1.cri"]' $D/config.toml
else
  # The CRI plugin as packaging/containerd/isocell.toml configures it, on the native
  # snapshotter (no overlay module in the nested host), host-network pods (no CNI) and
  # the test image as the (never run) sandbox image.
  cat {cri_config} >> $D/config.toml
  cat >> $D/config.toml <<CONF
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$IMG"
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
CONF
  mkdir -p /etc; touch /etc/hosts
fi
ctr() { $C/lib/ld-linux-x86-64.so.2 --library-path $C/lib $C/bin/ctr "$@"; }
start_containerd() {
  $C/lib/ld-linux-x86-64.so.2 --library-path $C/lib $C/bin/containerd --config $D/config.toml >> $D/containerd.log 2>&1 &
  CPID=$!
  for i in $(seq 300); do ctr version > /dev/null 2>&1 && return 0; sleep 0.1; done
  echo containerd_did_not_start; tail -20 $D/containerd.log; return 1
}
R="--runtime io.containerd.isocell.v2"
leftovers() {
  ps -o pid,ppid,stat,args | grep '[i]socell-vmm' | sed 's/^/vmm_process: /'
  echo leftover_vmms=$(ps -o args | grep -c '^[^ ]*isocell-vm[m]')
  echo leftover_shims=$(ps -o args | grep -c '^[^ ]*containerd-shim-isocell-v[2]')
  echo leftover_cgroups=$(find /sys/fs/cgroup/isocell -mindepth 1 -type d 2>/dev/null | wc -l)
  echo leftover_cell_dirs=$(ls -A $D/cells 2>/dev/null | wc -l)
  echo leftover_mounts=$(grep -c 'io.containerd.runtime.v2.task' /proc/mounts)
  echo leftover_bundles=$(ls -A /run/containerd/io.containerd.runtime.v2.task/default 2>/dev/null | wc -l)
}
start_containerd || exit 1
ctr images import {image} > $D/import 2>&1 || { echo import_failed; cat $D/import; exit 1; }
[ -n "${CRI:-}" ] && { ctr -n k8s.io images import {image} > $D/import 2>&1 || { echo import_failed; cat $D/import; exit 1; }; }
"#;

/// The host programs the steps use, staged with their libraries (see [`files`]).
const HOST_PROGRAMS: [&str; 5] = ["containerd", "ctr", "mke2fs", "debugfs", "veritysetup"];

/// The shell a step starts with: `STEP` names it (its directory is `/tmp/ctd-STEP`), `IMG` is
/// [`IMAGE`], `CRI=1` enables containerd's CRI plugin; then the prelude (containerd running, the
/// image imported), then `body`.
pub fn script(step: &str, cri: bool, body: &str) -> String {
    let cri = if cri { "CRI=1" } else { "" };
    format!("STEP={step}\nIMG={IMAGE}\n{cri}\n{PRELUDE_TEXT}\n{body}")
}

/// Stages what the prelude needs under `tmp` and returns the scenario files it names.
pub fn files(tmp: &Path) -> Result<BTreeMap<String, String>, String> {
    let image = tmp.join("busybox.oci.tar");
    busybox_archive(&image)?;
    // containerd and ctr; e2fsprogs and veritysetup, with which the shim converts a root
    // (mke2fs loads libarchive when it reads a tar stream).
    let bundle = tmp.join("containerd");
    let containerd = crate::peer::stage_dynamic(&HOST_PROGRAMS, &bundle)?;
    crate::peer::stage_library("libarchive.so.13", &bundle)?;
    let paths = Paths::discover().map_err(|e| e.to_string())?;
    let cri = paths.runner.with_file_name("isocell-cri");
    if !cri.is_file() {
        return Err(format!(
            "{} is missing: run `cargo build --release --workspace --bins`",
            cri.display()
        ));
    }
    Ok(BTreeMap::from([
        ("image".to_owned(), image.display().to_string()),
        ("containerd".to_owned(), containerd.display().to_string()),
        ("shim".to_owned(), paths.shim.display().to_string()),
        ("cri".to_owned(), cri.display().to_string()),
        (
            "cri_config".to_owned(),
            project_root().join("packaging/containerd/isocell.toml").display().to_string(),
        ),
    ]))
}

/// Writes a one-layer OCI archive of busybox (a shell and its applets) and a passwd, named
/// [`IMAGE`], to `out`.
pub fn busybox_archive(out: &Path) -> Result<(), String> {
    let io = |e: std::io::Error| format!("building the test image {}: {e}", out.display());
    let entry = |kind: tar::EntryType, mode: u32, size: usize| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size as u64);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    let mut layer = tar::Builder::new(Vec::new());
    for d in ["bin", "etc", "tmp", "root"] {
        let mut h = entry(tar::EntryType::Directory, 0o755, 0);
        layer.append_data(&mut h, d, std::io::empty()).map_err(io)?;
    }
    let busybox = std::fs::read("/bin/busybox").map_err(io)?;
    let files: [(&str, u32, &[u8]); 3] = [
        ("bin/busybox", 0o755, &busybox),
        ("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", 0o644, b"root:x:0:\n"),
    ];
    for (path, mode, data) in files {
        let mut h = entry(tar::EntryType::Regular, mode, data.len());
        layer.append_data(&mut h, path, data).map_err(io)?;
    }
    for a in APPLETS {
        let mut h = entry(tar::EntryType::Symlink, 0o777, 0);
        layer.append_link(&mut h, format!("bin/{a}"), "busybox").map_err(io)?;
    }
    let layer = layer.into_inner().map_err(io)?;
    let layer_digest = sha256(&layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["sh"] },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    })
    .to_string();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha256(config.as_bytes()), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar",
                     "digest": layer_digest, "size": layer.len() }],
    })
    .to_string();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(manifest.as_bytes()), "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": { "io.containerd.image.name": IMAGE,
                             "org.opencontainers.image.ref.name": "test" },
        }],
    })
    .to_string();
    let mut archive = tar::Builder::new(std::fs::File::create(out).map_err(io)?);
    let mut add = |name: String, data: &[u8]| {
        let mut h = entry(tar::EntryType::Regular, 0o644, data.len());
        archive.append_data(&mut h, name, data)
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io)?;
    add("index.json".into(), index.as_bytes()).map_err(io)?;
    for blob in [&layer[..], config.as_bytes(), manifest.as_bytes()] {
        add(format!("blobs/sha256/{}", &sha256(blob)[7..]), blob).map_err(io)?;
    }
    archive.into_inner().map_err(io)?.flush().map_err(io)
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}
