//! Judges the entries that kernel events name, at once: a closed socket's entry, and the entry a new connection collided with.
//!
//! Pure: the caller reads the socket behind each collided key (the identity iterator) and
//! deletes what is judged stale through compare-and-delete, which re-checks the verdict in
//! the kernel. A close needs no read: closed is final, and the delete re-checks it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::events::Event;
use crate::identity::HeldSocket;
use crate::key::{RawKey, SockKey};
use crate::observation::held_view;
use crate::verdict::{
    classify, Evidence, SeenSocket, SocketIndex, SocketKind, StaleReason, Verdict,
};

/// An entry an event named and that is judged stale: compare-and-delete it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub key: RawKey,
    /// The cookie of the socket it holds (or held), judged stale.
    pub cookie: u64,
    pub verdict: Verdict,
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
            Event::Closed { socket, .. } => match socket.key() {
                Some(key) => Ok(Named {
                    key,
                    cookie: socket.cookie,
                    verdict: Verdict::Stale(StaleReason::HeldClosed),
                }),
                None => Err(Skip::NoKey),
            },
            Event::Collision {
                map_id: id,
                key,
                socket,
                ..
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

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
                }),
            ),
            (
                "a collision with a live socket of the key's ends",
                collision(1, SERVER, CLIENT, 20),
                Some(held(SERVER, CLIENT, 7, TcpState::Established)),
                Err(Skip::NotStale(Verdict::Unknown(
                    crate::verdict::UnknownReason::HeldAliveUnconfirmed,
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
