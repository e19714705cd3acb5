#!/usr/bin/env bash
# Compares ftvm_vcpu_run_seconds_total (wall time inside KVM_RUN) with the vCPU threads' CPU
# time (/proc/PID/task/TID/schedstat, first field: ns on CPU) for one workload.
# usage: vcpu-time.sh FTVM CMDLINE SECONDS
set -euo pipefail
FTVM=$1; CMD=$2; SECS=$3; PORT=$((20000 + RANDOM % 10000))
$FTVM run --vcpus 2 --mem 128M --metrics 127.0.0.1:$PORT --cmdline "$CMD" >/dev/null 2>&1 &
PID=$!
sleep "$SECS"
M=$(curl -s 127.0.0.1:$PORT/metrics)
declare -A cpu
for t in /proc/$PID/task/*; do
  n=$(cat $t/comm); case $n in vcpu*) cpu[$n]=$(cut -d' ' -f1 $t/schedstat);; esac
done
kill $PID; wait $PID 2>/dev/null || true
for v in 0 1; do
  run=$(echo "$M" | awk -v s="ftvm_vcpu_run_seconds_total{vm=\"vm0\",vcpu=\"$v\"}" '$1==s {print $2}')
  c=${cpu[vcpu$v]}
  echo "vcpu$v kvm_run_s=$run thread_cpu_s=$(echo "scale=6; $c/1000000000" | bc) ratio=$(echo "scale=4; $run*1000000000/$c" | bc)"
done
