//! Builds the built-in test guest (a no_std, panic=abort ELF for the host target) in a nested cargo
//! invocation with its own target directory, and hands its path to `include_bytes!` via
//! `TERN_GUEST_ELF`. Setting `TERN_GUEST_ELF` in the environment skips the nested build.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TERN_GUEST_ELF");
    if let Ok(path) = env::var("TERN_GUEST_ELF") {
        println!("cargo:rustc-env=TERN_GUEST_ELF={path}");
        return;
    }
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest_dir = manifest.join("../guest-tests/guest");
    for item in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "linker.ld",
        ".cargo",
    ] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(item).display());
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out.join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&guest_dir)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir)
        // The outer build's wrappers and flags (clippy, coverage) are not meant for the guest.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .expect("failed to run cargo for the built-in guest");
    assert!(
        status.success(),
        "building the built-in guest (guest-tests/guest) failed"
    );
    let elf = target_dir.join("release/tern-guest");
    println!("cargo:rustc-env=TERN_GUEST_ELF={}", elf.display());
}
