//! The parts of the OCI runtime spec (`config.json` in the bundle) a cell uses, and how each
//! maps onto a cell: the process, its resources (rounded to vCPUs and cell memory), the pod's
//! IsoCell annotations (admission constraints and egress), the pod's identity for the evidence,
//! and the volumes copied in. Everything here is containerd's or kubelet's input: checked, and
//! refused with a message naming the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use isocell_image::runconfig::Process;
use isocell_proto::Privileges;
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
    /// Capability sets by name (`CAP_CHOWN`, ...; an unknown name grants nothing); none:
    /// every capability.
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// Whether set-id bits and file capabilities may add privilege.
    #[serde(default)]
    pub no_new_privileges: bool,
}

/// `process.capabilities`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Capabilities {
    /// The bounding set.
    #[serde(default)]
    pub bounding: Vec<String>,
    /// The effective set.
    #[serde(default)]
    pub effective: Vec<String>,
    /// The permitted set.
    #[serde(default)]
    pub permitted: Vec<String>,
    /// The inheritable set.
    #[serde(default)]
    pub inheritable: Vec<String>,
    /// The ambient set.
    #[serde(default)]
    pub ambient: Vec<String>,
}

/// Linux's capabilities in number order (`linux/capability.h`), without the `CAP_` prefix.
const CAPABILITY_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// A capability list as a bit mask; `set` names the list in warnings. As runc does, a name
/// the cell's kernel does not know grants nothing and is reported, not refused: a newer
/// containerd's default set must not stop every container.
fn capability_mask(names: &[String], set: &str) -> u64 {
    let mut mask = 0u64;
    for name in names {
        match CAPABILITY_NAMES.iter().position(|c| name.strip_prefix("CAP_") == Some(c)) {
            Some(bit) => mask |= 1 << bit,
            None => log::warn!("process.capabilities.{set}: unknown capability {name:?} ignored"),
        }
    }
    mask
}

/// The process's capabilities and `no_new_privs`, as runc applies them: none when the spec
/// limits neither (every capability, the cell being the boundary).
pub fn privileges(p: &SpecProcess) -> Option<Privileges> {
    let Some(c) = &p.capabilities else {
        return p.no_new_privileges.then_some(Privileges {
            bounding: u64::MAX,
            effective: u64::MAX,
            permitted: u64::MAX,
            inheritable: 0,
            ambient: 0,
            no_new_privs: true,
        });
    };
    Some(Privileges {
        bounding: capability_mask(&c.bounding, "bounding"),
        effective: capability_mask(&c.effective, "effective"),
        permitted: capability_mask(&c.permitted, "permitted"),
        inheritable: capability_mask(&c.inheritable, "inheritable"),
        ambient: capability_mask(&c.ambient, "ambient"),
        no_new_privs: p.no_new_privileges,
    })
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
        privileges: privileges(p),
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

    #[test]
    fn capabilities_become_masks_as_runc_reads_them() {
        let s = spec(
            r#"{"process":{"args":["x"],"noNewPrivileges":true,"capabilities":{
               "bounding":["CAP_CHOWN","CAP_KILL","CAP_NET_BIND_SERVICE"],
               "effective":["CAP_KILL"],"permitted":["CAP_KILL","CAP_CHOWN"],
               "inheritable":[],"ambient":["CAP_NET_BIND_SERVICE"]}}}"#,
        );
        let p = privileges(s.process.as_ref().unwrap()).unwrap();
        assert_eq!(p.bounding, 1 | 1 << 5 | 1 << 10);
        assert_eq!((p.effective, p.permitted, p.inheritable), (1 << 5, 1 << 5 | 1, 0));
        assert_eq!(p.ambient, 1 << 10);
        assert!(p.no_new_privs);
        // Neither limit given: every capability, as `isocell run`.
        let open = spec(r#"{"process":{"args":["x"]}}"#);
        assert_eq!(privileges(open.process.as_ref().unwrap()), None);
        let nnp = spec(r#"{"process":{"args":["x"],"noNewPrivileges":true}}"#);
        let p = privileges(nnp.process.as_ref().unwrap()).unwrap();
        assert!(p.no_new_privs && p.bounding == u64::MAX && p.ambient == 0);
        // Names as the spec spells them (`CAP_`, upper case); any other grants nothing, as
        // under runc, and the rest of the list still counts.
        for name in ["CAP_FLY", "cap_chown", "CHOWN"] {
            let text = format!(
                r#"{{"process":{{"args":["x"],"capabilities":{{"bounding":["{name}","CAP_KILL"]}}}}}}"#
            );
            let p = process(spec(&text).process.as_ref().unwrap()).unwrap();
            assert_eq!(p.privileges.unwrap().bounding, 1 << 5, "{name}");
        }
    }

    mod properties {
        use super::super::*;
        use proptest::collection::{btree_map, vec};
        use proptest::prelude::*;

        /// Any JSON at all, a few levels deep.
        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                let key = prop_oneof![
                    Just("process".to_owned()),
                    Just("args".to_owned()),
                    Just("mounts".to_owned()),
                    Just("linux".to_owned()),
                    Just("resources".to_owned()),
                    Just("capabilities".to_owned()),
                    "[a-z]{1,8}",
                ];
                prop_oneof![
                    vec(inner.clone(), 0..5).prop_map(Value::from),
                    btree_map(key, inner, 0..5)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![".{0,16}", "/[a-z./]{0,16}", Just("..".to_owned()), Just(String::new())]
        }

        fn capability() -> impl Strategy<Value = String> {
            prop_oneof![
                (0..CAPABILITY_NAMES.len()).prop_map(|i| format!("CAP_{}", CAPABILITY_NAMES[i])),
                ".{0,12}",
            ]
        }

        /// Well-formed in shape, hostile in value: what containerd or a pod author could
        /// write into `config.json`.
        fn shaped() -> impl Strategy<Value = Value> {
            let mount = (
                text(),
                prop_oneof![Just("bind"), Just("tmpfs"), Just("")],
                text(),
                vec(prop_oneof![Just("ro".to_owned()), Just("rbind".to_owned()), text()], 0..4),
            )
                .prop_map(
                    |(d, k, s, o)| json!({"destination": d, "type": k, "source": s, "options": o}),
                );
            (
                vec(text(), 0..4),
                vec(text(), 0..4),
                text(),
                vec(vec(capability(), 0..4), 5),
                any::<bool>(),
                (any::<Option<i64>>(), any::<Option<u64>>(), any::<Option<i64>>()),
                vec(mount, 0..5),
                btree_map(text(), text(), 0..4),
            )
                .prop_map(|(args, env, cwd, caps, nnp, (quota, period, limit), mounts, ann)| {
                    json!({
                        "process": {
                            "args": args, "env": env, "cwd": cwd, "noNewPrivileges": nnp,
                            "capabilities": {
                                "bounding": caps[0], "effective": caps[1],
                                "permitted": caps[2], "inheritable": caps[3], "ambient": caps[4],
                            },
                        },
                        "mounts": mounts,
                        "annotations": ann,
                        "linux": {"resources": {
                            "cpu": {"quota": quota, "period": period},
                            "memory": {"limit": limit},
                        }},
                    })
                })
        }

        /// Whatever the spec says, each reading gives a bounded answer or an error, never a
        /// panic, and what is accepted keeps the invariants the cell relies on.
        fn check(value: Value) {
            let Ok(s) = serde_json::from_value::<Spec>(value) else { return };
            if let Ok((cpus, memory)) = resources(&s) {
                assert!((1..=isocell_spec::vm::MAX_VCPUS).contains(&cpus));
                assert!(memory.mib() >= MemorySize::DEFAULT.mib());
            }
            if let Some(p) = &s.process {
                if let Ok(proc) = process(p) {
                    assert!(!proc.argv.is_empty() && !proc.argv[0].is_empty());
                    assert!(proc.cwd.starts_with('/'));
                    assert!(proc.env.iter().all(|(k, _)| !k.is_empty() && !k.contains('=')));
                    if let Some(priv_) = proc.privileges {
                        let known = (1u64 << CAPABILITY_NAMES.len()) - 1;
                        if p.capabilities.is_some() {
                            assert_eq!(priv_.bounding & !known, 0);
                            assert_eq!(priv_.ambient & !known, 0);
                        }
                    }
                }
            }
            if let Ok(copies) = copy_ins(&s) {
                for c in copies {
                    assert!(c.destination.starts_with('/'));
                    assert!(!c.destination.split('/').any(|p| p == ".."));
                    for k in ["/proc", "/sys", "/dev"] {
                        assert!(c.destination != k && !c.destination.starts_with(&format!("{k}/")));
                    }
                }
            }
            let _ = constraints(&s.annotations);
            let _ = workload(&s, "ns", "id");
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn any_json_is_read_or_refused(v in json()) {
                check(v);
            }

            #[test]
            fn hostile_specs_keep_the_invariants(v in shaped()) {
                check(v);
            }
        }
    }
}
