//! The daemon's kernel events: the watcher, whose reader thread itself counts and logs the
//! collisions and acts on the events of each wake-up at once, keeping the map, the identity
//! iterator with its compare-and-delete, and the gateways from one reaction to the next; the
//! loop gets each reaction's report for the metrics and the journal.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;

use sockmap_gc::clock::monotonic_now;
use sockmap_gc::deletion::Outcome;
use sockmap_gc::events::{Event, EventSocket, EventWatcher, EventsMode, EventsState, Heard};
use sockmap_gc::guard::{GuardSettings, Hold};
use sockmap_gc::identity::{IdentityMode, IdentitySource};
use sockmap_gc::key::SockKey;
use sockmap_gc::map::{Access, MapError, SockMap};
use sockmap_gc::observe;
use sockmap_gc::react::{self, Batch, Budget, Reaction};
use sockmap_gc::socket::TcpState;
use sockmap_gc::sweep::{RunError, SweepError, Trail};

use super::{acted, held_by, identity_source, Daemon};
use crate::cmd::config::Settings;
use crate::cmd::metrics::Metrics;

/// How often the reader, between events, makes ready what the next reaction needs: the map
/// the sweeps found at the path (re-created: compare-and-delete loaded for it) and the
/// gateways (`cilium_host`'s addresses, a netlink dump: milliseconds under emulation).
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Gateways read longer ago than this are read again before a reaction uses them.
const GATEWAYS_FRESH: Duration = Duration::from_secs(3);

type Reacted = Result<(Reaction, PathBuf), RunError>;

/// The kernel events: the watcher (absent when off or refused) and what its reactions share
/// with the loop.
pub(super) struct Events {
    mode: EventsMode,
    watcher: Option<EventWatcher>,
    /// The map id collisions are watched on (0: none yet).
    map_id: Arc<AtomicU32>,
    /// What the reactions read at each batch (SIGHUP replaces it).
    settings: Arc<Mutex<Arc<Settings>>>,
    pub(super) done_rx: mpsc::UnboundedReceiver<Reacted>,
}

impl Events {
    /// Loads the programs `events` asks for and starts their reader, which reacts, watching
    /// collisions on the map at the configured path (when it is there now; else from
    /// the first sweep that opens it). Events delete through identity's compare-and-delete:
    /// with `identity = "off"` there are none.
    pub(super) fn start(
        settings: &Arc<Settings>,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Events> {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let map_id = Arc::new(AtomicU32::new(
            SockMap::open_default(settings.map.as_deref(), Access::ReadOnly).map_or(0, |m| m.id()),
        ));
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
        let shared = Arc::new(Mutex::new(Arc::clone(settings)));
        // Loaded now, not at the first event: that one is to be acted on in milliseconds.
        let mut reactor = Reactor {
            identity: None,
            budget: Budget::default(),
            map: None,
            trail: None,
            gateways: None,
        };
        if mode != EventsMode::Off {
            reactor.identity = Some((settings.identity, IdentitySource::new(settings.identity)?));
            match reactor.prepare(settings) {
                // No map at the path yet: the first reaction opens it.
                Ok(()) | Err(RunError::Map(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut reactions = Reactions {
            reactor,
            settings: Arc::clone(&shared),
            map_id: Arc::clone(&map_id),
            metrics: Arc::clone(metrics),
            done: done_tx,
            housekept: Instant::now(),
        };
        let watcher = EventWatcher::start(mode, map_id.load(Ordering::Relaxed), move |batch| {
            reactions.on(batch)
        })
        .context("starting kernel events (set events = \"off\" to run without them)")?;
        Ok(Events {
            mode: settings.events,
            watcher,
            map_id,
            settings: shared,
            done_rx,
        })
    }

    pub(super) fn state(&self) -> EventsState {
        EventsState::of(self.mode, self.watcher.as_ref().map(|w| w.watching()))
    }

    /// Events lost to a full ring buffer.
    pub(super) fn dropped(&self) -> u64 {
        self.watcher.as_ref().map_or(0, |w| w.lost())
    }

    /// The settings the next reactions use (a reload).
    pub(super) fn use_settings(&self, settings: &Arc<Settings>) {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = Arc::clone(settings);
    }

    /// Watches collisions on the map with this id from now on (it was re-created).
    pub(super) fn watch_map(&mut self, map_id: u32) {
        if map_id == self.map_id.load(Ordering::Relaxed) {
            return;
        }
        if let Some(w) = &self.watcher {
            if let Err(e) = w.watch_map(map_id) {
                tracing::warn!("collisions on map {map_id} not watched: {e}");
                return;
            }
        }
        self.map_id.store(map_id, Ordering::Relaxed);
    }

    fn stop(&mut self) {
        self.watcher = None;
    }
}

impl Daemon {
    pub(super) fn finish_react(&mut self, outcome: Reacted) {
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
            Err(e @ (RunError::NoIdentity(_) | RunError::NoCompareAndDelete(_))) => {
                tracing::warn!("kernel events off until the next reload: {e}");
                self.events.stop();
            }
            Err(e) => tracing::error!(
                "acting on kernel events failed: {e}; the next sweep finds their entries"
            ),
        }
        self.metrics
            .set_events(self.events.state(), self.events.dropped());
    }
}

/// The reactions, run by the reader thread: each wake-up's events acted on, then its
/// collisions counted and logged, and the reaction handed to the loop; between events, the
/// housekeeping.
struct Reactions {
    reactor: Reactor,
    settings: Arc<Mutex<Arc<Settings>>>,
    map_id: Arc<AtomicU32>,
    metrics: Arc<Metrics>,
    done: mpsc::UnboundedSender<Reacted>,
    /// When the housekeeping last ran.
    housekept: Instant,
}

impl Reactions {
    fn on(&mut self, batch: &[Heard]) {
        if batch.is_empty() {
            if self.housekept.elapsed() >= HOUSEKEEPING {
                self.housekeeping();
            }
            return;
        }
        let taken = monotonic_now();
        let settings = self.settings();
        let reacted = self.reactor.react(&settings, batch, taken);
        // Logged once the delete is done: it waits for no line.
        self.collisions(batch);
        // The receiver is gone only when the daemon is exiting.
        let _ = self.done.send(reacted);
    }

    fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Each collision on the watched map, counted and logged.
    fn collisions(&self, batch: &[Heard]) {
        let watched = self.map_id.load(Ordering::Relaxed);
        for heard in batch {
            if let Event::Collision {
                map_id,
                key,
                socket,
                ..
            } = &heard.event
            {
                if *map_id == watched {
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
    }

    /// Makes ready what the next reaction needs: compare-and-delete for the map the sweeps
    /// found at the path (it was re-created), and the gateways, read again.
    fn housekeeping(&mut self) {
        self.housekept = Instant::now();
        let settings = self.settings();
        let watched = self.map_id.load(Ordering::Relaxed);
        let kept = self.reactor.map.as_ref().map(|(_, _, m)| m.id());
        if watched != 0 && kept.is_some_and(|id| id != watched) {
            self.reactor.map = None;
            if let Err(e) = self.reactor.prepare(&settings) {
                tracing::debug!("compare-and-delete not made ready for map {watched}: {e}");
            }
        }
        if settings.gateways.is_empty() {
            self.reactor.gateways = Some((Instant::now(), observe::gateways(&[])));
        }
    }
}

/// What reactions keep from one to the next: the identity iterator (with its
/// compare-and-delete), the rate budget (a reaction runs beside a sweep, so it shares
/// neither), the map, opened as configured, the trail, and the gateways found, with when.
struct Reactor {
    identity: Option<(IdentityMode, IdentitySource)>,
    budget: Budget,
    map: Option<(Option<PathBuf>, Access, SockMap)>,
    trail: Option<Trail>,
    gateways: Option<(Instant, Vec<IpAddr>)>,
}

impl Reactor {
    /// Makes ready what a reaction needs ahead of the first event: the rate limiter, the
    /// gateways and, unless a dry run, the map and its compare-and-delete.
    fn prepare(&mut self, settings: &Settings) -> Result<(), RunError> {
        self.budget.prepare(&settings.guards()?);
        self.gateways(settings);
        if settings.dry_run {
            return Ok(());
        }
        let map = kept_map(&mut self.map, settings)?;
        identity_source(settings, &mut self.identity)?.prepare_compare_and_delete(map)?;
        // One reaction to a close that names no entry runs the whole path once (the map's id
        // at the path, a compare-and-delete pass): the first real one then finds its code
        // paged in and run before, which under emulation saves it tens of milliseconds. No
        // entry is filed under the all-zero tuple, nor holds a socket with the last cookie (it
        // spends one token of the rate limit).
        let now = monotonic_now();
        let nothing = Heard {
            event: Event::Closed {
                socket: EventSocket {
                    cookie: u64::MAX,
                    local: SocketAddr::from(([0, 0, 0, 0], 0)),
                    remote: SocketAddr::from(([0, 0, 0, 0], 0)),
                    netns_inode: 0,
                },
                from: TcpState::Close,
                at: now,
            },
            at: now,
        };
        if let Err(e) = self.react(settings, &[nothing], now) {
            tracing::debug!("a reaction ahead of the first event failed: {e}");
        }
        Ok(())
    }

    /// One reaction to a batch of kernel events.
    fn react(&mut self, settings: &Settings, events: &[Heard], taken: Duration) -> Reacted {
        let guards = settings.guards()?;
        let gateways = self.gateways(settings);
        let reacted = self.react_on_kept_map(settings, &guards, &gateways, events, taken)?;
        if matches!(reacted.0.hold, Some(Hold::MapReplaced { .. })) {
            // The path holds another map now: act on that one, as the sweeps do. (The first
            // try spent its share of the rate budget: fewer deletes, never more.)
            self.map = None;
            return self.react_on_kept_map(settings, &guards, &gateways, events, taken);
        }
        Ok(reacted)
    }

    /// The configured gateways, else `cilium_host`'s as the housekeeping last read them (read
    /// now if that is older than [`GATEWAYS_FRESH`]).
    fn gateways(&mut self, settings: &Settings) -> Vec<IpAddr> {
        if !settings.gateways.is_empty() {
            return settings.gateways.clone();
        }
        match &self.gateways {
            Some((at, found)) if at.elapsed() < GATEWAYS_FRESH => found.clone(),
            _ => {
                let found = observe::gateways(&[]);
                self.gateways = Some((Instant::now(), found.clone()));
                found
            }
        }
    }

    fn react_on_kept_map(
        &mut self,
        settings: &Settings,
        guards: &GuardSettings,
        gateways: &[IpAddr],
        events: &[Heard],
        taken: Duration,
    ) -> Reacted {
        let map = kept_map(&mut self.map, settings)?;
        let source = identity_source(settings, &mut self.identity)?;
        let trail = kept_trail(&mut self.trail, settings)?;
        let batch = Batch {
            events,
            taken,
            ready: monotonic_now(),
        };
        let reaction = react::react(
            map,
            source,
            &mut self.budget,
            guards,
            gateways,
            trail,
            &batch,
        )?;
        Ok((reaction, map.path().to_path_buf()))
    }
}

/// The trail at the configured path (none in a dry run), kept open while that path is the
/// file it appends to: opened again once rotated or removed, and before any delete, so that
/// a trail that cannot be written stops the deletes, as it stops a sweep's.
fn kept_trail<'a>(
    kept: &'a mut Option<Trail>,
    settings: &Settings,
) -> Result<Option<&'a mut Trail>, SweepError> {
    let Some(path) = settings.trail.as_deref().filter(|_| !settings.dry_run) else {
        *kept = None;
        return Ok(None);
    };
    if !kept.as_ref().is_some_and(|t| t.appends_to(path)) {
        *kept = None;
        *kept = Some(Trail::open(path)?);
    }
    Ok(kept.as_mut())
}

/// The map at the configured path, kept open while the config names the same one with the
/// same access (each reaction still checks, before deleting, that the path holds it).
fn kept_map<'a>(
    kept: &'a mut Option<(Option<PathBuf>, Access, SockMap)>,
    settings: &Settings,
) -> Result<&'a SockMap, MapError> {
    let access = if settings.dry_run {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    if !matches!(kept, Some((path, a, _)) if *path == settings.map && *a == access) {
        *kept = None;
    }
    let (_, _, map) = match kept {
        Some(kept) => kept,
        None => kept.insert((
            settings.map.clone(),
            access,
            SockMap::open_default(settings.map.as_deref(), access)?,
        )),
    };
    Ok(map)
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
    line += &acted(
        r.dry_run,
        r.would_delete.len(),
        [
            r.count(Outcome::Deleted),
            r.count(Outcome::AlreadyGone),
            r.count(Outcome::Spared),
            r.count(Outcome::Failed),
        ],
    );
    if r.over_cap + r.rate_limited > 0 {
        line += &format!(
            "; {} over max_deletes, {} held back by rate_limit (the next sweep takes them)",
            r.over_cap, r.rate_limited
        );
    }
    line += &held_by(r.hold.as_ref());
    line += &format!("; took {} ms", r.took.as_millis());
    line
}
