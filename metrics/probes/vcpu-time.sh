#!/usr/bin/env bash
# Compares ftvm_vcpu_run_seconds_total (the vCPU thread's CPU time, read live) and
# ftvm_vcpu_kvm_run_seconds_total (wall time inside KVM_RUN, added when it returns) with the
# vCPU threads' CPU time as the kernel reports it (/proc/PID/task/TID/schedstat, first field:
# ns on CPU), for one workload. The VM is paused (--api) before the scrape, so that both sides
# are read at rest.
# usage: vcpu-time.sh FTVM CMDLINE SECONDS
set -euo pipefail
FTVM=$1; CMD=$2; SECS=$3; PORT=$((20000 + RANDOM % 10000))
SOCK=$(mktemp -u /tmp/vcpu-time.XXXXXX.sock)
$FTVM run --vcpus 2 --mem 128M --api "$SOCK" --metrics 127.0.0.1:$PORT --cmdline "$CMD" >/dev/null 2>&1 &
PID=$!
sleep "$SECS"
$FTVM pause --api "$SOCK" >/dev/null
M=$(curl -s 127.0.0.1:$PORT/metrics)
declare -A cpu
for t in /proc/$PID/task/*; do
  n=$(cat $t/comm); case $n in vcpu*) cpu[$n]=$(cut -d' ' -f1 $t/schedstat);; esac
done
kill $PID; wait $PID 2>/dev/null || true
for v in 0 1; do
  get() { echo "$M" | awk -v s="$1{vm=\"vm0\",vcpu=\"$v\"}" '$1==s {print $2}'; }
  run=$(get ftvm_vcpu_run_seconds_total); kvm=$(get ftvm_vcpu_kvm_run_seconds_total)
  c=${cpu[vcpu$v]}
  echo "vcpu$v thread_cpu_s=$(echo "scale=6; $c/1000000000" | bc)" \
    "cpu_counter/thread=$(echo "scale=6; $run*1000000000/$c" | bc)" \
    "kvm_run/thread=$(echo "scale=4; $kvm*1000000000/$c" | bc)"
done
