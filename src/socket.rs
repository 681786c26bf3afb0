//! The TCP sockets the inventory sees: the kernel's TCP states, a live socket as sock_diag
//! reports it, a connection tuple, and the one place an IPv4-mapped IPv6 end becomes IPv4.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::netns::NetnsId;

/// A TCP state with the kernel's numbering (`include/net/tcp_states.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    /// A request socket of a handshake in progress (what `ss` shows as SYN-RECV).
    NewSynRecv,
    /// Bound but neither listening nor connected (dumped since Linux 6.8).
    BoundInactive,
    /// A state this code does not know.
    Unknown(u8),
}

impl TcpState {
    pub fn from_kernel(code: u8) -> TcpState {
        match code {
            1 => TcpState::Established,
            2 => TcpState::SynSent,
            3 => TcpState::SynRecv,
            4 => TcpState::FinWait1,
            5 => TcpState::FinWait2,
            6 => TcpState::TimeWait,
            7 => TcpState::Close,
            8 => TcpState::CloseWait,
            9 => TcpState::LastAck,
            10 => TcpState::Listen,
            11 => TcpState::Closing,
            12 => TcpState::NewSynRecv,
            13 => TcpState::BoundInactive,
            other => TcpState::Unknown(other),
        }
    }

    /// The kernel's number for this state.
    pub fn code(self) -> u8 {
        match self {
            TcpState::Established => 1,
            TcpState::SynSent => 2,
            TcpState::SynRecv => 3,
            TcpState::FinWait1 => 4,
            TcpState::FinWait2 => 5,
            TcpState::TimeWait => 6,
            TcpState::Close => 7,
            TcpState::CloseWait => 8,
            TcpState::LastAck => 9,
            TcpState::Listen => 10,
            TcpState::Closing => 11,
            TcpState::NewSynRecv => 12,
            TcpState::BoundInactive => 13,
            TcpState::Unknown(code) => code,
        }
    }

    /// What the classifier cares about in this state.
    pub fn kind(self) -> crate::verdict::SocketKind {
        use crate::verdict::SocketKind;
        match self {
            TcpState::Established
            | TcpState::SynSent
            | TcpState::SynRecv
            | TcpState::FinWait1
            | TcpState::FinWait2
            | TcpState::CloseWait
            | TcpState::LastAck
            | TcpState::Closing => SocketKind::Connection,
            TcpState::TimeWait => SocketKind::TimeWait,
            TcpState::NewSynRecv => SocketKind::SynRequest,
            TcpState::Close | TcpState::Listen | TcpState::BoundInactive | TcpState::Unknown(_) => {
                SocketKind::Other
            }
        }
    }
}

/// One TCP socket as sock_diag reports it.
///
/// Addresses are as the kernel gives them: an IPv4 connection on a dual-stack `AF_INET6`
/// socket (e.g. accepted by a `[::]` listener) appears with family IPv6 and IPv4-mapped
/// addresses, `[::ffff:10.0.0.1]:8080`. Cilium files such a connection under an IPv4 key, so
/// compare through [`LiveSocket::ipv4_unmapped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LiveSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    /// The socket cookie (`idiag_cookie`), what `bpf_get_socket_cookie` returns.
    pub cookie: u64,
    /// The socket's inode; `None` for sockets without a file (TIME_WAIT, NEW_SYN_RECV,
    /// orphaned).
    pub inode: Option<u32>,
    pub netns: NetnsId,
}

impl LiveSocket {
    /// Whether both ends are IPv4-mapped IPv6 addresses (an IPv4 connection on an `AF_INET6`
    /// socket).
    pub fn is_ipv4_mapped(&self) -> bool {
        is_mapped(self.local) && is_mapped(self.remote)
    }

    /// This socket with IPv4-mapped ends turned into plain IPv4 ones, so it matches IPv4 keys.
    /// Unchanged unless both ends are mapped (a `[::]` listener stays IPv6).
    pub fn ipv4_unmapped(&self) -> LiveSocket {
        if self.is_ipv4_mapped() {
            LiveSocket {
                local: unmap(self.local),
                remote: unmap(self.remote),
                ..*self
            }
        } else {
            *self
        }
    }

    /// The classifier's view of this socket.
    pub fn seen(&self) -> crate::verdict::SeenSocket {
        crate::verdict::SeenSocket {
            local: self.local,
            remote: self.remote,
            kind: self.state.kind(),
            cookie: Some(self.cookie),
        }
    }
}

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

/// An IPv4 connection on a dual-stack socket shows as `[::ffff:a.b.c.d]:port`; Cilium's IPv4
/// keys hold `a.b.c.d:port`. Every comparison of a socket's end with a key's goes through here;
/// any other address is returned as it is.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// A BPF record's ends, as the programs copy them: IPv4 addresses in the first 4 of 16
/// bytes, ports in host order. `None` for a family other than AF_INET and AF_INET6.
pub fn record_ends(
    family: u16,
    local: ([u8; 16], u16),
    remote: ([u8; 16], u16),
) -> Option<(SocketAddr, SocketAddr)> {
    let ip = |a: [u8; 16]| match i32::from(family) {
        libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
        libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(a))),
        _ => None,
    };
    Some((
        SocketAddr::new(ip(local.0)?, local.1),
        SocketAddr::new(ip(remote.0)?, remote.1),
    ))
}

/// A socket address written in a test.
#[cfg(test)]
pub(crate) fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn is_mapped(addr: SocketAddr) -> bool {
    matches!(addr, SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETNS: NetnsId = NetnsId {
        dev: 4,
        inode: 4026531840,
    };

    #[test]
    fn tcp_state_numbering_round_trips() {
        let expected = [
            (1, TcpState::Established),
            (2, TcpState::SynSent),
            (3, TcpState::SynRecv),
            (4, TcpState::FinWait1),
            (5, TcpState::FinWait2),
            (6, TcpState::TimeWait),
            (7, TcpState::Close),
            (8, TcpState::CloseWait),
            (9, TcpState::LastAck),
            (10, TcpState::Listen),
            (11, TcpState::Closing),
            (12, TcpState::NewSynRecv),
            (13, TcpState::BoundInactive),
        ];
        for (code, state) in expected {
            assert_eq!(TcpState::from_kernel(code), state);
            assert_eq!(state.code(), code);
        }
        for code in 0..=255u8 {
            assert_eq!(TcpState::from_kernel(code).code(), code);
        }
        assert_eq!(TcpState::from_kernel(0), TcpState::Unknown(0));
        assert_eq!(
            netlink_packet_sock_diag::TCP_LISTEN,
            TcpState::Listen.code(),
            "agrees with the crate's constants"
        );
    }

    #[test]
    fn ipv4_mapped_sockets_unmap() {
        let s = LiveSocket {
            local: "[::ffff:10.0.0.1]:8080".parse().unwrap(),
            remote: "[::ffff:10.0.0.2]:40000".parse().unwrap(),
            state: TcpState::Established,
            cookie: 9,
            inode: Some(1),
            netns: NETNS,
        };
        assert!(s.is_ipv4_mapped());
        let u = s.ipv4_unmapped();
        assert_eq!(u.local, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(u.remote, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(
            (u.cookie, u.state, u.netns),
            (9, TcpState::Established, NETNS)
        );

        let listener = LiveSocket {
            local: "[::]:80".parse().unwrap(),
            remote: "[::]:0".parse().unwrap(),
            ..s
        };
        assert!(!listener.is_ipv4_mapped());
        assert_eq!(listener.ipv4_unmapped(), listener);
        let v6 = LiveSocket {
            local: "[fd00::1]:80".parse().unwrap(),
            remote: "[::ffff:10.0.0.2]:1".parse().unwrap(),
            ..s
        };
        assert_eq!(v6.ipv4_unmapped(), v6);
        let plain = LiveSocket {
            local: "10.0.0.1:1".parse().unwrap(),
            remote: "10.0.0.2:2".parse().unwrap(),
            ..s
        };
        assert_eq!(plain.ipv4_unmapped(), plain);
    }
}
