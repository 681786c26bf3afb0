//! The continuous pass: with identity, one read of the sockmap iterator is the whole
//! observation. Each entry is judged on the socket it holds alone
//! ([`crate::verdict::judge_held`], no sock_diag), and the entries judged stale in
//! consecutive passes at least `confirm_after` apart are deleted through in-kernel
//! compare-and-delete, which re-checks the verdict. Every
//! guard of a sweep applies: dry run, the rate limit, a cap per pass, and the map's id checked
//! each pass.
//!
//! The decisions ([`PassState::decide`]) are pure; [`pass`] reads, decides and deletes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::clock::thread_cpu_time;
use crate::deletion::{self, Settled};
use crate::guard::{GuardSettings, Hold};
use crate::identity::{IdentitySource, Target};
use crate::key::RawKey;
use crate::map::SockMap;
use crate::observation::judge_by_held;
use crate::sweep::{log_settled, RunError, Trail, Worker};
use crate::verdict::Verdict;

/// One entry as a pass judged it.
#[derive(Debug, Clone)]
pub struct PassEntry {
    pub raw: RawKey,
    /// The held socket's cookie.
    pub cookie: u64,
    /// An L7-proxy entry: compare-and-delete compares its local end alone.
    pub proxy: bool,
    pub verdict: Verdict,
}

/// When a pass first judged an entry stale, on which socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sighting {
    cookie: u64,
    since: Instant,
}

/// What the passes carry from one to the next.
#[derive(Debug, Default)]
pub struct PassState {
    map_id: Option<u32>,
    /// The entries judged stale by the last pass.
    stale: HashMap<RawKey, Sighting>,
    /// Deletions the rate limit allows now: a bucket refilled at the limit, holding at most
    /// one second's worth.
    tokens: f64,
    last: Option<Instant>,
}

/// What one pass decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Confirmed stale and allowed by the guards, oldest first, with how long each has been
    /// judged stale.
    pub delete: Vec<(Target, Verdict, Duration)>,
    pub stale: usize,
    /// Stale, but not yet judged so for `confirm_after`.
    pub unconfirmed: usize,
    /// Confirmed, but over the cap per pass.
    pub over_cap: usize,
    /// Confirmed, but beyond what the rate limit allows now.
    pub rate_limited: usize,
}

impl PassState {
    /// Judges a pass's entries against the last passes' and applies the guards. A map with
    /// another id than the last pass's starts afresh: nothing seen on the old one confirms
    /// anything on the new one. In a dry run the plan is the same, and no budget is spent.
    pub fn decide(
        &mut self,
        map_id: u32,
        entries: &[PassEntry],
        now: Instant,
        guards: &GuardSettings,
    ) -> Decision {
        if self.map_id != Some(map_id) {
            self.map_id = Some(map_id);
            self.stale.clear();
        }
        let limit = guards.rate_limit.map(|r| f64::from(r.get()));
        self.tokens = match (limit, self.last) {
            (Some(r), Some(last)) => {
                (self.tokens + r * now.saturating_duration_since(last).as_secs_f64()).min(r)
            }
            (Some(r), None) => r,
            (None, _) => f64::INFINITY,
        };
        self.last = Some(now);
        let mut decision = Decision::default();
        let mut stale = HashMap::new();
        let mut confirmed = Vec::new();
        for e in entries.iter().filter(|e| e.verdict.is_stale()) {
            decision.stale += 1;
            let seen = match self.stale.get(&e.raw) {
                Some(s) if s.cookie == e.cookie => *s,
                _ => Sighting {
                    cookie: e.cookie,
                    since: now,
                },
            };
            stale.insert(e.raw, seen);
            let age = now.saturating_duration_since(seen.since);
            if seen.since < now && age >= guards.confirm_after {
                confirmed.push((e, age));
            } else {
                decision.unconfirmed += 1;
            }
        }
        self.stale = stale;
        // Oldest first: under a cap or the rate limit, the longest-standing harm goes first.
        confirmed.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.raw.cmp(&b.0.raw)));
        if confirmed.len() > guards.max_deletes {
            decision.over_cap = confirmed.len() - guards.max_deletes;
            confirmed.truncate(guards.max_deletes);
        }
        let allowed = self.tokens.floor().min(confirmed.len() as f64) as usize;
        decision.rate_limited = confirmed.len() - allowed;
        confirmed.truncate(allowed);
        if !guards.dry_run && limit.is_some() {
            self.tokens -= allowed as f64;
        }
        decision.delete = confirmed
            .into_iter()
            .map(|(e, age)| {
                let target = Target {
                    key: e.raw,
                    cookie: Some(e.cookie),
                    local_only: e.proxy,
                };
                (target, e.verdict.clone(), age)
            })
            .collect();
        decision
    }

    /// Forgets every sighting (the map was replaced, or the passes paused).
    pub fn reset(&mut self) {
        self.stale.clear();
        self.map_id = None;
    }
}

/// The wait from one pass's start to the next: `interval`, or `confirm_after` when sooner and
/// entries await confirmation (the pass that confirms them comes as soon as it may), stretched
/// so that passes cost at most `budget` of one core on average (a pass that took `cpu` waits
/// at least `cpu / budget`).
pub fn next_pass_wait(
    interval: Duration,
    awaiting: Option<Duration>,
    cpu: Duration,
    budget: f64,
) -> Duration {
    let want = awaiting.map_or(interval, |confirm| confirm.min(interval));
    let stretched = cpu.as_secs_f64() / budget.max(f64::MIN_POSITIVE);
    if stretched > want.as_secs_f64() {
        Duration::try_from_secs_f64(stretched).unwrap_or(Duration::MAX)
    } else {
        want
    }
}

/// What one pass saw and did.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    pub map_id: u32,
    pub entries: usize,
    pub dry_run: bool,
    pub decision: Decision,
    /// Set when the pass deleted nothing because the map at the path is another one now.
    pub hold: Option<Hold>,
    /// Deleted, with each entry's stale age (first pass that judged it stale → delete).
    pub deleted: Vec<(RawKey, Duration)>,
    pub already_gone: usize,
    /// Kept by compare-and-delete: the entry holds another socket, or the judged socket has
    /// the key's ends now.
    pub spared: usize,
    pub failed: usize,
    /// The pass thread's CPU time (user and system), but for `loading`.
    pub cpu: Duration,
    /// CPU time spent loading the BPF programs before the pass (its caller's first pass, or
    /// the first after a reload or on a new map): a one-time cost, outside `cpu`.
    pub loading: Duration,
    pub took: Duration,
}

impl PassReport {
    /// Whether the pass did or was kept from doing anything worth a journal line.
    pub fn is_quiet(&self) -> bool {
        self.deleted.is_empty()
            && self.spared == 0
            && self.failed == 0
            && self.hold.is_none()
            && self.decision.over_cap == 0
    }
}

/// One pass over `map`: read the socket behind every entry, judge, decide with `state`, and
/// unless it is a dry run delete through compare-and-delete. `started` is when the pass was
/// due to start, the time its judgements are filed under: the caller schedules the next pass
/// from it, so passes meant to be `confirm_after` apart are.
pub fn pass(
    map: &SockMap,
    identity: &mut IdentitySource,
    state: &mut PassState,
    guards: &GuardSettings,
    gateways: &[IpAddr],
    trail: Option<&mut Trail>,
    started: Instant,
) -> Result<PassReport, RunError> {
    let cpu_started = thread_cpu_time();
    // Judged as they are read, and only the stale kept, by their place in the read: a later
    // sighting of an entry (shown again after a read boundary) replaces the earlier.
    let mut stale: HashMap<usize, PassEntry> = HashMap::new();
    let read = identity.read_views_into(map, &mut |at, raw, held| {
        // An entry whose key does not decode is never stale.
        match judge_by_held(&raw, &held, gateways) {
            Some((_, proxy, verdict)) if verdict.is_stale() => {
                let entry = PassEntry {
                    raw,
                    cookie: held.cookie,
                    proxy,
                    verdict,
                };
                stale.insert(at, entry);
            }
            _ => {
                stale.remove(&at);
            }
        }
    })?;
    let count = read.ok_or(RunError::NoIdentity(Worker::Pass))?;
    let entries: Vec<PassEntry> = stale.into_values().collect();
    let mut report = PassReport {
        map_id: map.id(),
        entries: count,
        dry_run: guards.dry_run,
        ..PassReport::default()
    };
    report.decision = state.decide(report.map_id, &entries, started, guards);
    drop(entries);
    if !guards.dry_run && !report.decision.delete.is_empty() {
        // The fd reads the map it was opened on, whatever the path holds now: ask the path.
        match map.id_at_path_now() {
            Ok(id) if id == map.id() => delete(map, identity, &mut report, trail)?,
            now => {
                state.reset();
                report.hold = Some(Hold::MapReplaced {
                    first_id: map.id(),
                    second_id: now.unwrap_or(0),
                });
            }
        }
    }
    report.cpu = thread_cpu_time().saturating_sub(cpu_started);
    report.took = started.elapsed();
    Ok(report)
}

fn delete(
    map: &SockMap,
    identity: &mut IdentitySource,
    report: &mut PassReport,
    mut trail: Option<&mut Trail>,
) -> Result<(), RunError> {
    let targets: Vec<Target> = report.decision.delete.iter().map(|(t, _, _)| *t).collect();
    let outcomes = identity
        .compare_and_delete(map, &targets)?
        .ok_or(RunError::NoCompareAndDelete(Worker::Pass))?;
    for ((target, verdict, age), (_, cad)) in report.decision.delete.iter().zip(outcomes) {
        let settled = deletion::after_compare_and_delete(cad);
        log_settled(&target.key, verdict, &settled);
        if let (Some(t), Some(label)) = (trail.as_deref_mut(), settled.trail_label()) {
            t.record(map, &target.key, &verdict.to_string(), &label)?;
        }
        match settled {
            Settled::Deleted => report.deleted.push((target.key, *age)),
            Settled::AlreadyGone => report.already_gone += 1,
            Settled::Spared(_) => report.spared += 1,
            Settled::Failed(_) => report.failed += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::SockKey;
    use crate::verdict::{LiveReason, StaleReason};
    use std::num::NonZeroU32;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn raw(port: u16) -> RawKey {
        SockKey::for_socket(
            "10.0.1.2:8080".parse().expect("addr"),
            std::net::SocketAddr::new("10.0.1.1".parse().expect("ip"), port),
        )
        .expect("v4")
        .encode()
    }

    fn entry(port: u16, cookie: u64, stale: bool) -> PassEntry {
        PassEntry {
            raw: raw(port),
            cookie,
            proxy: false,
            verdict: if stale {
                Verdict::Stale(StaleReason::HeldClosed)
            } else {
                Verdict::Live(LiveReason::HeldIsOwner)
            },
        }
    }

    fn guards(dry_run: bool, rate: u32, max_deletes: usize) -> GuardSettings {
        GuardSettings {
            dry_run,
            rate_limit: NonZeroU32::new(rate),
            max_deletes,
            confirm_after: Duration::from_secs(1),
            ..GuardSettings::default()
        }
    }

    fn ports(d: &Decision) -> Vec<RawKey> {
        d.delete.iter().map(|(t, _, _)| t.key).collect()
    }

    #[test]
    fn an_entry_is_deleted_once_judged_stale_for_confirm_after_on_the_same_socket() {
        let g = guards(false, 1000, 100);
        let t0 = Instant::now();
        let mut s = PassState::default();
        // (passes after t0, entries, expected deletes)
        let table: [(u64, Vec<PassEntry>, Vec<RawKey>); 6] = [
            (0, vec![entry(1, 10, true), entry(2, 20, false)], vec![]),
            // 0.5 s: not yet confirmed.
            (500, vec![entry(1, 10, true), entry(2, 20, true)], vec![]),
            // 1 s after the first sighting of 1; 2 was first stale at 0.5 s.
            (
                1000,
                vec![entry(1, 10, true), entry(2, 20, true)],
                vec![raw(1)],
            ),
            // 2 now holds another socket: its clock starts again.
            (1500, vec![entry(2, 21, true)], vec![]),
            // Not stale in one pass: the chain is broken.
            (2000, vec![entry(2, 21, false)], vec![]),
            (3100, vec![entry(2, 21, true)], vec![]),
        ];
        for (at, entries, want) in table {
            let d = s.decide(7, &entries, t0 + MS(at), &g);
            assert_eq!(ports(&d), want, "pass at {at} ms");
        }
        let d = s.decide(7, &[entry(2, 21, true)], t0 + MS(4100), &g);
        assert_eq!(ports(&d), vec![raw(2)]);
        assert_eq!(d.delete[0].2, MS(1000), "the stale age");
    }

    #[test]
    fn a_replaced_map_confirms_nothing_seen_on_the_old_one() {
        let g = guards(false, 1000, 100);
        let t0 = Instant::now();
        let mut s = PassState::default();
        s.decide(7, &[entry(1, 10, true)], t0, &g);
        let d = s.decide(8, &[entry(1, 10, true)], t0 + MS(1500), &g);
        assert!(d.delete.is_empty());
        assert_eq!(d.unconfirmed, 1);
        let d = s.decide(8, &[entry(1, 10, true)], t0 + MS(2500), &g);
        assert_eq!(ports(&d), vec![raw(1)]);
    }

    #[test]
    fn the_cap_and_the_rate_limit_hold_back_the_youngest() {
        let t0 = Instant::now();
        let mut s = PassState::default();
        let g = guards(false, 2, 3);
        let first: Vec<PassEntry> = (1..=2).map(|p| entry(p, u64::from(p), true)).collect();
        s.decide(7, &first, t0, &g);
        let all: Vec<PassEntry> = (1..=5).map(|p| entry(p, u64::from(p), true)).collect();
        s.decide(7, &all, t0 + MS(500), &g);
        // 1 and 2 are the oldest; 5 confirmed, cap 3, rate 2 per second.
        let d = s.decide(7, &all, t0 + MS(1500), &g);
        assert_eq!(ports(&d), vec![raw(1), raw(2)]);
        assert_eq!((d.stale, d.over_cap, d.rate_limited), (5, 2, 1));
        // Half a second refills one deletion.
        let d = s.decide(7, &all[2..], t0 + MS(2000), &g);
        assert_eq!(d.delete.len(), 1);
        assert_eq!(d.rate_limited, 2);
        // No limit.
        let mut s = PassState::default();
        let g = guards(false, 0, 100);
        s.decide(7, &all, t0, &g);
        assert_eq!(s.decide(7, &all, t0 + MS(1000), &g).delete.len(), 5);
    }

    #[test]
    fn a_dry_run_plans_alike_and_spends_no_budget() {
        let t0 = Instant::now();
        let g = guards(true, 1, 100);
        let mut s = PassState::default();
        let all: Vec<PassEntry> = (1..=3).map(|p| entry(p, u64::from(p), true)).collect();
        s.decide(7, &all, t0, &g);
        for at in [1000, 1100, 1200] {
            assert_eq!(s.decide(7, &all, t0 + MS(at), &g).delete.len(), 1);
        }
    }

    #[test]
    fn passes_come_sooner_to_confirm_and_stretch_to_the_cpu_budget() {
        let second = Duration::from_secs(1);
        // (awaiting confirmation, CPU of the pass, wait)
        let table = [
            (None, MS(5), second),
            (None, MS(10), second),
            (None, MS(60), MS(6000)),
            (Some(MS(500)), MS(2), MS(500)),
            (Some(MS(500)), MS(8), MS(800)),
            (Some(MS(3000)), MS(2), second),
            (Some(MS(500)), MS(60), MS(6000)),
        ];
        for (awaiting, cpu, wait) in table {
            assert_eq!(
                next_pass_wait(second, awaiting, cpu, 0.01),
                wait,
                "{awaiting:?} {cpu:?}"
            );
        }
        assert_eq!(next_pass_wait(second, None, MS(60), 1.0), second);
        assert_eq!(
            next_pass_wait(second, None, Duration::MAX, 0.01),
            Duration::MAX,
            "never a panic"
        );
    }
}
