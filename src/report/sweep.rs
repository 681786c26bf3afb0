//! A sweep's report: what each guard did, the counts, the planned deletions; as text and JSON.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use serde::Serialize;

use super::{header, JsonInventory, MapSource, Row};
use crate::guard::Guard;
use crate::key::RawKey;
use crate::sweep::{Interrupted, SweepReport};

/// One guard's line in a sweep's summary.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GuardOutcome {
    pub guard: Guard,
    pub acted: bool,
    pub detail: String,
}

/// What each guard did in this sweep; every guard is listed, acted or not.
pub fn guard_outcomes(r: &SweepReport) -> Vec<GuardOutcome> {
    let mut v = vec![GuardOutcome {
        guard: Guard::DryRun,
        acted: r.dry_run,
        detail: if r.dry_run {
            format!(
                "nothing deleted; {} entries would be (run with --execute to delete)",
                r.plan.delete.len()
            )
        } else {
            "off (--execute)".to_string()
        },
    }];
    v.push(GuardOutcome {
        guard: Guard::Confirmation,
        acted: r.plan.unconfirmed > 0,
        detail: format!(
            "{} stale entries were not yet stale in the first observation {} ms earlier; left for the next sweep",
            r.plan.unconfirmed,
            r.apart.as_millis()
        ),
    });
    v.push(GuardOutcome {
        guard: Guard::MaxDeletes,
        acted: r.plan.over_cap > 0,
        detail: format!(
            "{} confirmed stale entries over the cap; left for the next sweep",
            r.plan.over_cap
        ),
    });
    v.push(GuardOutcome {
        guard: Guard::RateLimit,
        acted: r.rate_limit.is_some() && !r.deleted.is_empty(),
        detail: match r.rate_limit {
            Some(rate) => format!(
                "{rate} deletions/s: {} deletions in {:.3} s",
                r.deleted.len() + r.already_gone.len(),
                r.delete_phase.as_secs_f64()
            ),
            None => "off".to_string(),
        },
    });
    v.push(GuardOutcome {
        guard: Guard::Recheck,
        acted: !r.spared.is_empty(),
        detail: format!(
            "{} entries spared: the re-check just before the delete found a live owner",
            r.spared.len()
        ),
    });
    let (acted, detail) = match (&r.plan.hold, &r.interrupted) {
        (Some(hold), _) => (true, format!("{}: {hold}", hold.guard())),
        (None, Some(Interrupted::RecheckIncomplete { unreadable })) => (
            true,
            format!(
                "the re-check inventory could not read {unreadable} namespace(s): stopped deleting"
            ),
        ),
        _ => (
            false,
            "evidence complete, same map, inventory steady".to_string(),
        ),
    };
    v.push(GuardOutcome {
        guard: Guard::FailClosed,
        acted,
        detail,
    });
    v
}

#[derive(Debug, Serialize)]
pub struct SweepSummary {
    pub seen: usize,
    pub stale: usize,
    pub confirmed: usize,
    pub deleted: usize,
    pub already_gone: usize,
    pub spared: usize,
    pub failed: usize,
    pub unconfirmed: usize,
    pub over_cap: usize,
    pub left_behind: usize,
    pub rate_limit: Option<u32>,
    pub delete_phase_seconds: f64,
    pub took_seconds: f64,
    pub interrupted: Option<Interrupted>,
}

#[derive(Debug, Serialize)]
pub struct SweepJson<'a> {
    pub map: MapSource,
    pub dry_run: bool,
    pub inventory: JsonInventory,
    pub summary: SweepSummary,
    pub guards: Vec<GuardOutcome>,
    /// Keys deleted, as 88 hex characters.
    pub deleted: Vec<String>,
    /// Keys the guards allowed: deleted unless it was a dry run.
    pub planned: Vec<Row<'a>>,
}

pub fn sweep_summary(r: &SweepReport) -> SweepSummary {
    SweepSummary {
        seen: r.second.entries.len(),
        stale: r.plan.stale,
        confirmed: r.plan.delete.len() + r.plan.over_cap,
        deleted: r.deleted.len(),
        already_gone: r.already_gone.len(),
        spared: r.spared.len(),
        failed: r.failed.len(),
        unconfirmed: r.plan.unconfirmed,
        over_cap: r.plan.over_cap,
        left_behind: r.left_behind(),
        rate_limit: r.rate_limit.map(|n| n.get()),
        delete_phase_seconds: r.delete_phase.as_secs_f64(),
        took_seconds: r.took.as_secs_f64(),
        interrupted: r.interrupted.clone(),
    }
}

fn planned_entries(r: &SweepReport) -> Vec<Row<'_>> {
    let planned: HashSet<&RawKey> = r.plan.delete.iter().collect();
    let by_key: HashMap<RawKey, usize> = r
        .second
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| planned.contains(&e.raw))
        .map(|(at, e)| (e.raw, at))
        .collect();
    r.plan
        .delete
        .iter()
        .filter_map(|k| {
            by_key.get(k).map(|&at| Row {
                entry: &r.second.entries[at],
                holder: r.second.holders.as_ref().and_then(|h| h.at(at)),
            })
        })
        .collect()
}

pub fn sweep_json<'a>(source: &MapSource, r: &'a SweepReport) -> SweepJson<'a> {
    SweepJson {
        map: source.clone(),
        dry_run: r.dry_run,
        inventory: JsonInventory::of(&r.second),
        summary: sweep_summary(r),
        guards: guard_outcomes(r),
        deleted: r.deleted.iter().map(RawKey::to_hex).collect(),
        planned: planned_entries(r),
    }
}

pub fn sweep_text(source: &MapSource, r: &SweepReport) -> String {
    let mut out = header(source, &r.second);
    let planned = planned_entries(r);
    out.push('\n');
    if r.dry_run {
        let _ = writeln!(
            out,
            "DRY RUN: would delete {} entries (run with --execute to delete):",
            planned.len()
        );
    } else {
        let _ = writeln!(out, "planned deletions ({}):", planned.len());
    }
    for e in planned.iter().map(|p| p.entry) {
        let _ = match e.key() {
            Ok(k) => writeln!(
                out,
                "  {:<6} {:<45} {:<45} {}",
                k.family, k.local, k.remote, e.verdict
            ),
            Err(_) => writeln!(out, "  {:<6} {:<45} {:<45} {}", "?", "-", "-", e.verdict),
        };
    }
    let s = sweep_summary(r);
    out.push('\n');
    let _ = writeln!(
        out,
        "summary    seen {}, stale {}, confirmed {}, deleted {}, already gone {}, spared {}, failed {}, left behind {}",
        s.seen, s.stale, s.confirmed, s.deleted, s.already_gone, s.spared, s.failed, s.left_behind
    );
    let _ = writeln!(
        out,
        "time       {:.3} s in all, delete phase {:.3} s",
        s.took_seconds, s.delete_phase_seconds
    );
    if let Some(Interrupted::Signal) = &r.interrupted {
        let _ = writeln!(out, "STOPPED    by a signal between two deletes");
    }
    for g in guard_outcomes(r).iter().filter(|g| g.acted) {
        let _ = writeln!(out, "guard      {}: {}", g.guard, g.detail);
    }
    for (key, error) in &r.failed {
        let _ = writeln!(out, "FAILED     {}: {error}", key.to_hex());
    }
    out
}
