//! Runs one guarded sweep: observe twice, plan with the guards, re-check, delete, report.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use serde::Serialize;

use crate::deletion::{self, DeleteError, Route, Settled, Step};
use crate::guard::{self, GuardSettings, Plan, SettingsError};
use crate::identity::{IdentityError, IdentitySource, Target};
use crate::key::{RawKey, SockKey};
use crate::map::{MapError, SockMap};
use crate::observation::{Filter, Observation};
use crate::observe::{self, ObserveError, Sockets};
use crate::verdict::{classify, has_key_ends, is_proxy_key, HeldView, Verdict};

/// How old the inventory behind a delete's re-check may be.
pub const RECHECK_MAX_AGE: Duration = Duration::from_secs(1);

/// Everything a sweep needs besides the map, validated once.
#[derive(Debug, Clone)]
pub struct SweepSettings {
    pub guards: GuardSettings,
    pub filter: Filter,
    pub gateways: Vec<IpAddr>,
    pub proc_root: PathBuf,
    /// The socket inventory used for the last re-check before a delete is refreshed once
    /// it is older than this.
    pub recheck_max_age: Duration,
}

impl SweepSettings {
    /// The one way the command line and the daemon build a sweep's settings: `guards` come
    /// validated from [`GuardSettings::new`]; `gateways` as [`observe::gateways`] resolves
    /// them.
    pub fn new(
        guards: GuardSettings,
        filter: Filter,
        gateways: Vec<IpAddr>,
        proc_root: PathBuf,
    ) -> SweepSettings {
        SweepSettings {
            guards,
            filter,
            gateways,
            proc_root,
            recheck_max_age: RECHECK_MAX_AGE,
        }
    }
}

/// Why the delete phase ended before its plan did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "why")]
pub enum Interrupted {
    /// SIGINT/SIGTERM: stopped between two deletes.
    Signal,
    /// A re-check inventory was incomplete: nothing more is deleted.
    RecheckIncomplete { unreadable: usize },
}

/// What one sweep did.
#[derive(Debug, Clone)]
pub struct SweepReport {
    pub map_id: u32,
    pub dry_run: bool,
    pub rate_limit: Option<NonZeroU32>,
    /// The first observation, with its stale entries only (all the guards compare).
    pub first: Observation,
    pub second: Observation,
    pub plan: Plan,
    /// Between the starts of the two observations.
    pub apart: Duration,
    pub deleted: Vec<RawKey>,
    pub already_gone: Vec<RawKey>,
    /// Confirmed stale, but the re-check just before the delete found a live owner.
    pub spared: Vec<RawKey>,
    pub failed: Vec<(RawKey, DeleteError)>,
    pub interrupted: Option<Interrupted>,
    /// From just before the first delete to just after the last.
    pub delete_phase: Duration,
    pub took: Duration,
}

impl SweepReport {
    /// Stale entries that are still in the map after this sweep.
    pub fn left_behind(&self) -> usize {
        deletion::left_behind(self.plan.stale, self.deleted.len(), self.already_gone.len())
    }

    /// Files one settled entry under its outcome.
    fn file(&mut self, raw: RawKey, settled: Settled) {
        match settled {
            Settled::Deleted => self.deleted.push(raw),
            Settled::AlreadyGone => self.already_gone.push(raw),
            Settled::Spared(_) => self.spared.push(raw),
            Settled::Failed(e) => self.failed.push((raw, e)),
        }
    }

    /// Nothing stale was left, and no guard or signal cut the sweep short: the map is clean
    /// as far as the evidence goes.
    pub fn is_clean(&self) -> bool {
        self.left_behind() == 0 && self.plan.hold.is_none() && self.interrupted.is_none()
    }
}

/// How far the delete phase is, for a progress display.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error("cannot append to the trail file {path}: {error}; fix the path or leave --trail out")]
    Trail { path: PathBuf, error: io::Error },
}

/// What deletes between full sweeps: the continuous pass and the reactions to kernel events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worker {
    Pass,
    Events,
}

impl Worker {
    /// What it is left without when identity is off or refused.
    fn without_identity(self) -> &'static str {
        match self {
            Worker::Pass => "the continuous pass needs the sockmap iterator; full sweeps continue",
            Worker::Events => "kernel events delete through its compare-and-delete",
        }
    }

    /// What it is left without when compare-and-delete is refused.
    fn without_compare_and_delete(self) -> &'static str {
        match self {
            Worker::Pass => "the continuous pass deletes only through it; full sweeps continue",
            Worker::Events => "kernel events delete only through it",
        }
    }
}

/// Why a sweep, a pass or a reaction to kernel events could not run; the next one tries again.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Sweep(#[from] SweepError),
    #[error("config: {0}")]
    Settings(#[from] SettingsError),
    #[error("identity is not in use (off, or refused by this kernel): {}", .0.without_identity())]
    NoIdentity(Worker),
    #[error("in-kernel compare-and-delete is refused on this kernel: {}", .0.without_compare_and_delete())]
    NoCompareAndDelete(Worker),
}

/// The append-only JSON-lines record of deletions, for the post-mortem.
#[derive(Debug)]
pub struct Trail {
    path: PathBuf,
    file: File,
}

#[derive(Serialize)]
struct TrailLine<'a> {
    time: String,
    map: &'a str,
    map_id: u32,
    key: String,
    family: Option<String>,
    local: Option<String>,
    remote: Option<String>,
    reason: &'a str,
    outcome: &'a str,
}

impl Trail {
    pub fn open(path: &Path) -> Result<Trail, SweepError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|error| SweepError::Trail {
                path: path.to_path_buf(),
                error,
            })?;
        Ok(Trail {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Whether this trail appends to the file at `path` now (not one rotated away or removed
    /// since it was opened): a trail kept open between reactions is opened again otherwise.
    pub fn appends_to(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), std::fs::metadata(path)) {
            (Ok(open), Ok(now)) => open.dev() == now.dev() && open.ino() == now.ino(),
            _ => false,
        }
    }

    pub(crate) fn record(
        &mut self,
        map: &SockMap,
        raw: &RawKey,
        reason: &str,
        outcome: &str,
    ) -> Result<(), SweepError> {
        let key = SockKey::decode(raw).ok();
        let line = TrailLine {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            map: &map.path().to_string_lossy(),
            map_id: map.id(),
            key: raw.to_hex(),
            family: key.map(|k| k.family.to_string()),
            local: key.map(|k| k.local.to_string()),
            remote: key.map(|k| k.remote.to_string()),
            reason,
            outcome,
        };
        let mut text = serde_json::to_string(&line).map_err(|e| SweepError::Trail {
            path: self.path.clone(),
            error: io::Error::other(e),
        })?;
        text.push('\n');
        // One write per line: O_APPEND keeps concurrent writers' lines whole.
        self.file
            .write_all(text.as_bytes())
            .map_err(|error| SweepError::Trail {
                path: self.path.clone(),
                error,
            })
    }
}

/// Sleeps `total`, waking early when `stop` is set.
fn sleep_unless_stopped(total: Duration, stop: &AtomicBool) {
    // A wait past the clock's range (`--confirm-after 500000000000y`) lasts until stopped;
    // `Instant + Duration` would panic.
    let until = Instant::now().checked_add(total);
    while !stop.load(Ordering::Relaxed) {
        let left = until.map_or(Duration::MAX, |u| {
            u.saturating_duration_since(Instant::now())
        });
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Observes twice, applies the guards and, unless it is a dry run, deletes.
///
/// Between the plan and each delete the entry is judged again against a socket inventory at
/// most `recheck_max_age` old; with identity, the delete itself happens in the kernel and
/// only if the entry still holds the very socket that was judged. `stop` is honoured between
/// two deletes.
pub fn sweep(
    map: &SockMap,
    settings: &SweepSettings,
    identity: &mut IdentitySource,
    stop: &AtomicBool,
    trail: Option<&mut Trail>,
    progress: &mut dyn FnMut(Progress),
) -> Result<SweepReport, SweepError> {
    let started = Instant::now();
    let mut first = observe::observe(map, &settings.proc_root, &settings.gateways, identity)?;
    // The guards need only the first observation's stale entries; on a full map the rest is
    // most of the sweep's memory.
    first.entries.retain(|e| e.verdict.is_stale());
    first.entries.shrink_to_fit();
    sleep_unless_stopped(settings.guards.confirm_after, stop);
    let apart = started.elapsed();
    let second = observe::observe(map, &settings.proc_root, &settings.gateways, identity)?;
    let mut plan = guard::plan(&first, &second, &settings.filter, &settings.guards);
    // Both observations read the map through the fd opened before them, so their ids agree
    // even when an agent re-created the map at the path in between: ask the path.
    if plan.hold.is_none() {
        if let Some(hold) = pin_moved(map) {
            plan.hold = Some(hold);
            plan.delete.clear();
            plan.over_cap = 0;
        }
    }
    let mut report = SweepReport {
        map_id: second.map_id,
        dry_run: settings.guards.dry_run,
        rate_limit: settings.guards.rate_limit,
        first,
        second,
        plan,
        apart,
        deleted: Vec::new(),
        already_gone: Vec::new(),
        spared: Vec::new(),
        failed: Vec::new(),
        interrupted: None,
        delete_phase: Duration::ZERO,
        took: Duration::ZERO,
    };
    if stop.load(Ordering::Relaxed) {
        report.interrupted = Some(Interrupted::Signal);
    } else if !report.dry_run && report.plan.hold.is_none() && !report.plan.delete.is_empty() {
        let mut deleter = Deleter {
            map,
            identity,
            trail,
            pending: Vec::new(),
            pending_since: Instant::now(),
        };
        delete_phase(&mut deleter, settings, stop, progress, &mut report)?;
    }
    report.took = started.elapsed();
    Ok(report)
}

/// The map-replaced hold when the path no longer holds the map `map` reads (re-created, or
/// unpinned: second id 0).
fn pin_moved(map: &SockMap) -> Option<guard::Hold> {
    let now = match map.id_at_path_now() {
        Ok(id) if id == map.id() => return None,
        Ok(id) => id,
        Err(e) => {
            tracing::debug!(error = %e, "the map's pin is gone");
            0
        }
    };
    Some(guard::Hold::MapReplaced {
        first_id: map.id(),
        second_id: now,
    })
}

/// Holds a re-checked entry at most this long before its compare-and-delete pass: each pass
/// walks the whole map, so it runs a few times a second, not once per entry. A pass takes at
/// most as many entries as the program's `targets` map holds.
const CAD_MAX_DELAY: Duration = Duration::from_millis(250);

/// Carries out deletions: by key, or batched through in-kernel compare-and-delete.
struct Deleter<'a> {
    map: &'a SockMap,
    identity: &'a mut IdentitySource,
    trail: Option<&'a mut Trail>,
    /// Re-checked entries waiting for compare-and-delete, with their verdicts.
    pending: Vec<(Target, Verdict)>,
    /// When the first of `pending` was queued.
    pending_since: Instant,
}

impl Deleter<'_> {
    /// Files `settled` in the report, logs it and writes it to the trail.
    fn record(
        &mut self,
        report: &mut SweepReport,
        raw: RawKey,
        verdict: &Verdict,
        settled: Settled,
    ) -> Result<(), SweepError> {
        log_settled(&raw, verdict, &settled);
        if let (Some(t), Some(label)) = (self.trail.as_deref_mut(), settled.trail_label()) {
            t.record(self.map, &raw, &verdict.to_string(), &label)?;
        }
        report.file(raw, settled);
        Ok(())
    }

    /// Settles `step` for one entry: deletes by key where it says so.
    fn settle(
        &mut self,
        report: &mut SweepReport,
        raw: RawKey,
        verdict: &Verdict,
        step: Step,
    ) -> Result<(), SweepError> {
        let settled = match step {
            Step::DeleteByKey => deletion::after_delete(self.map.delete(&raw)),
            Step::Settle(settled) => settled,
        };
        self.record(report, raw, verdict, settled)
    }

    /// Queues a target for compare-and-delete, and runs the pass when one is due.
    fn queue(
        &mut self,
        report: &mut SweepReport,
        target: Target,
        verdict: Verdict,
    ) -> Result<(), SweepError> {
        if self.pending.is_empty() {
            self.pending_since = Instant::now();
        }
        self.pending.push((target, verdict));
        let batch = self.identity.cad_batch().unwrap_or(1);
        if deletion::batch_due(
            self.pending.len(),
            batch,
            self.pending_since.elapsed(),
            CAD_MAX_DELAY,
        ) {
            self.flush(report)?;
        }
        Ok(())
    }

    fn flush(&mut self, report: &mut SweepReport) -> Result<(), SweepError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let targets: Vec<Target> = pending.iter().map(|(t, _)| *t).collect();
        match self.identity.compare_and_delete(self.map, &targets) {
            Ok(Some(outcomes)) => {
                for ((target, verdict), (_, outcome)) in pending.iter().zip(outcomes) {
                    let settled = deletion::after_compare_and_delete(outcome);
                    self.record(report, target.key, verdict, settled)?;
                }
            }
            Ok(None) => {
                // Compare in userspace instead: a fresh read of who each entry holds, then
                // a delete by key only where it still holds the judged socket and that
                // socket is still stale (the kernel program's rule).
                let now: HashMap<RawKey, HeldView> = match self.identity.read(self.map) {
                    Ok(Some(ids)) => ids.entries.iter().map(|(k, h)| (*k, h.view())).collect(),
                    Ok(None) | Err(_) => {
                        for (target, verdict) in &pending {
                            let settled = Settled::Failed(DeleteError::CannotReread);
                            self.record(report, target.key, verdict, settled)?;
                        }
                        return Ok(());
                    }
                };
                for (target, verdict) in &pending {
                    let now = now
                        .get(&target.key)
                        .map(|h| (h.cookie, still_stale(&target.key, h, target.local_only)));
                    let step = deletion::after_reread(target.cookie, now);
                    self.settle(report, target.key, verdict, step)?;
                }
            }
            Err(e) => {
                let e = DeleteError::CompareAndDelete(std::sync::Arc::new(e));
                for (target, verdict) in &pending {
                    self.record(report, target.key, verdict, Settled::Failed(e.clone()))?;
                }
            }
        }
        Ok(())
    }
}

/// Whether the held socket is still stale by the kernel program's rule: closed, or with ends
/// other than those `raw` files it under (an L7-proxy entry: its local end).
fn still_stale(raw: &RawKey, held: &HeldView, local_only: bool) -> bool {
    held.closed || !SockKey::decode(raw).is_ok_and(|key| has_key_ends(&key, held, local_only))
}

/// The journal line of an entry a sweep or a pass acted on, or was kept from acting on.
pub(crate) fn log_settled(raw: &RawKey, verdict: &Verdict, settled: &Settled) {
    let described = || SockKey::decode(raw).map_or_else(|e| e.to_string(), |k| k.to_string());
    match settled {
        Settled::Deleted => {
            tracing::info!(key = %raw.to_hex(), entry = %described(), reason = %verdict, "deleted stale entry");
        }
        Settled::AlreadyGone => {}
        Settled::Spared(deletion::SpareReason::NoLongerStale) => {
            tracing::info!(key = %raw.to_hex(), verdict = %verdict, "spared: the re-check found it no longer stale");
        }
        Settled::Spared(deletion::SpareReason::NotStaleNow) => {
            tracing::info!(key = %raw.to_hex(), entry = %described(), "spared: the held socket has the key's ends now");
        }
        Settled::Spared(deletion::SpareReason::HoldsAnotherSocket) => {
            tracing::info!(key = %raw.to_hex(), entry = %described(), "spared: the entry holds another socket now");
        }
        Settled::Failed(e) => {
            tracing::warn!(key = %raw.to_hex(), entry = %described(), error = %e, "delete failed");
        }
    }
}

fn delete_phase(
    deleter: &mut Deleter<'_>,
    settings: &SweepSettings,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(Progress),
    report: &mut SweepReport,
) -> Result<(), SweepError> {
    let limiter = settings
        .guards
        .rate_limit
        .map(|r| RateLimiter::direct(Quota::per_second(r).allow_burst(NonZeroU32::MIN)));
    let clock = DefaultClock::default();
    let total = report.plan.delete.len();
    // Planned entries judged on the socket they hold, with that socket and the verdict.
    let planned: HashSet<RawKey> = report.plan.delete.iter().copied().collect();
    let by_identity: HashMap<RawKey, (HeldView, Verdict)> = report
        .second
        .entries
        .iter()
        .filter(|e| planned.contains(&e.raw))
        .filter_map(|e| e.held_view().map(|h| (e.raw, (h, e.verdict.clone()))))
        .collect();
    drop(planned);
    let mut fresh: Option<(Sockets, Instant)> = None;
    let phase_started = Instant::now();
    for (done, raw) in report.plan.delete.clone().into_iter().enumerate() {
        if let Some(limiter) = &limiter {
            while let Err(not_until) = limiter.check() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let wait = not_until.wait_time_from(clock.now());
                // A sleep overshoots by tens of microseconds: at high rates that, not the
                // limit, would set the pace.
                if wait < Duration::from_millis(1) {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(wait.min(Duration::from_millis(50)));
                }
            }
        }
        if stop.load(Ordering::Relaxed) {
            report.interrupted = Some(Interrupted::Signal);
            break;
        }
        let held = by_identity.get(&raw);
        let route = deletion::route(held.map(|(h, _)| h.cookie), deleter.identity.is_active());
        match (route, held) {
            (Route::CompareAndDelete { cookie }, Some((_, verdict))) => {
                let local_only =
                    SockKey::decode(&raw).is_ok_and(|key| is_proxy_key(&key, &settings.gateways));
                let target = Target {
                    key: raw,
                    cookie: Some(cookie),
                    local_only,
                };
                deleter.queue(report, target, verdict.clone())?;
            }
            _ => {
                if deletion::inventory_due(
                    fresh.as_ref().map(|(_, at)| at.elapsed()),
                    settings.recheck_max_age,
                ) {
                    deleter.flush(report)?;
                    let sockets = observe::gather_sockets(
                        &settings.proc_root,
                        !settings.gateways.is_empty(),
                    )?;
                    if !sockets.unreadable.is_empty() {
                        report.interrupted = Some(Interrupted::RecheckIncomplete {
                            unreadable: sockets.unreadable.len(),
                        });
                        break;
                    }
                    fresh = Some((sockets, Instant::now()));
                }
                let Some((sockets, _)) = fresh.as_ref() else {
                    break;
                };
                let key = SockKey::decode(&raw);
                let verdict = classify(&key, None, &sockets.evidence(&settings.gateways));
                let step = deletion::after_recheck(verdict.is_stale());
                deleter.settle(report, raw, &verdict, step)?;
            }
        }
        progress(Progress {
            done: done + 1,
            total,
        });
    }
    deleter.flush(report)?;
    report.delete_phase = phase_started.elapsed();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trail_knows_when_its_file_was_rotated_away() {
        let dir = std::env::temp_dir().join(format!("smgc-trail-rotated-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("trail.jsonl");
        let trail = Trail::open(&path).expect("open");
        assert!(trail.appends_to(&path), "just opened");
        assert!(!trail.appends_to(&dir.join("other")), "another path");
        std::fs::rename(&path, dir.join("trail.jsonl.1")).expect("rotate");
        assert!(!trail.appends_to(&path), "rotated away, nothing there");
        std::fs::write(&path, "").expect("a new file");
        assert!(!trail.appends_to(&path), "rotated away, a new file there");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_wait_past_the_clocks_range_does_not_panic() {
        let stopped = AtomicBool::new(true);
        sleep_unless_stopped(Duration::MAX, &stopped);
        let running = AtomicBool::new(false);
        let t = Instant::now();
        sleep_unless_stopped(Duration::from_millis(20), &running);
        assert!(t.elapsed() >= Duration::from_millis(20));
    }
}
