#!/usr/bin/env bash
# The main job, end to end: build whatever is missing, then run a command in a cell with
# `isocell run` and show its output. Runs on hardware KVM directly, or inside the nested test
# host where this machine has none (and says so).
#   scripts/run-cell.sh                      # a greeting from inside a cell
#   scripts/run-cell.sh -- uname -a          # any command
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-all.sh
[[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"

[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then
  set -- sh -c 'echo "Hello from cell $(cat /proc/sys/kernel/random/uuid | cut -c1-8): Linux $(uname -r), $(nproc) vCPU, $(awk "/MemTotal/ {print int(\$2/1024)}" /proc/meminfo) MiB"'
fi
bin=target/x86_64-unknown-linux-gnu/release
printf '\n==> isocell run -- %s\n' "$*" >&2
if [[ "$("$bin/isocell-testhost" info)" == direct ]]; then
  exec "$bin/isocell" run -- "$@"
else
  exec "$bin/isocell-testhost" isocell -- run -- "$@"
fi
