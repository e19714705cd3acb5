#!/usr/bin/env bash
# ftvm's main job on one host: a guest protected by a local replica. Makes a key and
# certificate for each side (in a temporary directory), starts `ftvm replica` on loopback,
# runs the embedded test guest with `--replica`, shows its protection status, and stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
ftvm=target/release/ftvm
work=$(mktemp -d)
trap 'kill "${replica_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
primary_fp=$("$ftvm" cert --out "$work/primary" | tail -1)
replica_fp=$("$ftvm" cert --out "$work/replica" | tail -1)
port=7480
RUST_LOG=info "$ftvm" replica --listen "127.0.0.1:$port" --cert "$work/replica" \
  --peer "$primary_fp" 2> >(sed 's/^/[replica] /' >&2) &
replica_pid=$!
# The guest counts to 40, 100 ms apart, while checkpoints go to the replica every 25 ms.
RUST_LOG=info "$ftvm" run --vcpus 2 --mem 512M --api "$work/api.sock" \
  --replica "127.0.0.1:$port" --cert "$work/primary" --peer "$replica_fp" \
  --cmdline "@0:count=40 @0:interval-ms=100 @1:dirty=20,64 @1:secs=4" &
vm_pid=$!
for _ in $(seq 100); do
  if "$ftvm" status --api "$work/api.sock" 2>/dev/null | grep -q '"state":"protected"'; then
    echo "status: $("$ftvm" status --api "$work/api.sock")"
    break
  fi
  sleep 0.1
done
wait "$vm_pid"
