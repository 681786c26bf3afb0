//! The socket-identity iterator on the real kernel: the socket behind held, planted and
//! naturally stale entries; in-kernel compare-and-delete; the cost of one read against a
//! `get_next_key` walk.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use sockmap_gc::diag::inventory;
use sockmap_gc::identity::{CadOutcome, HeldSocket, IdentityError, IdentityReader, Target};
use sockmap_gc::key::{RawKey, SockKey};
use sockmap_gc::map::{Access, SockMap};
use sockmap_gc::netns::Netns;
use sockmap_gc::socket::{LiveSocket, TcpState};
use sockmap_gc_lab::{Lab, LabConfig};

use crate::support::{
    evidence, kernel_fact, lab, lab_with, natural_stale_entry, serve_and_hold, PEER,
};

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn reader() -> IdentityReader {
    IdentityReader::new().unwrap_or_else(|e| {
        panic!("this kernel runs iter/sockmap programs (KERNEL-FACTS); loading failed: {e}")
    })
}

fn open(lab: &Lab) -> SockMap {
    SockMap::open(&lab.map_path(), Access::ReadWrite).expect("the lab's map opens")
}

fn identities(reader: &mut IdentityReader, map: &SockMap) -> HashMap<RawKey, HeldSocket> {
    let ids = reader.read(map).expect("identity read");
    assert_eq!(ids.map_id, map.id());
    let by_key: HashMap<RawKey, HeldSocket> = ids.entries.iter().copied().collect();
    assert_eq!(by_key.len(), ids.entries.len(), "one entry per key");
    by_key
}

/// The sockets of the lab's node and pod namespaces, from sock_diag.
fn lab_sockets(lab: &Lab) -> Vec<LiveSocket> {
    let mut spaces =
        vec![Netns::from_path(&lab.node_netns_path(), "node").expect("node namespace")];
    for pod in 0..lab.pods() {
        spaces.push(Netns::from_path(&lab.pod_netns_path(pod), "pod").expect("pod namespace"));
    }
    let inv = inventory(&spaces);
    assert!(inv.is_complete(), "every lab namespace read");
    inv.sockets
}

#[test]
fn identity_sees_held_planted_and_naturally_stale_sockets() {
    let mut config = LabConfig::new("id-read", 1, PEER);
    config.ipv6 = true;
    let lab = lab_with(config);
    let (server, held, live) = serve_and_hold(&lab, true, |c| c.count(3));
    let natural = natural_stale_entry(&lab, server.addr(), sa(lab.node_ip(0), 42000));
    let planted4 = SockKey::for_socket(server.addr(), sa(lab.node_ip(0), 40000)).expect("v4");
    let pod6 = lab.pod_ip6(0).expect("ipv6 lab");
    let node6 = lab.node_ip6(0).expect("ipv6 lab");
    let planted6 = SockKey::for_socket(sa(pod6, 8080), sa(node6, 40001)).expect("v6");
    lab.plant(planted4).expect("plant v4");
    lab.plant(planted6).expect("plant v6");

    let map = open(&lab);
    let mut reader = reader();
    let by_key = identities(&mut reader, &map);
    let keys: HashSet<RawKey> = lab.raw_keys().into_iter().collect();
    assert_eq!(
        by_key.keys().copied().collect::<HashSet<_>>(),
        keys,
        "one identity per map entry"
    );

    let sockets = lab_sockets(&lab);
    let node_inode = Netns::from_path(&lab.node_netns_path(), "node")
        .expect("node")
        .id
        .inode;
    let pod_inode = Netns::from_path(&lab.pod_netns_path(0), "pod")
        .expect("pod")
        .id
        .inode;
    for key in &live {
        let h = by_key[&key.encode()];
        assert_eq!(
            h.local, key.local,
            "held socket's own local end is B: {key}"
        );
        assert_eq!(
            h.remote, key.remote,
            "held socket's own remote end is A: {key}"
        );
        assert_eq!(h.state, TcpState::Established, "{key}");
        assert!(
            h.inode != 0 && !h.orphaned,
            "a peer's fd refers to it: {key}"
        );
        let owner = sockets
            .iter()
            .find(|s| s.local == h.local && s.remote == h.remote)
            .unwrap_or_else(|| panic!("sock_diag sees the socket of {key}"));
        assert_eq!(h.cookie, owner.cookie, "cookie = idiag_cookie: {key}");
        assert_eq!(h.netns_inode, owner.netns.inode, "{key}");
        let expected = if key.local.ip() == IpAddr::from(lab.pod_ip(0)) {
            pod_inode
        } else {
            node_inode
        };
        assert_eq!(h.netns_inode, expected, "the end's own namespace: {key}");
    }

    for planted in [planted4, planted6] {
        let h = by_key[&planted.encode()];
        assert_ne!(
            (h.local, h.remote),
            (planted.local, planted.remote),
            "a planted key holds another socket: {planted}"
        );
        assert!(
            h.local.ip().is_loopback() && h.remote.ip().is_loopback(),
            "the planter's loopback socket: {h:?}"
        );
        assert_eq!(h.state, TcpState::Established);
        assert_eq!(
            h.netns_inode, node_inode,
            "the planter works in the node namespace"
        );
        assert!(
            sockets.iter().any(|s| s.cookie == h.cookie),
            "the planter's socket is live in sock_diag"
        );
    }

    evidence(&format!(
        "identity on the real kernel: {} entries; planted {} holds {} -> {}",
        by_key.len(),
        planted4,
        by_key[&planted4.encode()].local,
        by_key[&planted4.encode()].remote,
    ));
    // Before 5.16 there is no natural stale entry to read (said by natural_stale_entry).
    if let Some(natural) = natural {
        let h = by_key[&natural.encode()];
        kernel_fact(&format!(
            "iter/sockmap reads a naturally stale entry's socket as {:?}, local port {}",
            h.state,
            h.local.port()
        ));
        assert_eq!(h.state, TcpState::Close, "reset, fd kept: TCP_CLOSE");
        assert!(
            h.inode != 0 && !h.orphaned,
            "the server's kept fd still refers to it: {h:?}"
        );
        assert!(
            [0, libc::ECONNRESET].contains(&h.error),
            "the reset, unless the server's read took it: {h:?}"
        );
        assert_eq!(h.local.port(), 0, "unhashed: its local port reads 0");
        assert!(
            !sockets
                .iter()
                .any(|s| s.cookie == h.cookie && s.state != TcpState::Close),
            "no live connection is the naturally stale entry's socket"
        );
    }

    // The ends alone (the continuous pass's read): every entry as a verdict weighs it, the
    // same as from the full read; and a full read after it fills the rest again.
    let mut views = HashMap::new();
    let n = reader
        .read_views_into(&map, &mut |_, raw, view| {
            views.insert(raw, view);
        })
        .expect("ends-only read");
    assert_eq!(n, by_key.len(), "one view per map entry");
    for (raw, h) in &by_key {
        assert_eq!(views.get(raw), Some(&h.view()), "{}", raw.to_hex());
    }
    let again = identities(&mut reader, &map);
    for key in &live {
        assert_eq!(again[&key.encode()], by_key[&key.encode()], "{key}");
    }
    drop(held);
}

#[test]
fn compare_and_delete_deletes_only_the_judged_socket() {
    let lab = lab("id-cad", 1);
    let (server, held, live) = serve_and_hold(&lab, false, |c| c.count(2));
    let node = lab.node_ip(0);
    let right = SockKey::for_socket(server.addr(), sa(node, 40000)).expect("v4");
    let wrong = SockKey::for_socket(server.addr(), sa(node, 40001)).expect("v4");
    let absent = SockKey::for_socket(server.addr(), sa(node, 40002)).expect("v4");
    lab.plant(right).expect("plant");
    lab.plant(wrong).expect("plant");

    let map = open(&lab);
    let mut reader = reader();
    let by_key = identities(&mut reader, &map);
    let right_cookie = by_key[&right.encode()].cookie;
    let wrong_cookie = by_key[&wrong.encode()].cookie ^ 1;
    let targets = [
        Target::new(right.encode(), right_cookie),
        Target::new(wrong.encode(), wrong_cookie),
        Target::new(absent.encode(), 1),
    ];
    let outcomes = reader
        .compare_and_delete(&map, &targets)
        .unwrap_or_else(|e| {
            kernel_fact(&format!("in-kernel compare-and-delete refused: {e}"));
            panic!("KERNEL-FACTS: the verifier accepts the delete: {e}")
        });
    kernel_fact(
        "in-kernel compare-and-delete (iter/sockmap deleting the entry it visits) is accepted",
    );
    assert_eq!(
        outcomes,
        vec![
            (right.encode(), CadOutcome::Deleted),
            (wrong.encode(), CadOutcome::CookieChanged),
            (absent.encode(), CadOutcome::Gone),
        ]
    );
    let after: HashSet<RawKey> = lab.raw_keys().into_iter().collect();
    assert!(!after.contains(&right.encode()), "the judged entry is gone");
    assert!(
        after.contains(&wrong.encode()),
        "another socket's entry stays"
    );
    for k in &live {
        assert!(after.contains(&k.encode()), "live entry {k} untouched");
    }

    // The same program again (loaded once per map): the deleted key is now gone.
    let again = reader
        .compare_and_delete(&map, &[Target::new(right.encode(), right_cookie)])
        .expect("second pass");
    assert_eq!(again, vec![(right.encode(), CadOutcome::Gone)]);
    // A reread still works after the deletes.
    assert_eq!(identities(&mut reader, &map).len(), after.len());

    let read_only = SockMap::open(&lab.map_path(), Access::ReadOnly).expect("open read-only");
    assert!(matches!(
        reader.compare_and_delete(&read_only, &[Target::new(wrong.encode(), wrong_cookie)]),
        Err(IdentityError::ReadOnlyMap { .. })
    ));
    assert!(
        reader.read(&read_only).is_ok(),
        "reading needs no write access"
    );
    drop(held);
}

#[test]
fn identity_read_against_a_key_walk_at_scale() {
    const PLANTED: u16 = 8000;
    let lab = lab("id-scale", 1);
    let server = lab.start_server(0, 8080, false).expect("server");
    let node = lab.node_ip(0);
    let planted: Vec<SockKey> = (20000..20000 + PLANTED)
        .map(|port| {
            let k = SockKey::for_socket(server.addr(), sa(node, port)).expect("v4");
            lab.plant(k).expect("plant");
            k
        })
        .collect();
    let map = open(&lab);
    let mut reader = reader();

    const ROUNDS: u32 = 5;
    let mut walk = f64::MAX;
    let mut read = f64::MAX;
    let mut keys = 0;
    let mut ids = 0;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        keys = map.snapshot().expect("walk").keys.len();
        walk = walk.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        ids = reader.read(&map).expect("identity read").entries.len();
        read = read.min(t.elapsed().as_secs_f64());
    }
    assert_eq!(keys, usize::from(PLANTED));
    assert_eq!(ids, usize::from(PLANTED));

    let by_key = identities(&mut reader, &map);
    let targets: Vec<Target> = planted
        .iter()
        .map(|k| Target::new(k.encode(), by_key[&k.encode()].cookie))
        .collect();
    // The first call loads the program for this map; time it apart from the deletes.
    let absent = SockKey::for_socket(server.addr(), sa(node, 19999)).expect("v4");
    let t = Instant::now();
    let first = reader
        .compare_and_delete(&map, &[Target::new(absent.encode(), 1)])
        .expect("cad load");
    let cad_load = t.elapsed().as_secs_f64();
    assert_eq!(first, vec![(absent.encode(), CadOutcome::Gone)]);
    let t = Instant::now();
    let outcomes = reader.compare_and_delete(&map, &targets).expect("cad");
    let cad = t.elapsed().as_secs_f64();
    assert!(outcomes.iter().all(|(_, o)| *o == CadOutcome::Deleted));
    assert!(lab.raw_keys().is_empty(), "every planted entry deleted");

    // The userspace way for comparison: one BPF_MAP_DELETE_ELEM per key.
    let again: Vec<RawKey> = (30000..30000 + PLANTED)
        .map(|port| {
            let k = SockKey::for_socket(server.addr(), sa(node, port)).expect("v4");
            lab.plant(k).expect("plant");
            k.encode()
        })
        .collect();
    let t = Instant::now();
    for k in &again {
        map.delete(k).expect("delete by key");
    }
    let by_key_delete = t.elapsed().as_secs_f64();
    assert!(lab.raw_keys().is_empty());
    evidence(&format!(
        "identity scale ({PLANTED} entries, best of {ROUNDS}): get_next_key walk {:.2} ms (keys only), \
         iterator read {:.2} ms (keys and held sockets); deleting all {PLANTED}: in-kernel \
         compare-and-delete {:.2} ms (after {:.2} ms loading it), delete by key {:.2} ms",
        walk * 1e3,
        read * 1e3,
        cad * 1e3,
        cad_load * 1e3,
        by_key_delete * 1e3
    ));
}
