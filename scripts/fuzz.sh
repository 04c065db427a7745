#!/usr/bin/env bash
# Time-boxed fuzzing of everything that parses hostile input: the VMM's virtqueue, vsock and
# virtio-mmio entry points (crates/vmm/fuzz) and the protocol decoder (crates/proto/fuzz).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 60)
#
# Runs on the stable toolchain: cargo-fuzz needs nightly-only flags (-Z sanitizer, -C passes=
# sancov), which RUSTC_BOOTSTRAP=1 unlocks. AddressSanitizer builds and runs with the stable
# toolchain's sanitizer runtime; set FUZZ_SANITIZER=none to fuzz without it (faster, finds
# panics only). Debug assertions (integer overflow checks) are on.
#
# Corpora, build outputs and raw artifacts go under target/fuzz/ (ignored by git). Every crash
# input is copied to crates/<crate>/fuzz/regressions/<target>/, where the unit test
# `fuzzing::tests::regressions_replay` (cargo test -p isocell-vmm) replays it on every run.
# Exits 1 if any target crashed, after running all of them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"

secs=${1:-60}
if ! [[ "$secs" =~ ^[0-9]+$ ]] || (( secs == 0 )); then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi
sanitizer=${FUZZ_SANITIZER:-address}
work="$root/target/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
# The workspace's static-linking rustflags (.cargo/config.toml) do not mix with the sanitizer
# runtime; cargo-fuzz sets RUSTFLAGS itself, which replaces them.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS

# crate directory : targets
suites=(
    "crates/vmm/fuzz:block_queue rng_queue vsock_queue mmio_registers"
    "crates/proto/fuzz:decode"
)

failed=0
summary=()
for suite in "${suites[@]}"; do
    dir=${suite%%:*}
    crate=$(basename "$(dirname "$dir")")
    targets=${suite#*:}
    # cargo-fuzz creates an empty artifacts/ directory in the crate (ours go to target/fuzz).
    had_artifacts=0
    [[ -e "$dir/artifacts" ]] && had_artifacts=1
    echo "==> building $dir ($sanitizer sanitizer)" >&2
    build_start=$SECONDS
    (cd "$dir" && cargo fuzz build -a -s "$sanitizer" --target-dir "$work/build/$crate")
    summary+=("$crate: build $((SECONDS - build_start)) s")
    for t in $targets; do
        corpus="$work/corpus/$crate/$t"
        artifacts="$work/artifacts/$crate/$t"
        log="$work/logs/$crate-$t.log"
        mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
        seeds=()
        [[ -d "$dir/seeds/$t" ]] && seeds=("$root/$dir/seeds/$t")
        echo "==> fuzzing $crate/$t for $secs s (log: $log)" >&2
        set +e
        (cd "$dir" && cargo fuzz run -a -s "$sanitizer" --target-dir "$work/build/$crate" "$t" \
            "$corpus" "${seeds[@]}" -- \
            -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=256 \
            -print_final_stats=1 -artifact_prefix="$artifacts/") >"$log" 2>&1
        rc=$?
        set -e
        stats=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
        [[ -z "$stats" ]] && stats=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
        summary+=("$crate/$t: rc=$rc $stats")
        shopt -s nullglob
        crashes=("$artifacts"/crash-* "$artifacts"/oom-* "$artifacts"/timeout-* "$artifacts"/leak-*)
        shopt -u nullglob
        if (( rc != 0 || ${#crashes[@]} > 0 )); then
            failed=1
            mkdir -p "$dir/regressions/$t"
            for c in "${crashes[@]}"; do
                cp "$c" "$dir/regressions/$t/"
                echo "    crash input saved: $dir/regressions/$t/$(basename "$c")" >&2
            done
            grep -E 'panicked at|ERROR: (libFuzzer|AddressSanitizer)' "$log" | head -3 >&2 || true
        fi
    done
    (( had_artifacts )) || find "$dir/artifacts" -depth -type d -empty -delete 2>/dev/null || true
done

echo >&2
echo "==> summary (executions, coverage: the last libFuzzer status line of each run)" >&2
printf '    %s\n' "${summary[@]}" >&2
if (( failed )); then
    echo "==> crashes found; inputs are in crates/*/fuzz/regressions/ (replayed by cargo test)" >&2
    exit 1
fi
