//! Connection churn: a peer that opens, uses (one ping/pong) and closes many short
//! connections at a paced rate (`peer churn`), and the library side that starts it in a lab
//! and reads back its counts ([`Lab::churn`]). A share of the connections can end in a reset
//! instead (`--reset-share`): against a server that keeps reset sockets' fds, each leaves a
//! stale entry, and the next request from that port hangs while it lives (the hung-request
//! benchmark).
//!
//! Each connection binds a local port from a fixed range, cycled, so a test can keep the
//! tuples it plants stale keys for apart from every churned one: a churned request from a
//! port whose stale key was just planted would hang until swept, and count as a failure
//! that is the test's design, not the product's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::{
    format_duration, goodbye, open_and_ping, parse_duration, reset, say, watchdog, Failure,
};
use crate::peer::{PeerProc, Place};
use crate::Lab;

/// `peer churn`: many short connections, each connect, one ping/pong, `quit`, close.
#[derive(Debug, Clone, clap::Args)]
pub struct ChurnArgs {
    /// Server address.
    #[arg(long)]
    pub connect: SocketAddr,
    /// Connections started per second (paced; a worker that falls behind catches up).
    #[arg(long)]
    pub rate: u32,
    /// How long to churn.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Duration,
    /// Local ports to connect from, cycled: `LO-HI`.
    #[arg(long, value_parser = parse_port_range)]
    pub ports: (u16, u16),
    /// Connections in flight at once.
    #[arg(long, default_value_t = 16)]
    pub workers: usize,
    /// Bound for the handshake and for the reply.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Share of the connections (0 to 1, spread evenly over the ports) that end in a reset
    /// after their reply instead of the graceful close.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub reset_share: f64,
    /// Exit after this long whatever happens.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    pub max_life: Duration,
}

/// Parses a share from 0 to 1.
pub fn parse_share(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("'{text}' is not a share from 0 to 1")),
    }
}

/// Whether connection `i` ends in a reset: a hash of `i` against the share, so that the resets
/// fall on every port of a cycled range, not on a fixed few.
fn resets(i: u64, share: f64) -> bool {
    let h = i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    (h as f64) < share * (1u64 << 24) as f64
}

/// Parses `LO-HI` (inclusive, 0 < LO <= HI).
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("'{text}' is not a port range like 20000-27999");
    let (lo, hi) = text.split_once('-').ok_or_else(bad)?;
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// Failures printed one per line, at most this many (the count is always exact).
const FAILURES_SHOWN: usize = 50;

/// One churned connection: a request and its reply, then the graceful close (the server
/// closes first, so no client port sits in TIME_WAIT) or, with `reset`, a reset.
fn churn_one(
    port: u16,
    remote: SocketAddr,
    timeout: Duration,
    reset_it: bool,
) -> Result<(), Failure> {
    let (stream, _) = open_and_ping(Some(port), remote, timeout)?;
    if reset_it {
        reset(stream);
    } else {
        goodbye(stream);
    }
    Ok(())
}

fn describe(f: &Failure) -> String {
    match f {
        Failure::Refused => "refused".to_string(),
        Failure::ConnectTimeout => "connect-timeout".to_string(),
        Failure::NoReply { waited, .. } => format!("no-reply-after-{}us", waited.as_micros()),
        Failure::Other(m) => m.replace(' ', "_"),
    }
}

pub fn run_churn(args: &ChurnArgs) -> i32 {
    watchdog(args.max_life);
    let total = (u128::from(args.rate) * args.duration.as_millis() / 1000) as u64;
    let span = u64::from(args.ports.1 - args.ports.0) + 1;
    let rate = f64::from(args.rate.max(1));
    let next = AtomicU64::new(0);
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let hung = AtomicU64::new(0);
    let reset_count = AtomicU64::new(0);
    let shown = AtomicUsize::new(0);
    let start = Instant::now();
    let latencies: Vec<Vec<u32>> = thread::scope(|s| {
        let workers: Vec<_> = (0..args.workers.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total {
                            return lat;
                        }
                        let due = start + Duration::from_secs_f64(i as f64 / rate);
                        let now = Instant::now();
                        if due > now {
                            thread::sleep(due - now);
                        }
                        let port = args.ports.0 + (i % span) as u16;
                        let began = Instant::now();
                        let reset_it = resets(i, args.reset_share);
                        match churn_one(port, args.connect, args.timeout, reset_it) {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if reset_it {
                                    reset_count.fetch_add(1, Ordering::Relaxed);
                                }
                                let us = began.elapsed().as_micros();
                                lat.push(u32::try_from(us).unwrap_or(u32::MAX));
                            }
                            Err(f) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                if matches!(f, Failure::NoReply { .. }) {
                                    hung.fetch_add(1, Ordering::Relaxed);
                                }
                                if shown.fetch_add(1, Ordering::Relaxed) < FAILURES_SHOWN {
                                    say(&format!(
                                        "fail i={i} local_port={port} why={}",
                                        describe(&f)
                                    ));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let elapsed = start.elapsed();
    let mut all: Vec<u32> = latencies.into_iter().flatten().collect();
    all.sort_unstable();
    let pct = |p: f64| -> u32 {
        let at = ((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1));
        all.get(at).copied().unwrap_or(0)
    };
    let failed = failed.load(Ordering::Relaxed);
    say(&format!(
        "churn attempted={total} ok={} failed={failed} hung={} resets={} elapsed_us={} p50_us={} p99_us={} max_us={}",
        ok.load(Ordering::Relaxed),
        hung.load(Ordering::Relaxed),
        reset_count.load(Ordering::Relaxed),
        elapsed.as_micros(),
        pct(0.5),
        pct(0.99),
        all.last().copied().unwrap_or(0)
    ));
    if failed == 0 {
        super::exit::OK
    } else {
        super::exit::ERROR
    }
}

/// What a churn run should do; see [`ChurnArgs`].
#[derive(Debug, Clone)]
pub struct ChurnOpts {
    pub target: SocketAddr,
    pub rate: u32,
    pub duration: Duration,
    pub ports: (u16, u16),
    pub workers: usize,
    pub timeout: Duration,
    /// Share of connections reset after their reply (see [`ChurnArgs::reset_share`]).
    pub reset_share: f64,
    pub place: Place,
}

impl ChurnOpts {
    pub fn to(target: SocketAddr, rate: u32, duration: Duration, ports: (u16, u16)) -> ChurnOpts {
        ChurnOpts {
            target,
            rate,
            duration,
            ports,
            workers: 16,
            timeout: Duration::from_secs(2),
            reset_share: 0.0,
            place: Place::Node,
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "peer".into(),
            "churn".into(),
            "--connect".into(),
            self.target.to_string(),
            "--rate".into(),
            self.rate.to_string(),
            "--duration".into(),
            format_duration(self.duration),
            "--ports".into(),
            format!("{}-{}", self.ports.0, self.ports.1),
            "--workers".into(),
            self.workers.to_string(),
            "--timeout".into(),
            format_duration(self.timeout),
            "--reset-share".into(),
            self.reset_share.to_string(),
        ]
    }
}

/// A churn peer at work; [`Churn::wait`] collects its counts.
pub struct Churn {
    proc: PeerProc,
    duration: Duration,
    timeout: Duration,
}

/// What a churn run reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChurnReport {
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    /// Failures that were hangs: connected, no reply within the timeout.
    pub hung: u64,
    /// Connections that ended in a reset after their reply.
    pub resets: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// The first failures, one line each (`fail i=N local_port=P why=...`).
    pub failures: Vec<String>,
}

impl ChurnReport {
    /// Connections that got their reply, per second of the run.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Reads the peer's output: `fail ...` lines and the final `churn ...` line.
    pub fn parse(lines: &[String]) -> Result<ChurnReport> {
        let last = lines
            .iter()
            .rev()
            .find(|l| l.starts_with("churn "))
            .ok_or_else(|| anyhow!("churn peer printed no summary: {lines:?}"))?;
        let field = |name: &str| -> Result<u64> {
            last.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow!("churn summary lacks {name}=: {last:?}"))
        };
        Ok(ChurnReport {
            attempted: field("attempted")?,
            ok: field("ok")?,
            failed: field("failed")?,
            hung: field("hung")?,
            resets: field("resets")?,
            elapsed: Duration::from_micros(field("elapsed_us")?),
            p50: Duration::from_micros(field("p50_us")?),
            p99: Duration::from_micros(field("p99_us")?),
            max: Duration::from_micros(field("max_us")?),
            failures: lines
                .iter()
                .filter(|l| l.starts_with("fail "))
                .cloned()
                .collect(),
        })
    }
}

impl Churn {
    /// Waits for the run to end (its duration plus a bounded drain) and reads its counts.
    pub fn wait(self) -> Result<ChurnReport> {
        let bound = self.duration + self.timeout * 4 + Duration::from_secs(10);
        let (code, lines) = self.proc.finish(bound)?;
        let report = ChurnReport::parse(&lines)?;
        if code != super::exit::OK && report.failed == 0 {
            bail!("churn peer exited {code}: {lines:?}");
        }
        Ok(report)
    }
}

impl Lab {
    /// Starts a churn peer (in the lab cgroup, so sock_ops files both ends of every churned
    /// connection); it runs for `opts.duration` on its own.
    pub fn churn(&self, opts: &ChurnOpts) -> Result<Churn> {
        let proc = self.spawn(opts.place, &opts.args())?;
        Ok(Churn {
            proc,
            duration: opts.duration,
            timeout: opts.timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_port_range("20000-27999"), Ok((20000, 27999)));
        assert_eq!(parse_port_range("5-5"), Ok((5, 5)));
        for bad in ["", "1", "0-5", "9-8", "a-b", "1-70000"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resets_take_their_share_spread_over_the_ports() {
        let n = 100_000u64;
        let count = (0..n).filter(|&i| resets(i, 0.1)).count() as f64;
        assert!((count / n as f64 - 0.1).abs() < 0.005, "{count}");
        assert_eq!((0..n).filter(|&i| resets(i, 0.0)).count(), 0);
        assert_eq!((0..n).filter(|&i| resets(i, 1.0)).count() as u64, n);
        // Over a cycled range of 200 ports, resets land on most ports, not a fixed few.
        let ports: std::collections::HashSet<u64> = (0..20_000u64)
            .filter(|&i| resets(i, 0.1))
            .map(|i| i % 200)
            .collect();
        assert!(ports.len() > 190, "{}", ports.len());
        assert!(parse_share("0.05").is_ok());
        assert!(parse_share("1.5").is_err());
    }

    #[test]
    fn reports_parse() {
        let lines: Vec<String> = [
            "fail i=7 local_port=20007 why=no-reply-after-2000000us",
            "churn attempted=10 ok=9 failed=1 hung=1 resets=2 elapsed_us=1000000 p50_us=300 p99_us=900 max_us=2000000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let r = ChurnReport::parse(&lines).expect("parses");
        assert_eq!((r.attempted, r.ok, r.failed), (10, 9, 1));
        assert_eq!((r.hung, r.resets), (1, 2));
        assert_eq!(r.failures.len(), 1);
        assert!((r.rate() - 9.0).abs() < 1e-9);
        assert!(ChurnReport::parse(&lines[..1]).is_err());
    }
}
