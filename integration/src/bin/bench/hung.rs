//! The hung-request benchmark (`sockmap-gc-bench --hung`): how many requests hang, and how long
//! stale entries live, under the incident's load with no collector, with the daemon's full
//! sweeps only, and with the shipped config.
//!
//! The incident's leaky app runs in a pod: a server that keeps the fd of every connection its
//! client resets, so each reset leaves a stale entry. Node-side clients connect from a small
//! fixed port range, cycled as the kernel's port allocator cycles its range at high connection
//! rates, so a tuple comes back every few seconds; each sends one request and waits for the
//! reply up to a bound, and a share reset instead of closing. A request from a port whose stale
//! entry still lives hangs (its payload goes to the dead socket). A watcher reads the socket
//! behind every entry through the product's iterator every few milliseconds: a stale entry is
//! born when its held socket is first seen closed, and dies when that socket leaves the map.
//! Where the daemon deletes an entry on its socket's close event (often before the next read),
//! the lifetime is the daemon's own close-to-delete time from its journal.
//!
//! The daemon runs the shipped config (config/sockmap-gc.toml, built in) with `dry_run =
//! false`; "full sweeps only" also turns the continuous pass off (`pass_interval = "0s"`) when
//! the shipped config has that key.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sockmap_gc::identity::IdentityReader;
use sockmap_gc::key::{parse_hex, RawKey};
use sockmap_gc::map::{Access, SockMap};
use sockmap_gc::socket::TcpState;
use sockmap_gc_lab::peer::child::churn::{ChurnOpts, ChurnReport};
use sockmap_gc_lab::{interrupt, sys, Lab, LabConfig};

use crate::daemon::{self, DaemonProc, SHIPPED};
use crate::num;
const SERVER_PORT: u16 = 8080;

/// The load and how it is watched.
#[derive(Debug, Clone)]
pub struct Load {
    /// How long each collector's run lasts.
    pub duration: Duration,
    /// Requests started per second.
    pub rate: u32,
    /// Node-side client ports, cycled (inside the lab's reserved 40000-49999).
    pub ports: (u16, u16),
    /// Share of requests that reset after their reply.
    pub reset_share: f64,
    /// How long a request waits for its reply before it counts as hung.
    pub timeout: Duration,
    /// How often the watcher reads the map.
    pub poll: Duration,
}

impl Load {
    /// Seconds between two uses of one client port.
    pub fn reuse_secs(&self) -> f64 {
        f64::from(self.ports.1 - self.ports.0 + 1) / f64::from(self.rate.max(1))
    }
}

/// What collects the stale entries during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collector {
    /// No collector: the incident.
    None,
    /// The daemon with the continuous pass off: full sweeps only.
    FullSweeps,
    /// The daemon with the shipped config, deleting.
    Shipped,
}

impl Collector {
    pub const ALL: [Collector; 3] = [Collector::None, Collector::FullSweeps, Collector::Shipped];

    pub fn label(self) -> &'static str {
        match self {
            Collector::None => "none",
            Collector::FullSweeps => "full-sweeps",
            Collector::Shipped => "shipped",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Collector::None => "(a) no collector",
            Collector::FullSweeps => "(b) daemon, full sweeps only",
            Collector::Shipped => "(c) daemon, shipped config, dry_run = false",
        }
    }
}

/// How long the stale entries of one run lived.
#[derive(Debug, Clone, Default)]
pub struct Lifetimes {
    /// Stale entries that left the map during the run: how long each lived.
    pub ended: Vec<Duration>,
    /// Stale entries still in the map at the end: how long each had lived by then.
    pub left: Vec<Duration>,
}

/// A percentile of the lifetimes, counting the entries left at the end at their age then: a
/// lower bound (`at_least`) when one of those could in truth lie above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantile {
    pub secs: f64,
    pub at_least: bool,
}

impl Lifetimes {
    pub fn count(&self) -> usize {
        self.ended.len() + self.left.len()
    }

    pub fn quantile(&self, q: f64) -> Option<Quantile> {
        let mut all: Vec<f64> = self
            .ended
            .iter()
            .chain(&self.left)
            .map(Duration::as_secs_f64)
            .collect();
        if all.is_empty() {
            return None;
        }
        all.sort_by(f64::total_cmp);
        let rank = ((all.len() as f64 * q).ceil() as usize).clamp(1, all.len()) - 1;
        let secs = all[rank];
        let at_least =
            self.left.iter().any(|d| d.as_secs_f64() < secs) || (q >= 1.0 && !self.left.is_empty());
        Some(Quantile { secs, at_least })
    }
}

/// The daemon's cost over a run.
#[derive(Debug, Clone, Copy)]
pub struct DaemonCost {
    /// utime + stime over the load window.
    pub cpu: Duration,
    pub window: Duration,
    /// VmHWM at the end.
    pub peak_rss_kib: u64,
    /// Deletions in its trail.
    pub deleted: usize,
}

impl DaemonCost {
    pub fn cpu_share(&self) -> f64 {
        self.cpu.as_secs_f64() / self.window.as_secs_f64().max(1e-9)
    }
}

/// One collector's run.
pub struct Run {
    pub collector: Collector,
    pub churn: ChurnReport,
    pub lifetimes: Lifetimes,
    pub daemon: Option<DaemonCost>,
}

/// Runs the same load once per collector, each on a fresh server, in one lab.
pub fn bench(id: &str, load: &Load, product: &Path, peer_bin: &Path) -> Result<Vec<Run>> {
    let mut config = LabConfig::new(id, 1, peer_bin);
    config.peer_max_life = load.duration * 4 + Duration::from_secs(600);
    let lab = Lab::with_config(config)?;
    let scratch = std::env::temp_dir().join(format!("smgc-bench-hung-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let runs = Collector::ALL
        .iter()
        .map(|&c| run_one(&lab, c, load, product, &scratch))
        .collect();
    let _ = std::fs::remove_dir_all(&scratch);
    runs
}

fn run_one(
    lab: &Lab,
    collector: Collector,
    load: &Load,
    product: &Path,
    scratch: &Path,
) -> Result<Run> {
    interrupt::check()?;
    println!(
        "\n== {}: {} s, {} requests/s from ports {}-{} (each back every {:.1} s), {:.0}% reset ==",
        collector.describe(),
        load.duration.as_secs(),
        load.rate,
        load.ports.0,
        load.ports.1,
        load.reuse_secs(),
        load.reset_share * 100.0
    );
    // A fresh leaky server: the previous run's kept sockets, and their entries, went with its
    // predecessor.
    let server = lab.start_server(0, SERVER_PORT, true)?;
    let label = collector.label();
    let trail = scratch.join(format!("{label}-trail.jsonl"));
    let daemon = match collector {
        Collector::None => None,
        _ => Some(DaemonProc::start(
            product,
            &daemon_config(SHIPPED, collector, &lab.map_path(), &trail),
            scratch,
            label,
            &[],
        )?),
    };
    let stop = AtomicBool::new(false);
    let map_path = lab.map_path();
    let (churn, watched, cpu) = thread::scope(|s| -> Result<_> {
        let watcher = s.spawn(|| watch(&map_path, load.poll, &stop));
        let before = daemon.as_ref().map(DaemonProc::cpu).transpose()?;
        let started = Instant::now();
        let mut opts = ChurnOpts::to(server.addr(), load.rate, load.duration, load.ports);
        opts.timeout = load.timeout;
        opts.reset_share = load.reset_share;
        // Hung requests hold a worker for the whole timeout.
        opts.workers =
            (f64::from(load.rate) * load.timeout.as_secs_f64() * 2.0).ceil() as usize + 8;
        let churn = lab.churn(&opts).and_then(|c| c.wait());
        let window = started.elapsed();
        let after = daemon.as_ref().map(DaemonProc::cpu).transpose()?;
        stop.store(true, Ordering::Relaxed);
        let watched = watcher
            .join()
            .map_err(|_| anyhow::anyhow!("the watcher panicked"))??;
        let cpu = before
            .zip(after)
            .map(|(b, a)| (a.saturating_sub(b), window));
        Ok((churn?, watched, cpu))
    })?;
    let (daemon, events) = match (daemon, cpu) {
        (Some(d), Some((cpu, window))) => {
            let (cost, log) = finish(d, &trail, cpu, window)?;
            (Some(cost), event_deletions(&log))
        }
        _ => (None, Vec::new()),
    };
    let lifetimes = lifetimes(watched, &events);
    server.stop()?;
    // The kept sockets close with the server: their entries leave the map.
    if !sys::wait_until(Duration::from_secs(10), || lab.raw_keys().is_empty()) {
        bail!(
            "{} entries left after the server stopped",
            lab.raw_keys().len()
        );
    }
    let run = Run {
        collector,
        churn,
        lifetimes,
        daemon,
    };
    println!("   {}", one_line(&run));
    Ok(run)
}

/// A stale entry: its key and the cookie of the closed socket it holds.
type Stale = (RawKey, u64);

/// What the watcher saw: stale entries that left, with how long each was seen, and the ones
/// still there at the end.
#[derive(Debug, Default)]
struct Watched {
    ended: Vec<(Stale, Duration)>,
    left: Vec<Duration>,
}

/// Reads the map every `poll` until `stop`: when each stale entry (a held socket seen closed)
/// was first seen, and when it left.
fn watch(map_path: &Path, poll: Duration, stop: &AtomicBool) -> Result<Watched> {
    let map = SockMap::open(map_path, Access::ReadOnly)?;
    let mut reader = IdentityReader::new().context("loading the identity iterator")?;
    // (key, cookie of the closed socket) -> first seen.
    let mut alive: HashMap<Stale, Instant> = HashMap::new();
    let mut out = Watched::default();
    while !stop.load(Ordering::Relaxed) {
        let at = Instant::now();
        let ids = reader.read(&map)?;
        let seen: Vec<Stale> = ids
            .entries
            .iter()
            .filter(|(_, h)| h.state == TcpState::Close)
            .map(|(k, h)| (*k, h.cookie))
            .collect();
        for s in &seen {
            alive.entry(*s).or_insert(at);
        }
        alive.retain(|s, born| {
            let here = seen.contains(s);
            if !here {
                out.ended.push((*s, at.saturating_duration_since(*born)));
            }
            here
        });
        thread::sleep(poll.saturating_sub(at.elapsed()));
    }
    let end = Instant::now();
    out.left = alive.values().map(|born| end - *born).collect();
    Ok(out)
}

/// The entries the daemon deleted on kernel events, from its journal: the key, the closed
/// socket's cookie and the time from its close to the delete.
fn event_deletions(log: &str) -> Vec<(Stale, Duration)> {
    log.lines()
        .filter(|l| l.contains("deleted stale entry (kernel event)"))
        .filter_map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            };
            let key = parse_hex(field("key")?).ok()?;
            let cookie = field("cookie")?.parse().ok()?;
            let us = field("since_event_us")?.parse().ok()?;
            Some(((key, cookie), Duration::from_micros(us)))
        })
        .collect()
}

/// The lifetimes of a run: what the watcher saw, where an entry the daemon deleted on its
/// socket's close event takes the daemon's close-to-delete time instead (exact, and most such
/// entries are gone before the watcher's next read).
fn lifetimes(watched: Watched, events: &[(Stale, Duration)]) -> Lifetimes {
    let mut by_event: HashMap<Stale, Duration> = events.iter().copied().collect();
    let mut ended: Vec<Duration> = watched
        .ended
        .into_iter()
        .map(|(s, seen)| by_event.remove(&s).unwrap_or(seen))
        .collect();
    ended.extend(by_event.into_values());
    Lifetimes {
        ended,
        left: watched.left,
    }
}

/// The shipped config with the lab's map, a scratch trail, no metrics listener, deleting; the
/// continuous pass off for [`Collector::FullSweeps`] when the config has that key.
pub fn daemon_config(shipped: &str, collector: Collector, map: &Path, trail: &Path) -> String {
    let mut set: Vec<(&str, String)> = vec![
        ("map", format!("\"{}\"", map.display())),
        ("trail", format!("\"{}\"", trail.display())),
        ("metrics_listen", "\"\"".to_string()),
        ("dry_run", "false".to_string()),
    ];
    if collector == Collector::FullSweeps && daemon::has_key(shipped, "pass_interval") {
        set.push(("pass_interval", "\"0s\"".to_string()));
    }
    daemon::with_keys(shipped, &set)
}

/// Its peak RSS, its deletions (from its trail), then SIGTERM and the exit; with its journal.
fn finish(
    d: DaemonProc,
    trail: &Path,
    cpu: Duration,
    window: Duration,
) -> Result<(DaemonCost, String)> {
    let peak_rss_kib = d.status_kib("VmHWM")?;
    let log = d.stop()?;
    if log.contains("sweep failed") || log.contains("pass failed") {
        bail!("the daemon failed during the run:\n{log}");
    }
    let deleted = std::fs::read_to_string(trail)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"outcome\":\"deleted\""))
        .count();
    Ok((
        DaemonCost {
            cpu,
            window,
            peak_rss_kib,
            deleted,
        },
        log,
    ))
}

fn fmt_quantile(q: Option<Quantile>) -> String {
    match q {
        None => "-".to_string(),
        Some(Quantile { secs, at_least }) => {
            format!("{}{secs:.2} s", if at_least { "≥ " } else { "" })
        }
    }
}

fn one_line(r: &Run) -> String {
    let l = &r.lifetimes;
    let mut line = format!(
        "{} requests, {} hung, {} other failures, {} resets; {} stale entries ({} deleted or gone, {} left): lifetime median {}, p99 {}, max {}",
        r.churn.attempted,
        r.churn.hung,
        r.churn.failed - r.churn.hung,
        r.churn.resets,
        l.count(),
        l.ended.len(),
        l.left.len(),
        fmt_quantile(l.quantile(0.5)),
        fmt_quantile(l.quantile(0.99)),
        fmt_quantile(l.quantile(1.0)),
    );
    if let Some(d) = &r.daemon {
        let _ = write!(
            line,
            "; daemon {:.2} s CPU ({:.2}% of one core), peak RSS {:.1} MiB, {} deleted",
            d.cpu.as_secs_f64(),
            d.cpu_share() * 100.0,
            d.peak_rss_kib as f64 / 1024.0,
            d.deleted
        );
    }
    line
}

/// The hung-request table.
pub fn markdown(load: &Load, runs: &[Run]) -> String {
    let base = runs
        .iter()
        .find(|r| r.collector == Collector::None)
        .map(|r| r.churn.hung);
    let mut out = table_head(
        "collector | requests | hung | hung vs (a) | stale entries | lifetime median | p99 | max | left at end | daemon CPU | of one core | peak RSS",
        1,
    );
    for r in runs {
        let l = &r.lifetimes;
        let vs = match base {
            Some(b) if b > 0 => format!("{:.1}%", r.churn.hung as f64 * 100.0 / b as f64),
            _ => "-".to_string(),
        };
        let (cpu, share, rss) = match &r.daemon {
            Some(d) => (
                format!("{:.2} s", d.cpu.as_secs_f64()),
                format!("{:.2}%", d.cpu_share() * 100.0),
                format!("{:.1} MiB", d.peak_rss_kib as f64 / 1024.0),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {vs} | {} | {} | {} | {} | {} | {cpu} | {share} | {rss} |",
            r.collector.describe(),
            r.churn.attempted,
            r.churn.hung,
            l.count(),
            fmt_quantile(l.quantile(0.5)),
            fmt_quantile(l.quantile(0.99)),
            fmt_quantile(l.quantile(1.0)),
            l.left.len(),
        );
    }
    let _ = write!(
        out,
        "{} s per collector; {} requests/s from {} node ports (each back every {:.1} s), {:.0}% reset after the reply; a request hangs after {:.1} s without its reply; lifetimes from a map read every {} ms, or, for entries deleted on their socket's close event, the daemon's close-to-delete time",
        load.duration.as_secs(),
        load.rate,
        load.ports.1 - load.ports.0 + 1,
        load.reuse_secs(),
        load.reset_share * 100.0,
        load.timeout.as_secs_f64(),
        load.poll.as_millis()
    );
    out
}

/// A Markdown table's head: the header row of `columns` (the row as it reads between its outer
/// bars), then the alignment row: the first `text` columns left-aligned, the figures after them
/// right-aligned.
pub(crate) fn table_head(columns: &str, text: usize) -> String {
    let n = columns.split(" | ").count();
    let align: Vec<&str> = (0..n)
        .map(|i| if i < text { "---" } else { "---:" })
        .collect();
    format!("| {columns} |\n| {} |\n", align.join(" | "))
}

fn quantile_json(q: Option<Quantile>) -> String {
    match q {
        None => "null".to_string(),
        Some(q) => format!(
            "{{\"secs\": {}, \"at_least\": {}}}",
            num(q.secs),
            q.at_least
        ),
    }
}

/// The figures as JSON (for integration/scripts/plot_bench.py).
pub fn json(machine: &str, load: &Load, runs: &[Run]) -> String {
    let mut out = format!(
        "{{\n  \"machine\": \"{machine}\",\n  \"hung\": {{\"seconds\": {}, \"rate\": {}, \"ports\": {}, \"reuse_seconds\": {}, \"reset_share\": {}, \"timeout_seconds\": {}, \"poll_ms\": {},\n  \"runs\": [",
        load.duration.as_secs(),
        load.rate,
        load.ports.1 - load.ports.0 + 1,
        num(load.reuse_secs()),
        num(load.reset_share),
        num(load.timeout.as_secs_f64()),
        load.poll.as_millis()
    );
    for (i, r) in runs.iter().enumerate() {
        let l = &r.lifetimes;
        let mut lifetimes: Vec<f64> = l.ended.iter().map(Duration::as_secs_f64).collect();
        lifetimes.sort_by(f64::total_cmp);
        let daemon = match &r.daemon {
            Some(d) => format!(
                "{{\"cpu_seconds\": {}, \"window_seconds\": {}, \"cpu_share\": {}, \"peak_rss_kib\": {}, \"deleted\": {}}}",
                num(d.cpu.as_secs_f64()),
                num(d.window.as_secs_f64()),
                num(d.cpu_share()),
                d.peak_rss_kib,
                d.deleted
            ),
            None => "null".to_string(),
        };
        let _ = write!(
            out,
            "{}\n    {{\"collector\": \"{}\", \"requests\": {}, \"ok\": {}, \"hung\": {}, \"other_failures\": {}, \"resets\": {}, \"stale_entries\": {}, \"left_at_end\": {}, \"lifetime_median\": {}, \"lifetime_p99\": {}, \"lifetime_max\": {}, \"daemon\": {daemon},\n     \"lifetimes_ended\": [{}]}}",
            if i == 0 { "" } else { "," },
            r.collector.label(),
            r.churn.attempted,
            r.churn.ok,
            r.churn.hung,
            r.churn.failed - r.churn.hung,
            r.churn.resets,
            l.count(),
            l.left.len(),
            quantile_json(l.quantile(0.5)),
            quantile_json(l.quantile(0.99)),
            quantile_json(l.quantile(1.0)),
            lifetimes
                .iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    out.push_str("\n  ]}\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn event_deletions_take_the_daemon_s_time_and_add_what_the_watcher_missed() {
        let key = |b: u8| RawKey([b; 44]);
        let line = |k: u8, cookie: u64, us: u64| {
            format!(
                "2026-11-30T12:00:00Z  INFO sockmap_gc::react: deleted stale entry (kernel event) key={} entry=ipv4 local 10.0.0.1:80 remote 10.0.0.2:4000 reason=held-closed cookie={cookie} since_event_us={us}",
                key(k).to_hex()
            )
        };
        let log = [
            line(1, 7, 1500),
            line(2, 8, 900),
            "INFO sockmap_gc::pass: deleted stale entry key=03".to_string(),
            "deleted stale entry (kernel event) key=zz cookie=1 since_event_us=1".to_string(),
        ]
        .join("\n");
        let events = event_deletions(&log);
        assert_eq!(
            events,
            [
                ((key(1), 7), MS(1) + Duration::from_micros(500)),
                ((key(2), 8), Duration::from_micros(900))
            ]
        );
        // (watched, expected ended lifetimes, sorted)
        type Case = (Vec<(Stale, Duration)>, Vec<Duration>);
        let cases: [Case; 3] = [
            // Seen by the watcher: the daemon's exact time replaces the watcher's.
            (
                vec![((key(1), 7), MS(20)), ((key(2), 8), MS(40))],
                vec![Duration::from_micros(900), Duration::from_micros(1500)],
            ),
            // Gone before the watcher's first read: added.
            (
                vec![],
                vec![Duration::from_micros(900), Duration::from_micros(1500)],
            ),
            // Another socket under the same key (reused tuple) is the watcher's own.
            (
                vec![((key(1), 9), MS(700))],
                vec![
                    Duration::from_micros(900),
                    Duration::from_micros(1500),
                    MS(700),
                ],
            ),
        ];
        for (ended, expected) in cases {
            let mut got = lifetimes(
                Watched {
                    ended,
                    left: vec![MS(3)],
                },
                &events,
            );
            got.ended.sort();
            assert_eq!(got.ended, expected);
            assert_eq!(got.left, [MS(3)]);
        }
    }

    #[test]
    fn table_head_writes_the_header_and_the_alignment_row() {
        assert_eq!(
            table_head("collector | requests | hung", 1),
            "| collector | requests | hung |\n| --- | ---: | ---: |\n"
        );
        assert_eq!(
            table_head("entries | stale", 0),
            "| entries | stale |\n| ---: | ---: |\n"
        );
    }

    #[test]
    fn the_daemon_config_is_the_shipped_one_deleting_on_the_labs_map() {
        let map = Path::new("/sys/fs/bpf/smgc-x/cilium_sock_ops");
        let trail = Path::new("/tmp/t.jsonl");
        let text = daemon_config(SHIPPED, Collector::Shipped, map, trail);
        let value: toml::Table = text.parse().expect("TOML");
        assert_eq!(value["dry_run"].as_bool(), Some(false));
        assert_eq!(value["map"].as_str(), Some(map.to_str().unwrap()));
        assert_eq!(value["trail"].as_str(), Some("/tmp/t.jsonl"));
        assert_eq!(value["metrics_listen"].as_str(), Some(""));
        let shipped: toml::Table = SHIPPED.parse().expect("TOML");
        for (k, v) in &shipped {
            if !["dry_run", "map", "trail", "metrics_listen"].contains(&k.as_str()) {
                assert_eq!(&value[k], v, "{k} as shipped");
            }
        }
        // Full sweeps only: the continuous pass off, where the config has the key.
        let full = daemon_config(SHIPPED, Collector::FullSweeps, map, trail);
        let value: toml::Table = full.parse().expect("TOML");
        assert_eq!(value["pass_interval"].as_str(), Some("0s"));
        let without: String = SHIPPED
            .lines()
            .filter(|l| !l.starts_with("pass_interval"))
            .map(|l| format!("{l}\n"))
            .collect();
        let full = daemon_config(&without, Collector::FullSweeps, map, trail);
        let value: toml::Table = full.parse().expect("TOML");
        assert!(value.get("pass_interval").is_none());
        // Absent keys are added; comments mentioning a key are left alone.
        let text = daemon_config("# dry_run = true\n", Collector::Shipped, map, trail);
        assert!(text.starts_with("# dry_run = true\n"));
        assert!(text.contains("\ndry_run = false\n"));
    }

    #[test]
    fn quantiles_are_lower_bounds_when_an_entry_left_at_the_end_could_lie_above() {
        let done = Lifetimes {
            ended: vec![MS(1000), MS(1500), MS(2000), MS(1200)],
            left: vec![],
        };
        assert_eq!(
            done.quantile(0.5),
            Some(Quantile {
                secs: 1.2,
                at_least: false
            })
        );
        assert_eq!(done.quantile(1.0).map(|q| q.secs), Some(2.0));
        // An entry still there at 0.1 s may live longer than the median: a lower bound.
        let young = Lifetimes {
            ended: done.ended.clone(),
            left: vec![MS(100)],
        };
        assert!(young.quantile(0.5).expect("some").at_least);
        // One still there at 5 s is above the median whatever it becomes; not above the max.
        let old = Lifetimes {
            ended: done.ended.clone(),
            left: vec![MS(5000)],
        };
        assert!(!old.quantile(0.5).expect("some").at_least);
        assert!(old.quantile(1.0).expect("some").at_least);
        assert_eq!(Lifetimes::default().quantile(0.5), None);
    }
}
