//! `sockmap-gc-bench --events-cost`: what kernel events cost under churn. The same load (node
//! clients opening, using and closing connections to two pods, every one filed in the map by
//! the lab's sock_ops) runs twice, with the deleting daemon at `events = "off"` and then at
//! `events = "on"` (`auto` where the kernel refuses a program); each run reports the
//! connections achieved, the daemon's CPU (utime + stime over the load), and the event
//! programs' run time as the kernel accounts it (`BPF_ENABLE_STATS`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sockmap_gc_lab::peer::child::churn::ChurnOpts;
use sockmap_gc_lab::progstats::{prog_cost, ProgCost, StatsOn};
use sockmap_gc_lab::{sys, Lab};

const PORT: u16 = 8080;
const CHURN_PORTS: [(u16, u16); 2] = [(20000, 23999), (24000, 27999)];
/// The event programs, as the kernel names them.
const PROGRAMS: [&str; 2] = ["on_close", "on_update"];

/// One run's figures.
pub struct Run {
    pub events: String,
    /// What the daemon's start line says it watches.
    pub watching: String,
    pub connections: u64,
    pub failed: u64,
    pub rate: f64,
    pub daemon_cpu: Duration,
    pub programs: [ProgCost; 2],
    pub window: Duration,
}

impl Run {
    fn share(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() / self.window.as_secs_f64().max(1e-9)
    }
}

/// Runs the load at `rate` connections per second for `duration`, once per events mode.
pub fn bench(
    id: &str,
    rate: u32,
    duration: Duration,
    product: &Path,
    peer_bin: &Path,
) -> Result<Vec<Run>> {
    let _stats = StatsOn::new()?;
    let lab = Lab::new(id, 2, peer_bin)?;
    let servers = (0..2)
        .map(|pod| lab.start_server(pod, PORT, false))
        .collect::<Result<Vec<_>>>()?;
    let dir = std::env::temp_dir().join(format!("sockmap-gc-bench-events-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut runs = Vec::new();
    for events in ["off", "on"] {
        let config = dir.join(format!("events-{events}.toml"));
        let key = if events == "on" && !expect_both() {
            "auto"
        } else {
            events
        };
        std::fs::write(
            &config,
            format!(
                "map = \"{}\"\nmetrics_listen = \"\"\ntrail = \"\"\ndry_run = false\nevents = \"{key}\"\n",
                lab.map_path().display()
            ),
        )?;
        let daemon = DaemonProc::start(product, &config)?;
        let watching = daemon.watching(Duration::from_secs(30))?;
        // After the daemon's first sweep: the load window holds only its steady state.
        std::thread::sleep(Duration::from_secs(2));
        let before = PROGRAMS.map(prog_cost);
        let cpu_before = daemon.cpu()?;
        let started = Instant::now();
        let churns = servers
            .iter()
            .zip(CHURN_PORTS)
            .map(|(server, ports)| {
                lab.churn(&ChurnOpts::to(server.addr(), rate / 2, duration, ports))
            })
            .collect::<Result<Vec<_>>>()?;
        let reports = churns
            .into_iter()
            .map(|c| c.wait())
            .collect::<Result<Vec<_>>>()?;
        let window = started.elapsed();
        let cpu = daemon.cpu()?.saturating_sub(cpu_before);
        let after = PROGRAMS.map(prog_cost);
        drop(daemon);
        eprintln!(
            "events {key}: {} connections in {:.1} s, daemon CPU {:.3} s",
            reports.iter().map(|r| r.ok).sum::<u64>(),
            window.as_secs_f64(),
            cpu.as_secs_f64()
        );
        let connections = reports.iter().map(|r| r.ok).sum();
        runs.push(Run {
            events: key.to_string(),
            watching,
            connections,
            failed: reports.iter().map(|r| r.failed).sum(),
            rate: connections as f64 / window.as_secs_f64().max(1e-9),
            daemon_cpu: cpu,
            programs: [after[0].since(before[0]), after[1].since(before[1])],
            window,
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(runs)
}

/// Where `SMGC_EXPECT_EVENTS=1` (the kernel-check guest), `events = "on"`; else `auto`, so
/// a kernel that refuses one program still measures the other.
fn expect_both() -> bool {
    std::env::var("SMGC_EXPECT_EVENTS").is_ok_and(|v| v == "1")
}

pub fn markdown(runs: &[Run]) -> String {
    let mut out = String::from(
        "| events | watching | connections (per s) | failed | daemon CPU | on_close runs, CPU | on_update runs, CPU | added vs off |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let base = runs.first().map(|r| r.share(r.daemon_cpu)).unwrap_or(0.0);
    for r in runs {
        let progs: Vec<String> = r
            .programs
            .iter()
            .map(|p| {
                format!(
                    "{} ({:.0} ns each), {:.4} %",
                    p.runs,
                    p.run_time_ns as f64 / p.runs.max(1) as f64,
                    100.0 * r.share(Duration::from_nanos(p.run_time_ns))
                )
            })
            .collect();
        let total = r.share(r.daemon_cpu)
            + r.programs
                .iter()
                .map(|p| r.share(Duration::from_nanos(p.run_time_ns)))
                .sum::<f64>();
        out += &format!(
            "| {} | {} | {} ({:.0}) | {} | {:.3} % | {} | {} | {:+.3} % of one core |\n",
            r.events,
            r.watching,
            r.connections,
            r.rate,
            r.failed,
            100.0 * r.share(r.daemon_cpu),
            progs[0],
            progs[1],
            100.0 * (total - base)
        );
    }
    out
}

/// The daemon under test, its log read line by line.
struct DaemonProc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl DaemonProc {
    fn start(product: &Path, config: &Path) -> Result<DaemonProc> {
        let mut child = Command::new(product)
            .arg("daemon")
            .arg("--config")
            .arg(config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", product.display()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().context("the daemon's stderr")?;
        let into = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                into.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Ok(DaemonProc { child, lines })
    }

    /// The `events=` field of the start line.
    fn watching(&self, timeout: Duration) -> Result<String> {
        let mut found = None;
        sys::wait_until(timeout, || {
            found = self
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|l| l.contains("sockmap-gc daemon started"))
                .cloned();
            found.is_some()
        });
        let line = found.context("the daemon did not start")?;
        match line
            .split("events=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        {
            Some(mode) => Ok(mode.to_string()),
            None => bail!("no events= in the start line: {line}"),
        }
    }

    /// utime + stime so far, of every thread (exited ones included).
    fn cpu(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("malformed stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields.get(11).context("no utime")?.parse::<u64>()?
            + fields.get(12).context("no stime")?.parse::<u64>()?;
        // SAFETY: sysconf reads a constant of the system.
        let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Ok(Duration::from_secs_f64(ticks as f64 / per_sec))
    }
}

// Killed, not stopped with SIGTERM: this binary blocks SIGTERM for its interrupt handler, and
// its children inherit the blocked mask.
impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
