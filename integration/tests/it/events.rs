//! Kernel events on the real kernel: where tracing programs load (Debian 12's 6.1 in the
//! kernel-check guest), a reset socket in the map and a refused insert are reported as they
//! happen; where they do not (this project's 6.18 machines), `auto` falls back with a reason.
//!
//! `SMGC_EXPECT_EVENTS=1` (set by scripts/kernel-check.sh for its kernels) makes a refusal a
//! failure; without it a refusal is recorded as a kernel fact and the fallback is checked.

use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sockmap_gc::events::{Event, EventWatcher, EventsError, EventsMode, Heard, Watching};
use sockmap_gc::key::SockKey;
use sockmap_gc_lab::{sys, ClientOpts, Lab, Server};

use crate::daemon::{write_config, Daemon};
use crate::rig::{read_trail, Scratch};
use crate::support::{evidence, hex, lab, natural_stale, HANG};

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn expect_events() -> bool {
    std::env::var("SMGC_EXPECT_EVENTS").is_ok_and(|v| v == "1")
}

/// Starts the watcher on the lab's map with both programs, or with what `auto` keeps if that
/// covers `need`; else checks the fallback and returns `None` (a failure under
/// `SMGC_EXPECT_EVENTS=1`).
fn watch(
    lab: &Lab,
    need: impl Fn(Watching) -> bool,
) -> Option<(EventWatcher, mpsc::Receiver<Heard>)> {
    let map_id = lab.map_id().expect("the lab's map has an id");
    let start = |mode| {
        let (tx, rx) = mpsc::channel();
        EventWatcher::start(mode, map_id, move |batch| {
            for heard in batch {
                let _ = tx.send(*heard);
            }
        })
        .map(|w| w.map(|w| (w, rx)))
    };
    let refusal = match start(EventsMode::On) {
        Ok(Some(watched)) => {
            evidence(&format!(
                "kernel fact: events: {} watched",
                watched.0.watching().label()
            ));
            return Some(watched);
        }
        Ok(None) => panic!("events = on never falls back"),
        Err(e) => e,
    };
    assert!(!expect_events(), "SMGC_EXPECT_EVENTS=1 but: {refusal}");
    assert!(
        refusal.is_refusal(),
        "a refusal, not another failure: {refusal}"
    );
    assert!(
        matches!(refusal, EventsError::Refused { kind: Some(_), .. })
            && refusal.to_string().contains("os error"),
        "the refusal names its errno: {refusal}"
    );
    // auto keeps what loads, or falls back without an error.
    match start(EventsMode::Auto) {
        Ok(Some(watched)) => {
            let watching = watched.0.watching();
            evidence(&format!(
                "kernel fact: events: only {} watched ({refusal})",
                watching.label()
            ));
            need(watching).then_some(watched)
        }
        Ok(None) => {
            evidence(&format!("kernel fact: events refused: {refusal}"));
            None
        }
        Err(e) => panic!("auto falls back without an error, got: {e}"),
    }
}

/// The first event `pick` accepts within `timeout`, with when it was handed over.
fn wait_for<T>(
    rx: &mpsc::Receiver<Heard>,
    timeout: Duration,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> Option<(T, Duration)> {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(heard) => {
                if let Some(t) = pick(&heard.event) {
                    return Some((t, heard.at));
                }
            }
            Err(_) => return None,
        }
    }
    None
}

#[test]
fn events_report_the_reset_socket_that_stays_in_the_map() {
    let lab = lab("ev-close", 1);
    let server = lab.start_server(0, 8080, true).expect("busy server");
    let Some((watcher, rx)) = watch(&lab, |w| w.closes) else {
        return;
    };
    let node = sa(lab.node_ip(0), 42100);
    let stale = natural_stale(&lab, server.addr(), node);
    let seen = wait_for(&rx, Duration::from_secs(2), |e| match e {
        Event::Closed { socket, at, .. } if socket.key() == Some(stale.encode()) => {
            Some((*socket, *at))
        }
        _ => None,
    });
    let ((socket, at), heard) = seen.unwrap_or_else(|| panic!("no close event for {stale}"));
    let delay = heard.saturating_sub(at);
    assert_eq!(socket.local, server.addr(), "its own local end");
    assert_eq!(socket.remote, node, "its own remote end");
    assert_ne!(socket.cookie, 0);
    evidence(&format!(
        "kernel fact: events: close of {stale} heard {} us after the kernel saw it",
        delay.as_micros()
    ));
    // Ordinary closes (both ends close their fds) report nothing of theirs.
    let outcome = lab
        .request_from(server.addr(), 42101, Duration::from_secs(2))
        .expect("client runs");
    assert!(outcome.is_replied(), "{outcome}");
    let ordinary = SockKey::for_socket(server.addr(), sa(lab.node_ip(0), 42101)).expect("v4");
    let noisy = wait_for(&rx, Duration::from_millis(300), |e| match e {
        Event::Closed { socket, .. } if socket.key() == Some(ordinary.encode()) => Some(()),
        _ => None,
    });
    assert!(noisy.is_none(), "an ordinary close is no event");
    assert_eq!(watcher.lost(), 0);
    assert!(watcher.is_running());
}

#[test]
fn events_report_an_insert_refused_by_a_stale_entry() {
    let lab = lab("ev-collide", 1);
    let server = lab.start_server(0, 8080, false).expect("server");
    let Some((watcher, rx)) = watch(&lab, |w| w.collisions) else {
        return;
    };
    let port = 40000;
    let stale = SockKey::for_socket(server.addr(), sa(lab.node_ip(0), port)).expect("v4");
    lab.plant(stale).expect("plant");
    let outcome = lab
        .request_from(server.addr(), port, Duration::from_millis(500))
        .expect("client runs");
    assert!(
        !outcome.is_replied(),
        "the planted entry hijacks it: {outcome}"
    );
    let map_id = lab.map_id().expect("id");
    let seen = wait_for(&rx, Duration::from_secs(2), |e| match e {
        Event::Collision {
            map_id: m,
            key,
            socket,
            ..
        } if *key == stale.encode() => Some((*m, *socket)),
        _ => None,
    });
    let ((m, socket), _) = seen.unwrap_or_else(|| panic!("no collision event for {stale}"));
    assert_eq!(m, map_id);
    // The socket that could not be filed is the new connection's server end.
    assert_eq!(socket.local, server.addr());
    assert_eq!(socket.remote, sa(lab.node_ip(0), port));
    evidence(&format!("kernel fact: events: collision on {stale} heard"));
    assert_eq!(watcher.lost(), 0);
}

/// The daemon's `events`: `on` where `SMGC_EXPECT_EVENTS=1`, else `auto`.
fn events_key() -> &'static str {
    if expect_events() {
        "on"
    } else {
        "auto"
    }
}

/// A deleting daemon that acts on kernel events alone: its next sweep is an hour after the
/// first. `None` (after checking the start line's reason) where this kernel
/// does not give the events `need` names ("closes" or "collisions").
fn daemon_on_events(scratch: &Scratch, lab: &Lab, need: &str) -> Option<Daemon> {
    let config = write_config(
        scratch,
        lab,
        &format!(
            "dry_run = false\ninterval_min = \"1h\"\ninterval_max = \"1h\"\nevents = \"{}\"",
            events_key()
        ),
    );
    let daemon = Daemon::start(&config);
    let started = daemon
        .wait_line(Duration::from_secs(20), |l| {
            l.contains("sockmap-gc daemon started")
        })
        .unwrap_or_else(|| panic!("the daemon never started:\n{}", daemon.log()));
    let mode = started
        .split("events=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no events= in the start line: {started}"));
    evidence(&format!(
        "kernel fact: events: the daemon started with events={mode}"
    ));
    assert_eq!(
        daemon.metric(&format!("sockmap_gc_events{{mode=\"{mode}\"}}")),
        Some(1.0),
        "the mode is in the metrics too"
    );
    if !mode.contains(need) {
        assert!(!expect_events(), "SMGC_EXPECT_EVENTS=1 but events={mode}");
        // auto said why, once.
        let why = daemon.log();
        assert!(
            why.contains("kernel events"),
            "auto's fallback says why:\n{why}"
        );
        return None;
    }
    // An event met while the first pass runs would time the pass as much as the reaction.
    wait_first_pass(&daemon);
    Some(daemon)
}

/// Waits for the daemon's first sweep, then its first continuous pass (overdue once that
/// sweep ends).
fn wait_first_pass(daemon: &Daemon) {
    daemon.wait_sweeps(1.0, Duration::from_secs(60));
    assert!(
        sys::wait_until(Duration::from_secs(30), || {
            daemon
                .metric("sockmap_gc_passes_total{result=\"ok\"}")
                .is_some_and(|n| n >= 1.0)
        }),
        "no continuous pass:\n{}",
        daemon.log()
    );
}

/// The time from the kernel's event to the delete, as the daemon logs it.
fn since_event_us(line: &str) -> u64 {
    line.split("since_event_us=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no since_event_us in {line}"))
}

/// Where the time went, stage by stage, as the daemon logs it.
fn stages(line: &str) -> &str {
    line.split("stages=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no stages in {line}"))
}

/// A request from the node's `port` to `server`, replied and then reset: the busy server
/// keeps its end, whose entry is stale from then on. Its key.
fn reset_from(lab: &Lab, server: &Server, port: u16) -> SockKey {
    let node = sa(lab.node_ip(0), port);
    let outcome = lab
        .request(
            &ClientOpts::to(server.addr())
                .from_port(port)
                .timeout(HANG)
                .reset(true),
        )
        .expect("client runs");
    assert!(outcome.is_replied(), "{outcome}");
    SockKey::for_socket(server.addr(), node).expect("v4")
}

/// Polls the map until `key` is gone (every millisecond, at most `timeout`).
fn gone_within(lab: &Lab, key: &SockKey, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if !lab.contains(key) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

#[test]
fn daemon_deletes_a_reset_socket_entry_at_once() {
    let lab = lab("ev-daemon-close", 1);
    let server = lab.start_server(0, 8080, true).expect("busy server");
    let scratch = Scratch::new("ev-daemon-close");
    let Some(daemon) = daemon_on_events(&scratch, &lab, "closes") else {
        return;
    };
    // Twice: the second reaction reuses what the first left open (the map, the
    // compare-and-delete program and its link).
    for (deleted, port) in [(1, 42200), (2, 42202)] {
        let stale = reset_from(&lab, &server, port);
        // The next sweep is an hour away: only the event can delete it.
        let after = gone_within(&lab, &stale, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{stale} stayed:\n{}", daemon.log()));
        // The trail line is written once the delete returns.
        let mut trail = Vec::new();
        sys::wait_until(Duration::from_secs(5), || {
            trail = read_trail(&scratch.trail());
            trail
                .iter()
                .any(|l| l.key == hex(&stale) && l.outcome == "deleted")
        });
        assert!(
            trail
                .iter()
                .any(|l| l.key == hex(&stale) && l.outcome == "deleted"),
            "the delete is in the trail: {trail:?}\n{}",
            daemon.log()
        );
        // From the kernel's close event to the delete, as the daemon logged it.
        let line = daemon
            .wait_line(Duration::from_secs(5), |l| {
                l.contains("deleted stale entry (kernel event)") && l.contains(&hex(&stale))
            })
            .unwrap_or_else(|| panic!("no delete line:\n{}", daemon.log()));
        let us = since_event_us(&line);
        assert!(
            line.contains("cookie="),
            "the closed socket's cookie: {line}"
        );
        // Counted by the daemon's loop once the reaction hands its report back.
        assert!(
            sys::wait_until(Duration::from_secs(5), || {
                daemon.metric("sockmap_gc_deletions_total{outcome=\"deleted\"}")
                    == Some(f64::from(deleted))
            }),
            "{deleted} deletions counted:\n{}",
            daemon.log()
        );
        evidence(&format!(
            "kernel fact: events: reset {deleted}: the socket's entry deleted {:.1} ms after its close event ({}; gone {} ms after the client returned)",
            us as f64 / 1000.0,
            stages(&line),
            after.as_millis()
        ));
    }
    // The server's other connections are untouched: a new request works.
    let again = lab
        .request_from(server.addr(), 42201, HANG)
        .expect("client runs");
    assert!(again.is_replied(), "{again}");
}

#[test]
fn daemon_counts_a_collision_and_frees_its_key() {
    let lab = lab("ev-daemon-collide", 1);
    let server = lab.start_server(0, 8080, false).expect("server");
    let scratch = Scratch::new("ev-daemon-collide");
    let Some(daemon) = daemon_on_events(&scratch, &lab, "collisions") else {
        return;
    };
    assert_eq!(daemon.metric("sockmap_gc_collisions_total"), Some(0.0));
    let port = 40000;
    let stale = SockKey::for_socket(server.addr(), sa(lab.node_ip(0), port)).expect("v4");
    lab.plant(stale).expect("plant");
    // The new connection collides; whether its own request hangs depends on whether its
    // payload left before the delete.
    let first = lab
        .request_from(server.addr(), port, Duration::from_millis(500))
        .expect("client runs");
    let after = gone_within(&lab, &stale, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{stale} stayed:\n{}", daemon.log()));
    assert!(
        sys::wait_until(Duration::from_secs(5), || {
            daemon.metric("sockmap_gc_collisions_total") == Some(1.0)
        }),
        "one collision counted:\n{}",
        daemon.log()
    );
    let lines = daemon.log();
    let collisions: Vec<&str> = lines.lines().filter(|l| l.contains("collision:")).collect();
    assert_eq!(collisions.len(), 1, "one line per collision:\n{lines}");
    assert!(
        collisions[0].contains(&stale.to_string()),
        "the key decoded in the line: {}",
        collisions[0]
    );
    let deleted = daemon
        .wait_line(Duration::from_secs(5), |l| {
            l.contains("deleted stale entry (kernel event)") && l.contains(&hex(&stale))
        })
        .unwrap_or_else(|| panic!("no delete line:\n{}", daemon.log()));
    evidence(&format!(
        "kernel fact: events: a collision counted, its key deleted {:.1} ms after the collision event ({}; gone {} ms after the client returned; its request: {first})",
        since_event_us(&deleted) as f64 / 1000.0,
        stages(&deleted),
        after.as_millis()
    ));
    let again = lab
        .request_from(server.addr(), port, HANG)
        .expect("client runs");
    assert!(again.is_replied(), "port {port} works again: {again}");
}

#[test]
fn with_events_off_the_continuous_pass_deletes_a_reset_socket_entry() {
    let lab = lab("ev-daemon-off", 1);
    let server = lab.start_server(0, 8080, true).expect("busy server");
    let scratch = Scratch::new("ev-daemon-off");
    // The daemon's own pass_interval and confirm_after (1 s, 500 ms); sweeps an hour apart.
    let config = write_config(
        &scratch,
        &lab,
        "dry_run = false\ninterval_min = \"1h\"\ninterval_max = \"1h\"\nevents = \"off\"",
    );
    let daemon = Daemon::start(&config);
    wait_first_pass(&daemon);
    let stale = reset_from(&lab, &server, 42300);
    let after = gone_within(&lab, &stale, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("{stale} stayed:\n{}", daemon.log()));
    let log = daemon.log();
    assert!(
        !log.contains("(kernel event)"),
        "events are off: no reaction deletes\n{log}"
    );
    evidence(&format!(
        "kernel fact: events off: a reset socket's entry deleted by the continuous pass {} ms after the client returned (pass_interval 1s, confirm_after 500ms)",
        after.as_millis()
    ));
}
