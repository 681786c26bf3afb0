//! The daemon's full sweep: run on a thread of its own, its outcome acted on (the adaptive
//! interval, metrics, `STATUS=`), and its journal lines.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sd_notify::NotifyState;

use sockmap_gc::holder::{self, HolderSource};
use sockmap_gc::identity::{IdentityMode, IdentitySource};
use sockmap_gc::observation::Filter;
use sockmap_gc::observe;
use sockmap_gc::report::{self, Summary};
use sockmap_gc::sweep::{self, RunError, SweepReport, SweepSettings};

use super::{
    acted, held_by, identity_source, next_wait, notify, open_map_and_trail, Daemon, Done, Running,
};
use crate::cmd::config::Settings;
use crate::cmd::metrics;

/// What a sweep thread hands back.
pub(super) type Swept = Finished<SweepReport>;

/// What a worker thread (a sweep or a pass) hands back: its report and the map's path, or
/// why it failed; when it started, and how long it took.
pub(super) struct Finished<R> {
    pub(super) outcome: Result<(R, PathBuf), RunError>,
    pub(super) started: Instant,
    pub(super) took: Duration,
}

impl<R> Finished<R> {
    /// Runs `work`, timing it.
    fn timed(work: impl FnOnce() -> Result<(R, PathBuf), RunError>) -> Finished<R> {
        let started = Instant::now();
        let outcome = work();
        Finished {
            outcome,
            started,
            took: started.elapsed(),
        }
    }
}

/// `work`'s result, or [`Done::Lost`] with its panic's message.
fn reported(running: Running, work: impl FnOnce() -> Done) -> Done {
    // The shared state a worker panics with is behind mutexes whose users take it back
    // from poisoning; the rest of the worker is dropped with it.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_string());
        Done::Lost(running, why)
    })
}

impl Daemon {
    pub(super) fn start_sweep(&mut self) {
        let settings = Arc::clone(&self.settings);
        let stop = Arc::clone(&self.stop);
        let identity = Arc::clone(&self.identity);
        let holders = Arc::clone(&self.holders);
        let spawned = self.spawn_worker(Running::Sweep, move || {
            Done::Sweep(Box::new(Finished::timed(|| {
                sweep_once(&settings, &stop, &identity, &holders)
            })))
        });
        if !spawned {
            self.metrics.record_error(Duration::ZERO);
            self.schedule();
        }
    }

    /// Runs `work` (a sweep or a pass) on a thread of its own, named after it, which hands its
    /// result back to the loop, and marks it running. False, said in the log, when no thread
    /// could be started: the caller counts the failure and schedules the next try.
    pub(super) fn spawn_worker(
        &mut self,
        running: Running,
        work: impl FnOnce() -> Done + Send + 'static,
    ) -> bool {
        let name = running.name();
        let done = self.done_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // The receiver is gone only when the daemon is exiting.
                let _ = done.send(reported(running, work));
            });
        match spawned {
            Ok(_) => {
                self.running = running;
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start a {name} thread; trying again after the interval");
                false
            }
        }
    }

    /// A sweep or pass that panicked: said, counted as an error, and the next one scheduled
    /// as after any failure. Without this the loop would wait for it for ever, and the
    /// watchdog would go on saying all is well.
    pub(super) fn lost(&mut self, running: Running, why: &str) {
        self.running = Running::Nothing;
        tracing::error!(
            "the {} thread panicked: {why}; the next one comes on schedule",
            running.name()
        );
        if running == Running::Pass {
            self.metrics.record_pass_error();
            self.schedule_pass(Instant::now(), false, Duration::ZERO);
        } else {
            self.metrics.record_error(Duration::ZERO);
            self.schedule();
        }
    }

    pub(super) fn finish(&mut self, swept: Swept) {
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
}

/// One sweep, on the calling (dedicated) thread: opens the map afresh, since an agent may
/// have re-created it since the last sweep.
fn sweep_once(
    settings: &Settings,
    stop: &AtomicBool,
    identity: &Mutex<Option<(IdentityMode, IdentitySource)>>,
    holders: &Mutex<HolderSource>,
) -> Result<(SweepReport, PathBuf), RunError> {
    let (map, mut trail) = open_map_and_trail(settings)?;
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

/// One log line per sweep with stale entries naming who keeps them: the counts per holder
/// class and the top processes and pods.
fn holders_line(r: &SweepReport) -> Option<String> {
    let s = holder::summarize(r.second.holders.as_ref()?.diagnoses(), report::TOP_HOLDERS);
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
    line += &acted(
        r.dry_run,
        r.plan.delete.len() + r.plan.over_cap,
        [
            r.deleted.len(),
            r.already_gone.len(),
            r.spared.len(),
            r.failed.len(),
        ],
    );
    line += &format!("; {} left behind", r.left_behind());
    if r.plan.unconfirmed > 0 {
        line += &format!(" ({} await confirmation)", r.plan.unconfirmed);
    }
    line += &held_by(r.plan.hold.as_ref());
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

    type Work = Box<dyn FnOnce() -> Done>;
    type Lost = Option<(Running, String)>;

    fn lost(done: Done) -> Lost {
        match done {
            Done::Lost(running, why) => Some((running, why)),
            _ => None,
        }
    }

    #[test]
    fn a_worker_that_panics_is_reported_lost_with_its_message() {
        let cases: [(Running, Work, Lost); 3] = [
            (
                Running::Sweep,
                Box::new(|| panic!("a literal")),
                Some((Running::Sweep, "a literal".to_string())),
            ),
            (
                Running::Pass,
                Box::new(|| panic!("formatted {}", 7)),
                Some((Running::Pass, "formatted 7".to_string())),
            ),
            // What the work returns passes through.
            (
                Running::Pass,
                Box::new(|| Done::Lost(Running::Nothing, "its own".to_string())),
                Some((Running::Nothing, "its own".to_string())),
            ),
        ];
        for (running, work, want) in cases {
            assert_eq!(lost(reported(running, work)), want);
        }
    }
}
