//! Who keeps a stale entry's socket, on the real kernel: a leaky server in a pod whose cgroup
//! sits at a kubelet-like path, and a listener that never accepts.

use std::collections::HashSet;
use std::fs;
use std::net::SocketAddr;
use std::time::Duration;

use std::process::Command;

use serde_json::Value;
use sockmap_gc::holder::{HolderSource, ScanMethod};
use sockmap_gc::key::SockKey;
use sockmap_gc_lab::{ClientOpts, Lab, ServerOpts};

use crate::daemon::unit_capabilities;
use crate::support::{
    entry_of, evidence, lab, natural_stale, product, run, run_command, run_on, Run,
};

/// A pod UID as Kubernetes writes it, and a containerd container id.
pub const POD_UID: &str = "7c1e3f4a-1b2c-4d5e-8f90-a1b2c3d4e5f6";
pub const CONTAINER_ID: &str = "c0ffee0123456789abcdef0123456789abcdef0123456789abcdef0123456789";

/// The socket inodes a process holds, from its `/proc/PID/fd` links.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the test reads its peer's fds")
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|t| {
            t.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// A leaky server in the pod's container cgroup with `count` naturally stale entries.
pub fn leaky_pod(lab: &Lab, count: u16) -> (sockmap_gc_lab::Server, Vec<SockKey>) {
    let cgroup = lab
        .kube_cgroup(POD_UID, CONTAINER_ID)
        .expect("kubelet-like cgroup");
    let server = lab
        .start_server_with(
            0,
            8080,
            &ServerOpts {
                keep_reset_fds: true,
                cgroup: Some(cgroup),
                ..ServerOpts::default()
            },
        )
        .expect("leaky server");
    let stale = (0..count)
        .map(|i| {
            natural_stale(
                lab,
                server.addr(),
                SocketAddr::new(lab.node_ip(0).into(), 42100 + i),
            )
        })
        .collect();
    (server, stale)
}

#[test]
fn the_holder_iterator_and_the_procfs_scan_name_the_leaky_server_and_its_pod() {
    let lab = lab("holders-scan", 1);
    let (server, _stale) = leaky_pod(&lab, 2);
    let inodes = socket_inodes(server.pid());
    assert!(
        inodes.len() >= 3,
        "listener and two kept sockets: {inodes:?}"
    );

    let by_iterator = HolderSource::new("/proc").scan(&inodes);
    assert_eq!(
        by_iterator.info.method,
        ScanMethod::Iterator,
        "this kernel runs iter/task_file (KERNEL-FACTS): {:?}",
        by_iterator.info.notes
    );
    assert!(by_iterator.info.complete);
    let by_procfs = HolderSource::procfs_only("/proc").scan(&inodes);
    assert!(
        by_procfs.info.complete,
        "root reads every fd: {:?}",
        by_procfs.info.notes
    );
    for inode in &inodes {
        let holders = &by_iterator.holders[inode];
        assert_eq!(holders.len(), 1, "one holder of {inode}: {holders:?}");
        let h = &holders[0];
        assert_eq!(h.pid, server.pid());
        assert_eq!(h.comm, "sockmap-gc-lab");
        let pod = h.pod.as_ref().expect("the server's cgroup names a pod");
        assert_eq!(pod.pod_uid, POD_UID, "dashes restored");
        let ctr = pod.container.as_ref().expect("and a container");
        assert_eq!(ctr.id, CONTAINER_ID);
        assert_eq!(
            by_procfs.holders[inode], *holders,
            "the iterator and the procfs scan agree on {inode}"
        );
    }
    evidence(&format!(
        "holders on the real kernel: {} socket inodes of pid {} found by the iterator in {:?} and by /proc in {:?}: {}",
        inodes.len(),
        server.pid(),
        by_iterator.info.took,
        by_procfs.info.took,
        by_iterator.holders.values().next().map(|h| h[0].to_string()).unwrap_or_default()
    ));
}

#[test]
fn a_listener_that_never_accepts_keeps_reset_connections_in_the_map_until_it_closes() {
    let lab = lab("holders-accept", 1);
    let server = lab
        .start_server_with(
            0,
            8080,
            &ServerOpts {
                never_accept: true,
                ..ServerOpts::default()
            },
        )
        .expect("listener");
    let mut stuck = Vec::new();
    for port in [42201u16, 42202, 42203] {
        // The handshake completes into the backlog; the ping goes unanswered; the client
        // resets on its timeout.
        let outcome = lab
            .request(
                &ClientOpts::to(server.addr())
                    .from_port(port)
                    .timeout(Duration::from_millis(300)),
            )
            .expect("client runs");
        assert!(!outcome.is_replied(), "nobody answers: {outcome}");
        let key = SockKey::for_socket(server.addr(), SocketAddr::new(lab.node_ip(0).into(), port))
            .expect("v4");
        stuck.push(key);
    }
    for key in &stuck {
        assert!(
            lab.wait_key(key, true, Duration::from_secs(2)),
            "the queued connection's server end stays filed after the reset: {key}"
        );
        assert!(
            lab.wait_key(&key.peer(), false, Duration::from_secs(2)),
            "the client end leaves with the client's fd: {key}"
        );
    }
    let (json, _) = audit_json(&lab, None);
    for key in &stuck {
        let e = entry_of(&json, key);
        assert_eq!(e["verdict"], "stale", "{e}");
        assert_eq!(e["holder"]["class"], "accept-queue", "{e}");
        let socket = &e["socket"];
        assert_eq!(socket["state"], "CLOSE", "{e}");
        assert_eq!(socket["inode"], 0, "no file refers to a queued socket: {e}");
        assert_eq!(socket["orphaned"], false, "{e}");
        assert_eq!(socket["error"], "ECONNRESET", "no read took the reset: {e}");
    }
    assert_eq!(
        json["stale_by_holder"]["by_class"]["accept-queue"],
        stuck.len()
    );
    server.stop().expect("listener stops");
    for key in &stuck {
        assert!(
            lab.wait_key(key, false, Duration::from_secs(2)),
            "closing the listener frees its queued sockets and their entries: {key}"
        );
    }
}

/// `sockmap-gc audit` of the lab's map, as JSON, run by `cmd` (the product, or setpriv).
fn audit_json(lab: &Lab, wrap: Option<&mut Command>) -> (Value, Run) {
    let map = lab.map_path().display().to_string();
    let args = [
        "audit",
        "--map",
        &map,
        "--identity",
        "on",
        "--output",
        "json",
    ];
    let out = match wrap {
        Some(cmd) => run_command(cmd.arg(product()).args(args)),
        None => run(&args),
    };
    assert_eq!(out.code, 1, "stale entries found: {}", out.stderr);
    (out.json(), out)
}

/// Each of `stale` is `app-keeps-fd`, held by `pid` in the test's pod and container.
fn assert_named(json: &Value, stale: &[SockKey], pid: u32) {
    for key in stale {
        let e = entry_of(json, key);
        assert_eq!(e["verdict"], "stale", "{e}");
        let holder = &e["holder"];
        assert_eq!(holder["class"], "app-keeps-fd", "{e}");
        let holders = holder["holders"].as_array().expect("holders");
        assert_eq!(holders.len(), 1, "{holder}");
        let h = &holders[0];
        assert_eq!(h["pid"], pid, "{h}");
        assert_eq!(h["comm"], "sockmap-gc-lab");
        assert_eq!(
            h["pod"]["pod_uid"], POD_UID,
            "dashes as Kubernetes writes it: {h}"
        );
        assert_eq!(h["pod"]["qos"], "burstable");
        assert_eq!(h["pod"]["container"]["id"], CONTAINER_ID);
        assert_eq!(h["pod"]["container"]["runtime"], "containerd");
        assert_eq!(
            e["socket"]["inode"],
            h_inode(h, pid),
            "the entry's socket is the fd the holder keeps"
        );
    }
    let by = &json["stale_by_holder"];
    assert_eq!(by["by_class"]["app-keeps-fd"], stale.len(), "{by}");
    assert_eq!(by["top_pods"][0]["pod_uid"], POD_UID, "{by}");
    assert_eq!(by["top_pods"][0]["entries"], stale.len(), "{by}");
    assert_eq!(by["top_processes"][0]["pid"], pid, "{by}");
    assert_eq!(by["top_processes"][0]["container_id"], CONTAINER_ID, "{by}");
}

/// The inode of the socket behind the holder's fd, as `/proc/PID/fd` shows it.
fn h_inode(h: &Value, pid: u32) -> u64 {
    let fd = h["fd"].as_u64().expect("fd");
    let link = fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("the holder's fd");
    link.to_str()
        .and_then(|t| t.strip_prefix("socket:["))
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("fd {fd} of {pid} is no socket: {}", link.display()))
}

#[test]
fn audit_names_the_leaky_servers_pid_comm_pod_and_container_for_each_stale_entry() {
    let lab = lab("holders-audit", 1);
    let (server, stale) = leaky_pod(&lab, 3);
    let (json, _) = audit_json(&lab, None);
    assert_named(&json, &stale, server.pid());
    assert_eq!(json["stale_by_holder"]["search"]["method"], "iterator");

    let map = lab.map_path().display().to_string();
    let table = run_on("audit", &map, &["--identity", "on"]);
    assert_eq!(table.code, 1, "{}", table.stderr);
    let column = format!(
        "pid {} sockmap-gc-lab, pod 7c1e3f4a… ctr c0ffee012345…",
        server.pid()
    );
    let rows: Vec<&str> = table
        .stdout
        .lines()
        .filter(|l| l.starts_with("stale    "))
        .collect();
    assert_eq!(rows.len(), stale.len(), "{}", table.stdout);
    for row in &rows {
        assert!(row.contains(&column), "no holder column in {row:?}");
    }
    let summary = table
        .stdout
        .split("stale by holder:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no 'stale by holder' in\n{}", table.stdout));
    let process = format!(
        "pid {} sockmap-gc-lab (pod {POD_UID}, container {CONTAINER_ID})",
        server.pid()
    );
    let counted = |what: &str| {
        summary
            .lines()
            .any(|l| l.contains(what) && l.trim_end().ends_with(&format!(" {}", stale.len())))
    };
    assert!(counted("app-keeps-fd"), "{summary}");
    assert!(counted(&process), "{summary}");
    assert!(counted(&format!("pod {POD_UID}")), "{summary}");
    evidence(&format!(
        "holders in the audit: {} stale entries named as {column}",
        rows.len()
    ));
}

#[test]
fn run_as_the_unit_runs_the_audit_still_names_the_holders() {
    let lab = lab("holders-caps", 1);
    let (server, stale) = leaky_pod(&lab, 2);
    let caps = unit_capabilities();
    let mut setpriv = Command::new("setpriv");
    setpriv
        .args(["--reuid=0", "--regid=0", "--clear-groups", "--no-new-privs"])
        .arg("--inh-caps=-all")
        .arg("--ambient-caps=-all")
        .arg(format!("--bounding-set={caps}"))
        .arg("--");
    let (json, out) = audit_json(&lab, Some(&mut setpriv));
    assert_named(&json, &stale, server.pid());
    assert_eq!(
        json["stale_by_holder"]["search"]["method"], "iterator",
        "with {caps} the task_file iterator loads; /proc/PID/fd would need CAP_SYS_PTRACE: {}",
        out.stderr
    );
}
