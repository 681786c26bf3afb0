//! `sockmap-gc-bench`: builds a full Cilium sockhash in the lab (live connections of pod
//! servers and node clients, plus planted stale keys held by real sockets) and measures, on
//! the same map in the same run, `sockmap-gc audit` (tuple evidence only and with identity),
//! `sockmap-gc sweep --execute` without a rate limit, the product's peak RSS, the manual
//! remedy (`bpftool map dump`, `ss -tn` in every namespace, `bpftool map delete` per stale
//! key), and the kernel's own cost (one sockmap iterator read plus one sock_diag dump per
//! namespace). With `--hung`, the hung-request benchmark instead ([`hung`]): requests hung
//! and stale-entry lifetimes under the incident's load, without a collector, with full sweeps
//! only and with the shipped config. docs/BENCHMARKS.md has the figures and how to run it.

#![deny(clippy::undocumented_unsafe_blocks)]

#[path = "bench/daemon.rs"]
mod daemon;
#[path = "bench/events.rs"]
mod events;
#[path = "bench/hung.rs"]
mod hung;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use sockmap_gc::diag;
use sockmap_gc::holder::{HolderSource, ScanMethod};
use sockmap_gc::identity::IdentityReader;
use sockmap_gc::key::{RawKey, SockKey, KEY_LEN};
use sockmap_gc::map::{Access, SockMap};
use sockmap_gc::netns;
use sockmap_gc::socket::unmap;
use sockmap_gc_lab::peer::bulk::BulkClient;
use sockmap_gc_lab::peer::child::churn::parse_port_range;
use sockmap_gc_lab::peer::child::{churn::parse_share, parse_duration};
use sockmap_gc_lab::sys::output;
use sockmap_gc_lab::{interrupt, Lab, LabConfig, Server};

/// Cilium's map size (`SOCKOPS_MAP_SIZE`) and the incident's stale entries.
const FULL_MAP: u32 = 65_535;
const INCIDENT_STALE: usize = 7_325;
/// The pods' server port; planted keys use node ports below the ephemeral range.
const SERVER_PORT: u16 = 8080;
const PLANT_PORT_BASE: u16 = 20_000;
const EPHEMERAL_START: u16 = 32_768;

#[derive(Parser, Debug)]
#[command(
    name = "sockmap-gc-bench",
    version,
    about = "Benchmarks sockmap-gc on a full sockhash in the lab, against the manual remedy and the kernel's own cost (run as root)"
)]
struct Args {
    /// Map sizes to measure, in entries; each builds its own lab with a map of that size,
    /// filled (65535 is Cilium's size)
    #[arg(long, value_delimiter = ',', default_value = "65535")]
    entries: Vec<u32>,
    /// Stale entries to plant [default: the incident's 7325 at 65535 entries, the same
    /// share of smaller maps]
    #[arg(long)]
    stale: Option<usize>,
    /// Live TCP sockets per map entry (1.526: ~100k sockets for 65535 entries); the
    /// connections a full map cannot file stay unfiled
    #[arg(long, default_value_t = 1.526)]
    sockets_per_entry: f64,
    /// Pod namespaces, each with one server
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Measured runs per size (medians are reported)
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Runs that also measure the manual remedy (at most --runs; it is slow)
    #[arg(long, default_value_t = 3)]
    manual_runs: usize,
    /// Most connections one client process opens (RLIMIT_NOFILE is per process)
    #[arg(long, default_value_t = 8000)]
    conns_per_client: usize,
    /// Quick check: 1000 entries, 5 pods, 1 run (for CI)
    #[arg(long)]
    smoke: bool,
    /// The sockmap-gc binary [default: next to this one]
    #[arg(long, value_name = "PATH")]
    product: Option<PathBuf>,
    /// The sockmap-gc-lab binary that runs the peers [default: next to this one]
    #[arg(long, value_name = "PATH")]
    peer_bin: Option<PathBuf>,
    /// Also write every figure as JSON here
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// After building the first size, keep the lab up until Ctrl-C instead of measuring (to
    /// profile by hand)
    #[arg(long)]
    keep: bool,
    /// Lab id (names its namespaces smgc-ID-*, cgroup and pin directory)
    #[arg(long, default_value = "bench")]
    id: String,
    /// The hung-request benchmark instead: the same load with no collector, the daemon's
    /// full sweeps only, and the shipped config (with --smoke: 5 s each)
    #[arg(long)]
    hung: bool,
    /// --hung: how long each collector's run lasts
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    hung_duration: Duration,
    /// --hung: requests started per second
    #[arg(long, default_value_t = 50)]
    hung_rate: u32,
    /// --hung: node-side client ports, cycled (within the lab's reserved 40000-49999)
    #[arg(long, default_value = "41000-41199", value_parser = parse_port_range)]
    hung_ports: (u16, u16),
    /// --hung: share of requests that reset after their reply instead of closing
    #[arg(long, default_value = "0.1", value_parser = parse_share)]
    reset_share: f64,
    /// --hung: how long a request waits for its reply before it counts as hung
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    hung_timeout: Duration,
    /// After each size's runs, run `sockmap-gc daemon` (the shipped config, a dry run) on its
    /// map this long and measure its CPU and memory between sweeps (0 skips it; --smoke: 5 s)
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pass_duration: Duration,
    /// --hung: how often the map is read to time the stale entries' lifetimes
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    hung_poll: Duration,
    /// What kernel events cost instead: the same churn with the daemon at events = off, then
    /// on (see docs/BENCHMARKS.md)
    #[arg(long)]
    events_cost: bool,
    /// --events-cost: connections per second over both pods
    #[arg(long, default_value_t = 2200)]
    events_rate: u32,
    /// --events-cost: seconds each run's load lasts
    #[arg(long, default_value_t = 30)]
    events_seconds: u64,
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.smoke && args.hung {
        args.hung_duration = Duration::from_secs(5);
    } else if args.smoke {
        args.pass_duration = Duration::from_secs(5);
        args.entries = vec![1000];
        args.pods = 5;
        args.runs = 1;
        args.manual_runs = 1;
    }
    if let Err(e) = interrupt::install(args.id.clone(), Duration::from_secs(20)) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if interrupt::is_interrupted() => {
            eprintln!("stopped: {e:#}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().context("this executable has no directory")?;
    Ok(dir.join(name))
}

fn run(args: &Args) -> Result<()> {
    sockmap_gc_lab::sys::require_root()?;
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let product = match &args.product {
        Some(p) => p.clone(),
        None => sibling("sockmap-gc")?,
    };
    let peer_bin = match &args.peer_bin {
        Some(p) => p.clone(),
        None => sibling("sockmap-gc-lab")?,
    };
    for bin in [&product, &peer_bin] {
        if !bin.is_file() {
            bail!(
                "{} not found: build with `cargo build --release --workspace`, or give --product/--peer-bin",
                bin.display()
            );
        }
    }
    println!("machine    {}", machine());
    println!("product    {}", product.display());
    if args.hung {
        return run_hung(args, &product, &peer_bin);
    }
    if args.events_cost {
        let runs = events::bench(
            &args.id,
            args.events_rate,
            Duration::from_secs(args.events_seconds),
            &product,
            &peer_bin,
        )?;
        println!("\n{}", events::markdown(&runs));
        return Ok(());
    }
    let mut results = Vec::new();
    for &entries in &args.entries {
        interrupt::check()?;
        let size = Size::new(args, entries)?;
        results.push(bench_size(args, &size, &product, &peer_bin)?);
    }
    println!("\n{}", markdown(&results));
    if let Some(path) = &args.json {
        std::fs::write(path, json(&results))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

fn run_hung(args: &Args, product: &Path, peer_bin: &Path) -> Result<()> {
    let load = hung::Load {
        duration: args.hung_duration,
        rate: args.hung_rate,
        ports: args.hung_ports,
        reset_share: args.reset_share,
        timeout: args.hung_timeout,
        poll: args.hung_poll,
    };
    if !(40_000..=49_999).contains(&load.ports.0) || !(40_000..=49_999).contains(&load.ports.1) {
        bail!(
            "--hung-ports must lie within the lab's reserved {}",
            sockmap_gc_lab::FIXED_PORTS
        );
    }
    let runs = hung::bench(&args.id, &load, product, peer_bin)?;
    println!("\n{}", hung::markdown(&load, &runs));
    if let Some(path) = &args.json {
        std::fs::write(path, hung::json(&machine(), &load, &runs))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

fn machine() -> String {
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs, {:.1} GiB RAM, Linux {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

/// The population of one map size.
#[derive(Debug, Clone)]
struct Size {
    entries: u32,
    stale: usize,
    pods: usize,
    /// Connections per pod (each is two sockets).
    per_pod: usize,
    /// Pods per client process.
    pods_per_client: usize,
}

impl Size {
    fn new(args: &Args, entries: u32) -> Result<Size> {
        if entries < 2 {
            bail!("--entries must be at least 2");
        }
        let n = entries as usize;
        let mut stale = args.stale.unwrap_or_else(|| {
            ((n as f64) * INCIDENT_STALE as f64 / f64::from(FULL_MAP)).round() as usize
        });
        // Live connections file two keys each: keep the map exactly full.
        if (n - stale.min(n)) % 2 == 1 {
            stale += 1;
        }
        if stale > n {
            bail!("--stale {stale} exceeds the map's {n} entries");
        }
        let pods = args.pods;
        if pods == 0 || pods > sockmap_gc_lab::MAX_PODS {
            bail!("--pods must be 1..={}", sockmap_gc_lab::MAX_PODS);
        }
        if PLANT_PORT_BASE as usize + stale.div_ceil(pods) >= EPHEMERAL_START as usize {
            bail!("too many stale keys per pod for the planting port range: add pods");
        }
        let sockets = ((n as f64) * args.sockets_per_entry).round() as usize;
        let filed_conns = (n - stale) / 2;
        let unfiled_conns = sockets.saturating_sub(n) / 2;
        let per_pod = (filed_conns + unfiled_conns).div_ceil(pods).max(1);
        let pods_per_client = (args.conns_per_client / per_pod).max(1);
        Ok(Size {
            entries,
            stale,
            pods,
            per_pod,
            pods_per_client,
        })
    }
}

/// Everything measured in one run.
#[derive(Debug, Default, Clone)]
struct RunFigures {
    kernel_iter: f64,
    kernel_diag: f64,
    /// The holder pass over the stale entries' sockets, loading its program as `audit` does.
    holders: f64,
    audit_off: f64,
    audit_off_rss_kib: u64,
    audit_on: f64,
    audit_on_rss_kib: u64,
    /// The identity audit selecting no entry (a filter nothing matches): no rows to write.
    audit_quiet: f64,
    /// `sockmap-gc --version`: a process start and exit.
    start: f64,
    sweep: f64,
    sweep_delete_phase: f64,
    sweep_rss_kib: u64,
    deleted: usize,
    manual_audit: Option<f64>,
    manual_delete: Option<f64>,
}

impl RunFigures {
    fn kernel(&self) -> f64 {
        self.kernel_iter + self.kernel_diag
    }
}

/// One size's results.
struct SizeResult {
    size: Size,
    build_secs: f64,
    sockets: usize,
    namespaces: usize,
    runs: Vec<RunFigures>,
    daemon: Option<DaemonFigures>,
}

/// The daemon between sweeps on one size's map: the continuous passes' cost.
#[derive(Debug, Clone, Copy)]
struct DaemonFigures {
    window: Duration,
    passes: usize,
    cpu: Duration,
    rss_kib: u64,
    peak_rss_kib: u64,
}

impl DaemonFigures {
    fn cpu_share(&self) -> f64 {
        self.cpu.as_secs_f64() / self.window.as_secs_f64().max(1e-9)
    }
}

/// `sockmap-gc daemon` with the shipped config (a dry run) on `map` for `window` after its
/// first sweep: its CPU (utime+stime), passes (their debug lines) and memory.
fn measure_daemon(product: &Path, map: &Path, window: Duration) -> Result<DaemonFigures> {
    let scratch = std::env::temp_dir().join(format!("smgc-bench-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let config = daemon::with_keys(
        daemon::SHIPPED,
        &[
            ("map", format!("\"{}\"", map.display())),
            ("trail", "\"\"".to_string()),
            ("metrics_listen", "\"\"".to_string()),
        ],
    );
    let d = daemon::DaemonProc::start(
        product,
        &config,
        &scratch,
        "passes",
        &[("RUST_LOG", "info,sockmap_gc::cmd::daemon=debug")],
    )?;
    if !d.wait_log(Duration::from_secs(120), "sweep ok:") {
        bail!(
            "the daemon's first sweep did not end well:\n{}",
            d.log_text()
        );
    }
    let passes = |d: &daemon::DaemonProc| d.log_text().matches("pass ok:").count();
    let (cpu0, n0) = (d.cpu()?, passes(&d));
    let until = Instant::now() + window;
    while Instant::now() < until {
        interrupt::check()?;
        thread::sleep(Duration::from_millis(100));
    }
    let (cpu1, n1) = (d.cpu()?, passes(&d));
    let rss_kib = d.status_kib("VmRSS")?;
    let peak_rss_kib = d.status_kib("VmHWM")?;
    let log = d.stop()?;
    let _ = std::fs::remove_dir_all(&scratch);
    if log.matches("sweep ok:").count() > 1 || log.contains("failed") {
        bail!("a sweep or a failure fell in the measured window:\n{log}");
    }
    Ok(DaemonFigures {
        window,
        passes: n1 - n0,
        cpu: cpu1.saturating_sub(cpu0),
        rss_kib,
        peak_rss_kib,
    })
}

fn bench_size(args: &Args, size: &Size, product: &Path, peer_bin: &Path) -> Result<SizeResult> {
    println!(
        "\n== {} entries ({} stale), {} pods, {} connections per pod ==",
        size.entries, size.stale, size.pods, size.per_pod
    );
    let built = Instant::now();
    let mut config = LabConfig::new(&args.id, size.pods, peer_bin);
    config.map_max_entries = Some(size.entries);
    config.peer_max_life = Duration::from_secs(4 * 3600);
    let lab = Lab::with_config(config)?;
    let stale_keys = stale_keys(&lab, size)?;
    let (servers, clients) = populate(&lab, size, &stale_keys)?;
    let build_secs = built.elapsed().as_secs_f64();
    let map_path = lab.map_path();
    let map = SockMap::open(&map_path, Access::ReadOnly)?;
    let mut reader = IdentityReader::new().context("loading the identity iterator")?;
    let filled = reader.read(&map)?.entries.len();
    println!(
        "   built in {build_secs:.1} s: map {} holds {filled} of {} entries; {} server and {} client processes",
        map_path.display(),
        size.entries,
        servers.len(),
        clients.len()
    );
    if filled != size.entries as usize {
        bail!(
            "the map holds {filled} entries, not {}: connections failed to file",
            size.entries
        );
    }
    if args.keep {
        println!("   lab kept up; Ctrl-C tears it down");
        while !interrupt::is_interrupted() {
            thread::sleep(Duration::from_millis(100));
        }
        bail!("interrupted");
    }
    let mut runs = Vec::new();
    let mut sockets = 0;
    let mut namespaces = 0;
    for r in 0..args.runs {
        interrupt::check()?;
        let mut f = RunFigures::default();

        // The kernel's own cost: one iterator read, one sock_diag dump per namespace.
        let t = Instant::now();
        let ids = reader.read(&map)?;
        f.kernel_iter = t.elapsed().as_secs_f64();
        if ids.entries.len() != size.entries as usize {
            bail!(
                "run {r}: the map holds {} entries, not {}",
                ids.entries.len(),
                size.entries
            );
        }
        // The holder pass as audit runs it when there are stale entries: the planted
        // sockets' inodes (held by this process's planter), a fresh source, one scan.
        let planted: HashSet<RawKey> = stale_keys.iter().map(|s| s.key.encode()).collect();
        let inodes: HashSet<u64> = ids
            .entries
            .iter()
            .filter(|(k, _)| planted.contains(k))
            .map(|(_, h)| h.inode)
            .collect();
        let t = Instant::now();
        let scan = HolderSource::new("/proc").scan(&inodes);
        f.holders = t.elapsed().as_secs_f64();
        if scan.info.method != ScanMethod::Iterator || scan.holders.len() != size.stale {
            bail!(
                "run {r}: the holder pass ({:?}) named holders of {} of the {} stale sockets: {:?}",
                scan.info.method,
                scan.holders.len(),
                size.stale,
                scan.info.notes
            );
        }
        drop(scan);
        let discovery = netns::discover(Path::new("/"))?;
        let t = Instant::now();
        let inventory = diag::inventory(&discovery.namespaces);
        f.kernel_diag = t.elapsed().as_secs_f64();
        if !inventory.failed.is_empty() {
            bail!("{} namespaces could not be dumped", inventory.failed.len());
        }
        sockets = inventory.sockets.len();
        namespaces = inventory.read;
        drop(inventory);

        let map_arg = map_path.display().to_string();
        for (identity, secs, rss) in [
            ("off", &mut f.audit_off, &mut f.audit_off_rss_kib),
            ("on", &mut f.audit_on, &mut f.audit_on_rss_kib),
        ] {
            let m = measure(
                product,
                &[
                    "audit",
                    "--map",
                    &map_arg,
                    "--identity",
                    identity,
                    "--output",
                    "json",
                ],
            )?;
            let found = audit_stale(&m.stdout).with_context(|| {
                format!(
                    "audit --identity {identity} printed no JSON summary: {}",
                    m.stderr
                )
            })?;
            if found != size.stale {
                bail!(
                    "audit --identity {identity} found {found} stale entries, {} were planted",
                    size.stale
                );
            }
            *secs = m.secs;
            *rss = m.max_rss_kib;
        }
        // What the audit costs beyond the iterator's read: without its rows (a filter no entry
        // matches; TEST-NET-1) and a process start alone.
        f.audit_quiet = measure(
            product,
            &["audit", "--map", &map_arg, "--local", "192.0.2.1"],
        )?
        .secs;
        f.start = measure(product, &["--version"])?.secs;

        let max_deletes = size.entries.to_string();
        let m = measure(
            product,
            &[
                "sweep",
                "--map",
                &map_arg,
                "--execute",
                "--confirm-after",
                "0s",
                "--rate-limit",
                "0",
                "--max-deletes",
                &max_deletes,
                "--output",
                "json",
            ],
        )?;
        let (deleted, phase) = sweep_figures(&m.stdout)
            .with_context(|| format!("sweep printed no JSON summary: {}", m.stderr))?;
        if deleted != size.stale {
            bail!(
                "sweep deleted {deleted} entries, {} were stale:\n{}",
                size.stale,
                m.stderr
            );
        }
        f.sweep = m.secs;
        f.sweep_delete_phase = phase;
        f.sweep_rss_kib = m.max_rss_kib;
        f.deleted = deleted;
        replant(&lab, &stale_keys)?;

        if r < args.manual_runs {
            interrupt::check()?;
            let (audit, delete, found) = manual_remedy(&map_path)?;
            if found != size.stale {
                bail!(
                    "the manual remedy found {found} stale entries, {} were planted",
                    size.stale
                );
            }
            f.manual_audit = Some(audit);
            f.manual_delete = Some(delete);
            replant(&lab, &stale_keys)?;
        }
        println!(
            "   run {}: kernel {:.3} s (iterator {:.3} + sock_diag {:.3}), holder pass {:.3} s, audit off {:.3} s / on {:.3} s, sweep {:.3} s (delete phase {:.3}), RSS {:.1} MiB, manual {}",
            r + 1,
            f.kernel(),
            f.kernel_iter,
            f.kernel_diag,
            f.holders,
            f.audit_off,
            f.audit_on,
            f.sweep,
            f.sweep_delete_phase,
            f.audit_on_rss_kib.max(f.audit_off_rss_kib).max(f.sweep_rss_kib) as f64 / 1024.0,
            match (f.manual_audit, f.manual_delete) {
                (Some(a), Some(d)) => format!("{a:.3} s audit + {d:.3} s delete"),
                _ => "-".to_string(),
            }
        );
        runs.push(f);
    }
    let daemon = if args.pass_duration.is_zero() {
        None
    } else {
        interrupt::check()?;
        let d = measure_daemon(product, &map_path, args.pass_duration)?;
        println!(
            "   daemon (shipped config, dry run) over {:.0} s between sweeps: {} passes, {:.3} s CPU ({:.2}% of one core), VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            d.window.as_secs_f64(),
            d.passes,
            d.cpu.as_secs_f64(),
            d.cpu_share() * 100.0,
            d.rss_kib as f64 / 1024.0,
            d.peak_rss_kib as f64 / 1024.0
        );
        Some(d)
    };
    drop(clients);
    drop(servers);
    drop(reader);
    drop(map);
    drop(lab);
    Ok(SizeResult {
        size: size.clone(),
        build_secs,
        sockets,
        namespaces,
        runs,
        daemon,
    })
}

/// A stale key to plant, and the pod whose address is its local end.
#[derive(Clone, Copy)]
struct StaleKey {
    key: SockKey,
    pod: usize,
}

impl StaleKey {
    /// Held where a real stale entry is: by a socket in the pod's namespace.
    fn plant(&self, lab: &Lab) -> Result<()> {
        lab.plant_in_pod(self.key, self.pod)
    }
}

/// The stale keys to plant: the server end of a future connection from a node port no
/// client uses (below the ephemeral range), spread over the pods.
fn stale_keys(lab: &Lab, size: &Size) -> Result<Vec<StaleKey>> {
    (0..size.stale)
        .map(|j| {
            let pod = j % size.pods;
            let port = PLANT_PORT_BASE + (j / size.pods) as u16;
            let key = SockKey::for_socket(
                SocketAddr::new(lab.pod_ip(pod).into(), SERVER_PORT),
                SocketAddr::new(lab.node_ip(pod).into(), port),
            )
            .context("building a stale key")?;
            Ok(StaleKey { key, pod })
        })
        .collect()
}

/// Plants the stale keys, then starts the servers and the clients, which connect in
/// parallel until the map is full.
fn populate(lab: &Lab, size: &Size, stale: &[StaleKey]) -> Result<(Vec<Server>, Vec<BulkClient>)> {
    let t = Instant::now();
    for s in stale {
        s.plant(lab)?;
    }
    println!(
        "   planted {} stale keys in {:.1} s",
        stale.len(),
        t.elapsed().as_secs_f64()
    );
    interrupt::check()?;
    let t = Instant::now();
    let mut servers = Vec::with_capacity(size.pods);
    for pod in 0..size.pods {
        servers.push(lab.start_bulk_server(pod, SERVER_PORT)?);
    }
    println!(
        "   {} servers started in {:.1} s",
        servers.len(),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let targets: Vec<SocketAddr> = servers.iter().map(Server::addr).collect();
    let mut clients = Vec::new();
    for group in targets.chunks(size.pods_per_client) {
        clients.push(lab.spawn_bulk_client(group, size.per_pod)?);
    }
    let mut conns = 0;
    for c in &mut clients {
        interrupt::check()?;
        conns += c.wait_ready(Duration::from_secs(600))?;
    }
    println!(
        "   {conns} connections by {} clients in {:.1} s",
        clients.len(),
        t.elapsed().as_secs_f64()
    );
    // The last handshakes' PASSIVE_ESTABLISHED may trail the clients' "ready" a little.
    let want = size.entries as usize;
    let full =
        sockmap_gc_lab::sys::wait_until(Duration::from_secs(10), || lab.raw_keys().len() >= want);
    if !full {
        bail!(
            "the map holds {} entries after the connections, not {want}",
            lab.raw_keys().len()
        );
    }
    Ok((servers, clients))
}

/// Plants again the stale keys a sweep or the manual remedy deleted, with fresh sockets.
fn replant(lab: &Lab, stale: &[StaleKey]) -> Result<()> {
    lab.forget_deleted_plants();
    let present: HashSet<RawKey> = lab.raw_keys().into_iter().collect();
    for s in stale {
        if !present.contains(&s.key.encode()) {
            s.plant(lab)?;
        }
    }
    Ok(())
}

/// One measured run of a command.
struct Measured {
    secs: f64,
    max_rss_kib: u64,
    stdout: String,
    stderr: String,
}

/// Runs `product` with `args` to its end with stdout and stderr captured, timing it from
/// spawn to reap, with its peak RSS. Exit codes 0 and 1 (stale found) are success.
///
/// The peak RSS comes from GNU time, which forks the product itself: a process's `ru_maxrss`
/// starts from the size of the process it was forked or spawned from (the kernel carries the
/// old memory's high-water mark across `exec`), and this process holds the whole lab, so a
/// child spawned from here would report this process's size, not its own.
fn measure(product: &Path, args: &[&str]) -> Result<Measured> {
    let rss_file = std::env::temp_dir().join(format!("smgc-bench-rss-{}", std::process::id()));
    let started = Instant::now();
    let out = Command::new(TIME)
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg(product)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("starting {TIME} (Debian package `time`; scripts/setup.sh installs it)")
        })?;
    let secs = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !matches!(out.status.code(), Some(0) | Some(1)) {
        bail!(
            "{} {args:?} failed ({}): {stderr}",
            product.display(),
            out.status
        );
    }
    let report = std::fs::read_to_string(&rss_file)
        .with_context(|| format!("reading {}", rss_file.display()))?;
    let _ = std::fs::remove_file(&rss_file);
    // GNU time writes "Command exited with non-zero status 1" first when it was so.
    let max_rss_kib = report
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("{TIME} printed no peak RSS: {report:?}"))?;
    Ok(Measured {
        secs,
        max_rss_kib,
        stdout,
        stderr,
    })
}

/// GNU time, for the product's own peak RSS.
const TIME: &str = "/usr/bin/time";

/// `summary.stale` of `audit --output json`.
fn audit_stale(json: &str) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["summary"]["stale"].as_u64()?.try_into().ok()
}

/// `summary.deleted` and `summary.delete_phase_seconds` of `sweep --output json`.
fn sweep_figures(json: &str) -> Option<(usize, f64)> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let summary = &v["summary"];
    let deleted = summary["deleted"].as_u64()?.try_into().ok()?;
    Some((deleted, summary["delete_phase_seconds"].as_f64()?))
}

/// The manual remedy as an operator scripts it: dump the keys with bpftool, list every
/// namespace's connections with `ss -tn`, match, and delete each stale key with bpftool.
/// Returns (seconds to find the stale keys, seconds to delete them, how many).
fn manual_remedy(map_path: &Path) -> Result<(f64, f64, usize)> {
    let path = map_path.display().to_string();
    let started = Instant::now();
    let dump = output(Command::new("bpftool").args(["map", "dump", "pinned", &path]))?;
    let keys = parse_bpftool_dump(&dump);
    let mut live: HashSet<(SocketAddr, SocketAddr)> = HashSet::new();
    parse_ss(&output(Command::new("ss").arg("-tn"))?, &mut live);
    let names = output(Command::new("ip").args(["netns", "list"]))?;
    for name in names.lines().filter_map(|l| l.split_whitespace().next()) {
        match output(Command::new("ip").args(["netns", "exec", name, "ss", "-tn"])) {
            Ok(ss) => parse_ss(&ss, &mut live),
            // Another lab's namespace went away since the listing: as an operator, skip it.
            Err(_) if !Path::new("/run/netns").join(name).exists() => {}
            Err(e) => return Err(e),
        }
    }
    let stale: Vec<RawKey> = keys
        .into_iter()
        .filter(|raw| match SockKey::decode(raw) {
            Ok(k) => !live.contains(&(k.local, k.remote)),
            Err(_) => false,
        })
        .collect();
    let audit = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for raw in &stale {
        let hex = raw.to_bpftool_hex();
        let mut cmd = Command::new("bpftool");
        cmd.args(["map", "delete", "pinned", &path, "key", "hex"]);
        cmd.args(hex.split(' '));
        output(&mut cmd)?;
    }
    Ok((audit, started.elapsed().as_secs_f64(), stale.len()))
}

/// Keys from `bpftool map dump` (plain output): the hex bytes between each `key:` and its
/// `value:`.
fn parse_bpftool_dump(text: &str) -> Vec<RawKey> {
    let mut keys = Vec::new();
    let mut bytes: Option<Vec<u8>> = None;
    for token in text.split_whitespace() {
        if token == "key:" {
            bytes = Some(Vec::with_capacity(KEY_LEN));
        } else if token.starts_with("value") {
            if let Some(b) = bytes.take() {
                if let Ok(k) = <[u8; KEY_LEN]>::try_from(b.as_slice()) {
                    keys.push(RawKey(k));
                }
            }
        } else if let Some(b) = bytes.as_mut() {
            if let Ok(v) = u8::from_str_radix(token, 16) {
                b.push(v);
            }
        }
    }
    keys
}

/// (local, peer) of each connection in `ss -tn` output, IPv4-mapped ends made IPv4.
fn parse_ss(text: &str, into: &mut HashSet<(SocketAddr, SocketAddr)>) {
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(l), Some(p)) = (cols.get(3), cols.get(4)) else {
            continue;
        };
        if let (Ok(l), Ok(p)) = (l.parse::<SocketAddr>(), p.parse::<SocketAddr>()) {
            into.insert((unmap(l), unmap(p)));
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians of one size, and the per-run ratios' medians.
struct Medians {
    kernel: f64,
    kernel_iter: f64,
    kernel_diag: f64,
    holders: f64,
    audit_off: f64,
    audit_on: f64,
    audit_quiet: f64,
    start: f64,
    sweep: f64,
    sweep_delete_phase: f64,
    rss_mib: f64,
    manual_audit: f64,
    manual_delete: f64,
    /// audit (identity on) / kernel, per run.
    audit_on_over_kernel: f64,
    audit_off_over_kernel: f64,
    /// manual audit / audit (identity on), per run.
    manual_over_audit: f64,
    /// manual audit+delete / sweep, per run.
    manual_over_sweep: f64,
}

impl SizeResult {
    fn medians(&self) -> Medians {
        let m = |f: &dyn Fn(&RunFigures) -> Option<f64>| {
            median(self.runs.iter().filter_map(f).collect())
        };
        Medians {
            kernel: m(&|r| Some(r.kernel())),
            kernel_iter: m(&|r| Some(r.kernel_iter)),
            kernel_diag: m(&|r| Some(r.kernel_diag)),
            holders: m(&|r| Some(r.holders)),
            audit_off: m(&|r| Some(r.audit_off)),
            audit_on: m(&|r| Some(r.audit_on)),
            audit_quiet: m(&|r| Some(r.audit_quiet)),
            start: m(&|r| Some(r.start)),
            sweep: m(&|r| Some(r.sweep)),
            sweep_delete_phase: m(&|r| Some(r.sweep_delete_phase)),
            rss_mib: m(&|r| {
                Some(
                    r.audit_on_rss_kib
                        .max(r.audit_off_rss_kib)
                        .max(r.sweep_rss_kib) as f64
                        / 1024.0,
                )
            }),
            manual_audit: m(&|r| r.manual_audit),
            manual_delete: m(&|r| r.manual_delete),
            audit_on_over_kernel: m(&|r| Some(r.audit_on / r.kernel())),
            audit_off_over_kernel: m(&|r| Some(r.audit_off / r.kernel())),
            manual_over_audit: m(&|r| r.manual_audit.map(|a| a / r.audit_on)),
            manual_over_sweep: m(&|r| Some((r.manual_audit? + r.manual_delete?) / r.sweep)),
        }
    }
}

fn markdown(results: &[SizeResult]) -> String {
    let mut out = hung::table_head(
        "entries | stale | sockets | netns | kernel (iter + diag) | holder pass | audit off | audit on | sweep (delete phase) | peak RSS | manual find | manual delete | audit on / kernel | manual find / audit | manual / sweep",
        0,
    );
    for r in results {
        let m = r.medians();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.3} s ({:.3} + {:.3}) | {:.3} s | {:.3} s | {:.3} s | {:.3} s ({:.3} s) | {:.1} MiB | {:.2} s | {:.2} s | {:.2}× | {:.0}× | {:.0}× |",
            r.size.entries,
            r.size.stale,
            r.sockets,
            r.namespaces,
            m.kernel,
            m.kernel_iter,
            m.kernel_diag,
            m.holders,
            m.audit_off,
            m.audit_on,
            m.sweep,
            m.sweep_delete_phase,
            m.rss_mib,
            m.manual_audit,
            m.manual_delete,
            m.audit_on_over_kernel,
            m.manual_over_audit,
            m.manual_over_sweep,
        );
    }
    out.push('\n');
    out += &hung::table_head(
        "entries | iterator read | process start | holder pass | audit on, no rows | audit on | output (audit - no rows) | (no rows - start) / read | manual find / audit on",
        0,
    );
    for r in results {
        let m = r.medians();
        let _ = writeln!(
            out,
            "| {} | {:.3} s | {:.3} s | {:.3} s | {:.3} s | {:.3} s | {:.3} s | {:.2}× | {:.1}× |",
            r.size.entries,
            m.kernel_iter,
            m.start,
            m.holders,
            m.audit_quiet,
            m.audit_on,
            m.audit_on - m.audit_quiet,
            (m.audit_quiet - m.start) / m.kernel_iter,
            m.manual_over_audit,
        );
    }
    if results.iter().any(|r| r.daemon.is_some()) {
        let _ = writeln!(
            out,
            "\n| entries | daemon window | passes | CPU | of one core | VmRSS | VmHWM |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for r in results {
            if let Some(d) = &r.daemon {
                let _ = writeln!(
                    out,
                    "| {} | {:.0} s | {} | {:.3} s | {:.2}% | {:.1} MiB | {:.1} MiB |",
                    r.size.entries,
                    d.window.as_secs_f64(),
                    d.passes,
                    d.cpu.as_secs_f64(),
                    d.cpu_share() * 100.0,
                    d.rss_kib as f64 / 1024.0,
                    d.peak_rss_kib as f64 / 1024.0
                );
            }
        }
    }
    let _ = write!(
        out,
        "medians over {} run(s) per size (manual remedy: {} run(s))",
        results.first().map_or(0, |r| r.runs.len()),
        results.first().map_or(0, |r| r
            .runs
            .iter()
            .filter(|f| f.manual_audit.is_some())
            .count())
    );
    out
}

/// Numbers as JSON: NaN (no manual run) becomes null.
fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.6}")
    } else {
        "null".to_string()
    }
}

fn opt(x: Option<f64>) -> String {
    x.map_or_else(|| "null".to_string(), num)
}

fn json(results: &[SizeResult]) -> String {
    let mut out = String::from("{\n  \"machine\": \"");
    out.push_str(&machine());
    out.push_str("\",\n  \"sizes\": [\n");
    for (i, r) in results.iter().enumerate() {
        let m = r.medians();
        let _ = write!(
            out,
            "    {{\"entries\": {}, \"stale\": {}, \"pods\": {}, \"sockets\": {}, \"namespaces\": {}, \"build_seconds\": {},\n     \"median\": {{\"kernel\": {}, \"kernel_iter\": {}, \"kernel_diag\": {}, \"holders\": {}, \"audit_off\": {}, \"audit_on\": {}, \"audit_quiet\": {}, \"start\": {}, \"sweep\": {}, \"sweep_delete_phase\": {}, \"rss_mib\": {}, \"manual_audit\": {}, \"manual_delete\": {}, \"audit_on_over_kernel\": {}, \"audit_off_over_kernel\": {}, \"manual_over_audit\": {}, \"manual_over_sweep\": {}}},\n     \"runs\": [",
            r.size.entries,
            r.size.stale,
            r.size.pods,
            r.sockets,
            r.namespaces,
            num(r.build_secs),
            num(m.kernel),
            num(m.kernel_iter),
            num(m.kernel_diag),
            num(m.holders),
            num(m.audit_off),
            num(m.audit_on),
            num(m.audit_quiet),
            num(m.start),
            num(m.sweep),
            num(m.sweep_delete_phase),
            num(m.rss_mib),
            num(m.manual_audit),
            num(m.manual_delete),
            num(m.audit_on_over_kernel),
            num(m.audit_off_over_kernel),
            num(m.manual_over_audit),
            num(m.manual_over_sweep),
        );
        for (j, f) in r.runs.iter().enumerate() {
            let _ = write!(
                out,
                "{}\n       {{\"kernel_iter\": {}, \"kernel_diag\": {}, \"holders\": {}, \"audit_off\": {}, \"audit_off_rss_kib\": {}, \"audit_on\": {}, \"audit_on_rss_kib\": {}, \"sweep\": {}, \"sweep_delete_phase\": {}, \"sweep_rss_kib\": {}, \"deleted\": {}, \"manual_audit\": {}, \"manual_delete\": {}}}",
                if j == 0 { "" } else { "," },
                num(f.kernel_iter),
                num(f.kernel_diag),
                num(f.holders),
                num(f.audit_off),
                f.audit_off_rss_kib,
                num(f.audit_on),
                f.audit_on_rss_kib,
                num(f.sweep),
                num(f.sweep_delete_phase),
                f.sweep_rss_kib,
                f.deleted,
                opt(f.manual_audit),
                opt(f.manual_delete),
            );
        }
        let daemon = r.daemon.map_or_else(
            || "null".to_string(),
            |d| {
                format!(
                    "{{\"window_seconds\": {}, \"passes\": {}, \"cpu_seconds\": {}, \"cpu_share\": {}, \"rss_kib\": {}, \"peak_rss_kib\": {}}}",
                    num(d.window.as_secs_f64()),
                    d.passes,
                    num(d.cpu.as_secs_f64()),
                    num(d.cpu_share()),
                    d.rss_kib,
                    d.peak_rss_kib
                )
            },
        );
        let _ = writeln!(
            out,
            "],\n     \"daemon\": {daemon}}}{}",
            if i + 1 == results.len() { "" } else { "," }
        );
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_products_json_summaries() {
        let audit = r#"{"map": {}, "summary": {"entries": 1000, "live": 888, "stale": 112}}"#;
        assert_eq!(audit_stale(audit), Some(112));
        let sweep = r#"{"summary": {"seen": 1000, "deleted": 112, "delete_phase_seconds": 0.003}}"#;
        assert_eq!(sweep_figures(sweep), Some((112, 0.003)));
        assert_eq!(
            audit_stale("summary    1000 entries: 888 live, 112 stale"),
            None
        );
    }

    #[test]
    fn parses_bpftool_and_ss() {
        let key = SockKey::for_socket(
            "10.1.2.2:8080".parse().unwrap(),
            "10.1.2.1:20000".parse().unwrap(),
        )
        .unwrap();
        let hex = key.encode().to_bpftool_hex();
        let dump = format!("key:\n{hex}\nvalue:\nNo space left on device\nFound 0 elements\n");
        assert_eq!(parse_bpftool_dump(&dump), vec![key.encode()]);
        let ss = "State Recv-Q Send-Q Local Address:Port Peer Address:Port Process\nESTAB 0 0 10.1.2.2:8080 10.1.2.1:40000\nESTAB 0 0 [::ffff:10.1.2.2]:8080 [::ffff:10.1.2.1]:40001\n";
        let mut live = HashSet::new();
        parse_ss(ss, &mut live);
        assert!(live.contains(&(
            "10.1.2.2:8080".parse().unwrap(),
            "10.1.2.1:40001".parse().unwrap()
        )));
        assert_eq!(live.len(), 2);
    }

    #[test]
    fn sizes_keep_the_map_exactly_full() {
        let args = Args::parse_from(["bench"]);
        let s = Size::new(&args, 65_535).unwrap();
        assert_eq!(s.stale, 7_325);
        assert_eq!((65_535 - s.stale) % 2, 0);
        let s = Size::new(&args, 1000).unwrap();
        assert_eq!((1000 - s.stale) % 2, 0);
        assert!(s.per_pod >= 1);
    }
}
