#!/usr/bin/env bash
# The whole test suite: formatting and lints (workspace and test guest), every test, then a
# short run of every fuzz target.
# Tests that need KVM fail with a clear message where /dev/kvm is unusable; none is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
(cd guest && cargo fmt -- --check)
cargo clippy --locked --all-targets -- -D warnings
(cd guest && cargo clippy --locked --release -- -D warnings)
cargo test --locked --workspace
# Every fuzz target: its kept crash inputs replayed, then a short run from its seeds.
FUZZ_SMOKE_SECONDS=${FUZZ_SMOKE_SECONDS:-15} scripts/fuzz-smoke.sh
