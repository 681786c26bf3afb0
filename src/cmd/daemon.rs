//! `sockmap-gc daemon`: guarded sweeps on an adaptive interval and, with identity, a continuous
//! pass every second, for systemd (`Type=notify`, watchdog, `STATUS=`), with signals (HUP
//! reload, USR1 sweep now, TERM/INT stop) and metrics.
//!
//! One event loop, two cadences: a full sweep on its adaptive interval, and a continuous pass
//! (one iterator read, [`crate::pass`]) every `pass_interval`, stretched to `pass_cpu_budget`.
//! One of them runs at a time. The loop is a single-threaded tokio runtime; each sweep or pass
//! runs the blocking engine on a thread of its own, and a sweep itself starts the threads that
//! `setns` (never a runtime thread).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use futures_util::StreamExt;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;

use sockmap_gc::deletion::Outcome;
use sockmap_gc::events::{Event, EventWatcher, EventsMode, EventsState};
use sockmap_gc::guard::SettingsError;
use sockmap_gc::holder::{self, HolderSource};
use sockmap_gc::identity::{IdentityError, IdentityMode, IdentitySource};
use sockmap_gc::key::SockKey;
use sockmap_gc::map::{Access, MapError, SockMap};
use sockmap_gc::observation::{Filter, Judged};
use sockmap_gc::observe;
use sockmap_gc::pass::{self, PassError, PassReport, PassState};
use sockmap_gc::react::{self, Budget, ReactError, Reaction};
use sockmap_gc::report::{self, Summary};
use sockmap_gc::sweep::{self, SweepError, SweepReport, SweepSettings, Trail};

use crate::cmd::config::{self, Overrides, Settings};
use crate::cmd::metrics::{self, Metrics};
/// After SIGTERM, how long a running sweep gets to reach its next delete boundary. Leaving
/// then is safe: each delete is one syscall, and the next start re-observes from scratch.
const STOP_GRACE: Duration = Duration::from_millis(1500);
/// Kernel events queued between the reader thread and the loop; beyond this they are counted
/// as dropped (the next sweep still finds their entries).
const EVENT_QUEUE: usize = 4096;

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

/// Why one sweep of the daemon failed before its report; the next sweep tries again.
#[derive(Debug, thiserror::Error)]
enum SweepFailed {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Sweep(#[from] SweepError),
    #[error("config: {0}")]
    Settings(#[from] SettingsError),
}

/// Why one reaction to kernel events failed.
#[derive(Debug, thiserror::Error)]
enum ReactFailed {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Sweep(#[from] SweepError),
    #[error(transparent)]
    React(#[from] ReactError),
    #[error("config: {0}")]
    Settings(#[from] SettingsError),
}

/// The kernel events: the watcher (absent when off or refused), the queue its reader thread
/// fills, and the reactions' own identity iterator and rate budget (a reaction runs beside a
/// sweep, so it shares neither).
struct Events {
    mode: EventsMode,
    watcher: Option<EventWatcher>,
    /// The map id collisions are watched on (0: none yet).
    map_id: u32,
    rx: mpsc::Receiver<Event>,
    dropped: Arc<AtomicU64>,
    pending: Vec<Event>,
    reacting: bool,
    done_tx: mpsc::UnboundedSender<Result<(Reaction, PathBuf), ReactFailed>>,
    done_rx: mpsc::UnboundedReceiver<Result<(Reaction, PathBuf), ReactFailed>>,
    reactor: Arc<Mutex<Reactor>>,
}

#[derive(Default)]
struct Reactor {
    identity: Option<(IdentityMode, IdentitySource)>,
    budget: Budget,
}

/// What a sweep thread hands back.
struct Swept {
    outcome: Result<(SweepReport, PathBuf), SweepFailed>,
    took: Duration,
}

/// What a sweep or pass thread hands back.
enum Done {
    Sweep(Box<Swept>),
    Pass(Box<Passed>),
}

/// What a pass thread hands back, and when the pass started.
struct Passed {
    outcome: Result<(PassReport, PathBuf), PassError>,
    started: Instant,
}

/// What runs now: one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Running {
    Nothing,
    Sweep,
    Pass,
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
        let events = Events::start(&settings)?;
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
            settings: Arc::new(settings),
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
                },
                Some(event) = self.events.rx.recv() => self.on_event(event),
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

    fn start_sweep(&mut self) {
        let settings = Arc::clone(&self.settings);
        let stop = Arc::clone(&self.stop);
        let identity = Arc::clone(&self.identity);
        let holders = Arc::clone(&self.holders);
        let done = self.done_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("sweep".into())
            .spawn(move || {
                let started = Instant::now();
                let outcome = sweep_once(&settings, &stop, &identity, &holders);
                // The receiver is gone only when the daemon is exiting.
                let _ = done.send(Done::Sweep(Box::new(Swept {
                    outcome,
                    took: started.elapsed(),
                })));
            });
        match spawned {
            Ok(_) => self.running = Running::Sweep,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a sweep thread; trying again after the interval");
                self.metrics.record_error(Duration::ZERO);
                self.schedule();
            }
        }
    }

    fn start_pass(&mut self) {
        let settings = Arc::clone(&self.settings);
        let identity = Arc::clone(&self.identity);
        let state = Arc::clone(&self.pass_state);
        let done = self.done_tx.clone();
        let started = Instant::now();
        let spawned = std::thread::Builder::new()
            .name("pass".into())
            .spawn(move || {
                let outcome = pass_once(&settings, &identity, &state, started);
                // The receiver is gone only when the daemon is exiting.
                let _ = done.send(Done::Pass(Box::new(Passed { outcome, started })));
            });
        match spawned {
            Ok(_) => self.running = Running::Pass,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a pass thread; trying again after the interval");
                self.metrics.record_pass_error();
                self.schedule_pass(started, false, Duration::ZERO);
            }
        }
    }

    fn finish_pass(&mut self, Passed { outcome, started }: Passed) {
        self.running = Running::Nothing;
        match outcome {
            Ok((report, path)) => {
                if std::mem::take(&mut self.pass_failing) {
                    tracing::info!("passes work again");
                }
                self.metrics.record_pass(&report);
                self.events.watch_map(report.map_id);
                let line = pass_line(&report, &path);
                if report.is_quiet() {
                    tracing::debug!("{line}");
                } else {
                    tracing::info!("{line}");
                    notify(&[NotifyState::Status(&line)]);
                }
                let awaiting = report.decision.unconfirmed > 0;
                self.schedule_pass(started, awaiting, report.cpu);
            }
            Err(e @ (PassError::NoIdentity | PassError::NoCompareAndDelete)) => {
                self.metrics.record_pass_error();
                tracing::warn!("continuous pass off until the next reload: {e}");
                self.next_pass = None;
            }
            Err(e) => {
                self.metrics.record_pass_error();
                // A missing map fails every pass, once a second: said once, then at debug
                // (the sweeps say it on their own cadence, and the metric counts each).
                if std::mem::replace(&mut self.pass_failing, true) {
                    tracing::debug!("pass failed: {e}");
                } else {
                    tracing::error!("pass failed: {e}; said once until a pass works again");
                }
                self.schedule_pass(started, false, Duration::ZERO);
            }
        }
    }

    /// The next pass: `pass_interval` after this one's start (`confirm_after` when entries
    /// await confirmation and that is sooner), stretched to the CPU budget.
    fn schedule_pass(&mut self, started: Instant, awaiting: bool, cpu: Duration) {
        let s = &self.settings;
        self.next_pass = s.pass_interval.map(|interval| {
            let awaiting = awaiting.then_some(s.confirm_after);
            let wait = pass::next_pass_wait(interval, awaiting, cpu, s.pass_cpu_budget);
            started.checked_add(wait).unwrap_or_else(far_future)
        });
    }

    fn finish(&mut self, swept: Swept) {
        self.running = Running::Nothing;
        let line = match swept.outcome {
            Ok((report, path)) => {
                self.metrics.record_sweep(&report, SystemTime::now());
                self.events.watch_map(report.map_id);
                self.wait = next_wait(
                    self.wait,
                    report.plan.stale > 0,
                    self.settings.interval_min,
                    self.settings.interval_max,
                );
                let line = summary_line(&report, &path, self.wait);
                tracing::info!("{line}");
                if let Some(holders) = holders_line(&report) {
                    tracing::info!("{holders}");
                }
                line
            }
            Err(e) => {
                self.metrics.record_error(swept.took);
                let line = format!(
                    "sweep failed: {e}; next in {}",
                    humantime::format_duration(self.wait)
                );
                tracing::error!("{line}");
                line
            }
        };
        notify(&[NotifyState::Status(&line)]);
        self.schedule();
    }

    /// A kernel event: a collision is counted and logged at once; then the queued events are
    /// acted on in one reaction, unless one runs (its end starts the next).
    fn on_event(&mut self, event: Event) {
        let mut batch = vec![event];
        while let Ok(more) = self.events.rx.try_recv() {
            batch.push(more);
        }
        for event in &batch {
            if let Event::Collision {
                map_id,
                key,
                socket,
                ..
            } = event
            {
                if *map_id == self.events.map_id {
                    self.metrics.record_collision();
                    let entry =
                        SockKey::decode(key).map_or_else(|e| e.to_string(), |k| k.to_string());
                    tracing::warn!(
                        key = %key.to_hex(),
                        entry = %entry,
                        refused_local = %socket.local,
                        refused_remote = %socket.remote,
                        refused_cookie = socket.cookie,
                        "collision: a new connection could not be filed under this key, an entry holds it; its request hangs until the entry goes"
                    );
                }
            }
        }
        self.events.pending.extend(batch);
        self.start_react();
    }

    fn start_react(&mut self) {
        if self.events.reacting || self.events.pending.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.events.pending);
        let settings = Arc::clone(&self.settings);
        let reactor = Arc::clone(&self.events.reactor);
        let done = self.events.done_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("react".into())
            .spawn(move || {
                // The receiver is gone only when the daemon is exiting.
                let _ = done.send(react_once(&settings, &reactor, &batch));
            });
        match spawned {
            Ok(_) => self.events.reacting = true,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a reaction thread; the next sweep finds these entries")
            }
        }
    }

    fn finish_react(&mut self, outcome: Result<(Reaction, PathBuf), ReactFailed>) {
        self.events.reacting = false;
        match outcome {
            Ok((reaction, path)) => {
                self.metrics.record_reaction(&reaction);
                self.events.watch_map(reaction.map_id);
                let line = react_line(&reaction, &path);
                if reaction.is_quiet() {
                    tracing::debug!("{line}");
                } else {
                    tracing::info!("{line}");
                }
            }
            Err(ReactFailed::React(
                e @ (ReactError::NoIdentity | ReactError::NoCompareAndDelete),
            )) => {
                tracing::warn!("kernel events off until the next reload: {e}");
                self.events.stop();
            }
            Err(e) => tracing::error!(
                "acting on kernel events failed: {e}; the next sweep finds their entries"
            ),
        }
        self.metrics
            .set_events(self.events.state(), self.events.dropped());
        self.start_react();
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
                if new.events != old.events || new.identity != old.identity {
                    match Events::start(&new) {
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
                self.settings = Arc::new(new);
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

/// A time no pass will reach (a stretched wait past the clock's range).
fn far_future() -> Instant {
    Instant::now() + sockmap_gc::guard::MAX_DURATION
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

impl Events {
    /// Loads the programs `events` asks for and starts their reader, watching collisions on
    /// the map at the configured path (when it is there now; else from the first sweep that
    /// opens it). Events delete through identity's compare-and-delete: with `identity =
    /// "off"` there are none.
    fn start(settings: &Settings) -> anyhow::Result<Events> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&dropped);
        let map_id =
            SockMap::open_default(settings.map.as_deref(), Access::ReadOnly).map_or(0, |m| m.id());
        let mode = match (settings.events, settings.identity) {
            (EventsMode::On, IdentityMode::Off) => anyhow::bail!(
                "events = \"on\" needs identity (events delete through its compare-and-delete): set identity = \"auto\" or \"on\", or events = \"off\""
            ),
            (EventsMode::Auto, IdentityMode::Off) => {
                tracing::warn!("kernel events unavailable: identity = \"off\", and events delete through its compare-and-delete; sweeps only");
                EventsMode::Off
            }
            (mode, _) => mode,
        };
        let watcher = EventWatcher::start(mode, map_id, move |event| {
            if tx.try_send(event).is_err() {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        })
        .context("starting kernel events (set events = \"off\" to run without them)")?;
        let reactor = Arc::new(Mutex::new(Reactor::default()));
        if watcher.is_some() && !settings.dry_run {
            // Loaded now, not at the first event: that one is to be acted on in milliseconds.
            let mut r = reactor.lock().unwrap_or_else(|e| e.into_inner());
            let mut source = IdentitySource::new(settings.identity)?;
            if let Ok(map) = SockMap::open_default(settings.map.as_deref(), Access::ReadWrite) {
                source.prepare_compare_and_delete(&map)?;
            }
            r.identity = Some((settings.identity, source));
        }
        Ok(Events {
            mode: settings.events,
            watcher,
            map_id,
            rx,
            dropped,
            pending: Vec::new(),
            reacting: false,
            done_tx,
            done_rx,
            reactor,
        })
    }

    fn state(&self) -> EventsState {
        EventsState::of(self.mode, self.watcher.as_ref().map(|w| w.watching()))
    }

    /// Lost events: the kernel's (ring buffer full) and the queue's.
    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed) + self.watcher.as_ref().map_or(0, |w| w.lost())
    }

    /// Watches collisions on the map with this id from now on (it was re-created).
    fn watch_map(&mut self, map_id: u32) {
        if map_id == self.map_id {
            return;
        }
        if let Some(w) = &self.watcher {
            if let Err(e) = w.watch_map(map_id) {
                tracing::warn!("collisions on map {map_id} not watched: {e}");
                return;
            }
        }
        self.map_id = map_id;
    }

    fn stop(&mut self) {
        self.watcher = None;
        self.pending.clear();
    }
}

/// One reaction to a batch of kernel events, on the calling (dedicated) thread: opens the map
/// afresh, as a sweep does.
fn react_once(
    settings: &Settings,
    reactor: &Mutex<Reactor>,
    events: &[Event],
) -> Result<(Reaction, PathBuf), ReactFailed> {
    let access = if settings.dry_run {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let map = SockMap::open_default(settings.map.as_deref(), access)?;
    let mut trail = match (&settings.trail, settings.dry_run) {
        (Some(path), false) => Some(Trail::open(path)?),
        _ => None,
    };
    // One reaction runs at a time, so the lock is never contended.
    let mut reactor = reactor.lock().unwrap_or_else(|e| e.into_inner());
    let Reactor { identity, budget } = &mut *reactor;
    if identity
        .as_ref()
        .is_none_or(|(mode, _)| *mode != settings.identity)
    {
        *identity = Some((settings.identity, IdentitySource::new(settings.identity)?));
    }
    let Some((_, source)) = identity.as_mut() else {
        return Err(ReactError::NoIdentity.into());
    };
    let reaction = react::react(
        &map,
        source,
        budget,
        &settings.guards()?,
        &observe::gateways(&settings.gateways),
        trail.as_mut(),
        events,
    )?;
    Ok((reaction, map.path().to_path_buf()))
}

/// A reaction's journal line (info when it did something, debug otherwise).
fn react_line(r: &Reaction, map: &Path) -> String {
    let mut line = format!(
        "events {}: {} (id {}): {} events, {} entries judged stale; ",
        if r.hold.is_some() { "held" } else { "ok" },
        map.display(),
        r.map_id,
        r.events,
        r.named
    );
    if r.dry_run {
        line += &format!("dry run, {} would be deleted", r.would_delete.len());
    } else {
        line += &format!(
            "deleted {}, already gone {}, spared {}, failed {}",
            r.count(Outcome::Deleted),
            r.count(Outcome::AlreadyGone),
            r.count(Outcome::Spared),
            r.count(Outcome::Failed)
        );
    }
    if r.over_cap + r.rate_limited > 0 {
        line += &format!(
            "; {} over max_deletes, {} held back by rate_limit (the next sweep takes them)",
            r.over_cap, r.rate_limited
        );
    }
    if let Some(hold) = &r.hold {
        line += &format!("; held by {}: {hold}", hold.guard());
    }
    line += &format!("; took {} ms", r.took.as_millis());
    line
}

/// One sweep, on the calling (dedicated) thread: opens the map afresh, since an agent may
/// have re-created it since the last sweep.
fn sweep_once(
    settings: &Settings,
    stop: &AtomicBool,
    identity: &Mutex<Option<(IdentityMode, IdentitySource)>>,
    holders: &Mutex<HolderSource>,
) -> Result<(SweepReport, PathBuf), SweepFailed> {
    let access = if settings.dry_run {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let map = SockMap::open_default(settings.map.as_deref(), access)?;
    let mut trail = match (&settings.trail, settings.dry_run) {
        (Some(path), false) => Some(Trail::open(path)?),
        _ => None,
    };
    let sweep_settings = SweepSettings::new(
        settings.guards()?,
        Filter::default(),
        observe::gateways(&settings.gateways),
        PathBuf::from("/"),
    );
    // One sweep or pass runs at a time, so the lock is never contended.
    let mut held = identity.lock().unwrap_or_else(|e| e.into_inner());
    let source = identity_source(settings, &mut held)?;
    let mut report = sweep::sweep(
        &map,
        &sweep_settings,
        source,
        stop,
        trail.as_mut(),
        &mut |_| {},
    )?;
    // After the deletes, so the search never delays one; a deleted entry's holder still
    // keeps its socket.
    let mut holders = holders.lock().unwrap_or_else(|e| e.into_inner());
    holder::diagnose(&mut report.second, &mut holders);
    Ok((report, map.path().to_path_buf()))
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

/// One continuous pass, on the calling (dedicated) thread: opens the map afresh, since an
/// agent may have re-created it since the last pass.
fn pass_once(
    settings: &Settings,
    identity: &Mutex<Option<(IdentityMode, IdentitySource)>>,
    state: &Mutex<PassState>,
    started: Instant,
) -> Result<(PassReport, PathBuf), PassError> {
    let access = if settings.dry_run {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let map = SockMap::open_default(settings.map.as_deref(), access)?;
    let mut trail = match (&settings.trail, settings.dry_run) {
        (Some(path), false) => Some(Trail::open(path)?),
        _ => None,
    };
    let guards = settings.guards()?;
    // One sweep or pass runs at a time, so the locks are never contended.
    let mut held = identity.lock().unwrap_or_else(|e| e.into_inner());
    let source = identity_source(settings, &mut held)?;
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    let report = pass::pass(
        &map,
        source,
        &mut state,
        &guards,
        &observe::gateways(&settings.gateways),
        trail.as_mut(),
        started,
    )?;
    Ok((report, map.path().to_path_buf()))
}

/// A pass's journal line (info when it did something, debug otherwise).
fn pass_line(r: &PassReport, map: &Path) -> String {
    let d = &r.decision;
    let mut line = format!(
        "pass {}: {} (id {}): {} entries, {} stale; ",
        if r.hold.is_some() { "held" } else { "ok" },
        map.display(),
        r.map_id,
        r.entries,
        d.stale
    );
    if r.dry_run {
        line += &format!("dry run, {} would be deleted", d.delete.len());
    } else {
        line += &format!(
            "deleted {}, already gone {}, spared {}, failed {}",
            r.deleted.len(),
            r.already_gone,
            r.spared,
            r.failed
        );
    }
    if d.unconfirmed > 0 {
        line += &format!("; {} await confirmation", d.unconfirmed);
    }
    if d.over_cap + d.rate_limited > 0 {
        line += &format!(
            "; {} over max_deletes, {} held back by rate_limit",
            d.over_cap, d.rate_limited
        );
    }
    if let Some(hold) = &r.hold {
        line += &format!("; held by {}: {hold}", hold.guard());
    }
    line += &format!(
        "; took {} ms ({} ms CPU)",
        r.took.as_millis(),
        r.cpu.as_millis()
    );
    line
}

/// One log line per sweep with stale entries naming who keeps them: the counts per holder
/// class and the top processes and pods.
fn holders_line(r: &SweepReport) -> Option<String> {
    let stale: Vec<&Judged> = r
        .second
        .entries
        .iter()
        .filter(|e| e.verdict.is_stale())
        .collect();
    let s = report::stale_by_holder(&r.second, &stale)?;
    let classes: Vec<String> = s.by_class.iter().map(|(c, n)| format!("{c} {n}")).collect();
    let mut line = format!("stale by holder: {}", classes.join(", "));
    if !s.top_processes.is_empty() {
        let top: Vec<String> = s
            .top_processes
            .iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect();
        line += &format!("; top processes: {}", top.join(", "));
    }
    if !s.top_pods.is_empty() {
        let top: Vec<String> = s.top_pods.iter().map(|(p, n)| format!("{p} {n}")).collect();
        line += &format!("; top pods: {}", top.join(", "));
    }
    Some(line)
}

/// The sweep's one-line summary: the log line and systemd's `STATUS=`.
fn summary_line(r: &SweepReport, map: &Path, next: Duration) -> String {
    let s = Summary::of(&r.second.entries);
    let mut line = format!(
        "sweep {}: {} (id {}): {} entries, {} live, {} stale, {} unknown; ",
        metrics::sweep_result(r),
        map.display(),
        r.map_id,
        s.entries,
        s.live,
        s.stale,
        s.unknown
    );
    if r.dry_run {
        line += &format!(
            "dry run, {} would be deleted",
            r.plan.delete.len() + r.plan.over_cap
        );
    } else {
        line += &format!(
            "deleted {}, already gone {}, spared {}, failed {}",
            r.deleted.len(),
            r.already_gone.len(),
            r.spared.len(),
            r.failed.len()
        );
    }
    line += &format!("; {} left behind", r.left_behind());
    if r.plan.unconfirmed > 0 {
        line += &format!(" ({} await confirmation)", r.plan.unconfirmed);
    }
    if let Some(hold) = &r.plan.hold {
        line += &format!("; held by {}: {hold}", hold.guard());
    }
    line += &format!(
        "; took {:.1}s; next in {}",
        r.took.as_secs_f64(),
        humantime::format_duration(next)
    );
    line
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
