#!/usr/bin/env bash
# Builds the IsoCell cell kernel (vmlinux and bzImage) from Debian's linux-source-6.1 package with
# guest/kernel/cell.config merged onto tinyconfig.
#
# The result is cached under a key made from the config fragment, this script and the source
# package version, so a second run is instant:
#   ${ISOCELL_CACHE:-~/.cache/isocell}/kernel/<key>/{bzImage,vmlinux,config}
# and linked as build/guest/{bzImage,vmlinux}. Prints the cache directory on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cache=${ISOCELL_CACHE:-$HOME/.cache/isocell}

tarball=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null || true)
if [[ -z "$tarball" ]]; then
  echo "isocell: /usr/src/linux-source-6.1.tar.xz is missing; run scripts/install-deps.sh" >&2
  exit 1
fi
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$src_version"; cat "$here/kernel/cell.config" "$0"; } | sha256sum | cut -c1-16)
out="$cache/kernel/$key"

if [[ ! -f "$out/bzImage" || ! -f "$out/vmlinux" ]]; then
  echo "isocell: building the cell kernel (linux-source $src_version, key $key; about 4 min on 2 cores)" >&2
  work=$(mktemp -d "${TMPDIR:-/tmp}/isocell-kernel.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  tar -C "$work" -xf "$tarball"
  cd "$work"/linux-source-6.1
  make -s tinyconfig >/dev/null
  scripts/kconfig/merge_config.sh -m .config "$here/kernel/cell.config" >/dev/null
  make -s olddefconfig >/dev/null
  # Every requested option must have survived olddefconfig (a dependency can silently drop one).
  while IFS= read -r line; do
    [[ "$line" =~ ^CONFIG_ || "$line" =~ ^#\ CONFIG_.*\ is\ not\ set$ ]] || continue
    grep -qx -- "$line" .config || { echo "isocell: kernel option lost: $line" >&2; exit 1; }
  done <"$here/kernel/cell.config"
  make -s -j"$(nproc)" bzImage 2>&1 | grep -v '^$' >&2 || true
  [[ -f arch/x86/boot/bzImage ]] || { echo "isocell: kernel build failed" >&2; exit 1; }
  mkdir -p "$out.tmp"
  cp arch/x86/boot/bzImage vmlinux "$out.tmp/"
  cp .config "$out.tmp/config"
  rm -rf "$out" && mv "$out.tmp" "$out"
fi

mkdir -p "$root/build/guest"
ln -sfn "$out/bzImage" "$root/build/guest/bzImage"
ln -sfn "$out/vmlinux" "$root/build/guest/vmlinux"
echo "$out"
