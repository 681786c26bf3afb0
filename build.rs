//! Compiles the socket-identity iterator (bpf/sockmap_identity.bpf.c) and generates its
//! libbpf-rs skeleton into OUT_DIR, where src/identity.rs includes it.
//!
//! The program is CO-RE against the few kernel types declared in bpf/vmlinux_min.h, so the
//! build needs clang and the Linux UAPI headers but no /sys/kernel/btf/vmlinux: field offsets
//! are relocated at load time against the running kernel's BTF.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "bpf/sockmap_identity.bpf.c";
const HEADER: &str = "bpf/vmlinux_min.h";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let src = manifest.join(SRC);
    // <linux/bpf.h> includes <asm/types.h>, which Debian keeps in the multiarch directory;
    // bpf_helpers.h comes vendored with libbpf-sys (libbpf-cargo adds it).
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = match arch.as_str() {
        "x86" => "i386-linux-gnu".to_string(),
        "arm" => "arm-linux-gnueabihf".to_string(),
        "powerpc64" => "powerpc64le-linux-gnu".to_string(),
        other => format!("{other}-linux-gnu"),
    };
    SkeletonBuilder::new()
        .source(&src)
        .obj(out.join("sockmap_identity.bpf.o"))
        .clang_args([
            format!("-I/usr/include/{multiarch}"),
            "-Wall".into(),
            "-Werror".into(),
        ])
        .build_and_generate(out.join("sockmap_identity.skel.rs"))
        .unwrap_or_else(|e| {
            panic!(
                "building {}: {e:#} (scripts/setup.sh installs clang and the headers)",
                src.display()
            )
        });
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", manifest.join(HEADER).display());
}
