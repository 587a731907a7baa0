//! For the `test-wrong-version` build only: writes a copy of the contract under another
//! version (`asched:scheduler@0.2.0`), which hosts of 0.1 must refuse.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=../wit/scheduler.wit");
    if std::env::var_os("CARGO_FEATURE_TEST_WRONG_VERSION").is_none() {
        return;
    }
    let wit = std::fs::read_to_string("../wit/scheduler.wit").expect("the contract is readable");
    assert!(
        wit.contains("asched:scheduler@0.1.0"),
        "the contract's version moved; update build.rs"
    );
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("wrong-version");
    std::fs::create_dir_all(&out).expect("OUT_DIR is writable");
    let other = wit.replace("asched:scheduler@0.1.0", "asched:scheduler@0.2.0");
    std::fs::write(out.join("scheduler.wit"), other).expect("OUT_DIR is writable");
    println!("cargo:rustc-env=ASCHED_WRONG_VERSION_WIT={}", out.display());
}
