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
use crate::verdict::{classify, Evidence, HeldView, SeenSocket, SocketIndex, Verdict};

/// One map entry with its decoding and verdict.
#[derive(Debug, Clone)]
pub struct Judged {
    pub raw: RawKey,
    pub key: Result<SockKey, KeyError>,
    /// The socket the entry holds, when identity is in use.
    pub held: Option<HeldSocket>,
    pub verdict: Verdict,
}

impl Judged {
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
pub fn gather_sockets(proc_root: &Path) -> Result<Sockets, ObserveError> {
    Ok(index(diag::inventory_node(proc_root)?))
}

/// Looks up, instead of dumping every namespace, only the sockets that can decide or explain
/// a verdict on the held sockets: each live-looking held socket's own tuple in its own
/// namespace (to confirm it by cookie), and for a held socket that is closed or has other
/// ends, the key's tuple where a connection with it would live (to name the connection the
/// entry wrongs). Costs one hash lookup per tuple instead of a walk of the node's whole TCP
/// table per namespace.
pub fn gather_owners(
    proc_root: &Path,
    entries: &[(RawKey, Result<SockKey, KeyError>, Option<HeldSocket>)],
) -> Result<Sockets, ObserveError> {
    let mut lookups = Lookups::default();
    for (_, key, held) in entries {
        let (Ok(key), Some(held)) = (key, held) else {
            continue;
        };
        let own = Tuple::new(held.local, held.remote);
        let keyed = Tuple::new(key.local, key.remote);
        let closed = held.state == diag::TcpState::Close;
        if !closed {
            lookups.in_netns(held.netns_inode, own);
        }
        if closed || own != keyed {
            lookups.in_netns(held.netns_inode, keyed);
            lookups.at_local_address(keyed);
        }
    }
    let looked = lookup::lookup_node(proc_root, &lookups)?;
    let mut sockets = index(looked.inventory);
    sockets.per_netns.clear();
    sockets.lookups = Some(LookupCounts {
        asked: looked.asked,
        unreached_namespaces: looked.unreached,
    });
    Ok(sockets)
}

/// Indexes an inventory for the classifier, reading the TCP tables of denied namespaces
/// through procfs.
fn index(inventory: diag::Inventory) -> Sockets {
    let mut unreadable: Vec<Unreadable> = inventory
        .failed
        .iter()
        .map(|(ns, e)| Unreadable {
            what: ns.label.clone(),
            error: e.to_string(),
        })
        .collect();
    let mut via_procfs = Vec::new();
    let mut procfs_tables = 0;
    let mut gone = 0;
    for e in &inventory.unreadable {
        match read_denied_netns(e) {
            Denied::Read(rows) => {
                procfs_tables += 1;
                via_procfs.extend(rows);
            }
            Denied::Gone => gone += 1,
            Denied::Unreadable => unreadable.push(Unreadable {
                what: e.path().display().to_string(),
                error: e.to_string(),
            }),
        }
    }
    let mut per_netns: HashMap<NetnsId, usize> = HashMap::new();
    for s in &inventory.sockets {
        *per_netns.entry(s.netns).or_default() += 1;
    }
    let seen = inventory
        .sockets
        .iter()
        .map(diag::LiveSocket::seen)
        .chain(via_procfs.iter().map(|p| SeenSocket {
            local: p.local,
            remote: p.remote,
            kind: p.state.kind(),
            cookie: None,
        }));
    Sockets {
        index: SocketIndex::build(seen),
        namespaces_read: inventory.read,
        namespaces_vanished: inventory.vanished.len() + gone,
        procfs_tables,
        unreadable,
        per_netns,
        lookups: None,
    }
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
    // One iterator pass gives the keys and their sockets; without it, walk the keys.
    let (map_id, keyed): (u32, Vec<(RawKey, Option<HeldSocket>)>) = match identity.read(map)? {
        Some(ids) => (
            ids.map_id,
            ids.entries.into_iter().map(|(k, h)| (k, Some(h))).collect(),
        ),
        None => {
            let snapshot = map.snapshot()?;
            (
                snapshot.map_id,
                snapshot.keys.into_iter().map(|k| (k, None)).collect(),
            )
        }
    };
    let with_identity = identity.is_active();
    let keyed: Vec<_> = keyed
        .into_iter()
        .map(|(raw, held)| (raw, SockKey::decode(&raw), held))
        .collect();
    let sockets = if with_identity {
        gather_owners(proc_root, &keyed)?
    } else {
        gather_sockets(proc_root)?
    };
    let evidence = sockets.evidence(gateways);
    let entries = keyed
        .into_iter()
        .map(|(raw, key, held)| {
            let view = held.as_ref().map(held_view);
            let verdict = classify(&key, view.as_ref(), &evidence);
            Judged {
                raw,
                key,
                held,
                verdict,
            }
        })
        .collect();
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
