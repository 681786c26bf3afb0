//! The daemon's continuous pass: run on a thread of its own, the next one scheduled on
//! `pass_interval` stretched to the CPU budget, and its journal line.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use sockmap_gc::clock::thread_cpu_time;
use sockmap_gc::identity::{IdentityMode, IdentitySource};
use sockmap_gc::observe;
use sockmap_gc::pass::{self, PassReport, PassState};
use sockmap_gc::sweep::RunError;

use super::sweep::Finished;
use super::{acted, held_by, identity_source, notify, open_map_and_trail, Daemon, Done, Running};
use crate::cmd::config::Settings;

/// What a pass thread hands back; `started` is when the pass was due.
pub(super) type Passed = Finished<PassReport>;

impl Daemon {
    pub(super) fn start_pass(&mut self) {
        let settings = Arc::clone(&self.settings);
        let identity = Arc::clone(&self.identity);
        let state = Arc::clone(&self.pass_state);
        let started = Instant::now();
        let spawned = self.spawn_worker(Running::Pass, move || {
            let outcome = pass_once(&settings, &identity, &state, started);
            let took = started.elapsed();
            Done::Pass(Box::new(Finished {
                outcome,
                started,
                took,
            }))
        });
        if !spawned {
            self.metrics.record_pass_error();
            self.schedule_pass(started, false, Duration::ZERO);
        }
    }

    pub(super) fn finish_pass(
        &mut self,
        Passed {
            outcome, started, ..
        }: Passed,
    ) {
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
            Err(e @ (RunError::NoIdentity(_) | RunError::NoCompareAndDelete(_))) => {
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
    pub(super) fn schedule_pass(&mut self, started: Instant, awaiting: bool, cpu: Duration) {
        let s = &self.settings;
        self.next_pass = s.pass_interval.map(|interval| {
            let awaiting = awaiting.then_some(s.confirm_after);
            let wait = pass::next_pass_wait(interval, awaiting, cpu, s.pass_cpu_budget);
            started.checked_add(wait).unwrap_or_else(far_future)
        });
    }
}

/// A time no pass will reach (a stretched wait past the clock's range).
fn far_future() -> Instant {
    Instant::now() + sockmap_gc::guard::MAX_DURATION
}

/// One continuous pass, on the calling (dedicated) thread: opens the map afresh, since an
/// agent may have re-created it since the last pass.
fn pass_once(
    settings: &Settings,
    identity: &Mutex<Option<(IdentityMode, IdentitySource)>>,
    state: &Mutex<PassState>,
    started: Instant,
) -> Result<(PassReport, PathBuf), RunError> {
    let (map, mut trail) = open_map_and_trail(settings)?;
    let guards = settings.guards()?;
    // One sweep or pass runs at a time, so the locks are never contended.
    let mut held = identity.lock().unwrap_or_else(|e| e.into_inner());
    // Loading the programs is a one-time cost, kept out of the CPU the budget weighs: the
    // next pass waits for the last one's CPU over the budget, so a load counted there stalled
    // the passes after the first to delete (compare-and-delete: 9 ms of CPU here, 0.9 s at
    // the shipped 1%; 336 ms under emulation, 34 s).
    let before_loading = thread_cpu_time();
    let source = identity_source(settings, &mut held)?;
    if !settings.dry_run {
        source.prepare_compare_and_delete(&map)?;
    }
    let loading = thread_cpu_time().saturating_sub(before_loading);
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    let mut report = pass::pass(
        &map,
        source,
        &mut state,
        &guards,
        &observe::gateways(&settings.gateways),
        trail.as_mut(),
        started,
    )?;
    // The thread is the pass's own: all its CPU but the loading, opening the map and the
    // trail included, counts against the budget.
    report.cpu = report.cpu.max(thread_cpu_time().saturating_sub(loading));
    report.loading = loading;
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
    line += &acted(
        r.dry_run,
        d.delete.len(),
        [r.deleted.len(), r.already_gone, r.spared, r.failed],
    );
    if d.unconfirmed > 0 {
        line += &format!("; {} await confirmation", d.unconfirmed);
    }
    if d.over_cap + d.rate_limited > 0 {
        line += &format!(
            "; {} over max_deletes, {} held back by rate_limit",
            d.over_cap, d.rate_limited
        );
    }
    line += &held_by(r.hold.as_ref());
    line += &format!(
        "; took {} ms ({} ms CPU",
        r.took.as_millis(),
        r.cpu.as_millis()
    );
    // A pass that loaded nothing still spends microseconds asking.
    if r.loading.as_millis() > 0 {
        line += &format!(", {} ms loading the programs", r.loading.as_millis());
    }
    line += ")";
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_pass_line_says_what_loading_took_apart_from_its_cpu() {
        let cases = [
            (MS(0), "; took 12 ms (3 ms CPU)"),
            // Microseconds of asking whether anything needs loading say nothing.
            (Duration::from_micros(400), "; took 12 ms (3 ms CPU)"),
            (
                MS(357),
                "; took 12 ms (3 ms CPU, 357 ms loading the programs)",
            ),
        ];
        for (loading, tail) in cases {
            let report = PassReport {
                cpu: MS(3),
                loading,
                took: MS(12),
                ..PassReport::default()
            };
            let line = pass_line(&report, Path::new("/sys/fs/bpf/tc/globals/cilium_sock_ops"));
            assert!(line.ends_with(tail), "{loading:?}: {line}");
        }
    }
}
