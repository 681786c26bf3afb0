//! The addresses on the calling thread's namespace's interfaces, from one `RTM_GETADDR` dump.
//!
//! getifaddrs(3) dumps every link too, with its statistics: most of its cost on a node with a
//! veth per pod. The daemon reads `cilium_host`'s addresses every pass and every second, and an
//! audit reads every namespace's own.

use std::collections::HashSet;
use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{NLMSG_DONE, NLMSG_ERROR};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::netlink::{self, NetlinkError};

const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
/// `struct ifaddrmsg`: family, prefix length, flags, scope, interface index.
const IFADDRMSG_LEN: usize = 8;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// Room for one dump datagram (the kernel fills at most a few pages per datagram).
const DATAGRAM: usize = 64 * 1024;

/// One address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub index: u32,
    pub ip: IpAddr,
}

/// Every address of every interface of the calling thread's namespace.
pub fn addresses() -> Result<Vec<InterfaceAddress>, NetlinkError> {
    let socket = netlink::open_protocol(NETLINK_ROUTE)?;
    socket.send(&request(1), 0).map_err(NetlinkError::Send)?;
    let mut buf = vec![0u8; DATAGRAM];
    let mut found = Vec::new();
    loop {
        let datagram = netlink::recv(&socket, &mut buf)?;
        for msg in netlink::messages(datagram) {
            let msg = msg?;
            match msg.message_type() {
                RTM_NEWADDR => found.extend(parse(msg.payload())),
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => match netlink::error_code(msg.payload())? {
                    0 => {}
                    code => {
                        return Err(NetlinkError::Malformed {
                            detail: format!(
                                "the kernel refused the address dump: {}",
                                std::io::Error::from_raw_os_error(code.saturating_neg())
                            ),
                        })
                    }
                },
                _ => {}
            }
        }
    }
}

/// The addresses on the interface called `name`; none when there is no such interface.
pub fn of_interface(name: &str) -> Result<Vec<IpAddr>, NetlinkError> {
    let Ok(name) = CString::new(name) else {
        return Ok(Vec::new());
    };
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Ok(Vec::new());
    }
    Ok(addresses()?
        .into_iter()
        .filter(|a| a.index == index)
        .map(|a| a.ip)
        .collect())
}

/// [`addresses`], the IPs alone.
pub fn ips() -> Result<HashSet<IpAddr>, NetlinkError> {
    Ok(addresses()?.into_iter().map(|a| a.ip).collect())
}

/// The dump request: `nlmsghdr` and a zeroed `ifaddrmsg` (every family, every interface).
fn request(seq: u32) -> Vec<u8> {
    let mut bytes = netlink::dump_header(RTM_GETADDR, IFADDRMSG_LEN, seq);
    bytes.extend_from_slice(&[0u8; IFADDRMSG_LEN]);
    bytes
}

/// One `RTM_NEWADDR` payload's address, as getifaddrs(3) gives it: an IPv4 interface's local
/// address (`IFA_LOCAL`; `IFA_ADDRESS` is the peer's on a point-to-point link), else
/// `IFA_ADDRESS`.
fn parse(payload: &[u8]) -> Option<InterfaceAddress> {
    let index = u32::from_ne_bytes(payload.get(4..8)?.try_into().ok()?);
    let (mut address, mut local) = (None, None);
    let mut rest = payload.get(IFADDRMSG_LEN..)?;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]);
        let data = rest.get(4..len)?;
        match kind {
            IFA_ADDRESS => address = ip(data),
            IFA_LOCAL => local = ip(data),
            _ => {}
        }
        rest = rest.get(len.div_ceil(4) * 4..).unwrap_or_default();
    }
    Some(InterfaceAddress {
        index,
        ip: local.or(address)?,
    })
}

fn ip(data: &[u8]) -> Option<IpAddr> {
    match data.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(data).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(data).ok()?))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(data);
        a.resize(a.len().div_ceil(4) * 4, 0);
        a
    }

    fn payload(index: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![2, 24, 0, 0];
        p.extend_from_slice(&index.to_ne_bytes());
        for a in attrs {
            p.extend_from_slice(a);
        }
        p
    }

    #[test]
    fn an_address_is_the_local_one_where_a_link_names_a_peer() {
        let cases = [
            // (attributes, expected)
            (vec![attr(IFA_ADDRESS, &[10, 0, 0, 1])], Some("10.0.0.1")),
            (
                vec![
                    attr(IFA_ADDRESS, &[10, 0, 0, 9]),
                    attr(IFA_LOCAL, &[10, 0, 0, 1]),
                ],
                Some("10.0.0.1"),
            ),
            (
                vec![
                    attr(IFA_ADDRESS, &Ipv6Addr::LOCALHOST.octets()),
                    attr(3, b"lo\0"),
                ],
                Some("::1"),
            ),
            (vec![attr(3, b"eth0\0")], None),
        ];
        for (attrs, want) in cases {
            let got = parse(&payload(7, &attrs));
            let want = want.map(|ip| InterfaceAddress {
                index: 7,
                ip: ip.parse().expect("ip"),
            });
            assert_eq!(got, want, "{attrs:?}");
        }
    }

    #[test]
    fn a_truncated_attribute_is_no_address() {
        let mut p = payload(7, &[attr(IFA_ADDRESS, &[10, 0, 0, 1])]);
        p.truncate(p.len() - 2);
        assert_eq!(parse(&p), None);
    }

    #[test]
    fn the_loopback_address_is_on_this_namespace() {
        let ips = ips().expect("address dump");
        assert!(ips.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{ips:?}");
        let lo = of_interface("lo").expect("lo's addresses");
        assert!(lo.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{lo:?}");
        assert!(of_interface("no-such-if0").expect("none").is_empty());
    }
}
