#!/usr/bin/env bash
# Installs the Debian packages IsoCell needs to build its guest kernel, its images and the nested
# test host. Idempotent: packages already present are left alone.
set -euo pipefail

packages=(
  # guest kernel build (guest/build-kernel.sh)
  linux-source-6.1 bc bison flex libelf-dev libssl-dev make gcc xz-utils
  # base image (guest/build-rootfs.sh); e2fsprogs also turns OCI layers into a cell's root disk
  busybox-static e2fsprogs
  # nested test host (crates/testhost): QEMU TCG with emulated SVM, initramfs packing
  qemu-system-x86 cpio
  # OCI/Docker images: pulling and converting (skopeo), `mke2fs -d -` reading a tarball from stdin
  # (libarchive13, loaded by mke2fs at run time), dm-verity (cryptsetup-bin)
  skopeo libarchive13 cryptsetup-bin
  # test images and registry (tests/images/build-test-images.sh, tests/registry.rs)
  mmdebstrap docker-registry
  # the containerd shim's tests: Debian's containerd (1.6, task API v2) and ctr; protoc builds
  # the CRI client (k8s-cri) those tests drive containerd's CRI plugin with
  containerd protobuf-compiler
)

# The nested test host needs QEMU 8 or later. Debian 12's QEMU 7.2 freezes the whole nested host
# every dozen or so guests under emulated SVM (measured: 2 freezes in the first 13 guests with two
# nested CPUs, and three in one CI run with one); QEMU 10.0 from bookworm-backports ran 40 such
# guests without one. On Debian 12 it therefore comes from bookworm-backports.
# Building a root disk from image layers pipes a tarball into `mke2fs -d -`, which e2fsprogs reads
# only from 1.47.1 on; Debian 12 has 1.47.0, so that comes from bookworm-backports too.
export DEBIAN_FRONTEND=noninteractive
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
version_of() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
# Installed, under its own name or its 64-bit-time_t name (libarchive13t64 from Debian 13 on).
installed() {
  local status
  status=$(dpkg-query -W -f='${Status}\n' "$1" "$1t64" 2>/dev/null || true)
  [[ "$status" == *"install ok installed"* ]]
}

# Packages Debian 12 has too old, with the version IsoCell needs.
declare -A backport_min=([qemu-system-x86]=1:8 [e2fsprogs]=1.47.1)
backports=()
if [[ "$codename" == bookworm ]]; then
  for p in qemu-system-x86 e2fsprogs; do
    dpkg --compare-versions "$(version_of "$p")" ge "${backport_min[$p]}" || backports+=("$p")
  done
fi
if ((${#backports[@]})); then
  list=/etc/apt/sources.list.d/isocell-bookworm-backports.list
  if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "isocell: adding bookworm-backports for ${backports[*]} ($list)" >&2
    echo "deb http://deb.debian.org/debian bookworm-backports main" >"$list"
  fi
fi

missing=()
for p in "${packages[@]}"; do
  [[ " ${backports[*]} " == *" $p "* ]] && continue
  installed "$p" || missing+=("$p")
done
if ((${#missing[@]} + ${#backports[@]})); then
  apt-get update -qq
fi
if ((${#backports[@]})); then
  for p in "${backports[@]}"; do
    echo "isocell: installing $p from bookworm-backports (Debian 12's $(version_of "$p") is older than ${backport_min[$p]})" >&2
  done
  apt-get install -y -qq --no-install-recommends -t bookworm-backports "${backports[@]}" >/dev/null
fi
if ((${#missing[@]})); then
  echo "isocell: installing Debian packages: ${missing[*]}" >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

v=$(version_of e2fsprogs)
if ! dpkg --compare-versions "${v:-0}" ge 1.47.1; then
  echo "isocell: warning: e2fsprogs ${v:-(none)} cannot read a tarball (mke2fs -d -); 1.47.1 or later is needed for OCI images" >&2
fi
