//! The daemon's kernel events: the watcher and its queue, collisions logged as they come, and
//! the queued events acted on in one reaction at a time, on a thread of its own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::mpsc;

use sockmap_gc::deletion::Outcome;
use sockmap_gc::events::{Event, EventWatcher, EventsMode, EventsState};
use sockmap_gc::guard::SettingsError;
use sockmap_gc::identity::{IdentityError, IdentityMode, IdentitySource};
use sockmap_gc::key::SockKey;
use sockmap_gc::map::{Access, MapError, SockMap};
use sockmap_gc::observe;
use sockmap_gc::react::{self, Budget, ReactError, Reaction};
use sockmap_gc::sweep::SweepError;

use super::{open_map_and_trail, Daemon};
use crate::cmd::config::Settings;

/// Kernel events queued between the reader thread and the loop; beyond this they are counted
/// as dropped (the next sweep still finds their entries).
const EVENT_QUEUE: usize = 4096;

/// Why one reaction to kernel events failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReactFailed {
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
pub(super) struct Events {
    mode: EventsMode,
    watcher: Option<EventWatcher>,
    /// The map id collisions are watched on (0: none yet).
    map_id: u32,
    pub(super) rx: mpsc::Receiver<Event>,
    dropped: Arc<AtomicU64>,
    pending: Vec<Event>,
    reacting: bool,
    done_tx: mpsc::UnboundedSender<Result<(Reaction, PathBuf), ReactFailed>>,
    pub(super) done_rx: mpsc::UnboundedReceiver<Result<(Reaction, PathBuf), ReactFailed>>,
    reactor: Arc<Mutex<Reactor>>,
}

#[derive(Default)]
struct Reactor {
    identity: Option<(IdentityMode, IdentitySource)>,
    budget: Budget,
}

impl Events {
    /// Loads the programs `events` asks for and starts their reader, watching collisions on
    /// the map at the configured path (when it is there now; else from the first sweep that
    /// opens it). Events delete through identity's compare-and-delete: with `identity =
    /// "off"` there are none.
    pub(super) fn start(settings: &Settings) -> anyhow::Result<Events> {
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

    pub(super) fn state(&self) -> EventsState {
        EventsState::of(self.mode, self.watcher.as_ref().map(|w| w.watching()))
    }

    /// Lost events: the kernel's (ring buffer full) and the queue's.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed) + self.watcher.as_ref().map_or(0, |w| w.lost())
    }

    /// Watches collisions on the map with this id from now on (it was re-created).
    pub(super) fn watch_map(&mut self, map_id: u32) {
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

impl Daemon {
    /// A kernel event: a collision is counted and logged at once; then the queued events are
    /// acted on in one reaction, unless one runs (its end starts the next).
    pub(super) fn on_event(&mut self, event: Event) {
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

    pub(super) fn finish_react(&mut self, outcome: Result<(Reaction, PathBuf), ReactFailed>) {
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
}

/// One reaction to a batch of kernel events, on the calling (dedicated) thread: opens the map
/// afresh, as a sweep does.
fn react_once(
    settings: &Settings,
    reactor: &Mutex<Reactor>,
    events: &[Event],
) -> Result<(Reaction, PathBuf), ReactFailed> {
    let (map, mut trail) = open_map_and_trail::<ReactFailed>(settings)?;
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
