//! The metrics listener under a connection flood (loopback only): thousands of idle,
//! half-sent requests cost the daemon little memory, and `/metrics` answers again once they
//! are gone. In Kubernetes the listener is on the pod IP, under a 64 MiB memory limit.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sockmap_gc_lab::sys;

use crate::daemon::{try_scrape, write_config, Daemon, EACH_SECOND};
use crate::rig::lab_and_scratch;
use crate::support::evidence;

/// Connections of the flood, opened by this many threads.
const FLOOD: usize = 3000;
const FLOOD_THREADS: usize = 30;
/// A connect that the full accept queue leaves unanswered gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(100);
/// Opening the flood may take this long at most (connects the full queue leaves unanswered
/// time out).
const OPEN_BOUND: Duration = Duration::from_secs(30);
/// The flood is held this long once opened: longer than the listener's header timeout.
const HOLD: Duration = Duration::from_secs(5);
/// What the flood may cost at most: the pod's limit is 64 MiB.
const RSS_LIMIT_KIB: u64 = 20 * 1024;

/// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// Whether `GET /metrics` gets a 200 within a few seconds.
fn answers(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .is_ok_and(|stream| try_scrape(stream).is_ok())
}

/// Opens up to `n` connections to `addr`, each sending a request head without its end, and
/// holds them until `done`; returns how many connected. Counts itself in `opened` once its
/// connections are open.
fn flood(addr: SocketAddr, n: usize, opened: &AtomicUsize, done: &AtomicBool) -> usize {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: flood\r\n");
            held.push(s);
        }
    }
    opened.fetch_add(1, Ordering::SeqCst);
    sys::wait_until(OPEN_BOUND + HOLD, || done.load(Ordering::SeqCst));
    held.len()
}

#[test]
fn a_connection_flood_costs_the_daemon_little_memory_and_metrics_answer_after_it() {
    let (scratch, lab) = lab_and_scratch("lst-flood");
    let config = write_config(&scratch, &lab, EACH_SECOND);
    let daemon = Daemon::start(&config);
    let addr = daemon.metrics_addr();
    assert!(addr.ip().is_loopback(), "{addr}");
    assert!(answers(addr), "no metrics before the flood");
    let pid = daemon.pid();
    let before = status_kib(pid, "VmRSS");

    let started = Instant::now();
    let opened = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let mut peak = before;
    let mut sample = || peak = peak.max(status_kib(pid, "VmRSS"));
    let connected: usize = std::thread::scope(|s| {
        let floods: Vec<_> = (0..FLOOD_THREADS)
            .map(|_| s.spawn(|| flood(addr, FLOOD / FLOOD_THREADS, &opened, &done)))
            .collect();
        // The daemon's RSS, sampled while the flood opens and then for HOLD.
        sys::wait_until(OPEN_BOUND, || {
            sample();
            opened.load(Ordering::SeqCst) == FLOOD_THREADS
        });
        let open = Instant::now();
        while open.elapsed() < HOLD {
            sample();
            std::thread::sleep(Duration::from_millis(50));
        }
        done.store(true, Ordering::SeqCst);
        floods
            .into_iter()
            .map(|f| f.join().expect("flood thread"))
            .sum()
    });
    let flooded = started.elapsed();
    let peak = peak.max(status_kib(pid, "VmHWM"));

    // The flood is closed: the queue drains and the scrape answers.
    let closed = Instant::now();
    let back = sys::wait_until(Duration::from_secs(20), || answers(addr));
    evidence(&format!(
        "metrics flood: {connected} of {FLOOD} connections opened, held {:.1} s; daemon RSS \
         {before} KiB before, peak {peak} KiB (VmHWM); /metrics answered {:.1} s after the \
         flood closed",
        flooded.as_secs_f64(),
        closed.elapsed().as_secs_f64()
    ));
    // The listener takes a few; the kernel queues the listen backlog's worth and refuses the
    // rest.
    assert!(connected >= 100, "only {connected} connections: no flood");
    assert!(
        back,
        "/metrics does not answer after the flood:\n{}",
        daemon.log()
    );
    assert!(
        peak < RSS_LIMIT_KIB,
        "the flood took the daemon to {peak} KiB (limit {RSS_LIMIT_KIB} KiB):\n{}",
        daemon.log()
    );
    daemon.stop_promptly();
}
