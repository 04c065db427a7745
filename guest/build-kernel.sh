#!/usr/bin/env bash
# Builds an IsoCell guest kernel (vmlinux and bzImage) from Debian's linux-source-6.1 package:
#   guest/build-kernel.sh [cell|acpi]
#   cell (the default): guest/kernel/cell.config merged onto tinyconfig; CPUs from the MP table,
#        virtio-mmio devices from virtio_mmio.device= on the command line.
#   acpi: cell.config, then guest/kernel/acpi.config (its lines win), merged onto tinyconfig;
#        CPUs from the ACPI MADT, virtio-mmio devices from the DSDT, poweroff through ACPI S5.
#
# The result is cached under a key made from the source package version, the config fragments
# and this script, so a second run is instant:
#   ${ISOCELL_CACHE:-~/.cache/isocell}/kernel/<key>/{bzImage,vmlinux,config}
# and linked as build/guest/{bzImage,vmlinux} (cell) or build/guest/acpi/{bzImage,vmlinux}
# (acpi). Prints the cache directory on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cache=${ISOCELL_CACHE:-$HOME/.cache/isocell}

flavour=${1:-cell}
case "$flavour" in
  cell)
    fragments=("$here/kernel/cell.config")
    links="$root/build/guest"
    ;;
  acpi)
    fragments=("$here/kernel/cell.config" "$here/kernel/acpi.config")
    links="$root/build/guest/acpi"
    ;;
  *)
    echo "usage: guest/build-kernel.sh [cell|acpi]" >&2
    exit 2
    ;;
esac

tarball=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null || true)
if [[ -z "$tarball" ]]; then
  echo "isocell: /usr/src/linux-source-6.1.tar.xz is missing; run scripts/install-deps.sh" >&2
  exit 1
fi
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
# The fragments in merge order: the flavours differ in them, so they need no name of their own.
key=$( { echo "$src_version"; cat "${fragments[@]}" "$0"; } | sha256sum | cut -c1-16)
out="$cache/kernel/$key"

if [[ ! -f "$out/bzImage" || ! -f "$out/vmlinux" ]]; then
  echo "isocell: building the $flavour kernel (linux-source $src_version, key $key; about 4 min on 2 cores)" >&2
  work=$(mktemp -d "${TMPDIR:-/tmp}/isocell-kernel.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  tar -C "$work" -xf "$tarball"
  cd "$work"/linux-source-6.1
  make -s tinyconfig >/dev/null
  # Later fragments override earlier ones option by option.
  scripts/kconfig/merge_config.sh -m .config "${fragments[@]}" >/dev/null
  make -s olddefconfig >/dev/null
  # Every requested option must have survived olddefconfig (a dependency can silently drop one).
  # The intended value of an option is its last line across the fragments. "is not set" holds
  # when the option is not built, whether olddefconfig wrote it unset or left it out as
  # unreachable.
  declare -A want=()
  order=()
  for fragment in "${fragments[@]}"; do
    while IFS= read -r line; do
      if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)= || "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        option=${BASH_REMATCH[1]}
        [[ -n "${want[$option]+set}" ]] || order+=("$option")
        want[$option]=$line
      fi
    done <"$fragment"
  done
  lost=0
  for option in "${order[@]}"; do
    line=${want[$option]}
    if [[ "$line" == "#"* ]]; then
      ! grep -q "^$option=" .config || { echo "isocell: kernel option lost: $line" >&2; lost=1; }
    else
      grep -qx -- "$line" .config || { echo "isocell: kernel option lost: $line" >&2; lost=1; }
    fi
  done
  [[ $lost == 0 ]] || exit 1
  make -s -j"$(nproc)" bzImage 2>&1 | grep -v '^$' >&2 || true
  [[ -f arch/x86/boot/bzImage ]] || { echo "isocell: kernel build failed" >&2; exit 1; }
  mkdir -p "$out.tmp"
  cp arch/x86/boot/bzImage vmlinux "$out.tmp/"
  cp .config "$out.tmp/config"
  rm -rf "$out" && mv "$out.tmp" "$out"
fi

mkdir -p "$links"
ln -sfn "$out/bzImage" "$links/bzImage"
ln -sfn "$out/vmlinux" "$links/vmlinux"
echo "$out"
