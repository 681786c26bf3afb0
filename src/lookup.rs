//! Looks up given connection tuples through sock_diag: one exact request per tuple (no dump),
//! sent in batches, in the namespaces where the tuple's socket can be.
//!
//! A dump walks the kernel's TCP hash table, and every namespace shares that table: on a node
//! with a hundred pods an inventory walks all of the node's sockets a hundred times. An exact
//! request is one hash lookup. With the sockmap iterator, an observation knows which tuples
//! matter (the keys of the entries judged stale, to name the connection each wrongs) and in
//! which namespace the held socket lives, so it asks for those alone.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::mpsc;

use netlink_packet_core::NLMSG_ERROR;
use netlink_packet_sock_diag::SOCK_DIAG_BY_FAMILY;
use netlink_sys::Socket;

use crate::diag::{Inventory, Sink};
use crate::ifaddr;
use crate::netlink::{self, NetlinkError, EXACT_REQUEST_LEN};
use crate::netns::{self, discover, Netns, NetnsError, NetnsId, WalkError};
use crate::socket::{unmap, LiveSocket, Tuple};

/// Room for one reply datagram: an `inet_diag_msg` with the few attributes the kernel adds
/// unasked is under 200 bytes.
const SLOT: usize = 1024;
/// What one queued reply may cost the socket's receive buffer (the kernel's skb truesize, an
/// over-estimate): a batch never asks for more replies than the buffer holds, since the
/// kernel drops a reply that does not fit.
const REPLY_TRUESIZE: usize = 4096;
/// The receive buffer asked for; the kernel caps it at `net.core.rmem_max`.
const RECV_BUFFER: libc::c_int = 1 << 20;
const MIN_BATCH: usize = 8;
const MAX_BATCH: usize = 256;

/// Why the lookups in a namespace could not be (fully) answered.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("the kernel refused the sock_diag lookup of local {local} remote {remote}: {}", std::io::Error::from_raw_os_error(*errno))]
    Refused {
        local: SocketAddr,
        remote: SocketAddr,
        errno: i32,
    },
}

/// Which tuples to look up, and where. Tuples are filed by id and produced by the caller's
/// `tuple_of` only when a namespace's worker asks for them: a full map files ~80,000, which
/// as a list of their own would cost more than the rest of the lookup.
pub struct Lookups<'a> {
    tuple_of: Box<TupleOf<'a>>,
    /// In the namespace with this inode (a held socket's own namespace).
    in_netns: HashMap<u64, Vec<usize>>,
    /// In every namespace with this local address on one of its interfaces: where a
    /// connection with those ends lives, whichever namespace holds the entry's socket.
    at_local_address: HashMap<IpAddr, Vec<usize>>,
}

type TupleOf<'a> = dyn Fn(usize) -> Option<Tuple> + Sync + 'a;

impl<'a> Lookups<'a> {
    /// `tuple_of` gives the tuple behind each id filed (`None` drops it).
    pub fn new(tuple_of: impl Fn(usize) -> Option<Tuple> + Sync + 'a) -> Lookups<'a> {
        Lookups {
            tuple_of: Box::new(tuple_of),
            in_netns: HashMap::new(),
            at_local_address: HashMap::new(),
        }
    }

    pub fn in_netns(&mut self, inode: u64, id: usize) {
        self.in_netns.entry(inode).or_default().push(id);
    }

    /// Files `id`, whose tuple's local address is `local`, for every namespace that has it.
    /// A loopback address is on every namespace's `lo` and names none of them: such a tuple is
    /// looked up only where the caller files it by namespace.
    pub fn at_local_address(&mut self, local: IpAddr, id: usize) {
        let local = unmap(SocketAddr::new(local, 0)).ip();
        if local.is_loopback() {
            return;
        }
        self.at_local_address.entry(local).or_default().push(id);
    }

    /// Files `id`, whose lookup is `ask`: in the held socket's namespace and at its tuple's
    /// local address.
    pub fn ask(&mut self, ask: &Ask, id: usize) {
        self.in_netns(ask.held_netns, id);
        self.at_local_address(ask.tuple.local.ip(), id);
    }

    pub fn is_empty(&self) -> bool {
        self.in_netns.is_empty() && self.at_local_address.is_empty()
    }

    /// The tuples to ask `netns` about, given the addresses on its interfaces.
    fn for_netns(&self, netns: NetnsId, addresses: &HashSet<IpAddr>) -> Vec<Tuple> {
        let mut tuples: Vec<Tuple> = self
            .in_netns
            .get(&netns.inode)
            .into_iter()
            .flatten()
            .chain(
                addresses
                    .iter()
                    .filter_map(|ip| self.at_local_address.get(ip))
                    .flatten(),
            )
            .filter_map(|id| (self.tuple_of)(*id))
            .collect();
        tuples.sort_unstable();
        tuples.dedup();
        tuples
    }
}

/// What the lookups did; the sockets found (each has the tuple it was looked up by as its
/// own ends) went to the sink.
#[derive(Debug, Default)]
pub struct Looked {
    /// The namespaces entered, vanished or failed.
    pub inventory: Inventory<LookupError>,
    /// Requests sent.
    pub asked: usize,
    /// Held sockets' namespaces that no path on the node reaches (say, a namespace only a
    /// passed fd keeps): their tuples were not looked up.
    pub unreached: usize,
}

/// Discovers the namespaces under `root` (`/` in production) and looks up `lookups` in them.
/// Only namespaces with work are entered: all of them when some tuple is looked up by
/// address, since each namespace's addresses are read from inside it.
/// Each namespace's sockets found go to `sink` as they come in.
pub fn lookup_node(
    root: &Path,
    lookups: &Lookups<'_>,
    sink: &mut Sink<'_>,
) -> Result<Looked, NetnsError> {
    if lookups.is_empty() {
        return Ok(Looked::default());
    }
    let discovery = discover(root)?;
    let by_address = !lookups.at_local_address.is_empty();
    let namespaces: Vec<_> = discovery
        .namespaces
        .into_iter()
        .filter(|ns| by_address || lookups.in_netns.contains_key(&ns.id.inode))
        .collect();
    let reached: HashSet<u64> = namespaces.iter().map(|ns| ns.id.inode).collect();
    let unreached = lookups
        .in_netns
        .keys()
        .filter(|inode| !reached.contains(inode))
        .inspect(|inode| tracing::debug!(netns = %inode, "a held socket's namespace is not reachable from this node's paths; its tuples are not looked up"))
        .count();
    let asked = std::sync::atomic::AtomicUsize::new(0);
    let walked = netns::walk(
        &namespaces,
        |ns, _buf| {
            let addresses = if by_address {
                ifaddr::ips()?
            } else {
                HashSet::new()
            };
            let tuples = lookups.for_netns(ns.id, &addresses);
            asked.fetch_add(tuples.len(), std::sync::atomic::Ordering::Relaxed);
            look_up_here(ns.id, &tuples)
        },
        sink,
    );
    Ok(Looked {
        inventory: Inventory::walked(walked, discovery.unreadable),
        asked: asked.into_inner(),
        unreached,
    })
}

/// Looks up `tuples` in the calling thread's namespace; returns the sockets found.
fn look_up_here(netns: NetnsId, tuples: &[Tuple]) -> Result<Vec<LiveSocket>, LookupError> {
    if tuples.is_empty() {
        return Ok(Vec::new());
    }
    let mut asker = Asker::here()?;
    let mut found = Vec::with_capacity(tuples.len());
    let mut slots = Vec::new();
    for chunk in tuples.chunks(asker.batch) {
        asker.ask(netns, chunk, &mut found, &mut slots)?;
    }
    Ok(found)
}

/// A sock_diag socket and what its batches of exact requests need. The socket answers for the
/// namespace it was made in, whichever thread uses it later.
struct Asker {
    socket: Socket,
    /// As many requests per datagram as the receive buffer holds replies.
    batch: usize,
    seq: u32,
    request: Vec<u8>,
}

impl Asker {
    /// A socket in the calling thread's namespace.
    fn here() -> Result<Asker, LookupError> {
        let socket = netlink::open()?;
        // A miss is answered with an error message that echoes its request unless capped:
        // the bench's full map asks ~7,000 misses. Best effort: uncapped acks parse the same.
        let _ = socket.set_cap_ack(true);
        let batch = (netlink::grow_recv_buffer(&socket, RECV_BUFFER) / REPLY_TRUESIZE)
            .clamp(MIN_BATCH, MAX_BATCH);
        Ok(Asker {
            socket,
            batch,
            seq: 0,
            request: Vec::with_capacity(batch * EXACT_REQUEST_LEN),
        })
    }

    /// Asks for `chunk` (at most `batch` tuples) in one datagram; pushes the owners found.
    /// `slots`: room for the replies, shared by the askers of one thread.
    fn ask(
        &mut self,
        netns: NetnsId,
        chunk: &[Tuple],
        found: &mut Vec<LiveSocket>,
        slots: &mut Vec<u8>,
    ) -> Result<(), LookupError> {
        let base = self.seq.wrapping_add(1);
        self.request.clear();
        for t in chunk {
            self.seq = self.seq.wrapping_add(1);
            self.request
                .extend_from_slice(&netlink::exact_request(*t, self.seq));
        }
        // The kernel handles every request of the datagram in this call, in order.
        self.socket
            .send(&self.request, 0)
            .map_err(NetlinkError::Send)?;
        if slots.len() < self.batch * SLOT {
            slots.resize(self.batch * SLOT, 0);
        }
        let mut answers = Answers::new(base, chunk);
        // Each request gets one reply or one error; anything beyond is not for us.
        for _ in 0..chunk.len() * 2 + 8 {
            if answers.left == 0 {
                break;
            }
            for datagram in netlink::recv_many(&self.socket, slots, SLOT)? {
                answers.feed(datagram, netns, found)?;
            }
        }
        if answers.left > 0 {
            return Err(NetlinkError::Malformed {
                detail: format!("{} of {} lookups got no answer", answers.left, chunk.len()),
            }
            .into());
        }
        Ok(())
    }
}

/// A tuple to look up while the map is still being read ([`lookup_streamed`]): in the held
/// socket's namespace and in every namespace with the tuple's local address, as [`Lookups`]
/// files it.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub tuple: Tuple,
    pub held_netns: u64,
}

/// The most namespaces [`lookup_streamed`] keeps a socket open in at once (each an open file,
/// under a soft limit of 1,024): a node with more is looked up after the read.
pub const MAX_READY: usize = 256;

/// One namespace made ready on a walk thread, then asked from the streaming thread.
struct Ready {
    ns: Netns,
    asker: Asker,
    pending: Vec<Tuple>,
    /// foldhash: a full map's stale tuples are hashed here once or twice each.
    asked: foldhash::HashSet<Tuple>,
    found: Vec<LiveSocket>,
    failed: Option<LookupError>,
}

impl Ready {
    /// Sends up to one batch of what is pending; a failure ends the namespace's lookups.
    fn send(&mut self, slots: &mut Vec<u8>) {
        let take = self.pending.len().min(self.asker.batch);
        let chunk: Vec<Tuple> = self.pending.drain(..take).collect();
        if let Err(e) = self.asker.ask(self.ns.id, &chunk, &mut self.found, slots) {
            self.pending.clear();
            self.failed = Some(e);
        }
    }
}

/// [`lookup_node`] fed while the map is read, so the lookups overlap the read: discovers the
/// namespaces and makes a sock_diag socket in each (and reads its addresses) on walk threads,
/// then, on the calling thread, which never changes namespace, files each tuple from `asks`
/// as it arrives. A namespace's batch goes out when full, or when no tuple is waiting; the
/// rest once `asks` closes. Each namespace's sockets found go to `sink` at the end.
pub fn lookup_streamed(
    root: &Path,
    asks: &mpsc::Receiver<Vec<Ask>>,
    sink: &mut Sink<'_>,
) -> Result<Looked, NetnsError> {
    lookup_streamed_within(root, asks, sink, MAX_READY)
}

/// [`lookup_streamed`] keeping a socket open in at most `max_ready` namespaces.
pub fn lookup_streamed_within(
    root: &Path,
    asks: &mpsc::Receiver<Vec<Ask>>,
    sink: &mut Sink<'_>,
    max_ready: usize,
) -> Result<Looked, NetnsError> {
    let discovery = match discover(root) {
        Ok(discovery) => discovery,
        // As after a read: a node with nothing to look up needs no namespaces.
        Err(e) => {
            return match asks.iter().flatten().next() {
                Some(_) => Err(e),
                None => Ok(Looked::default()),
            }
        }
    };
    if discovery.namespaces.len() > max_ready {
        // A socket per namespace would be too many open files: the tuples are looked up
        // once they are all in, a namespace at a time.
        let asked: Vec<Ask> = asks.iter().flatten().collect();
        let mut lookups = Lookups::new(|id| asked.get(id).map(|a| a.tuple));
        for (id, ask) in asked.iter().enumerate() {
            lookups.ask(ask, id);
        }
        return lookup_node(root, &lookups, sink);
    }
    let mut ready: Vec<Ready> = Vec::with_capacity(discovery.namespaces.len());
    let mut at_address: HashMap<IpAddr, Vec<usize>> = HashMap::new();
    let walked = netns::walk(
        &discovery.namespaces,
        |_, _buf| Ok::<_, LookupError>((Asker::here()?, ifaddr::ips()?)),
        &mut |ns: &Netns, (asker, addresses): (Asker, HashSet<IpAddr>)| {
            for ip in addresses.into_iter().filter(|ip| !ip.is_loopback()) {
                at_address.entry(ip).or_default().push(ready.len());
            }
            ready.push(Ready {
                ns: ns.clone(),
                asker,
                pending: Vec::new(),
                asked: foldhash::HashSet::default(),
                found: Vec::new(),
                failed: None,
            });
        },
    );
    let by_inode: HashMap<u64, usize> = ready
        .iter()
        .enumerate()
        .map(|(i, r)| (r.ns.id.inode, i))
        .collect();
    // Room for one batch's replies, for every namespace's batches in turn.
    let mut slots = Vec::new();
    // Tuples whose held socket's namespace this discovery missed (one made since): looked up
    // in their namespace by a walk of their own at the end.
    let mut elsewhere: Vec<Ask> = Vec::new();
    // Which namespaces the lookups needed, as [`lookup_node`] enters them: every one once a
    // tuple is looked up by address, else the held sockets' own. Only those count as read,
    // or as failed, in the inventory.
    let mut by_address = false;
    let mut held_namespaces: HashSet<u64> = HashSet::new();
    let mut file = |ask: Ask, ready: &mut [Ready], slots: &mut Vec<u8>| {
        let local = unmap(SocketAddr::new(ask.tuple.local.ip(), 0)).ip();
        by_address |= !local.is_loopback();
        held_namespaces.insert(ask.held_netns);
        let held = by_inode.get(&ask.held_netns);
        if held.is_none() {
            elsewhere.push(ask);
        }
        for &i in held
            .into_iter()
            .chain(at_address.get(&local).into_iter().flatten())
        {
            let Some(r) = ready.get_mut(i).filter(|r| r.failed.is_none()) else {
                continue;
            };
            if r.asked.insert(ask.tuple) {
                r.pending.push(ask.tuple);
                if r.pending.len() >= r.asker.batch {
                    r.send(slots);
                }
            }
        }
    };
    loop {
        let arrived = match asks.try_recv() {
            Ok(arrived) => arrived,
            Err(mpsc::TryRecvError::Empty) => {
                // Nothing waiting: the fullest batch goes out now rather than at the end,
                // unless it is too small to be worth a datagram of its own yet.
                if let Some(r) = ready
                    .iter_mut()
                    .max_by_key(|r| r.pending.len())
                    .filter(|r| r.pending.len() >= MIN_BATCH)
                {
                    r.send(&mut slots);
                    continue;
                }
                match asks.recv() {
                    Ok(arrived) => arrived,
                    Err(mpsc::RecvError) => break,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        for ask in arrived {
            file(ask, &mut ready, &mut slots);
        }
    }
    let needed = |ns: &Netns| by_address || held_namespaces.contains(&ns.id.inode);
    let mut looked = Looked::default();
    if !by_address && held_namespaces.is_empty() {
        // Nothing was asked: as after a read with nothing stale, no namespace counts.
        return Ok(looked);
    }
    let mut failed: Vec<_> = walked
        .failed
        .into_iter()
        .filter(|(ns, _)| needed(ns))
        .collect();
    let mut read = 0;
    for mut r in ready.into_iter().filter(|r| needed(&r.ns)) {
        while !r.pending.is_empty() {
            r.send(&mut slots);
        }
        looked.asked += r.asked.len();
        match r.failed {
            Some(e) => failed.push((r.ns, e)),
            None => {
                read += 1;
                sink(&r.ns, r.found);
            }
        }
    }
    looked.inventory = Inventory {
        sockets: Vec::new(),
        read,
        vanished: walked
            .vanished
            .into_iter()
            .filter(|ns| needed(ns))
            .collect(),
        failed,
        unreadable: discovery.unreadable,
    };
    if !elsewhere.is_empty() {
        let mut lookups = Lookups::new(|id| elsewhere.get(id).map(|a| a.tuple));
        for (id, ask) in elsewhere.iter().enumerate() {
            lookups.in_netns(ask.held_netns, id);
        }
        let more = lookup_node(root, &lookups, sink)?;
        looked.asked += more.asked;
        looked.unreached += more.unreached;
        looked.inventory.read += more.inventory.read;
        looked.inventory.vanished.extend(more.inventory.vanished);
        looked.inventory.failed.extend(more.inventory.failed);
    }
    Ok(looked)
}

/// The answers to one batch of requests, sequence numbers `base..base + tuples.len()`.
struct Answers<'a> {
    base: u32,
    tuples: &'a [Tuple],
    answered: Vec<bool>,
    left: usize,
}

impl Answers<'_> {
    fn new(base: u32, tuples: &[Tuple]) -> Answers<'_> {
        Answers {
            base,
            tuples,
            answered: vec![false; tuples.len()],
            left: tuples.len(),
        }
    }

    /// Parses one datagram; pushes each socket that owns the tuple it was asked for.
    fn feed(
        &mut self,
        datagram: &[u8],
        netns: NetnsId,
        found: &mut Vec<LiveSocket>,
    ) -> Result<(), LookupError> {
        for msg in netlink::messages(datagram) {
            let msg = msg?;
            let index = msg.sequence_number().wrapping_sub(self.base) as usize;
            let (Some(tuple), Some(false)) = (
                self.tuples.get(index).copied(),
                self.answered.get(index).copied(),
            ) else {
                continue;
            };
            match msg.message_type() {
                SOCK_DIAG_BY_FAMILY => {
                    let socket = netlink::parse_socket(msg.payload(), netns)?;
                    // A miss may be answered with the listener on the local port: that
                    // socket does not own the tuple.
                    if Tuple::new(socket.local, socket.remote) == tuple {
                        found.push(socket);
                    }
                }
                NLMSG_ERROR => match netlink::error_code(msg.payload())? {
                    // An acknowledgement, which these requests do not ask for.
                    0 => continue,
                    code if code == -libc::ENOENT => {}
                    code => {
                        return Err(LookupError::Refused {
                            local: tuple.local,
                            remote: tuple.remote,
                            errno: code.saturating_neg(),
                        })
                    }
                },
                _ => continue,
            }
            if let Some(a) = self.answered.get_mut(index) {
                *a = true;
            }
            self.left -= 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_sock_diag::AF_INET;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn a_namespace_is_asked_its_own_held_tuples_and_those_at_its_addresses() {
        let ns = NetnsId { dev: 4, inode: 9 };
        let tuples = [
            Tuple::new(sa("127.0.0.1:1"), sa("127.0.0.1:2")),
            Tuple::new(sa("10.0.1.2:8080"), sa("10.0.0.1:40000")),
            Tuple::new(sa("10.0.9.9:8080"), sa("10.0.0.1:40000")),
        ];
        let (held, owned_here, elsewhere) = (0, 1, 2);
        let mut l = Lookups::new(|id| tuples.get(id).copied());
        l.in_netns(9, held);
        l.in_netns(10, elsewhere);
        l.at_local_address(tuples[owned_here].local.ip(), owned_here);
        l.at_local_address(tuples[elsewhere].local.ip(), elsewhere);
        // An IPv4-mapped address is filed as the IPv4 one the interfaces show.
        l.at_local_address("::ffff:10.0.1.2".parse().expect("ip"), owned_here);
        // Loopback is on every namespace: filing by it would ask them all.
        l.at_local_address("127.0.0.1".parse().expect("ip"), held);
        l.at_local_address("::1".parse().expect("ip"), held);
        let everywhere: HashSet<IpAddr> = ["127.0.0.1".parse().expect("ip")].into();
        assert_eq!(
            l.for_netns(NetnsId { dev: 4, inode: 11 }, &everywhere),
            vec![]
        );
        let addrs: HashSet<IpAddr> = ["10.0.1.2".parse().expect("ip")].into();
        assert_eq!(
            l.for_netns(ns, &addrs),
            vec![tuples[owned_here], tuples[held]]
        );
        assert_eq!(l.for_netns(ns, &HashSet::new()), vec![tuples[held]]);
    }

    #[test]
    fn answers_keep_owners_and_skip_listeners_and_misses() {
        let asked = [
            Tuple::new(sa("127.0.0.1:8080"), sa("127.0.0.1:40000")),
            Tuple::new(sa("127.0.0.1:8080"), sa("127.0.0.1:40001")),
            Tuple::new(sa("127.0.0.1:8080"), sa("127.0.0.1:40002")),
        ];
        let netns = NetnsId { dev: 4, inode: 9 };
        let mut datagram = Vec::new();
        datagram.extend(reply(5, "127.0.0.1:8080", "127.0.0.1:40000", 1));
        datagram.extend(error(6, -libc::ENOENT));
        // The listener, answering for a tuple no connection has.
        datagram.extend(reply(7, "0.0.0.0:8080", "0.0.0.0:0", 10));
        let mut a = Answers::new(5, &asked);
        let mut found = Vec::new();
        a.feed(&datagram, netns, &mut found).expect("parses");
        assert_eq!(a.left, 0);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].local, sa("127.0.0.1:8080"));
        let mut b = Answers::new(5, &asked);
        let err = b
            .feed(&error(6, -libc::EINVAL), netns, &mut found)
            .expect_err("a refusal is an error");
        assert!(err.to_string().contains("127.0.0.1:40001"), "{err}");
    }

    fn reply(seq: u32, local: &str, remote: &str, state: u8) -> Vec<u8> {
        let (l, r) = (sa(local), sa(remote));
        let mut p = vec![0u8; 72];
        p[0] = AF_INET;
        p[1] = state;
        p[4..6].copy_from_slice(&l.port().to_be_bytes());
        p[6..8].copy_from_slice(&r.port().to_be_bytes());
        if let (IpAddr::V4(l), IpAddr::V4(r)) = (l.ip(), r.ip()) {
            p[8..12].copy_from_slice(&l.octets());
            p[24..28].copy_from_slice(&r.octets());
        }
        message(SOCK_DIAG_BY_FAMILY, seq, &p)
    }

    fn error(seq: u32, code: i32) -> Vec<u8> {
        let mut p = code.to_ne_bytes().to_vec();
        p.extend_from_slice(&[0u8; 16]);
        message(NLMSG_ERROR, seq, &p)
    }

    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(payload);
        b
    }
}
