#!/usr/bin/env bash
# The main job, end to end: build whatever is missing, then run a command in a cell with
# `isocell run` and show its output. Runs on hardware KVM directly, or inside the nested test
# host where this machine has none (and says so).
#   scripts/run-cell.sh                         # python3 in a cell, from a registry image
#   scripts/run-cell.sh IMAGE [-- COMMAND...]   # any image: registry reference, oci:DIR,
#                                               # oci-archive:FILE, docker-archive:FILE, a path
#   scripts/run-cell.sh -- uname -a             # a command in the project's busybox image
#
# With no arguments it shows the whole path of a container image: it builds a small Debian
# image with python3 from Debian's packages (tests/images/build-test-images.sh), starts a real
# registry on 127.0.0.1 (Debian's docker-registry), pushes the image there, and runs
#   isocell run 127.0.0.1:PORT/demo/python:latest -- python3 -c ...
# which pulls it (checking every digest), converts it into a verity-protected cell image, and
# boots it. The registry is stopped and removed afterwards.
#
# Without hardware virtualization (kvm-pvm, no /dev/kvm) registry images and the busybox image
# run in an `isocell machine` (created and started here if needed, and left running for the
# next cells); image files on this host (oci:, oci-archive:, docker-archive:, a block image)
# run in the nested test host.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-all.sh
[[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"
bin=$root/target/x86_64-unknown-linux-gnu/release

image=
if [[ $# -eq 0 ]]; then
  images=$(tests/images/build-test-images.sh)
  reg=$(mktemp -d "${TMPDIR:-/tmp}/isocell-registry.XXXXXX")
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat >"$reg/config.yml" <<EOF
version: 0.1
storage:
  filesystem:
    rootdirectory: $reg/data
http:
  addr: 127.0.0.1:$port
log:
  level: error
EOF
  docker-registry serve "$reg/config.yml" >"$reg/log" 2>&1 &
  registry_pid=$!
  trap 'kill $registry_pid 2>/dev/null; wait $registry_pid 2>/dev/null; rm -rf "$reg"' EXIT
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  printf '\n==> a registry on 127.0.0.1:%s, with the demo image pushed by skopeo\n' "$port" >&2
  skopeo copy -q --dest-tls-verify=false "oci:$images/python:latest" \
    "docker://127.0.0.1:$port/demo/python:latest"
  image=127.0.0.1:$port/demo/python:latest
  export ISOCELL_INSECURE_REGISTRIES=127.0.0.1:$port
  set -- python3 -c 'import platform, sys; print(f"Hello from Python {sys.version.split()[0]} in an IsoCell cell: Linux {platform.release()}")'
elif [[ "$1" != "--" ]]; then
  image=$1
  shift
fi
[[ "${1:-}" == "--" ]] && shift
if [[ -z "$image" && $# -eq 0 ]]; then
  set -- sh -c 'echo "Hello from cell $(cat /proc/sys/kernel/random/uuid | cut -c1-8): Linux $(uname -r), $(nproc) vCPU, $(awk "/MemTotal/ {print int(\$2/1024)}" /proc/meminfo) MiB"'
fi

run_args=(run)
[[ -n "$image" ]] && run_args+=("$image")
printf '\n==> isocell %s -- %s\n' "${run_args[*]}" "$*" >&2
if [[ "$("$bin/isocell-testhost" info)" == direct ]]; then
  exec "$bin/isocell" "${run_args[@]}" -- "$@"
fi
local_image=
case "$image" in oci:* | oci-archive:* | docker-archive:*) local_image=1 ;; esac
[[ -n "$image" && -e "$image" ]] && local_image=1
if [[ -z "$local_image" ]]; then
  # No hardware virtualization: the cell runs in an isocell machine, a managed VM with KVM of
  # its own, created once and started if it is not running. It stays up for the next cells
  # (`isocell machine stop` ends it); `isocell run` finds it by itself.
  if ! "$bin/isocell" machine status >/dev/null 2>&1; then
    printf '\n==> isocell machine init (once: a state disk, TLS certificates)\n' >&2
    "$bin/isocell" machine init >&2
  fi
  state=$("$bin/isocell" machine status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["state"])')
  if [[ "$state" != running ]]; then
    printf '\n==> isocell machine start\n' >&2
    "$bin/isocell" machine start >&2
  fi
  # Not exec: the registry above is stopped on exit.
  "$bin/isocell" "${run_args[@]}" -- "$@"
  exit
fi
# An image file on this host: pull and convert it here, run the cell in the nested test host.
images_args=()
if [[ -n "$image" && ! -f "$image" ]]; then
  "$bin/isocell" image pull "$image"
  state=${ISOCELL_STATE_DIR:-$([[ $(id -u) == 0 ]] && echo /var/lib/isocell || echo "$HOME/.local/state/isocell")}
  images_args=(--images "$state/images")
fi
exec "$bin/isocell-testhost" isocell "${images_args[@]}" -- "${run_args[@]}" -- "$@"
