#!/usr/bin/env bash
# Everything CI checks: builds what is missing, then formatting, lints, unit tests, end-to-end
# tests that boot real guests (directly or in the nested test host), and the benchmark.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-all.sh
[[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"

# Each step says how long the run had taken when it began, so a slow CI run shows where it went.
step() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --all-targets --workspace --quiet -- -D warnings
step "unit and integration tests"
cargo test --profile tests --workspace --exclude isocell-e2e
step "end-to-end tests, two files at a time (scripts/e2e.sh)"
scripts/e2e.sh
step "fuzzing what a guest controls, time-boxed (scripts/fuzz.sh SECONDS for longer runs)"
scripts/fuzz.sh "${ISOCELL_FUZZ_SECS:-20}"
# Four measured runs per series (ISOCELL_BENCH_RUNS for more): the series together boot some two
# hundred cells under emulation at ten runs, a quarter of a cold CI run; four keep a cold CI run
# inside its limit with the containerd shim's build, tests and series. The peer series (QEMU
# microvm, cold against snapshot starts) always measures at least ten, as issue #15 asks.
step "benchmark (figures in build/bench/: vmm-boot, isocell-run, devices, network, machine, cri .json)"
target/x86_64-unknown-linux-gnu/release/isocell-bench --runs "${ISOCELL_BENCH_RUNS:-4}"
step "done"
