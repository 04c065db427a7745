//! A cell's plan: everything about a cell that can be decided before it exists, decided once.
//! [`CellPlan::new`] turns a [`CellRequest`] into the VM configuration, the device plan and
//! kernel command line, the jail, and the inputs of the launch measurement; `isocell run`,
//! `isocell surface`, the daemon and the benchmark all plan through it.

use std::path::PathBuf;

use isocell_evidence::measure::LaunchInputs;
use isocell_evidence::policy::{AdmissionRequest, EgressRequest, PublishRequest};
use isocell_spec::VsockConfig;
use isocell_spec::{
    ConsoleConfig, Constraints, DriveConfig, HostProfile, MemorySize, Network, Target, VmConfig,
};
use isocell_vmm_model::device_plan::DevicePlan;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::confine::{self, JailPlan, Pinned, VmmView};
use crate::evidence::EvidenceError;
use crate::{HostConfig, PlanError};

/// The guest's vsock context id; each VMM has its own vsock namespace, so every cell uses 3.
const GUEST_CID: u64 = 3;

/// Every cell's host name (the same for all, so equal launches measure equal).
pub const HOSTNAME: &str = "cell";

/// The guest device of the cell's image, the first virtio disk.
pub const IMAGE_DEVICE: &str = "/dev/vda";

/// A container image converted for the cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerImage {
    /// The image, as the store holds it.
    pub resolved: isocell_image::Resolved,
    /// Its name pins a digest.
    pub pinned: bool,
}

/// What the cell boots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CellImage {
    /// A block image file (ext4), mounted as is.
    Block(PathBuf),
    /// A container image from the store, mounted through dm-verity.
    Container(Box<ContainerImage>),
}

/// Everything a cell is asked to be. Values are already typed and in range.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellRequest {
    /// Cell kernel.
    pub kernel: PathBuf,
    /// The image.
    pub image: CellImage,
    /// vCPUs (1-32).
    pub cpus: u8,
    /// Guest memory.
    pub memory: MemorySize,
    /// Extra kernel arguments (the operator's, for debugging).
    pub kernel_args: String,
    /// Hard limit on the VM's life, enforced by the VMM.
    pub max_lifetime_secs: Option<u64>,
    /// Admission constraints.
    pub constraints: Constraints,
    /// Where the cell may connect and which of its ports are published.
    #[serde(default)]
    pub network: Network,
    /// Whether it is saved as, or started from, a snapshot.
    #[serde(default)]
    pub snapshot: SnapshotUse,
    /// Who the cell runs for, as an orchestrator names it (containerd's shim: the Kubernetes
    /// pod's namespace, name and UID, and the container). Recorded in the launch receipt and
    /// the audit log; not measured, since it says nothing about what runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Value>,
}

/// Whether a cell is saved as, or started from, a snapshot (see `crate::snapshot`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub enum SnapshotUse {
    /// A fresh boot, nothing saved: every cell unless asked otherwise.
    #[default]
    None,
    /// A fresh boot that is saved into this directory once its agent is ready.
    Create(PathBuf),
    /// A start from the snapshot `name` in `dir`, whose files the host has checked against
    /// these digests.
    Restore {
        /// The snapshot's name.
        name: String,
        /// Its directory.
        dir: PathBuf,
        /// Digest of its memory file, `sha256:HEX`.
        memory_digest: String,
        /// Digest of its state file.
        state_digest: String,
        /// What it was booted from (kernel, initrd, root image, VMM), as the launch
        /// measurement names them: the cell must measure the same.
        components: std::collections::BTreeMap<String, String>,
        /// The saved agent's name (the restored copy says no hello of its own).
        #[serde(default)]
        agent: String,
    },
}

/// Where a jailed VMM sees the snapshot directory.
const JAIL_SNAPSHOT: &str = "/snapshot";

/// The plan of one cell.
pub struct CellPlan {
    /// The cell's id.
    pub id: String,
    /// What was asked.
    pub request: CellRequest,
    /// The exact VM configuration the VMM is started with, in the paths it sees.
    pub config: VmConfig,
    /// Where each device sits.
    pub devices: DevicePlan,
    /// The full kernel command line.
    pub cmdline: String,
    /// The jail, unless the host runs VMMs unjailed.
    pub jail: Option<JailPlan>,
    /// The paths the VMM sees.
    pub view: VmmView,
    /// The block image on this host.
    pub image_path: PathBuf,
    /// The files measured and run, held open (jailed cells only).
    pinned: Option<Pinned>,
    /// The agent initramfs.
    initrd: PathBuf,
    /// The VMM binary.
    vmm: PathBuf,
    /// The seccomp rules, canonical JSON.
    seccomp: String,
    /// Arguments an unjailed VMM gets besides its configuration (a jailed one has them in its
    /// jail spec).
    pub vmm_args: Vec<String>,
}

impl CellPlan {
    /// Plans cell `id` on `host`. Opens (and, when jailed, holds) the files the cell is built
    /// from; reads nothing else and starts nothing.
    pub fn new(host: &HostConfig, id: &str, request: CellRequest) -> Result<CellPlan, PlanError> {
        if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(PlanError::Invalid(format!("cell id {id:?}: letters and digits only")));
        }
        let image_path = match &request.image {
            CellImage::Block(p) => p.clone(),
            CellImage::Container(c) => c.resolved.root_image(),
        };
        let from = confine::Binaries {
            kernel: &request.kernel,
            initrd: &host.agent_initrd,
            image: &image_path,
            vmm: &host.vmm,
            jailer: host.jailer.as_deref(),
        };
        // Jailed cells run exactly the files measured (see `Pinned`).
        let pinned = match host.jailer {
            Some(_) => Some(Pinned::open(&from)?),
            None => None,
        };
        let (view, mut jail) = confine::plan(
            &host.run_dir,
            id,
            &from,
            pinned.as_ref(),
            request.cpus,
            request.memory.mib(),
        );
        let snapshot = match &request.snapshot {
            SnapshotUse::None => None,
            SnapshotUse::Create(dir) => Some((dir, "--snapshot-save", true)),
            SnapshotUse::Restore { dir, .. } => Some((dir, "--restore", false)),
        };
        let mut vmm_args = Vec::new();
        if let Some((dir, flag, writable)) = snapshot {
            match jail.as_mut() {
                Some(j) => {
                    j.spec.mounts.push(isocell_jail::BindMount {
                        host: dir.clone(),
                        jail: JAIL_SNAPSHOT.into(),
                        writable,
                        exec: false,
                        pinned: None,
                    });
                    j.spec.argv.extend([flag.to_owned(), JAIL_SNAPSHOT.to_owned()]);
                    if !writable {
                        // The snapshot's files are root's, readable by this group only.
                        j.spec.groups.push(isocell_jail::SNAPSHOT_READER_GID);
                    }
                    if writable {
                        // The VMM writes all of guest memory into one file.
                        let memory = (request.memory.mib() << 20) + (64 << 20);
                        j.spec.rlimits.fsize = j.spec.rlimits.fsize.max(memory);
                    }
                }
                None => vmm_args = vec![flag.to_owned(), dir.display().to_string()],
            }
        }
        // A container image boots through dm-verity: the kernel builds /dev/dm-0 over the
        // image's disk from the measured command line and refuses any block that differs.
        let (root_device, image_args) = match &request.image {
            CellImage::Container(c) => {
                ("/dev/dm-0".to_owned(), c.resolved.record.converted.verity.dm_create(IMAGE_DEVICE))
            }
            CellImage::Block(_) => (IMAGE_DEVICE.to_owned(), String::new()),
        };
        let boot = Boot {
            cpus: request.cpus,
            memory_mib: request.memory.mib(),
            kernel_args: request.kernel_args.clone(),
            max_lifetime_secs: request.max_lifetime_secs,
            root_device,
            root_fstype: "ext4".to_owned(),
            image_args,
            hostname: HOSTNAME.to_owned(),
            net: net_arg(&request.network),
        };
        let config = vm_config(&view, &boot);
        config.validate().map_err(|e| PlanError::Invalid(e.to_string()))?;
        let devices = DevicePlan::new(&config).map_err(|e| PlanError::Devices(e.to_string()))?;
        let cmdline = isocell_vmm_model::kernel_cmdline(&config, &devices);
        let seccomp = isocell_vmm_model::seccomp::describe_canonical();
        Ok(CellPlan {
            id: id.to_owned(),
            initrd: host.agent_initrd.clone(),
            vmm: host.vmm.clone(),
            request,
            config,
            devices,
            cmdline,
            jail,
            view,
            image_path,
            pinned,
            seccomp,
            vmm_args,
        })
    }

    /// The confinement as the measurement sees it: per-cell values (uid, paths) left out, so
    /// equal launches measure equal.
    fn confinement(&self) -> Value {
        let jail = self.jail.as_ref();
        json!({
            "jailed": jail.is_some(),
            "namespaces": jail.map(|_| isocell_jail::NAMESPACES),
            "files": jail.map(|j| j.spec.mounts.iter().map(|m| json!([m.jail, m.writable, m.exec])).collect::<Vec<_>>()),
            "device_nodes": jail.map(|j| j.spec.devices.clone()),
            "rlimits": jail.map(|j| j.spec.rlimits.clone()),
            "cgroup": jail.map(|j| j.limits.clone()),
        })
    }

    /// What the cell's image is, for the measurement and the receipts: a container image by
    /// its reference and digests, with dm-verity on; a block image by its path (its digest is
    /// the measurement's `root_image`).
    pub fn image_identity(&self) -> Value {
        match &self.request.image {
            CellImage::Container(c) => {
                let r = &c.resolved.record;
                json!({
                    "kind": "oci",
                    "reference": c.resolved.name,
                    "manifest_digest": r.manifest_digest,
                    "config_digest": r.config_digest,
                    "block_digest": r.converted.block_digest,
                    "verity": { "enabled": true, "root_hash": r.converted.verity.root_hash },
                })
            }
            CellImage::Block(p) => {
                json!({ "kind": "raw", "path": p, "verity": { "enabled": false } })
            }
        }
    }

    /// How the cell starts, for its launch receipt: a fresh boot, a fresh boot saved as a
    /// snapshot, or a restore from a named snapshot with the digests of its files.
    pub fn start_identity(&self) -> Value {
        let mut start = self.start_kind();
        if let (Some(w), Some(o)) = (&self.request.workload, start.as_object_mut()) {
            o.insert("workload".into(), w.clone());
        }
        start
    }

    fn start_kind(&self) -> Value {
        match &self.request.snapshot {
            SnapshotUse::None => json!({ "kind": "cold_boot" }),
            SnapshotUse::Create(_) => json!({ "kind": "cold_boot", "saved_as_snapshot": true }),
            SnapshotUse::Restore { name, memory_digest, state_digest, .. } => json!({
                "kind": "restored",
                "snapshot": name,
                "memory_digest": memory_digest,
                "state_digest": state_digest,
            }),
        }
    }

    /// The measured VM configuration: the configuration (cell directory as `{cell}`) and the
    /// confinement.
    pub fn measured_vm(&self) -> Value {
        let vm = measured_config(&self.config, &self.view);
        let snapshot = match &self.request.snapshot {
            SnapshotUse::None => return json!({ "vm": vm, "confinement": self.confinement() }),
            SnapshotUse::Create(_) => json!({ "create": true }),
            SnapshotUse::Restore { name, memory_digest, state_digest, .. } => json!({
                "restore": name,
                "memory": memory_digest,
                "state": state_digest,
            }),
        };
        json!({ "vm": vm, "confinement": self.confinement(), "snapshot": snapshot })
    }

    /// Measures the launch from the files as this process holds them (pinned when jailed).
    pub fn measure(
        &self,
        cache: Option<&isocell_evidence::measure::DigestCache>,
    ) -> Result<isocell_evidence::measure::LaunchMeasurement, EvidenceError> {
        let own = self.pinned.as_ref().map(|p| (p.own_paths(), p.own_initrd_path()));
        let ((kernel, image, vmm), initrd) = match &own {
            Some(((k, i, v), r)) => ((k.as_path(), i.as_path(), v.as_path()), r.as_path()),
            None => (
                (self.request.kernel.as_path(), self.image_path.as_path(), self.vmm.as_path()),
                self.initrd.as_path(),
            ),
        };
        let identity = self.image_identity();
        let container = matches!(self.request.image, CellImage::Container(_));
        let block_digest = match &self.request.image {
            CellImage::Container(c) => Some(c.resolved.record.converted.block_digest.to_string()),
            CellImage::Block(_) => None,
        };
        isocell_evidence::measure::measure(
            &LaunchInputs {
                image_digest: block_digest.as_deref(),
                image_identity: container.then_some(&identity),
                kernel,
                initrd: Some(initrd),
                cmdline: &self.cmdline,
                image,
                vm_config: &self.measured_vm(),
                vmm,
                seccomp: Some(self.seccomp.as_bytes()),
            },
            cache,
        )
        .map_err(EvidenceError::Measure)
    }

    /// The admission question for this cell on a host with `profile`, asked by `client` (a
    /// daemon's client identity), or by the host's operator when `None`.
    pub fn admission_request(
        &self,
        profile: &HostProfile,
        measurement: &isocell_evidence::measure::LaunchMeasurement,
        client: Option<&str>,
    ) -> AdmissionRequest {
        let r = &self.request;
        let c = &r.constraints;
        let container = match &r.image {
            CellImage::Container(c) => Some(c),
            CellImage::Block(_) => None,
        };
        let (principal_kind, principal) = match client {
            Some(c) => ("Client", c.to_owned()),
            None => ("Operator", profile.operator.clone()),
        };
        AdmissionRequest {
            principal_kind: principal_kind.to_owned(),
            principal,
            cell_id: self.id.clone(),
            host_id: profile.host_id.clone(),
            host_jurisdiction: profile.jurisdiction.clone(),
            host_zone: profile.zone.clone(),
            operator: profile.operator.clone(),
            cpus: r.cpus.into(),
            memory_mib: r.memory.mib(),
            image_digest: match container {
                Some(c) => c.resolved.record.manifest_digest.to_string(),
                None => measurement.components.get("root_image").cloned().unwrap_or_default(),
            },
            image_reference: match container {
                Some(c) => c.resolved.name.clone(),
                None => self.image_path.display().to_string(),
            },
            image_kind: if container.is_some() { "oci" } else { "raw" }.to_owned(),
            image_reference_pinned: container.is_some_and(|c| c.pinned),
            jurisdictions: c.jurisdictions.clone(),
            classification: c.classification.as_str().to_owned(),
            classification_level: c.classification as i64,
            image_digests: c.image_digests.clone(),
            max_lifetime_secs: c.max_lifetime_secs,
            jailed: self.jail.is_some(),
            snapshot: match &r.snapshot {
                SnapshotUse::Restore { name, .. } => Some(name.clone()),
                _ => None,
            },
            egress: r
                .network
                .egress
                .iter()
                .map(|e| EgressRequest {
                    rule: e.to_string(),
                    target: e.target.to_string(),
                    kind: match e.target {
                        Target::Name(_) => "name",
                        Target::Suffix(_) => "domain",
                        Target::Net { .. } => "address",
                    }
                    .to_owned(),
                    port: e.port,
                })
                .collect(),
            publish: r
                .network
                .publish
                .iter()
                .map(|p| PublishRequest {
                    published: p.to_string(),
                    host_ip: p.host_ip.to_string(),
                    host_port: p.host_port,
                    guest_port: p.guest_port,
                    loopback: p.host_ip.is_loopback(),
                })
                .collect(),
        }
    }

    /// The cell's attack surface; `negotiated` adds the features the guest negotiated, for a
    /// cell that ran. Its CPU part comes from running the VMM binary (`--describe-cpuid`).
    pub fn surface(&self, negotiated: Option<&Value>) -> Value {
        confine::surface(
            &self.vmm,
            &self.config,
            &self.devices,
            self.jail.as_ref(),
            negotiated,
            &self.request.network,
        )
    }
}

/// What the VM configuration of a cell is built from.
struct Boot {
    cpus: u8,
    memory_mib: u64,
    kernel_args: String,
    max_lifetime_secs: Option<u64>,
    /// The guest device the agent mounts as the cell image (`isocell.root=`): the image's disk
    /// ([`IMAGE_DEVICE`]), or a device the kernel builds over it, such as `/dev/dm-0`.
    root_device: String,
    /// The image's filesystem type (`isocell.rootfstype=`).
    root_fstype: String,
    /// Kernel arguments that come with the image, such as `dm-mod.create=...` for its
    /// dm-verity device; after the operator's, so these win.
    image_args: String,
    /// `isocell.hostname=`.
    hostname: String,
    /// `isocell.net=`: which parts of the network the agent sets up (empty: none).
    net: String,
}

/// The agent's part of a network: `egress` (redirect, DNS) when there are egress rules,
/// `ingress` when ports are published.
fn net_arg(n: &Network) -> String {
    let parts = [(!n.egress.is_empty(), "egress"), (!n.publish.is_empty(), "ingress")];
    parts.iter().filter(|(on, _)| *on).map(|(_, w)| *w).collect::<Vec<_>>().join(",")
}

/// The kernel arguments of a cell beyond the VMM's own: the operator's first, then the ones
/// that tell the agent where its image is (so the operator's cannot point it elsewhere), then
/// the image's own.
fn boot_args(b: &Boot) -> String {
    let words = [
        "quiet",
        b.kernel_args.trim(),
        &format!("isocell.root={}", b.root_device),
        &format!("isocell.rootfstype={}", b.root_fstype),
        &format!("isocell.hostname={}", b.hostname),
        &if b.net.is_empty() { String::new() } else { format!("isocell.net={}", b.net) },
        b.image_args.trim(),
    ];
    words.iter().filter(|w| !w.is_empty()).copied().collect::<Vec<_>>().join(" ")
}

/// The exact VM configuration the VMM is started with, in the paths it sees (`view`). In a
/// jail these are the same for every cell, so equal launches measure equal.
///
/// The kernel starts the agent from its initramfs; the image is a read-only disk that the
/// agent mounts itself (no `root=`: nothing of the image runs before the workload).
fn vm_config(view: &VmmView, b: &Boot) -> VmConfig {
    let mut c = VmConfig::new(&view.kernel);
    c.vcpus = b.cpus;
    c.memory_mib = b.memory_mib;
    c.initrd = Some(view.initrd.clone());
    c.boot_args = boot_args(b);
    c.console = ConsoleConfig::File(view.cell_dir.join("console.log"));
    c.drives = vec![DriveConfig {
        id: "root".into(),
        path: view.image.clone(),
        read_only: true,
        root: false,
        placement: None,
    }];
    c.vsock =
        Some(VsockConfig { guest_cid: GUEST_CID, uds_path: view.cell_dir.join("vsock.sock") });
    c.max_lifetime_secs = b.max_lifetime_secs;
    c
}

/// What the launch measurement sees of a configuration: the cell's own directory becomes
/// `{cell}` (it differs per cell only when unjailed), so equal launches measure equal.
fn measured_config(config: &VmConfig, view: &VmmView) -> Value {
    let prefix = view.cell_dir.to_string_lossy().into_owned();
    let mut v = serde_json::to_value(config).unwrap_or_default();
    fn walk(v: &mut Value, prefix: &str) {
        match v {
            Value::String(s) if s.starts_with(prefix) => {
                *s = format!("{{cell}}{}", &s[prefix.len()..]);
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, prefix)),
            Value::Object(o) => o.values_mut().for_each(|x| walk(x, prefix)),
            _ => {}
        }
    }
    walk(&mut v, &prefix);
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::Path;

    use super::*;

    #[test]
    fn the_measured_seccomp_text_is_the_canonical_form_of_the_filters() {
        use isocell_vmm_model::seccomp;
        let text = seccomp::describe_canonical();
        assert_eq!(text, isocell_evidence::canonical::to_canonical_string(&seccomp::describe()));
        assert!(text.contains(r#"{"index":1,"name":"KVM_RUN","op":"eq","value":44672}"#), "{text}");
        assert!(text.contains(r#""mask":"#), "a masked check shows its mask: {text}");
    }

    fn view() -> VmmView {
        VmmView {
            kernel: "/boot/vmlinux".into(),
            initrd: "/boot/agent-initrd.cpio".into(),
            image: "/disks/root.img".into(),
            cell_dir: "/cell".into(),
        }
    }

    fn boot() -> Boot {
        Boot {
            cpus: 1,
            memory_mib: 128,
            kernel_args: String::new(),
            max_lifetime_secs: None,
            root_device: IMAGE_DEVICE.into(),
            root_fstype: "ext4".into(),
            image_args: String::new(),
            hostname: HOSTNAME.into(),
            net: String::new(),
        }
    }

    #[test]
    fn cells_boot_the_agent_from_the_initramfs_and_name_their_image() {
        let c = vm_config(&view(), &Boot { kernel_args: "loglevel=7".into(), ..boot() });
        assert_eq!(c.initrd.as_deref(), Some(Path::new("/boot/agent-initrd.cpio")));
        assert!(c.drives.iter().all(|d| d.read_only && !d.root), "no root= for the kernel");
        assert_eq!(
            c.boot_args,
            "quiet loglevel=7 isocell.root=/dev/vda isocell.rootfstype=ext4 isocell.hostname=cell"
        );
    }

    #[test]
    fn the_agent_is_told_which_network_parts_to_set_up() {
        let n = |e: &[&str], p: &[&str]| {
            let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
            net_arg(&Network::parse(&s(e), &s(p)).unwrap())
        };
        assert_eq!(n(&[], &[]), "");
        assert_eq!(n(&["a.example.eu:443"], &[]), "egress");
        assert_eq!(n(&["a.example.eu:443"], &["8080:80"]), "egress,ingress");
        assert_eq!(n(&[], &["8080:80"]), "ingress");
        let c = vm_config(&view(), &Boot { net: "egress".into(), ..boot() });
        assert!(c.boot_args.contains(" isocell.net=egress"), "{}", c.boot_args);
        assert!(!vm_config(&view(), &boot()).boot_args.contains("isocell.net"));
    }

    #[test]
    fn the_images_own_arguments_come_last() {
        let b = Boot {
            root_device: "/dev/dm-0".into(),
            image_args: "dm-mod.create=\"vroot,,,ro,0 8 verity 1\"".into(),
            hostname: "web-1".into(),
            ..boot()
        };
        assert_eq!(
            boot_args(&b),
            "quiet isocell.root=/dev/dm-0 isocell.rootfstype=ext4 isocell.hostname=web-1 \
             dm-mod.create=\"vroot,,,ro,0 8 verity 1\""
        );
    }
}
