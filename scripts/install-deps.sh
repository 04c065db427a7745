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

# The nested test host needs QEMU 8 or later. Debian 12's QEMU 7.2 freezes the whole nested host
# every dozen or so guests under emulated SVM (measured: 2 freezes in the first 13 guests with two
# nested CPUs, and three in one CI run with one); QEMU 10.0 from bookworm-backports ran 40 such
# guests without one. On Debian 12 it therefore comes from bookworm-backports.
export DEBIAN_FRONTEND=noninteractive
qemu_from=()
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
qemu_version=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
if [[ "$codename" == bookworm ]] && ! dpkg --compare-versions "${qemu_version:-0}" ge 1:8; then
  list=/etc/apt/sources.list.d/isocell-bookworm-backports.list
  if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "isocell: adding bookworm-backports for QEMU ($list)" >&2
    echo "deb http://deb.debian.org/debian bookworm-backports main" >"$list"
  fi
  qemu_from=(-t bookworm-backports)
fi

missing=()
for p in "${packages[@]}"; do
  [[ "$p" == qemu-system-x86 && ${#qemu_from[@]} -gt 0 ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} + ${#qemu_from[@]})); then
  apt-get update -qq
fi
if ((${#qemu_from[@]})); then
  echo "isocell: installing QEMU from bookworm-backports (Debian 12's ${qemu_version:-none} is too old)" >&2
  apt-get install -y -qq --no-install-recommends "${qemu_from[@]}" qemu-system-x86 >/dev/null
fi
if ((${#missing[@]})); then
  echo "isocell: installing Debian packages: ${missing[*]}" >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
