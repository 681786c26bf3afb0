//! Acts on kernel events at once: deletes a closed socket's entry, and the entry a new connection collided with, behind the guards of a deletion minus the second observation.
//!
//! [`judge`] is pure: a close names the entry its socket is filed under (closed is final:
//! no second observation can add to it); a collision names the refused key, judged on the
//! socket the entry holds. [`react`] reads what a collision needs (one iterator read), applies
//! the guards (dry run, `max_deletes` per batch, the rate limit with a budget of its own, the
//! map's id at the path) and deletes through in-kernel compare-and-delete, which deletes only
//! while the entry still holds the judged socket.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::deletion::{self, Settled};
use crate::events::{monotonic_now, Event};
use crate::guard::{GuardSettings, Hold};
use crate::identity::{HeldSocket, IdentityError, IdentitySource, Target};
use crate::key::{RawKey, SockKey};
use crate::map::{MapError, SockMap};
use crate::observation::held_view;
use crate::sweep::{SweepError, Trail};
use crate::verdict::{
    classify, is_proxy_key, Evidence, SeenSocket, SocketIndex, SocketKind, StaleReason, Verdict,
};

/// An entry an event named and that is judged stale: compare-and-delete it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub key: RawKey,
    /// The cookie of the socket it holds (or held), judged stale.
    pub cookie: u64,
    pub verdict: Verdict,
    /// When the kernel reported the event (CLOCK_MONOTONIC).
    pub at: Duration,
}

/// Why an event leads to no delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// A collision in another map than the one being cleaned.
    OtherMap { map_id: u32 },
    /// The closed socket's ends are of two families: no key files it.
    NoKey,
    /// The collided entry is gone already.
    EntryGone,
    /// The collided entry holds a socket that is not stale (alive with the key's ends).
    NotStale(Verdict),
    /// The same key was named by an earlier event of this batch.
    Repeated,
}

/// What a batch of events asks of map `map_id`. `held` is the socket behind each collided
/// key (empty when the batch has no collision). Keys come out once each, in event order.
pub fn judge(
    events: &[Event],
    map_id: u32,
    held: &HashMap<RawKey, HeldSocket>,
    gateways: &[IpAddr],
) -> (Vec<Named>, Vec<(Event, Skip)>) {
    let mut named = Vec::new();
    let mut skipped = Vec::new();
    let mut seen = HashSet::new();
    for event in events {
        let judged = match event {
            Event::Closed { socket, at, .. } => match socket.key() {
                Some(key) => Ok(Named {
                    key,
                    cookie: socket.cookie,
                    verdict: Verdict::Stale(StaleReason::HeldClosed),
                    at: *at,
                }),
                None => Err(Skip::NoKey),
            },
            Event::Collision {
                map_id: id,
                key,
                socket,
                at,
            } => {
                if *id != map_id {
                    Err(Skip::OtherMap { map_id: *id })
                } else if let Some(h) = held.get(key) {
                    // The refused socket is alive with the key's tuple: the connection the
                    // entry wrongs right now.
                    let index = SocketIndex::build([SeenSocket {
                        local: socket.local,
                        remote: socket.remote,
                        kind: SocketKind::Connection,
                        cookie: Some(socket.cookie),
                    }]);
                    let evidence = Evidence {
                        sockets: &index,
                        unreadable_namespaces: 0,
                        namespaces_read: 0,
                        gateways,
                    };
                    let view = held_view(h);
                    let verdict = classify(&SockKey::decode(key), Some(&view), &evidence);
                    if verdict.is_stale() {
                        Ok(Named {
                            key: *key,
                            cookie: h.cookie,
                            verdict,
                            at: *at,
                        })
                    } else {
                        Err(Skip::NotStale(verdict))
                    }
                } else {
                    Err(Skip::EntryGone)
                }
            }
        };
        match judged {
            Ok(n) if seen.insert(n.key) => named.push(n),
            Ok(_) => skipped.push((*event, Skip::Repeated)),
            Err(skip) => skipped.push((*event, skip)),
        }
    }
    (named, skipped)
}

/// The rate limit of reactions: a budget of their own, beside the sweeps' and the passes'.
#[derive(Debug, Default)]
pub struct Budget {
    limiter: Option<(NonZeroU32, DefaultDirectRateLimiter)>,
}

impl Budget {
    /// How many of `wanted` deletions `rate_limit` allows now; spent unless a dry run.
    fn allow(&mut self, wanted: usize, guards: &GuardSettings) -> usize {
        let Some(rate) = guards.rate_limit else {
            return wanted;
        };
        if !matches!(&self.limiter, Some((r, _)) if *r == rate) {
            // A burst of one second's worth: events come in bursts, the limit is per second.
            self.limiter = Some((rate, RateLimiter::direct(Quota::per_second(rate))));
        }
        let Some((_, limiter)) = &self.limiter else {
            return 0;
        };
        if guards.dry_run {
            return wanted;
        }
        (0..wanted).take_while(|_| limiter.check().is_ok()).count()
    }
}

/// What one reaction to a batch of events saw and did.
#[derive(Debug, Clone, Default)]
pub struct Reaction {
    pub map_id: u32,
    pub events: usize,
    pub dry_run: bool,
    /// Entries the events named and judged stale.
    pub named: usize,
    /// Of those, the ones compare-and-delete did not find in this map: a closed socket filed
    /// in another sockmap, or an entry gone already.
    pub not_in_map: usize,
    /// Judged stale, but over `max_deletes` or beyond the rate limit now (the continuous pass
    /// or the next sweep takes them).
    pub over_cap: usize,
    pub rate_limited: usize,
    /// Set when nothing was deleted because the map at the path is another one now.
    pub hold: Option<Hold>,
    /// In a dry run, the entries that would be deleted.
    pub would_delete: Vec<RawKey>,
    /// Each entry acted on, how it settled, and the time from its event to the settling.
    pub settled: Vec<(RawKey, Settled, Duration)>,
    /// Events that named nothing to delete.
    pub skipped: Vec<(Event, Skip)>,
    pub took: Duration,
}

impl Reaction {
    pub fn count(&self, outcome: deletion::Outcome) -> usize {
        self.settled
            .iter()
            .filter(|(_, s, _)| s.outcome() == outcome)
            .count()
    }

    /// Whether it did, or was kept from doing, anything worth a journal line.
    pub fn is_quiet(&self) -> bool {
        self.settled
            .iter()
            .all(|(_, s, _)| matches!(s, Settled::AlreadyGone))
            && self.would_delete.is_empty()
            && self.hold.is_none()
            && self.over_cap + self.rate_limited == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReactError {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Trail(#[from] SweepError),
    #[error("identity is not in use (off, or refused by this kernel): kernel events delete through its compare-and-delete")]
    NoIdentity,
    #[error("in-kernel compare-and-delete is refused on this kernel: kernel events delete only through it")]
    NoCompareAndDelete,
}

/// Acts on a batch of events against `map`: reads the socket behind each collided key (one
/// iterator read, only when the batch has a collision on this map), judges, applies the
/// guards and, unless it is a dry run, deletes through compare-and-delete.
pub fn react(
    map: &SockMap,
    identity: &mut IdentitySource,
    budget: &mut Budget,
    guards: &GuardSettings,
    gateways: &[IpAddr],
    mut trail: Option<&mut Trail>,
    events: &[Event],
) -> Result<Reaction, ReactError> {
    let started = Instant::now();
    if !identity.is_active() {
        return Err(ReactError::NoIdentity);
    }
    let collided: HashSet<RawKey> = events
        .iter()
        .filter_map(|e| match e {
            Event::Collision { map_id, key, .. } if *map_id == map.id() => Some(*key),
            _ => None,
        })
        .collect();
    let held: HashMap<RawKey, HeldSocket> = if collided.is_empty() {
        HashMap::new()
    } else {
        let ids = identity.read(map)?.ok_or(ReactError::NoIdentity)?;
        ids.entries
            .into_iter()
            .filter(|(k, _)| collided.contains(k))
            .collect()
    };
    let (mut named, skipped) = judge(events, map.id(), &held, gateways);
    let mut reaction = Reaction {
        map_id: map.id(),
        events: events.len(),
        dry_run: guards.dry_run,
        named: named.len(),
        skipped,
        ..Reaction::default()
    };
    if named.len() > guards.max_deletes {
        reaction.over_cap = named.len() - guards.max_deletes;
        named.truncate(guards.max_deletes);
    }
    let allowed = budget.allow(named.len(), guards);
    reaction.rate_limited = named.len() - allowed;
    named.truncate(allowed);
    if guards.dry_run {
        reaction.would_delete = named.iter().map(|n| n.key).collect();
    } else if !named.is_empty() {
        // The fd reads the map it was opened on, whatever the path holds now: ask the path.
        match map.id_at_path_now() {
            Ok(id) if id == map.id() => {
                // Compare-and-delete re-checks in the kernel that the entry holds the judged
                // socket and that it is still stale (closed, or other ends than the key's;
                // for an L7-proxy entry, the local end alone).
                let targets: Vec<Target> = named
                    .iter()
                    .map(|n| Target {
                        key: n.key,
                        cookie: Some(n.cookie),
                        local_only: SockKey::decode(&n.key)
                            .is_ok_and(|k| is_proxy_key(&k, gateways)),
                    })
                    .collect();
                let outcomes = identity
                    .compare_and_delete(map, &targets)?
                    .ok_or(ReactError::NoCompareAndDelete)?;
                let now = monotonic_now();
                for (n, (_, outcome)) in named.iter().zip(outcomes) {
                    let settled = deletion::after_compare_and_delete(outcome);
                    if matches!(settled, Settled::AlreadyGone) {
                        // A close event names a socket in any sockmap: one this map does not
                        // file (or no longer does) is no deletion of its own, nor a trail line.
                        reaction.not_in_map += 1;
                        continue;
                    }
                    let since = now.saturating_sub(n.at);
                    log(&n.key, &n.verdict, &settled, since);
                    if let (Some(t), Some(label)) = (trail.as_deref_mut(), settled.trail_label()) {
                        t.record(map, &n.key, &n.verdict.to_string(), &label)?;
                    }
                    reaction.settled.push((n.key, settled, since));
                }
            }
            now => {
                reaction.hold = Some(Hold::MapReplaced {
                    first_id: map.id(),
                    second_id: now.unwrap_or(0),
                });
            }
        }
    }
    reaction.took = started.elapsed();
    Ok(reaction)
}

fn log(raw: &RawKey, verdict: &Verdict, settled: &Settled, since_event: Duration) {
    let described = SockKey::decode(raw).map_or_else(|e| e.to_string(), |k| k.to_string());
    match settled {
        Settled::Deleted => {
            tracing::info!(key = %raw.to_hex(), entry = %described, reason = %verdict, since_event_us = since_event.as_micros() as u64, "deleted stale entry (kernel event)");
        }
        Settled::AlreadyGone => {}
        Settled::Spared(why) => {
            tracing::info!(key = %raw.to_hex(), entry = %described, "spared ({why}): kept");
        }
        Settled::Failed(e) => {
            tracing::warn!(key = %raw.to_hex(), entry = %described, error = %e, "delete failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::events::EventSocket;
    use crate::socket::TcpState;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn socket(local: &str, remote: &str, cookie: u64) -> EventSocket {
        EventSocket {
            cookie,
            local: sa(local),
            remote: sa(remote),
            netns_inode: 1,
        }
    }

    fn closed(local: &str, remote: &str, cookie: u64) -> Event {
        Event::Closed {
            socket: socket(local, remote, cookie),
            from: TcpState::Established,
            at: Duration::ZERO,
        }
    }

    fn key(local: &str, remote: &str) -> RawKey {
        SockKey::for_socket(sa(local), sa(remote))
            .expect("one family")
            .encode()
    }

    fn collision(map_id: u32, local: &str, remote: &str, cookie: u64) -> Event {
        Event::Collision {
            map_id,
            key: key(local, remote),
            socket: socket(local, remote, cookie),
            at: Duration::ZERO,
        }
    }

    fn held(local: &str, remote: &str, cookie: u64, state: TcpState) -> HeldSocket {
        HeldSocket {
            cookie,
            local: sa(local),
            remote: sa(remote),
            state,
            netns_inode: 1,
            inode: 5,
            orphaned: false,
            error: 0,
        }
    }

    const SERVER: &str = "10.0.0.2:8080";
    const CLIENT: &str = "10.0.0.1:40000";

    #[test]
    fn events_are_judged_as_a_table() {
        let k = key(SERVER, CLIENT);
        let mixed = Event::Closed {
            socket: EventSocket {
                cookie: 9,
                local: sa(SERVER),
                remote: sa("[fd00::1]:40000"),
                netns_inode: 1,
            },
            from: TcpState::Established,
            at: Duration::ZERO,
        };
        type Case = (&'static str, Event, Option<HeldSocket>, Result<Named, Skip>);
        let cases: Vec<Case> = vec![
            (
                "a closed socket's own key, with its cookie",
                closed(SERVER, CLIENT, 7),
                None,
                Ok(Named {
                    key: k,
                    cookie: 7,
                    verdict: Verdict::Stale(StaleReason::HeldClosed),
                    at: Duration::ZERO,
                }),
            ),
            ("a close of mixed families", mixed, None, Err(Skip::NoKey)),
            (
                "a collision with a closed socket",
                collision(1, SERVER, CLIENT, 20),
                Some(held(SERVER, CLIENT, 7, TcpState::Close)),
                Ok(Named {
                    key: k,
                    cookie: 7,
                    verdict: Verdict::Stale(StaleReason::HeldClosed),
                    at: Duration::ZERO,
                }),
            ),
            (
                "a collision with a planted socket of other ends",
                collision(1, SERVER, CLIENT, 20),
                Some(held(
                    "10.0.0.2:9000",
                    "10.0.0.2:9001",
                    8,
                    TcpState::Established,
                )),
                Ok(Named {
                    key: k,
                    cookie: 8,
                    verdict: Verdict::Stale(StaleReason::TupleOwnedByAnother(Box::new(
                        crate::verdict::Ends {
                            local: sa("10.0.0.2:9000"),
                            remote: sa("10.0.0.2:9001"),
                        },
                    ))),
                    at: Duration::ZERO,
                }),
            ),
            (
                "a collision with a live socket of the key's ends",
                collision(1, SERVER, CLIENT, 20),
                Some(held(SERVER, CLIENT, 7, TcpState::Established)),
                Err(Skip::NotStale(Verdict::Live(
                    crate::verdict::LiveReason::HeldIsOwner,
                ))),
            ),
            (
                "a collision whose entry left",
                collision(1, SERVER, CLIENT, 20),
                None,
                Err(Skip::EntryGone),
            ),
            (
                "a collision in another map",
                collision(2, SERVER, CLIENT, 20),
                Some(held(SERVER, CLIENT, 7, TcpState::Close)),
                Err(Skip::OtherMap { map_id: 2 }),
            ),
        ];
        for (what, event, h, want) in cases {
            let held: HashMap<RawKey, HeldSocket> = h.into_iter().map(|h| (k, h)).collect();
            let (named, skipped) = judge(&[event], 1, &held, &[]);
            let got = match (named.first(), skipped.first()) {
                (Some(n), None) => Ok(n.clone()),
                (None, Some((_, s))) => Err(s.clone()),
                other => panic!("{what}: one outcome expected, got {other:?}"),
            };
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn a_key_named_twice_is_deleted_once() {
        let events = [closed(SERVER, CLIENT, 7), closed(SERVER, CLIENT, 7)];
        let (named, skipped) = judge(&events, 1, &HashMap::new(), &[]);
        assert_eq!(named.len(), 1);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].1, Skip::Repeated);
    }
}
