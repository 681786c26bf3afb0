//! Real-kernel tests of namespace discovery, the sock_diag inventory and exact lookups (run as
//! root).
//!
//! Each test makes its own network namespaces with `ip netns` (named `smgc-inv-<test>`, removed
//! first if a previous run left them, and removed again on drop), creates its sockets from a
//! thread that entered the namespace, and talks only over that namespace's loopback.

use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sockmap_gc::diag::{dump_current_netns, inventory, inventory_node, DiagError};
use sockmap_gc::lookup::{self, lookup_node, Ask, Lookups};
use sockmap_gc::netns::{discover, Netns, NetnsId, WalkError};
use sockmap_gc::observe;
use sockmap_gc::socket::{LiveSocket, TcpState, Tuple};

/// Runs a command that must succeed.
fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace with its loopback up, deleted on drop (also on panic).
struct TestNetns {
    name: String,
    path: PathBuf,
    deleted: bool,
}

impl TestNetns {
    fn new(test: &str) -> TestNetns {
        let name = format!("smgc-inv-{test}");
        // A leftover of a killed run would make `ip netns add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        let ns = TestNetns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
            deleted: false,
        };
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn id(&self) -> NetnsId {
        NetnsId::of_path(&self.path).expect("stat of the test namespace")
    }

    /// Runs `f` on a fresh thread inside the namespace; sockets it creates belong there.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&self.path).expect("open the test namespace");
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns into the test namespace");
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    /// Removes the bind mount and its file, as `ip netns del` does.
    fn delete(&mut self) {
        run(&["ip", "netns", "del", &self.name]);
        self.deleted = true;
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .output();
        }
    }
}

/// A connected pair over loopback: (client, accepted server end).
fn connect(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(listener.local_addr().expect("listener address"))
        .expect("connect over loopback");
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

fn find(sockets: &[LiveSocket], local: SocketAddr, remote: SocketAddr) -> LiveSocket {
    let found: Vec<_> = sockets
        .iter()
        .filter(|s| s.local == local && s.remote == remote)
        .collect();
    assert_eq!(found.len(), 1, "{local} -> {remote} in {sockets:#?}");
    *found[0]
}

fn tuple(s: &TcpStream) -> (SocketAddr, SocketAddr) {
    (
        s.local_addr().expect("local address"),
        s.peer_addr().expect("peer address"),
    )
}

/// The test's sockets: listeners on 127.0.0.1, ::1 and a dual-stack [::], and one connection
/// to each (IPv4 to the dual-stack one, so it is IPv4-mapped).
struct Lab {
    listeners: Vec<TcpListener>,
    pairs: Vec<(TcpStream, TcpStream)>,
}

fn open_lab() -> Lab {
    let listeners: Vec<TcpListener> = ["127.0.0.1:0", "[::1]:0", "[::]:0"]
        .iter()
        .map(|a| TcpListener::bind(a).expect("bind in the test namespace"))
        .collect();
    let mut pairs = vec![connect(&listeners[0]), connect(&listeners[1])];
    let port = listeners[2].local_addr().expect("address").port();
    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect to dual-stack");
    let (server, _) = listeners[2].accept().expect("accept");
    pairs.push((client, server));
    Lab { listeners, pairs }
}

#[test]
fn finds_listeners_and_connections_with_their_tuples() {
    let ns = TestNetns::new("tuples");
    let lab = ns.enter(open_lab);

    let discovery = discover(Path::new("/")).expect("discovery");
    let found = discovery
        .namespaces
        .iter()
        .find(|n| n.id == ns.id())
        .expect("the test namespace is discovered")
        .clone();
    assert!(found.label.ends_with(&ns.name), "{found:?}");

    let inv = inventory(std::slice::from_ref(&found));
    assert!(inv.is_complete(), "{:?}", inv.failed);
    assert_eq!((inv.read, inv.vanished.len()), (1, 0));
    // A fresh namespace holds exactly our sockets: 3 listeners and 3 connections' two ends.
    assert_eq!(inv.sockets.len(), 9, "{:#?}", inv.sockets);

    for l in &lab.listeners {
        let local = l.local_addr().expect("address");
        let unspecified = match local {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("addr"),
            SocketAddr::V6(_) => "[::]:0".parse().expect("addr"),
        };
        let s = find(&inv.sockets, local, unspecified);
        assert_eq!(s.state, TcpState::Listen);
    }
    for (client, server) in &lab.pairs {
        for end in [client, server] {
            let (local, remote) = tuple(end);
            let s = find(&inv.sockets, local, remote);
            assert_eq!(s.state, TcpState::Established, "{s:?}");
        }
    }
    // The dual-stack listener's accepted end is an AF_INET6 socket with mapped addresses.
    let (client, server) = &lab.pairs[2];
    let (server_local, server_remote) = tuple(server);
    assert!(server_local.is_ipv6(), "{server_local}");
    let mapped = find(&inv.sockets, server_local, server_remote);
    assert!(mapped.is_ipv4_mapped());
    let unmapped = mapped.ipv4_unmapped();
    assert_eq!(unmapped.local, tuple(client).1);
    assert_eq!(unmapped.remote, tuple(client).0);

    let mut cookies: Vec<u64> = inv.sockets.iter().map(|s| s.cookie).collect();
    assert!(cookies.iter().all(|&c| c != 0));
    cookies.sort_unstable();
    cookies.dedup();
    assert_eq!(cookies.len(), inv.sockets.len(), "cookies are unique");
    assert!(inv.sockets.iter().all(|s| s.netns == ns.id()));
    assert!(inv.sockets.iter().all(|s| s.inode.is_some()));
    drop(lab);
}

#[test]
fn node_inventory_covers_the_root_and_test_namespaces() {
    let ns = TestNetns::new("node");
    let lab = ns.enter(open_lab);
    let root_listener = TcpListener::bind("127.0.0.1:0").expect("bind in the root namespace");
    let root_id = NetnsId::of_current_thread().expect("own namespace");

    let inv = inventory_node(Path::new("/")).expect("inventory of the node");
    assert!(
        inv.is_complete(),
        "failed: {:?}, unreadable: {:?}",
        inv.failed,
        inv.unreadable
    );
    assert!(inv.read >= 2);
    let own = find(
        &inv.sockets,
        root_listener.local_addr().expect("address"),
        "0.0.0.0:0".parse().expect("addr"),
    );
    assert_eq!(own.netns, root_id);
    let (local, remote) = tuple(&lab.pairs[0].0);
    assert_eq!(find(&inv.sockets, local, remote).netns, ns.id());
    assert_ne!(root_id, ns.id());
}

#[test]
fn a_namespace_deleted_after_discovery_counts_as_vanished() {
    let mut ns = TestNetns::new("vanish");
    // A socket keeps the namespace alive in the kernel, but no path reaches it any more.
    let _lab = ns.enter(open_lab);
    let discovered: Vec<Netns> = discover(Path::new("/"))
        .expect("discovery")
        .namespaces
        .into_iter()
        .filter(|n| n.id == ns.id())
        .collect();
    assert_eq!(discovered.len(), 1);
    ns.delete();

    let inv = inventory(&discovered);
    assert_eq!(inv.vanished, discovered);
    assert_eq!(inv.read, 0);
    assert!(inv.failed.is_empty(), "{:?}", inv.failed);
    assert!(inv.is_complete());
    assert!(inv.sockets.is_empty());
}

#[test]
fn a_path_leading_to_another_namespace_is_not_read_as_this_one() {
    let a = TestNetns::new("ident-a");
    let b = TestNetns::new("ident-b");
    // `a`'s identity reached through `b`'s path: as if a pid had been reused.
    let impostor = Netns {
        id: a.id(),
        path: b.path.clone(),
        fallbacks: Vec::new(),
        label: "reused path".into(),
    };
    // A dead first path falls back to the next one.
    let with_fallback = Netns {
        id: b.id(),
        path: PathBuf::from("/proc/0/ns/net"),
        fallbacks: vec![b.path.clone()],
        label: "fallback".into(),
    };
    let inv = inventory(&[impostor.clone(), with_fallback]);
    assert_eq!(inv.vanished, vec![impostor]);
    assert_eq!(inv.read, 1);
    assert!(inv.is_complete());
}

#[test]
fn a_path_that_is_no_namespace_fails_and_makes_the_inventory_incomplete() {
    let ns = TestNetns::new("notns");
    let file = std::env::temp_dir().join(format!("smgc-inv-notns-{}", std::process::id()));
    std::fs::write(&file, b"not a namespace").expect("temp file");
    let bogus = Netns::from_path(&file, "regular file").expect("stat of the temp file");
    let real = Netns::from_path(&ns.path, "test namespace").expect("stat of the namespace");

    let inv = inventory(&[bogus.clone(), real]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(inv.read, 1, "the real namespace is still read");
    assert_eq!(inv.failed.len(), 1);
    assert_eq!(inv.failed[0].0, bogus);
    assert!(
        matches!(&inv.failed[0].1, DiagError::Walk(WalkError::NotNetns { path }) if *path == file),
        "{}",
        inv.failed[0].1
    );
    assert!(!inv.is_complete());
}

/// Not an assertion on time: prints how long ~10k sockets take to dump. Run with
/// `cargo test -p sockmap-gc-lab --release --test it inventory::measure -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run by hand"]
fn measure_dump_of_10k_sockets() {
    const PAIRS: usize = 5_000;
    let ns = TestNetns::new("bulk");
    let (held, direct) = ns.enter(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut held = Vec::with_capacity(PAIRS);
        for _ in 0..PAIRS {
            held.push(connect(&listener));
        }
        let mut direct = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            let n = dump_current_netns().expect("dump").len();
            direct.push((start.elapsed(), n));
        }
        ((listener, held), direct)
    });
    let only = [Netns::from_path(&ns.path, "bulk").expect("stat")];
    let mut walked: Vec<Duration> = Vec::new();
    let mut count = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let inv = inventory(&only);
        walked.push(start.elapsed());
        count = inv.sockets.len();
        assert!(inv.is_complete());
    }
    assert_eq!(count, 2 * PAIRS + 1);
    walked.sort();
    eprintln!("dump_current_netns (already inside): {direct:?}");
    eprintln!("inventory() incl. thread + setns, {count} sockets: {walked:?}");
    drop(held);
}

#[test]
fn exact_lookups_find_each_tuples_owner_and_nothing_else() {
    let ns = TestNetns::new("lookup");
    // An address only this namespace has, for the lookup by local address.
    run(&[
        "ip",
        "-n",
        &ns.name,
        "addr",
        "add",
        "10.213.7.1/32",
        "dev",
        "lo",
    ]);
    let (lab, own) = ns.enter(|| {
        let lab = open_lab();
        let listener = TcpListener::bind("10.213.7.1:0").expect("bind the namespace's address");
        let own = connect(&listener);
        (lab, (listener, own))
    });
    let own_pair = &own.1;
    let dumped = inventory(&[Netns::from_path(&ns.path, "test").expect("netns")]).sockets;

    // Every connection end of the lab, the dual-stack one's server end (IPv4-mapped) among them.
    let mut tuples: Vec<Tuple> = lab
        .pairs
        .iter()
        .flat_map(|(c, s)| [tuple(c), tuple(s)])
        .map(|(l, r)| Tuple::new(l, r))
        .collect();
    let ends = tuples.len();
    // A tuple no connection has: the kernel answers it with the listener on that port.
    let listener_port = lab.listeners[0].local_addr().expect("address").port();
    tuples.push(Tuple::new(
        SocketAddr::from(([127, 0, 0, 1], listener_port)),
        "127.0.0.1:1".parse().expect("addr"),
    ));
    // Looked up by address: only this namespace has 10.213.7.1.
    let (l, r) = tuple(&own_pair.1);
    tuples.push(Tuple::new(l, r));
    let by_address = tuples.len() - 1;

    let mut lookups = Lookups::new(|id| tuples.get(id).copied());
    for id in 0..by_address {
        lookups.in_netns(ns.id().inode, id);
    }
    lookups.at_local_address(l.ip(), by_address);
    // A held socket's namespace that no path reaches.
    lookups.in_netns(1, 0);

    let mut found: Vec<LiveSocket> = Vec::new();
    let looked = lookup_node(Path::new("/"), &lookups, &mut |_, s| found.extend(s))
        .expect("lookups on the node");
    assert!(
        looked.inventory.failed.is_empty(),
        "{:?}",
        looked.inventory.failed
    );
    assert_eq!(looked.unreached, 1);
    assert_eq!(found.len(), ends + 1, "{found:#?}");
    for t in tuples.iter().take(ends).chain([&tuples[by_address]]) {
        let hits: Vec<_> = found
            .iter()
            .filter(|s| Tuple::new(s.local, s.remote) == *t)
            .collect();
        assert_eq!(hits.len(), 1, "{t:?} in {found:#?}");
        let s = hits[0];
        assert_eq!(s.state, TcpState::Established);
        assert_eq!(s.netns, ns.id());
        // The same socket a dump reports, by cookie.
        assert_eq!(find(&dumped, s.local, s.remote).cookie, s.cookie, "{s:?}");
    }
    assert!(
        !found.iter().any(|s| s.state == TcpState::Listen),
        "a listener answering a miss is no owner"
    );

    // The same tuples fed as the map is read, a socket kept in each namespace, and with no
    // namespace kept (the fallback of a node with too many): the same owners. The tuple by
    // address names an unreachable held namespace.
    let cookies = |sockets: &[LiveSocket]| {
        let mut c: Vec<_> = sockets.iter().map(|s| (s.cookie, s.netns)).collect();
        c.sort_unstable();
        c
    };
    for max_ready in [lookup::MAX_READY, 0] {
        let (tx, rx) = std::sync::mpsc::channel();
        let asks: Vec<Ask> = tuples
            .iter()
            .enumerate()
            .map(|(id, &tuple)| Ask {
                tuple,
                held_netns: if id == by_address { 1 } else { ns.id().inode },
            })
            .collect();
        // In two sends, as the read hands them over.
        let (first, rest) = asks.split_at(asks.len() / 2);
        tx.send(first.to_vec()).expect("send");
        tx.send(rest.to_vec()).expect("send");
        drop(tx);
        let mut streamed: Vec<LiveSocket> = Vec::new();
        let looked = lookup::lookup_streamed_within(
            Path::new("/"),
            &rx,
            &mut |_, s| streamed.extend(s),
            max_ready,
        )
        .expect("streamed lookups on the node");
        assert!(
            looked.inventory.failed.is_empty(),
            "{max_ready}: {looked:?}"
        );
        assert_eq!(looked.unreached, 1, "{max_ready}");
        assert_eq!(cookies(&streamed), cookies(&found), "{max_ready}");
    }
    drop((lab, own));
}

#[test]
fn the_gateways_are_cilium_hosts_addresses_and_only_its() {
    let ns = TestNetns::new("gateways");
    // Without a cilium_host interface: no gateway.
    assert_eq!(ns.enter(|| observe::gateways(&[])), Vec::<IpAddr>::new());
    // As Cilium makes them: a veth pair, cilium_host with the gateway's addresses.
    let n = ns.name.as_str();
    run(&[
        "ip",
        "-n",
        n,
        "link",
        "add",
        "cilium_host",
        "type",
        "veth",
        "peer",
        "name",
        "cilium_net",
    ]);
    for (dev, addr) in [
        ("cilium_host", "10.213.9.1/32"),
        ("cilium_host", "fd00:213:9::1/128"),
        ("cilium_net", "10.213.9.2/32"),
    ] {
        run(&["ip", "-n", n, "link", "set", dev, "up"]);
        run(&["ip", "-n", n, "addr", "add", "nodad", addr, "dev", dev]);
    }
    let found = ns.enter(|| observe::gateways(&[]));
    let want: Vec<IpAddr> = ["10.213.9.1", "fd00:213:9::1"]
        .iter()
        .map(|ip| ip.parse().expect("ip"))
        .collect();
    // cilium_host's own, and its link-local address, as getifaddrs listed them before.
    let link_local =
        |ip: &IpAddr| matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
    assert!(want.iter().all(|ip| found.contains(ip)), "{found:?}");
    assert!(
        found.iter().all(|ip| want.contains(ip) || link_local(ip)),
        "{found:?}"
    );
    // Given ones win.
    let given: Vec<IpAddr> = vec!["192.0.2.7".parse().expect("ip")];
    assert_eq!(ns.enter(|| observe::gateways(&given)), given);
}
