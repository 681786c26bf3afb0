//! `sockmap-gc daemon`: guarded sweeps on an adaptive interval and, with identity, a continuous
//! pass every second, for systemd (`Type=notify`, watchdog, `STATUS=`), with signals (HUP
//! reload, USR1 sweep now, TERM/INT stop) and metrics.
//!
//! One event loop, two cadences: a full sweep on its adaptive interval, and a continuous pass
//! (one iterator read, [`crate::pass`]) every `pass_interval`, stretched to `pass_cpu_budget`.
//! One of them runs at a time. The loop is a single-threaded tokio runtime; each sweep or pass
//! runs the blocking engine on a thread of its own, and a sweep itself starts the threads that
//! `setns` (never a runtime thread).

mod events;
mod pass;
mod sweep;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;

use sockmap_gc::guard::Hold;
use sockmap_gc::holder::HolderSource;
use sockmap_gc::identity::{IdentityError, IdentityMode, IdentitySource};
use sockmap_gc::map::{Access, SockMap};
use sockmap_gc::pass::PassState;
use sockmap_gc::sweep::{RunError, Trail};

use crate::cmd::config::{self, Overrides, Settings};
use crate::cmd::metrics::{self, Metrics};

use events::Events;
use pass::Passed;
use sweep::Swept;

/// After SIGTERM, how long a running sweep gets to reach its next delete boundary. Leaving
/// then is safe: each delete is one syscall, and the next start re-observes from scratch.
const STOP_GRACE: Duration = Duration::from_millis(1500);

/// The wait before the next sweep, adapted as Cilium's conntrack GC adapts its interval:
/// shorter after a sweep that found stale entries (halved), longer after a clean one (1.5x),
/// always within `[min, max]`.
pub fn next_wait(prev: Duration, found_stale: bool, min: Duration, max: Duration) -> Duration {
    let next = if found_stale {
        prev / 2
    } else {
        prev.mul_f64(1.5)
    };
    next.clamp(min, max)
}

/// Runs the daemon until SIGTERM or SIGINT; errors only at start-up (bad config, busy port).
pub fn run(config_path: &Path, overrides: Overrides) -> anyhow::Result<()> {
    let settings = load(config_path, &overrides)?;
    settings.log_format.install();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("starting the event loop")?;
    runtime.block_on(async {
        let daemon = Daemon::start(config_path.to_path_buf(), overrides, settings).await?;
        daemon.run().await
    })
}

/// Loads and checks the config, including that the trail can be appended to when deleting.
fn load(path: &Path, overrides: &Overrides) -> anyhow::Result<Settings> {
    let settings = config::load(path, overrides)?;
    if let (false, Some(trail)) = (settings.dry_run, &settings.trail) {
        Trail::open(trail).with_context(|| {
            format!(
                "config file {}: key trail (set trail = \"\" for no trail)",
                path.display()
            )
        })?;
    }
    Ok(settings)
}

/// What a sweep or pass thread hands back.
enum Done {
    Sweep(Box<Swept>),
    Pass(Box<Passed>),
    /// The sweep or pass panicked: its message.
    Lost(Running, String),
}

/// What runs now: one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Running {
    Nothing,
    Sweep,
    Pass,
}

impl Running {
    /// Its thread's name.
    fn name(self) -> &'static str {
        match self {
            Running::Sweep => "sweep",
            Running::Pass => "pass",
            Running::Nothing => "worker",
        }
    }
}

struct Daemon {
    config_path: PathBuf,
    overrides: Overrides,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    /// The adaptive wait between the end of one sweep and the start of the next.
    wait: Duration,
    last_end: Instant,
    next: Instant,
    /// When the next continuous pass is due; `None` while passes are off.
    next_pass: Option<Instant>,
    running: Running,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    signals: Signals,
    watchdog: Option<tokio::time::Interval>,
    /// The identity iterator, loaded once and kept across sweeps (reloaded when the
    /// `identity` key changes).
    identity: Arc<Mutex<Option<(IdentityMode, IdentitySource)>>>,
    /// What the continuous passes carry from one to the next.
    pass_state: Arc<Mutex<PassState>>,
    /// The last pass failed: further failures are logged at debug.
    pass_failing: bool,
    /// The holder search, its iterator loaded at the first sweep with stale entries.
    holders: Arc<Mutex<HolderSource>>,
    events: Events,
}

impl Daemon {
    async fn start(
        config_path: PathBuf,
        overrides: Overrides,
        settings: Settings,
    ) -> anyhow::Result<Daemon> {
        let metrics = Arc::new(Metrics::new());
        metrics.set_dry_run(settings.dry_run);
        metrics.set_interval(settings.interval_max);
        if let Some(addr) = settings.metrics_listen {
            let listener = bind(addr).await?;
            tokio::spawn(metrics::serve(listener, Arc::clone(&metrics)));
        }
        let signals = Signals::new([SIGHUP, SIGTERM, SIGINT, SIGUSR1])
            .context("installing the signal handlers")?;
        // Pings at half the watchdog period, as sd_watchdog_enabled(3) advises.
        let watchdog = sd_notify::watchdog_enabled().map(|period| {
            let mut tick = tokio::time::interval((period / 2).max(Duration::from_millis(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        let settings = Arc::new(settings);
        let events = Events::start(&settings, &metrics)?;
        let events_state = events.state();
        metrics.set_events(events_state, 0);
        tracing::info!(
            config = %config_path.display(),
            mode = if settings.dry_run { "dry run (set dry_run = false to delete)" } else { "deleting" },
            events = %events_state,
            map = %settings.map.as_deref().map_or_else(|| "Cilium's default pins".to_string(), |p| p.display().to_string()),
            interval_min = %humantime::format_duration(settings.interval_min),
            interval_max = %humantime::format_duration(settings.interval_max),
            pass_interval = %settings.pass_interval.map_or_else(|| "off".to_string(), |d| humantime::format_duration(d).to_string()),
            watchdog = watchdog.is_some(),
            "sockmap-gc daemon started"
        );
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let first_pass = settings.pass_interval.map(|i| now + i);
        let daemon = Daemon {
            config_path,
            overrides,
            wait: settings.interval_max,
            settings,
            metrics,
            stop: Arc::new(AtomicBool::new(false)),
            last_end: now,
            next: now,
            // After the first sweep, which loads the iterator.
            next_pass: first_pass,
            running: Running::Nothing,
            done_tx,
            done_rx,
            signals,
            watchdog,
            identity: Arc::new(Mutex::new(None)),
            pass_state: Arc::new(Mutex::new(PassState::default())),
            pass_failing: false,
            holders: Arc::new(Mutex::new(HolderSource::new("/proc"))),
            events,
        };
        notify(&[
            NotifyState::Ready,
            NotifyState::Status("first sweep starting"),
        ]);
        Ok(daemon)
    }

    async fn run(mut self) -> anyhow::Result<()> {
        loop {
            let due = tokio::time::sleep_until(self.next.into());
            let pass_due = self.next_pass.map(|at| tokio::time::sleep_until(at.into()));
            let idle = self.running == Running::Nothing;
            tokio::select! {
                // A due sweep goes first: it is the rarer cadence.
                biased;
                () = due, if idle => self.start_sweep(),
                () = maybe(pass_due), if idle => self.start_pass(),
                Some(done) = self.done_rx.recv() => match done {
                    Done::Sweep(swept) => self.finish(*swept),
                    Done::Pass(passed) => self.finish_pass(*passed),
                    Done::Lost(running, why) => self.lost(running, &why),
                },
                Some(reacted) = self.events.done_rx.recv() => self.finish_react(reacted),
                signal = self.signals.next() => match signal {
                    Some(SIGHUP) => self.reload(),
                    Some(SIGUSR1) => self.sweep_now(),
                    Some(signal) => {
                        self.shutdown(signal).await;
                        return Ok(());
                    }
                    None => anyhow::bail!("the signal stream ended"),
                },
                () = tick(&mut self.watchdog) => notify(&[NotifyState::Watchdog]),
            }
        }
    }

    fn schedule(&mut self) {
        self.last_end = Instant::now();
        self.next = self.last_end + self.wait;
        self.metrics.set_interval(self.wait);
    }

    fn sweep_now(&mut self) {
        if self.running == Running::Sweep {
            tracing::info!("SIGUSR1: a sweep is running already");
        } else {
            tracing::info!("SIGUSR1: sweeping now");
            self.next = Instant::now();
        }
    }

    fn reload(&mut self) {
        // systemd 253+ wants the monotonic time with RELOADING=1.
        match NotifyState::monotonic_usec_now() {
            Ok(now) => notify(&[NotifyState::Reloading, now]),
            Err(_) => notify(&[NotifyState::Reloading]),
        }
        match load(&self.config_path, &self.overrides) {
            Err(e) => tracing::error!("SIGHUP: config not reloaded, the running one stays: {e:#}"),
            Ok(mut new) => {
                let old = &self.settings;
                // Both are set up once, at start.
                if new.metrics_listen != old.metrics_listen {
                    tracing::warn!(
                        "SIGHUP: metrics_listen changed; restart the daemon to apply it"
                    );
                    new.metrics_listen = old.metrics_listen;
                }
                if new.log_format != old.log_format {
                    tracing::warn!("SIGHUP: log_format changed; restart the daemon to apply it");
                    new.log_format = old.log_format;
                }
                self.wait = self.wait.clamp(new.interval_min, new.interval_max);
                if self.running != Running::Sweep {
                    self.next = self.last_end + self.wait;
                }
                // Passes start again (also after one was turned off) on the new cadence.
                self.next_pass = new.pass_interval.map(|i| Instant::now() + i);
                self.metrics.set_dry_run(new.dry_run);
                self.metrics.set_interval(self.wait);
                let new = Arc::new(new);
                if new.events != old.events || new.identity != old.identity {
                    match Events::start(&new, &self.metrics) {
                        Ok(events) => {
                            self.events = events;
                            tracing::info!(events = %self.events.state(), "SIGHUP: kernel events restarted");
                        }
                        Err(e) => tracing::error!(
                            "SIGHUP: kernel events not restarted, the running ones stay: {e:#}"
                        ),
                    }
                    self.metrics
                        .set_events(self.events.state(), self.events.dropped());
                }
                tracing::info!(
                    mode = if new.dry_run { "dry run" } else { "deleting" },
                    interval_min = %humantime::format_duration(new.interval_min),
                    interval_max = %humantime::format_duration(new.interval_max),
                    next_in = %humantime::format_duration(self.wait),
                    "SIGHUP: config reloaded"
                );
                self.events.use_settings(&new);
                self.settings = new;
            }
        }
        notify(&[NotifyState::Ready]);
    }

    async fn shutdown(&mut self, signal: i32) {
        let name = if signal == SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        notify(&[NotifyState::Stopping]);
        self.stop.store(true, Ordering::Relaxed);
        if self.running == Running::Nothing {
            tracing::info!("{name}: stopping");
            return;
        }
        match self.running {
            Running::Pass => tracing::info!("{name}: stopping after the running pass"),
            _ => tracing::info!("{name}: stopping the running sweep between two deletes"),
        }
        match tokio::time::timeout(STOP_GRACE, self.done_rx.recv()).await {
            Ok(Some(Done::Sweep(swept))) => self.finish(*swept),
            Ok(Some(Done::Pass(passed))) => self.finish_pass(*passed),
            Ok(Some(Done::Lost(running, why))) => self.lost(running, &why),
            _ => tracing::warn!(
                "{name}: the sweep is still observing; leaving without it (no delete is half-done)"
            ),
        }
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for metrics; change metrics_listen, or set it to \"\" for no metrics")
    })?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!("serving metrics on http://{bound}/metrics");
    Ok(listener)
}

/// Resolves when `sleep` does; never when there is none.
async fn maybe(sleep: Option<tokio::time::Sleep>) {
    match sleep {
        Some(s) => s.await,
        None => std::future::pending().await,
    }
}

/// Resolves when the watchdog is due; never when there is none.
async fn tick(watchdog: &mut Option<tokio::time::Interval>) {
    match watchdog {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Tells systemd; outside systemd (`NOTIFY_SOCKET` unset) it does nothing.
fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// What a sweep, a pass or a reaction did, as their journal lines say it: in a dry run how
/// many would be deleted, else how many settled each way.
fn acted(
    dry_run: bool,
    would_delete: usize,
    [deleted, already_gone, spared, failed]: [usize; 4],
) -> String {
    if dry_run {
        format!("dry run, {would_delete} would be deleted")
    } else {
        format!("deleted {deleted}, already gone {already_gone}, spared {spared}, failed {failed}")
    }
}

/// The journal lines' account of a guard that held the deletes back; empty when none did.
fn held_by(hold: Option<&Hold>) -> String {
    hold.map_or_else(String::new, |h| format!("; held by {}: {h}", h.guard()))
}

/// The map opened afresh for one sweep, pass or reaction (read-write unless a dry run), and
/// the trail when deleting.
fn open_map_and_trail(settings: &Settings) -> Result<(SockMap, Option<Trail>), RunError> {
    let access = if settings.dry_run {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let map = SockMap::open_default(settings.map.as_deref(), access)?;
    let trail = match (&settings.trail, settings.dry_run) {
        (Some(path), false) => Some(Trail::open(path)?),
        _ => None,
    };
    Ok((map, trail))
}

/// The identity iterator kept across sweeps and passes, loaded on first use and again when the
/// `identity` key changed.
fn identity_source<'a>(
    settings: &Settings,
    held: &'a mut Option<(IdentityMode, IdentitySource)>,
) -> Result<&'a mut IdentitySource, IdentityError> {
    let kept = match held.take() {
        Some((mode, source)) if mode == settings.identity => (mode, source),
        _ => (settings.identity, IdentitySource::new(settings.identity)?),
    };
    Ok(&mut held.insert(kept).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_wait_shrinks_after_stale_and_grows_after_clean_within_bounds() {
        assert_eq!(next_wait(S(600), true, S(30), S(600)), S(300));
        assert_eq!(next_wait(S(40), true, S(30), S(600)), S(30));
        assert_eq!(next_wait(S(30), false, S(30), S(600)), S(45));
        assert_eq!(next_wait(S(500), false, S(30), S(600)), S(600));
        assert_eq!(next_wait(S(1), true, S(1), S(1)), S(1));
        // From the floor back to the ceiling in a handful of clean sweeps.
        let mut w = S(30);
        let mut sweeps = 0;
        while w < S(600) {
            w = next_wait(w, false, S(30), S(600));
            sweeps += 1;
        }
        assert_eq!(sweeps, 8);
    }
}
