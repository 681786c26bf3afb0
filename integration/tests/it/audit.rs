//! `sockmap-gc audit` end to end on the real kernel: verdicts, namespace churn, bad maps,
//! L7-proxy entries.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use libbpf_rs::{MapHandle, MapType};
use sockmap_gc::key::SockKey;
use sockmap_gc_lab::{ClientOpts, LabConfig};

use crate::support::{
    self, entry_of, hex, lab, lab_with_stale, live_keys, natural_stale, run, run_json, run_on,
    serve_and_hold, verdicts,
};

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn audit_judges_live_natural_and_planted_entries_over_three_pods() {
    let lab = support::lab_with(LabConfig::new("aud-mix", 3, support::PEER));
    let servers: Vec<_> = (0..3)
        .map(|pod| lab.start_server(pod, 8080, pod == 0).expect("server"))
        .collect();
    let held: Vec<_> = servers
        .iter()
        .map(|s| lab.hold(&ClientOpts::to(s.addr()).count(2)).expect("hold"))
        .collect();
    let live = live_keys(&lab, &held.iter().collect::<Vec<_>>());
    assert_eq!(
        live.len(),
        12,
        "two connections to each of three pods, two ends each"
    );

    let mut stale = HashSet::new();
    stale.insert(natural_stale(
        &lab,
        servers[0].addr(),
        sa(lab.node_ip(0), 42000),
    ));
    for port in 40000..40003 {
        let k = SockKey::for_socket(servers[1].addr(), sa(lab.node_ip(1), port)).expect("v4");
        lab.plant(k).expect("plant ipv4");
        stale.insert(k);
    }
    for port in 50000..50002 {
        let k = SockKey::for_socket(
            "[fd00:5a5a::2]:8080".parse().expect("addr"),
            SocketAddr::new("fd00:5a5a::1".parse().expect("ip"), port),
        )
        .expect("v6");
        lab.plant(k).expect("plant ipv6");
        stale.insert(k);
    }

    let path = lab.map_path();
    let out = run_json("audit", &path, &[]);
    assert_eq!(
        out.code, 1,
        "stale entries found means exit 1; stderr: {}",
        out.stderr
    );
    let json = out.json();
    assert_eq!(json["inventory"]["complete"], true, "{}", out.stdout);
    let got = verdicts(&json["entries"]);
    let reasons: std::collections::BTreeSet<String> = got
        .iter()
        .map(|(_, verdict, reason)| format!("{verdict}/{reason}"))
        .collect();
    support::kernel_fact(&format!(
        "audit of live, natural and planted entries (identity auto): verdicts {}",
        reasons.into_iter().collect::<Vec<_>>().join(", ")
    ));
    let in_map: HashSet<String> = lab.raw_keys().iter().map(|k| k.to_hex()).collect();
    let reported: HashSet<String> = got.iter().map(|(k, _, _)| k.clone()).collect();
    assert_eq!(
        reported, in_map,
        "every entry of the map is in the output, once"
    );
    assert_eq!(got.len(), in_map.len());
    let expected = live.iter().map(|k| (k, "live"));
    for (k, verdict) in expected.chain(stale.iter().map(|k| (k, "stale"))) {
        let v = got
            .iter()
            .find(|(h, _, _)| *h == hex(k))
            .unwrap_or_else(|| panic!("{verdict} key {k} not reported"));
        assert_eq!(v.1, verdict, "{k}: {v:?}");
    }
    assert_eq!(json["summary"]["stale"], 6);
    assert_eq!(json["summary"]["live"], 12);
    let v6 = json["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["family"] == "ipv6")
        .expect("an ipv6 entry");
    assert_eq!(v6["local"], "[fd00:5a5a::2]:8080");

    let table = run_on("audit", &path, &[]);
    assert_eq!(table.code, 1);
    support::evidence(&format!(
        "audit of lab aud-mix on the real kernel:\n{}",
        table.stdout
    ));
    assert!(
        table
            .stdout
            .contains("summary    18 entries: 12 live, 6 stale, 0 unknown"),
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .contains(&format!("  {:<40} 3", lab.node_ip(1))),
        "grouped by remote IP: {}",
        table.stdout
    );

    let filtered = run_json(
        "audit",
        &path,
        &["--local", &servers[1].addr().ip().to_string()],
    );
    let f = filtered.json();
    assert_eq!(f["summary"]["stale"], 3, "only pod 1's planted entries");
    drop(held);
}

/// Removes the churn namespaces on drop, also when the test fails.
struct ChurnNamespaces {
    prefix: &'static str,
    count: usize,
}

impl Drop for ChurnNamespaces {
    fn drop(&mut self) {
        for i in 0..self.count {
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("{}{i}", self.prefix)])
                .output();
        }
    }
}

#[test]
fn audit_is_not_failed_by_namespaces_coming_and_going() {
    let (lab, _server, stale) = lab_with_stale("aud-churn", 40000);
    let path = lab.map_path();
    let guard = ChurnNamespaces {
        prefix: "smgc-aud-churn-",
        count: 4,
    };
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let name = format!("{}{}", guard.prefix, i % guard.count);
                let _ = Command::new("ip").args(["netns", "add", &name]).output();
                // A process in a namespace of its own, gone a moment later.
                let _ = Command::new("unshare")
                    .args(["--net", "sleep", "0.05"])
                    .output();
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
                i += 1;
            }
        });
        for round in 0..5 {
            let out = run_json("audit", &path, &[]);
            assert_eq!(out.code, 1, "round {round}: {}", out.stderr);
            let json = out.json();
            assert_eq!(
                json["inventory"]["complete"], true,
                "round {round}: {}",
                out.stdout
            );
            let got = verdicts(&json["entries"]);
            assert_eq!(got.len(), 1);
            assert_eq!(
                (got[0].0.as_str(), got[0].1.as_str()),
                (hex(&stale).as_str(), "stale")
            );
        }
        stop.store(true, Ordering::Relaxed);
    });
}

/// A pin directory of this test's own, removed on drop.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pinned(dir: &Path, name: &str, ty: MapType, key_size: u32) -> PathBuf {
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as libbpf_sys::size_t,
        ..Default::default()
    };
    let mut map = MapHandle::create(ty, Some(name), key_size, 4, 16, &opts).expect("create map");
    let path = dir.join(name);
    map.pin(&path).expect("pin map");
    path
}

fn assert_one_line_error(args: &[&str], needles: &[&str]) {
    let out = run(args);
    assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
    }
}

#[test]
fn audit_refuses_what_is_not_ciliums_map_in_one_line() {
    sockmap_gc_lab::sys::ensure_bpffs().expect("bpffs");
    let dir = PinDir(PathBuf::from("/sys/fs/bpf/smgc-aud-bad"));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("pin dir");
    let hash = pinned(&dir.0, "hash", MapType::Hash, 8);
    let short = pinned(&dir.0, "short", MapType::Sockhash, 16);
    let missing = dir.0.join("missing");
    let file = std::env::temp_dir().join("smgc-aud-bad-file");
    std::fs::write(&file, b"not a map").expect("temp file");
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();

    assert_one_line_error(&["audit", "--map", &s(&missing)], &[&s(&missing), "--map"]);
    assert_one_line_error(
        &["audit", "--map", &s(&hash)],
        &[&s(&hash), "Hash", "8-byte", "44-byte"],
    );
    assert_one_line_error(&["audit", "--map", &s(&short)], &[&s(&short), "16-byte"]);
    assert_one_line_error(
        &["audit", "--map", &s(&file)],
        &[&s(&file), "not on the BPF filesystem"],
    );
    assert_one_line_error(&["audit", "--map", &s(&dir.0)], &[&s(&dir.0), "directory"]);
    let _ = std::fs::remove_file(&file);
}

#[test]
fn audit_judges_l7_proxy_entries_live_or_unknown_never_stale_on_tuple_evidence() {
    let lab = lab("aud-proxy", 1);
    let (_server, _held, live) = serve_and_hold(&lab, false, |c| c.from_port(43000));
    let gateway: IpAddr = "169.254.42.1".parse().expect("ip");
    // Cilium files a proxied socket under A = gateway:proxy port, B = the socket's local end.
    let owned = SockKey::for_socket(sa(lab.node_ip(0), 43000), sa(gateway, 15001)).expect("v4");
    let orphan = SockKey::for_socket(sa(lab.node_ip(0), 43999), sa(gateway, 15001)).expect("v4");
    lab.plant(owned).expect("plant");
    lab.plant(orphan).expect("plant");
    let path = lab.map_path();
    let path = path.to_str().expect("utf-8");
    let gw = gateway.to_string();

    let out = run_json("audit", path, &["--identity", "off", "--gateway", &gw]);
    assert_eq!(out.code, 0, "no stale entry: {}", out.stdout);
    let got = verdicts(&out.json()["entries"]);
    let of = |k: &SockKey| {
        got.iter()
            .find(|(h, _, _)| *h == hex(k))
            .cloned()
            .expect("reported")
    };
    assert_eq!(of(&owned).2, "proxy-local-end-owned");
    assert_eq!(of(&orphan).1, "unknown");
    assert_eq!(of(&orphan).2, "proxy-local-end-not-found");
    for k in &live {
        assert_eq!(of(k).1, "live");
    }

    // Without the gateway known, tuple evidence alone would call both stale.
    let blind = run_json("audit", path, &["--identity", "off"]);
    assert_eq!(blind.code, 1);
    assert_eq!(blind.json()["summary"]["stale"], 2);
    assert!(
        blind.stderr.contains("--gateway"),
        "warns: {}",
        blind.stderr
    );
}

#[test]
fn audit_with_identity_keeps_a_proxy_entry_holding_its_live_socket() {
    let lab = lab("aud-proxy-id", 1);
    let server = lab.start_server(0, 8080, false).expect("server");
    let gateway: IpAddr = "169.254.42.1".parse().expect("ip");
    let sock = lab.connect_from_node(server.addr()).expect("connect");
    let local = sock.local_addr().expect("local end");
    let proxied = SockKey::for_socket(local, sa(gateway, 15001)).expect("v4");
    lab.plant_socket(proxied, sock)
        .expect("plant the live socket itself");
    let server_end = SockKey::for_socket(server.addr(), local).expect("v4");
    assert!(
        lab.wait_key(&server_end, true, Duration::from_secs(2)),
        "server end filed"
    );
    let path = lab.map_path();

    let out = run_json(
        "audit",
        &path,
        &["--identity", "on", "--gateway", &gateway.to_string()],
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let entry = entry_of(&out.json(), &proxied);
    assert_eq!(entry["verdict"], "live", "{entry}");
    assert_eq!(entry["reason_code"], "proxy-held-is-live");
    assert_eq!(entry["socket"]["local"], local.to_string());
    assert_eq!(entry["socket"]["state"], "ESTABLISHED");
}

#[test]
fn audit_with_no_thread_to_be_had_judges_alike_and_says_what_it_could_not_read() {
    let lab = lab("aud-nothread", 1);
    let (server, _held, live) = serve_and_hold(&lab, false, |c| c.count(2));
    let stale = support::plant_stale(&lab, server.addr(), [40100, 40101]);
    let path = lab.map_path();
    let normal = run_json("audit", &path, &[]);
    assert!(!normal.stderr.contains("panicked"), "{}", normal.stderr);

    // Every thread the process asks for is refused: a stack larger than any machine's memory.
    let out = support::run_command(
        Command::new(support::product())
            .env("RUST_MIN_STACK", (1u64 << 40).to_string())
            .args([
                "audit",
                "--map",
                path.to_str().expect("utf-8"),
                "--output",
                "json",
            ]),
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert_eq!(out.code, normal.code, "{}", out.stderr);
    let (alone, with_threads) = (out.json(), normal.json());
    let mut judged = verdicts(&alone["entries"]);
    let mut expected = verdicts(&with_threads["entries"]);
    judged.sort();
    expected.sort();
    assert_eq!(judged, expected);
    assert_eq!(expected.len(), live.len() + stale.len());
    for k in &stale {
        let entry = entry_of(&alone, k);
        assert_eq!(entry["verdict"], "stale", "{entry}");
        // The holder search needs no thread of its own.
        assert_eq!(entry["holder"], entry_of(&with_threads, k)["holder"]);
    }
    // The namespace walk does (setns moves one thread): its namespaces are reported unread.
    let inventory = &alone["inventory"];
    assert_eq!(inventory["complete"], false, "{inventory}");
    assert!(
        inventory["unreadable"].to_string().contains("cannot start"),
        "{inventory}"
    );
}
