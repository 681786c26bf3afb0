//! Dumps the TCP sockets of network namespaces through sock_diag, IPv4 and IPv6, all states:
//! one dump per namespace, from the namespace workers of [`crate::netns`].
//!
//! Replies are parsed in place from one reused receive buffer: per socket, the only work is
//! decoding a fixed-size header and pushing a `Copy` value.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use netlink_packet_core::{NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_DUMP_INTR};
use netlink_packet_sock_diag::{AF_INET, AF_INET6, SOCK_DIAG_BY_FAMILY};
use netlink_sys::Socket;

use crate::netlink::{self, NetlinkError, TCPDIAG_GETSOCK};
use crate::netns::{self, discover, Netns, NetnsError, NetnsId, WalkError, Walked};
use crate::socket::LiveSocket;

/// Receive buffer size. The kernel fills at most ~32 KiB per dump datagram (it sizes dump
/// skbs after the reader's buffer, capped at 32 KiB), so 64 KiB never truncates.
const RECV_BUF_LEN: usize = 64 * 1024;
/// Bound on datagrams per dump: ~370 sockets fit in one, so this allows ~370 million.
const MAX_DATAGRAMS_PER_DUMP: usize = 1 << 20;
/// How often a dump the kernel flags as inconsistent (`NLM_F_DUMP_INTR`) is redone.
const DUMP_ATTEMPTS: u32 = 3;

/// Why the sockets of a namespace could not be (fully) read.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("the kernel refused the {family} TCP dump: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { family: &'static str, errno: i32 },
    #[error("the {family} TCP dump was inconsistent (NLM_F_DUMP_INTR) {attempts} times in a row")]
    DumpInterrupted { family: &'static str, attempts: u32 },
    #[error("the {family} TCP dump did not end after {MAX_DATAGRAMS_PER_DUMP} datagrams")]
    Endless { family: &'static str },
    #[error("cannot identify the current network namespace: {0}")]
    CurrentNetns(io::Error),
}

/// The live TCP sockets of a set of namespaces; `E` is why a namespace could not be read.
#[derive(Debug)]
pub struct Inventory<E = DiagError> {
    /// Empty when the sockets went to a [`Sink`] instead.
    pub sockets: Vec<LiveSocket>,
    /// Namespaces dumped completely.
    pub read: usize,
    /// Namespaces gone between discovery and the walk (no path reaches them any more): fine,
    /// their sockets are gone or unreachable to anyone.
    pub vanished: Vec<Netns>,
    /// Namespaces that exist but could not be read: the inventory is incomplete.
    pub failed: Vec<(Netns, E)>,
    /// Paths discovery could not examine (see [`crate::netns::Discovery::unreadable`]): each may
    /// hide a namespace, so the inventory is incomplete.
    pub unreadable: Vec<NetnsError>,
}

impl<E> Default for Inventory<E> {
    fn default() -> Self {
        Inventory {
            sockets: Vec::new(),
            read: 0,
            vanished: Vec::new(),
            failed: Vec::new(),
            unreadable: Vec::new(),
        }
    }
}

impl<E> Inventory<E> {
    /// What a walk read, with the paths its discovery could not examine.
    pub(crate) fn walked(walked: Walked<E>, unreadable: Vec<NetnsError>) -> Inventory<E> {
        Inventory {
            sockets: Vec::new(),
            read: walked.read,
            vanished: walked.vanished,
            failed: walked.failed,
            unreadable,
        }
    }

    /// Whether every namespace on the node was read, so a tuple missing here is missing
    /// everywhere.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty() && self.unreadable.is_empty()
    }

    /// How many namespaces (or paths that may be namespaces) could not be read.
    pub fn unreadable_count(&self) -> usize {
        self.failed.len() + self.unreadable.len()
    }
}

/// Dumps all TCP sockets (IPv4 and IPv6, all states) of the calling thread's namespace.
pub fn dump_current_netns() -> Result<Vec<LiveSocket>, DiagError> {
    let netns = NetnsId::of_current_thread().map_err(DiagError::CurrentNetns)?;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    dump_into(netns, &mut buf, &mut out)?;
    Ok(out)
}

/// Discovers the namespaces under `root` (`/` in production) and inventories them. Paths
/// discovery could not examine make the result incomplete.
pub fn inventory_node(root: &Path) -> Result<Inventory, NetnsError> {
    let mut sockets = Vec::new();
    let mut inv = inventory_node_into(root, &mut |_, s| collect(&mut sockets, s))?;
    inv.sockets = sockets;
    Ok(inv)
}

/// [`inventory_node`], handing each namespace's sockets to `sink` as they come in instead of
/// gathering them (the result's `sockets` stays empty).
pub fn inventory_node_into(root: &Path, sink: &mut Sink<'_>) -> Result<Inventory, NetnsError> {
    let discovery = discover(root)?;
    for path in &discovery.not_namespaces {
        tracing::warn!(path = %path.display(), "not a network namespace mount; skipped");
    }
    for (path, id) in &discovery.recognised {
        tracing::debug!(path = %path.display(), netns = %id, "namespace file denied; its namespace is read through another path");
    }
    let walked = netns::walk(&discovery.namespaces, dump_work, sink);
    Ok(Inventory::walked(walked, discovery.unreadable))
}

/// Takes the sockets of one namespace as they are read.
pub type Sink<'a> = dyn FnMut(&Netns, Vec<LiveSocket>) + 'a;

fn collect(all: &mut Vec<LiveSocket>, sockets: Vec<LiveSocket>) {
    if all.is_empty() {
        *all = sockets;
    } else {
        all.extend_from_slice(&sockets);
    }
}

fn dump_work(ns: &Netns, buf: &mut Vec<u8>) -> Result<Vec<LiveSocket>, DiagError> {
    let mut sockets = Vec::new();
    dump_into(ns.id, buf, &mut sockets)?;
    Ok(sockets)
}

/// Dumps every namespace in `namespaces` from the namespace workers.
pub fn inventory(namespaces: &[Netns]) -> Inventory {
    let mut sockets = Vec::new();
    let walked = netns::walk(namespaces, dump_work, &mut |_, s| collect(&mut sockets, s));
    let mut inv = Inventory::walked(walked, Vec::new());
    inv.sockets = sockets;
    inv
}

/// Dumps the TCP sockets (IPv4 and IPv6) of the calling thread's namespace into `out`, with
/// `buf` (grown to [`RECV_BUF_LEN`] if smaller) as the receive buffer.
///
/// One request of the legacy `TCPDIAG_GETSOCK` type dumps both families in a single walk of
/// the kernel's TCP hash tables (the kernel serves it as family `AF_UNSPEC`). Those tables are
/// shared by every namespace on the node, so each namespace's dump walks all of the node's
/// sockets: one walk instead of one per family halves the cost of an inventory. A kernel that
/// refuses the request gets the two per-family `SOCK_DIAG_BY_FAMILY` dumps instead.
fn dump_into(
    netns: NetnsId,
    buf: &mut Vec<u8>,
    out: &mut Vec<LiveSocket>,
) -> Result<(), DiagError> {
    if buf.len() < RECV_BUF_LEN {
        buf.resize(RECV_BUF_LEN, 0);
    }
    let socket = netlink::open()?;
    let mut seq = 0u32;
    if !BOTH_REFUSED.load(Ordering::Relaxed) {
        let start = out.len();
        match dump_retrying(&socket, BOTH_FAMILIES, &mut seq, netns, buf, out) {
            Ok(()) => return Ok(()),
            Err(DiagError::Kernel { errno, .. }) => {
                out.truncate(start);
                BOTH_REFUSED.store(true, Ordering::Relaxed);
                tracing::debug!(%netns, errno, "single-walk TCPDIAG_GETSOCK dump refused; dumping per family");
            }
            Err(e) => return Err(e),
        }
    }
    for family in [AF_INET, AF_INET6] {
        dump_retrying(&socket, family, &mut seq, netns, buf, out)?;
    }
    Ok(())
}

/// `family` value that asks for both families in one walk (the legacy request).
const BOTH_FAMILIES: u8 = 0;
/// Set once the kernel refused the single-walk dump: later dumps go per family at once.
static BOTH_REFUSED: AtomicBool = AtomicBool::new(false);

/// One dump, redone while the kernel flags it inconsistent (at most [`DUMP_ATTEMPTS`] times).
fn dump_retrying(
    socket: &Socket,
    family: u8,
    seq: &mut u32,
    netns: NetnsId,
    buf: &mut [u8],
    out: &mut Vec<LiveSocket>,
) -> Result<(), DiagError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        *seq += 1;
        let start = out.len();
        match dump_family(socket, family, *seq, netns, buf, out)? {
            DumpEnd::Consistent => return Ok(()),
            DumpEnd::Interrupted => {
                out.truncate(start);
                tracing::debug!(%netns, family = family_name(family), attempt, "sock_diag dump interrupted; retrying");
                if attempt >= DUMP_ATTEMPTS {
                    return Err(DiagError::DumpInterrupted {
                        family: family_name(family),
                        attempts: attempt,
                    });
                }
            }
        }
    }
}

fn family_name(family: u8) -> &'static str {
    match family {
        AF_INET => "IPv4",
        BOTH_FAMILIES => "IPv4 and IPv6",
        _ => "IPv6",
    }
}

#[derive(Debug, PartialEq, Eq)]
enum DumpEnd {
    Consistent,
    /// The kernel flagged the dump `NLM_F_DUMP_INTR`: sockets may be missing or doubled.
    Interrupted,
}

fn dump_family(
    socket: &Socket,
    family: u8,
    seq: u32,
    netns: NetnsId,
    buf: &mut [u8],
    out: &mut Vec<LiveSocket>,
) -> Result<DumpEnd, DiagError> {
    let request = if family == BOTH_FAMILIES {
        netlink::dump_request_both(seq)
    } else {
        netlink::dump_request(family, seq)
    };
    socket.send(&request, 0).map_err(NetlinkError::Send)?;
    let mut parser = DumpParser::new(family, seq, netns);
    for _ in 0..MAX_DATAGRAMS_PER_DUMP {
        let datagram = netlink::recv(socket, buf)?;
        if let Some(end) = parser.feed(datagram, out)? {
            return Ok(end);
        }
    }
    Err(DiagError::Endless {
        family: family_name(family),
    })
}

/// Parses the datagrams of one dump.
struct DumpParser {
    family: u8,
    seq: u32,
    netns: NetnsId,
    interrupted: bool,
}

impl DumpParser {
    fn new(family: u8, seq: u32, netns: NetnsId) -> DumpParser {
        DumpParser {
            family,
            seq,
            netns,
            interrupted: false,
        }
    }

    /// Parses one datagram, pushing its sockets; `Some` once the dump has ended.
    fn feed(
        &mut self,
        datagram: &[u8],
        out: &mut Vec<LiveSocket>,
    ) -> Result<Option<DumpEnd>, DiagError> {
        for msg in netlink::messages(datagram) {
            let msg = msg?;
            // Messages of another sequence number are leftovers of an abandoned dump.
            if msg.sequence_number() != self.seq {
                continue;
            }
            if msg.flags() & NLM_F_DUMP_INTR != 0 {
                self.interrupted = true;
            }
            match msg.message_type() {
                NLMSG_NOOP => {}
                NLMSG_DONE => return self.done(msg.payload()).map(Some),
                NLMSG_ERROR => {
                    let code = netlink::error_code(msg.payload())?;
                    // 0 is an acknowledgement, which a dump does not ask for: ignore it.
                    if code != 0 {
                        return Err(self.kernel_error(code));
                    }
                }
                NLMSG_OVERRUN => return Err(NetlinkError::Overrun.into()),
                SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => {
                    out.push(netlink::parse_socket(msg.payload(), self.netns)?)
                }
                // Unknown types are not ours to interpret; skip them.
                _ => {}
            }
        }
        Ok(None)
    }

    fn done(&self, payload: &[u8]) -> Result<DumpEnd, DiagError> {
        // NLMSG_DONE carries the dump's final status; old kernels may send no payload at all.
        match netlink::read_i32(payload) {
            Some(code) if code < 0 => Err(self.kernel_error(code)),
            _ if self.interrupted => Ok(DumpEnd::Interrupted),
            _ => Ok(DumpEnd::Consistent),
        }
    }

    fn kernel_error(&self, code: i32) -> DiagError {
        DiagError::Kernel {
            family: family_name(self.family),
            errno: code.saturating_neg(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::TcpState;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_sock_diag::inet::InetResponse;
    use netlink_packet_sock_diag::inet::{InetResponseHeader, SocketId};
    use netlink_packet_sock_diag::SockDiagMessage;
    use std::net::{IpAddr, SocketAddr};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::path::PathBuf;

    const NETNS: NetnsId = NetnsId {
        dev: 4,
        inode: 4026531840,
    };

    fn response(
        family: u8,
        state: u8,
        local: (IpAddr, u16),
        remote: (IpAddr, u16),
        cookie: u64,
        inode: u32,
    ) -> SockDiagMessage {
        let low = (cookie as u32).to_ne_bytes();
        let high = ((cookie >> 32) as u32).to_ne_bytes();
        let mut raw_cookie = [0u8; 8];
        raw_cookie[..4].copy_from_slice(&low);
        raw_cookie[4..].copy_from_slice(&high);
        SockDiagMessage::InetResponse(Box::new(InetResponse {
            header: InetResponseHeader {
                family,
                state,
                timer: None,
                socket_id: SocketId {
                    source_port: local.1,
                    destination_port: remote.1,
                    source_address: local.0,
                    destination_address: remote.0,
                    interface_id: 0,
                    cookie: raw_cookie,
                },
                recv_queue: 0,
                send_queue: 0,
                uid: 0,
                inode,
            },
            nlas: Default::default(),
        }))
    }

    /// One netlink message with the crate's emitter.
    fn frame(msg: SockDiagMessage, seq: u32, flags: u16) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        header.flags = flags;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        m.finalize();
        let mut bytes = vec![0u8; m.buffer_len()];
        m.serialize(&mut bytes);
        bytes
    }

    /// A control message (DONE, ERROR) with an i32 payload, by hand.
    fn control(kind: u16, code: i32, seq: u32, flags: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&20u32.to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&code.to_ne_bytes());
        b
    }

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }

    fn established_v4(seq: u32) -> Vec<u8> {
        frame(
            response(
                AF_INET,
                1,
                (v4([10, 0, 0, 1]), 8080),
                (v4([10, 0, 0, 2]), 40000),
                0x1234_5678_9abc_def0,
                777,
            ),
            seq,
            libc::NLM_F_MULTI as u16,
        )
    }

    #[test]
    fn parses_a_multipart_dump() {
        let mut first = established_v4(1);
        first.extend(frame(
            response(
                AF_INET6,
                10,
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 443),
                (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
                5,
                0,
            ),
            1,
            libc::NLM_F_MULTI as u16,
        ));
        let mut p = DumpParser::new(AF_INET, 1, NETNS);
        let mut out = Vec::new();
        assert_eq!(p.feed(&first, &mut out).unwrap(), None);
        let second = control(NLMSG_DONE, 0, 1, libc::NLM_F_MULTI as u16);
        assert_eq!(
            p.feed(&second, &mut out).unwrap(),
            Some(DumpEnd::Consistent)
        );

        assert_eq!(out.len(), 2);
        assert_eq!(out[0].local, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(out[0].remote, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(out[0].state, TcpState::Established);
        assert_eq!(out[0].cookie, 0x1234_5678_9abc_def0);
        assert_eq!(out[0].inode, Some(777));
        assert_eq!(out[0].netns, NETNS);
        assert_eq!(out[1].local, "[::1]:443".parse().unwrap());
        assert_eq!(out[1].state, TcpState::Listen);
        assert_eq!(out[1].inode, None);
    }

    #[test]
    fn other_sequence_numbers_are_skipped() {
        let mut datagram = established_v4(7);
        datagram.extend(control(NLMSG_DONE, 0, 7, 0));
        datagram.extend(established_v4(2));
        let mut p = DumpParser::new(AF_INET, 2, NETNS);
        let mut out = Vec::new();
        assert_eq!(p.feed(&datagram, &mut out).unwrap(), None);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn dump_intr_marks_the_dump_interrupted() {
        let mut datagram = frame(
            response(
                AF_INET,
                1,
                (v4([1, 1, 1, 1]), 1),
                (v4([2, 2, 2, 2]), 2),
                1,
                1,
            ),
            3,
            (libc::NLM_F_MULTI | libc::NLM_F_DUMP_INTR) as u16,
        );
        datagram.extend(control(NLMSG_DONE, 0, 3, 0));
        let mut p = DumpParser::new(AF_INET, 3, NETNS);
        let mut out = Vec::new();
        assert_eq!(
            p.feed(&datagram, &mut out).unwrap(),
            Some(DumpEnd::Interrupted)
        );

        // Also when only the DONE message carries the flag.
        let mut p = DumpParser::new(AF_INET, 4, NETNS);
        let done = control(NLMSG_DONE, 0, 4, libc::NLM_F_DUMP_INTR as u16);
        assert_eq!(p.feed(&done, &mut out).unwrap(), Some(DumpEnd::Interrupted));
    }

    #[test]
    fn kernel_errors_are_typed() {
        let mut p = DumpParser::new(AF_INET6, 1, NETNS);
        let err = p
            .feed(&control(NLMSG_ERROR, -libc::EPERM, 1, 0), &mut Vec::new())
            .unwrap_err();
        assert!(
            matches!(err, DiagError::Kernel { family: "IPv6", errno } if errno == libc::EPERM),
            "{err}"
        );
        let err = p
            .feed(&control(NLMSG_DONE, -libc::ENOMEM, 1, 0), &mut Vec::new())
            .unwrap_err();
        assert!(matches!(err, DiagError::Kernel { errno, .. } if errno == libc::ENOMEM));
        // An ACK (error 0) is not an error.
        assert_eq!(
            p.feed(&control(NLMSG_ERROR, 0, 1, 0), &mut Vec::new())
                .unwrap(),
            None
        );
        let overrun = control(NLMSG_OVERRUN, 0, 1, 0);
        assert!(matches!(
            p.feed(&overrun, &mut Vec::new()),
            Err(DiagError::Netlink(NetlinkError::Overrun))
        ));
    }

    #[test]
    fn truncated_and_malformed_replies_are_errors_not_panics() {
        let full = established_v4(1);
        let mut out = Vec::new();
        // Every prefix of a valid message, and garbage lengths.
        for cut in 1..full.len() {
            let mut p = DumpParser::new(AF_INET, 1, NETNS);
            assert!(p.feed(&full[..cut], &mut out).is_err(), "cut at {cut}");
        }
        let mut p = DumpParser::new(AF_INET, 1, NETNS);
        let mut short = full.clone();
        short[..4].copy_from_slice(&20u32.to_ne_bytes()); // header + 4 bytes of inet_diag_msg
        assert!(matches!(
            p.feed(&short[..20], &mut out),
            Err(DiagError::Netlink(NetlinkError::Malformed { .. }))
        ));
        let mut bad_family = full.clone();
        bad_family[16] = 99;
        assert!(matches!(
            p.feed(&bad_family, &mut out),
            Err(DiagError::Netlink(NetlinkError::Malformed { .. }))
        ));
        let mut bad_len = full;
        bad_len[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(p.feed(&bad_len, &mut out).is_err());
        assert!(out.is_empty());
        assert!(matches!(
            p.feed(&control(NLMSG_ERROR, 0, 1, 0)[..18], &mut out),
            Err(DiagError::Netlink(NetlinkError::Truncated { .. }))
        ));
    }

    #[test]
    fn both_families_of_one_namespace_in_one_dump() {
        // The single-walk dump sees what the two per-family dumps see.
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        let sockets = dump_current_netns().unwrap();
        let has = |addr: SocketAddr| sockets.iter().any(|s| s.local == addr);
        assert!(has(v4.local_addr().unwrap()));
        if let Some(v6) = v6 {
            assert!(has(v6.local_addr().unwrap()));
        }
    }

    #[test]
    fn inventory_of_nothing_is_complete() {
        let inv = inventory(&[]);
        assert!(inv.is_complete());
        assert_eq!(
            (inv.read, inv.sockets.len(), inv.unreadable_count()),
            (0, 0, 0)
        );
    }

    #[test]
    fn a_namespace_no_path_reaches_has_vanished() {
        let gone = Netns {
            id: NETNS,
            path: PathBuf::from("/proc/0/ns/net"),
            fallbacks: vec![PathBuf::from("/nonexistent/smgc/netns")],
            label: "gone".into(),
        };
        let inv = inventory(std::slice::from_ref(&gone));
        assert_eq!(inv.vanished, vec![gone]);
        assert!(inv.is_complete());
    }

    #[test]
    fn dumps_this_threads_namespace() {
        // Unprivileged and harmless: a listener of our own must show up.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sockets = dump_current_netns().unwrap();
        let mine = sockets
            .iter()
            .find(|s| s.local == addr && s.state == TcpState::Listen)
            .expect("own listener in the dump");
        assert_ne!(mine.cookie, 0);
        assert!(mine.inode.is_some());
        assert_eq!(mine.netns, NetnsId::of_current_thread().unwrap());
    }
}
