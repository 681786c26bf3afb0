//! Shared by the product's end-to-end tests: building labs, running the `sockmap-gc` binary,
//! the repository's scripts and checkers, and the lab recipes the tests repeat (a server with
//! held connections, planted and natural stale entries).

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use sockmap_gc::key::SockKey;
use sockmap_gc_lab::sys::keeps_reset_sockets;
use sockmap_gc_lab::{ClientOpts, Held, Lab, LabConfig, Server};

pub const PEER: &str = env!("CARGO_BIN_EXE_sockmap-gc-lab");
pub const HANG: Duration = Duration::from_millis(1500);

/// Builds a lab or fails loudly: these tests need root and BPF; they never skip.
pub fn lab_with(config: LabConfig) -> Lab {
    let id = config.id.clone();
    Lab::with_config(config).unwrap_or_else(|e| {
        panic!(
            "cannot build lab {id:?} on this machine (these tests need root, cgroup v2 and \
             BPF sock_ops/sk_msg support; they do not skip): {e:#}"
        )
    })
}

pub fn lab(id: &str, pods: usize) -> Lab {
    lab_with(LabConfig::new(id, pods, PEER))
}

/// The repository's root, above `integration/`.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cmd` with no stdin to its end; fails if it cannot start.
pub fn output(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

/// All a finished command said: its stdout, then its stderr.
pub fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A checker (promtool, systemd-analyze) that passed and said nothing; `what` names the check
/// in the failure, before what it said.
pub fn assert_clean(out: &Output, what: &str) {
    let said = said(out);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{what} ({}):\n{said}",
        out.status
    );
}

/// Runs `scripts/NAME` (bounded by coreutils `timeout`, niced so the other tests keep their
/// timing), which must succeed; its `NAME:` lines and how long it took go to the log. Returns
/// its stdout and stderr.
pub fn run_build_script(name: &str, timeout_s: &str) -> (String, String) {
    let started = Instant::now();
    let out = output(
        Command::new("timeout")
            .args([timeout_s, "nice", "-n", "10", "bash"])
            .arg(repo().join("scripts").join(name))
            .current_dir(repo()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "scripts/{name} failed ({}):\n{stderr}",
        out.status
    );
    let prefix = format!("{name}:");
    for line in stderr.lines().filter(|l| l.starts_with(&prefix)) {
        evidence(line);
    }
    evidence(&format!(
        "scripts/{name} took {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

/// The product binary, built beside the lab's by `cargo build --workspace`.
pub fn product() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/it-HASH -> target/<profile>/sockmap-gc
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("sockmap-gc"))
        .expect("target directory");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace; scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// One run of the product.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "output is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

pub fn run(args: &[&str]) -> Run {
    run_command(Command::new(product()).args(args))
}

/// `sockmap-gc COMMAND --map MAP EXTRA...`, COMMAND being `audit` or `sweep`.
pub fn run_on(command: &str, map: impl AsRef<Path>, extra: &[&str]) -> Run {
    run(&map_args(command, map.as_ref(), &[extra]))
}

/// [`run_on`] without `caps`, as [`run_without`] runs.
pub fn run_on_without(caps: &str, command: &str, map: impl AsRef<Path>, extra: &[&str]) -> Run {
    run_without(caps, &map_args(command, map.as_ref(), &[extra]))
}

/// `sockmap-gc COMMAND --map MAP --output json EXTRA...`.
pub fn run_json(command: &str, map: impl AsRef<Path>, extra: &[&str]) -> Run {
    run(&map_args(command, map.as_ref(), &[JSON, extra]))
}

/// [`run_json`] without `caps`, as [`run_without`] runs.
pub fn run_json_without(caps: &str, command: &str, map: impl AsRef<Path>, extra: &[&str]) -> Run {
    run_without(caps, &map_args(command, map.as_ref(), &[JSON, extra]))
}

const JSON: &[&str] = &["--output", "json"];

fn map_args<'a>(command: &'a str, map: &'a Path, extra: &[&[&'a str]]) -> Vec<&'a str> {
    let map = map.to_str().expect("the map's path is UTF-8");
    let mut args = vec![command, "--map", map];
    args.extend(extra.iter().copied().flatten());
    args
}

/// Runs the product without `caps` (setpriv syntax, e.g. "-sys_admin" or "-perfmon,-sys_admin"),
/// as a daemon started with too few capabilities would run.
pub fn run_without(caps: &str, args: &[&str]) -> Run {
    run_command(
        Command::new("setpriv")
            .args(["--bounding-set", caps, "--inh-caps", caps, "--"])
            .arg(product())
            .args(args),
    )
}

/// The entry reported for `key` in a JSON report.
pub fn entry_of(json: &Value, key: &SockKey) -> Value {
    json["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["key"] == hex(key))
        .cloned()
        .unwrap_or_else(|| panic!("{key} not reported: {json}"))
}

pub fn run_command(cmd: &mut Command) -> Run {
    let out = cmd.output().expect("sockmap-gc runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Verdict by key hex, from `audit --output json` or a sweep's `planned` list.
pub fn verdicts(entries: &Value) -> Vec<(String, String, String)> {
    entries
        .as_array()
        .expect("entries array")
        .iter()
        .map(|e| {
            (
                e["key"].as_str().expect("key").to_string(),
                e["verdict"].as_str().expect("verdict").to_string(),
                e["reason_code"].as_str().expect("reason_code").to_string(),
            )
        })
        .collect()
}

pub fn hex(key: &SockKey) -> String {
    key.encode().to_hex()
}

/// Writes to the real stderr, past libtest's capture: evidence in CI logs.
pub fn evidence(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The keys both ends of every held connection are filed under, once sock_ops filed them.
pub fn live_keys(lab: &Lab, held: &[&Held]) -> HashSet<SockKey> {
    let mut keys = HashSet::new();
    for h in held {
        for k in h.client_keys() {
            keys.insert(k);
            keys.insert(k.peer());
        }
    }
    wait_keys(lab, &keys, "live key");
    keys
}

/// Waits (2 s each; the server's insert comes with the handshake's last ACK) until every one
/// of `keys` is in the map; fails naming the first missing one as `what`.
pub fn wait_keys<'a>(lab: &Lab, keys: impl IntoIterator<Item = &'a SockKey>, what: &str) {
    for k in keys {
        assert!(
            lab.wait_key(k, true, Duration::from_secs(2)),
            "{what} {k} never appeared"
        );
    }
}

/// A one-pod lab `id` with a server on pod 0, port 8080, and a stale entry planted as the
/// incident leaves them: the server end's key of a future connection from node:`port`.
pub fn lab_with_stale(id: &str, port: u16) -> (Lab, Server, SockKey) {
    let lab = lab(id, 1);
    let server = lab.start_server(0, 8080, false).expect("server");
    let stale = plant_stale(&lab, server.addr(), [port])[0];
    (lab, server, stale)
}

/// Stale entries as the incident leaves them, planted: the server end's keys of future
/// connections to `server` from node 0's `ports`.
pub fn plant_stale(
    lab: &Lab,
    server: SocketAddr,
    ports: impl IntoIterator<Item = u16>,
) -> Vec<SockKey> {
    ports
        .into_iter()
        .map(|port| {
            let node = SocketAddr::new(lab.node_ip(0).into(), port);
            let key = SockKey::for_socket(server, node).expect("one family");
            lab.plant(key).expect("plant");
            key
        })
        .collect()
}

/// A server on pod 0, port 8080 (`busy`: it keeps the fd of a connection its client resets,
/// as in the incident), the connections `clients` describes held open to it, and their keys.
pub fn serve_and_hold(
    lab: &Lab,
    busy: bool,
    clients: impl FnOnce(ClientOpts) -> ClientOpts,
) -> (Server, Held, HashSet<SockKey>) {
    let server = lab.start_server(0, 8080, busy).expect("server");
    let held = lab
        .hold(&clients(ClientOpts::to(server.addr())))
        .expect("hold");
    let live = live_keys(lab, &[&held]);
    (server, held, live)
}

/// Says a fact of the running kernel that differs between kernels, once per test run, as a
/// "kernel fact:" line (scripts/kernel-check.sh gathers them into its summary).
pub fn kernel_fact(fact: &str) {
    static SAID: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    if SAID
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(fact.to_string())
    {
        evidence(&format!("kernel fact: {fact}"));
    }
}

/// The natural incident: a client resets its connection while the pod's server keeps the
/// fd; the server end's entry stays. Returns that stale key. On a kernel where the entry
/// leaves with the reset (before 5.16), says so and plants a stale entry under the same key
/// instead, so that the caller still has one to find.
pub fn natural_stale(lab: &Lab, server: SocketAddr, node: SocketAddr) -> SockKey {
    natural_stale_entry(lab, server, node).unwrap_or_else(|| {
        let key = SockKey::for_socket(server, node).expect("one family");
        lab.plant(key).expect("plant in place of the natural entry");
        key
    })
}

/// As [`natural_stale`], while a deleting daemon runs: with kernel events it deletes the entry
/// within milliseconds of the reset, so the entry is made (Linux 5.16+) but not required to
/// stay. Before 5.16 a stale entry is planted in its place, as by [`natural_stale`].
pub fn natural_stale_under_daemon(lab: &Lab, server: SocketAddr, node: SocketAddr) -> SockKey {
    if !keeps_reset_sockets().expect("kernel release") {
        return natural_stale(lab, server, node);
    }
    reset_request(lab, server, node)
}

/// One request from `node` to `server` that the client resets once answered; returns the key
/// of the server end, once the client end's key has left with the client's fd.
fn reset_request(lab: &Lab, server: SocketAddr, node: SocketAddr) -> SockKey {
    let outcome = lab
        .request(
            &ClientOpts::to(server)
                .from_port(node.port())
                .timeout(HANG)
                .reset(true),
        )
        .expect("client runs");
    assert!(outcome.is_replied(), "first request works: {outcome}");
    let stale = SockKey::for_socket(server, node).expect("one family");
    assert!(
        lab.wait_key(&stale.peer(), false, Duration::from_secs(2)),
        "client end's key leaves with the client's fd"
    );
    stale
}

/// As [`natural_stale`], but `None` (a kernel fact said) where the kernel removes the reset
/// socket's entry: the tests of the natural case itself check that instead.
pub fn natural_stale_entry(lab: &Lab, server: SocketAddr, node: SocketAddr) -> Option<SockKey> {
    let stale = reset_request(lab, server, node);
    if lab.wait_key(&stale, true, Duration::from_secs(2)) {
        kernel_fact("a reset socket whose application keeps the fd stays in the map: the natural stale entry occurs");
        return Some(stale);
    }
    assert!(
        !keeps_reset_sockets().expect("kernel release"),
        "server end's key should stay while the server keeps the fd (Linux 5.16+ keeps it)"
    );
    kernel_fact("a reset socket leaves the map on unhash (before 5.16): the natural stale entry does not occur; tests plant one in its place");
    None
}
