#!/usr/bin/env bash
# Installs the Debian packages IsoCell needs to build its guest kernel, its images and the nested
# test host. Idempotent: packages already present are left alone.
set -euo pipefail

packages=(
  # guest kernel build (guest/build-kernel.sh)
  linux-source-6.1 bc bison flex libelf-dev libssl-dev make gcc xz-utils
  # base image (guest/build-rootfs.sh)
  busybox-static e2fsprogs
  # nested test host (crates/testhost): QEMU TCG with emulated SVM, initramfs packing
  qemu-system-x86 cpio
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "isocell: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
