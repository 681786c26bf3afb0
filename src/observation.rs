//! What one observation of the node is made of: each map entry judged ([`Judged`]), the
//! observation as a whole ([`Observation`]), and the operator's [`Filter`] over entries.
//! Plain data, shared by the observing stage ([`crate::observe`]), the pure guards and the
//! report.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::holder::StaleHolders;
use crate::identity::HeldSocket;
use crate::key::{KeyError, RawKey, SockKey};
use crate::netns::NetnsId;
use crate::verdict::{is_proxy_key, judge_held, HeldView, Verdict};

/// One map entry with its decoding and verdict.
#[derive(Debug, Clone)]
pub struct Judged {
    pub raw: RawKey,
    /// The socket the entry holds, when identity is in use.
    pub held: Option<HeldSocket>,
    pub verdict: Verdict,
}

impl Judged {
    /// The decoded key. Decoded again on each call rather than stored: a full map has 65,535
    /// entries, and decoding 44 bytes costs less than keeping 72 more per entry.
    pub fn key(&self) -> Result<SockKey, KeyError> {
        SockKey::decode(&self.raw)
    }

    /// The held socket as the classifier weighs it.
    pub fn held_view(&self) -> Option<HeldView> {
        self.held.as_ref().map(HeldSocket::view)
    }
}

/// An entry judged by the socket it holds alone ([`judge_held`]): its decoded key, whether it
/// is an L7-proxy entry (its A side is one of `gateways`), and the verdict; `None` when the key
/// does not decode. The observation and the continuous pass judge each record read so.
pub fn judge_by_held(
    raw: &RawKey,
    held: &HeldView,
    gateways: &[IpAddr],
) -> Option<(SockKey, bool, Verdict)> {
    let key = SockKey::decode(raw).ok()?;
    let proxy = is_proxy_key(&key, gateways);
    let verdict = judge_held(&key, held, proxy);
    Some((key, proxy, verdict))
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
    /// Who keeps each stale entry's socket, once [`crate::holder::diagnose`] ran on an
    /// observation with stale entries.
    pub holders: Option<StaleHolders>,
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

    /// The entries judged stale.
    pub fn stale(&self) -> impl Iterator<Item = &Judged> {
        self.entries.iter().filter(|e| e.verdict.is_stale())
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

    /// Whether `entry` is one asked about; its key is decoded only when the filter needs it.
    pub fn selects(&self, entry: &Judged) -> bool {
        self.is_empty() || self.matches(&entry.key())
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
