#!/usr/bin/env bash
# Builds everything a cell needs, skipping what is already built or cached:
# Debian packages, the guest kernels (cell and acpi), the base image, the nested test host (only
# where this machine lacks hardware virtualization) and the release binaries.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

step() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  [[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
  step "installing the Rust toolchain (rustup)"
  apt-get install -y -qq curl ca-certificates >/dev/null
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt >&2
  . "$HOME/.cargo/env"
fi

step "Debian packages"
scripts/install-deps.sh
step "cell and ACPI guest kernels (cached after the first build)"
guest/build-kernel.sh cell acpi >/dev/null
step "release binaries (the agent goes into the base image)"
cargo build --release --workspace --bins --quiet
step "base image"
guest/build-rootfs.sh >/dev/null
if [[ -e /sys/module/kvm_pvm ]] || ! grep -qwE 'vmx|svm' /proc/cpuinfo; then
  step "nested test host kernel (this machine has no hardware virtualization)"
  scripts/prepare-nested-host.sh >/dev/null
fi
