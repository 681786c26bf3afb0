//! Issue 6 end to end: with the socket behind each entry in view, `audit` and `sweep` see
//! the request stuck right now (a blind spot of tuple evidence), and `--identity` behaves.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use sockmap_gc::key::SockKey;
use sockmap_gc_lab::Lab;

use crate::support::{
    entry_of, evidence, hex, lab, lab_with_stale, natural_stale_entry, run_json, run_json_without,
    run_on_without, serve_and_hold,
};

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The server end of a connection from `port` has been accepted (the server's socket is
/// established) while the planted entry still holds the key.
fn wait_stuck(lab: &Lab, server: SocketAddr, port: u16) -> bool {
    let client_key = SockKey::for_socket(sa(lab.node_ip(0), port), server).expect("v4");
    lab.wait_key(&client_key, true, Duration::from_secs(3))
}

#[test]
fn identity_sees_the_request_stuck_right_now_and_sweep_frees_it() {
    let lab = lab("stuck-now", 1);
    let (server, held, live) = serve_and_hold(&lab, false, |c| c.count(2));
    let port = 40000;
    let stale = SockKey::for_socket(server.addr(), sa(lab.node_ip(0), port)).expect("v4");
    lab.plant(stale).expect("plant");
    let path = lab.map_path();
    let path = path.to_str().expect("utf-8");

    let target = server.addr();
    std::thread::scope(|s| {
        // Stuck long enough for two audits and a sweep on a slow (emulated) machine: once it
        // times out, no socket owns the tuple and the verdict is another one.
        let hung = s.spawn(|| lab.request_from(target, port, Duration::from_secs(20)));
        assert!(wait_stuck(&lab, target, port), "the stuck connection is up");

        // Tuple evidence is blind: a live socket owns the tuple right now.
        let blind = run_json("audit", path, &["--identity", "off"]);
        assert_eq!(entry_of(&blind.json(), &stale)["verdict"], "live");

        let seen = run_json("audit", path, &["--identity", "on"]);
        assert_eq!(seen.code, 1, "{}", seen.stderr);
        let json = seen.json();
        let e = entry_of(&json, &stale);
        assert_eq!(e["verdict"], "stale", "{e}");
        assert_eq!(e["reason_code"], "tuple-owned-by-another", "{e}");
        assert!(e["reason"]
            .as_str()
            .unwrap_or("")
            .contains("the held socket is another one"));
        assert_eq!(e["socket"]["state"], "ESTABLISHED");
        for k in &live {
            assert_eq!(entry_of(&json, k)["verdict"], "live", "{k}");
        }
        evidence(&format!(
            "request stuck right now, seen on the real kernel: tuple evidence says live, identity says: {}",
            e["reason"].as_str().unwrap_or("?")
        ));

        let swept = run_json(
            "sweep",
            path,
            &["--identity", "on", "--execute", "--confirm-after", "0s"],
        );
        assert_eq!(swept.code, 0, "{}\n{}", swept.stdout, swept.stderr);
        assert_eq!(swept.json()["deleted"], serde_json::json!([hex(&stale)]));
        assert!(!lab.contains(&stale));
        for k in &live {
            assert!(lab.contains(k), "live key {k} kept");
        }
        let outcome = hung.join().expect("client thread").expect("client runs");
        // The stuck request's payload went to the planted socket; it cannot be replayed.
        assert!(outcome.is_hang(), "{outcome}");
    });
    let again = lab
        .request_from(server.addr(), port, Duration::from_millis(1500))
        .expect("client runs");
    assert!(
        again.is_replied(),
        "port {port} works after the sweep: {again}"
    );
    drop(held);
}

#[test]
fn identity_judges_natural_stale_entries_by_their_closed_socket() {
    let lab = lab("stuck-closed", 1);
    let server = lab.start_server(0, 8080, true).expect("busy server");
    let Some(stale) = natural_stale_entry(&lab, server.addr(), sa(lab.node_ip(0), 42000)) else {
        // Before 5.16 the kernel removes the entry itself: nothing to judge (a kernel fact says so).
        return;
    };
    let path = lab.map_path();
    let out = run_json("audit", &path, &["--identity", "on"]);
    assert_eq!(out.code, 1);
    let e = entry_of(&out.json(), &stale);
    assert_eq!(e["reason_code"], "held-closed", "{e}");
    assert_eq!(e["socket"]["state"], "CLOSE");

    let off = run_json("audit", &path, &["--identity", "off"]);
    let json = off.json();
    assert_eq!(json["inventory"]["identity"], false);
    let e = entry_of(&json, &stale);
    assert_eq!(
        e["reason_code"], "no-socket",
        "tuple rules with identity off: {e}"
    );
    assert!(
        e.get("socket").is_none(),
        "no socket object with identity off"
    );
}

/// Without the capabilities an iterator program needs (CAP_PERFMON, and CAP_SYS_ADMIN which
/// implies it), keeping CAP_BPF for the map.
const NO_PERFMON: &str = "-perfmon,-sys_admin";

#[test]
fn identity_auto_warns_once_and_still_audits_where_the_program_is_refused() {
    let (lab, _server, stale) = lab_with_stale("stuck-refused", 40000);
    let path = lab.map_path();
    let path = path.to_str().expect("utf-8");

    let auto = run_json_without(NO_PERFMON, "audit", path, &[]);
    assert_ne!(auto.code, 2, "auto still audits: {}", auto.stderr);
    let json = auto.json();
    assert_eq!(json["inventory"]["identity"], false);
    assert_eq!(entry_of(&json, &stale)["key"], hex(&stale));
    assert_eq!(
        auto.stderr.matches("socket identity unavailable").count(),
        1,
        "one warning: {}",
        auto.stderr
    );

    let on = run_on_without(NO_PERFMON, "audit", path, &["--identity", "on"]);
    assert_eq!(on.code, 2, "on makes a refusal an error: {}", on.stderr);
    assert!(on.stderr.contains("refused"), "{}", on.stderr);
}
