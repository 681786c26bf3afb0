//! The daemon's Prometheus metrics (`sockmap_gc_*`) and the small HTTP listener serving them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioTimer;
use prometheus_client::encoding::{prometheus_text, EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sockmap_gc::deletion::Outcome;
use sockmap_gc::events::EventsState;
use sockmap_gc::guard::Guard;
use sockmap_gc::holder::HolderClass;
use sockmap_gc::pass::PassReport;
use sockmap_gc::react::Reaction;
use sockmap_gc::report::Summary;
use sockmap_gc::sweep::{Interrupted, SweepReport};
use sockmap_gc::verdict::VerdictKind;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// `verdict`, and for stale entries `held_by`, their holder class (only the class, never a pod
/// or pid: the series stay bounded). Stale entries exist only split by class, so a sum over
/// `{verdict="stale"}` counts each once.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct EntriesLabel {
    verdict: &'static str,
    held_by: Option<&'static str>,
}

impl EncodeLabelSet for EntriesLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("verdict", self.verdict).encode(encoder.encode_label())?;
        if let Some(class) = self.held_by {
            ("held_by", class).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuardLabel {
    guard: &'static str,
}

impl EntriesLabel {
    fn of(v: VerdictKind) -> Self {
        EntriesLabel {
            verdict: v.as_str(),
            held_by: None,
        }
    }

    fn stale(held_by: HolderClass) -> Self {
        EntriesLabel {
            verdict: VerdictKind::Stale.as_str(),
            held_by: Some(held_by.as_str()),
        }
    }
}

impl OutcomeLabel {
    fn of(o: Outcome) -> Self {
        OutcomeLabel {
            outcome: o.as_str(),
        }
    }
}

impl ResultLabel {
    fn of(r: SweepResult) -> Self {
        ResultLabel { result: r.as_str() }
    }
}

impl GuardLabel {
    fn of(g: Guard) -> Self {
        GuardLabel { guard: g.as_str() }
    }
}

/// Creates the series of `family` for every label in `labels`.
fn create_every<L: Clone + std::hash::Hash + Eq, M: Default>(
    family: &Family<L, M>,
    labels: impl IntoIterator<Item = L>,
) {
    for label in labels {
        drop(family.get_or_create(&label));
    }
}

/// The guards whose trips are counted: the fail-closed ones that can stop a whole sweep,
/// the re-check's, and the cap.
const TRIPS: [Guard; 5] = [
    Guard::IncompleteInventory,
    Guard::MapReplaced,
    Guard::InventoryShrank,
    Guard::RecheckIncomplete,
    Guard::MaxDeletes,
];

/// How a continuous pass ends: never interrupted (a pass is one read and one batch).
const PASS_RESULTS: [SweepResult; 3] = [SweepResult::Ok, SweepResult::Held, SweepResult::Error];

/// How a sweep ended: the `result` label, and the summary line's word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepResult {
    Ok,
    Held,
    Interrupted,
    Error,
}

impl SweepResult {
    const ALL: [SweepResult; 4] = [
        SweepResult::Ok,
        SweepResult::Held,
        SweepResult::Interrupted,
        SweepResult::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SweepResult::Ok => "ok",
            SweepResult::Held => "held",
            SweepResult::Interrupted => "interrupted",
            SweepResult::Error => "error",
        }
    }
}

impl std::fmt::Display for SweepResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a sweep ended, as the `result` label and the summary line say it.
pub fn sweep_result(r: &SweepReport) -> SweepResult {
    match (&r.plan.hold, &r.interrupted) {
        (Some(_), _) | (None, Some(Interrupted::RecheckIncomplete { .. })) => SweepResult::Held,
        (None, Some(Interrupted::Signal)) => SweepResult::Interrupted,
        (None, None) => SweepResult::Ok,
    }
}

/// Every metric, registered once; the handles are cheap atomic clones.
pub struct Metrics {
    registry: Registry,
    entries: Family<EntriesLabel, Gauge>,
    deletions: Family<OutcomeLabel, Counter>,
    sweeps: Family<ResultLabel, Counter>,
    sweep_duration: Histogram,
    passes: Family<ResultLabel, Counter>,
    stale_age: Histogram,
    last_success: Gauge<f64, AtomicU64>,
    guard_trips: Family<GuardLabel, Counter>,
    map_id: Gauge,
    dry_run: Gauge,
    interval: Gauge<f64, AtomicU64>,
    collisions: Counter,
    events: Family<ModeLabel, Gauge>,
    events_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            entries: Family::default(),
            deletions: Family::default(),
            sweeps: Family::default(),
            // 0.25 s .. 512 s: a sweep takes at least confirm_after (1 s by default).
            sweep_duration: Histogram::new(exponential_buckets(0.25, 2.0, 12)),
            passes: Family::default(),
            // 0.25 s .. 1024 s: a pass deletes after confirm_after (1 s by default), a sweep
            // after its interval.
            stale_age: Histogram::new(exponential_buckets(0.25, 2.0, 13)),
            last_success: Gauge::default(),
            guard_trips: Family::default(),
            map_id: Gauge::default(),
            dry_run: Gauge::default(),
            interval: Gauge::default(),
            collisions: Counter::default(),
            events: Family::default(),
            events_dropped: Counter::default(),
            registry: Registry::with_prefix("sockmap_gc"),
        };
        // Name, help and metric of each; the registry owns a handle of each.
        macro_rules! register {
            ($($name:literal, $help:literal, $metric:expr;)+) => {
                $( m.registry.register($name, $help, $metric.clone()); )+
            };
        }
        register! {
            "entries", "Entries of the map by verdict in the last sweep's second observation; stale ones also by holder class (held_by) once their holders were searched",
                m.entries;
            "deletions", "Stale entries the sweeps acted on, by outcome",
                m.deletions;
            "sweeps", "Sweeps run, by result",
                m.sweeps;
            "sweep_duration_seconds", "How long each sweep took, both observations and the deletes",
                m.sweep_duration;
            "passes", "Continuous passes run (one iterator read each), by result",
                m.passes;
            "stale_age_seconds", "How long each entry the continuous pass deleted had been judged stale (first pass that judged it so to the delete), or a kernel event's entry had been stale (the event to the delete)",
                m.stale_age;
            "last_success_timestamp_seconds", "Unix time at which the last sweep that was neither held nor failed ended",
                m.last_success;
            "guard_trips", "Sweeps in which a guard withheld deletions, by guard",
                m.guard_trips;
            "map_id", "Kernel id of the map the last sweep read (it changes when the map is re-created)",
                m.map_id;
            "dry_run", "1 while the daemon only reports, 0 while it deletes",
                m.dry_run;
            "interval_seconds", "The wait before the next sweep (it adapts within interval_min and interval_max)",
                m.interval;
            "collisions", "Inserts into the map refused because an entry held their key: new connections hijacked by a stale entry (kernel events)",
                m.collisions;
            "events", "1 for what the daemon hears from the kernel (mode: off, unavailable, closes, collisions, closes-and-collisions), 0 for the rest",
                m.events;
            "events_dropped", "Kernel events lost (ring buffer full); the continuous pass still finds their entries",
                m.events_dropped;
        }
        // Every series from the start: a rate() over a series that appears late misses its start.
        let verdicts = VerdictKind::ALL
            .iter()
            .filter(|v| **v != VerdictKind::Stale)
            .map(|v| EntriesLabel::of(*v));
        create_every(&m.entries, verdicts);
        create_every(
            &m.entries,
            HolderClass::ALL.iter().map(|c| EntriesLabel::stale(*c)),
        );
        create_every(
            &m.deletions,
            Outcome::ALL.iter().map(|o| OutcomeLabel::of(*o)),
        );
        create_every(&m.sweeps, SweepResult::ALL.map(ResultLabel::of));
        create_every(&m.passes, PASS_RESULTS.map(ResultLabel::of));
        create_every(&m.guard_trips, TRIPS.map(GuardLabel::of));
        create_every(
            &m.events,
            EventsState::ALL
                .iter()
                .map(|s| ModeLabel { mode: s.as_str() }),
        );
        m
    }

    /// What a reaction to kernel events deleted: its outcomes count among the deletions.
    pub fn record_reaction(&self, r: &Reaction) {
        for outcome in Outcome::ALL {
            let n = r.count(*outcome);
            if n > 0 {
                self.deletions
                    .get_or_create(&OutcomeLabel::of(*outcome))
                    .inc_by(n as u64);
            }
        }
        // Stale since the kernel's event: its age at the delete.
        for (_, settled, since_event) in &r.settled {
            if settled.outcome() == Outcome::Deleted {
                self.stale_age.observe(since_event.as_secs_f64());
            }
        }
        if let Some(hold) = &r.hold {
            self.trip(hold.guard());
        }
        if r.over_cap > 0 {
            self.trip(Guard::MaxDeletes);
        }
    }

    /// A new connection refused by the entry filed under its key.
    pub fn record_collision(&self) {
        self.collisions.inc();
    }

    /// What the daemon hears from the kernel now, and the events lost so far (a running
    /// total: the counter catches up to it).
    pub fn set_events(&self, state: EventsState, dropped: u64) {
        for s in EventsState::ALL {
            self.events
                .get_or_create(&ModeLabel { mode: s.as_str() })
                .set(i64::from(*s == state));
        }
        let counted = self.events_dropped.get();
        if dropped > counted {
            self.events_dropped.inc_by(dropped - counted);
        }
    }

    /// Records a sweep that ran to its report.
    pub fn record_sweep(&self, r: &SweepReport, ended: SystemTime) {
        let summary = Summary::of(&r.second.entries);
        let entries = [
            (VerdictKind::Live, summary.live),
            (VerdictKind::Unknown, summary.unknown),
        ];
        for (verdict, n) in entries {
            self.entries
                .get_or_create(&EntriesLabel::of(verdict))
                .set(n as i64);
        }
        // Each sweep sets every class, 0 for those absent; stale entries the holder pass did
        // not see (it did not run) count as holder-unknown.
        let mut held_by: HashMap<HolderClass, i64> = HashMap::new();
        let diagnosed = r.second.holders.as_ref().map_or(0, |h| {
            for d in h.diagnoses() {
                *held_by.entry(d.class()).or_default() += 1;
            }
            h.diagnosed.len()
        });
        *held_by.entry(HolderClass::HolderUnknown).or_default() +=
            summary.stale.saturating_sub(diagnosed) as i64;
        for class in HolderClass::ALL {
            self.entries
                .get_or_create(&EntriesLabel::stale(*class))
                .set(held_by.get(class).copied().unwrap_or(0));
        }
        let deletions = [
            (Outcome::Deleted, r.deleted.len()),
            (Outcome::AlreadyGone, r.already_gone.len()),
            (Outcome::Spared, r.spared.len()),
            (Outcome::Failed, r.failed.len()),
        ];
        for (outcome, n) in deletions {
            let counter = self.deletions.get_or_create(&OutcomeLabel::of(outcome));
            counter.inc_by(n as u64);
        }
        let result = sweep_result(r);
        self.sweeps.get_or_create(&ResultLabel::of(result)).inc();
        self.sweep_duration.observe(r.took.as_secs_f64());
        if let Some(hold) = &r.plan.hold {
            self.trip(hold.guard());
        }
        if let Some(Interrupted::RecheckIncomplete { .. }) = r.interrupted {
            self.trip(Guard::RecheckIncomplete);
        }
        if r.plan.over_cap > 0 {
            self.trip(Guard::MaxDeletes);
        }
        self.map_id.set(i64::from(r.map_id));
        if result != SweepResult::Held {
            let secs = ended
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            self.last_success.set(secs);
        }
    }

    /// Records a continuous pass that ran to its report.
    pub fn record_pass(&self, r: &PassReport) {
        let deletions = [
            (Outcome::Deleted, r.deleted.len()),
            (Outcome::AlreadyGone, r.already_gone),
            (Outcome::Spared, r.spared),
            (Outcome::Failed, r.failed),
        ];
        for (outcome, n) in deletions {
            let counter = self.deletions.get_or_create(&OutcomeLabel::of(outcome));
            counter.inc_by(n as u64);
        }
        for (_, age) in &r.deleted {
            self.stale_age.observe(age.as_secs_f64());
        }
        if let Some(hold) = &r.hold {
            self.trip(hold.guard());
        }
        if r.decision.over_cap > 0 {
            self.trip(Guard::MaxDeletes);
        }
        let result = if r.hold.is_some() {
            SweepResult::Held
        } else {
            SweepResult::Ok
        };
        self.passes.get_or_create(&ResultLabel::of(result)).inc();
        self.map_id.set(i64::from(r.map_id));
    }

    /// Records a continuous pass that failed before its report.
    pub fn record_pass_error(&self) {
        self.passes
            .get_or_create(&ResultLabel::of(SweepResult::Error))
            .inc();
    }

    /// Records a sweep that failed before its report (no map, say).
    pub fn record_error(&self, took: Duration) {
        self.sweeps
            .get_or_create(&ResultLabel::of(SweepResult::Error))
            .inc();
        self.sweep_duration.observe(took.as_secs_f64());
    }

    fn trip(&self, guard: Guard) {
        self.guard_trips.get_or_create(&GuardLabel::of(guard)).inc();
    }

    pub fn set_interval(&self, wait: Duration) {
        self.interval.set(wait.as_secs_f64());
    }

    pub fn set_dry_run(&self, dry_run: bool) {
        self.dry_run.set(i64::from(dry_run));
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would leave a partial page,
        // which a scrape reports as a parse error.
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding the metrics failed");
        }
        out
    }
}

/// Connections served at once. A scrape is one short request; more connections wait in the
/// kernel's accept queue, where they cost the daemon no memory.
const MAX_CONNECTIONS: usize = 4;
/// A client that has not sent its whole request head by then is dropped, so idle and
/// half-sent connections do not keep the few slots from the scrapes and probes.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// The most one connection is kept, keep-alive included: a scraper that stalls holds one slot
/// for this long at most.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// hyper's smallest read buffer: a request head is well under a kilobyte.
const READ_BUFFER: usize = 8192;

/// Answers `GET /metrics` on `listener` until the task is dropped. At most
/// [`MAX_CONNECTIONS`] at once: the listener is on the pod IP in Kubernetes, and a
/// connection flood must delay a scrape, never cost the daemon its memory.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A slot first, then accept: the excess stays in the kernel's queue.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(READ_BUFFER)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
                Err(_) => tracing::debug!("metrics connection timed out"),
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
}

fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            prometheus_text::CONTENT_TYPE,
            metrics.encode(),
        ),
        (&Method::GET | &Method::HEAD, "/") => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "sockmap-gc: metrics at /metrics\n".to_string(),
        ),
        (&Method::GET | &Method::HEAD, _) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; metrics at /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_there_from_the_start_with_the_prefix() {
        let m = Metrics::new();
        m.set_dry_run(true);
        m.record_error(Duration::from_millis(300));
        let text = m.encode();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("sockmap_gc_"), "{line}");
        }
        for want in [
            "sockmap_gc_entries{verdict=\"stale\",held_by=\"app-keeps-fd\"} 0",
            "sockmap_gc_entries{verdict=\"stale\",held_by=\"holder-unknown\"} 0",
            "sockmap_gc_deletions_total{outcome=\"deleted\"} 0",
            "sockmap_gc_deletions_total{outcome=\"already-gone\"} 0",
            "sockmap_gc_sweeps_total{result=\"error\"} 1",
            "sockmap_gc_sweeps_total{result=\"ok\"} 0",
            "sockmap_gc_guard_trips_total{guard=\"map-replaced\"} 0",
            "sockmap_gc_sweep_duration_seconds_count 1",
            "sockmap_gc_passes_total{result=\"ok\"} 0",
            "sockmap_gc_stale_age_seconds_count 0",
            "sockmap_gc_last_success_timestamp_seconds 0",
            "sockmap_gc_map_id 0",
            "sockmap_gc_dry_run 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(
            !text.contains("sockmap_gc_entries{verdict=\"stale\"}"),
            "stale entries exist only by holder class, so sums count them once:\n{text}"
        );
    }
}
