//! Builds the scheduler plugin (`plugin/`) for `wasm32-wasip2` so the host can embed it.
//!
//! The plugin is built by a nested cargo in its own target folder (`target/plugin-wasm`) with
//! the workspace's `plugin` profile, whatever profile builds the host, so one build serves both
//! the tests and the demo. Set `ASCHED_PLUGIN_WASM_PREBUILT` to a component file to skip this.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=ASCHED_PLUGIN_WASM_PREBUILT");
    if let Ok(prebuilt) = std::env::var("ASCHED_PLUGIN_WASM_PREBUILT") {
        println!("cargo:rerun-if-changed={prebuilt}");
        println!("cargo:rustc-env=ASCHED_PLUGIN_WASM={prebuilt}");
        return;
    }
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("the host crate lives inside the workspace")
        .to_path_buf();
    for watched in [
        "plugin/src",
        "plugin/Cargo.toml",
        "wit",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let target_dir = root.join("target").join("plugin-wasm");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&root)
        .args([
            "build",
            "--locked",
            "-p",
            "asched-plugin",
            "--lib",
            "--target",
            "wasm32-wasip2",
            "--profile",
            "plugin",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings are for the host, not for the wasm build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .expect("cargo can be run from a build script");
    assert!(
        status.success(),
        "building the plugin for wasm32-wasip2 failed; is the target installed (`rustup target add wasm32-wasip2`)?"
    );
    let wasm = target_dir
        .join("wasm32-wasip2")
        .join("plugin")
        .join("asched_plugin.wasm");
    assert!(
        wasm.exists(),
        "the plugin build did not produce {}",
        wasm.display()
    );
    println!("cargo:rustc-env=ASCHED_PLUGIN_WASM={}", wasm.display());
}
