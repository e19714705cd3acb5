//! Builds the ring-3 test guest (guest/, its own workspace) and leaves it in OUT_DIR for
//! `include_bytes!`: the guest is embedded in the ftvm binary as the default guest.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let guest = root.join("guest");
    for path in [
        "guest/src",
        "guest/Cargo.toml",
        "guest/Cargo.lock",
        "guest/linker.ld",
        "guest/build.rs",
        "guest/.cargo/config.toml",
        "guest-abi/src",
        "guest-abi/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = out.join("guest-target");
    // The guest is always built optimised: tests compare its speed with the host's.
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir);
    // Flags and wrappers meant for the outer build must not leak into the guest's.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTDOCFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build the test guest");
    assert!(
        status.success(),
        "building the test guest (guest/) failed: {status}"
    );
    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/ftvm-guest");
    std::fs::copy(&elf, out.join("ftvm-guest.elf")).expect("cannot copy the test guest");
}
