//! Snapshots: a paused VM saved to a directory, and the checks a restore makes before it
//! trusts one.
//!
//! A snapshot directory holds two files:
//! - [`MEMORY_FILE`]: guest memory, its regions back to back, raw. A restore maps it private
//!   and copy-on-write, so no cell ever writes to it, and pages are read only when touched;
//! - [`STATE_FILE`]: [`SnapshotState`] as JSON: every vCPU (registers, MSRs, FPU, LAPIC,
//!   events), the irqchips, the PIT and the clock, every device and virtqueue, and what the VM
//!   was (vCPUs, memory, the devices the guest sees, its kernel command line).
//!
//! Whether the files are the ones that were saved (their digests), and which kernel, image
//! and VMM build they belong to, is the host's to check: it measures them into the launch
//! measurement. The VMM refuses what it can see itself: another format or VMM version, another
//! machine shape, another CPU, a memory file of the wrong size.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::device_manager::{DevicePlan, DeviceStates};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// Guest memory, raw.
pub const MEMORY_FILE: &str = "memory";
/// The VM's state, JSON.
pub const STATE_FILE: &str = "vm.json";
/// The version of the layout above and of [`SnapshotState`] (2: vsock keeps the guest's
/// connections).
pub const FORMAT: u32 = 2;
/// A state file larger than this is not one (32 vCPUs take well under 2 MiB).
const MAX_STATE_BYTES: u64 = 16 << 20;

/// Why a snapshot cannot be written or used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not a snapshot this VMM can read.
    #[error("vm.json is not a snapshot state this VMM reads: {0}")]
    Format(String),
    /// The snapshot was taken of another machine, by another VMM, or on another host.
    #[error("the snapshot does not fit this VM: {0}")]
    Mismatch(String),
}

/// What the guest saw of the machine it booted on: the parts of the configuration a restore
/// must give it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// The kernel command line it booted with (device addresses, root, the agent's options).
    pub kernel_cmdline: String,
    /// Every device as `id kind`, in plan order.
    pub devices: Vec<String>,
}

impl MachineShape {
    /// The shape of the VM `config` and `plan` describe.
    pub fn of(config: &isocell_spec::VmConfig, plan: &DevicePlan) -> Self {
        let devices = plan
            .devices
            .iter()
            .map(|d| {
                let ranges: Vec<String> =
                    d.ranges.iter().map(|r| format!("{:#x}+{:#x}", r.base, r.len)).collect();
                let irq = d.irq.map_or_else(|| "-".to_owned(), |i| i.to_string());
                format!("{} {} {} irq {irq}", d.id, d.kind.name(), ranges.join(","))
            })
            .collect();
        MachineShape {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            kernel_cmdline: crate::kernel_cmdline(config, plan),
            devices,
        }
    }
}

/// Everything a snapshot saves besides guest memory.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    /// [`FORMAT`].
    pub format: u32,
    /// The VMM version that wrote it; another version refuses it.
    pub vmm_version: String,
    /// The machine the guest has seen.
    pub machine: MachineShape,
    /// Interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Every device.
    pub devices: DeviceStates,
}

impl SnapshotState {
    /// Refuses a state of another format or VMM version, or of another machine than `machine`.
    pub fn check(&self, machine: &MachineShape) -> Result<(), SnapshotError> {
        if self.format != FORMAT {
            return Err(SnapshotError::Format(format!(
                "format {} (this VMM reads {FORMAT})",
                self.format
            )));
        }
        let version = env!("CARGO_PKG_VERSION");
        if self.vmm_version != version {
            return Err(SnapshotError::Mismatch(format!(
                "it was taken by isocell-vmm {}, this is {version}: take it again",
                self.vmm_version
            )));
        }
        if self.vcpus.len() != usize::from(self.machine.vcpus) {
            return Err(SnapshotError::Format(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.machine.vcpus
            )));
        }
        let m = &self.machine;
        let differs = |what: &str, saved: String, here: String| {
            SnapshotError::Mismatch(format!("{what}: the snapshot has {saved}, this VM {here}"))
        };
        if m.vcpus != machine.vcpus {
            return Err(differs("vCPUs", m.vcpus.to_string(), machine.vcpus.to_string()));
        }
        if m.memory_mib != machine.memory_mib {
            return Err(differs(
                "memory",
                format!("{} MiB", m.memory_mib),
                format!("{} MiB", machine.memory_mib),
            ));
        }
        if m.devices != machine.devices {
            return Err(differs("devices", m.devices.join(", "), machine.devices.join(", ")));
        }
        if m.kernel_cmdline != machine.kernel_cmdline {
            return Err(differs(
                "kernel command line",
                format!("{:?}", m.kernel_cmdline),
                format!("{:?}", machine.kernel_cmdline),
            ));
        }
        Ok(())
    }

    /// Reads `dir`'s state file (bounded) and checks it against `machine`.
    pub fn load(dir: &Path, machine: &MachineShape) -> Result<Self, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let io = |what| {
            let path = path.clone();
            move |source| SnapshotError::Io { what, path, source }
        };
        let file = File::open(&path).map_err(io("cannot open"))?;
        let mut text = Vec::new();
        file.take(MAX_STATE_BYTES + 1).read_to_end(&mut text).map_err(io("cannot read"))?;
        if text.len() as u64 > MAX_STATE_BYTES {
            return Err(SnapshotError::Format(format!("larger than {MAX_STATE_BYTES} bytes")));
        }
        let state: SnapshotState =
            serde_json::from_slice(&text).map_err(|e| SnapshotError::Format(e.to_string()))?;
        state.check(machine)?;
        Ok(state)
    }

    /// Writes the state file into `dir` (readable by its owner only).
    pub fn write(&self, dir: &Path) -> Result<(), SnapshotError> {
        let path = dir.join(STATE_FILE);
        let json = serde_json::to_vec(self).map_err(|e| SnapshotError::Format(e.to_string()))?;
        let mut f = create_private(&path)?;
        f.write_all(&json).map_err(|source| SnapshotError::Io {
            what: "cannot write",
            path: path.clone(),
            source,
        })
    }
}

/// Creates (or truncates) `path`, readable and writable by its owner only.
pub fn create_private(path: &Path) -> Result<File, SnapshotError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| SnapshotError::Io { what: "cannot create", path: path.into(), source })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn machine() -> MachineShape {
        MachineShape {
            vcpus: 1,
            memory_mib: 128,
            kernel_cmdline: "reboot=k console=ttyS0".into(),
            devices: vec!["serial0 serial".into(), "rng0 virtio-rng".into()],
        }
    }

    fn state() -> SnapshotState {
        SnapshotState {
            format: FORMAT,
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            machine: machine(),
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: Vec::new(),
            devices: DeviceStates { virtio: Default::default(), plain: Default::default() },
        }
    }

    #[test]
    fn a_snapshot_of_another_machine_or_vmm_is_refused() {
        let mut s = state();
        // No vCPU state for its one vCPU.
        assert!(matches!(s.check(&machine()), Err(SnapshotError::Format(_))));
        s.machine.vcpus = 0;
        let mut m = machine();
        m.vcpus = 0;
        s.check(&m).unwrap();
        let mut other = m.clone();
        other.memory_mib = 256;
        let e = s.check(&other).unwrap_err().to_string();
        assert!(e.contains("memory: the snapshot has 128 MiB, this VM 256 MiB"), "{e}");
        let mut other = m.clone();
        other.kernel_cmdline.push_str(" isocell.net=egress");
        assert!(s.check(&other).unwrap_err().to_string().contains("kernel command line"));
        let mut other = m.clone();
        other.devices.pop();
        assert!(s.check(&other).unwrap_err().to_string().contains("devices"));
        s.vmm_version = "0.0.0-other".into();
        assert!(s.check(&m).unwrap_err().to_string().contains("isocell-vmm 0.0.0-other"));
        s.vmm_version = env!("CARGO_PKG_VERSION").into();
        s.format = 99;
        assert!(matches!(s.check(&m), Err(SnapshotError::Format(_))));
    }

    #[test]
    fn state_round_trips_through_its_file_and_a_garbage_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("isocell-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = state();
        s.machine.vcpus = 0;
        let mut m = machine();
        m.vcpus = 0;
        s.write(&dir).unwrap();
        let back = SnapshotState::load(&dir, &m).unwrap();
        assert_eq!(back.machine, m);
        std::fs::write(dir.join(STATE_FILE), b"{\"format\": 1, \"vcpus\": [").unwrap();
        assert!(matches!(SnapshotState::load(&dir, &m), Err(SnapshotError::Format(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
