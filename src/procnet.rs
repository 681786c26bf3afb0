//! Reads a namespace's TCP table from `/proc/PID/net/tcp{,6}`: the fallback for a process
//! whose namespace file cannot be opened (ptrace rules, an LSM), so it cannot be `setns`ed
//! into, yet its namespace's sockets must still be seen before anything is judged stale.
//!
//! The text tables carry no socket cookie and show request sockets as SYN_RECV, which only
//! ever makes a tuple look *more* alive.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use crate::socket::TcpState;

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
}

/// Reads `<dir>/net/tcp` and `<dir>/net/tcp6` (`dir` is `/proc/PID` or `/proc/PID/task/TID`).
/// A missing tcp6 table (IPv6 disabled) is no error.
pub fn read(dir: &Path) -> io::Result<Vec<ProcSocket>> {
    let mut out = parse(&fs::read_to_string(dir.join("net/tcp"))?);
    match fs::read_to_string(dir.join("net/tcp6")) {
        Ok(text) => out.extend(parse(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(out)
}

/// Parses a table; rows that do not parse are skipped (the header among them).
pub fn parse(text: &str) -> Vec<ProcSocket> {
    text.lines().filter_map(parse_row).collect()
}

fn parse_row(line: &str) -> Option<ProcSocket> {
    let mut fields = line.split_whitespace();
    fields.next()?.strip_suffix(':')?;
    let local = parse_endpoint(fields.next()?)?;
    let remote = parse_endpoint(fields.next()?)?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    Some(ProcSocket {
        local,
        remote,
        state: TcpState::from_kernel(state),
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:` port (IPv6); the kernel prints each 32-bit
/// word of the address in host byte order.
fn parse_endpoint(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::sa;

    // Rows as this machine's kernel prints them (x86_64, little-endian).
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1652 1 0000000000000000 100 0 0 10 0
   1: 0201000A:1F90 0101000A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 1653 1 0000000000000000 20 4 30 10 -1
   2: 0201000A:1F90 0101000A:9C41 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0050 00000000000000000000000001000000:C350 01 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 20 4 30 10 -1
   1: 0000000000000000FFFF00000201000A:1F90 0000000000000000FFFF00000101000A:9C42 01 00000000:00000000 00:00000000 00000000     0        0 98 1 0000000000000000 20 4 30 10 -1
";

    /// `table` parses into exactly the rows `want`: (local, remote, state).
    fn assert_rows(table: &str, want: &[(&str, &str, TcpState)]) {
        let got: Vec<_> = parse(table)
            .iter()
            .map(|r| (r.local, r.remote, r.state))
            .collect();
        let want: Vec<_> = want.iter().map(|&(l, r, s)| (sa(l), sa(r), s)).collect();
        assert_eq!(got, want);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_ipv4_rows() {
        assert_rows(
            TCP,
            &[
                ("127.0.0.1:8080", "0.0.0.0:0", TcpState::Listen),
                ("10.0.1.2:8080", "10.0.1.1:40000", TcpState::Established),
                ("10.0.1.2:8080", "10.0.1.1:40001", TcpState::TimeWait),
            ],
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_ipv6_rows_including_mapped() {
        assert_rows(
            TCP6,
            &[
                ("[::1]:80", "[::1]:50000", TcpState::Established),
                (
                    "[::ffff:10.0.1.2]:8080",
                    "[::ffff:10.0.1.1]:40002",
                    TcpState::Established,
                ),
            ],
        );
    }

    #[test]
    fn garbage_rows_are_skipped() {
        for line in [
            "",
            "0: 0100007F 00000000:0000 0A",
            "0: 0100007F:XYZ 00000000:0000 0A",
            "0: 0100:0050 00000000:0000 0A",
            "0: 0100007F:0050 00000000:0000 GG",
            "x 0100007F:0050 00000000:0000 0A",
        ] {
            assert!(parse(line).is_empty(), "{line:?}");
        }
    }

    #[test]
    fn reads_this_process_table() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let rows = read(Path::new("/proc/self")).expect("read /proc/self/net/tcp");
        assert!(rows
            .iter()
            .any(|r| r.local == sa(&format!("127.0.0.1:{port}")) && r.state == TcpState::Listen));
    }
}
