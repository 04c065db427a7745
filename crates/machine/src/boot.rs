//! Booting a machine: its initramfs (busybox, the kernel modules, IsoCell's binaries and guest
//! artefacts, its identity and TLS files, and an init script) and QEMU's command line.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use isocell_host::locate;

use crate::{write_private, Machine, MachineConfig, MachineError, GUEST_API_PORT, GUEST_EXEC_PORT};

/// The address this host's loopback has from inside the machine (QEMU user networking): a
/// registry on 127.0.0.1 here is reached there, over plain HTTP, as this address.
pub const OUTER_LOOPBACK: &str = "10.0.2.2";

/// How QEMU runs the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    /// Hardware virtualization: the machine's vCPUs are this host's, nested KVM for its cells.
    Kvm,
    /// QEMU TCG with emulated AMD SVM, which gives the machine a real /dev/kvm.
    Tcg,
}

impl Accelerator {
    /// `kvm` or `tcg`.
    pub fn name(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

/// KVM where this host has hardware virtualization, TCG otherwise.
pub fn accelerator() -> Accelerator {
    if crate::hardware_virtualization().is_ok() {
        Accelerator::Kvm
    } else {
        Accelerator::Tcg
    }
}

/// Kernel modules the machine loads, in order: KVM, virtio PCI with its network and block
/// drivers, and ext4 for the state disk (crc32c first: jbd2 and ext4 checksum with it).
const MODULES: [&str; 18] = [
    "irqbypass",
    "kvm",
    "ccp",
    KVM_VENDOR,
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "crc16",
    "mbcache",
    "crc32c_generic",
    "jbd2",
    "ext4",
];

/// Stands in [`MODULES`] for the vendor's KVM module: kvm-amd (emulated SVM under TCG, or an
/// AMD host) or kvm-intel, chosen by the machine's CPU flags.
const KVM_VENDOR: &str = "kvm-vendor";

/// PID 1 of the machine. It mounts the state disk where isocelld keeps its state, brings up the
/// network QEMU forwards the two ports over, beats once a second on the second serial port (so
/// `status` can tell a hung machine), creates the host profile on first boot, and keeps
/// isocelld running until `stop` says otherwise.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/isocell/bin
say() { echo "isocell-machine: $*"; }
mkdir -p /proc /sys /dev /tmp /run /var/lib/isocell /etc
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=50% tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
(while :; do printf .; sleep 1; done) >/dev/ttyS1 2>/dev/null &
vendor=kvm-amd; grep -qw vmx /proc/cpuinfo && vendor=kvm-intel
for m in @MODULES@; do
  [ $m = kvm-vendor ] && m=$vendor
  insmod /modules/$m.ko || say "insmod $m failed"
done
[ -c /dev/kvm ] || say "/dev/kvm did not appear: cells cannot run in this machine"
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
  || say "the network did not come up"
echo "nameserver 10.0.2.3" > /etc/resolv.conf
if ! mount -t ext4 -o errors=remount-ro /dev/vda /var/lib/isocell; then
  say "cannot mount the state disk (/dev/vda); powering off"
  poweroff -f
fi
export ISOCELL_STATE_DIR=/var/lib/isocell ISOCELL_MACHINE=/isocell/etc/machine.toml
export ISOCELL_KERNEL=/isocell/guest/vmlinux ISOCELL_IMAGE=/isocell/guest/rootfs.ext4
export ISOCELL_AGENT_INITRD=/isocell/guest/agent-initrd.cpio
[ -f /var/lib/isocell/host.toml ] || isocell host init @HOST_INIT@ >/dev/null \
  || say "cannot create the host profile"
# The exec channel and the daemon, each started again if it ends, until `stop`.
keep() {
  while [ ! -e /run/isocell-machine.stopping ]; do
    "$@"; rc=$?
    [ -e /run/isocell-machine.stopping ] || { say "$1 exited with $rc; starting it again"; sleep 1; }
  done
}
keep isocell machine serve --listen 0.0.0.0:@EXEC_PORT@ --token /isocell/etc/exec.token \
  --daemon-socket /run/isocell/isocelld.sock --state-dir /var/lib/isocell &
say "started"
keep isocelld --config /isocell/etc/isocelld.toml
while :; do sleep 3600; done
"#;

/// Builds `initramfs.cpio` in the machine's directory; returns its path.
pub fn stage(machine: &Machine, config: &MachineConfig) -> Result<PathBuf, MachineError> {
    let located = |r: Result<PathBuf, locate::LocateError>| {
        r.map_err(|e| MachineError::Failed(e.to_string()))
    };
    let nested = located(locate::nested_host())?;
    let this = std::env::current_exe()
        .map_err(|e| MachineError::Failed(format!("cannot find this program: {e}")))?;
    let sibling = |name: &str| {
        let p = this.with_file_name(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(MachineError::Failed(format!(
                "{} does not exist; build it with `cargo build --release --workspace --bins`",
                p.display()
            )))
        }
    };
    let dir = machine.file("stage");
    let _ = fs::remove_dir_all(&dir);
    let made = stage_in(machine, config, &dir, &nested, &this, &sibling);
    let _ = fs::remove_dir_all(&dir);
    made
}

fn stage_in(
    machine: &Machine,
    config: &MachineConfig,
    dir: &Path,
    nested: &Path,
    this: &Path,
    sibling: &dyn Fn(&str) -> Result<PathBuf, MachineError>,
) -> Result<PathBuf, MachineError> {
    let io = |what: &str, p: &Path| {
        let what = format!("{what} {}", p.display());
        move |e: std::io::Error| MachineError::Io { what, source: e }
    };
    for d in ["bin", "modules", "isocell/bin", "isocell/guest", "isocell/etc"] {
        fs::create_dir_all(dir.join(d)).map_err(io("creating", &dir.join(d)))?;
    }
    let busybox = PathBuf::from("/bin/busybox");
    if !busybox.is_file() {
        return Err(MachineError::Failed(
            "/bin/busybox is missing: install busybox-static (scripts/install-deps.sh)".into(),
        ));
    }
    let located = |r: Result<PathBuf, locate::LocateError>| {
        r.map_err(|e| MachineError::Failed(e.to_string()))
    };
    let mut copies: Vec<(PathBuf, PathBuf)> = vec![
        (busybox, dir.join("bin/busybox")),
        (this.to_owned(), dir.join("isocell/bin/isocell")),
        (located(locate::kernel(None))?, dir.join("isocell/guest/vmlinux")),
        (located(locate::image(None))?, dir.join("isocell/guest/rootfs.ext4")),
        (located(locate::agent_initrd(None))?, dir.join("isocell/guest/agent-initrd.cpio")),
    ];
    for b in ["isocelld", "isocell-supervisor", "isocell-vmm", "isocell-jailer"] {
        copies.push((sibling(b)?, dir.join("isocell/bin").join(b)));
    }
    let vendors = ["kvm-amd", "kvm-intel"];
    for m in MODULES.iter().flat_map(|m| {
        if *m == KVM_VENDOR {
            &vendors[..]
        } else {
            std::slice::from_ref(m)
        }
    }) {
        let from = nested.join("modules").join(format!("{m}.ko"));
        if !from.is_file() {
            return Err(MachineError::Failed(format!(
                "{} is missing: run scripts/prepare-nested-host.sh",
                from.display()
            )));
        }
        copies.push((from, dir.join("modules").join(format!("{m}.ko"))));
    }
    for f in ["server.pem", "server.key", "ca.pem", "exec.token"] {
        copies.push((machine.file(f), dir.join("isocell/etc").join(f)));
    }
    for (from, to) in copies {
        fs::copy(&from, &to).map_err(io("copying", &from))?;
    }
    let identity = isocell_spec::MachineIdentity {
        machine_id: config.machine_id.clone(),
        outer_host: read_trimmed("/proc/sys/kernel/hostname"),
        outer_kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        accelerator: accelerator().name().to_owned(),
    };
    let text = toml::to_string(&identity).map_err(|e| MachineError::Failed(e.to_string()))?;
    fs::write(dir.join("isocell/etc/machine.toml"), text).map_err(io("writing", dir))?;
    let daemon = format!(
        "socket = \"/run/isocell/isocelld.sock\"\nstate_dir = \"/var/lib/isocell\"\n\
         insecure_registries = [\"{OUTER_LOOPBACK}:*\"]\n\n[tls]\n\
         listen = \"0.0.0.0:{GUEST_API_PORT}\"\ncert = \"/isocell/etc/server.pem\"\n\
         key = \"/isocell/etc/server.key\"\nclient_ca = \"/isocell/etc/ca.pem\"\n"
    );
    fs::write(dir.join("isocell/etc/isocelld.toml"), daemon).map_err(io("writing", dir))?;
    let host_init = format!(
        "--jurisdiction {} --zone {} --operator {}",
        config.jurisdiction, config.zone, config.operator
    );
    let init = INIT
        .replace("@MODULES@", &MODULES.join(" "))
        .replace("@HOST_INIT@", &host_init)
        .replace("@EXEC_PORT@", &GUEST_EXEC_PORT.to_string());
    let init_path = dir.join("init");
    fs::write(&init_path, init).map_err(io("writing", &init_path))?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))
        .map_err(io("writing", &init_path))?;
    let out = machine.file("initramfs.cpio");
    let tmp = machine.file("initramfs.cpio.tmp");
    // Private: it carries the machine's TLS key and exec token.
    write_private(&tmp, b"")?;
    let status = Command::new("sh")
        .arg("-c")
        // Owned by root in the machine, whoever runs `start` here.
        .arg("cd \"$1\" && find . | cpio --quiet -o -H newc -R 0:0 > \"$2\"")
        .args(["sh", &dir.to_string_lossy(), &tmp.to_string_lossy()])
        .status()
        .map_err(|e| {
            MachineError::Failed(format!("cannot run cpio ({e}): scripts/install-deps.sh"))
        })?;
    if !status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(MachineError::Failed(
            "cpio failed (scripts/install-deps.sh installs it)".into(),
        ));
    }
    fs::rename(&tmp, &out).map_err(io("writing", &out))?;
    Ok(out)
}

fn read_trimmed(path: &str) -> String {
    fs::read_to_string(path).map(|s| s.trim().to_owned()).unwrap_or_else(|_| "unknown".into())
}

/// QEMU's command line for the machine. Its two forwarded ports listen on 127.0.0.1 only.
pub fn qemu_argv(
    machine: &Machine,
    config: &MachineConfig,
    initramfs: &Path,
    accel: Accelerator,
    api_port: u16,
    exec_port: u16,
) -> Vec<String> {
    let f = |name: &str| machine.file(name).display().to_string();
    let nested = locate::nested_host().unwrap_or_default();
    let mut v: Vec<String> = vec!["qemu-system-x86_64".into()];
    let mut add = |items: &[&str]| v.extend(items.iter().map(|s| s.to_string()));
    match accel {
        Accelerator::Kvm => add(&["-accel", "kvm", "-cpu", "host"]),
        Accelerator::Tcg => add(&["-accel", "tcg,thread=multi", "-cpu", "EPYC,+svm,+npt"]),
    }
    let smp = config.cpus.to_string();
    let mem = config.memory_mib.to_string();
    add(&["-smp", &smp, "-m", &mem, "-display", "none", "-nodefaults", "-no-reboot"]);
    add(&["-serial", &format!("file:{}", f("console.log"))]);
    add(&["-serial", &format!("file:{}", f("heartbeat"))]);
    add(&["-kernel", &nested.join("vmlinuz").display().to_string()]);
    add(&["-initrd", &initramfs.display().to_string()]);
    // The periodic tick: see the test host's NESTED_TICK (lost timer wake-ups under emulated SVM).
    add(&["-append", "console=ttyS0 quiet panic=-1 nohz=off highres=off"]);
    add(&["-drive", &format!("file={},if=none,id=state,format=raw", f("disk.img"))]);
    add(&["-device", "virtio-blk-pci,drive=state"]);
    add(&[
        "-netdev",
        &format!(
            "user,id=net,restrict={},hostfwd=tcp:127.0.0.1:{api_port}-:{GUEST_API_PORT},hostfwd=tcp:127.0.0.1:{exec_port}-:{GUEST_EXEC_PORT}",
            if config.isolated { "on" } else { "off" }
        ),
    ]);
    add(&["-device", "virtio-net-pci,netdev=net,romfile="]);
    add(&["-daemonize", "-pidfile", &f("qemu.pid")]);
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn forwarded_ports_listen_on_loopback_only() {
        let m = Machine::at(PathBuf::from("/m"));
        let c = MachineConfig {
            cpus: 2,
            memory_mib: 2048,
            disk_mib: 1024,
            machine_id: "x".into(),
            jurisdiction: "EU".into(),
            zone: "z".into(),
            operator: "o".into(),
            isolated: false,
        };
        let argv = qemu_argv(&m, &c, Path::new("/m/initramfs.cpio"), Accelerator::Tcg, 4000, 4001);
        let net = argv.iter().find(|a| a.starts_with("user,")).unwrap();
        assert_eq!(net.matches("hostfwd=tcp:127.0.0.1:").count(), 2, "{net}");
        assert_eq!(net.matches("hostfwd=").count(), 2, "{net}");
        assert!(argv.contains(&"EPYC,+svm,+npt".to_owned()));
        assert!(net.contains("restrict=off"), "{net}");
        let isolated = MachineConfig { isolated: true, ..c.clone() };
        let argv = qemu_argv(&m, &isolated, Path::new("/i"), Accelerator::Kvm, 4000, 4001);
        assert!(argv.iter().any(|a| a.contains("restrict=on")), "{argv:?}");
        assert!(argv.windows(2).any(|w| w[0] == "-cpu" && w[1] == "host"));
        assert!(argv.windows(2).any(|w| w[0] == "-smp" && w[1] == "2"));
        // The machine's directory is in QEMU's command line: that is how its pid is told apart.
        assert!(argv.iter().any(|a| a.contains("/m/disk.img")));
    }
}
