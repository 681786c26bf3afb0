//! The Debian package: built, installed, verified with systemd-analyze, run against a lab's
//! map, removed and purged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use sockmap_gc::key::SockKey;

use super::{ok, output, read, repo, CONFFILE};
use crate::support::{assert_clean, evidence, hex, lab, natural_stale, product, run_build_script};

const PACKAGE: &str = "sockmap-gc";
/// Bounds the package build (coreutils `timeout`), so a hung build fails instead of hanging.
const PACKAGE_TIMEOUT_S: &str = "1200";

/// dpkg's status of the package, e.g. `install ok installed`; "" when dpkg does not know it.
fn dpkg_status() -> String {
    let out = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", PACKAGE]));
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    } else {
        String::new()
    }
}

/// Purges the package when the test ends, however it ends: the test installed it, having
/// checked it was not installed before.
struct PurgeOnDrop;

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        let status = dpkg_status();
        if !status.is_empty() && !status.ends_with("not-installed") {
            let out = Command::new("dpkg")
                .args(["-P", PACKAGE])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null())
                .output();
            if let Ok(out) = out {
                if !out.status.success() {
                    evidence(&format!(
                        "dpkg -P {PACKAGE} in cleanup failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
        }
    }
}

fn dpkg(args: &[&str]) -> String {
    ok(Command::new("dpkg")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Builds the package with scripts/package.sh (which installs cargo-deb if missing and
/// builds the release binary incrementally), niced so the other tests keep their timing.
fn build_package() -> PathBuf {
    let (stdout, stderr) = run_build_script("package.sh", PACKAGE_TIMEOUT_S);
    let deb = stdout
        .lines()
        .last()
        .map(|l| repo().join(l.trim()))
        .unwrap_or_else(|| panic!("package.sh printed no path:\n{stderr}"));
    assert!(deb.is_file(), "{} is missing", deb.display());
    deb
}

const INSTALLED_UNIT: &str = "/usr/lib/systemd/system/sockmap-gc.service";
const INSTALLED_BIN: &str = "/usr/bin/sockmap-gc";
const STATE_DIR: &str = "/var/lib/sockmap-gc";

#[test]
fn deb_installs_verifies_audits_removes_and_purges() {
    let status = dpkg_status();
    assert!(
        status.is_empty() || status.ends_with("not-installed"),
        "{PACKAGE} is already known to dpkg ({status}): this test installs and purges it, so \
         it refuses to run over an existing installation; `dpkg -P {PACKAGE}` first if that \
         one can go"
    );
    for path in [INSTALLED_BIN, CONFFILE, INSTALLED_UNIT] {
        assert!(
            !Path::new(path).exists(),
            "{path} exists but no package owns it (an install by hand?): this test would \
             overwrite it; remove it first"
        );
    }
    // A state directory of a hand-installed daemon is someone's trail: leave it alone.
    let state_was_there = Path::new(STATE_DIR).exists();

    let deb = build_package();
    let field = |name: &str| ok(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name));
    let depends = field("Depends");
    for dep in ["libelf1", "zlib1g"] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }
    let conffiles = ok(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), CONFFILE, "conffiles");
    let contents = ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/sockmap-gc",
        "./usr/lib/systemd/system/sockmap-gc.service",
        "./etc/sockmap-gc/config.toml",
        "./usr/share/man/man1/sockmap-gc.1.gz",
        "./usr/share/bash-completion/completions/sockmap-gc",
        "./usr/share/zsh/vendor-completions/_sockmap-gc",
        "./usr/share/fish/vendor_completions.d/sockmap-gc.fish",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{contents}"
        );
    }

    let _purge = PurgeOnDrop;
    dpkg(&["-i", deb.to_str().expect("utf-8 path")]);
    assert_eq!(dpkg_status(), "install ok installed");

    // The installed files are the repository's.
    assert_eq!(
        read(Path::new(CONFFILE)),
        read(&repo().join("config/sockmap-gc.toml"))
    );
    let unit = read(Path::new(INSTALLED_UNIT));
    assert_eq!(unit, read(&repo().join("systemd/sockmap-gc.service")));
    assert!(
        unit.lines()
            .any(|l| l == format!("ExecStart={INSTALLED_BIN} daemon --config {CONFFILE}")),
        "the unit does not run the packaged binary with the packaged config:\n{unit}"
    );

    // No systemd runs here: verify loads the unit in a test manager (and checks ExecStart's
    // binary exists). --man=no: the unit has no Documentation= to look up. No warning is
    // accepted.
    let out = output(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no", "--no-pager"])
            .arg(INSTALLED_UNIT),
    );
    assert_clean(&out, &format!("systemd-analyze verify {INSTALLED_UNIT}"));
    evidence("systemd-analyze verify --man=no on the installed unit: clean");

    let version = ok(Command::new(INSTALLED_BIN).arg("--version"));
    assert_eq!(
        version,
        ok(Command::new(product()).arg("--version")),
        "the packaged binary's version"
    );
    assert!(version.starts_with("sockmap-gc "), "{version}");

    // The page and completions installed are what the installed binary generates.
    let page = ok(Command::new("gzip").args(["-dc", "/usr/share/man/man1/sockmap-gc.1.gz"]));
    assert_eq!(
        page,
        ok(Command::new(INSTALLED_BIN).args(["generate", "man"]))
    );
    let completion = ok(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/sockmap-gc && complete -p sockmap-gc",
    ]));
    assert!(completion.contains("sockmap-gc"), "{completion}");

    // The packaged binary audits a lab's map: one live connection, one natural stale entry.
    let lab = lab("pkg-deb", 1);
    let server = lab.start_server(0, 8080, true).expect("server");
    let stale: SockKey = natural_stale(
        &lab,
        server.addr(),
        SocketAddr::new(lab.node_ip(0).into(), 42100),
    );
    let map = lab.map_path();
    let out = output(Command::new(INSTALLED_BIN).args([
        "audit",
        "--map",
        map.to_str().expect("utf-8"),
        "--output",
        "json",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "audit finds the stale entry (exit 1):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_str(&stdout).expect("audit JSON");
    let entry = json["entries"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["key"] == hex(&stale)))
        .unwrap_or_else(|| panic!("stale key not reported:\n{stdout}"));
    assert_eq!(entry["verdict"], "stale", "{entry}");
    drop(server);
    drop(lab);
    evidence("the packaged sockmap-gc audit found the lab's stale entry");

    // dpkg -r keeps an edited config (and the state directory); dpkg -P removes both.
    let edited = format!(
        "{}# edited by the package test\n",
        read(Path::new(CONFFILE))
    );
    std::fs::write(CONFFILE, &edited).expect("edit the config");
    if !state_was_there {
        std::fs::create_dir_all(STATE_DIR).expect("state dir");
        std::fs::write(Path::new(STATE_DIR).join("trail.jsonl"), "{}\n").expect("trail");
    }
    dpkg(&["-r", PACKAGE]);
    assert_eq!(dpkg_status(), "deinstall ok config-files");
    assert!(!Path::new(INSTALLED_BIN).exists(), "binary left after -r");
    assert!(!Path::new(INSTALLED_UNIT).exists(), "unit left after -r");
    assert_eq!(
        read(Path::new(CONFFILE)),
        edited,
        "dpkg -r must keep the edit"
    );
    assert!(Path::new(STATE_DIR).exists(), "dpkg -r must keep the trail");

    dpkg(&["-P", PACKAGE]);
    let status = dpkg_status();
    assert!(
        status.is_empty() || status.ends_with("not-installed"),
        "after -P: {status}"
    );
    assert!(!Path::new(CONFFILE).exists(), "config left after -P");
    assert!(
        !Path::new("/etc/sockmap-gc").exists(),
        "/etc/sockmap-gc left after -P"
    );
    if !state_was_there {
        assert!(!Path::new(STATE_DIR).exists(), "state left after -P");
    }
    evidence("dpkg -r kept the edited config, dpkg -P removed it");
}
