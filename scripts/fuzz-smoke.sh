#!/usr/bin/env bash
# Fuzzing smoke test, for CI: builds the fuzz targets (fuzz/, its own cargo workspace), replays
# every input kept in fuzz/regressions/<target>/, then fuzzes each target for a short fixed time
# from its committed seeds (fuzz/corpus/<target>/). Exits non-zero if any input crashes, fails
# an invariant or hangs; the crashing inputs are left in fuzz/artifacts/<target>/.
#
# Usage: scripts/fuzz-smoke.sh [TARGET...]      (default: every target `cargo fuzz list` shows)
# Environment: FUZZ_SMOKE_SECONDS  seconds of fuzzing per target (default 15)
#              FUZZ_JOBS_NICE      niceness of the fuzzers (default 10)
# Needs: stable Rust; installs cargo-fuzz (`cargo install cargo-fuzz --locked`) if it is
# missing. No sanitizer (-s none), so no nightly toolchain. About 1.5 minutes plus the build
# (a cold build of the targets takes 3-4 minutes on 2 busy cores, a warm one seconds).
set -Eeuo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SMOKE_SECONDS:-15}
niceness=${FUZZ_JOBS_NICE:-10}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "fuzz-smoke: building ${targets[*]}"
nice -n "$niceness" cargo fuzz build -s none

triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=fuzz/target/$triple/release
failed=()
for t in "${targets[@]}"; do
    bin=$bin_dir/$t
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    regressions=()
    if [ -d "fuzz/regressions/$t" ]; then
        mapfile -t regressions < <(find "fuzz/regressions/$t" -type f | sort)
    fi
    if [ ${#regressions[@]} -gt 0 ]; then
        echo "fuzz-smoke: $t: replaying ${#regressions[@]} regression input(s)"
        if ! nice -n "$niceness" "$bin" -timeout=10 "${regressions[@]}" \
            >"fuzz/artifacts/$t/regressions.log" 2>&1; then
            echo "fuzz-smoke: $t: a regression input fails:"
            grep -E -A1 "panicked at|Running:|left:|right:|ERROR" \
                "fuzz/artifacts/$t/regressions.log" | grep -v -E "^(--|stack backtrace)" |
                head -20 || true
            failed+=("$t (regressions)")
        fi
    fi
    echo "fuzz-smoke: $t: fuzzing for ${seconds}s"
    if ! nice -n "$niceness" "$bin" -max_total_time="$seconds" -timeout=10 \
        -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
        "fuzz/work/$t" "fuzz/corpus/$t" >"fuzz/artifacts/$t/smoke.log" 2>&1; then
        echo "fuzz-smoke: $t: crash (log: fuzz/artifacts/$t/smoke.log):"
        grep -E -A1 "panicked at|left:|right:|ERROR|Test unit written" \
            "fuzz/artifacts/$t/smoke.log" | grep -v -E "^(--|stack backtrace)" |
            head -20 || true
        failed+=("$t")
    else
        grep -E "^stat::(number_of_executed_units|average_exec_per_sec)" \
            "fuzz/artifacts/$t/smoke.log" | tr '\n' ' ' || true
        echo
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz-smoke: FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzz-smoke: all ${#targets[@]} targets passed"
