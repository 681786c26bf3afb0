//! Runs one guarded sweep: observe twice, plan with the guards, re-check, delete, report.

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

use crate::audit::{self, Filter, Observation, ObserveError, Sockets};
use crate::guard::{self, GuardSettings, Plan};
use crate::key::{RawKey, SockKey};
use crate::map::{DeleteOutcome, SockMap};
use crate::verdict::classify;

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
    pub first: Observation,
    pub second: Observation,
    pub plan: Plan,
    /// Between the starts of the two observations.
    pub apart: Duration,
    pub deleted: Vec<RawKey>,
    pub already_gone: Vec<RawKey>,
    /// Confirmed stale, but the re-check just before the delete found a live owner.
    pub spared: Vec<RawKey>,
    pub failed: Vec<(RawKey, String)>,
    pub interrupted: Option<Interrupted>,
    /// From just before the first delete to just after the last.
    pub delete_phase: Duration,
    pub took: Duration,
}

impl SweepReport {
    /// Stale entries that are still in the map after this sweep.
    pub fn left_behind(&self) -> usize {
        self.plan.stale - self.deleted.len() - self.already_gone.len()
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

    fn record(
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
    let until = Instant::now() + total;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

/// Observes twice, applies the guards and, unless it is a dry run, deletes.
///
/// Between the plan and each delete the entry's tuple is judged again against a socket
/// inventory at most `recheck_max_age` old; `stop` is honoured between two deletes.
pub fn sweep(
    map: &SockMap,
    settings: &SweepSettings,
    stop: &AtomicBool,
    mut trail: Option<&mut Trail>,
    progress: &mut dyn FnMut(Progress),
) -> Result<SweepReport, SweepError> {
    let started = Instant::now();
    let first = audit::observe(map, &settings.proc_root, &settings.gateways)?;
    sleep_unless_stopped(settings.guards.confirm_after, stop);
    let apart = started.elapsed();
    let second = audit::observe(map, &settings.proc_root, &settings.gateways)?;
    let plan = guard::plan(&first, &second, &settings.filter, &settings.guards);
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
        delete_phase(map, settings, stop, &mut trail, progress, &mut report)?;
    }
    report.took = started.elapsed();
    Ok(report)
}

fn delete_phase(
    map: &SockMap,
    settings: &SweepSettings,
    stop: &AtomicBool,
    trail: &mut Option<&mut Trail>,
    progress: &mut dyn FnMut(Progress),
    report: &mut SweepReport,
) -> Result<(), SweepError> {
    let limiter = settings
        .guards
        .rate_limit
        .map(|r| RateLimiter::direct(Quota::per_second(r).allow_burst(NonZeroU32::MIN)));
    let clock = DefaultClock::default();
    let total = report.plan.delete.len();
    let mut fresh: Option<(Sockets, Instant)> = None;
    let phase_started = Instant::now();
    for (done, raw) in report.plan.delete.clone().iter().enumerate() {
        if let Some(limiter) = &limiter {
            while let Err(not_until) = limiter.check() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let wait = not_until.wait_time_from(clock.now());
                std::thread::sleep(wait.min(Duration::from_millis(50)));
            }
        }
        if stop.load(Ordering::Relaxed) {
            report.interrupted = Some(Interrupted::Signal);
            break;
        }
        if fresh
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() > settings.recheck_max_age)
        {
            let sockets = audit::gather_sockets(&settings.proc_root)?;
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
        let key = SockKey::decode(raw);
        let verdict = classify(&key, None, &sockets.evidence(&settings.gateways));
        if !verdict.is_stale() {
            tracing::info!(key = %raw.to_hex(), verdict = %verdict, "spared: the re-check found it no longer stale");
            report.spared.push(*raw);
            continue;
        }
        let described = key.map_or_else(|e| e.to_string(), |k| k.to_string());
        match map.delete(raw) {
            Ok(DeleteOutcome::Deleted) => {
                tracing::info!(key = %raw.to_hex(), entry = %described, reason = %verdict, "deleted stale entry");
                if let Some(t) = trail.as_deref_mut() {
                    t.record(map, raw, &verdict.to_string(), "deleted")?;
                }
                report.deleted.push(*raw);
            }
            Ok(DeleteOutcome::AlreadyGone) => {
                if let Some(t) = trail.as_deref_mut() {
                    t.record(map, raw, &verdict.to_string(), "already-gone")?;
                }
                report.already_gone.push(*raw);
            }
            Err(e) => {
                tracing::warn!(key = %raw.to_hex(), entry = %described, error = %e, "delete failed");
                report.failed.push((*raw, e.to_string()));
            }
        }
        progress(Progress {
            done: done + 1,
            total,
        });
    }
    report.delete_phase = phase_started.elapsed();
    Ok(())
}
