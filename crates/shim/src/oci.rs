//! The parts of the OCI runtime spec (`config.json` in the bundle) a cell uses, and how each
//! maps onto a cell: the process, its resources (rounded to vCPUs and cell memory), the pod's
//! IsoCell annotations (admission constraints and egress), the pod's identity for the evidence,
//! and the volumes copied in. Everything here is containerd's or kubelet's input: checked, and
//! refused with a message naming the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use isocell_image::runconfig::Process;
use isocell_spec::{Classification, Constraints, MemorySize, Network};
use serde::Deserialize;
use serde_json::{json, Value};

/// The annotation containerd's CRI plugin sets to `sandbox` on a pod's sandbox (pause)
/// container and `container` on its containers.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The annotation naming the pod sandbox a container belongs to (the shim's grouping key).
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Pod annotation: the classification of the data the pod handles.
pub const ANN_CLASSIFICATION: &str = "isocell.io/classification";
/// Pod annotation: the jurisdictions it may run in, comma-separated.
pub const ANN_JURISDICTION: &str = "isocell.io/jurisdiction";
/// Pod annotation: egress rules (`host:port`, as `isocell run --egress`), comma-separated.
pub const ANN_EGRESS: &str = "isocell.io/egress";

/// Memory a cell gets on top of a container's limit: the guest kernel and the agent live in
/// the cell's memory, not in the container's.
pub const GUEST_OVERHEAD_MIB: u64 = 64;

/// The runtime spec, as far as a cell reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// The container's process.
    #[serde(default)]
    pub process: Option<SpecProcess>,
    /// Mounts.
    #[serde(default)]
    pub mounts: Vec<SpecMount>,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Linux specifics.
    #[serde(default)]
    pub linux: Option<Linux>,
    /// The root file system.
    #[serde(default)]
    pub root: Option<Root>,
}

/// `process` (also an exec's whole spec).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecProcess {
    /// Whether it has a terminal.
    #[serde(default)]
    pub terminal: bool,
    /// Who it runs as.
    #[serde(default)]
    pub user: User,
    /// Program and arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// `NAME=value` entries.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: String,
}

/// `process.user`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// User id.
    #[serde(default)]
    pub uid: u32,
    /// Group id.
    #[serde(default)]
    pub gid: u32,
    /// Supplementary groups.
    #[serde(default)]
    pub additional_gids: Vec<u32>,
}

/// One entry of `mounts`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct SpecMount {
    /// Where it appears in the container.
    #[serde(default)]
    pub destination: String,
    /// File system type.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// Source.
    #[serde(default)]
    pub source: String,
    /// Options.
    #[serde(default)]
    pub options: Vec<String>,
}

/// `linux`.
#[derive(Debug, Default, Deserialize)]
pub struct Linux {
    /// Resource limits.
    #[serde(default)]
    pub resources: Option<Resources>,
}

/// `linux.resources`.
#[derive(Debug, Default, Deserialize)]
pub struct Resources {
    /// CPU.
    #[serde(default)]
    pub cpu: Option<Cpu>,
    /// Memory.
    #[serde(default)]
    pub memory: Option<Memory>,
}

/// `linux.resources.cpu`.
#[derive(Debug, Default, Deserialize)]
pub struct Cpu {
    /// CFS quota per period, microseconds (-1 or absent: none).
    #[serde(default)]
    pub quota: Option<i64>,
    /// CFS period, microseconds.
    #[serde(default)]
    pub period: Option<u64>,
}

/// `linux.resources.memory`.
#[derive(Debug, Default, Deserialize)]
pub struct Memory {
    /// Limit in bytes (-1 or absent: none).
    #[serde(default)]
    pub limit: Option<i64>,
}

/// `root`.
#[derive(Debug, Default, Deserialize)]
pub struct Root {
    /// The root's path, relative to the bundle.
    #[serde(default)]
    pub path: String,
}

/// Reads `config.json` from `bundle`.
pub fn read_spec(bundle: &Path) -> Result<Spec, String> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not a runtime spec: {e}", path.display()))
}

impl Spec {
    /// Whether this is a pod's sandbox (pause) container, which needs no process of its own.
    pub fn is_sandbox(&self) -> bool {
        self.annotations.get(CONTAINER_TYPE).is_some_and(|t| t == "sandbox")
    }
}

/// A spec process as the agent runs it.
pub fn process(p: &SpecProcess) -> Result<Process, String> {
    if p.args.is_empty() || p.args[0].is_empty() {
        return Err("the process has no args: give the container a command".into());
    }
    let mut env = Vec::with_capacity(p.env.len());
    for e in &p.env {
        match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_owned(), v.to_owned())),
            _ => return Err(format!("environment entry {e:?} is not NAME=value")),
        }
    }
    let cwd = if p.cwd.is_empty() { "/".to_owned() } else { p.cwd.clone() };
    if !cwd.starts_with('/') {
        return Err(format!("cwd {cwd:?} is not an absolute path"));
    }
    Ok(Process {
        argv: p.args.clone(),
        env,
        cwd,
        uid: p.user.uid,
        gid: p.user.gid,
        groups: p.user.additional_gids.clone(),
    })
}

/// vCPUs and cell memory for the spec's limits. vCPUs: the CPU limit (quota / period) rounded
/// up to whole CPUs, 1 to 32, 1 without a limit. Memory: the memory limit rounded up to a whole
/// MiB plus [`GUEST_OVERHEAD_MIB`] for the guest kernel and agent, at least the cell default;
/// the cell default without a limit.
pub fn resources(spec: &Spec) -> Result<(u8, MemorySize), String> {
    let r = spec.linux.as_ref().and_then(|l| l.resources.as_ref());
    let cpus = match r.and_then(|r| r.cpu.as_ref()) {
        Some(Cpu { quota: Some(q), period: Some(p) }) if *q > 0 && *p > 0 => {
            (*q as u64).div_ceil(*p).clamp(1, u64::from(isocell_spec::vm::MAX_VCPUS)) as u8
        }
        _ => 1,
    };
    let memory = match r.and_then(|r| r.memory.as_ref()).and_then(|m| m.limit) {
        Some(limit) if limit > 0 => {
            let mib = (limit as u64).div_ceil(1 << 20) + GUEST_OVERHEAD_MIB;
            let mib = mib.max(MemorySize::DEFAULT.mib());
            MemorySize::from_mib(mib).map_err(|e| format!("memory limit {limit} bytes: {e}"))?
        }
        _ => MemorySize::DEFAULT,
    };
    Ok((cpus, memory))
}

/// The admission constraints and network the pod's IsoCell annotations ask for.
pub fn constraints(
    annotations: &BTreeMap<String, String>,
) -> Result<(Constraints, Network), String> {
    let mut c = Constraints::default();
    if let Some(v) = annotations.get(ANN_CLASSIFICATION) {
        c.classification = Classification::parse(v.trim()).ok_or_else(|| {
            format!("annotation {ANN_CLASSIFICATION}={v:?}: not a classification (public, internal, confidential, restricted)")
        })?;
    }
    if let Some(v) = annotations.get(ANN_JURISDICTION) {
        c.jurisdictions = list(v);
    }
    let egress = annotations.get(ANN_EGRESS).map(|v| list(v)).unwrap_or_default();
    let network =
        Network::parse(&egress, &[]).map_err(|e| format!("annotation {ANN_EGRESS}: {e}"))?;
    Ok((c, network))
}

fn list(v: &str) -> Vec<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Who the cell runs for: the pod (namespace, name, UID) and container, as the CRI plugin
/// annotates them, and the containerd namespace and id; for the receipts and audit log.
pub fn workload(spec: &Spec, namespace: &str, id: &str) -> Value {
    let a = |k: &str| spec.annotations.get(&format!("io.kubernetes.cri.{k}")).cloned();
    let mut w = json!({ "containerd": { "namespace": namespace, "id": id } });
    if let Some(name) = a("sandbox-name") {
        w["pod"] = json!({
            "namespace": a("sandbox-namespace"),
            "name": name,
            "uid": a("sandbox-uid"),
        });
        w["container"] = json!(a("container-name"));
    }
    w
}

/// A volume whose content is copied into the cell before its process starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyIn {
    /// On this host.
    pub source: PathBuf,
    /// In the cell.
    pub destination: String,
    /// Whether the spec mounts it read-only.
    pub readonly: bool,
}

/// The spec's bind mounts of host files and directories (emptyDir, ConfigMap, Secret,
/// `/etc/hosts`, ...): a cell shares nothing with the host, so their content is copied in.
/// Kernel file systems (`/proc`, `/sys`, `/dev`, ...) are the guest's own and are skipped.
pub fn copy_ins(spec: &Spec) -> Result<Vec<CopyIn>, String> {
    let mut out = Vec::new();
    for m in &spec.mounts {
        let bind = m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind");
        if !bind {
            continue;
        }
        let d = m.destination.as_str();
        if ["/proc", "/sys", "/dev"].iter().any(|k| d == *k || d.starts_with(&format!("{k}/"))) {
            continue;
        }
        if !d.starts_with('/') || d.split('/').any(|c| c == "..") {
            return Err(format!("mount destination {d:?} is not a plain absolute path"));
        }
        out.push(CopyIn {
            source: PathBuf::from(&m.source),
            destination: d.to_owned(),
            readonly: m.options.iter().any(|o| o == "ro"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(text: &str) -> Spec {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn limits_round_up_to_vcpus_and_memory_with_the_guest_overhead() {
        let s = spec(
            r#"{"linux":{"resources":{"cpu":{"quota":150000,"period":100000},
               "memory":{"limit":536870913}}}}"#,
        );
        let (cpus, mem) = resources(&s).unwrap();
        assert_eq!(cpus, 2);
        assert_eq!(mem.mib(), 513 + GUEST_OVERHEAD_MIB);
        let small = spec(r#"{"linux":{"resources":{"memory":{"limit":1048576}}}}"#);
        assert_eq!(resources(&small).unwrap().1, MemorySize::DEFAULT);
        let none = spec(r#"{"linux":{"resources":{"cpu":{"quota":-1,"period":100000}}}}"#);
        assert_eq!(resources(&none).unwrap(), (1, MemorySize::DEFAULT));
        let huge = spec(r#"{"linux":{"resources":{"cpu":{"quota":9000000,"period":1000}}}}"#);
        assert_eq!(resources(&huge).unwrap().0, 32);
    }

    #[test]
    fn annotations_become_constraints_and_bad_ones_say_which() {
        let mut a = BTreeMap::new();
        a.insert(ANN_CLASSIFICATION.into(), "confidential".into());
        a.insert(ANN_JURISDICTION.into(), "eu, de".into());
        a.insert(ANN_EGRESS.into(), "127.0.0.1:8080".into());
        let (c, n) = constraints(&a).unwrap();
        assert_eq!(c.classification, Classification::Confidential);
        assert_eq!(c.jurisdictions, vec!["eu", "de"]);
        assert_eq!(n.egress.len(), 1);
        a.insert(ANN_CLASSIFICATION.into(), "top".into());
        assert!(constraints(&a).unwrap_err().contains(ANN_CLASSIFICATION));
        a.remove(ANN_CLASSIFICATION);
        a.insert(ANN_EGRESS.into(), "no port".into());
        assert!(constraints(&a).unwrap_err().contains(ANN_EGRESS));
    }

    #[test]
    fn processes_are_checked() {
        let p = SpecProcess {
            args: vec!["sh".into()],
            env: vec!["A=1".into(), "B=x=y".into()],
            ..Default::default()
        };
        let got = process(&p).unwrap();
        assert_eq!(got.env, vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]);
        assert_eq!(got.cwd, "/");
        assert!(process(&SpecProcess::default()).is_err());
        let bad = SpecProcess { env: vec!["=x".into()], ..p.clone() };
        assert!(process(&bad).unwrap_err().contains("NAME=value"));
        let rel = SpecProcess { cwd: "data".into(), ..p };
        assert!(process(&rel).is_err());
    }

    #[test]
    fn bind_mounts_are_copied_in_and_kernel_ones_skipped() {
        let s = spec(
            r#"{"mounts":[
              {"destination":"/proc","type":"proc","source":"proc"},
              {"destination":"/dev/shm","type":"bind","source":"/run/shm","options":["rbind"]},
              {"destination":"/etc/hosts","type":"bind","source":"/x/hosts","options":["rbind","rw"]},
              {"destination":"/config","type":"bind","source":"/x/cm","options":["rbind","ro"]}]}"#,
        );
        let c = copy_ins(&s).unwrap();
        assert_eq!(c.len(), 2);
        assert!(!c[0].readonly && c[1].readonly);
        let evil = spec(r#"{"mounts":[{"destination":"/a/../../b","type":"bind","source":"/x"}]}"#);
        assert!(copy_ins(&evil).is_err());
    }

    #[test]
    fn the_pod_is_named_in_the_workload() {
        let s = spec(
            r#"{"annotations":{"io.kubernetes.cri.sandbox-name":"web",
              "io.kubernetes.cri.sandbox-namespace":"prod","io.kubernetes.cri.sandbox-uid":"u-1",
              "io.kubernetes.cri.container-name":"app"}}"#,
        );
        let w = workload(&s, "k8s.io", "abc");
        assert_eq!(w["pod"]["name"], "web");
        assert_eq!(w["pod"]["namespace"], "prod");
        assert_eq!(w["pod"]["uid"], "u-1");
        assert_eq!(w["container"], "app");
        assert_eq!(w["containerd"]["id"], "abc");
    }
}
