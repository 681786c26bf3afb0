//! The sock_diag netlink protocol (`NETLINK_SOCK_DIAG`, inet_diag): opening a socket in the
//! calling thread's namespace, receiving, stepping through the messages of a datagram, and the
//! three requests this program sends (the per-family dump, the single-walk legacy dump and the
//! exact lookup of one tuple), and reading an `inet_diag_msg` as a [`LiveSocket`].
//!
//! What the replies mean (a dump's end, a lookup's miss) is for [`crate::diag`] and
//! [`crate::lookup`] to say.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, Parseable, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_packet_sock_diag::{
    SockDiagMessage, AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

use crate::netns::NetnsId;
use crate::socket::{LiveSocket, TcpState, Tuple};

/// How long one `recv` may block before the reply is declared stuck.
pub(crate) const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// Netlink messages are aligned to 4 bytes.
const NLMSG_ALIGN: usize = 4;
/// The legacy request type, and the type of its replies (`TCPDIAG_GETSOCK`, linux/inet_diag.h).
pub(crate) const TCPDIAG_GETSOCK: u16 = 18;
/// `nlmsghdr` and `struct inet_diag_req_v2`: the length of an exact lookup request.
pub(crate) const EXACT_REQUEST_LEN: usize = 16 + 56;
/// `INET_DIAG_NOCOOKIE`: match on the tuple alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// Why a sock_diag exchange failed below the level of what the reply means.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a NETLINK_SOCK_DIAG socket: {0}")]
    Socket(io::Error),
    #[error("cannot send the sock_diag request: {0}")]
    Send(io::Error),
    #[error("reading the sock_diag reply failed: {0}")]
    Recv(io::Error),
    #[error("no sock_diag reply for {}s; the dump is stuck", RECV_TIMEOUT.as_secs())]
    Timeout,
    #[error("the kernel's netlink socket overran (NLMSG_OVERRUN); sockets were lost")]
    Overrun,
    #[error("truncated sock_diag reply: {detail}")]
    Truncated { detail: String },
    #[error("malformed sock_diag reply: {detail}")]
    Malformed { detail: String },
}

/// A sock_diag socket of the calling thread's namespace, connected to the kernel, whose
/// receives time out after [`RECV_TIMEOUT`].
pub(crate) fn open() -> Result<Socket, NetlinkError> {
    open_protocol(NETLINK_SOCK_DIAG)
}

/// [`open`] for another netlink protocol (`NETLINK_ROUTE` for [`crate::ifaddr`]).
pub(crate) fn open_protocol(protocol: isize) -> Result<Socket, NetlinkError> {
    // Created after any setns: a netlink socket belongs to the namespace it was created in.
    let socket = Socket::new(protocol).map_err(NetlinkError::Socket)?;
    // Connected to the kernel (port 0), the socket accepts datagrams from the kernel only.
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(NetlinkError::Socket)?;
    set_recv_timeout(&socket, RECV_TIMEOUT).map_err(NetlinkError::Socket)?;
    Ok(socket)
}

fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: the fd is a live socket owned by `socket`; `tv` is a valid timeval that outlives
    // the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks for a receive buffer of `wanted` bytes (the kernel caps it at `net.core.rmem_max`)
/// and returns the size it has; 0 if that cannot be read.
pub(crate) fn grow_recv_buffer(socket: &Socket, wanted: libc::c_int) -> usize {
    let fd = socket.as_raw_fd();
    let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a live socket owned by `socket`; the value is a c_int whose size is
    // passed. A refusal only leaves the default buffer, which the read below measures.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&wanted as *const libc::c_int).cast(),
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
    if rc == 0 {
        usize::try_from(effective).unwrap_or(0)
    } else {
        0
    }
}

/// Receives one datagram into `buf`; a datagram larger than `buf` is an error, not a cut.
pub(crate) fn recv<'b>(socket: &Socket, buf: &'b mut [u8]) -> Result<&'b [u8], NetlinkError> {
    loop {
        // MSG_TRUNC: the return value is the datagram's real length even if it did not fit.
        let len = match socket.recv(&mut &mut buf[..], libc::MSG_TRUNC) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(recv_error(e)),
        };
        if len > buf.len() {
            return Err(NetlinkError::Truncated {
                detail: format!("datagram of {len} bytes, buffer of {}", buf.len()),
            });
        }
        return Ok(&buf[..len]);
    }
}

fn recv_error(e: io::Error) -> NetlinkError {
    if e.kind() == io::ErrorKind::WouldBlock {
        NetlinkError::Timeout
    } else {
        NetlinkError::Recv(e)
    }
}

/// Receives every datagram waiting (at least one, or the receive timeout) in one syscall, each
/// into its own `slot`-sized part of `slots`.
pub(crate) fn recv_many<'s>(
    socket: &Socket,
    slots: &'s mut [u8],
    slot: usize,
) -> Result<Vec<&'s [u8]>, NetlinkError> {
    let mut iovecs: Vec<libc::iovec> = slots
        .chunks_exact_mut(slot)
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
        // SAFETY: every header points at one iovec of `iovecs`, each at its own slot-sized
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
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(recv_error(e));
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
    for ((len, truncated), part) in lens.into_iter().zip(slots.chunks_exact(slot)) {
        if truncated || len > slot {
            return Err(NetlinkError::Truncated {
                detail: format!("lookup reply of {len} bytes, slot of {slot}"),
            });
        }
        out.push(&part[..len]);
    }
    Ok(out)
}

/// The messages of one datagram, in order, each stepped over with netlink's alignment.
pub(crate) fn messages(datagram: &[u8]) -> Messages<'_> {
    Messages {
        datagram,
        offset: 0,
    }
}

pub(crate) struct Messages<'d> {
    datagram: &'d [u8],
    offset: usize,
}

impl<'d> Iterator for Messages<'d> {
    type Item = Result<NetlinkBuffer<&'d [u8]>, NetlinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.datagram.get(self.offset..).filter(|r| !r.is_empty())?;
        match NetlinkBuffer::new_checked(rest) {
            Ok(msg) => {
                let step = (msg.length() as usize).div_ceil(NLMSG_ALIGN) * NLMSG_ALIGN;
                self.offset = self.offset.saturating_add(step);
                Some(Ok(msg))
            }
            Err(e) => {
                let offset = self.offset;
                self.offset = self.datagram.len();
                Some(Err(NetlinkError::Truncated {
                    detail: format!("netlink message at offset {offset}: {e}"),
                }))
            }
        }
    }
}

/// The error code of an `NLMSG_ERROR` message (negative errno; 0 is an acknowledgement).
pub(crate) fn error_code(payload: &[u8]) -> Result<i32, NetlinkError> {
    read_i32(payload).ok_or_else(|| NetlinkError::Truncated {
        detail: "NLMSG_ERROR without an error code".into(),
    })
}

/// The leading `i32` of a payload (`NLMSG_DONE`'s status may be absent on old kernels).
pub(crate) fn read_i32(payload: &[u8]) -> Option<i32> {
    let bytes: [u8; 4] = payload.get(..4)?.try_into().ok()?;
    Some(i32::from_ne_bytes(bytes))
}

/// The legacy `TCPDIAG_GETSOCK` dump request: `nlmsghdr` and `struct inet_diag_req` (family,
/// address lengths, extensions, a zero socket id, the state mask, `idiag_dbs`), which the
/// kernel answers with the TCP sockets of both families.
pub(crate) fn dump_request_both(seq: u32) -> Vec<u8> {
    const REQ_LEN: usize = 4 + 48 + 4 + 4;
    let mut bytes = dump_header(TCPDIAG_GETSOCK, REQ_LEN, seq);
    // idiag_family (ignored for a dump: the kernel uses AF_UNSPEC), src_len, dst_len, ext.
    bytes.extend_from_slice(&[AF_INET, 0, 0, 0]);
    // inet_diag_sockid: ports, addresses, interface and cookie all zero (no filter).
    bytes.extend_from_slice(&[0u8; 48]);
    // Every state bit, as below.
    bytes.extend_from_slice(&u32::MAX.to_ne_bytes());
    bytes.extend_from_slice(&0u32.to_ne_bytes());
    bytes
}

/// The `nlmsghdr` of a dump request of `kind` whose body, `body_len` bytes, follows it.
pub(crate) fn dump_header(kind: u16, body_len: usize, seq: u32) -> Vec<u8> {
    const HEADER_LEN: usize = 16;
    let len = HEADER_LEN + body_len;
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(&(len as u32).to_ne_bytes());
    bytes.extend_from_slice(&kind.to_ne_bytes());
    bytes.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    bytes.extend_from_slice(&seq.to_ne_bytes());
    bytes.extend_from_slice(&0u32.to_ne_bytes());
    bytes
}

/// The `SOCK_DIAG_BY_FAMILY` dump of one family's TCP sockets, all states.
pub(crate) fn dump_request(family: u8, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut msg = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            // Every state bit, including NEW_SYN_RECV and BOUND_INACTIVE that `StateFlags`
            // does not name; the kernel ignores bits it does not know.
            states: StateFlags::from_bits_retain(u32::MAX),
            socket_id,
        })
        .into(),
    );
    msg.finalize();
    let mut bytes = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut bytes);
    bytes
}

/// `SOCK_DIAG_BY_FAMILY` without `NLM_F_DUMP`: the kernel looks the tuple up in its hash
/// tables (`inet_diag_find_one_icsk`) and answers with that socket or `ENOENT`.
pub(crate) fn exact_request(t: Tuple, seq: u32) -> [u8; EXACT_REQUEST_LEN] {
    let mut b = [0u8; EXACT_REQUEST_LEN];
    b[0..4].copy_from_slice(&(EXACT_REQUEST_LEN as u32).to_ne_bytes());
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

/// One `inet_diag_msg` (a dump's or an exact lookup's reply) as a socket of `netns`.
pub(crate) fn parse_socket(payload: &[u8], netns: NetnsId) -> Result<LiveSocket, NetlinkError> {
    let header = InetResponseHeader::parse(payload).map_err(|e| NetlinkError::Malformed {
        detail: format!("inet_diag_msg: {e}"),
    })?;
    let id = &header.socket_id;
    let local = socket_addr(id.source_address, id.source_port);
    let remote = socket_addr(id.destination_address, id.destination_port);
    Ok(LiveSocket {
        local,
        remote,
        state: TcpState::from_kernel(header.state),
        cookie: cookie(id.cookie),
        inode: (header.inode != 0).then_some(header.inode),
        netns,
    })
}

/// `idiag_cookie` is two host-endian `u32`s, low half first.
fn cookie(raw: [u8; 8]) -> u64 {
    let low = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let high = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    (u64::from(high) << 32) | u64::from(low)
}

fn socket_addr(ip: IpAddr, port: u16) -> SocketAddr {
    match ip {
        IpAddr::V4(ip) => SocketAddr::V4(SocketAddrV4::new(ip, port)),
        // Scope ids are dropped: sockmap keys carry none.
        IpAddr::V6(ip) => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::sa;

    #[test]
    fn cookie_halves() {
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&0xdead_beefu32.to_ne_bytes());
        raw[4..].copy_from_slice(&0x0000_0001u32.to_ne_bytes());
        assert_eq!(cookie(raw), 0x1_dead_beef);
    }

    #[test]
    fn request_asks_for_every_state_and_tcp() {
        let req = dump_request(AF_INET6, 9);
        let msg = NetlinkBuffer::new_checked(&req[..]).unwrap();
        assert_eq!(msg.message_type(), SOCK_DIAG_BY_FAMILY);
        assert_eq!(msg.flags(), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(msg.sequence_number(), 9);
        let p = msg.payload();
        assert_eq!((p[0], p[1]), (AF_INET6, IPPROTO_TCP));
        assert_eq!(&p[4..8], &u32::MAX.to_ne_bytes());
    }

    #[test]
    fn single_walk_request_is_the_legacy_tcp_dump() {
        let req = dump_request_both(5);
        let msg = NetlinkBuffer::new_checked(&req[..]).unwrap();
        assert_eq!(msg.message_type(), TCPDIAG_GETSOCK);
        assert_eq!(msg.flags(), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(msg.sequence_number(), 5);
        // sizeof(struct inet_diag_req) is 60; the state mask follows the 48-byte socket id.
        let p = msg.payload();
        assert_eq!(p.len(), 60);
        assert_eq!(&p[52..56], &u32::MAX.to_ne_bytes());
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
}
