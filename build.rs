//! Compiles the socket-identity iterator (bpf/sockmap_identity.bpf.c), the socket-holder
//! iterator (bpf/sockmap_holders.bpf.c) and the event programs (bpf/sockmap_events.bpf.c),
//! generating their libbpf-rs skeletons into OUT_DIR, where src/identity.rs,
//! src/holder/scan.rs and src/events.rs include them.
//!
//! The programs are CO-RE against the few kernel types declared in bpf/vmlinux_min.h, so the
//! build needs clang and the Linux UAPI headers but no /sys/kernel/btf/vmlinux: field offsets
//! are relocated at load time against the running kernel's BTF.

use std::env;
use std::path::PathBuf;

#[path = "bpf/skeleton.rs"]
mod skeleton;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    skeleton::build(
        &manifest.join("bpf/sockmap_identity.bpf.c"),
        "sockmap_identity",
        &["-Werror"],
    );
    skeleton::build(
        &manifest.join("bpf/sockmap_holders.bpf.c"),
        "sockmap_holders",
        &["-Werror"],
    );
    skeleton::build(
        &manifest.join("bpf/sockmap_events.bpf.c"),
        "sockmap_events",
        &["-Werror"],
    );
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("bpf/vmlinux_min.h").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("bpf/sock_ends.h").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("bpf/skeleton.rs").display()
    );
}
