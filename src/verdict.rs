//! Judges each map entry against the live-socket evidence: pure, no I/O.
//!
//! A wrong `stale` deletes a live connection's entry and loses its queued payload, so every
//! rule leans to `live` or `unknown` when the evidence is not conclusive.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::key::{KeyError, SockKey};

/// What the classifier needs to know of one socket seen through sock_diag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub kind: SocketKind,
}

/// The socket's TCP state, reduced to what matters for a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocketKind {
    /// A full socket of a connection that has not ended (ESTABLISHED, SYN_SENT, SYN_RECV,
    /// FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING).
    Connection,
    /// TIME_WAIT: the connection has ended; the kernel keeps only a mini socket.
    TimeWait,
    /// NEW_SYN_RECV: a request socket for a handshake in progress.
    SynRequest,
    /// LISTEN, CLOSE or anything else that owns no connection tuple.
    Other,
}

/// Live sockets indexed by tuple, built once per observation: O(sockets).
#[derive(Debug, Default)]
pub struct SocketIndex {
    tuples: HashMap<(SocketAddr, SocketAddr), Owners>,
    local_ends: HashSet<SocketAddr>,
    sockets: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct Owners {
    connection: bool,
    time_wait: bool,
    syn_request: bool,
}

impl SocketIndex {
    pub fn build(sockets: impl IntoIterator<Item = SeenSocket>) -> SocketIndex {
        let mut index = SocketIndex::default();
        for s in sockets {
            index.sockets += 1;
            let local = unmap(s.local);
            let owners = match s.kind {
                SocketKind::Other => continue,
                _ => index.tuples.entry((local, unmap(s.remote))).or_default(),
            };
            match s.kind {
                SocketKind::Connection => {
                    owners.connection = true;
                    index.local_ends.insert(local);
                }
                SocketKind::TimeWait => owners.time_wait = true,
                SocketKind::SynRequest => owners.syn_request = true,
                SocketKind::Other => {}
            }
        }
        index
    }

    /// How many sockets went into the index.
    pub fn len(&self) -> usize {
        self.sockets
    }

    pub fn is_empty(&self) -> bool {
        self.sockets == 0
    }

    fn owners(&self, local: SocketAddr, remote: SocketAddr) -> Owners {
        self.tuples
            .get(&(unmap(local), unmap(remote)))
            .copied()
            .unwrap_or_default()
    }

    fn local_end_owned(&self, local: SocketAddr) -> bool {
        self.local_ends.contains(&unmap(local))
    }
}

/// An IPv4 connection on a dual-stack socket shows as `::ffff:a.b.c.d`; Cilium's IPv4
/// keys hold `a.b.c.d`. Both sides of every comparison go through here.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// Everything the classifier weighs besides the key itself.
#[derive(Debug)]
pub struct Evidence<'a> {
    pub sockets: &'a SocketIndex,
    /// Namespaces that could not be read. When any could not, a missing socket proves
    /// nothing: it may live in one of them.
    pub unreadable_namespaces: usize,
    pub namespaces_read: usize,
    /// Addresses of Cilium's `cilium_host` (its L7-proxy entries carry one as their A side).
    pub gateways: &'a [IpAddr],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Live(LiveReason),
    Stale(StaleReason),
    Unknown(UnknownReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveReason {
    /// A connection's socket has exactly the held socket's local and remote ends.
    TupleOwned,
    /// An L7-proxy entry whose local end a live connection owns.
    ProxyLocalEndOwned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// No socket in any namespace has the tuple.
    NoSocket { namespaces: usize },
    /// Only a TIME_WAIT socket has the tuple: the connection has ended.
    OnlyTimeWait,
    /// Only a handshake in progress has the tuple: the entry will poison that connection.
    OnlySynRequest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownReason {
    Undecodable(KeyError),
    /// No owner was found, but some namespaces could not be read.
    InventoryIncomplete {
        unreadable: usize,
    },
    /// An L7-proxy entry whose local end no live connection owns.
    ProxyLocalEndNotFound,
}

impl Verdict {
    /// `live`, `stale` or `unknown`.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Live(_) => "live",
            Verdict::Stale(_) => "stale",
            Verdict::Unknown(_) => "unknown",
        }
    }

    /// A short stable code for the rule that decided, for scripts and metrics.
    pub fn reason_code(&self) -> &'static str {
        match self {
            Verdict::Live(LiveReason::TupleOwned) => "tuple-owned",
            Verdict::Live(LiveReason::ProxyLocalEndOwned) => "proxy-local-end-owned",
            Verdict::Stale(StaleReason::NoSocket { .. }) => "no-socket",
            Verdict::Stale(StaleReason::OnlyTimeWait) => "only-time-wait",
            Verdict::Stale(StaleReason::OnlySynRequest) => "only-syn-request",
            Verdict::Unknown(UnknownReason::Undecodable(_)) => "undecodable",
            Verdict::Unknown(UnknownReason::InventoryIncomplete { .. }) => "inventory-incomplete",
            Verdict::Unknown(UnknownReason::ProxyLocalEndNotFound) => "proxy-local-end-not-found",
        }
    }

    pub fn is_stale(&self) -> bool {
        matches!(self, Verdict::Stale(_))
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Live(LiveReason::TupleOwned) => {
                f.write_str("a live connection's socket has this local and remote end")
            }
            Verdict::Live(LiveReason::ProxyLocalEndOwned) => f.write_str(
                "L7-proxy entry (A side is the gateway) and a live connection owns its local end",
            ),
            Verdict::Stale(StaleReason::NoSocket { namespaces }) => write!(
                f,
                "no socket in any of the {namespaces} network namespaces has this local and remote end"
            ),
            Verdict::Stale(StaleReason::OnlyTimeWait) => {
                f.write_str("only a TIME_WAIT socket has this tuple: the connection has ended")
            }
            Verdict::Stale(StaleReason::OnlySynRequest) => f.write_str(
                "only a handshake in progress has this tuple: the entry will hang that connection",
            ),
            Verdict::Unknown(UnknownReason::Undecodable(e)) => {
                write!(f, "key does not decode: {e}")
            }
            Verdict::Unknown(UnknownReason::InventoryIncomplete { unreadable }) => write!(
                f,
                "no live socket found, but {unreadable} network namespace(s) could not be read: not judged"
            ),
            Verdict::Unknown(UnknownReason::ProxyLocalEndNotFound) => f.write_str(
                "L7-proxy entry (A side is the gateway) and no live connection owns its local end: never judged stale on tuple evidence",
            ),
        }
    }
}

/// The verdict on one entry.
pub fn classify(key: &Result<SockKey, KeyError>, evidence: &Evidence<'_>) -> Verdict {
    let key = match key {
        Ok(key) => key,
        Err(e) => return Verdict::Unknown(UnknownReason::Undecodable(e.clone())),
    };
    let index = evidence.sockets;
    if evidence
        .gateways
        .iter()
        .any(|g| unmap(SocketAddr::new(*g, 0)).ip() == unmap(key.remote).ip())
    {
        return if index.local_end_owned(key.local) {
            Verdict::Live(LiveReason::ProxyLocalEndOwned)
        } else {
            Verdict::Unknown(UnknownReason::ProxyLocalEndNotFound)
        };
    }
    let owners = index.owners(key.local, key.remote);
    if owners.connection {
        return Verdict::Live(LiveReason::TupleOwned);
    }
    if evidence.unreadable_namespaces > 0 {
        return Verdict::Unknown(UnknownReason::InventoryIncomplete {
            unreadable: evidence.unreadable_namespaces,
        });
    }
    if owners.syn_request {
        Verdict::Stale(StaleReason::OnlySynRequest)
    } else if owners.time_wait {
        Verdict::Stale(StaleReason::OnlyTimeWait)
    } else {
        Verdict::Stale(StaleReason::NoSocket {
            namespaces: evidence.namespaces_read,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn sock(local: &str, remote: &str, kind: SocketKind) -> SeenSocket {
        SeenSocket {
            local: sa(local),
            remote: sa(remote),
            kind,
        }
    }

    fn key(local: &str, remote: &str) -> Result<SockKey, KeyError> {
        Ok(SockKey::for_socket(sa(local), sa(remote)).expect("one family"))
    }

    fn judge(k: &Result<SockKey, KeyError>, sockets: &[SeenSocket]) -> Verdict {
        judge_with(k, sockets, 0, &[])
    }

    fn judge_with(
        k: &Result<SockKey, KeyError>,
        sockets: &[SeenSocket],
        unreadable: usize,
        gateways: &[IpAddr],
    ) -> Verdict {
        let index = SocketIndex::build(sockets.iter().copied());
        classify(
            k,
            &Evidence {
                sockets: &index,
                unreadable_namespaces: unreadable,
                namespaces_read: 3,
                gateways,
            },
        )
    }

    const SERVER: &str = "10.0.1.2:8080";
    const CLIENT: &str = "10.0.1.1:40000";

    #[test]
    fn held_server_end_is_live_when_server_socket_exists() {
        let k = key(SERVER, CLIENT);
        let v = judge(&k, &[sock(SERVER, CLIENT, SocketKind::Connection)]);
        assert_eq!(v, Verdict::Live(LiveReason::TupleOwned));
        assert_eq!(v.label(), "live");
    }

    #[test]
    fn the_peer_socket_does_not_make_an_entry_live() {
        // The client's socket has the swapped tuple: it keeps the *other* key alive.
        let k = key(SERVER, CLIENT);
        let v = judge(&k, &[sock(CLIENT, SERVER, SocketKind::Connection)]);
        assert_eq!(v, Verdict::Stale(StaleReason::NoSocket { namespaces: 3 }));
    }

    #[test]
    fn no_socket_is_stale_with_the_namespace_count() {
        let v = judge(&key(SERVER, CLIENT), &[]);
        assert!(v.is_stale());
        assert_eq!(v.reason_code(), "no-socket");
        assert!(v.to_string().contains("3 network namespaces"));
    }

    #[test]
    fn time_wait_and_syn_request_alone_are_stale() {
        let k = key(SERVER, CLIENT);
        assert_eq!(
            judge(&k, &[sock(SERVER, CLIENT, SocketKind::TimeWait)]),
            Verdict::Stale(StaleReason::OnlyTimeWait)
        );
        assert_eq!(
            judge(&k, &[sock(SERVER, CLIENT, SocketKind::SynRequest)]),
            Verdict::Stale(StaleReason::OnlySynRequest)
        );
        assert_eq!(
            judge(
                &k,
                &[
                    sock(SERVER, CLIENT, SocketKind::TimeWait),
                    sock(SERVER, CLIENT, SocketKind::SynRequest)
                ]
            ),
            Verdict::Stale(StaleReason::OnlySynRequest)
        );
    }

    #[test]
    fn a_connection_beside_time_wait_is_live() {
        let k = key(SERVER, CLIENT);
        let v = judge(
            &k,
            &[
                sock(SERVER, CLIENT, SocketKind::TimeWait),
                sock(SERVER, CLIENT, SocketKind::Connection),
            ],
        );
        assert_eq!(v, Verdict::Live(LiveReason::TupleOwned));
    }

    #[test]
    fn listeners_and_other_states_own_nothing() {
        let k = key(SERVER, CLIENT);
        let v = judge(
            &k,
            &[
                sock(SERVER, "0.0.0.0:0", SocketKind::Other),
                sock(SERVER, CLIENT, SocketKind::Other),
            ],
        );
        assert!(v.is_stale());
    }

    #[test]
    fn near_misses_do_not_match() {
        let k = key(SERVER, CLIENT);
        for (local, remote) in [
            ("10.0.1.2:8081", CLIENT),
            (SERVER, "10.0.1.1:40001"),
            ("10.0.1.3:8080", CLIENT),
            (SERVER, "10.0.1.9:40000"),
        ] {
            let v = judge(&k, &[sock(local, remote, SocketKind::Connection)]);
            assert!(v.is_stale(), "{local} {remote}");
        }
    }

    #[test]
    fn incomplete_inventory_never_judges_stale() {
        let k = key(SERVER, CLIENT);
        for sockets in [
            vec![],
            vec![sock(SERVER, CLIENT, SocketKind::TimeWait)],
            vec![sock(SERVER, CLIENT, SocketKind::SynRequest)],
        ] {
            let v = judge_with(&k, &sockets, 1, &[]);
            assert_eq!(
                v,
                Verdict::Unknown(UnknownReason::InventoryIncomplete { unreadable: 1 })
            );
        }
        // A found owner is still proof of life.
        let v = judge_with(&k, &[sock(SERVER, CLIENT, SocketKind::Connection)], 2, &[]);
        assert_eq!(v, Verdict::Live(LiveReason::TupleOwned));
    }

    #[test]
    fn undecodable_keys_are_unknown() {
        let v = judge(&Err(KeyError::Family(9)), &[]);
        assert_eq!(
            v,
            Verdict::Unknown(UnknownReason::Undecodable(KeyError::Family(9)))
        );
        assert_eq!(v.reason_code(), "undecodable");
    }

    #[test]
    fn ipv4_keys_match_dual_stack_sockets() {
        let k = key(SERVER, CLIENT);
        let v = judge(
            &k,
            &[sock(
                "[::ffff:10.0.1.2]:8080",
                "[::ffff:10.0.1.1]:40000",
                SocketKind::Connection,
            )],
        );
        assert_eq!(v, Verdict::Live(LiveReason::TupleOwned));
    }

    #[test]
    fn ipv6_keys() {
        let k = key("[fd00::2]:8080", "[fd00::1]:40000");
        assert!(judge(&k, &[]).is_stale());
        let v = judge(
            &k,
            &[sock(
                "[fd00::2]:8080",
                "[fd00::1]:40000",
                SocketKind::Connection,
            )],
        );
        assert_eq!(v, Verdict::Live(LiveReason::TupleOwned));
    }

    #[test]
    fn proxy_entries_are_live_or_unknown_never_stale() {
        let gateway: IpAddr = "10.0.0.1".parse().expect("ip");
        // A = gateway:proxy port, B = the redirected socket's local end.
        let k = key("10.0.1.2:33000", "10.0.0.1:15001");
        let v = judge_with(
            &k,
            &[sock(
                "10.0.1.2:33000",
                "10.0.9.9:80",
                SocketKind::Connection,
            )],
            0,
            &[gateway],
        );
        assert_eq!(v, Verdict::Live(LiveReason::ProxyLocalEndOwned));
        for sockets in [
            vec![],
            vec![sock("10.0.1.2:33000", "10.0.9.9:80", SocketKind::TimeWait)],
        ] {
            let v = judge_with(&k, &sockets, 0, &[gateway]);
            assert_eq!(v, Verdict::Unknown(UnknownReason::ProxyLocalEndNotFound));
            assert!(!v.is_stale());
        }
        // Without the gateway known the same entry has no owner.
        assert!(judge(&k, &[]).is_stale());
    }

    #[test]
    fn index_counts_every_socket() {
        let index = SocketIndex::build([
            sock(SERVER, CLIENT, SocketKind::Connection),
            sock(SERVER, "0.0.0.0:0", SocketKind::Other),
        ]);
        assert_eq!(index.len(), 2);
        assert!(!index.is_empty());
    }

    #[test]
    fn every_verdict_has_a_distinct_code_and_a_sentence() {
        let verdicts = [
            Verdict::Live(LiveReason::TupleOwned),
            Verdict::Live(LiveReason::ProxyLocalEndOwned),
            Verdict::Stale(StaleReason::NoSocket { namespaces: 1 }),
            Verdict::Stale(StaleReason::OnlyTimeWait),
            Verdict::Stale(StaleReason::OnlySynRequest),
            Verdict::Unknown(UnknownReason::Undecodable(KeyError::Family(0))),
            Verdict::Unknown(UnknownReason::InventoryIncomplete { unreadable: 1 }),
            Verdict::Unknown(UnknownReason::ProxyLocalEndNotFound),
        ];
        let codes: HashSet<_> = verdicts.iter().map(Verdict::reason_code).collect();
        assert_eq!(codes.len(), verdicts.len());
        assert!(verdicts.iter().all(|v| !v.to_string().is_empty()));
    }
}
