//! Builds of the plugin with test-only features, for the simulator and the trap tests.
//!
//! Each variant is built once per target folder by cargo (`--features …`, profile `plugin`)
//! into `target/plugin-variants`, apart from the bundled plugin's own build, and copied to
//! `target/plugin-variants/<name>.wasm`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// A build of the plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The plugin as shipped (the one embedded in the host).
    Shipped,
    /// The shipped behaviour, plus a trap whenever an item contains `"asched_test_trap"`.
    Traps,
    /// Broken: reuses a txn id for new content.
    ReuseTxnId,
    /// Broken: acknowledges enqueues whose commit failed.
    AckBeforePersist,
    /// Broken: sends while a transaction is in flight.
    DoubleSend,
    /// Traps on every call after the 25th of an instance.
    TrapAfterN,
    /// Imports the WASI filesystem (a host must refuse it).
    ImportsFs,
    /// Built against `asched:scheduler@0.2.0` (a host of 0.1 must refuse it).
    WrongVersion,
}

impl Variant {
    /// Every variant, by name.
    pub const ALL: [Variant; 5] = [
        Variant::Shipped,
        Variant::Traps,
        Variant::ReuseTxnId,
        Variant::AckBeforePersist,
        Variant::DoubleSend,
    ];

    /// The name used on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Shipped => "shipped",
            Variant::Traps => "test-traps",
            Variant::ReuseTxnId => "fault-reuse-txn-id",
            Variant::AckBeforePersist => "fault-ack-before-persist",
            Variant::DoubleSend => "fault-double-send",
            Variant::TrapAfterN => "test-trap-after-n",
            Variant::ImportsFs => "test-imports-fs",
            Variant::WrongVersion => "test-wrong-version",
        }
    }

    /// The variant with this name.
    pub fn from_name(name: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == name)
    }

    /// The cargo features that make it (the broken ones also trap on demand).
    fn features(self) -> &'static str {
        match self {
            Variant::Shipped => "",
            Variant::Traps => "test-traps",
            Variant::ReuseTxnId => "test-traps,fault-reuse-txn-id",
            Variant::AckBeforePersist => "test-traps,fault-ack-before-persist",
            Variant::DoubleSend => "test-traps,fault-double-send",
            Variant::TrapAfterN => "test-trap-after-n",
            Variant::ImportsFs => "test-imports-fs",
            Variant::WrongVersion => "test-wrong-version",
        }
    }

    /// Whether the build traps on demand.
    pub fn traps_on_demand(self) -> bool {
        matches!(
            self,
            Variant::Traps | Variant::ReuseTxnId | Variant::AckBeforePersist | Variant::DoubleSend
        )
    }

    /// The component file, building it first if needed (the shipped one is written out from
    /// the host's embedded copy).
    pub fn path(self) -> PathBuf {
        if self != Variant::Shipped {
            return build(self);
        }
        let path = target_dir().join("shipped.wasm");
        std::fs::create_dir_all(target_dir()).expect("the target folder is writable");
        std::fs::write(&path, asched_host::engine::EMBEDDED_PLUGIN)
            .expect("the target folder is writable");
        path
    }

    /// The component's bytes, building it first if needed.
    pub fn wasm(self) -> Vec<u8> {
        if self == Variant::Shipped {
            return asched_host::engine::EMBEDDED_PLUGIN.to_vec();
        }
        let path = build(self);
        std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    }
}

/// Where the variants are built.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("plugin-variants")
}

/// Builds one variant (serialised: the variants share a target folder).
fn build(variant: Variant) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace");
    let target_dir = root.join("target").join("plugin-variants");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--locked",
            "--quiet",
            "-p",
            "asched-plugin",
            "--lib",
            "--target",
            "wasm32-wasip2",
        ])
        .args(["--profile", "plugin", "--features", variant.features()])
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("cargo can be run");
    assert!(
        status.success(),
        "building the {} plugin variant failed",
        variant.name()
    );
    let built = target_dir
        .join("wasm32-wasip2")
        .join("plugin")
        .join("asched_plugin.wasm");
    let copy = target_dir.join(format!("{}.wasm", variant.name()));
    std::fs::copy(&built, &copy).unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
    copy
}
