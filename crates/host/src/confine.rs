//! How one cell's VMM is confined (the jail, its cgroup limits, the VMM's seccomp filters) and
//! the cell's attack surface, generated from those same structures and the device plan.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use isocell_jail::cgroup::Limits;
use isocell_jail::{BindMount, JailSpec, Rlimits, CELL_DIR};
use isocell_spec::VmConfig;
use isocell_vmm_model::device_plan::DevicePlan;
use serde_json::{json, Value};

/// Where the VMM binary appears in the jail.
const JAIL_VMM: &str = "/isocell-vmm";
/// Where the cell kernel appears in the jail.
const JAIL_KERNEL: &str = "/boot/vmlinux";
/// Where the agent's initramfs appears in the jail.
const JAIL_INITRD: &str = "/boot/agent-initrd.cpio";
/// Where the root image appears in the jail.
const JAIL_IMAGE: &str = "/disks/root.img";
/// The most `isocell-vmm --describe-cpuid` may print (its JSON is a few KiB).
const CPUID_OUTPUT_LIMIT: u64 = 1 << 20;
/// How long `isocell-vmm --describe-cpuid` may take.
const CPUID_TIMEOUT: Duration = Duration::from_secs(10);

/// A cell's jail: the spec the jailer enforces and the cgroup limits `isocell` sets.
pub struct JailPlan {
    /// The `isocell-jailer` binary.
    pub jailer: PathBuf,
    /// What the jailer sets up.
    pub spec: JailSpec,
    /// The cell's cgroup limits.
    pub limits: Limits,
}

/// The paths the VMM is given, as it sees them (inside the jail, or on the host).
pub struct VmmView {
    /// Cell kernel.
    pub kernel: PathBuf,
    /// The agent's initramfs.
    pub initrd: PathBuf,
    /// Root image.
    pub image: PathBuf,
    /// The directory shared with `isocell`: config, sockets, console, report.
    pub cell_dir: PathBuf,
}

/// A file a cell is launched from that cannot be opened (see [`Pinned`]).
#[derive(Debug, thiserror::Error)]
#[error("cannot open {}: {source}", path.display())]
pub struct PinError {
    /// The file.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

/// The kernel, initramfs, image and VMM binary held open from the moment they are measured:
/// the launch measurement reads them through these descriptors and the jail mounts exactly
/// these files, so replacing a path after the measurement changes nothing that runs.
pub struct Pinned {
    kernel: std::fs::File,
    initrd: std::fs::File,
    image: std::fs::File,
    vmm: std::fs::File,
}

impl Pinned {
    /// Opens the four files.
    pub fn open(from: &Binaries) -> Result<Pinned, PinError> {
        let open = |p: &Path| {
            std::fs::File::open(p).map_err(|source| PinError { path: p.to_owned(), source })
        };
        Ok(Pinned {
            kernel: open(from.kernel)?,
            initrd: open(from.initrd)?,
            image: open(from.image)?,
            vmm: open(from.vmm)?,
        })
    }

    /// `(kernel, image, vmm)` as paths this process can read them by.
    pub fn own_paths(&self) -> (PathBuf, PathBuf, PathBuf) {
        self.paths("self")
    }

    /// The initramfs as a path this process can read it by.
    pub fn own_initrd_path(&self) -> PathBuf {
        Self::path("self", &self.initrd)
    }

    fn path(pid: &str, f: &std::fs::File) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/{pid}/fd/{}", f.as_raw_fd()))
    }

    fn paths(&self, pid: &str) -> (PathBuf, PathBuf, PathBuf) {
        let p = |f| Self::path(pid, f);
        (p(&self.kernel), p(&self.image), p(&self.vmm))
    }
}

/// The host files a cell is launched from.
pub struct Binaries<'a> {
    /// Cell kernel.
    pub kernel: &'a Path,
    /// The agent's initramfs.
    pub initrd: &'a Path,
    /// Root image.
    pub image: &'a Path,
    /// `isocell-vmm`.
    pub vmm: &'a Path,
    /// `isocell-jailer`; `None` runs the VMM unjailed.
    pub jailer: Option<&'a Path>,
}

/// The host directory of cell `id`, its shared subdirectory and its jail's mount point.
pub fn host_dirs(run_dir: &Path, id: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = run_dir.join(id);
    (dir.clone(), dir.join("cell"), dir.join("root"))
}

/// Plans the confinement of cell `id`: with `jailer`, a jail seeing only the kernel, the agent's
/// initramfs, the image, the VMM binary, the cell's directory, /dev/kvm and /dev/urandom;
/// without, the host's paths.
pub fn plan(
    run_dir: &Path,
    id: &str,
    from: &Binaries,
    pinned: Option<&Pinned>,
    vcpus: u8,
    memory_mib: u64,
) -> (VmmView, Option<JailPlan>) {
    let (_, cell_dir, root) = host_dirs(run_dir, id);
    let Some(jailer) = from.jailer else {
        let view = VmmView {
            kernel: from.kernel.to_owned(),
            initrd: from.initrd.to_owned(),
            image: from.image.to_owned(),
            cell_dir,
        };
        return (view, None);
    };
    let uid = isocell_jail::cell_uid(id);
    // The jailer is our child and root: it reaches our descriptors through /proc/OUR_PID/fd.
    let pid = std::process::id().to_string();
    let held = pinned.map(|p| p.paths(&pid));
    let held_initrd = pinned.map(|p| Pinned::path(&pid, &p.initrd));
    let ro = |host: &Path, jail: &str, pin: Option<PathBuf>| BindMount {
        host: host.to_owned(),
        jail: jail.into(),
        writable: false,
        exec: false,
        pinned: pin,
    };
    let (k, i, v) = match held {
        Some((k, i, v)) => (Some(k), Some(i), Some(v)),
        None => (None, None, None),
    };
    let mut vmm_mount = ro(from.vmm, JAIL_VMM, v);
    vmm_mount.exec = true;
    let spec = JailSpec {
        cell_id: id.to_owned(),
        root,
        cgroup: None,
        parent: None,
        uid,
        gid: uid,
        groups: Vec::new(),
        mounts: vec![
            vmm_mount,
            ro(from.kernel, JAIL_KERNEL, k),
            ro(from.initrd, JAIL_INITRD, held_initrd),
            ro(from.image, JAIL_IMAGE, i),
            BindMount {
                host: cell_dir,
                jail: CELL_DIR.into(),
                writable: true,
                exec: false,
                pinned: None,
            },
        ],
        devices: vec![isocell_jail::kvm_device(), isocell_jail::urandom_device()],
        rlimits: Rlimits::default(),
        argv: vec![
            JAIL_VMM.into(),
            "--config".into(),
            format!("{CELL_DIR}/vm.json"),
            "--report".into(),
            format!("{CELL_DIR}/vmm-report.json"),
            // `isocell run` checks the host before starting a cell; the jail hides what the
            // VMM would look at.
            "--host-checked".into(),
        ],
    };
    let view = VmmView {
        kernel: JAIL_KERNEL.into(),
        initrd: JAIL_INITRD.into(),
        image: JAIL_IMAGE.into(),
        cell_dir: CELL_DIR.into(),
    };
    let plan =
        JailPlan { jailer: jailer.to_owned(), spec, limits: Limits::for_cell(vcpus, memory_mib) };
    (view, Some(plan))
}

/// The attack surface of a cell: its devices (address ranges, IRQs, offered virtio features,
/// and, for a cell that ran, those the guest negotiated), the CPU it is told about (asked of the
/// VMM binary `vmm`, see [`describe_cpuid`]), the VMM's seccomp rules per thread, and the jail
/// (files, namespaces, uid/gid, cgroup limits, rlimits).
pub fn surface(
    vmm: &Path,
    config: &VmConfig,
    plan: &DevicePlan,
    jail: Option<&JailPlan>,
    negotiated: Option<&Value>,
    network: &isocell_spec::Network,
) -> Value {
    let devices: Vec<Value> = plan
        .devices
        .iter()
        .map(|d| {
            let mut v = serde_json::to_value(d).unwrap_or_default();
            if let Some(n) = negotiated.and_then(|n| n.get(&d.id)) {
                v["negotiated_features"] = n.clone();
            }
            v
        })
        .collect();
    json!({
        "version": 1,
        "vm": { "vcpus": config.vcpus, "memory_mib": config.memory_mib },
        "devices": devices,
        // The tables that describe the machine to the guest (command line, MP table, ACPI), and
        // the CPU it is told about (this host's, normalised; the choices, not every leaf).
        "firmware": isocell_vmm_model::descriptions(config, plan),
        "cpu": describe_cpuid(vmm, config.vcpus),
        "seccomp": isocell_vmm_model::seccomp::describe(),
        "jail": match jail {
            Some(j) => j.spec.surface(Some(&j.limits)),
            None => json!({ "enabled": false }),
        },
        "network": network_surface(network),
    })
}

/// The network part of a surface: `"none"`, or each egress rule and published port (so a
/// `--diff` against a narrower cell names every rule that widens it).
pub fn network_surface(n: &isocell_spec::Network) -> Value {
    if n.is_none() {
        return json!("none");
    }
    json!({
        "egress": n.egress_strings(),
        "publish": n.publish_strings(),
        "device": "none: TCP is relayed over vsock by the agent and the host",
        "dns": if n.egress.is_empty() { "none" } else { "answered by the host for allowed names only" },
        "udp": "not carried (DNS only)",
        "ipv6": "not carried",
    })
}

/// The CPUID choices vCPU 0 of a cell with `vcpus` vCPUs would see on this host, as the VMM
/// binary `vmm` reports them (`isocell-vmm --describe-cpuid VCPUS`, which asks KVM; this crate
/// links no KVM code), or `{"unavailable": why}` if it cannot say. Its output is read up to
/// [`CPUID_OUTPUT_LIMIT`] and it is killed after [`CPUID_TIMEOUT`].
pub fn describe_cpuid(vmm: &Path, vcpus: u8) -> Value {
    run_describe_cpuid(vmm, vcpus).unwrap_or_else(|why| json!({ "unavailable": why.to_string() }))
}

/// Why `isocell-vmm --describe-cpuid` gave no description; `what` is the command line.
#[derive(Debug, thiserror::Error)]
enum CpuidError {
    #[error("cannot run {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("{what}: no output pipe")]
    NoPipe { what: String },
    #[error("{what} printed more than {CPUID_OUTPUT_LIMIT} bytes")]
    TooLong { what: String },
    #[error("cannot read the output of {what}: {source}")]
    Read { what: String, source: std::io::Error },
    #[error("{what} did not finish within {secs}s", secs = CPUID_TIMEOUT.as_secs())]
    Timeout { what: String },
    #[error("cannot wait for {what}: {source}")]
    Wait { what: String, source: std::io::Error },
    #[error("{what} failed ({status})")]
    Failed { what: String, status: std::process::ExitStatus },
    #[error("{what} printed JSON that is not an object")]
    NotObject { what: String },
    #[error("{what} printed no JSON: {source}")]
    NoJson { what: String, source: serde_json::Error },
}

fn run_describe_cpuid(vmm: &Path, vcpus: u8) -> Result<Value, CpuidError> {
    let what = format!("{} --describe-cpuid {vcpus}", vmm.display());
    let mut child = match Command::new(vmm)
        .arg("--describe-cpuid")
        .arg(vcpus.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(source) => return Err(CpuidError::Spawn { what, source }),
    };
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(CpuidError::NoPipe { what });
    };
    // Read on a helper thread so that a VMM that hangs is killed after the timeout; the thread
    // ends when the pipe closes.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let read = stdout.take(CPUID_OUTPUT_LIMIT + 1).read_to_end(&mut out);
        let _ = tx.send(read.map(|_| out));
    });
    let read = rx.recv_timeout(CPUID_TIMEOUT);
    let out = match read {
        Ok(Ok(out)) if out.len() as u64 <= CPUID_OUTPUT_LIMIT => Ok(out),
        Ok(Ok(_)) => Err(CpuidError::TooLong { what: what.clone() }),
        Ok(Err(source)) => Err(CpuidError::Read { what: what.clone(), source }),
        Err(_) => Err(CpuidError::Timeout { what: what.clone() }),
    };
    if out.is_err() {
        let _ = child.kill();
    }
    let status = match child.wait() {
        Ok(s) => s,
        Err(source) => return Err(CpuidError::Wait { what, source }),
    };
    let out = out?;
    if !status.success() {
        return Err(CpuidError::Failed { what, status });
    }
    match serde_json::from_slice::<Value>(&out) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(CpuidError::NotObject { what }),
        Err(source) => Err(CpuidError::NoJson { what, source }),
    }
}

/// Flattens a surface into comparable facts, one line each: `a.b[id].c = value`. Arrays of
/// objects with an `id` (devices) are keyed by it; any other array element is one fact.
pub fn facts(v: &Value) -> BTreeSet<String> {
    fn walk(v: &Value, path: &str, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(o) => {
                // The jail's uid and gid are per cell by design (their range is a fact).
                for (k, x) in o.iter().filter(|(k, _)| !matches!(k.as_str(), "uid" | "gid")) {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(x, &p, out);
                }
            }
            Value::Array(a) => {
                for x in a {
                    match x.get("id").and_then(Value::as_str) {
                        Some(id) if x.is_object() => walk(x, &format!("{path}[{id}]"), out),
                        _ => {
                            out.insert(format!("{path} has {x}"));
                        }
                    }
                }
            }
            _ => {
                out.insert(format!("{path} = {v}"));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(v, "", &mut out);
    out
}

/// What `current` exposes beyond `baseline`: the facts of one that the other lacks.
pub fn beyond(current: &Value, baseline: &Value) -> Vec<String> {
    let base = facts(baseline);
    facts(current).into_iter().filter(|f| !base.contains(f)).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_jailed_vmm_sees_only_jail_paths() {
        let from = Binaries {
            kernel: Path::new("/k"),
            initrd: Path::new("/r"),
            image: Path::new("/i"),
            vmm: Path::new("/v"),
            jailer: Some(Path::new("/j")),
        };
        let (view, jail) = plan(Path::new("/run/isocell"), "abc", &from, None, 1, 128);
        assert_eq!(view.kernel, Path::new(JAIL_KERNEL));
        assert_eq!(view.initrd, Path::new(JAIL_INITRD));
        let jail = jail.unwrap();
        jail.spec.validate().unwrap();
        assert_eq!(jail.spec.root, Path::new("/run/isocell/abc/root"));
        assert!(jail.spec.mounts.iter().all(|m| m.writable == (m.jail == Path::new(CELL_DIR))));
    }

    #[test]
    fn a_wider_network_shows_in_the_diff() {
        let net = |e: &[&str]| {
            let e: Vec<String> = e.iter().map(|x| x.to_string()).collect();
            json!({ "network": network_surface(&isocell_spec::Network::parse(&e, &[]).unwrap()) })
        };
        assert_eq!(net(&[])["network"], "none");
        let one = net(&["api.example.eu:443"]);
        let two = net(&["api.example.eu:443", "10.0.0.0/8:5432"]);
        assert!(beyond(&one, &one).is_empty());
        assert_eq!(beyond(&two, &one), ["network.egress has \"10.0.0.0/8:5432\""]);
        assert!(beyond(&one, &net(&[])).iter().any(|f| f.contains("api.example.eu:443")));
    }

    #[test]
    fn cpuid_comes_from_the_vmm_binary_or_is_unavailable() {
        let dir = std::env::temp_dir().join(format!("isocell-cpuid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = |name: &str, body: &str| {
            use std::os::unix::fs::PermissionsExt;
            let p = dir.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let good = script("good", r#"[ "$1 $2" = "--describe-cpuid 3" ] && echo '{"vendor":"x"}'"#);
        assert_eq!(describe_cpuid(&good, 3), json!({ "vendor": "x" }));
        let unavailable = |v: Value| v["unavailable"].as_str().unwrap_or_default().to_owned();
        assert!(unavailable(describe_cpuid(&good, 2)).contains("failed"));
        let silent = script("silent", "true");
        assert!(unavailable(describe_cpuid(&silent, 1)).contains("printed no JSON"));
        let chatty = script("chatty", "head -c 2000000 /dev/zero");
        assert!(unavailable(describe_cpuid(&chatty, 1)).contains("more than"));
        let missing = dir.join("missing");
        assert!(unavailable(describe_cpuid(&missing, 1)).contains("cannot run"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn diff_lists_only_what_is_new() {
        let base = json!({"devices": [{"id": "rng0", "irq": 5}], "seccomp": {"vcpu": ["read"]}});
        let cur = json!({"devices": [{"id": "rng0", "irq": 5}, {"id": "net0", "irq": 6}],
                         "seccomp": {"vcpu": ["read", "socket"]}});
        let d = beyond(&cur, &base);
        assert_eq!(
            d,
            ["devices[net0].id = \"net0\"", "devices[net0].irq = 6", "seccomp.vcpu has \"socket\""]
        );
        assert!(beyond(&base, &base).is_empty());
        assert!(beyond(&base, &cur).is_empty());
    }
}
