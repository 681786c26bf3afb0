//! Compiles the socket-identity iterator (bpf/sockmap_identity.bpf.c), the socket-holder
//! iterator (bpf/sockmap_holders.bpf.c) and the event programs (bpf/sockmap_events.bpf.c),
//! generating their libbpf-rs skeletons into OUT_DIR, where src/identity.rs,
//! src/holder/scan.rs and src/events.rs include them.
//!
//! The programs are CO-RE against the few kernel types declared in bpf/vmlinux_min.h, so the
//! build needs clang and the Linux UAPI headers but no /sys/kernel/btf/vmlinux: field offsets
//! are relocated at load time against the running kernel's BTF.

#[path = "bpf/skeleton.rs"]
mod skeleton;

fn main() {
    skeleton::build_all(
        &[
            ("bpf/sockmap_identity.bpf.c", "sockmap_identity"),
            ("bpf/sockmap_holders.bpf.c", "sockmap_holders"),
            ("bpf/sockmap_events.bpf.c", "sockmap_events"),
        ],
        &["-Werror"],
        &["bpf/vmlinux_min.h", "bpf/sock_ends.h", "bpf/skeleton.rs"],
    );
}
