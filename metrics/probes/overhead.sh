#!/usr/bin/env bash
# Guest throughput with the exporter off vs on (scraped every 100 ms, 10x Prometheus's usual
# 1 s), in alternating pairs: prints each pair's on/off time ratio, then median and max.
# usage: overhead.sh FTVM PAIRS
# Workloads: compute=300000000 (CPU-bound, ~1 s) and disk-write=16 chunk-kib=64 (I/O-bound);
# the guest measures its own time (ns=).
set -euo pipefail
FTVM=$1; PAIRS=$2
IMG=$(mktemp); truncate -s 32M "$IMG"; trap 'rm -f "$IMG"' EXIT
guest_ns() { # CMDLINE [--metrics ADDR]
  local cmd=$1; shift
  "$FTVM" run --vcpus 1 --mem 64M --disk "$IMG" --cmdline "$cmd" "$@" | grep -o ' ns=[0-9]*' | head -1 | cut -d= -f2
}
for work in "compute=300000000" "disk-write=16 chunk-kib=64"; do
  ratios=()
  for i in $(seq 1 "$PAIRS"); do
    off=$(guest_ns "$work")
    port=$((30000 + RANDOM % 10000))
    ( while sleep 0.1; do curl -s -o /dev/null "127.0.0.1:$port/metrics" || true; done ) &
    scraper=$!
    on=$(guest_ns "$work" --metrics "127.0.0.1:$port")
    kill "$scraper"; wait "$scraper" 2>/dev/null || true
    ratios+=("$(echo "scale=6; $on/$off" | bc)")
  done
  sorted=$(printf '%s\n' "${ratios[@]}" | sort -n)
  n=${#ratios[@]}
  echo "$work: on/off ratios: $(echo $sorted)"
  echo "$work: median $(echo "$sorted" | sed -n "$(( (n + 1) / 2 ))p") max $(echo "$sorted" | tail -1)"
done
