//! `sockmap-gc sweep` end to end on the real kernel: dry run, exact deletion, the cure, the
//! incident's scale, the rate limit, and failing closed.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use sockmap_gc::key::SockKey;
use sockmap_gc_lab::{ClientOpts, Lab};

use crate::support::{
    evidence, hex, lab, lab_with_stale, live_keys, natural_stale, run_json, run_json_without,
    run_on, run_on_without, serve_and_hold, HANG,
};

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn map_hex(lab: &Lab) -> HashSet<String> {
    lab.raw_keys().iter().map(|k| k.to_hex()).collect()
}

fn hexes<'a>(keys: impl IntoIterator<Item = &'a SockKey>) -> HashSet<String> {
    keys.into_iter().map(hex).collect()
}

/// Plants the server-end keys of `count` future connections from the node to `server`.
fn plant_future(
    lab: &Lab,
    server: SocketAddr,
    node: IpAddr,
    first_port: u16,
    count: u16,
) -> Vec<SockKey> {
    (first_port..first_port + count)
        .map(|port| {
            let k = SockKey::for_socket(server, sa(node, port)).expect("one family");
            lab.plant(k).expect("plant");
            k
        })
        .collect()
}

#[test]
fn sweep_dry_run_deletes_nothing_and_execute_deletes_exactly_the_stale_keys() {
    let lab = lab("swp-exact", 2);
    let s0 = lab.start_server(0, 8080, true).expect("busy server");
    let s1 = lab.start_server(1, 8080, false).expect("server");
    let h0 = lab.hold(&ClientOpts::to(s0.addr()).count(2)).expect("hold");
    let h1 = lab.hold(&ClientOpts::to(s1.addr()).count(2)).expect("hold");
    let live = live_keys(&lab, &[&h0, &h1]);
    let mut stale = vec![natural_stale(&lab, s0.addr(), sa(lab.node_ip(0), 42000))];
    stale.extend(plant_future(
        &lab,
        s1.addr(),
        lab.node_ip(1).into(),
        40000,
        4,
    ));
    let path = lab.map_path();
    let path = path.to_str().expect("utf-8");
    let before = map_hex(&lab);

    let dry = run_json("sweep", path, &["--confirm-after", "0s"]);
    assert_eq!(
        dry.code, 1,
        "a dry run leaves stale entries behind: {}",
        dry.stderr
    );
    let dj = dry.json();
    assert_eq!(dj["dry_run"], true);
    assert_eq!(map_hex(&lab), before, "a dry run deletes nothing");
    assert!(dj["deleted"].as_array().expect("deleted").is_empty());
    let planned: HashSet<String> = dj["planned"]
        .as_array()
        .expect("planned")
        .iter()
        .map(|e| e["key"].as_str().expect("key").to_string())
        .collect();
    assert_eq!(
        planned,
        hexes(&stale),
        "the dry run names what it would delete"
    );

    let trail = std::env::temp_dir().join("smgc-swp-exact-trail.jsonl");
    let _ = std::fs::remove_file(&trail);
    let exec = run_json(
        "sweep",
        path,
        &[
            "--confirm-after",
            "0s",
            "--execute",
            "--trail",
            trail.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(
        exec.code, 0,
        "nothing left behind: {}\n{}",
        exec.stdout, exec.stderr
    );
    let ej = exec.json();
    let deleted: HashSet<String> = ej["deleted"]
        .as_array()
        .expect("deleted")
        .iter()
        .map(|k| k.as_str().expect("hex").to_string())
        .collect();
    assert_eq!(deleted, hexes(&stale), "exactly the stale keys");
    assert_eq!(map_hex(&lab), hexes(&live), "every live key kept");
    let lines = std::fs::read_to_string(&trail).expect("trail written");
    assert_eq!(lines.lines().count(), stale.len());
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        assert_eq!(v["outcome"], "deleted");
        assert!(deleted.contains(v["key"].as_str().expect("key")));
    }
    let _ = std::fs::remove_file(&trail);
    drop((h0, h1));
}

#[test]
fn sweep_cures_the_incident_a_stuck_port_works_again() {
    let (lab, server, stale) = lab_with_stale("swp-cure", 40000);
    let hung = lab
        .request_from(server.addr(), 40000, HANG)
        .expect("client runs");
    assert!(hung.is_hang(), "the planted key hangs port 40000: {hung}");

    let path = lab.map_path();
    let out = run_on("sweep", &path, &["--confirm-after", "0s", "--execute"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(!lab.contains(&stale), "sweep removed the stale key");
    let cured = lab
        .request_from(server.addr(), 40000, HANG)
        .expect("client runs");
    assert!(
        cured.is_replied(),
        "port 40000 works after the sweep: {cured}"
    );
    evidence(&format!(
        "incident cured on the real kernel: port 40000 hung, `sockmap-gc sweep --execute` deleted {stale}, the next request replied"
    ));
}

#[test]
fn sweep_deletes_the_incidents_7325_stale_keys_and_no_live_one() {
    const STALE: u16 = 7325;
    let lab = lab("swp-7325", 1);
    let (server, held, live) = serve_and_hold(&lab, false, |c| c.count(8));
    let stale = plant_future(&lab, server.addr(), lab.node_ip(0).into(), 20000, STALE);
    let path = lab.map_path();
    let out = run_json(
        "sweep",
        &path,
        &[
            "--execute",
            "--confirm-after",
            "0s",
            "--rate-limit",
            "100000",
            "--max-deletes",
            "100000",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let j = out.json();
    assert_eq!(j["summary"]["deleted"], u64::from(STALE));
    assert_eq!(j["summary"]["left_behind"], 0);
    assert_eq!(
        map_hex(&lab),
        hexes(&live),
        "all stale gone, every live key kept"
    );
    assert_eq!(stale.len(), usize::from(STALE));
    evidence(&format!(
        "incident scale on the real kernel: {STALE} stale keys deleted in {:.3} s (delete phase), sweep {:.3} s in all",
        j["summary"]["delete_phase_seconds"].as_f64().unwrap_or(f64::NAN),
        j["summary"]["took_seconds"].as_f64().unwrap_or(f64::NAN)
    ));
    drop(held);
}

#[test]
fn sweep_rate_limit_spaces_the_deletions() {
    const N: u16 = 21;
    const RATE: f64 = 10.0;
    let lab = lab("swp-rate", 1);
    let server = lab.start_server(0, 8080, false).expect("server");
    plant_future(&lab, server.addr(), lab.node_ip(0).into(), 30000, N);
    let path = lab.map_path();
    let out = run_json(
        "sweep",
        &path,
        &["--execute", "--confirm-after", "0s", "--rate-limit", "10"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = &out.json()["summary"];
    assert_eq!(s["deleted"], u64::from(N));
    assert_eq!(s["rate_limit"], 10);
    let phase = s["delete_phase_seconds"].as_f64().expect("seconds");
    let floor = f64::from(N - 1) / RATE;
    assert!(
        phase >= floor,
        "{N} deletions at {RATE}/s took {phase:.3} s, under {floor:.3} s"
    );
}

#[test]
fn sweep_deletes_nothing_when_a_namespace_cannot_be_read() {
    let lab = lab("swp-blind", 1);
    let server = lab.start_server(0, 8080, false).expect("server");
    let stale = plant_future(&lab, server.addr(), lab.node_ip(0).into(), 40000, 3);
    let before = map_hex(&lab);
    let path = lab.map_path();
    // Without CAP_SYS_ADMIN it cannot setns into any namespace: the evidence is incomplete.
    let out = run_json_without(
        "-sys_admin",
        "sweep",
        &path,
        &["--execute", "--confirm-after", "0s"],
    );
    assert_eq!(
        out.code, 1,
        "stale entries left behind: {}\n{}",
        out.stdout, out.stderr
    );
    let j = out.json();
    assert!(j["deleted"].as_array().expect("deleted").is_empty());
    assert_eq!(j["inventory"]["complete"], false);
    let closed = j["guards"]
        .as_array()
        .expect("guards")
        .iter()
        .find(|g| g["guard"] == "fail-closed")
        .expect("fail-closed guard listed")
        .clone();
    assert_eq!(closed["acted"], true);
    assert!(
        closed["detail"]
            .as_str()
            .unwrap_or("")
            .contains("could not read"),
        "says why: {closed}"
    );
    assert_eq!(map_hex(&lab), before, "nothing deleted");
    assert_eq!(stale.len(), 3);

    let text = run_on_without(
        "-sys_admin",
        "sweep",
        &path,
        &["--execute", "--confirm-after", "0s"],
    );
    assert!(text.stdout.contains("INCOMPLETE"), "{}", text.stdout);
    assert!(text.stdout.contains("nothing deleted"), "{}", text.stdout);
}
