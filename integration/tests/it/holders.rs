//! Who keeps a stale entry's socket, on the real kernel: a leaky server in a pod whose cgroup
//! sits at a kubelet-like path, and a listener that never accepts.

use std::collections::HashSet;
use std::fs;
use std::net::SocketAddr;
use std::time::Duration;

use sockmap_gc::holder::{HolderSource, ScanMethod};
use sockmap_gc_lab::{ClientOpts, Lab, ServerOpts};

use crate::support::{evidence, lab, natural_stale};

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
pub fn leaky_pod(lab: &Lab, count: u16) -> (sockmap_gc_lab::Server, Vec<sockmap_gc::key::SockKey>) {
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
        let key = sockmap_gc::key::SockKey::for_socket(
            server.addr(),
            SocketAddr::new(lab.node_ip(0).into(), port),
        )
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
    server.stop().expect("listener stops");
    for key in &stuck {
        assert!(
            lab.wait_key(key, false, Duration::from_secs(2)),
            "closing the listener frees its queued sockets and their entries: {key}"
        );
    }
}
