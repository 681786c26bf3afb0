//! Cilium's 44-byte sockhash key (`struct sock_key`): decoding, encoding and hex parsing.
//!
//! Byte layout (packed): address A (16 bytes, IPv4 in the first 4), address B (16 bytes),
//! family `u8` (1 = IPv4, 2 = IPv6), three pad bytes, port A and port B each a `u32` whose
//! first two bytes hold the port big-endian.
//!
//! A socket is filed under the key its *peer* computes when sending, so for the socket an
//! entry holds, A:portA is its remote end and B:portB its local end.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Size of Cilium's `struct sock_key`.
pub const KEY_LEN: usize = 44;

const FAMILY_OFFSET: usize = 32;
const PORT_A_OFFSET: usize = 36;
const PORT_B_OFFSET: usize = 40;

/// Cilium's `ENDPOINT_KEY_IPV4` / `ENDPOINT_KEY_IPV6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    fn code(self) -> u8 {
        match self {
            Family::Ipv4 => 1,
            Family::Ipv6 => 2,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        })
    }
}

/// The raw bytes of one map key, exactly as the kernel holds them.
///
/// Deletion always uses these bytes, never a re-encoding of the decoded form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RawKey(pub [u8; KEY_LEN]);

impl RawKey {
    /// The 88 lowercase hex characters of the key.
    pub fn to_hex(&self) -> String {
        self.hex().as_str().to_owned()
    }

    /// The 88 lowercase hex characters of the key, on the stack: the JSON report writes one
    /// per entry.
    pub fn hex(&self) -> KeyHex {
        let mut out = [0u8; KEY_LEN * 2];
        for (pair, b) in out.chunks_exact_mut(2).zip(self.0) {
            pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
        }
        KeyHex(out)
    }

    /// The key as `bpftool map delete ... key hex` takes it: 44 space-separated bytes. Built
    /// by hand: reports print thousands of keys, and a `format!` per byte made that a hot spot.
    pub fn to_bpftool_hex(&self) -> String {
        let mut out = String::with_capacity(KEY_LEN * 3);
        for (i, pair) in self.hex().0.chunks_exact(2).enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.extend(pair.iter().copied().map(char::from));
        }
        out
    }
}

/// Each byte's two lowercase hex digits: one lookup per byte, not two per nibble.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut b = 0;
    while b < 256 {
        pairs[b] = [DIGITS[b >> 4], DIGITS[b & 0x0f]];
        b += 1;
    }
    pairs
};

/// A key's lowercase hex digits ([`RawKey::hex`]).
#[derive(Clone, Copy)]
pub struct KeyHex([u8; KEY_LEN * 2]);

impl KeyHex {
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written into it.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The digits as bytes (ASCII), for a writer.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for RawKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawKey({})", self.to_hex())
    }
}

impl TryFrom<&[u8]> for RawKey {
    type Error = KeyError;

    fn try_from(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| KeyError::Length { found: bytes.len() })?;
        Ok(RawKey(arr))
    }
}

/// Why a key cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a cilium_sock_ops key is {KEY_LEN} bytes, found {found}")]
    Length { found: usize },
    #[error("unknown address family {0} in byte 32 (Cilium uses 1 for IPv4, 2 for IPv6)")]
    Family(u8),
    #[error("non-zero padding in bytes {0}; this does not look like a Cilium sock_key")]
    Padding(&'static str),
    #[error("'{token}' is not a hex byte; give 44 bytes as bpftool prints them (`0a 0a 86 30 ...`) or one 88-character hex string")]
    Hex { token: String },
}

/// A decoded key: the two ends of the socket the entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub family: Family,
    /// The held socket's own local end (the key's B side, Cilium's C field `dip`/`dport`).
    pub local: SocketAddr,
    /// The held socket's remote end (the key's A side, Cilium's C field `sip`/`sport`).
    pub remote: SocketAddr,
}

impl SockKey {
    /// The key's A field (address and port) as bpftool lays it out first.
    pub fn a(&self) -> SocketAddr {
        self.remote
    }

    /// The key's B field.
    pub fn b(&self) -> SocketAddr {
        self.local
    }

    /// The key under which the peer of this connection is filed: the ends swapped.
    pub fn peer(&self) -> SockKey {
        SockKey {
            family: self.family,
            local: self.remote,
            remote: self.local,
        }
    }

    /// Builds the key for the socket with these own ends.
    ///
    /// Both addresses must be of one family; IPv4-mapped IPv6 addresses are kept as IPv6.
    pub fn for_socket(local: SocketAddr, remote: SocketAddr) -> Option<SockKey> {
        let family = match (local, remote) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => Family::Ipv4,
            (SocketAddr::V6(_), SocketAddr::V6(_)) => Family::Ipv6,
            _ => return None,
        };
        Some(SockKey {
            family,
            local,
            remote,
        })
    }

    pub fn decode(raw: &RawKey) -> Result<SockKey, KeyError> {
        let b = &raw.0;
        let family = match b[FAMILY_OFFSET] {
            1 => Family::Ipv4,
            2 => Family::Ipv6,
            other => return Err(KeyError::Family(other)),
        };
        if b[FAMILY_OFFSET + 1..PORT_A_OFFSET].iter().any(|&x| x != 0) {
            return Err(KeyError::Padding("33-35"));
        }
        if b[PORT_A_OFFSET + 2..PORT_B_OFFSET].iter().any(|&x| x != 0) {
            return Err(KeyError::Padding("38-39"));
        }
        if b[PORT_B_OFFSET + 2..KEY_LEN].iter().any(|&x| x != 0) {
            return Err(KeyError::Padding("42-43"));
        }
        let addr = |off: usize| -> Result<IpAddr, KeyError> {
            let field = &b[off..off + 16];
            match family {
                Family::Ipv4 => {
                    if field[4..].iter().any(|&x| x != 0) {
                        return Err(KeyError::Padding(if off == 0 { "4-15" } else { "20-31" }));
                    }
                    Ok(IpAddr::V4(Ipv4Addr::new(
                        field[0], field[1], field[2], field[3],
                    )))
                }
                Family::Ipv6 => {
                    let mut octets = [0u8; 16];
                    octets.copy_from_slice(field);
                    Ok(IpAddr::V6(Ipv6Addr::from(octets)))
                }
            }
        };
        let port = |off: usize| u16::from_be_bytes([b[off], b[off + 1]]);
        Ok(SockKey {
            family,
            remote: SocketAddr::new(addr(0)?, port(PORT_A_OFFSET)),
            local: SocketAddr::new(addr(16)?, port(PORT_B_OFFSET)),
        })
    }

    pub fn encode(&self) -> RawKey {
        let mut b = [0u8; KEY_LEN];
        let mut put = |off: usize, addr: &SocketAddr| {
            match addr.ip() {
                IpAddr::V4(ip) => b[off..off + 4].copy_from_slice(&ip.octets()),
                IpAddr::V6(ip) => b[off..off + 16].copy_from_slice(&ip.octets()),
            }
            let port_off = if off == 0 {
                PORT_A_OFFSET
            } else {
                PORT_B_OFFSET
            };
            b[port_off..port_off + 2].copy_from_slice(&addr.port().to_be_bytes());
        };
        put(0, &self.remote);
        put(16, &self.local);
        b[FAMILY_OFFSET] = self.family.code();
        RawKey(b)
    }
}

impl fmt::Display for SockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} local {} remote {}",
            self.family, self.local, self.remote
        )
    }
}

/// Parses a key as an operator pastes it: 44 hex bytes separated by white space (over any
/// number of lines, as `bpftool map dump` prints them, `0x` prefixes allowed), or one
/// 88-character hex string.
pub fn parse_hex(text: &str) -> Result<RawKey, KeyError> {
    RawKey::try_from(hex_bytes(text)?.as_slice())
}

/// Parses one key or several in a row (a paste of several keys): the bytes must be a
/// non-zero multiple of 44.
pub fn parse_hex_keys(text: &str) -> Result<Vec<RawKey>, KeyError> {
    let bytes = hex_bytes(text)?;
    if bytes.is_empty() || bytes.len() % KEY_LEN != 0 {
        return Err(KeyError::Length { found: bytes.len() });
    }
    bytes.chunks(KEY_LEN).map(RawKey::try_from).collect()
}

fn hex_bytes(text: &str) -> Result<Vec<u8>, KeyError> {
    let mut bytes = Vec::with_capacity(KEY_LEN);
    for token in text.split_whitespace() {
        let digits = token
            .strip_prefix("0x")
            .or_else(|| token.strip_prefix("0X"))
            .unwrap_or(token);
        if digits.is_empty() || digits.len() % 2 != 0 || !digits.is_ascii() {
            return Err(KeyError::Hex {
                token: token.to_string(),
            });
        }
        for pair in digits.as_bytes().chunks(2) {
            let s = std::str::from_utf8(pair).map_err(|_| KeyError::Hex {
                token: token.to_string(),
            })?;
            let byte = u8::from_str_radix(s, 16).map_err(|_| KeyError::Hex {
                token: token.to_string(),
            })?;
            bytes.push(byte);
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INCIDENT: &str = "0a 0a 86 30 00 00 00 00 00 00 00 00 00 00 00 00
                            0a 0a 65 f9 00 00 00 00 00 00 00 00 00 00 00 00
                            01 00 00 00 1f 90 00 00 db 78 00 00";

    #[test]
    fn incident_example_decodes_to_client_end() {
        let key = SockKey::decode(&parse_hex(INCIDENT).unwrap()).unwrap();
        assert_eq!(key.family, Family::Ipv4);
        assert_eq!(key.local, "10.10.101.249:56184".parse().unwrap());
        assert_eq!(key.remote, "10.10.134.48:8080".parse().unwrap());
        assert_eq!(key.a(), key.remote);
        assert_eq!(key.b(), key.local);
    }

    #[test]
    fn incident_twin_is_the_peer_key() {
        let key = SockKey::decode(&parse_hex(INCIDENT).unwrap()).unwrap();
        let twin = parse_hex(
            "0a0a65f9000000000000000000000000 0a0a8630000000000000000000000000 01000000db7800001f900000",
        )
        .unwrap();
        assert_eq!(key.peer().encode(), twin);
        assert_eq!(SockKey::decode(&twin).unwrap().local.port(), 8080);
    }

    #[test]
    fn one_string_and_spaced_forms_agree() {
        let spaced = parse_hex(INCIDENT).unwrap();
        let joined = parse_hex(&spaced.to_hex()).unwrap();
        assert_eq!(spaced, joined);
        assert_eq!(spaced.to_hex().len(), 88);
        assert_eq!(parse_hex(&spaced.to_bpftool_hex()).unwrap(), spaced);
        let prefixed: String = spaced.0.iter().map(|b| format!("0x{b:02x} ")).collect();
        assert_eq!(parse_hex(&prefixed).unwrap(), spaced);
    }

    #[test]
    fn several_keys_in_a_row() {
        let one = parse_hex(INCIDENT).unwrap();
        let twin = SockKey::decode(&one).unwrap().peer().encode();
        let text = format!("{}\n{}", one.to_bpftool_hex(), twin.to_hex());
        assert_eq!(parse_hex_keys(&text).unwrap(), vec![one, twin]);
        assert_eq!(parse_hex_keys(INCIDENT).unwrap(), vec![one]);
        assert_eq!(
            parse_hex_keys(&format!("{} 00", one.to_hex())),
            Err(KeyError::Length { found: 45 })
        );
        assert_eq!(parse_hex_keys(" \n"), Err(KeyError::Length { found: 0 }));
    }

    #[test]
    fn round_trip_ipv4_and_ipv6() {
        for (local, remote) in [
            ("10.0.0.1:1", "10.0.0.2:65535"),
            ("127.0.0.1:8080", "127.0.0.1:40000"),
            ("[fd00::1]:443", "[fd00::2]:50000"),
            ("[::ffff:10.0.0.1]:80", "[::1]:0"),
        ] {
            let key = SockKey::for_socket(local.parse().unwrap(), remote.parse().unwrap()).unwrap();
            let raw = key.encode();
            assert_eq!(SockKey::decode(&raw).unwrap(), key, "{local} {remote}");
        }
    }

    #[test]
    fn ipv6_layout() {
        let key = SockKey::for_socket(
            "[fd00::b]:8080".parse().unwrap(),
            "[fd00::a]:40000".parse().unwrap(),
        )
        .unwrap();
        let raw = key.encode();
        assert_eq!(raw.0[0], 0xfd);
        assert_eq!(raw.0[15], 0x0a);
        assert_eq!(raw.0[31], 0x0b);
        assert_eq!(raw.0[32], 2);
        assert_eq!(&raw.0[36..40], &[0x9c, 0x40, 0, 0]);
        assert_eq!(&raw.0[40..44], &[0x1f, 0x90, 0, 0]);
    }

    #[test]
    fn mixed_families_have_no_key() {
        assert!(
            SockKey::for_socket("10.0.0.1:1".parse().unwrap(), "[::1]:1".parse().unwrap())
                .is_none()
        );
    }

    #[test]
    fn malformed_input_is_a_typed_error() {
        assert_eq!(parse_hex("0a 0b"), Err(KeyError::Length { found: 2 }));
        assert_eq!(parse_hex(""), Err(KeyError::Length { found: 0 }));
        assert!(matches!(parse_hex("zz"), Err(KeyError::Hex { .. })));
        assert!(matches!(parse_hex("0a0"), Err(KeyError::Hex { .. })));
        assert!(matches!(parse_hex("0x"), Err(KeyError::Hex { .. })));
        assert!(matches!(parse_hex("éé"), Err(KeyError::Hex { .. })));
        let long = format!("{} 00", parse_hex(INCIDENT).unwrap().to_bpftool_hex());
        assert_eq!(parse_hex(&long), Err(KeyError::Length { found: 45 }));
        assert_eq!(
            RawKey::try_from(&[0u8; 43][..]),
            Err(KeyError::Length { found: 43 })
        );
    }

    #[test]
    fn unknown_family_and_padding_are_rejected() {
        let mut raw = parse_hex(INCIDENT).unwrap();
        raw.0[32] = 3;
        assert_eq!(SockKey::decode(&raw), Err(KeyError::Family(3)));
        raw.0[32] = 0;
        assert_eq!(SockKey::decode(&raw), Err(KeyError::Family(0)));
        for (index, field) in [
            (5, "4-15"),
            (20, "20-31"),
            (33, "33-35"),
            (39, "38-39"),
            (43, "42-43"),
        ] {
            let mut raw = parse_hex(INCIDENT).unwrap();
            raw.0[index] = 1;
            assert_eq!(
                SockKey::decode(&raw),
                Err(KeyError::Padding(field)),
                "byte {index}"
            );
        }
    }

    #[test]
    fn every_byte_pattern_decodes_or_errs_without_panic() {
        for family in 0..=255u8 {
            let mut raw = RawKey([0xff; KEY_LEN]);
            raw.0[32] = family;
            let _ = SockKey::decode(&raw);
        }
    }
}

/// Bad input never panics: arbitrary bytes and text through the decoder and the parser.
/// Failing cases are kept in `proptest-regressions/` and replayed first on every run.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn endpoint() -> impl Strategy<Value = (IpAddr, u16)> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
            any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
        ]
        .prop_flat_map(|ip| (Just(ip), any::<u16>()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(raw) = RawKey::try_from(bytes.as_slice()) {
                let _ = SockKey::decode(&raw);
            }
        }

        #[test]
        fn decoded_keys_encode_to_the_same_bytes(bytes in any::<[u8; KEY_LEN]>()) {
            let raw = RawKey(bytes);
            if let Ok(key) = SockKey::decode(&raw) {
                prop_assert_eq!(key.encode(), raw);
            }
        }

        #[test]
        fn every_key_round_trips(
            (local_ip, local_port) in endpoint(),
            (remote_ip, remote_port) in endpoint(),
        ) {
            let local = SocketAddr::new(local_ip, local_port);
            let remote = SocketAddr::new(remote_ip, remote_port);
            match SockKey::for_socket(local, remote) {
                Some(key) => {
                    let raw = key.encode();
                    prop_assert_eq!(SockKey::decode(&raw), Ok(key));
                    prop_assert_eq!(parse_hex(&raw.to_hex()), Ok(raw));
                    prop_assert_eq!(parse_hex(&raw.to_bpftool_hex()), Ok(raw));
                }
                None => prop_assert!(local.is_ipv4() != remote.is_ipv4()),
            }
        }

        #[test]
        fn parsers_never_panic(text in ".{0,300}") {
            let _ = parse_hex(&text);
            let _ = parse_hex_keys(&text);
        }

        #[test]
        fn hexish_text_never_panics(text in "[0-9a-fA-Fx \n\t]{0,300}") {
            let _ = parse_hex_keys(&text);
        }
    }
}
