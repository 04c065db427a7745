#!/usr/bin/env bash
# Builds IsoCell guest kernels (vmlinux and bzImage) from Debian's linux-source-6.1 package:
#   guest/build-kernel.sh [cell|acpi]...
#   cell (the default): guest/kernel/cell.config merged onto tinyconfig; CPUs from the MP table,
#        virtio-mmio devices from virtio_mmio.device= on the command line.
#   acpi: cell.config, then guest/kernel/acpi.config (its lines win), merged onto tinyconfig;
#        CPUs from the ACPI MADT, virtio-mmio devices from the DSDT, poweroff through ACPI S5.
#
# Each result is cached under a key made from the source package version, the flavour's config
# fragments and the steps that build it (key_of), so a second run is instant:
#   ${ISOCELL_CACHE:-~/.cache/isocell}/kernel/<key>/{bzImage,vmlinux,config}
# and linked as build/guest/{bzImage,vmlinux} (cell) or build/guest/acpi/{bzImage,vmlinux}
# (acpi). Prints each flavour's cache directory on stdout, in the order given.
#
# Flavours built in one call share one source tree, extracted once, and build one after
# another: kbuild then recompiles only what reads an option that changed. ACPI and PCI reach
# most headers, so the acpi kernel after the cell one still rebuilds most of the tree: 8.4 min
# against 10.7 min from a fresh tree (2 cores, one run each, when the kernels were built -Os;
# built -O2, both together took 11.6 min).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cache=${ISOCELL_CACHE:-$HOME/.cache/isocell}

(( $# )) || set -- cell
for flavour in "$@"; do
  [[ "$flavour" == cell || "$flavour" == acpi ]] || { echo "usage: guest/build-kernel.sh [cell|acpi]..." >&2; exit 2; }
done

# A flavour's config fragments, one per line, in merge order (later lines win).
fragments_of() {
  case "$1" in
    cell) printf '%s\n' "$here/kernel/cell.config" ;;
    acpi) printf '%s\n' "$here/kernel/cell.config" "$here/kernel/acpi.config" ;;
  esac
}
links_of() {
  case "$1" in
    cell) echo "$root/build/guest" ;;
    acpi) echo "$root/build/guest/acpi" ;;
  esac
}

tarball=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null || true)
if [[ -z "$tarball" ]]; then
  echo "isocell: /usr/src/linux-source-6.1.tar.xz is missing; run scripts/install-deps.sh" >&2
  exit 1
fi
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)

# Configures the tree in the current directory for a flavour and builds it into $2.
build_flavour() {
  local flavour=$1 out=$2
  local -a fragments
  mapfile -t fragments < <(fragments_of "$flavour")
  make -s tinyconfig >/dev/null
  # Later fragments override earlier ones option by option.
  scripts/kconfig/merge_config.sh -m .config "${fragments[@]}" >/dev/null
  make -s olddefconfig >/dev/null
  # Every requested option must have survived olddefconfig (a dependency can silently drop one).
  # The intended value of an option is its last line across the fragments. "is not set" holds
  # when the option is not built, whether olddefconfig wrote it unset or left it out as
  # unreachable.
  local -A want=()
  local -a order=()
  local fragment line option lost=0
  for fragment in "${fragments[@]}"; do
    while IFS= read -r line; do
      if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)= || "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        option=${BASH_REMATCH[1]}
        [[ -n "${want[$option]+set}" ]] || order+=("$option")
        want[$option]=$line
      fi
    done <"$fragment"
  done
  for option in "${order[@]}"; do
    line=${want[$option]}
    if [[ "$line" == "#"* ]]; then
      ! grep -q "^$option=" .config || { echo "isocell: kernel option lost: $line" >&2; lost=1; }
    else
      grep -qx -- "$line" .config || { echo "isocell: kernel option lost: $line" >&2; lost=1; }
    fi
  done
  [[ $lost == 0 ]] || exit 1
  rm -f arch/x86/boot/bzImage
  make -s -j"$(nproc)" bzImage 2>&1 | grep -v '^$' >&2 || true
  [[ -f arch/x86/boot/bzImage ]] || { echo "isocell: $flavour kernel build failed" >&2; exit 1; }
  mkdir -p "$out.tmp"
  cp arch/x86/boot/bzImage vmlinux "$out.tmp/"
  cp .config "$out.tmp/config"
  rm -rf "$out" && mv "$out.tmp" "$out"
}

# The key: the source version, the flavour's fragments (they differ between flavours, so a
# flavour needs no name of its own) and build_flavour, the steps that configure and build a
# tree, as bash prints the function back: without comments, so editing a comment or a message
# keeps the cache (another bash may print it differently, which only costs a rebuild). The
# extraction around it is a plain `tar -x` of the versioned source.
key_of() {
  local -a fragments
  mapfile -t fragments < <(fragments_of "$1")
  { echo "$src_version"; cat "${fragments[@]}"; declare -f build_flavour; } | sha256sum | cut -c1-16
}

work=
for flavour in "$@"; do
  key=$(key_of "$flavour")
  out="$cache/kernel/$key"
  if [[ ! -f "$out/bzImage" || ! -f "$out/vmlinux" ]]; then
    if [[ -z "$work" ]]; then
      work=$(mktemp -d "${TMPDIR:-/tmp}/isocell-kernel.XXXXXX")
      trap 'rm -rf "$work"' EXIT
      tar -C "$work" -xf "$tarball"
    fi
    echo "isocell: building the $flavour kernel (linux-source $src_version, key $key; 6-11 min on 2 cores)" >&2
    (cd "$work"/linux-source-6.1 && build_flavour "$flavour" "$out")
  fi
  links=$(links_of "$flavour")
  mkdir -p "$links"
  ln -sfn "$out/bzImage" "$links/bzImage"
  ln -sfn "$out/vmlinux" "$links/vmlinux"
  echo "$out"
done
