//! Acts on kernel events at once: deletes a closed socket's entry, and the entry a new connection collided with, behind the guards of a deletion minus the second observation.
//!
//! [`judge`] is pure: a close names the entry its socket is filed under (closed is final:
//! no second observation can add to it); a collision names the refused key, judged on the
//! socket the entry holds. [`react`] applies the guards (dry run, `max_deletes` per batch, the
//! rate limit with a budget of its own, the map's id at the path) and deletes through
//! in-kernel compare-and-delete, which deletes only while the entry still holds the judged
//! socket. A collision's entry is judged by that program itself, on whichever socket it holds
//! when met (the rule [`judge_held`] applies), so its reaction needs no read of the map before
//! the delete; a dry run, which deletes nothing, reads the map (one iterator read) to judge.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::clock::monotonic_now;
use crate::deletion::{self, Settled};
use crate::events::{Event, EventSocket, Heard};
use crate::guard::{GuardSettings, Hold};
use crate::identity::{HeldSocket, IdentitySource, Target};
use crate::key::{RawKey, SockKey};
use crate::map::SockMap;
use crate::sweep::{RunError, Trail, Worker};
use crate::verdict::{
    classify, is_proxy_key, Evidence, SeenSocket, SocketIndex, SocketKind, StaleReason,
    UnknownReason, Verdict,
};

/// An entry an event named: compare-and-delete it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub key: RawKey,
    pub judged: Judged,
    /// When the kernel reported the event (CLOCK_MONOTONIC).
    pub at: Duration,
    /// When the reader thread handed it over.
    pub heard: Duration,
}

/// How a named entry is judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judged {
    /// Stale here: the socket it holds (or held), by cookie, and why.
    Socket { cookie: u64, verdict: Verdict },
    /// A collision, judged by compare-and-delete on whichever socket the entry holds when
    /// met; `refused` is the connection that could not be filed under the key.
    AtDelete { refused: EventSocket },
}

impl Judged {
    /// The verdict a delete (or a kept entry) is logged with: a collision's, on the socket
    /// compare-and-delete met (`held`).
    fn verdict(&self, key: &RawKey, held: Option<&HeldSocket>, gateways: &[IpAddr]) -> Verdict {
        match (self, held) {
            (Judged::Socket { verdict, .. }, _) => verdict.clone(),
            (Judged::AtDelete { refused }, Some(h)) => collision_verdict(key, h, refused, gateways),
            // The program's record was lost to a read boundary: it judged, unseen here.
            (Judged::AtDelete { .. }, None) => Verdict::Unknown(UnknownReason::NotJudged),
        }
    }
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
/// key, read for a dry run; `None` leaves collisions to be judged at the delete. Keys come out
/// once each, in event order.
pub fn judge(
    events: &[Heard],
    map_id: u32,
    held: Option<&HashMap<RawKey, HeldSocket>>,
    gateways: &[IpAddr],
) -> (Vec<Named>, Vec<(Event, Skip)>) {
    let mut named = Vec::new();
    let mut skipped = Vec::new();
    let mut seen = HashSet::new();
    for heard in events {
        let event = &heard.event;
        let judged = match event {
            Event::Closed { socket, at, .. } => match socket.key() {
                Some(key) => Ok(Named {
                    key,
                    judged: Judged::Socket {
                        cookie: socket.cookie,
                        verdict: Verdict::Stale(StaleReason::HeldClosed),
                    },
                    at: *at,
                    heard: heard.at,
                }),
                None => Err(Skip::NoKey),
            },
            Event::Collision {
                map_id: id,
                key,
                socket,
                at,
            } => {
                let named = |judged| Named {
                    key: *key,
                    judged,
                    at: *at,
                    heard: heard.at,
                };
                match held.map(|held| held.get(key)) {
                    _ if *id != map_id => Err(Skip::OtherMap { map_id: *id }),
                    None => Ok(named(Judged::AtDelete { refused: *socket })),
                    Some(None) => Err(Skip::EntryGone),
                    Some(Some(h)) => {
                        let verdict = collision_verdict(key, h, socket, gateways);
                        if verdict.is_stale() {
                            Ok(named(Judged::Socket {
                                cookie: h.cookie,
                                verdict,
                            }))
                        } else {
                            Err(Skip::NotStale(verdict))
                        }
                    }
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

/// The verdict on the entry filed under `key` that holds `held`, with `refused` (alive with
/// the key's tuple: the connection the entry wrongs right now) as evidence.
fn collision_verdict(
    key: &RawKey,
    held: &HeldSocket,
    refused: &EventSocket,
    gateways: &[IpAddr],
) -> Verdict {
    let index = SocketIndex::build([SeenSocket {
        local: refused.local,
        remote: refused.remote,
        kind: SocketKind::Connection,
        cookie: Some(refused.cookie),
    }]);
    let evidence = Evidence {
        sockets: &index,
        unreadable_namespaces: 0,
        namespaces_read: 0,
        gateways,
    };
    classify(&SockKey::decode(key), Some(&held.view()), &evidence)
}

/// When one event's reaction reached each stage (CLOCK_MONOTONIC, the clock of [`Event`]'s
/// `at`): where the time from the kernel's event to its delete went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stages {
    /// The kernel saw it.
    pub event: Duration,
    /// The ring buffer's reader decoded it.
    pub heard: Duration,
    /// The reaction took its batch.
    pub taken: Duration,
    /// The map and compare-and-delete were ready.
    pub ready: Duration,
    /// The map at the path was found to be still the one open.
    pub checked: Duration,
    /// Compare-and-delete returned.
    pub deleted: Duration,
}

impl Stages {
    /// From the kernel's event to the delete's return.
    pub fn since_event(&self) -> Duration {
        self.deleted.saturating_sub(self.event)
    }
}

/// Each stage's share, in order: `heard 0.19 ms, taken 0.05 ms, ready 0.02 ms, checked 0.06
/// ms, deleted 3.20 ms`.
impl fmt::Display for Stages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stages = [
            ("heard", self.event, self.heard),
            ("taken", self.heard, self.taken),
            ("ready", self.taken, self.ready),
            ("checked", self.ready, self.checked),
            ("deleted", self.checked, self.deleted),
        ];
        for (i, (name, from, to)) in stages.into_iter().enumerate() {
            let ms = to.saturating_sub(from).as_secs_f64() * 1000.0;
            write!(f, "{}{name} {ms:.2} ms", if i == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

/// A batch of events to act on, with when its reaction took it and when the map and
/// compare-and-delete were ready (CLOCK_MONOTONIC).
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub events: &'a [Heard],
    pub taken: Duration,
    pub ready: Duration,
}

/// The rate limit of reactions: a budget of their own, beside the sweeps' and the passes'.
#[derive(Debug, Default)]
pub struct Budget {
    limiter: Option<(NonZeroU32, DefaultDirectRateLimiter)>,
}

impl Budget {
    /// Sets up the limiter for `rate_limit` ahead of the first reaction (its clock calibrates
    /// on first use: most of a millisecond).
    pub fn prepare(&mut self, guards: &GuardSettings) {
        if let Some(rate) = guards.rate_limit {
            if !matches!(&self.limiter, Some((r, _)) if *r == rate) {
                // A burst of one second's worth: events come in bursts, the limit is per second.
                self.limiter = Some((rate, RateLimiter::direct(Quota::per_second(rate))));
            }
        }
    }

    /// How many of `wanted` deletions `rate_limit` allows now; spent unless a dry run.
    fn allow(&mut self, wanted: usize, guards: &GuardSettings) -> usize {
        if guards.rate_limit.is_none() {
            return wanted;
        }
        self.prepare(guards);
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
    batch: &Batch<'_>,
) -> Result<Reaction, RunError> {
    let events = batch.events;
    let started = Instant::now();
    if !identity.is_active() {
        return Err(RunError::NoIdentity(Worker::Events));
    }
    // A dry run deletes nothing, so no compare-and-delete judges its collisions: it reads
    // the socket behind each collided key (one iterator read) and judges them here.
    let collided: HashSet<RawKey> = events
        .iter()
        .filter_map(|h| match h.event {
            Event::Collision { map_id, key, .. } if map_id == map.id() => Some(key),
            _ => None,
        })
        .collect();
    let held: Option<HashMap<RawKey, HeldSocket>> = if guards.dry_run && !collided.is_empty() {
        let ids = identity
            .read(map)?
            .ok_or(RunError::NoIdentity(Worker::Events))?;
        Some(
            ids.entries
                .into_iter()
                .filter(|(k, _)| collided.contains(k))
                .collect(),
        )
    } else {
        None
    };
    let (mut named, skipped) = judge(events, map.id(), held.as_ref(), gateways);
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
                let checked = monotonic_now();
                // Compare-and-delete re-checks in the kernel that the entry holds the judged
                // socket (for a collision, whichever it holds) and that it is still stale
                // (closed, or other ends than the key's; for an L7-proxy entry, the local end
                // alone).
                let targets: Vec<Target> = named
                    .iter()
                    .map(|n| Target {
                        key: n.key,
                        cookie: match &n.judged {
                            Judged::Socket { cookie, .. } => Some(*cookie),
                            Judged::AtDelete { .. } => None,
                        },
                        local_only: SockKey::decode(&n.key)
                            .is_ok_and(|k| is_proxy_key(&k, gateways)),
                    })
                    .collect();
                let results = identity
                    .compare_and_delete_met(map, &targets)?
                    .ok_or(RunError::NoCompareAndDelete(Worker::Events))?;
                let now = monotonic_now();
                for (n, result) in named.iter().zip(results) {
                    let settled = deletion::after_compare_and_delete(result.outcome);
                    if matches!(settled, Settled::AlreadyGone) {
                        // A close event names a socket in any sockmap: one this map does not
                        // file (or no longer does) is no deletion of its own, nor a trail line.
                        reaction.not_in_map += 1;
                        continue;
                    }
                    let verdict = n.judged.verdict(&n.key, result.held.as_ref(), gateways);
                    let stages = Stages {
                        event: n.at,
                        heard: n.heard,
                        taken: batch.taken,
                        ready: batch.ready,
                        checked,
                        deleted: now,
                    };
                    // The socket it held: the one judged, or for a collision the one met.
                    let cookie = match &n.judged {
                        Judged::Socket { cookie, .. } => Some(*cookie),
                        Judged::AtDelete { .. } => result.held.map(|h| h.cookie),
                    };
                    log(&n.key, cookie, &verdict, &settled, &stages);
                    if let (Some(t), Some(label)) = (trail.as_deref_mut(), settled.trail_label()) {
                        t.record(map, &n.key, &verdict.to_string(), &label)?;
                    }
                    reaction
                        .settled
                        .push((n.key, settled, stages.since_event()));
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

fn log(raw: &RawKey, cookie: Option<u64>, verdict: &Verdict, settled: &Settled, stages: &Stages) {
    let described = SockKey::decode(raw).map_or_else(|e| e.to_string(), |k| k.to_string());
    match settled {
        Settled::Deleted => {
            tracing::info!(key = %raw.to_hex(), entry = %described, reason = %verdict, cookie, since_event_us = stages.since_event().as_micros() as u64, stages = ?stages.to_string(), "deleted stale entry (kernel event)");
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

    fn heard(event: Event) -> Heard {
        Heard {
            event,
            at: Duration::ZERO,
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
        let named = |judged| {
            Ok(Named {
                key: k,
                judged,
                at: Duration::ZERO,
                heard: Duration::ZERO,
            })
        };
        let closed_socket = |cookie| {
            named(Judged::Socket {
                cookie,
                verdict: Verdict::Stale(StaleReason::HeldClosed),
            })
        };
        // (what, event, the map read for a dry run (None: none; Some(None): the entry is
        // not in it), judged)
        type Case = (
            &'static str,
            Event,
            Option<Option<HeldSocket>>,
            Result<Named, Skip>,
        );
        let cases: Vec<Case> = vec![
            (
                "a closed socket's own key, with its cookie",
                closed(SERVER, CLIENT, 7),
                None,
                closed_socket(7),
            ),
            ("a close of mixed families", mixed, None, Err(Skip::NoKey)),
            (
                "a collision, left to compare-and-delete",
                collision(1, SERVER, CLIENT, 20),
                None,
                named(Judged::AtDelete {
                    refused: socket(SERVER, CLIENT, 20),
                }),
            ),
            (
                "a collision with a closed socket (read)",
                collision(1, SERVER, CLIENT, 20),
                Some(Some(held(SERVER, CLIENT, 7, TcpState::Close))),
                closed_socket(7),
            ),
            (
                "a collision with a planted socket of other ends (read)",
                collision(1, SERVER, CLIENT, 20),
                Some(Some(held(
                    "10.0.0.2:9000",
                    "10.0.0.2:9001",
                    8,
                    TcpState::Established,
                ))),
                named(Judged::Socket {
                    cookie: 8,
                    verdict: Verdict::Stale(StaleReason::TupleOwnedByAnother(Box::new(
                        crate::verdict::Ends {
                            local: sa("10.0.0.2:9000"),
                            remote: sa("10.0.0.2:9001"),
                        },
                    ))),
                }),
            ),
            (
                "a collision with a live socket of the key's ends (read)",
                collision(1, SERVER, CLIENT, 20),
                Some(Some(held(SERVER, CLIENT, 7, TcpState::Established))),
                Err(Skip::NotStale(Verdict::Live(
                    crate::verdict::LiveReason::HeldIsOwner,
                ))),
            ),
            (
                "a collision whose entry left (read)",
                collision(1, SERVER, CLIENT, 20),
                Some(None),
                Err(Skip::EntryGone),
            ),
            (
                "a collision in another map",
                collision(2, SERVER, CLIENT, 20),
                None,
                Err(Skip::OtherMap { map_id: 2 }),
            ),
            (
                "a collision in another map (read)",
                collision(2, SERVER, CLIENT, 20),
                Some(Some(held(SERVER, CLIENT, 7, TcpState::Close))),
                Err(Skip::OtherMap { map_id: 2 }),
            ),
        ];
        for (what, event, read, want) in cases {
            let read: Option<HashMap<RawKey, HeldSocket>> =
                read.map(|h| h.into_iter().map(|h| (k, h)).collect());
            let (named, skipped) = judge(&[heard(event)], 1, read.as_ref(), &[]);
            let got = match (named.first(), skipped.first()) {
                (Some(n), None) => Ok(n.clone()),
                (None, Some((_, s))) => Err(s.clone()),
                other => panic!("{what}: one outcome expected, got {other:?}"),
            };
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn a_collision_is_logged_with_the_verdict_on_the_socket_met() {
        let k = key(SERVER, CLIENT);
        let at_delete = Judged::AtDelete {
            refused: socket(SERVER, CLIENT, 20),
        };
        let planted = held("10.0.0.2:9000", "10.0.0.2:9001", 8, TcpState::Established);
        let cases = [
            (
                "closed",
                Some(held(SERVER, CLIENT, 7, TcpState::Close)),
                Verdict::Stale(StaleReason::HeldClosed),
            ),
            (
                "planted, its key's tuple owned by the refused connection",
                Some(planted),
                Verdict::Stale(StaleReason::TupleOwnedByAnother(Box::new(
                    crate::verdict::Ends {
                        local: planted.local,
                        remote: planted.remote,
                    },
                ))),
            ),
            (
                "alive with the key's ends (kept)",
                Some(held(SERVER, CLIENT, 7, TcpState::Established)),
                Verdict::Live(crate::verdict::LiveReason::HeldIsOwner),
            ),
            (
                "its record unseen",
                None,
                Verdict::Unknown(UnknownReason::NotJudged),
            ),
        ];
        for (what, h, want) in cases {
            assert_eq!(at_delete.verdict(&k, h.as_ref(), &[]), want, "{what}");
        }
        let judged = Judged::Socket {
            cookie: 7,
            verdict: Verdict::Stale(StaleReason::HeldClosed),
        };
        assert_eq!(
            judged.verdict(&k, Some(&planted), &[]),
            Verdict::Stale(StaleReason::HeldClosed),
            "a socket judged here keeps its verdict"
        );
    }

    #[test]
    fn a_key_named_twice_is_deleted_once() {
        let events = [
            heard(closed(SERVER, CLIENT, 7)),
            heard(closed(SERVER, CLIENT, 7)),
        ];
        let (named, skipped) = judge(&events, 1, None, &[]);
        assert_eq!(named.len(), 1);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].1, Skip::Repeated);
    }

    #[test]
    fn stages_show_each_share_of_the_time() {
        let ms = |n: u64| Duration::from_micros(n * 10);
        let cases = [
            (
                "in order",
                Stages {
                    event: ms(100),
                    heard: ms(150),
                    taken: ms(160),
                    ready: ms(160),
                    checked: ms(170),
                    deleted: ms(500),
                },
                "heard 0.50 ms, taken 0.10 ms, ready 0.00 ms, checked 0.10 ms, deleted 3.30 ms",
            ),
            (
                // Stamps of two threads: a clock read out of order shows 0, not a panic.
                "out of order",
                Stages {
                    event: ms(100),
                    heard: ms(50),
                    taken: ms(160),
                    ready: ms(160),
                    checked: ms(170),
                    deleted: ms(500),
                },
                "heard 0.00 ms, taken 1.10 ms, ready 0.00 ms, checked 0.10 ms, deleted 3.30 ms",
            ),
        ];
        for (what, s, want) in cases {
            assert_eq!(s.to_string(), want, "{what}");
            assert_eq!(s.since_event(), ms(400), "{what}");
        }
    }
}
