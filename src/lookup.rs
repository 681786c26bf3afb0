//! Looks up given connection tuples through sock_diag: one exact request per tuple (no dump),
//! sent in batches, in the namespaces where the tuple's socket can be.
//!
//! A dump walks the kernel's TCP hash table, and every namespace shares that table: on a node
//! with a hundred pods an inventory walks all of the node's sockets a hundred times. An exact
//! request is one hash lookup. With the sockmap iterator, an observation knows which tuples
//! matter (each entry's key and its held socket's own ends) and in which namespace the held
//! socket lives, so it asks for those alone.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;

use netlink_packet_core::{NetlinkBuffer, NLMSG_ERROR, NLM_F_REQUEST};
use netlink_packet_sock_diag::{AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

use crate::diag::{self, DiagError, Inventory, LiveSocket, Sink};
use crate::netns::{discover, NetnsError, NetnsId};

/// `nlmsghdr` and `struct inet_diag_req_v2`.
const REQUEST_LEN: usize = 16 + 56;
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
/// `INET_DIAG_NOCOOKIE`: match on the tuple alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// A connection tuple: the ends a socket has as its own. IPv4-mapped IPv6 addresses are
/// stored as IPv4, as Cilium's keys hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Tuple {
    pub fn new(local: SocketAddr, remote: SocketAddr) -> Tuple {
        Tuple {
            local: unmap(local),
            remote: unmap(remote),
        }
    }
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
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
    pub inventory: Inventory,
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
    let mut inventory = diag::walk(
        &namespaces,
        |ns, _buf| {
            let addresses = if by_address {
                local_addresses()?
            } else {
                HashSet::new()
            };
            let tuples = lookups.for_netns(ns.id, &addresses);
            asked.fetch_add(tuples.len(), std::sync::atomic::Ordering::Relaxed);
            look_up_here(ns.id, &tuples)
        },
        sink,
    );
    inventory.unreadable = discovery.unreadable;
    Ok(Looked {
        inventory,
        asked: asked.into_inner(),
        unreached,
    })
}

/// The addresses on the calling thread's namespace's interfaces.
fn local_addresses() -> Result<HashSet<IpAddr>, DiagError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(DiagError::Addresses)?;
    Ok(addrs
        .filter_map(|a| {
            let addr = a.address?;
            match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
                (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
                (None, Some(v6)) => Some(IpAddr::V6(v6.ip())),
                _ => None,
            }
        })
        .collect())
}

/// Looks up `tuples` in the calling thread's namespace; returns the sockets found.
fn look_up_here(netns: NetnsId, tuples: &[Tuple]) -> Result<Vec<LiveSocket>, DiagError> {
    if tuples.is_empty() {
        return Ok(Vec::new());
    }
    // Created after the setns: a netlink socket belongs to the namespace it was created in.
    let socket = Socket::new(NETLINK_SOCK_DIAG).map_err(DiagError::Socket)?;
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(DiagError::Socket)?;
    diag::set_recv_timeout(&socket, diag::RECV_TIMEOUT).map_err(DiagError::Socket)?;
    let batch = batch_size(&socket);
    let mut slots = vec![0u8; batch * SLOT];
    let mut found = Vec::with_capacity(tuples.len());
    let mut seq = 0u32;
    let mut request = Vec::with_capacity(batch * REQUEST_LEN);
    for chunk in tuples.chunks(batch) {
        let base = seq.wrapping_add(1);
        request.clear();
        for t in chunk {
            seq = seq.wrapping_add(1);
            request.extend_from_slice(&exact_request(*t, seq));
        }
        // The kernel handles every request of the datagram in this call, in order.
        socket.send(&request, 0).map_err(DiagError::Send)?;
        let mut answers = Answers::new(base, chunk);
        // Each request gets one reply or one error; anything beyond is not for us.
        for _ in 0..chunk.len() * 2 + 8 {
            if answers.left == 0 {
                break;
            }
            for datagram in recv_many(&socket, &mut slots)? {
                answers.feed(datagram, netns, &mut found)?;
            }
        }
        if answers.left > 0 {
            return Err(DiagError::Malformed {
                detail: format!("{} of {} lookups got no answer", answers.left, chunk.len()),
            });
        }
    }
    Ok(found)
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
    ) -> Result<(), DiagError> {
        let mut rest = datagram;
        while !rest.is_empty() {
            let msg = NetlinkBuffer::new_checked(rest).map_err(|e| DiagError::Truncated {
                detail: format!("lookup reply: {e}"),
            })?;
            let step = (msg.length() as usize).div_ceil(diag::NLMSG_ALIGN) * diag::NLMSG_ALIGN;
            let index = msg.sequence_number().wrapping_sub(self.base) as usize;
            rest = rest.get(step..).unwrap_or_default();
            let (Some(tuple), Some(false)) = (
                self.tuples.get(index).copied(),
                self.answered.get(index).copied(),
            ) else {
                continue;
            };
            match msg.message_type() {
                SOCK_DIAG_BY_FAMILY => {
                    let socket = diag::parse_socket(msg.payload(), netns)?;
                    // A miss may be answered with the listener on the local port: that
                    // socket does not own the tuple.
                    if Tuple::new(socket.local, socket.remote) == tuple {
                        found.push(socket);
                    }
                }
                NLMSG_ERROR => match diag::read_i32(msg.payload()) {
                    // An acknowledgement, which these requests do not ask for.
                    Some(0) => continue,
                    Some(code) if code == -libc::ENOENT => {}
                    Some(code) => {
                        return Err(DiagError::Lookup {
                            local: tuple.local,
                            remote: tuple.remote,
                            errno: code.saturating_neg(),
                        })
                    }
                    None => {
                        return Err(DiagError::Truncated {
                            detail: "NLMSG_ERROR without an error code".into(),
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

/// `SOCK_DIAG_BY_FAMILY` without `NLM_F_DUMP`: the kernel looks the tuple up in its hash
/// tables (`inet_diag_find_one_icsk`) and answers with that socket or `ENOENT`.
fn exact_request(t: Tuple, seq: u32) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    let (family, local, remote) = match (t.local.ip(), t.remote.ip()) {
        (IpAddr::V4(l), IpAddr::V4(r)) => {
            let (mut local, mut remote) = ([0u8; 16], [0u8; 16]);
            local[..4].copy_from_slice(&l.octets());
            remote[..4].copy_from_slice(&r.octets());
            (AF_INET, local, remote)
        }
        (l, r) => (AF_INET6, v6_octets(l), v6_octets(r)),
    };
    let r = &mut b[16..];
    r[0] = family;
    r[1] = IPPROTO_TCP;
    r[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    r[8..10].copy_from_slice(&t.local.port().to_be_bytes());
    r[10..12].copy_from_slice(&t.remote.port().to_be_bytes());
    r[12..28].copy_from_slice(&local);
    r[28..44].copy_from_slice(&remote);
    r[48..56].copy_from_slice(&NO_COOKIE);
    b
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// How many requests one batch may carry: as many replies as the receive buffer holds.
fn batch_size(socket: &Socket) -> usize {
    let fd = socket.as_raw_fd();
    let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a live socket owned by `socket`; the value is a c_int whose size is
    // passed. A refusal only leaves the default buffer, which the read below measures.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&RECV_BUFFER as *const libc::c_int).cast(),
            size,
        )
    };
    let mut effective: libc::c_int = 0;
    let mut len = size;
    // SAFETY: as above; `effective` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut effective as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    let bytes = if rc == 0 {
        usize::try_from(effective).unwrap_or(0)
    } else {
        0
    };
    (bytes / REPLY_TRUESIZE).clamp(MIN_BATCH, MAX_BATCH)
}

/// Receives every datagram waiting (at least one, or the receive timeout) in one syscall.
fn recv_many<'s>(socket: &Socket, slots: &'s mut [u8]) -> Result<Vec<&'s [u8]>, DiagError> {
    let mut iovecs: Vec<libc::iovec> = slots
        .chunks_exact_mut(SLOT)
        .map(|s| libc::iovec {
            iov_base: s.as_mut_ptr().cast(),
            iov_len: s.len(),
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is a C struct of integers and pointers; all zeroes is a valid
            // (empty) value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let count = loop {
        // SAFETY: every header points at one iovec of `iovecs`, each at its own SLOT-sized
        // part of `slots`; all outlive the call and none is aliased while it runs.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                headers.len() as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Err(DiagError::Timeout),
            _ => return Err(DiagError::Recv(e)),
        }
    };
    let lens: Vec<(usize, bool)> = headers
        .iter()
        .take(count)
        .map(|h| {
            (
                h.msg_len as usize,
                h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            )
        })
        .collect();
    drop(headers);
    drop(iovecs);
    let mut out = Vec::with_capacity(count);
    for ((len, truncated), slot) in lens.into_iter().zip(slots.chunks_exact(SLOT)) {
        if truncated || len > SLOT {
            return Err(DiagError::Truncated {
                detail: format!("lookup reply of {len} bytes, slot of {SLOT}"),
            });
        }
        out.push(&slot[..len]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn exact_request_is_a_non_dump_lookup_of_the_tuple() {
        let t = Tuple::new(sa("10.0.1.2:8080"), sa("10.0.1.1:40000"));
        let b = exact_request(t, 7);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().expect("4")), 72);
        assert_eq!(
            u16::from_ne_bytes(b[4..6].try_into().expect("2")),
            SOCK_DIAG_BY_FAMILY
        );
        assert_eq!(
            u16::from_ne_bytes(b[6..8].try_into().expect("2")),
            NLM_F_REQUEST
        );
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().expect("4")), 7);
        assert_eq!(b[16], AF_INET);
        assert_eq!(b[17], IPPROTO_TCP);
        assert_eq!(&b[24..26], &8080u16.to_be_bytes());
        assert_eq!(&b[26..28], &40000u16.to_be_bytes());
        assert_eq!(&b[28..32], &[10, 0, 1, 2]);
        assert_eq!(&b[44..48], &[10, 0, 1, 1]);
        assert_eq!(&b[64..72], &NO_COOKIE);
    }

    #[test]
    fn ipv6_and_mapped_tuples() {
        let v6 = Tuple::new(sa("[fd00::2]:8080"), sa("[fd00::1]:40000"));
        assert_eq!(exact_request(v6, 1)[16], AF_INET6);
        let mapped = Tuple::new(sa("[::ffff:10.0.0.2]:8080"), sa("[::ffff:10.0.0.1]:1"));
        assert_eq!(mapped.local, sa("10.0.0.2:8080"));
        assert_eq!(exact_request(mapped, 1)[16], AF_INET);
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
