#!/usr/bin/env bash
# The main job, end to end: build whatever is missing, then boot a cell from the base image that
# prints a greeting and stops. Runs on hardware KVM directly, or inside the nested test host
# where this machine has none (and says so).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-all.sh
[[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"

bin=target/x86_64-unknown-linux-gnu/release
args=(--cpus 2 --memory 128 --boot-args "isocell_scenario=greet quiet")
printf '\n==> booting a cell\n' >&2
if [[ "$("$bin/isocell-testhost" info)" == direct ]]; then
  exec "$bin/isocell-vmm" --kernel build/guest/bzImage --drive "id=root,path=build/guest/rootfs.ext4,ro,root" "${args[@]}"
else
  exec "$bin/isocell-testhost" vmm -- --kernel '{bzimage}' --drive 'id=root,path={rootfs},ro,root' "${args[@]}"
fi
