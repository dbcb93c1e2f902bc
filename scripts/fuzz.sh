#!/usr/bin/env bash
# Coverage-guided fuzzing of tern's fuzz targets (fuzz/src) with cargo-fuzz (libFuzzer).
# usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (default: 60 s, every target, one after
# another). TERN_FUZZ_RUNS=N stops a target after N executions (or SECONDS, first).
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`, ~30 s). No nightly toolchain:
# RUSTC_BOOTSTRAP=1 lets the stable compiler take the -Z flags cargo-fuzz passes.
# Targets are built with debug assertions (overflow checks) and, by default, no sanitizer: the
# targets are safe Rust apart from mmap/userfaultfd calls, and AddressSanitizer costs 4-60x in
# executions here; TERN_FUZZ_SANITIZER=address turns it on (peak RSS then includes its shadow).
# Each target starts from its checked-in corpus (fuzz/corpus/<target>) in a working copy under
# target/fuzz-corpus/<target> (what fuzzing adds stays out of the repo); crashes, hangs (> 10 s)
# and out-of-memory inputs (> 2 GiB RSS) land in fuzz/libfuzzer/artifacts/<target>/. A found
# input belongs in fuzz/corpus/<target>/ once fixed (minimise it first:
# RUSTC_BOOTSTRAP=1 cargo fuzz tmin --fuzz-dir fuzz/libfuzzer -O -a -s none <target> <input>).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(stream incoming postcopy snapshot balloon decoder api)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 2
fi
export RUSTC_BOOTSTRAP=1
flags=(--fuzz-dir fuzz/libfuzzer -O -a -s "${TERN_FUZZ_SANITIZER:-none}")
cargo fuzz build "${flags[@]}"
runs=()
[ -z "${TERN_FUZZ_RUNS:-}" ] || runs=(-runs="$TERN_FUZZ_RUNS")

mkdir -p target/fuzz-logs
failed=0
printf '%-10s %12s %10s %8s %s\n' target executions exec/s rss_mb result
for t in "${targets[@]}"; do
    work=target/fuzz-corpus/$t
    artifacts=fuzz/libfuzzer/artifacts/$t
    mkdir -p "$work" "$artifacts"
    cp -n fuzz/corpus/"$t"/* "$work"/
    log=target/fuzz-logs/$t.log
    result=ok
    cargo fuzz run "${flags[@]}" "$t" "$work" -- -max_total_time="$secs" "${runs[@]}" \
        -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$artifacts"/ -print_final_stats=1 \
        >"$log" 2>&1 || result=FAILED
    [ "$result" = ok ] || failed=1
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
    printf '%-10s %12s %10s %8s %s\n' "$t" "${execs:-?}" "${speed:-?}" "${rss:-?}" "$result"
    [ "$result" = ok ] || tail -40 "$log" >&2
done
exit $failed
