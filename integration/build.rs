//! Compiles the Cilium-like sockops fixture and generates its libbpf-rs skeleton into OUT_DIR.

use std::env;
use std::path::PathBuf;

#[path = "../bpf/skeleton.rs"]
mod skeleton;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    skeleton::build(
        &manifest.join("../bpf/fixtures/cilium_sockops.bpf.c"),
        "cilium_sockops",
        &[],
    );
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../bpf/skeleton.rs").display()
    );
}
