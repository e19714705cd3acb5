#!/usr/bin/env bash
# A fuzzing campaign: builds the fuzz targets, then runs each for a number of executions, one
# after another, at low priority, and prints per target the executions, exec/s, edges covered
# (libFuzzer's "cov:"), and crashes. The summary also goes to fuzz/campaign-<UTC date>.txt.
#
# Usage: scripts/fuzz-campaign.sh [--runs N] [--max-time S] [--keep-going] [TARGET...]
#   --runs N       executions per target (default 10000000)
#   --max-time S   stop a target after S seconds even if N is not reached (default: no limit)
#   --keep-going   fuzz on after a crash (libFuzzer's fork mode with -ignore_crashes=1), e.g.
#                  while a known bug is unfixed; crashes are counted and kept in
#                  fuzz/artifacts/<target>/. Without it a target stops at its first crash.
#   TARGET...      default: every target `cargo fuzz list` shows
# Inputs that find new coverage go to fuzz/work/<target>/ (git-ignored); the committed seeds in
# fuzz/corpus/<target>/ are only read. Logs: fuzz/artifacts/<target>/campaign.log.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

runs=10000000
max_time=0
keep_going=0
targets=()
while [ $# -gt 0 ]; do
    case $1 in
    --runs) runs=$2; shift 2 ;;
    --max-time) max_time=$2; shift 2 ;;
    --keep-going) keep_going=1; shift ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
    esac
done

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
nice -n 10 cargo fuzz build -s none >/dev/null

triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=fuzz/target/$triple/release
summary=fuzz/campaign-$(date -u +%Y-%m-%dT%H%M%SZ).txt
{
    echo "# ftvm fuzz campaign, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD)"
    echo "# runs=$runs max_time=${max_time}s keep_going=$keep_going host=$(hostname) cpus=$(nproc)"
    printf '%-16s %12s %9s %8s %8s %8s\n' target executions exec/s cov ft crashes
} | tee "$summary"

status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    log=fuzz/artifacts/$t/campaign.log
    args=(-runs="$runs" -timeout=10 -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/")
    [ "$max_time" -gt 0 ] && args+=(-max_total_time="$max_time")
    [ "$keep_going" -eq 1 ] && args+=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
    start=$(date +%s)
    rc=0
    touch "fuzz/artifacts/$t/.campaign-start"
    nice -n 10 "$bin_dir/$t" "${args[@]}" "fuzz/work/$t" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
    secs=$(( $(date +%s) - start ))
    if [ "$keep_going" -eq 1 ]; then
        # Fork mode: "#N: cov: C ft: F corp: K exec/s: E oom/timeout/crash: a/b/c time: Ts ..."
        last=$(grep -E '^#[0-9]+: cov:' "$log" | tail -1 || true)
        execs=$(sed -E 's/^#([0-9]+):.*/\1/' <<<"$last")
        cov=$(sed -E 's/.* cov: ([0-9]+).*/\1/' <<<"$last")
        ft=$(sed -E 's/.* ft: ([0-9]+).*/\1/' <<<"$last")
        crashes=$(sed -E 's#.*oom/timeout/crash: ([0-9]+)/([0-9]+)/([0-9]+).*#\1+\2+\3#' <<<"$last")
        crashes=$(( ${crashes:-0} ))
    else
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)
        cov=$(sed -E 's/.* cov: ([0-9]+).*/\1/' <<<"$last")
        ft=$(sed -E 's/.* ft: ([0-9]+).*/\1/' <<<"$last")
        crashes=$(( rc != 0 ))
    fi
    execs=${execs:-0}
    rate=$(( execs / (secs > 0 ? secs : 1) ))
    printf '%-16s %12s %9s %8s %8s %8s\n' "$t" "$execs" "$rate" "${cov:-?}" "${ft:-?}" "$crashes" |
        tee -a "$summary"
    if [ "$crashes" != 0 ]; then
        status=1
        # Where each new crash input panics (replayed: fork mode keeps no child logs).
        find "fuzz/artifacts/$t" -name 'crash-*' -newer "fuzz/artifacts/$t/.campaign-start" |
            while read -r input; do
                "$bin_dir/$t" "$input" 2>&1 | grep -m1 -A1 'panicked at' | tr '\n' ' ' |
                    sed -E 's/thread [^)]*\) //; s/ +$//'
                echo
            done | sort | uniq -c | sed 's/^/    /' | head -10 | tee -a "$summary" || true
    fi
done
echo "# summary written to $summary"
exit $status
