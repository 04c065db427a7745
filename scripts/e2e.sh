#!/usr/bin/env bash
# Runs the end-to-end test files (tests/e2e/*.rs) in two lanes at once.
#
#   scripts/e2e.sh [NAME...]        (default: every file)
#
# Without hardware virtualization each lane starts one long-lived `isocell machine` (the nested
# test host made durable: one vCPU under QEMU, so one busy core) and the lane's files run their
# scenarios in it, one after another, each in a fresh mount namespace and checked afterwards for
# anything it left; that saves a nested host boot per file. A file about the host itself
# (console_storm) still boots a fresh nested host;
# machine.rs makes machines of its own; ISOCELL_E2E_MACHINES=0 (or a forced ISOCELL_TESTHOST)
# gives every file a nested host of its own again. Run one after the other the files left half of a 2-core machine idle; two lanes
# use both. Within a file the tests run one at a time (--test-threads=1): a file whose
# tests each boot a host would otherwise put three guests on two cores, and a guest starved that
# long misses its boot timeout. Files go to the lane with less work so far, longest first, by
# the seconds they took (COST below; a new file counts 120 s until it is measured). Each lane's
# output is printed whole when the lane ends; the script fails if any file failed, and names
# them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"

# Seconds per file, measured in the two lanes on 2 cores without hardware virtualization.
declare -A COST=(
    [hostile_guest]=220 [console_storm]=200 [network]=145 [isocell_run]=105 [machine]=100
    [vmm_boot]=90 [containerd]=90 [daemon]=80 [confinement]=75 [snapshot]=70 [images]=60
    [test_machine]=5 [registry_fixture]=5
)

names=("$@")
if (( ${#names[@]} == 0 )); then
    for f in tests/e2e/*.rs; do
        names+=("$(basename "$f" .rs)")
    done
fi
for n in "${names[@]}"; do
    [[ -f "tests/e2e/$n.rs" ]] || { echo "e2e.sh: no tests/e2e/$n.rs" >&2; exit 2; }
done

# Longest first, each to the lane with less work so far.
mapfile -t sorted < <(for n in "${names[@]}"; do echo "${COST[$n]:-120} $n"; done | sort -rn)
lanes=("" "")
load=(0 0)
for entry in "${sorted[@]}"; do
    cost=${entry%% *} name=${entry#* }
    i=0
    (( load[1] < load[0] )) && i=1
    lanes[i]+=" $name"
    load[i]=$(( load[i] + cost ))
done

# The shared test images (a flock-guarded cache) and every test binary, built before the lanes
# start so neither lane builds while the other one measures.
tests/images/build-test-images.sh >/dev/null
cargo test --profile tests --workspace --tests --no-run --quiet

logs=$(mktemp -d)
bin=target/x86_64-unknown-linux-gnu/release
machines=("" "")
cleanup() {
    for m in "$logs"/machine?; do
        [[ -d "$m" ]] || continue
        # --force stops it first.
        "$bin/isocell" machine rm --force --dir "$m" >/dev/null 2>&1 || true
    done
    rm -rf "$logs"
}
trap cleanup EXIT
if [[ "${ISOCELL_E2E_MACHINES:-1}" != 0 && -z "${ISOCELL_TESTHOST:-}" ]] \
    && [[ "$("$bin/isocell-testhost" info)" == nested ]]; then
    start_machine() {
        local m=$1
        "$bin/isocell" machine init --dir "$m" --cpus 1 --memory 3G --disk 256M --isolated \
            >"$m.log" 2>&1 && "$bin/isocell" machine start --dir "$m" >>"$m.log" 2>&1
    }
    for i in 0 1; do
        [[ -n "${lanes[i]}" ]] || continue
        machines[i]="$logs/machine$i"
        start_machine "${machines[i]}" &
    done
    wait
    for i in 0 1; do
        [[ -n "${machines[i]}" ]] || continue
        if "$bin/isocell" machine status --dir "${machines[i]}" 2>/dev/null \
            | grep -q '^state  *running'; then
            echo "e2e.sh: lane $i runs its scenarios in the isocell machine at ${machines[i]}" >&2
        else
            echo "e2e.sh: lane $i: its isocell machine did not start; a nested host per file:" >&2
            cat "${machines[i]}.log" >&2
            machines[i]=""
        fi
    done
fi
lane() {
    local i=$1 failed=""
    for name in ${lanes[i]}; do
        local start=$SECONDS
        if ISOCELL_TESTHOST_MACHINE="${machines[i]}" \
            cargo test --profile tests --workspace --test "$name" -- --test-threads=1 \
            >>"$logs/lane$i.log" 2>&1; then
            echo "e2e.sh: lane $i: $name passed in $((SECONDS - start)) s" >>"$logs/lane$i.log"
        else
            echo "e2e.sh: lane $i: $name FAILED after $((SECONDS - start)) s" >>"$logs/lane$i.log"
            failed+=" $name"
        fi
    done
    echo "$failed" >"$logs/failed$i"
}
echo "e2e.sh: lane 0 (~${load[0]} s):${lanes[0]}" >&2
echo "e2e.sh: lane 1 (~${load[1]} s):${lanes[1]}" >&2
lane 0 &
pid0=$!
lane 1 &
pid1=$!
wait "$pid0" || true
cat "$logs/lane0.log" 2>/dev/null || true
wait "$pid1" || true
cat "$logs/lane1.log" 2>/dev/null || true

failed="$(cat "$logs/failed0" "$logs/failed1" 2>/dev/null | tr '\n' ' ' | xargs)"
if [[ -n "$failed" ]]; then
    echo "e2e.sh: failed: $failed" >&2
    exit 1
fi
echo "e2e.sh: every file passed" >&2
