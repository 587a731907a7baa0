//! Integration tests: the plugin component under wasmtime, a real SQLite file, real HTTP on
//! 127.0.0.1, the `serve` binary, and third-party appservice receivers.

mod bugs;
mod crash;
mod delivery;
mod sandbox;
mod secrets;
mod sidecar;
mod simulation;
mod swap_memory;
mod third_party;

use std::path::PathBuf;

/// The `asched` command line built for these tests.
pub fn asched_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_asched-under-test"))
}
