#!/usr/bin/env bash
# Prepares a fresh machine for building and testing ftvm: Debian packages, the Rust toolchain
# check, KVM check, and every crate the build needs. Safe to run again; it then does nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the build and the tests use (gcc links the binaries and the test guest;
# prometheus brings promtool and the server the metrics test scrapes ftvm with;
# librocksdb-dev is the RocksDB the `history` crate links, found through ROCKSDB_LIB_DIR in
# .cargo/config.toml, and libclang-dev is what bindgen needs to read its C header;
# qemu-system-x86 is the QEMU that `cargo bench --bench migrate` compares the planned
# switch-over with).
packages=(gcc libc6-dev acpica-tools iproute2 iputils-ping prometheus librocksdb-dev libclang-dev
  qemu-system-x86)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: ftvm needs a Rust toolchain (1.88 or newer) on PATH" >&2
  exit 1
fi

if [ ! -e /dev/kvm ]; then
  echo "setup: warning: /dev/kvm does not exist; ftvm cannot run guests and its KVM tests will fail" >&2
fi

cargo fetch --locked
(cd guest && cargo fetch --locked)
(cd fuzz && cargo fetch --locked)
# cargo-fuzz runs the fuzz targets (stable toolchain, no sanitizer: `cargo fuzz run -s none`).
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# The Linux guest (Debian's cloud kernel + a busybox initramfs) for the Linux tests; cached in
# target/linux-guest, so a rerun does nothing.
scripts/linux-guest.sh
echo "setup: ready ($(cargo --version))"
