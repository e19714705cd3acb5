#!/usr/bin/env bash
# A fuzzing campaign: builds the fuzz targets, then runs each for a number of executions, one
# after another, at low priority, and prints per target the executions, exec/s, edges covered
# (libFuzzer's "cov:"), and crashes. The summary also goes to fuzz/campaign-<UTC date>.txt.
#
# Usage: scripts/fuzz-campaign.sh [--runs N] [--max-time S] [--jobs J] [--keep-going]
#                                 [--no-build] [--summary FILE] [TARGET...]
#   --runs N       executions per target (default 10000000)
#   --max-time S   stop a target after S seconds even if N is not reached (default: no limit)
#   --jobs J       run J libFuzzer processes per target (-jobs=J -workers=J), each doing N/J
#                  executions and sharing new inputs through fuzz/work/<target>/; for many-core
#                  machines. Executions are summed over the jobs, cov is the largest job's.
#   --no-build     use the binaries already in $FUZZ_BIN_DIR (default fuzz/target/<host>/release),
#                  e.g. on a machine without a Rust toolchain (set FTVM_COMMIT for the header)
#   --summary FILE where the summary goes (default fuzz/campaign-<UTC time>.txt)
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
jobs=1
build=1
summary=
targets=()
while [ $# -gt 0 ]; do
    case $1 in
    --runs) runs=$2; shift 2 ;;
    --max-time) max_time=$2; shift 2 ;;
    --keep-going) keep_going=1; shift ;;
    --jobs) jobs=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --summary) summary=$2; shift 2 ;;
    -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
    esac
done

if [ "$build" -eq 1 ]; then
    if ! cargo fuzz --version >/dev/null 2>&1; then
        cargo install cargo-fuzz --locked
    fi
    if [ ${#targets[@]} -eq 0 ]; then
        mapfile -t targets < <(cargo fuzz list)
    fi
    nice -n 10 cargo fuzz build -s none >/dev/null
    triple=$(rustc -vV | sed -n 's/^host: //p')
elif [ ${#targets[@]} -eq 0 ]; then
    echo "--no-build needs the targets named" >&2
    exit 2
fi
if [ "$jobs" -gt 1 ] && [ "$keep_going" -eq 1 ]; then
    echo "--jobs and --keep-going do not mix (fork mode has its own workers)" >&2
    exit 2
fi

bin_dir=$(realpath "${FUZZ_BIN_DIR:-fuzz/target/${triple:-x86_64-unknown-linux-gnu}/release}")
summary=${summary:-fuzz/campaign-$(date -u +%Y-%m-%dT%H%M%SZ).txt}
commit=${FTVM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
{
    echo "# ftvm fuzz campaign, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $commit"
    echo "# runs=$runs max_time=${max_time}s jobs=$jobs keep_going=$keep_going host=$(hostname) cpus=$(nproc)"
    printf '%-16s %12s %9s %8s %8s %8s\n' target executions exec/s cov ft crashes
} | tee "$summary"

status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    log=fuzz/artifacts/$t/campaign.log
    art=$(realpath "fuzz/artifacts/$t")
    args=(-runs=$(( (runs + jobs - 1) / jobs )) -timeout=10 -print_final_stats=1 -artifact_prefix="$art/")
    [ "$max_time" -gt 0 ] && args+=(-max_total_time="$max_time")
    [ "$keep_going" -eq 1 ] && args+=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
    start=$(date +%s)
    rc=0
    touch "fuzz/artifacts/$t/.campaign-start"
    if [ "$jobs" -gt 1 ]; then
        # Each job logs to fuzz-<i>.log in the working directory: run it in the artifacts folder.
        rm -f "$art"/fuzz-*.log
        (cd "$art" && nice -n 10 "$bin_dir/$t" "${args[@]}" -jobs="$jobs" -workers="$jobs" \
            "$OLDPWD/fuzz/work/$t" "$OLDPWD/fuzz/corpus/$t") >"$log" 2>&1 || rc=$?
    else
        nice -n 10 "$bin_dir/$t" "${args[@]}" "fuzz/work/$t" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
    fi
    secs=$(( $(date +%s) - start ))
    if [ "$jobs" -gt 1 ]; then
        execs=0 cov=0 ft=0
        for jl in "$art"/fuzz-*.log; do
            n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$jl" | tail -1)
            execs=$(( execs + ${n:-0} ))
            last=$(grep -E '^#[0-9]+.*cov: ' "$jl" | tail -1 || true)
            c=$(sed -E 's/.* cov: ([0-9]+).*/\1/' <<<"$last")
            f=$(sed -E 's/.* ft: ([0-9]+).*/\1/' <<<"$last")
            [ "${c:-0}" -gt "$cov" ] && cov=$c
            [ "${f:-0}" -gt "$ft" ] && ft=$f
        done
        crashes=$(find "$art" -maxdepth 1 -name 'crash-*' -newer "$art/.campaign-start" | wc -l)
        [ "$crashes" -eq 0 ] && grep -lq 'ERROR: libFuzzer' "$art"/fuzz-*.log && crashes=1
    elif [ "$keep_going" -eq 1 ]; then
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
