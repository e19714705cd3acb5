#!/usr/bin/env bash
# The whole test suite: formatting and lints (workspace and test guest), then every test.
# Tests that need KVM fail with a clear message where /dev/kvm is unusable; none is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
(cd guest && cargo fmt -- --check)
cargo clippy --locked --all-targets -- -D warnings
(cd guest && cargo clippy --locked --release -- -D warnings)
cargo test --locked --workspace
