//! Shared by the two build scripts (the product's iterator, the lab's fixtures): compiles a BPF
//! C program with clang and generates its libbpf-rs skeleton into OUT_DIR.

use std::env;
use std::path::{Path, PathBuf};

use libbpf_cargo::SkeletonBuilder;

/// Builds each `(source, name)` of `programs` as [`build`] does, and has cargo rerun the build
/// script when one of `watched` changes (the headers the sources include, this file). Paths are
/// relative to the crate's directory.
pub fn build_all(programs: &[(&str, &str)], extra: &[&str], watched: &[&str]) {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    for (src, name) in programs {
        build(&manifest.join(src), name, extra);
    }
    for path in watched {
        println!("cargo:rerun-if-changed={}", manifest.join(path).display());
    }
}

/// Builds `src` into `OUT_DIR/{name}.bpf.o` and `OUT_DIR/{name}.skel.rs`, with `-Wall` and
/// the `extra` clang flags.
pub fn build(src: &Path, name: &str, extra: &[&str]) {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // <linux/bpf.h> includes <asm/types.h>, which Debian keeps in the multiarch directory;
    // bpf_helpers.h comes vendored with libbpf-sys (libbpf-cargo adds it).
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = match arch.as_str() {
        "x86" => "i386-linux-gnu".to_string(),
        "arm" => "arm-linux-gnueabihf".to_string(),
        "powerpc64" => "powerpc64le-linux-gnu".to_string(),
        other => format!("{other}-linux-gnu"),
    };
    let mut args = vec![format!("-I/usr/include/{multiarch}"), "-Wall".to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    SkeletonBuilder::new()
        .source(src)
        .obj(out.join(format!("{name}.bpf.o")))
        .clang_args(args)
        .build_and_generate(out.join(format!("{name}.skel.rs")))
        .unwrap_or_else(|e| {
            panic!(
                "building {}: {e:#} (scripts/setup.sh installs clang and the headers)",
                src.display()
            )
        });
    println!("cargo:rerun-if-changed={}", src.display());
}
