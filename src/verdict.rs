//! Judges each map entry against the live-socket evidence: pure, no I/O.
//!
//! A wrong `stale` deletes a live connection's entry and loses its queued payload, so every
//! rule leans to `live` or `unknown` when the evidence is not conclusive.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::key::{KeyError, SockKey};
use crate::socket::unmap;

/// What the classifier needs to know of one socket seen through sock_diag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub kind: SocketKind,
    /// The socket cookie; `None` where the source has none (procfs tables).
    pub cookie: Option<u64>,
}

/// The socket an entry actually holds, as the sockmap iterator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldView {
    pub cookie: u64,
    /// The held socket's own ends.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// TCP_CLOSE: since Linux 5.16 such a socket stays in the map while its app keeps the fd.
    pub closed: bool,
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
///
/// Ends are stored packed (18 bytes: the address as IPv6, IPv4 mapped, and the port) rather
/// than as `SocketAddr` (32 bytes): a node's inventory has ~100k sockets.
#[derive(Debug, Default)]
pub struct SocketIndex {
    tuples: HashMap<(PackedEnd, PackedEnd), Owners>,
    /// Local ends of connections, for the L7-proxy rules; `None` when no gateway is known,
    /// so no entry can be a proxy entry.
    local_ends: Option<HashSet<PackedEnd>>,
    sockets: usize,
}

/// One end of a connection, packed for the index; equal for `a.b.c.d:p` and
/// `[::ffff:a.b.c.d]:p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PackedEnd([u8; 18]);

impl PackedEnd {
    fn of(addr: SocketAddr) -> PackedEnd {
        let ip = match addr.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let mut b = [0u8; 18];
        b[..16].copy_from_slice(&ip.octets());
        b[16..].copy_from_slice(&addr.port().to_be_bytes());
        PackedEnd(b)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Owners {
    connection: bool,
    time_wait: bool,
    syn_request: bool,
}

impl SocketIndex {
    pub fn build(sockets: impl IntoIterator<Item = SeenSocket>) -> SocketIndex {
        let sockets = sockets.into_iter();
        let hint = sockets.size_hint().0;
        // Sized once: growing a table of 100k entries briefly holds the old one and the new.
        let mut index = SocketIndex {
            tuples: HashMap::with_capacity(hint),
            local_ends: Some(HashSet::with_capacity(hint)),
            sockets: 0,
        };
        for s in sockets {
            index.insert(s);
        }
        index
    }

    /// An empty index to [`insert`](Self::insert) into; `proxy_rules` keeps the local ends
    /// the L7-proxy rules need (when gateways are known).
    pub fn new(proxy_rules: bool) -> SocketIndex {
        SocketIndex {
            local_ends: proxy_rules.then(HashSet::new),
            ..SocketIndex::default()
        }
    }

    pub fn insert(&mut self, s: SeenSocket) {
        self.sockets += 1;
        let local = PackedEnd::of(s.local);
        let owners = match s.kind {
            SocketKind::Other => return,
            _ => self
                .tuples
                .entry((local, PackedEnd::of(s.remote)))
                .or_default(),
        };
        match s.kind {
            SocketKind::Connection => {
                owners.connection = true;
                if let Some(ends) = self.local_ends.as_mut() {
                    ends.insert(local);
                }
            }
            SocketKind::TimeWait => owners.time_wait = true,
            SocketKind::SynRequest => owners.syn_request = true,
            SocketKind::Other => {}
        }
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
            .get(&(PackedEnd::of(local), PackedEnd::of(remote)))
            .copied()
            .unwrap_or_default()
    }

    fn local_end_owned(&self, local: SocketAddr) -> bool {
        self.local_ends
            .as_ref()
            .is_some_and(|ends| ends.contains(&PackedEnd::of(local)))
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

crate::label::labels! {
    /// A verdict without its reason: the `verdict` of the report and the metrics.
    pub enum VerdictKind {
        Live => "live",
        Stale => "stale",
        Unknown => "unknown",
    }
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
    /// Identity: the held socket itself is alive with exactly the key's ends: the connection
    /// the entry serves.
    HeldIsOwner,
    /// Identity: an L7-proxy entry whose held socket is alive with the key's local end.
    ProxyHeldIsLive,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaleReason {
    /// No socket in any namespace has the tuple.
    NoSocket { namespaces: usize },
    /// Only a TIME_WAIT socket has the tuple: the connection has ended.
    OnlyTimeWait,
    /// Only a handshake in progress has the tuple: the entry will poison that connection.
    OnlySynRequest,
    /// Identity: the held socket is closed (TCP_CLOSE), kept only by its app's open fd.
    HeldClosed,
    /// Identity: the held socket's own ends are not the ends the key files it under.
    HeldElsewhere(Box<Ends>),
    /// Identity: the held socket is another one, and a live connection owns the key's tuple:
    /// that connection's payload goes to the wrong socket (the request stuck right now).
    TupleOwnedByAnother(Box<Ends>),
}

/// A held socket's own ends, as a stale verdict names them. Boxed in the verdict: only stale
/// entries carry them, and every entry of a full map carries a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ends {
    pub local: SocketAddr,
    pub remote: SocketAddr,
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
    /// Read from the map but not judged yet: what an entry holds between the map's read and
    /// its classification, so an observation judges its entries in place. A finished
    /// observation has none.
    NotJudged,
}

impl Verdict {
    /// `live`, `stale` or `unknown`.
    pub fn label(&self) -> &'static str {
        self.kind().as_str()
    }

    pub fn kind(&self) -> VerdictKind {
        match self {
            Verdict::Live(_) => VerdictKind::Live,
            Verdict::Stale(_) => VerdictKind::Stale,
            Verdict::Unknown(_) => VerdictKind::Unknown,
        }
    }

    /// A short stable code for the rule that decided, for scripts and metrics.
    pub fn reason_code(&self) -> &'static str {
        match self {
            Verdict::Live(LiveReason::TupleOwned) => "tuple-owned",
            Verdict::Live(LiveReason::ProxyLocalEndOwned) => "proxy-local-end-owned",
            Verdict::Live(LiveReason::HeldIsOwner) => "held-is-owner",
            Verdict::Live(LiveReason::ProxyHeldIsLive) => "proxy-held-is-live",
            Verdict::Stale(StaleReason::HeldClosed) => "held-closed",
            Verdict::Stale(StaleReason::HeldElsewhere(_)) => "held-elsewhere",
            Verdict::Stale(StaleReason::TupleOwnedByAnother(_)) => "tuple-owned-by-another",
            Verdict::Unknown(UnknownReason::NotJudged) => "not-judged",
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
            Verdict::Live(LiveReason::HeldIsOwner) => f.write_str(
                "the held socket itself is alive with this local and remote end: the connection the entry serves",
            ),
            Verdict::Live(LiveReason::ProxyHeldIsLive) => f.write_str(
                "L7-proxy entry (A side is the gateway) whose held socket is alive with its local end",
            ),
            Verdict::Stale(StaleReason::HeldClosed) => f.write_str(
                "the held socket is closed (TCP_CLOSE); something still references it (its holder says what: an application's fd, a listener's accept queue)",
            ),
            Verdict::Stale(StaleReason::HeldElsewhere(e)) => write!(
                f,
                "the held socket is another one: its own ends are local {} remote {}",
                e.local, e.remote
            ),
            Verdict::Stale(StaleReason::TupleOwnedByAnother(e)) => write!(
                f,
                "the held socket is another one (own ends local {} remote {}) while a live connection owns this tuple: its payload goes to the wrong socket",
                e.local, e.remote
            ),
            Verdict::Unknown(UnknownReason::NotJudged) => f.write_str("not judged yet"),
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

/// The verdict on one entry, from tuple evidence and, when the sockmap iterator could be
/// used, from the socket the entry actually holds.
pub fn classify(
    key: &Result<SockKey, KeyError>,
    held: Option<&HeldView>,
    evidence: &Evidence<'_>,
) -> Verdict {
    let key = match key {
        Ok(key) => key,
        Err(e) => return Verdict::Unknown(UnknownReason::Undecodable(e.clone())),
    };
    let proxy = is_proxy_key(key, evidence.gateways);
    match held {
        Some(held) => by_identity(key, held, proxy, evidence),
        None if proxy => proxy_by_tuple(key, evidence),
        None => by_tuple(key, evidence),
    }
}

/// Whether `key` is one of Cilium's L7-proxy entries: its A side is a gateway address.
pub fn is_proxy_key(key: &SockKey, gateways: &[IpAddr]) -> bool {
    gateways
        .iter()
        .any(|g| unmap(SocketAddr::new(*g, 0)).ip() == unmap(key.remote).ip())
}

/// Whether the held socket has exactly the ends `key` files it under (for an L7-proxy entry,
/// the local end alone). The in-kernel compare-and-delete applies the same rule
/// (bpf/sockmap_identity.bpf.c, `has_key_ends`).
pub fn has_key_ends(key: &SockKey, held: &HeldView, proxy: bool) -> bool {
    unmap(held.local) == unmap(key.local) && (proxy || unmap(held.remote) == unmap(key.remote))
}

fn proxy_by_tuple(key: &SockKey, evidence: &Evidence<'_>) -> Verdict {
    if evidence.sockets.local_end_owned(key.local) {
        Verdict::Live(LiveReason::ProxyLocalEndOwned)
    } else {
        Verdict::Unknown(UnknownReason::ProxyLocalEndNotFound)
    }
}

fn by_tuple(key: &SockKey, evidence: &Evidence<'_>) -> Verdict {
    let owners = evidence.sockets.owners(key.local, key.remote);
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

/// The verdict the held socket alone gives, with no socket lookup: closed, or with ends other
/// than the key's, is stale; alive with exactly the key's ends (for an L7-proxy entry, its
/// local end) is the connection the entry serves, live. The sockmap iterator reads all of it.
pub fn judge_held(key: &SockKey, held: &HeldView, proxy: bool) -> Verdict {
    if held.closed {
        Verdict::Stale(StaleReason::HeldClosed)
    } else if !has_key_ends(key, held, proxy) {
        Verdict::Stale(StaleReason::HeldElsewhere(Box::new(Ends {
            local: held.local,
            remote: held.remote,
        })))
    } else if proxy {
        Verdict::Live(LiveReason::ProxyHeldIsLive)
    } else {
        Verdict::Live(LiveReason::HeldIsOwner)
    }
}

/// [`judge_held`], with the evidence naming the live connection a stale entry wrongs.
fn by_identity(key: &SockKey, held: &HeldView, proxy: bool, evidence: &Evidence<'_>) -> Verdict {
    match judge_held(key, held, proxy) {
        Verdict::Stale(StaleReason::HeldElsewhere(ends))
            if !proxy && evidence.sockets.owners(key.local, key.remote).connection =>
        {
            Verdict::Stale(StaleReason::TupleOwnedByAnother(ends))
        }
        v => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::sa;

    fn sock(local: &str, remote: &str, kind: SocketKind) -> SeenSocket {
        cookied(local, remote, kind, 0)
    }

    /// What the key's own tuple can hold: nothing, or one socket of each kind that matters.
    fn tuple_holdings() -> [Vec<SeenSocket>; 4] {
        [
            vec![],
            vec![sock(SERVER, CLIENT, SocketKind::Connection)],
            vec![sock(SERVER, CLIENT, SocketKind::TimeWait)],
            vec![sock(SERVER, CLIENT, SocketKind::SynRequest)],
        ]
    }

    fn cookied(local: &str, remote: &str, kind: SocketKind, cookie: u64) -> SeenSocket {
        SeenSocket {
            local: sa(local),
            remote: sa(remote),
            kind,
            cookie: (cookie != 0).then_some(cookie),
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
        judge_held(k, None, sockets, unreadable, gateways)
    }

    fn judge_held(
        k: &Result<SockKey, KeyError>,
        held: Option<&HeldView>,
        sockets: &[SeenSocket],
        unreadable: usize,
        gateways: &[IpAddr],
    ) -> Verdict {
        let index = SocketIndex::build(sockets.iter().copied());
        classify(
            k,
            held,
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
        for sockets in tuple_holdings() {
            let owned = sockets.iter().any(|s| s.kind == SocketKind::Connection);
            let want = if owned {
                Verdict::Live(LiveReason::TupleOwned)
            } else {
                Verdict::Unknown(UnknownReason::InventoryIncomplete { unreadable: 1 })
            };
            assert_eq!(judge_with(&k, &sockets, 1, &[]), want, "{sockets:?}");
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

    fn held(local: &str, remote: &str, cookie: u64, closed: bool) -> HeldView {
        HeldView {
            cookie,
            local: sa(local),
            remote: sa(remote),
            closed,
        }
    }

    #[test]
    fn identity_live_only_when_the_held_socket_is_the_owner() {
        let k = key(SERVER, CLIENT);
        let owner = cookied(SERVER, CLIENT, SocketKind::Connection, 77);
        let h = held(SERVER, CLIENT, 77, false);
        assert_eq!(
            judge_held(&k, Some(&h), &[owner], 0, &[]),
            Verdict::Live(LiveReason::HeldIsOwner)
        );
    }

    #[test]
    fn identity_closed_held_socket_is_stale_whatever_the_tuple_says() {
        let k = key(SERVER, CLIENT);
        // Natural stale entry: reset, fd kept, local port reads 0.
        let h = held("10.0.1.2:0", CLIENT, 5, true);
        for sockets in [
            vec![],
            vec![cookied(SERVER, CLIENT, SocketKind::Connection, 9)],
        ] {
            for unreadable in [0, 3] {
                assert_eq!(
                    judge_held(&k, Some(&h), &sockets, unreadable, &[]),
                    Verdict::Stale(StaleReason::HeldClosed)
                );
            }
        }
    }

    #[test]
    fn identity_sees_the_request_stuck_right_now() {
        // A stale key planted for the server end of a future connection; that connection is
        // live now, so tuple evidence alone calls the entry live.
        let k = key(SERVER, CLIENT);
        let new_conn = cookied(SERVER, CLIENT, SocketKind::Connection, 100);
        assert_eq!(
            judge(&k, &[new_conn]),
            Verdict::Live(LiveReason::TupleOwned),
            "the blind spot of tuple evidence"
        );
        let planted = held("127.0.0.1:33000", "127.0.0.1:44000", 7, false);
        assert_eq!(
            judge_held(&k, Some(&planted), &[new_conn], 0, &[]),
            Verdict::Stale(StaleReason::TupleOwnedByAnother(Box::new(Ends {
                local: sa("127.0.0.1:33000"),
                remote: sa("127.0.0.1:44000"),
            })))
        );
        // Without a live owner of the tuple the same mismatch is HeldElsewhere.
        assert_eq!(
            judge_held(&k, Some(&planted), &[], 2, &[]),
            Verdict::Stale(StaleReason::HeldElsewhere(Box::new(Ends {
                local: sa("127.0.0.1:33000"),
                remote: sa("127.0.0.1:44000"),
            })))
        );
    }

    #[test]
    fn identity_alive_held_socket_with_the_keys_ends_is_live_without_a_lookup() {
        // Formerly `held-alive-unconfirmed` unless an inventoried connection had its cookie:
        // the held socket's own state and ends decide, whatever the inventory says.
        let k = key(SERVER, CLIENT);
        let h = held(SERVER, CLIENT, 77, false);
        for (sockets, unreadable) in [
            (vec![], 0),
            (vec![], 1),
            (vec![cookied(SERVER, CLIENT, SocketKind::Connection, 78)], 0),
            (vec![sock(SERVER, CLIENT, SocketKind::Connection)], 0),
            (vec![cookied(SERVER, CLIENT, SocketKind::TimeWait, 77)], 0),
        ] {
            let v = judge_held(&k, Some(&h), &sockets, unreadable, &[]);
            assert_eq!(v, Verdict::Live(LiveReason::HeldIsOwner), "{sockets:?}");
        }
        assert_eq!(
            super::judge_held(&k.clone().expect("key"), &h, false),
            Verdict::Live(LiveReason::HeldIsOwner)
        );
    }

    #[test]
    fn identity_matches_dual_stack_held_sockets() {
        let k = key(SERVER, CLIENT);
        let h = held(
            "[::ffff:10.0.1.2]:8080",
            "[::ffff:10.0.1.1]:40000",
            3,
            false,
        );
        let owner = cookied(SERVER, CLIENT, SocketKind::Connection, 3);
        assert_eq!(
            judge_held(&k, Some(&h), &[owner], 0, &[]),
            Verdict::Live(LiveReason::HeldIsOwner)
        );
    }

    #[test]
    fn identity_proxy_entries_compare_only_the_local_end() {
        let gateway: IpAddr = "10.0.0.1".parse().expect("ip");
        let k = key("10.0.1.2:33000", "10.0.0.1:15001");
        let conn = cookied("10.0.1.2:33000", "10.0.9.9:80", SocketKind::Connection, 11);
        let h = held("10.0.1.2:33000", "10.0.9.9:80", 11, false);
        assert_eq!(
            judge_held(&k, Some(&h), &[conn], 0, &[gateway]),
            Verdict::Live(LiveReason::ProxyHeldIsLive)
        );
        // Alive with the key's local end: live whatever the inventory has (formerly the tuple
        // rule for proxies when no inventoried connection had its cookie).
        let h2 = held("10.0.1.2:33000", "10.0.9.9:80", 12, false);
        assert_eq!(
            judge_held(&k, Some(&h2), &[], 0, &[gateway]),
            Verdict::Live(LiveReason::ProxyHeldIsLive)
        );
        // Identity proof still applies to proxy entries.
        let elsewhere = held("10.0.1.3:1", "10.0.9.9:80", 11, false);
        assert!(judge_held(&k, Some(&elsewhere), &[conn], 0, &[gateway]).is_stale());
        let closed = held("10.0.1.2:0", "10.0.9.9:80", 11, true);
        assert_eq!(
            judge_held(&k, Some(&closed), &[conn], 0, &[gateway]),
            Verdict::Stale(StaleReason::HeldClosed)
        );
    }

    #[test]
    fn identity_off_equals_the_tuple_path() {
        let k = key(SERVER, CLIENT);
        for sockets in tuple_holdings() {
            for unreadable in [0, 1] {
                assert_eq!(
                    judge_held(&k, None, &sockets, unreadable, &[]),
                    judge_with(&k, &sockets, unreadable, &[])
                );
            }
        }
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
            Verdict::Live(LiveReason::HeldIsOwner),
            Verdict::Live(LiveReason::ProxyHeldIsLive),
            Verdict::Stale(StaleReason::HeldClosed),
            Verdict::Stale(StaleReason::HeldElsewhere(Box::new(Ends {
                local: sa(SERVER),
                remote: sa(CLIENT),
            }))),
            Verdict::Stale(StaleReason::TupleOwnedByAnother(Box::new(Ends {
                local: sa(SERVER),
                remote: sa(CLIENT),
            }))),
        ];
        let codes: HashSet<_> = verdicts.iter().map(Verdict::reason_code).collect();
        assert_eq!(codes.len(), verdicts.len());
        assert!(verdicts.iter().all(|v| !v.to_string().is_empty()));
    }
}
