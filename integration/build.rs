//! Compiles the Cilium-like sockops fixture and generates its libbpf-rs skeleton into OUT_DIR.

#[path = "../bpf/skeleton.rs"]
mod skeleton;

fn main() {
    skeleton::build_all(
        &[("../bpf/fixtures/cilium_sockops.bpf.c", "cilium_sockops")],
        &[],
        &["../bpf/skeleton.rs"],
    );
}
