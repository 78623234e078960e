//! Embeds the probe object that `cargo xtask build` made. Without it (plain
//! `cargo build`, `cargo check`, clippy, unit tests) an empty object is
//! embedded and `tcpstate run` says to build with `cargo xtask build`.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=TCPSTATE_PROBE_OBJ");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("tcpstate-probe.o");
    match env::var_os("TCPSTATE_PROBE_OBJ") {
        Some(obj) => {
            println!("cargo:rerun-if-changed={}", PathBuf::from(&obj).display());
            fs::copy(&obj, &out)
                .unwrap_or_else(|e| panic!("cannot copy the probe object {obj:?}: {e}"));
        }
        None => fs::write(&out, b"").expect("write the empty probe placeholder"),
    }
}
