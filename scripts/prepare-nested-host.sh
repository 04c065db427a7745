#!/usr/bin/env bash
# Prepares the nested test host: Debian's amd64 kernel and the four modules that give it real
# KVM under QEMU TCG (irqbypass, kvm, ccp, kvm-amd), plus what an `isocell machine` needs on top:
# virtio PCI, its network and block drivers, and ext4 for its persistent state disk. Fetched with apt-get download, unpacked
# with dpkg-deb, cached per package version and linked as build/nested-host.
# Prints the directory on stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${ISOCELL_CACHE:-$HOME/.cache/isocell}

# The kernel the linux-image-amd64 metapackage points at, in its -unsigned form.
image=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-6[^ ]*-amd64\)$/\1/p' | head -n 1)
[[ -n "$image" ]] || { echo "isocell: cannot find Debian's linux-image-amd64 kernel package (apt-get update?)" >&2; exit 1; }
pkg="$image-unsigned"
version=$(apt-cache policy "$pkg" | sed -n 's/ *Candidate: //p')
out="$cache/nested-host/$pkg-$version"

modules=(
  virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko drivers/crypto/ccp/ccp.ko arch/x86/kvm/kvm-amd.ko
  arch/x86/kvm/kvm-intel.ko
  drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko drivers/virtio/virtio_pci_legacy_dev.ko
  drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci.ko net/core/failover.ko
  drivers/net/net_failover.ko drivers/net/virtio_net.ko drivers/block/virtio_blk.ko
  lib/crc16.ko fs/mbcache.ko crypto/crc32c_generic.ko fs/jbd2/jbd2.ko fs/ext4/ext4.ko
)
complete=1
for m in "${modules[@]}"; do [[ -f "$out/modules/$(basename "$m")" ]] || complete=; done
if [[ ! -f "$out/vmlinuz" || -z "$complete" ]]; then
  echo "isocell: fetching the nested host kernel ($pkg $version)" >&2
  work=$(mktemp -d "${TMPDIR:-/tmp}/isocell-nested.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download -q "$pkg=$version" >&2 2>/dev/null || apt-get download "$pkg=$version" >&2)
  dpkg-deb -x "$work"/*.deb "$work/x"
  mkdir -p "$out.tmp/modules"
  cp "$work"/x/boot/vmlinuz-* "$out.tmp/vmlinuz"
  for m in "${modules[@]}"; do
    cp "$work"/x/lib/modules/*/kernel/"$m" "$out.tmp/modules/"
  done
  rm -rf "$out" && mv "$out.tmp" "$out"
fi
mkdir -p "$root/build"
ln -sfn "$out" "$root/build/nested-host"
echo "$out"
