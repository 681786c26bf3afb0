//! The daemon's Prometheus metrics (`sockmap_gc_*`) and the small HTTP listener serving them.

use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::pass::PassReport;
use crate::report::Summary;
use crate::sweep::{Interrupted, SweepReport};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: &'static str,
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
struct GuardLabel {
    guard: &'static str,
}

const VERDICTS: [&str; 3] = ["live", "stale", "unknown"];
const OUTCOMES: [&str; 4] = ["deleted", "already_gone", "spared", "failed"];
const RESULTS: [&str; 4] = ["ok", "held", "interrupted", "error"];
/// The guards that can stop deletions; `Hold::guard` names the first three.
const GUARDS: [&str; 5] = [
    "incomplete-inventory",
    "map-replaced",
    "inventory-shrank",
    "recheck-incomplete",
    "max-deletes",
];

/// How a sweep ended, as the `result` label and the summary line say it.
pub fn sweep_result(r: &SweepReport) -> &'static str {
    match (&r.plan.hold, &r.interrupted) {
        (Some(_), _) | (None, Some(Interrupted::RecheckIncomplete { .. })) => "held",
        (None, Some(Interrupted::Signal)) => "interrupted",
        (None, None) => "ok",
    }
}

/// Every metric, registered once; the handles are cheap atomic clones.
pub struct Metrics {
    registry: Registry,
    entries: Family<VerdictLabel, Gauge>,
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
            registry: Registry::with_prefix("sockmap_gc"),
        };
        let registry = &mut m.registry;
        registry.register(
            "entries",
            "Entries of the map by verdict in the last sweep's second observation",
            m.entries.clone(),
        );
        registry.register(
            "deletions",
            "Stale entries the sweeps acted on, by outcome",
            m.deletions.clone(),
        );
        registry.register("sweeps", "Sweeps run, by result", m.sweeps.clone());
        registry.register(
            "sweep_duration_seconds",
            "How long each sweep took, both observations and the deletes",
            m.sweep_duration.clone(),
        );
        registry.register(
            "passes",
            "Continuous passes run (one iterator read each), by result",
            m.passes.clone(),
        );
        registry.register(
            "stale_age_seconds",
            "How long each entry the continuous pass deleted had been judged stale (first pass that judged it so to the delete)",
            m.stale_age.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time at which the last sweep that was neither held nor failed ended",
            m.last_success.clone(),
        );
        registry.register(
            "guard_trips",
            "Sweeps in which a guard withheld deletions, by guard",
            m.guard_trips.clone(),
        );
        registry.register(
            "map_id",
            "Kernel id of the map the last sweep read (it changes when the map is re-created)",
            m.map_id.clone(),
        );
        registry.register(
            "dry_run",
            "1 while the daemon only reports, 0 while it deletes",
            m.dry_run.clone(),
        );
        registry.register(
            "interval_seconds",
            "The wait before the next sweep (it adapts within interval_min and interval_max)",
            m.interval.clone(),
        );
        // Every series from the start: a rate() over a series that appears late misses its start.
        for verdict in VERDICTS {
            m.entries.get_or_create_owned(&VerdictLabel { verdict });
        }
        for outcome in OUTCOMES {
            m.deletions.get_or_create_owned(&OutcomeLabel { outcome });
        }
        for result in RESULTS {
            m.sweeps.get_or_create_owned(&ResultLabel { result });
            m.passes.get_or_create_owned(&ResultLabel { result });
        }
        for guard in GUARDS {
            m.guard_trips.get_or_create_owned(&GuardLabel { guard });
        }
        m
    }

    /// Records a sweep that ran to its report.
    pub fn record_sweep(&self, r: &SweepReport, ended: SystemTime) {
        let summary = Summary::of(&r.second.entries);
        for (verdict, n) in [
            ("live", summary.live),
            ("stale", summary.stale),
            ("unknown", summary.unknown),
        ] {
            self.entries
                .get_or_create(&VerdictLabel { verdict })
                .set(n as i64);
        }
        for (outcome, n) in [
            ("deleted", r.deleted.len()),
            ("already_gone", r.already_gone.len()),
            ("spared", r.spared.len()),
            ("failed", r.failed.len()),
        ] {
            self.deletions
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(n as u64);
        }
        let result = sweep_result(r);
        self.sweeps.get_or_create(&ResultLabel { result }).inc();
        self.sweep_duration.observe(r.took.as_secs_f64());
        if let Some(hold) = &r.plan.hold {
            self.trip(hold.guard());
        }
        if let Some(Interrupted::RecheckIncomplete { .. }) = r.interrupted {
            self.trip("recheck-incomplete");
        }
        if r.plan.over_cap > 0 {
            self.trip("max-deletes");
        }
        self.map_id.set(i64::from(r.map_id));
        if result != "held" {
            let secs = ended
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            self.last_success.set(secs);
        }
    }

    /// Records a continuous pass that ran to its report.
    pub fn record_pass(&self, r: &PassReport) {
        for (outcome, n) in [
            ("deleted", r.deleted.len()),
            ("already_gone", r.already_gone),
            ("spared", r.spared),
            ("failed", r.failed),
        ] {
            self.deletions
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(n as u64);
        }
        for (_, age) in &r.deleted {
            self.stale_age.observe(age.as_secs_f64());
        }
        if let Some(hold) = &r.hold {
            self.trip(hold.guard());
        }
        if r.decision.over_cap > 0 {
            self.trip("max-deletes");
        }
        let result = if r.hold.is_some() { "held" } else { "ok" };
        self.passes.get_or_create(&ResultLabel { result }).inc();
        self.map_id.set(i64::from(r.map_id));
    }

    /// Records a continuous pass that failed before its report.
    pub fn record_pass_error(&self) {
        self.passes
            .get_or_create(&ResultLabel { result: "error" })
            .inc();
    }

    /// Records a sweep that failed before its report (no map, say).
    pub fn record_error(&self, took: Duration) {
        self.sweeps
            .get_or_create(&ResultLabel { result: "error" })
            .inc();
        self.sweep_duration.observe(took.as_secs_f64());
    }

    fn trip(&self, guard: &'static str) {
        self.guard_trips.get_or_create(&GuardLabel { guard }).inc();
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

/// Answers `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
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
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A scraper that stalls holds one task, not the daemon; bound it.
            match tokio::time::timeout(Duration::from_secs(30), conn).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
                Err(_) => tracing::debug!("metrics connection timed out"),
                Ok(Ok(())) => {}
            }
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
            "sockmap_gc_entries{verdict=\"stale\"} 0",
            "sockmap_gc_deletions_total{outcome=\"deleted\"} 0",
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
    }
}
