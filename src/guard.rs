//! Decides which stale entries a sweep may delete: pure, no I/O.
//!
//! An entry is deleted only when two observations, `confirm_after` apart, both judged it
//! stale, both were complete, both saw the same map, and the socket inventory did not
//! collapse between them. There is deliberately no breaker on the *fraction* of stale
//! entries: the incident's node had 7,325 stale entries on an idle map, exactly the case a
//! sweep must clean.

use std::collections::HashSet;
use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use serde::Serialize;

use crate::key::RawKey;
use crate::label::labels;
use crate::observation::{Filter, Observation};

labels! {
    /// The guards, as the sweep's report lists them and the `guard` label of the metrics
    /// counts them.
    pub enum Guard {
        /// `--execute` not given, or `dry_run = true`.
        DryRun => "dry-run",
        /// Stale in two observations `confirm_after` apart.
        Confirmation => "confirmation",
        MaxDeletes => "max-deletes",
        RateLimit => "rate-limit",
        /// The re-check just before each delete.
        Recheck => "recheck",
        /// Nothing is deleted on evidence that cannot be trusted: one of the next four.
        FailClosed => "fail-closed",
        IncompleteInventory => "incomplete-inventory",
        MapReplaced => "map-replaced",
        InventoryShrank => "inventory-shrank",
        /// A re-check inventory could not read every namespace: deleting stopped.
        RecheckIncomplete => "recheck-incomplete",
    }
}

/// The longest confirmation wait (or daemon interval) a setting may be. Far beyond any
/// useful value, and far below what overflows the clock arithmetic
/// (`interval_max = "500000000000y"` once made the daemon panic computing its next sweep).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A guard setting refused by [`GuardSettings::new`]; the front end (flag or config key)
/// names the setting, this says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("must be at least 1; a dry run deletes nothing")]
    NoDeletes,
    #[error(
        "longer than {}, the most any duration here may be",
        humantime::format_duration(MAX_DURATION)
    )]
    ConfirmTooLong,
}

/// The guards' settings, validated once.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardSettings {
    /// Report what would be deleted, delete nothing.
    pub dry_run: bool,
    /// Deletions per second; `None` is no limit (an operator's explicit choice).
    pub rate_limit: Option<NonZeroU32>,
    /// At most this many deletions per sweep.
    pub max_deletes: usize,
    /// The least time between the two observations.
    pub confirm_after: Duration,
    /// The namespaces read in both observations may hold at most this fraction fewer sockets
    /// in the second (when they held at least [`SHRINK_FLOOR`] in the first). A namespace
    /// that went away takes its sockets with it and does not count.
    pub max_inventory_shrink: f64,
}

impl GuardSettings {
    /// The one constructor and validator of the guards, for the command line and the config
    /// file alike. `rate_limit` 0 is no limit.
    pub fn new(
        dry_run: bool,
        rate_limit: u32,
        max_deletes: usize,
        confirm_after: Duration,
    ) -> Result<GuardSettings, SettingsError> {
        if max_deletes == 0 {
            return Err(SettingsError::NoDeletes);
        }
        if confirm_after > MAX_DURATION {
            return Err(SettingsError::ConfirmTooLong);
        }
        Ok(GuardSettings {
            dry_run,
            rate_limit: NonZeroU32::new(rate_limit),
            max_deletes,
            confirm_after,
            ..GuardSettings::default()
        })
    }
}

/// Below this many sockets a shrinking inventory is ordinary churn, not a blind spot.
pub const SHRINK_FLOOR: usize = 100;

impl Default for GuardSettings {
    fn default() -> Self {
        GuardSettings {
            dry_run: true,
            rate_limit: NonZeroU32::new(1000),
            max_deletes: 10_000,
            confirm_after: Duration::from_secs(1),
            max_inventory_shrink: 0.5,
        }
    }
}

/// Why a sweep deletes nothing at all: the evidence cannot be trusted.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "guard", rename_all = "kebab-case")]
pub enum Hold {
    /// Some namespaces could not be read: a missing socket may live there.
    Incomplete { observation: u8, unreadable: usize },
    /// The map at the path is another map now (an agent re-created it), or none (`second_id`
    /// 0: unpinned).
    MapReplaced { first_id: u32, second_id: u32 },
    /// The namespaces read in both observations lost too many sockets between them: a
    /// dump came back short.
    InventoryShrank { first: usize, second: usize },
}

impl Hold {
    pub fn guard(&self) -> Guard {
        match self {
            Hold::Incomplete { .. } => Guard::IncompleteInventory,
            Hold::MapReplaced { .. } => Guard::MapReplaced,
            Hold::InventoryShrank { .. } => Guard::InventoryShrank,
        }
    }
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::Incomplete {
                observation,
                unreadable,
            } => write!(
                f,
                "observation {observation} could not read {unreadable} network namespace(s): nothing deleted (fix the access, see the INCOMPLETE lines, and run again)"
            ),
            Hold::MapReplaced {
                first_id,
                second_id: 0,
            } => write!(
                f,
                "the map (id {first_id}) was unpinned during the sweep (an agent restart?): nothing deleted, run again"
            ),
            Hold::MapReplaced {
                first_id,
                second_id,
            } => write!(
                f,
                "the map was replaced between the observations (id {first_id} then {second_id}; an agent restart?): nothing deleted, run again"
            ),
            Hold::InventoryShrank { first, second } => write!(
                f,
                "the sockets of the namespaces read in both observations shrank from {first} to {second}: nothing deleted, run again"
            ),
        }
    }
}

/// What the guards allow.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Keys to delete, in order.
    pub delete: Vec<RawKey>,
    /// Set when the sweep must delete nothing.
    pub hold: Option<Hold>,
    /// Stale (and selected) in the second observation.
    pub stale: usize,
    /// Stale in the second observation but not in the first: not yet confirmed.
    pub unconfirmed: usize,
    /// Confirmed but over `max_deletes`.
    pub over_cap: usize,
}

/// Applies the guards to two observations of the same node.
pub fn plan(
    first: &Observation,
    second: &Observation,
    filter: &Filter,
    settings: &GuardSettings,
) -> Plan {
    let stale_first: HashSet<RawKey> = first.stale().map(|e| e.raw).collect();
    let mut confirmed: Vec<RawKey> = Vec::new();
    let mut plan = Plan::default();
    for e in &second.entries {
        if !e.verdict.is_stale() || !filter.selects(e) {
            continue;
        }
        plan.stale += 1;
        if stale_first.contains(&e.raw) {
            confirmed.push(e.raw);
        } else {
            plan.unconfirmed += 1;
        }
    }
    confirmed.sort();
    plan.hold = hold(first, second, settings);
    if plan.hold.is_some() {
        return plan;
    }
    if confirmed.len() > settings.max_deletes {
        plan.over_cap = confirmed.len() - settings.max_deletes;
        confirmed.truncate(settings.max_deletes);
    }
    plan.delete = confirmed;
    plan
}

fn hold(first: &Observation, second: &Observation, settings: &GuardSettings) -> Option<Hold> {
    for (n, o) in [(1u8, first), (2u8, second)] {
        if !o.is_complete() {
            return Some(Hold::Incomplete {
                observation: n,
                unreadable: o.unreadable.len(),
            });
        }
    }
    if first.map_id != second.map_id {
        return Some(Hold::MapReplaced {
            first_id: first.map_id,
            second_id: second.map_id,
        });
    }
    let (before, after) = first
        .per_netns
        .iter()
        .filter_map(|(id, n)| second.per_netns.get(id).map(|m| (*n, *m)))
        .fold((0usize, 0usize), |(b, a), (n, m)| (b + n, a + m));
    if before >= SHRINK_FLOOR
        && (after as f64) < (before as f64) * (1.0 - settings.max_inventory_shrink)
    {
        return Some(Hold::InventoryShrank {
            first: before,
            second: after,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::SockKey;
    use crate::netns::NetnsId;
    use crate::observation::{Judged, Unreadable};
    use crate::verdict::{LiveReason, StaleReason, Verdict};

    fn entry(port: u16, stale: bool) -> Judged {
        let key = SockKey::for_socket(
            "10.0.1.2:8080".parse().expect("a"),
            std::net::SocketAddr::new("10.0.1.1".parse().expect("ip"), port),
        )
        .expect("family");
        Judged {
            raw: key.encode(),
            held: None,
            verdict: if stale {
                Verdict::Stale(StaleReason::NoSocket { namespaces: 1 })
            } else {
                Verdict::Live(LiveReason::TupleOwned)
            },
        }
    }

    const NS: NetnsId = NetnsId {
        dev: 4,
        inode: 4026531840,
    };

    fn obs(map_id: u32, sockets: usize, entries: Vec<Judged>) -> Observation {
        Observation {
            map_id,
            identity: false,
            entries,
            namespaces_read: 1,
            namespaces_vanished: 0,
            procfs_tables: 0,
            unreadable: vec![],
            sockets,
            lookups: None,
            per_netns: [(NS, sockets)].into_iter().collect(),
            took: Duration::ZERO,
            holders: None,
        }
    }

    fn settings() -> GuardSettings {
        GuardSettings {
            dry_run: false,
            ..GuardSettings::default()
        }
    }

    #[test]
    fn deletes_only_what_both_observations_judged_stale() {
        let first = obs(1, 10, vec![entry(1, true), entry(2, true), entry(3, false)]);
        let second = obs(1, 10, vec![entry(1, true), entry(2, false), entry(3, true)]);
        let p = plan(&first, &second, &Filter::default(), &settings());
        assert_eq!(p.delete, vec![entry(1, true).raw]);
        assert_eq!(p.stale, 2);
        assert_eq!(p.unconfirmed, 1);
        assert_eq!(p.hold, None);
    }

    #[test]
    fn an_entry_gone_by_the_second_observation_is_not_deleted() {
        let first = obs(1, 10, vec![entry(1, true)]);
        let second = obs(1, 10, vec![]);
        assert!(plan(&first, &second, &Filter::default(), &settings())
            .delete
            .is_empty());
    }

    #[test]
    fn incident_scale_is_not_a_breaker() {
        // 7,325 stale of 7,400: all go.
        let entries = |n: u16| (0..n).map(|p| entry(p, p < 7325)).collect::<Vec<_>>();
        let first = obs(1, 150, entries(7400));
        let second = obs(1, 150, entries(7400));
        let p = plan(&first, &second, &Filter::default(), &settings());
        assert_eq!(p.delete.len(), 7325);
        assert_eq!(p.over_cap, 0);
    }

    #[test]
    fn cap_truncates_and_counts() {
        let first = obs(1, 10, (0..5).map(|p| entry(p, true)).collect());
        let second = obs(1, 10, (0..5).map(|p| entry(p, true)).collect());
        let p = plan(
            &first,
            &second,
            &Filter::default(),
            &GuardSettings {
                max_deletes: 3,
                ..settings()
            },
        );
        assert_eq!(p.delete.len(), 3);
        assert_eq!(p.over_cap, 2);
        let sorted = {
            let mut d = p.delete.clone();
            d.sort();
            d
        };
        assert_eq!(p.delete, sorted, "deterministic order");
    }

    #[test]
    fn incomplete_either_observation_holds() {
        for which in [1u8, 2] {
            let mut first = obs(1, 10, vec![entry(1, true)]);
            let mut second = obs(1, 10, vec![entry(1, true)]);
            let bad = if which == 1 { &mut first } else { &mut second };
            bad.unreadable.push(Unreadable {
                what: "pid 9".into(),
                error: "EACCES".into(),
            });
            let p = plan(&first, &second, &Filter::default(), &settings());
            assert!(p.delete.is_empty());
            assert_eq!(
                p.hold,
                Some(Hold::Incomplete {
                    observation: which,
                    unreadable: 1
                })
            );
            assert_eq!(p.stale, 1, "still reported");
        }
    }

    #[test]
    fn replaced_map_holds() {
        let first = obs(1, 10, vec![entry(1, true)]);
        let second = obs(2, 10, vec![entry(1, true)]);
        let p = plan(&first, &second, &Filter::default(), &settings());
        assert!(p.delete.is_empty());
        assert_eq!(
            p.hold.as_ref().map(|h| h.guard().as_str()),
            Some("map-replaced")
        );
    }

    #[test]
    fn sharp_shrink_holds_but_small_churn_does_not() {
        let e = || vec![entry(1, true)];
        let shrank = Hold::InventoryShrank {
            first: 1000,
            second: 400,
        };
        // (sockets in the first observation, in the second, the hold). Tiny inventories churn
        // by large fractions in ordinary operation.
        for (first, second, hold) in [(1000, 400, Some(shrank)), (1000, 600, None), (20, 2, None)] {
            let p = plan(
                &obs(1, first, e()),
                &obs(1, second, e()),
                &Filter::default(),
                &settings(),
            );
            let held = hold.is_some();
            assert_eq!(p.hold, hold, "{first} then {second} sockets");
            if !held {
                assert_eq!(p.delete.len(), 1, "{first} then {second} sockets");
            }
        }
    }

    #[test]
    fn a_namespace_going_away_is_not_a_shrink() {
        let e = || vec![entry(1, true)];
        let gone = NetnsId { dev: 4, inode: 1 };
        let mut first = obs(1, 1010, e());
        first.per_netns.insert(gone, 1000);
        first.per_netns.insert(NS, 10);
        let second = obs(1, 10, e());
        let p = plan(&first, &second, &Filter::default(), &settings());
        assert_eq!(p.hold, None);
        assert_eq!(p.delete.len(), 1);
    }

    #[test]
    fn filter_limits_candidates() {
        let first = obs(1, 10, vec![entry(1, true), entry(2, true)]);
        let second = first.clone();
        let p = plan(
            &first,
            &second,
            &Filter {
                local: None,
                remote: Some("10.9.9.9".parse().expect("ip")),
            },
            &settings(),
        );
        assert!(p.delete.is_empty());
        assert_eq!(p.stale, 0);
    }

    #[test]
    fn hold_messages_say_what_to_do() {
        for h in [
            Hold::Incomplete {
                observation: 1,
                unreadable: 2,
            },
            Hold::MapReplaced {
                first_id: 1,
                second_id: 2,
            },
            Hold::MapReplaced {
                first_id: 1,
                second_id: 0,
            },
            Hold::InventoryShrank {
                first: 9,
                second: 1,
            },
        ] {
            let s = h.to_string();
            assert!(s.contains("nothing deleted"), "{s}");
        }
    }

    /// Each setting and whether it is refused (the command line and the config share it).
    #[test]
    fn settings_are_validated_once_for_flags_and_file() {
        let s = Duration::from_secs;
        let cases = [
            (1000, 10_000, s(1), Ok(())),
            (0, 1, s(0), Ok(())),
            (1000, 0, s(1), Err(SettingsError::NoDeletes)),
            (1000, 1, MAX_DURATION, Ok(())),
            (
                1000,
                1,
                MAX_DURATION + s(1),
                Err(SettingsError::ConfirmTooLong),
            ),
            (1000, 1, Duration::MAX, Err(SettingsError::ConfirmTooLong)),
        ];
        for (rate, cap, confirm, want) in cases {
            let got = GuardSettings::new(false, rate, cap, confirm);
            assert_eq!(
                got.as_ref().map(|_| ()),
                want.as_ref().map(|_| ()),
                "{rate} {cap} {confirm:?}"
            );
            if let Ok(g) = got {
                assert_eq!(g.rate_limit.map(NonZeroU32::get).unwrap_or(0), rate);
                assert_eq!(g.max_deletes, cap);
            }
        }
    }
}
