//! Compiles the Cilium-like sockops fixture and generates its libbpf-rs skeleton into OUT_DIR.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "../bpf/fixtures/cilium_sockops.bpf.c";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let src = manifest.join(SRC);
    // <linux/bpf.h> includes <asm/types.h>, which Debian keeps in the multiarch directory;
    // bpf_helpers.h comes vendored with libbpf-sys (libbpf-cargo adds it), so no libbpf-dev.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = match arch.as_str() {
        "x86" => "i386-linux-gnu".to_string(),
        "arm" => "arm-linux-gnueabihf".to_string(),
        "powerpc64" => "powerpc64le-linux-gnu".to_string(),
        other => format!("{other}-linux-gnu"),
    };
    SkeletonBuilder::new()
        .source(&src)
        .obj(out.join("cilium_sockops.bpf.o"))
        .clang_args([format!("-I/usr/include/{multiarch}"), "-Wall".into()])
        .build_and_generate(out.join("cilium_sockops.skel.rs"))
        .unwrap_or_else(|e| panic!("building {}: {e:#}", src.display()));
    println!("cargo:rerun-if-changed={}", src.display());
}
