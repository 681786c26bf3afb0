//! The observation stage: snapshot the map, inventory every namespace (or, with identity,
//! look up the sockets that matter), judge each entry into an [`Observation`].

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{mpsc, Once};
use std::time::Instant;

use crate::diag;
use crate::helper_thread;
use crate::holder::{self, EarlyScan, HolderSource};
use crate::identity::{entries_capacity, file_at, HeldSocket, IdentityError, IdentitySource};
use crate::ifaddr;
use crate::key::RawKey;
use crate::lookup::{self, Ask, Lookups};
use crate::map::{MapError, SockMap};
use crate::netns::{self, NetnsId};
use crate::observation::{judge_by_held, Judged, LookupCounts, Observation, Unreadable};
use crate::procnet;
use crate::socket::{LiveSocket, Tuple};
use crate::verdict::{classify, Evidence, SeenSocket, SocketIndex, UnknownReason, Verdict};

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

    fn add(&mut self, netns: NetnsId, sockets: Vec<LiveSocket>) {
        *self.per_netns.entry(netns).or_default() += sockets.len();
        for s in &sockets {
            self.index.insert(s.seen());
        }
    }

    /// Adds the TCP tables of denied namespaces, read through procfs, and the inventory's
    /// accounting.
    fn finish<E: std::fmt::Display>(mut self, inventory: diag::Inventory<E>) -> Sockets {
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
        let mut tables_read = HashSet::new();
        for e in &inventory.unreadable {
            match read_denied_netns(e, &mut tables_read) {
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
                Denied::AlreadyRead => {}
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
/// `stale` holds the indices of the entries judged stale ([`judge_record`]).
fn gather_owners(
    proc_root: &Path,
    entries: &[Judged],
    stale: &[usize],
    gateways: &[IpAddr],
) -> Result<Sockets, ObserveError> {
    let proxy_rules = !gateways.is_empty();
    let tuple_of = |id: usize| {
        let k = entries.get(id)?.key().ok()?;
        Some(Tuple::new(k.local, k.remote))
    };
    let mut lookups = Lookups::new(tuple_of);
    for (i, e) in stale.iter().filter_map(|&i| Some((i, entries.get(i)?))) {
        // Filed as the streamed lookups are asked (none for a proxy entry).
        if let Some(ask) = e
            .held
            .as_ref()
            .and_then(|h| judge_record(&e.raw, h, gateways).1)
        {
            lookups.ask(&ask, i);
        }
    }
    let mut gathered = Gathered::new(proxy_rules);
    let looked = lookup::lookup_node(proc_root, &lookups, &mut |ns, sockets| {
        gathered.add(ns.id, sockets);
    })?;
    drop(lookups);
    Ok(owners_found(gathered, looked))
}

/// The sockets the lookups found, with their counts.
fn owners_found(gathered: Gathered, looked: lookup::Looked) -> Sockets {
    let mut sockets = gathered.finish(looked.inventory);
    sockets.per_netns.clear();
    sockets.lookups = Some(LookupCounts {
        asked: looked.asked,
        unreached_namespaces: looked.unreached,
    });
    sockets
}

/// What became of a namespace path discovery could not examine.
enum Denied {
    /// Its TCP table, read from `/proc/PID/net` instead.
    Read(Vec<procnet::ProcSocket>),
    /// The process exited meanwhile: its namespace is gone, or reached through another path.
    Gone,
    /// Its namespace's table was already read through another process.
    AlreadyRead,
    Unreadable,
}

/// A process whose namespace file is denied to us (ptrace rules, an LSM) still shows its
/// namespace's TCP table in `/proc/PID/net`: read it there instead of leaving a hole, once
/// per namespace (`read` holds the `net/dev` fingerprints of the tables already read: in a pod
/// with only CAP_SYS_ADMIN, every host process is denied, and each would read the same table).
fn read_denied_netns(e: &netns::NetnsError, read: &mut HashSet<(u64, u64)>) -> Denied {
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
    let before = netns::proc_net_fingerprint(dir);
    if before.is_some_and(|fp| read.contains(&fp)) {
        return Denied::AlreadyRead;
    }
    match procnet::read(dir) {
        Ok(rows) => {
            // Recorded only if the process did not change namespace (or its PID was not
            // reused) during the read: a namespace wrongly marked read would go unseen.
            if let Some(fp) = before.filter(|fp| netns::proc_net_fingerprint(dir) == Some(*fp)) {
                read.insert(fp);
            }
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
    observe_then_diagnose(map, proc_root, gateways, identity, None)
}

/// [`observe`], then who keeps each stale entry ([`holder::diagnose`]), for a one-shot audit:
/// its stages overlap on threads of their own. With identity the namespaces are found while
/// the map is read, and the iterator's read already tells which entries are stale, so the
/// holder search runs alongside the lookups, which only explain those verdicts.
pub fn observe_diagnosed(
    map: &SockMap,
    proc_root: &Path,
    gateways: &[IpAddr],
    identity: &mut IdentitySource,
    holders: &mut HolderSource,
) -> Result<Observation, ObserveError> {
    observe_then_diagnose(map, proc_root, gateways, identity, Some(holders))
}

fn observe_then_diagnose(
    map: &SockMap,
    proc_root: &Path,
    gateways: &[IpAddr],
    identity: &mut IdentitySource,
    mut holders: Option<&mut HolderSource>,
) -> Result<Observation, ObserveError> {
    let started = Instant::now();
    // One iterator pass gives the keys and their sockets, each judged by its socket as it is
    // read; without it, walk the keys. The entries are judged again in place once the sockets
    // are in: a full map's entries are the largest thing an observation holds, so they exist
    // once.
    // With identity, the iterator's read alone tells which entries are stale, and the lookups
    // only name the connection each wrongs. A one-shot audit (`holders` given) makes them
    // while the map is read, on a thread of its own fed each stale record; a sweep makes them
    // after the read, and only when an entry is stale, which most of the daemon's are not.
    let streamed = holders.is_some() && identity.is_active();
    // Each entry filed as its record is read, already judged by its held socket alone.
    let mut entries: Vec<Judged> = Vec::with_capacity(entries_capacity(map));
    let (read, streamed_owners) = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Vec<Ask>>();
        // No thread to be had (a pids limit, say): the lookups follow the read, as a sweep's.
        let owners = streamed
            .then(|| {
                helper_thread::spawn(scope, "smgc-lookups", move || {
                    owners_while_read(proc_root, &rx, !gateways.is_empty())
                })
            })
            .flatten();
        let streaming = owners.is_some();
        // Sent a few at a time: a wake-up of the lookup thread per stale record would cost
        // the read more than the lookups save.
        let mut asks = Vec::new();
        let read = identity.read_into(map, &mut |at, raw, held| {
            let (verdict, ask) = judge_record(&raw, &held, gateways);
            if let Some(ask) = ask.filter(|_| streaming) {
                asks.push(ask);
                if asks.len() == ASKS_PER_SEND {
                    // A closed channel: the lookup thread failed; its error is reported below.
                    let _ = tx.send(std::mem::take(&mut asks));
                }
            }
            let held = Some(held);
            file_at(&mut entries, at, Judged { raw, held, verdict });
        });
        if !asks.is_empty() {
            let _ = tx.send(asks);
        }
        drop(tx);
        (read, owners.map(|o| o.join()))
    });
    let map_id = match read? {
        Some(_) => map.id(),
        None => {
            let snapshot = map.snapshot()?;
            entries = snapshot
                .keys
                .into_iter()
                .map(|raw| Judged {
                    raw,
                    held: None,
                    verdict: Verdict::Unknown(UnknownReason::NotJudged),
                })
                .collect();
            snapshot.map_id
        }
    };
    let with_identity = identity.is_active();
    tracing::debug!(
        entries = entries.len(),
        ms = started.elapsed().as_millis(),
        "map read"
    );
    let stale: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.verdict.is_stale())
        .map(|(i, _)| i)
        .collect();
    let sockets = match streamed_owners {
        Some(Ok(owners)) if with_identity => owners?,
        // A sweep, or a lookup thread that panicked: looked up after the read.
        _ if with_identity => gather_owners(proc_root, &entries, &stale, gateways)?,
        _ => gather_sockets(proc_root, !gateways.is_empty())?,
    };
    tracing::debug!(
        sockets = sockets.index.len(),
        ms = started.elapsed().as_millis(),
        "sockets read"
    );
    let wanted = holder::wanted(
        stale
            .iter()
            .filter_map(|&i| entries.get(i)?.held.as_ref())
            .map(holder::facts),
    );
    let (observation, early) = std::thread::scope(|scope| {
        let early = match holders.as_deref_mut() {
            // No thread to be had: the scan follows the verdicts, as one that panicked.
            Some(source) if !wanted.is_empty() => {
                helper_thread::spawn(scope, "smgc-holder-scan", move || {
                    let scan = source.scan(&wanted);
                    EarlyScan { wanted, scan }
                })
            }
            _ => None,
        };
        let observation = judge(map_id, entries, with_identity, sockets, gateways, started);
        // A scan that panicked is made again, after the verdicts.
        (observation, early.and_then(|scan| scan.join().ok()))
    });
    let mut observation = observation;
    if let Some(source) = holders {
        holder::diagnose_with(&mut observation, source, early);
    }
    Ok(observation)
}

/// Stale records' lookups handed to the lookup thread at once while the map is read.
const ASKS_PER_SEND: usize = 64;

/// A record's verdict by its held socket alone ([`judge_by_held`]): with identity, every verdict
/// [`classify`] gives but the stale ones' (whose evidence may name the connection they
/// wrong), known before any lookup; not judged when the key does not decode. With it, the
/// lookup a stale record asks for, streamed or filed by [`gather_owners`] (none for a proxy entry:
/// its A side is the gateway, so its tuple names no connection).
fn judge_record(raw: &RawKey, held: &HeldSocket, gateways: &[IpAddr]) -> (Verdict, Option<Ask>) {
    let Some((key, proxy, verdict)) = judge_by_held(raw, &held.view(), gateways) else {
        return (Verdict::Unknown(UnknownReason::NotJudged), None);
    };
    let ask = (verdict.is_stale() && !proxy).then(|| Ask {
        tuple: Tuple::new(key.local, key.remote),
        held_netns: held.netns_inode,
    });
    (verdict, ask)
}

/// [`gather_owners`] fed while the map is read ([`lookup::lookup_streamed`]).
fn owners_while_read(
    proc_root: &Path,
    asks: &mpsc::Receiver<Vec<Ask>>,
    proxy_rules: bool,
) -> Result<Sockets, ObserveError> {
    let mut gathered = Gathered::new(proxy_rules);
    let looked = lookup::lookup_streamed(proc_root, asks, &mut |ns, sockets| {
        gathered.add(ns.id, sockets);
    })?;
    Ok(owners_found(gathered, looked))
}

/// Judges each entry against `sockets`: with identity, only those the held socket did not
/// already judge live ([`judge_record`]). `started`: when the observation began, for its
/// `took`.
fn judge(
    map_id: u32,
    mut entries: Vec<Judged>,
    with_identity: bool,
    sockets: Sockets,
    gateways: &[IpAddr],
    started: Instant,
) -> Observation {
    let evidence = sockets.evidence(gateways);
    for e in entries
        .iter_mut()
        .filter(|e| !with_identity || !matches!(e.verdict, Verdict::Live(_)))
    {
        e.verdict = classify(&e.key(), e.held_view().as_ref(), &evidence);
    }
    Observation {
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
        holders: None,
    }
}

/// The addresses of Cilium's `cilium_host` interface in this namespace: the A side of
/// its L7-proxy entries. Empty when there is no such interface.
fn cilium_host_addresses() -> Vec<IpAddr> {
    ifaddr::of_interface("cilium_host").unwrap_or_default()
}

/// The gateways to judge with: `given` (`--gateway`, the config's `gateways`) when set, else
/// the addresses of `cilium_host`, read now. Warns once per process when neither names one.
pub fn gateways(given: &[IpAddr]) -> Vec<IpAddr> {
    if !given.is_empty() {
        return given.to_vec();
    }
    let found = cilium_host_addresses();
    if found.is_empty() {
        static WARN: Once = Once::new();
        WARN.call_once(|| {
            tracing::warn!(
                "no cilium_host interface here: L7-proxy entries cannot be recognised; give --gateway IP (the daemon: gateways in the config) if Cilium's proxy is in use"
            );
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Two processes in one denied namespace (their `net/dev` is one inode) and one in
    /// another: two tables read, not three.
    #[test]
    fn a_denied_namespace_is_read_once_whatever_its_processes() {
        let root = std::env::temp_dir().join(format!("smgc-observe-denied-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let table = "  sl  local_address rem_address   st\n   0: 0100007F:1F90 0100007F:9C40 01\n";
        let proc_dir = |pid: u32| root.join(pid.to_string());
        for pid in [1, 2, 3] {
            fs::create_dir_all(proc_dir(pid).join("net")).expect("fake /proc");
            fs::write(proc_dir(pid).join("net/tcp"), table).expect("fake tcp table");
        }
        fs::write(proc_dir(1).join("net/dev"), "").expect("net/dev");
        fs::hard_link(proc_dir(1).join("net/dev"), proc_dir(2).join("net/dev")).expect("link");
        fs::write(proc_dir(3).join("net/dev"), "").expect("net/dev");
        let denied = |pid: u32| netns::NetnsError::Stat {
            path: proc_dir(pid).join("ns/net"),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let mut read = HashSet::new();
        let outcomes: Vec<&str> = [1, 2, 3]
            .iter()
            .map(|&pid| match read_denied_netns(&denied(pid), &mut read) {
                Denied::Read(rows) if rows.len() == 1 => "read",
                Denied::Read(_) => "read, wrong rows",
                Denied::AlreadyRead => "already read",
                Denied::Gone => "gone",
                Denied::Unreadable => "unreadable",
            })
            .collect();
        let _ = fs::remove_dir_all(&root);
        assert_eq!(outcomes, ["read", "already read", "read"]);
    }
}
