//! Churn soak: clients open, use and close connections to two pods at ≥ 2,000 per second
//! (`SMGC_SOAK_RATE` sets another rate)
//! while `sockmap-gc daemon` (deleting; the continuous pass every second, full sweeps every
//! 5 s) works, and stale keys appear all the time, planted and natural (a reset client, a busy
//! server keeping the fd).
//!
//! Ground truth is the lab's: every planted and every natural stale key is recorded when it
//! is made; every other key in the map belongs to a connection (churned or held). The
//! tuples never collide: churned clients bind ports 20000-27999, held ones 9000-9003, the
//! resetting clients 28000 and up (to another server port), planted keys are for ports
//! 10000 and up. So a failed request is the product's doing, and every deletion in the
//! trail must be a recorded stale key.
//!
//! `soak_churn_30s` runs in CI; the documented run is five minutes:
//! `SMGC_SOAK_SECS=300 cargo test -p sockmap-gc-lab --test it soak::soak_churn_long -- --ignored --nocapture`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sockmap_gc::key::SockKey;
use sockmap_gc_lab::peer::child::churn::{ChurnOpts, ChurnReport};
use sockmap_gc_lab::ClientOpts;

use crate::rig::{read_trail, Daemon, Scratch};
use crate::support::{evidence, hex, lab, live_keys, natural_stale_under_daemon};

const CHURN_PORT: u16 = 8080;
const BUSY_PORT: u16 = 9090;
const CHURN_PORTS: (u16, u16) = (20000, 27999);
const HELD_PORTS: [u16; 4] = [9000, 9001, 9002, 9003];
const PLANT_FROM: u16 = 10000;
const NATURAL_FROM: u16 = 28000;
/// Connections per second over both pods, unless `SMGC_SOAK_RATE` says otherwise (an
/// emulated CPU cannot keep up: scripts/kernel-check.sh runs the soak at a guest's rate).
fn rate() -> u32 {
    std::env::var("SMGC_SOAK_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(2200)
}
const PLANT_EVERY: Duration = Duration::from_millis(100);
const NATURAL_EVERY: Duration = Duration::from_millis(250);

fn sa(ip: impl Into<std::net::IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A stale key the lab made, and when.
struct Made {
    key: SockKey,
    natural: bool,
    at: Instant,
}

/// What the map watcher saw: when each stale key left, and live keys found missing.
#[derive(Default)]
struct Watch {
    gone_at: HashMap<SockKey, Instant>,
    live_missing: Vec<SockKey>,
    polls: usize,
}

/// Lowers the flags on drop, also when unwinding.
struct Lower<'a>([&'a AtomicBool; 2]);

impl Drop for Lower<'_> {
    fn drop(&mut self) {
        for flag in self.0 {
            flag.store(false, Ordering::Relaxed);
        }
    }
}

#[test]
fn soak_churn_30s() {
    soak("soak", Duration::from_secs(30));
}

/// The documented run: `SMGC_SOAK_SECS` seconds (default 300).
#[test]
#[ignore = "five minutes; run by hand, see docs/RELIABILITY.md"]
fn soak_churn_long() {
    let secs = std::env::var("SMGC_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    soak("soak-long", Duration::from_secs(secs));
}

fn soak(id: &str, duration: Duration) {
    let target_rate = rate();
    let scratch = Scratch::new(id);
    let lab = lab(id, 2);
    let churn_servers: Vec<_> = (0..2)
        .map(|p| {
            lab.start_server(p, CHURN_PORT, false)
                .expect("churn server")
        })
        .collect();
    let busy = lab.start_server(0, BUSY_PORT, true).expect("busy server");
    let held: Vec<_> = (0..2)
        .map(|p| {
            let mut opts = ClientOpts::to(churn_servers[p].addr());
            for port in HELD_PORTS {
                opts = opts.from_port(port);
            }
            lab.hold(&opts).expect("hold connections")
        })
        .collect();
    let live: HashSet<SockKey> = live_keys(&lab, &held.iter().collect::<Vec<_>>());
    let config = scratch.config(
        &lab.map_path(),
        "dry_run = false\ninterval_min = \"5s\"\ninterval_max = \"5s\"\nconfirm_after = \"200ms\"\npass_interval = \"1s\"",
    );
    let daemon = Daemon::start(&config);
    daemon.wait_more_sweeps(1, Duration::from_secs(20));

    let busy_addr = busy.addr();
    let made: Mutex<Vec<Made>> = Mutex::new(Vec::new());
    let watch: Mutex<Watch> = Mutex::new(Watch::default());
    let making = AtomicBool::new(true);
    let watching = AtomicBool::new(true);
    let started = Instant::now();
    // Stale key number n from `make(n)`, one each `every`, noted as made, until `making`
    // drops.
    let maker = |natural: bool, every: Duration, make: &(dyn Fn(u16) -> SockKey + Sync)| {
        let mut n = 0u16;
        while making.load(Ordering::Relaxed) {
            let key = make(n);
            made.lock().unwrap_or_else(|e| e.into_inner()).push(Made {
                key,
                natural,
                at: Instant::now(),
            });
            n += 1;
            std::thread::sleep(every);
        }
    };
    let reports: Vec<ChurnReport> = std::thread::scope(|s| {
        // A panic below must still end the helper threads, or the scope waits forever.
        let _lower = Lower([&making, &watching]);
        let churns: Vec<_> = churn_servers
            .iter()
            .map(|srv| {
                let mut opts = ChurnOpts::to(srv.addr(), target_rate / 2, duration, CHURN_PORTS);
                // Room for a starved CPU in a parallel test run: a live key deleted loses the
                // request's payload, and that request never completes, however long it waits.
                opts.timeout = Duration::from_secs(5);
                lab.churn(&opts).expect("start churn")
            })
            .collect();
        // Planted: the server end's key of a future connection from a port no one uses.
        s.spawn(|| {
            maker(false, PLANT_EVERY, &|n| {
                let pod = usize::from(n % 2);
                let key = SockKey::for_socket(
                    sa(lab.pod_ip(pod), CHURN_PORT),
                    sa(lab.node_ip(pod), PLANT_FROM + n),
                )
                .expect("v4");
                lab.plant(key).expect("plant");
                key
            })
        });
        // Natural: a client resets, the busy server keeps the fd. With kernel events the
        // daemon may delete it before this returns.
        s.spawn(|| {
            maker(true, NATURAL_EVERY, &|n| {
                natural_stale_under_daemon(&lab, busy_addr, sa(lab.node_ip(0), NATURAL_FROM + n))
            })
        });
        // The map every 100 ms: when each stale key left, and that no held key ever did.
        s.spawn(|| {
            while watching.load(Ordering::Relaxed) {
                let now: HashSet<SockKey> = lab.keys().unwrap_or_default().into_iter().collect();
                let stale: Vec<SockKey> = made
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|m| m.key)
                    .collect();
                let mut w = watch.lock().unwrap_or_else(|e| e.into_inner());
                w.polls += 1;
                for k in stale {
                    if !now.contains(&k) {
                        w.gone_at.entry(k).or_insert_with(Instant::now);
                    }
                }
                for k in &live {
                    if !now.contains(k) && !w.live_missing.contains(k) {
                        w.live_missing.push(*k);
                    }
                }
                drop(w);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let reports = churns
            .into_iter()
            .map(|c| c.wait().expect("churn report"))
            .collect();
        making.store(false, Ordering::Relaxed);
        // Two more sweeps after the last stale key was made (the watcher goes on), and the
        // passes between them. Counted in sweeps, not seconds: on a loaded machine one sweep
        // takes many seconds.
        daemon.wait_more_sweeps(2, Duration::from_secs(300));
        watching.store(false, Ordering::Relaxed);
        reports
    });
    let churned = started.elapsed();
    let swept = daemon.sweeps();
    let (status, _, log) = daemon.terminate();
    assert!(status.success(), "daemon exit {status}:\n{log}");

    let made = made.into_inner().unwrap_or_else(|e| e.into_inner());
    let watch = watch.into_inner().unwrap_or_else(|e| e.into_inner());
    let stale_hex: HashSet<String> = made.iter().map(|m| hex(&m.key)).collect();
    let trail = read_trail(&scratch.trail());
    let deleted: Vec<_> = trail.iter().filter(|t| t.outcome == "deleted").collect();
    let false_deletions: Vec<String> = deleted
        .iter()
        .filter(|t| !stale_hex.contains(&t.key))
        .map(|t| format!("{} ({})", t.key, t.reason))
        .collect();
    let left: Vec<String> = made
        .iter()
        .filter(|m| lab.contains(&m.key))
        .map(|m| m.key.to_string())
        .collect();
    let live_left = live.iter().filter(|k| lab.contains(k)).count();
    let latency: Vec<Duration> = made
        .iter()
        .filter_map(|m| watch.gone_at.get(&m.key).map(|g| g.duration_since(m.at)))
        .collect();
    let max_latency = latency.iter().max().copied().unwrap_or_default();
    let mean_latency = latency.iter().sum::<Duration>() / latency.len().max(1) as u32;
    let churn_ok: u64 = reports.iter().map(|r| r.ok).sum();
    let churn_failed: u64 = reports.iter().map(|r| r.failed).sum();
    let churn_elapsed = reports.iter().map(|r| r.elapsed).max().unwrap_or_default();
    let rate = churn_ok as f64 / churn_elapsed.as_secs_f64().max(1e-9);
    let outcomes = |o: &str| trail.iter().filter(|t| t.outcome == o).count();
    let natural = made.iter().filter(|m| m.natural).count();
    // Passes that delete log one line each, with their count.
    let by_passes: usize = log
        .lines()
        .filter(|l| l.contains("pass ok:"))
        .filter_map(|l| {
            l.split("deleted ")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    let took: Vec<f64> = log
        .lines()
        .filter(|l| crate::rig::is_summary(l))
        .filter_map(|l| l.split("; took ").nth(1)?.split('s').next()?.parse().ok())
        .collect();
    let took_mean = took.iter().sum::<f64>() / took.len().max(1) as f64;
    let took_max = took.iter().copied().fold(0.0, f64::max);
    evidence(&format!(
        "soak {id}: {:.0} s of churn ({:.0} s wall): {churn_ok} connections ({rate:.0}/s of {target_rate}/s asked; p99 {} µs, max {} µs), {churn_failed} failed; \
         {} stale keys made ({} planted, {natural} natural), {} sweeps ({} ok, {} held, {} error; each took mean {took_mean:.1} s, max {took_max:.1} s), \
         {} passes that deleted ({} by passes, {} by sweeps), \
         trail: {} deleted, {} already gone, {} spared, {} failed; false deletions {}; \
         stale keys left {}; live held keys {}/{} present (missing at some poll: {}); \
         stale key gone after mean {:.2} s, max {:.2} s ({} map polls)",
        duration.as_secs_f64(),
        churned.as_secs_f64(),
        reports.iter().map(|r| r.p99.as_micros()).max().unwrap_or(0),
        reports.iter().map(|r| r.max.as_micros()).max().unwrap_or(0),
        made.len(),
        made.len() - natural,
        swept,
        log.matches("sweep ok:").count(),
        log.matches("sweep held:").count(),
        log.matches("sweep failed:").count(),
        log.matches("pass ok:").count(),
        by_passes,
        deleted.len() - by_passes,
        deleted.len(),
        outcomes("already-gone"),
        outcomes("spared-holds-another-socket") + outcomes("spared-not-stale-now"),
        outcomes("failed"),
        false_deletions.len(),
        left.len(),
        live_left,
        live.len(),
        watch.live_missing.len(),
        mean_latency.as_secs_f64(),
        max_latency.as_secs_f64(),
        watch.polls,
    ));
    for r in &reports {
        assert!(r.failures.is_empty(), "failed requests: {:?}", r.failures);
    }
    assert_eq!(churn_failed, 0, "requests failed");
    assert_eq!(
        churn_ok,
        reports.iter().map(|r| r.attempted).sum::<u64>(),
        "every churned request got its reply"
    );
    assert!(
        false_deletions.is_empty(),
        "live keys deleted: {false_deletions:?}\n{log}"
    );
    assert!(
        watch.live_missing.is_empty(),
        "held keys went missing: {:?}",
        watch.live_missing
    );
    assert_eq!(live_left, live.len(), "held connections' keys deleted");
    assert!(
        left.is_empty(),
        "stale keys left after two more sweeps: {left:?}\n{log}"
    );
    assert!(
        !made.is_empty() && natural > 0,
        "the soak made no stale keys of both kinds"
    );
    // Each stale key deleted once; a sweep may still find gone the key a kernel event
    // deleted between its plan and its delete ("already-gone").
    let mut deletes: HashMap<&str, usize> = HashMap::new();
    for t in &deleted {
        *deletes.entry(t.key.as_str()).or_default() += 1;
    }
    assert!(
        deletes.values().all(|&n| n == 1),
        "a stale key was deleted twice: {deletes:?}"
    );
    let settled: HashSet<&str> = trail
        .iter()
        .filter(|t| t.outcome == "deleted" || t.outcome == "already-gone")
        .map(|t| t.key.as_str())
        .collect();
    assert_eq!(
        settled.len(),
        stale_hex.len(),
        "each stale key was deleted, or found gone, once"
    );
    assert!(
        log.matches("sweep ok:").count() * 2 >= swept,
        "most sweeps must run, not be held:\n{log}"
    );
    // The load itself: the rate asked for, unless the machine could not keep up (then the
    // figure above says so and the check is on the total).
    assert!(
        churn_ok >= u64::from(target_rate) * duration.as_secs() * 9 / 10,
        "only {churn_ok} connections churned"
    );
    for h in held {
        h.release().expect("graceful close");
    }
}
