//! One observation of the node: snapshot the map, inventory every namespace (or, with
//! identity, look up the sockets that matter), judge each entry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::diag;
use crate::identity::{HeldSocket, IdentityError, IdentitySource};
use crate::key::{KeyError, RawKey, SockKey};
use crate::lookup::{self, Lookups, Tuple};
use crate::map::{MapError, SockMap};
use crate::netns::{self, NetnsId};
use crate::procnet;
use crate::verdict::{
    classify, is_proxy_key, judge_held, Evidence, HeldView, SeenSocket, SocketIndex, UnknownReason,
    Verdict,
};

/// One map entry with its decoding and verdict.
#[derive(Debug, Clone)]
pub struct Judged {
    pub raw: RawKey,
    /// The socket the entry holds, when identity is in use.
    pub held: Option<HeldSocket>,
    pub verdict: Verdict,
}

impl Judged {
    /// The decoded key. Decoded again on each call rather than stored: a full map has 65,535
    /// entries, and decoding 44 bytes costs less than keeping 72 more per entry.
    pub fn key(&self) -> Result<SockKey, KeyError> {
        SockKey::decode(&self.raw)
    }

    /// The held socket as the classifier weighs it.
    pub fn held_view(&self) -> Option<HeldView> {
        self.held.as_ref().map(held_view)
    }
}

pub fn held_view(h: &HeldSocket) -> HeldView {
    HeldView {
        cookie: h.cookie,
        local: h.local,
        remote: h.remote,
        closed: h.state == diag::TcpState::Close,
    }
}

/// A namespace that could not be read, with why.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub what: String,
    pub error: String,
}

/// Everything one observation saw.
#[derive(Debug, Clone)]
pub struct Observation {
    pub map_id: u32,
    /// Whether the socket behind each entry was seen (the sockmap iterator).
    pub identity: bool,
    pub entries: Vec<Judged>,
    pub namespaces_read: usize,
    pub namespaces_vanished: usize,
    pub procfs_tables: usize,
    pub unreadable: Vec<Unreadable>,
    pub sockets: usize,
    /// With identity: how many tuples were looked up exactly (not dumped), and how many held
    /// sockets' namespaces no path reached. `None` for a full inventory.
    pub lookups: Option<LookupCounts>,
    pub per_netns: HashMap<NetnsId, usize>,
    pub took: Duration,
}

/// The exact lookups of one observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupCounts {
    pub asked: usize,
    pub unreached_namespaces: usize,
}

impl Observation {
    pub fn is_complete(&self) -> bool {
        self.unreadable.is_empty()
    }
}

/// Which entries an operator asked about: the held socket's local and remote IP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub local: Option<IpAddr>,
    pub remote: Option<IpAddr>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.local.is_none() && self.remote.is_none()
    }

    /// Whether `entry` is one asked about; its key is decoded only when the filter needs it.
    pub fn selects(&self, entry: &Judged) -> bool {
        self.is_empty() || self.matches(&entry.key())
    }

    /// An entry whose key does not decode matches only the empty filter.
    pub fn matches(&self, key: &Result<SockKey, KeyError>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Ok(key) = key else { return false };
        self.local.is_none_or(|ip| key.local.ip() == ip)
            && self.remote.is_none_or(|ip| key.remote.ip() == ip)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// The live sockets of every namespace, indexed for the classifier.
#[derive(Debug)]
pub struct Sockets {
    pub index: SocketIndex,
    pub namespaces_read: usize,
    pub namespaces_vanished: usize,
    /// Namespace files denied to us whose TCP table was read from `/proc/PID/net` instead.
    pub procfs_tables: usize,
    pub unreadable: Vec<Unreadable>,
    /// Sockets dumped per namespace, to tell a namespace that went away from one read short.
    /// Empty after exact lookups: an answer is one socket or none, never a dump cut short.
    pub per_netns: HashMap<NetnsId, usize>,
    pub lookups: Option<LookupCounts>,
}

impl Sockets {
    pub fn evidence<'a>(&'a self, gateways: &'a [IpAddr]) -> Evidence<'a> {
        Evidence {
            sockets: &self.index,
            unreadable_namespaces: self.unreadable.len(),
            namespaces_read: self.namespaces_read,
            gateways,
        }
    }
}

/// Inventories the TCP sockets of every network namespace under `proc_root`.
/// `proxy_rules`: keep what the L7-proxy rules need (when gateways are known).
pub fn gather_sockets(proc_root: &Path, proxy_rules: bool) -> Result<Sockets, ObserveError> {
    let mut gathered = Gathered::new(proxy_rules);
    let inventory = diag::inventory_node_into(proc_root, &mut |ns, sockets| {
        gathered.add(ns.id, sockets);
    })?;
    Ok(gathered.finish(inventory))
}

/// Sockets indexed as each namespace's come in, so a node's ~100k sockets are never all held
/// as a list besides the index.
struct Gathered {
    index: SocketIndex,
    per_netns: HashMap<NetnsId, usize>,
}

impl Gathered {
    fn new(proxy_rules: bool) -> Gathered {
        Gathered {
            index: SocketIndex::new(proxy_rules),
            per_netns: HashMap::new(),
        }
    }

    fn add(&mut self, netns: NetnsId, sockets: Vec<diag::LiveSocket>) {
        *self.per_netns.entry(netns).or_default() += sockets.len();
        for s in &sockets {
            self.index.insert(s.seen());
        }
    }

    /// Adds the TCP tables of denied namespaces, read through procfs, and the inventory's
    /// accounting.
    fn finish(mut self, inventory: diag::Inventory) -> Sockets {
        let mut unreadable: Vec<Unreadable> = inventory
            .failed
            .iter()
            .map(|(ns, e)| Unreadable {
                what: ns.label.clone(),
                error: e.to_string(),
            })
            .collect();
        let mut procfs_tables = 0;
        let mut gone = 0;
        for e in &inventory.unreadable {
            match read_denied_netns(e) {
                Denied::Read(rows) => {
                    procfs_tables += 1;
                    for p in rows {
                        self.index.insert(SeenSocket {
                            local: p.local,
                            remote: p.remote,
                            kind: p.state.kind(),
                            cookie: None,
                        });
                    }
                }
                Denied::Gone => gone += 1,
                Denied::Unreadable => unreadable.push(Unreadable {
                    what: e.path().display().to_string(),
                    error: e.to_string(),
                }),
            }
        }
        Sockets {
            index: self.index,
            namespaces_read: inventory.read,
            namespaces_vanished: inventory.vanished.len() + gone,
            procfs_tables,
            unreadable,
            per_netns: self.per_netns,
            lookups: None,
        }
    }
}

/// With identity, the held socket decides every verdict (see [`crate::verdict::judge_held`]);
/// sock_diag is asked only what explains one: for each entry judged stale, the key's tuple
/// where a connection with it would live (the held socket's namespace, and every namespace
/// with the key's local address), to name the live connection the entry wrongs right now.
/// One exact request per tuple instead of a walk of the node's whole TCP table per namespace.
pub fn gather_owners(
    proc_root: &Path,
    entries: &[Judged],
    gateways: &[IpAddr],
) -> Result<Sockets, ObserveError> {
    let proxy_rules = !gateways.is_empty();
    let tuple_of = |id: usize| {
        let k = entries.get(id)?.key().ok()?;
        Some(Tuple::new(k.local, k.remote))
    };
    let mut lookups = Lookups::new(tuple_of);
    for (i, e) in entries.iter().enumerate() {
        let (Ok(key), Some(held)) = (e.key(), e.held) else {
            continue;
        };
        let proxy = is_proxy_key(&key, gateways);
        // A proxy entry's tuple names no connection (its A side is the gateway).
        if !proxy && judge_held(&key, &held_view(&held), proxy).is_stale() {
            lookups.in_netns(held.netns_inode, i);
            lookups.at_local_address(key.local.ip(), i);
        }
    }
    let mut gathered = Gathered::new(proxy_rules);
    let looked = lookup::lookup_node(proc_root, &lookups, &mut |ns, sockets| {
        gathered.add(ns.id, sockets);
    })?;
    drop(lookups);
    let mut sockets = gathered.finish(looked.inventory);
    sockets.per_netns.clear();
    sockets.lookups = Some(LookupCounts {
        asked: looked.asked,
        unreached_namespaces: looked.unreached,
    });
    Ok(sockets)
}

/// What became of a namespace path discovery could not examine.
enum Denied {
    /// Its TCP table, read from `/proc/PID/net` instead.
    Read(Vec<procnet::ProcSocket>),
    /// The process exited meanwhile: its namespace is gone, or reached through another path.
    Gone,
    Unreadable,
}

/// A process whose namespace file is denied to us (ptrace rules, an LSM) still shows its
/// namespace's TCP table in `/proc/PID/net`: read it there instead of leaving a hole.
fn read_denied_netns(e: &netns::NetnsError) -> Denied {
    let netns::NetnsError::Stat { path, source } = e else {
        return Denied::Unreadable;
    };
    let dir = path.parent().and_then(Path::parent);
    let (true, Some(dir)) = (
        source.kind() == std::io::ErrorKind::PermissionDenied && path.ends_with("ns/net"),
        dir,
    ) else {
        return Denied::Unreadable;
    };
    match procnet::read(dir) {
        Ok(rows) => {
            tracing::debug!(path = %path.display(), sockets = rows.len(), "namespace file denied; read its TCP table from procfs");
            Denied::Read(rows)
        }
        Err(err)
            if err.kind() == std::io::ErrorKind::NotFound
                || err.raw_os_error() == Some(libc::ESRCH) =>
        {
            Denied::Gone
        }
        Err(err) => {
            tracing::debug!(path = %path.display(), %err, "procfs fallback failed");
            Denied::Unreadable
        }
    }
}

/// Observes the node once.
///
/// The map is snapshotted *before* the sockets: a connection whose entry is in the snapshot
/// was established before it, so if it is still open the later inventory sees its socket.
/// The other order would judge stale every connection established between the two reads.
pub fn observe(
    map: &SockMap,
    proc_root: &Path,
    gateways: &[IpAddr],
    identity: &mut IdentitySource,
) -> Result<Observation, ObserveError> {
    let started = Instant::now();
    // One iterator pass gives the keys and their sockets; without it, walk the keys. The
    // entries are judged in place once the sockets are in: a full map's entries are the
    // largest thing an observation holds, so they exist once.
    let pending = |raw, held| Judged {
        raw,
        held,
        verdict: Verdict::Unknown(UnknownReason::NotJudged),
    };
    let (map_id, mut entries): (u32, Vec<Judged>) = match identity.read(map)? {
        Some(ids) => (
            ids.map_id,
            ids.entries
                .into_iter()
                .map(|(k, h)| pending(k, Some(h)))
                .collect(),
        ),
        None => {
            let snapshot = map.snapshot()?;
            (
                snapshot.map_id,
                snapshot
                    .keys
                    .into_iter()
                    .map(|k| pending(k, None))
                    .collect(),
            )
        }
    };
    let with_identity = identity.is_active();
    tracing::debug!(
        entries = entries.len(),
        ms = started.elapsed().as_millis(),
        "map read"
    );
    let sockets = if with_identity {
        gather_owners(proc_root, &entries, gateways)?
    } else {
        gather_sockets(proc_root, !gateways.is_empty())?
    };
    tracing::debug!(
        sockets = sockets.index.len(),
        ms = started.elapsed().as_millis(),
        "sockets read"
    );
    let evidence = sockets.evidence(gateways);
    for e in &mut entries {
        e.verdict = classify(&e.key(), e.held_view().as_ref(), &evidence);
    }
    Ok(Observation {
        map_id,
        identity: with_identity,
        entries,
        namespaces_read: sockets.namespaces_read,
        namespaces_vanished: sockets.namespaces_vanished,
        procfs_tables: sockets.procfs_tables,
        sockets: sockets.index.len(),
        lookups: sockets.lookups,
        unreadable: sockets.unreadable,
        per_netns: sockets.per_netns,
        took: started.elapsed(),
    })
}

/// The addresses of Cilium's `cilium_host` interface in this namespace: the A side of
/// its L7-proxy entries. Empty when there is no such interface.
pub fn cilium_host_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter(|a| a.interface_name == "cilium_host")
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(local: &str, remote: &str) -> Result<SockKey, KeyError> {
        Ok(
            SockKey::for_socket(local.parse().expect("addr"), remote.parse().expect("addr"))
                .expect("family"),
        )
    }

    #[test]
    fn filter_matches_held_socket_ends() {
        let k = key("10.0.1.2:8080", "10.0.1.1:40000");
        let ip = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));
        assert!(Filter::default().matches(&k));
        assert!(Filter {
            local: ip("10.0.1.2"),
            remote: None
        }
        .matches(&k));
        assert!(Filter {
            local: None,
            remote: ip("10.0.1.1")
        }
        .matches(&k));
        assert!(Filter {
            local: ip("10.0.1.2"),
            remote: ip("10.0.1.1")
        }
        .matches(&k));
        assert!(!Filter {
            local: ip("10.0.1.1"),
            remote: None
        }
        .matches(&k));
        assert!(!Filter {
            local: ip("10.0.1.2"),
            remote: ip("10.0.1.2")
        }
        .matches(&k));
    }

    #[test]
    fn filter_skips_undecodable_keys_unless_empty() {
        let bad = Err(KeyError::Family(7));
        assert!(Filter::default().matches(&bad));
        assert!(!Filter {
            local: Some("10.0.0.1".parse().expect("ip")),
            remote: None
        }
        .matches(&bad));
    }
}
