#!/usr/bin/env bash
# Builds the IsoCell base image: a small ext4 root with Debian's busybox-static, the agent
# (isocell-agent, at /sbin/init for cells booted the old way, with the image as the kernel's
# root) and the VMM test scenarios' init
# (guest/rootfs/init, at /sbin/scenario-init), and the same tree as an initramfs (cpio, with
# /init the scenario init). Also the agent's initramfs, which cells boot with: only the agent
# as /init and empty mount points (the agent mounts the cell image itself, from
# isocell.root= on the kernel command line). Cached under a key made from busybox's version
# and the inputs, linked as build/guest/rootfs.ext4, build/guest/initrd.cpio and
# build/guest/agent-initrd.cpio. Prints the image path.
# The agent must be built first: cargo build --release -p isocell-agent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cache=${ISOCELL_CACHE:-$HOME/.cache/isocell}

busybox=/bin/busybox
[[ -x $busybox ]] || { echo "isocell: $busybox is missing; run scripts/install-deps.sh" >&2; exit 1; }
agent=${ISOCELL_AGENT:-$root/target/x86_64-unknown-linux-gnu/release/isocell-agent}
[[ -x $agent ]] || { echo "isocell: $agent is missing; run cargo build --release -p isocell-agent" >&2; exit 1; }
bb_version=$(dpkg-query -W -f='${Version}' busybox-static)
key=$( { echo "$bb_version"; cat "$here/rootfs/init" "$0" "$agent"; } | sha256sum | cut -c1-16)
out="$cache/rootfs/$key/rootfs.ext4"
initrd="$cache/rootfs/$key/initrd.cpio"
agent_initrd="$cache/rootfs/$key/agent-initrd.cpio"

if [[ ! -f "$out" || ! -f "$initrd" || ! -f "$agent_initrd" ]]; then
  echo "isocell: building the base image (busybox $bb_version, key $key)" >&2
  stage=$(mktemp -d "${TMPDIR:-/tmp}/isocell-rootfs.XXXXXX")
  agent_stage=$(mktemp -d "${TMPDIR:-/tmp}/isocell-agent-initrd.XXXXXX")
  trap 'rm -rf "$stage" "$agent_stage"' EXIT
  mkdir -p "$stage"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,root,run}
  chmod 1777 "$stage/tmp"
  cp "$busybox" "$stage/bin/busybox"
  for applet in $("$busybox" --list); do
    [[ "$applet" == busybox ]] || ln -s busybox "$stage/bin/$applet"
  done
  install -m 0755 "$agent" "$stage/sbin/init"
  install -m 0755 "$here/rootfs/init" "$stage/sbin/scenario-init"
  echo "root:x:0:0:root:/root:/bin/sh" >"$stage/etc/passwd"
  echo "root:x:0:" >"$stage/etc/group"
  mkdir -p "$(dirname "$out")"
  rm -f "$out.tmp"
  # Fixed timestamps and UUID keep the image reproducible for the launch measurement.
  find "$stage" -exec touch -h -d @0 {} +
  E2FSPROGS_FAKE_TIME=0 mkfs.ext4 -q -F -L isocell-root -U 6f1c0e2a-2b7e-4e0e-9d6e-1ce11ce11ce1 \
    -E root_owner=0:0,hash_seed=6f1c0e2a-2b7e-4e0e-9d6e-1ce11ce11ce1 \
    -O ^has_journal -d "$stage" "$out.tmp" 24M >&2
  ln -s sbin/scenario-init "$stage/init"
  (cd "$stage" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --reproducible >"$initrd.tmp")
  # The agent's initramfs: /init and the mount points, owned by root, fixed times, sorted.
  mkdir -p "$agent_stage"/{dev,proc,sys,run,mnt}
  install -m 0755 "$agent" "$agent_stage/init"
  chmod 0755 "$agent_stage" "$agent_stage"/{dev,proc,sys,run,mnt}
  find "$agent_stage" -exec touch -h -d @0 {} +
  (cd "$agent_stage" && find . | LC_ALL=C sort |
    cpio --quiet -o -H newc --reproducible -R 0:0 >"$agent_initrd.tmp")
  mv "$out.tmp" "$out"
  mv "$initrd.tmp" "$initrd"
  mv "$agent_initrd.tmp" "$agent_initrd"
fi
mkdir -p "$root/build/guest"
ln -sfn "$out" "$root/build/guest/rootfs.ext4"
ln -sfn "$initrd" "$root/build/guest/initrd.cpio"
ln -sfn "$agent_initrd" "$root/build/guest/agent-initrd.cpio"
echo "$out"
