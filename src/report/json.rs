//! The audit as JSON for scripts: each entry with its socket and holder, the inventory,
//! the summary and "stale by holder".

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};

use serde::ser::SerializeStruct;
use serde::Serialize;

use super::{select, warm, write_rows, MapSource, Row, Selection, Summary, ROWS_PER_CHUNK};
use crate::holder::{
    Classified, Diagnosis, Holder, HolderClass, HolderProcess, HolderSummary, ScanInfo, ScanMethod,
    UnknownHolder,
};
use crate::identity::HeldSocket;
use crate::key::Family;
use crate::observation::{Filter, Observation};
use crate::socket::TcpState;
use crate::verdict::Verdict;

/// A row as one entry of the JSON, serialized straight from the judged entry: a full map
/// writes 65,535 of them, and a String per field made that a third of the audit. Its
/// fields, in order:
///
/// - `key`: the raw 44 bytes as 88 lowercase hex characters;
/// - `family`, `local`, `remote`: the decoded key (`null` when it does not decode);
/// - `verdict`, `reason`, `reason_code`;
/// - `socket`: the socket the entry holds, when identity is on ([`JsonSocket`]);
/// - `holder`: who keeps the socket of a stale entry ([`JsonHolder`]).
impl Serialize for Row<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.entry;
        let key = e.key().ok();
        let mut s = serializer.serialize_struct("JsonEntry", 9)?;
        s.serialize_field("key", e.raw.hex().as_str())?;
        s.serialize_field("family", &key.map(|k| k.family))?;
        s.serialize_field("local", &key.map(|k| Addr(k.local)))?;
        s.serialize_field("remote", &key.map(|k| Addr(k.remote)))?;
        s.serialize_field("verdict", e.verdict.label())?;
        s.serialize_field("reason", &Displayed(&e.verdict))?;
        s.serialize_field("reason_code", e.verdict.reason_code())?;
        match &e.held {
            Some(h) => s.serialize_field("socket", &JsonSocket(h))?,
            None => s.skip_field("socket")?,
        }
        match self.holder {
            Some(d) => s.serialize_field("holder", &JsonHolder::of(d))?,
            None => s.skip_field("holder")?,
        }
        s.end()
    }
}

/// An address as serde writes one (its `Display` text), an IPv4 one's digits written
/// straight into a buffer: a full map's report has four addresses per entry, and formatting
/// them through `core::fmt` was a tenth of the audit.
struct Addr(SocketAddr);

impl Serialize for Addr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let SocketAddr::V4(v4) = self.0 else {
            return self.0.serialize(serializer);
        };
        let (text, len) = v4_quoted(v4);
        // Only ASCII digits and separators were written.
        serializer.serialize_str(std::str::from_utf8(&text[1..len - 1]).unwrap_or_default())
    }
}

/// The longest IPv4 address with its port, quoted: "\"255.255.255.255:65535\"".
const V4_QUOTED: usize = 23;

/// `"a.b.c.d:port"`, quotes included, and its length.
fn v4_quoted(v4: SocketAddrV4) -> ([u8; V4_QUOTED], usize) {
    let mut text = [0u8; V4_QUOTED];
    text[0] = b'"';
    let mut len = 1;
    for (octet, sep) in v4.ip().octets().into_iter().zip(*b"...:") {
        let (digits, n) = OCTETS[usize::from(octet)];
        // All three bytes are copied, only the digits counted: the next write covers the rest.
        text[len..len + 3].copy_from_slice(&digits);
        len += usize::from(n);
        text[len] = sep;
        len += 1;
    }
    let mut port = itoa::Buffer::new();
    let port = port.format(v4.port()).as_bytes();
    text[len..len + port.len()].copy_from_slice(port);
    len += port.len();
    text[len] = b'"';
    (text, len + 1)
}

/// Each octet's decimal digits and how many there are: one lookup per octet.
const OCTETS: [([u8; 3], u8); 256] = {
    let mut table = [([0u8; 3], 0u8); 256];
    let mut n = 0;
    while n < 256 {
        // `n` < 256, so each digit fits a u8.
        let (hundreds, tens, ones) = ((n / 100) as u8, (n / 10 % 10) as u8, (n % 10) as u8);
        table[n] = if n >= 100 {
            ([b'0' + hundreds, b'0' + tens, b'0' + ones], 3)
        } else if n >= 10 {
            ([b'0' + tens, b'0' + ones, 0], 2)
        } else {
            ([b'0' + ones, 0, 0], 1)
        };
        n += 1;
    }
    table
};

/// A value written as its `Display` text, as a JSON string, with no String in between.
struct Displayed<T>(T);

impl<T: fmt::Display> Serialize for Displayed<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// A stale entry's holder class, why, and the processes holding its socket.
#[derive(Debug, Serialize)]
pub struct JsonHolder {
    pub class: HolderClass,
    /// Why the holder is not known, for `holder-unknown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<UnknownHolder>,
    /// The fact and the fix.
    pub reason: String,
    pub holders: Vec<Holder>,
}

impl JsonHolder {
    pub fn of(d: &Diagnosis) -> JsonHolder {
        JsonHolder {
            class: d.class(),
            unknown: d.classified.unknown,
            reason: d.classified.reason(),
            holders: d.holders.clone(),
        }
    }
}

/// The socket an entry holds, as JSON. Its fields, in order: `cookie`; `local` and `remote`,
/// the held socket's own ends; `state`; `netns_inode`; `inode`, the inode of the file that
/// refers to the socket (`ls -l /proc/PID/fd` shows `socket:[INODE]`), 0 when none does;
/// `orphaned` (`SOCK_DEAD`: its application closed it); `error`, its pending error
/// (`sk_err`, e.g. `ECONNRESET`), absent when none.
#[derive(Debug, Clone, Copy)]
pub struct JsonSocket<'a>(pub &'a HeldSocket);

impl Serialize for JsonSocket<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let h = self.0;
        let mut s = serializer.serialize_struct("JsonSocket", 8)?;
        s.serialize_field("cookie", &h.cookie)?;
        s.serialize_field("local", &Addr(h.local))?;
        s.serialize_field("remote", &Addr(h.remote))?;
        s.serialize_field("state", &h.state)?;
        s.serialize_field("netns_inode", &h.netns_inode)?;
        s.serialize_field("inode", &h.inode)?;
        s.serialize_field("orphaned", &h.orphaned)?;
        if h.error != 0 {
            s.serialize_field("error", &Displayed(ErrnoName(h.error)))?;
        } else {
            s.skip_field("error")?;
        }
        s.end()
    }
}

/// `ECONNRESET` for 104: the kernel's name of an errno.
struct ErrnoName(i32);

impl fmt::Display for ErrnoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", nix::errno::Errno::from_raw(self.0))
    }
}

#[derive(Debug, Serialize)]
pub struct JsonInventory {
    /// Whether the socket behind each entry was read (the sockmap iterator).
    pub identity: bool,
    pub namespaces_read: usize,
    pub namespaces_vanished: usize,
    pub procfs_tables: usize,
    pub sockets: usize,
    /// With identity: the tuples looked up exactly instead of dumping every namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub looked_up: Option<usize>,
    pub complete: bool,
    pub unreadable: Vec<JsonUnreadable>,
}

#[derive(Debug, Serialize)]
pub struct JsonUnreadable {
    pub namespace: String,
    pub error: String,
}

impl JsonInventory {
    pub fn of(o: &Observation) -> JsonInventory {
        JsonInventory {
            identity: o.identity,
            namespaces_read: o.namespaces_read,
            namespaces_vanished: o.namespaces_vanished,
            procfs_tables: o.procfs_tables,
            sockets: o.sockets,
            looked_up: o.lookups.map(|l| l.asked),
            complete: o.is_complete(),
            unreadable: o
                .unreadable
                .iter()
                .map(|u| JsonUnreadable {
                    namespace: u.what.clone(),
                    error: u.error.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AuditJson<'a> {
    pub map: MapSource,
    pub inventory: JsonInventory,
    pub entries: JsonEntries<'a>,
    pub summary: Summary,
    /// The selected stale entries counted by holder, once the holder pass ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_by_holder: Option<JsonStaleByHolder>,
}

/// "Stale by holder" for scripts.
#[derive(Debug, Serialize)]
pub struct JsonStaleByHolder {
    /// Stale entries per holder class.
    pub by_class: BTreeMap<&'static str, usize>,
    pub top_processes: Vec<JsonHolderCount>,
    pub top_pods: Vec<JsonPodCount>,
    /// How the holders were searched; absent when no stale socket had a file to look for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<JsonHolderSearch>,
}

#[derive(Debug, Serialize)]
pub struct JsonHolderCount {
    #[serde(flatten)]
    pub process: HolderProcess,
    pub entries: usize,
}

#[derive(Debug, Serialize)]
pub struct JsonPodCount {
    pub pod_uid: String,
    pub entries: usize,
}

#[derive(Debug, Serialize)]
pub struct JsonHolderSearch {
    pub method: ScanMethod,
    /// Whether every process was looked at.
    pub complete: bool,
    pub notes: Vec<String>,
    pub ms: u128,
}

impl JsonStaleByHolder {
    pub fn of(s: HolderSummary, search: Option<&ScanInfo>) -> JsonStaleByHolder {
        JsonStaleByHolder {
            by_class: s.by_class.iter().map(|(c, n)| (c.as_str(), *n)).collect(),
            top_processes: s
                .top_processes
                .into_iter()
                .map(|(process, entries)| JsonHolderCount { process, entries })
                .collect(),
            top_pods: s
                .top_pods
                .into_iter()
                .map(|(pod_uid, entries)| JsonPodCount { pod_uid, entries })
                .collect(),
            search: search.map(|i| JsonHolderSearch {
                method: i.method,
                complete: i.complete,
                notes: i.notes.clone(),
                ms: i.took.as_millis(),
            }),
        }
    }
}

/// The selected rows, each serialized only as it is written: a full map's entries as JSON
/// values would take several times the memory of the entries.
#[derive(Debug)]
pub struct JsonEntries<'a>(Vec<Row<'a>>);

impl JsonEntries<'_> {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for JsonEntries<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(&self.0)
    }
}

pub fn audit_json<'a>(source: &MapSource, o: &'a Observation, filter: &Filter) -> AuditJson<'a> {
    let Selection {
        rows,
        summary,
        by_holder,
    } = select(o, filter);
    let search = o.holders.as_ref().and_then(|h| h.scan.as_ref());
    AuditJson {
        map: source.clone(),
        inventory: JsonInventory::of(o),
        summary,
        stale_by_holder: by_holder.map(|s| JsonStaleByHolder::of(s, search)),
        entries: JsonEntries(rows),
    }
}

/// Writes [`audit_json`] as `serde_json::to_writer_pretty` writes it (the tests hold the two
/// byte for byte equal), the entries written directly: a full map is 65,535 of them, and
/// serde's call per field and escape scan per string byte were most of the audit's time.
/// Only text that may need escaping (reasons, holders) still goes through serde_json.
pub fn write_audit_json<W: io::Write + ?Sized>(
    out: &mut W,
    source: &MapSource,
    o: &Observation,
    filter: &Filter,
) -> io::Result<()> {
    write_audit_json_chunked(out, source, o, filter, ROWS_PER_CHUNK)
}

/// [`write_audit_json`], the entries written `per_chunk` at a time ([`write_rows`]).
fn write_audit_json_chunked<W: io::Write + ?Sized>(
    out: &mut W,
    source: &MapSource,
    o: &Observation,
    filter: &Filter,
    per_chunk: usize,
) -> io::Result<()> {
    let json = audit_json(source, o, filter);
    out.write_all(b"{\n  \"map\": ")?;
    write_nested(out, &json.map, 1)?;
    out.write_all(b",\n  \"inventory\": ")?;
    write_nested(out, &json.inventory, 1)?;
    out.write_all(b",\n  \"entries\": [")?;
    write_rows(out, &json.entries.0, per_chunk, |out, first, rows| {
        warm(rows);
        // Each chunk keeps its own: they are written apart.
        let mut repeated = Repeated::default();
        for (i, row) in rows.iter().enumerate() {
            out.extend_from_slice(if first + i == 0 {
                b"\n    "
            } else {
                b",\n    "
            });
            write_entry(out, row, &mut repeated)?;
        }
        Ok(())
    })?;
    out.write_all(if json.entries.is_empty() {
        b"]"
    } else {
        b"\n  ]"
    })?;
    out.write_all(b",\n  \"summary\": ")?;
    write_nested(out, &json.summary, 1)?;
    if let Some(by_holder) = &json.stale_by_holder {
        out.write_all(b",\n  \"stale_by_holder\": ")?;
        write_nested(out, by_holder, 1)?;
    }
    out.write_all(b"\n}")
}

/// `value` as serde_json pretty-prints it `depth` levels deep (two spaces a level). Pretty
/// JSON has no line break inside a string (one is written `\n`): each is layout.
fn write_nested<W: io::Write + ?Sized, T: Serialize>(
    out: &mut W,
    value: &T,
    depth: usize,
) -> io::Result<()> {
    write_nested_with(out, value, depth, &mut Vec::new())
}

/// [`write_nested`] through `scratch`, a buffer kept between calls.
fn write_nested_with<W: io::Write + ?Sized, T: Serialize>(
    out: &mut W,
    value: &T,
    depth: usize,
    scratch: &mut Vec<u8>,
) -> io::Result<()> {
    scratch.clear();
    serde_json::to_writer_pretty(&mut *scratch, value)?;
    for (i, line) in scratch.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.write_all(b"\n")?;
            out.write_all(&INDENT[..2 * depth])?;
        }
        out.write_all(line)?;
    }
    Ok(())
}

const INDENT: &[u8; 16] = b"                ";

/// What consecutive rows share, written once and kept: a full map's ~58,000 live rows have
/// one reason, and each stale row of a holder class the same class, fact and fix; through
/// `core::fmt` and serde_json's escaping, that text was a third of the rows' cost.
#[derive(Default)]
struct Repeated<'a> {
    family: Last<Family>,
    reason: Last<&'a Verdict>,
    state: Last<TcpState>,
    /// A stale entry's `holder` object up to its `holders` list, by holder class.
    holder_head: Last<Classified>,
    scratch: Vec<u8>,
}

/// The JSON text of the last value asked for, written again only for another value.
struct Last<T> {
    of: Option<T>,
    json: Vec<u8>,
}

impl<T> Default for Last<T> {
    fn default() -> Last<T> {
        Last {
            of: None,
            json: Vec::new(),
        }
    }
}

impl<T: Copy + PartialEq> Last<T> {
    fn json(
        &mut self,
        value: T,
        write: impl FnOnce(&mut Vec<u8>, T) -> serde_json::Result<()>,
    ) -> io::Result<&[u8]> {
        if self.of != Some(value) {
            self.json.clear();
            write(&mut self.json, value)?;
            self.of = Some(value);
        }
        Ok(&self.json)
    }

    /// `value` as serde_json writes it.
    fn serialized(&mut self, value: T) -> io::Result<&[u8]>
    where
        T: Serialize,
    {
        self.json(value, |out, v| serde_json::to_writer(out, &v))
    }
}

/// `{`, `class`, `unknown`, `reason` and the `holders` field's name, as [`JsonHolder`] is
/// written three levels deep.
fn write_holder_head(head: &mut Vec<u8>, classified: Classified) -> serde_json::Result<()> {
    head.extend_from_slice(b"{\n        \"class\": ");
    serde_json::to_writer(&mut *head, &classified.class)?;
    if let Some(unknown) = classified.unknown {
        head.extend_from_slice(b",\n        \"unknown\": ");
        serde_json::to_writer(&mut *head, &unknown)?;
    }
    head.extend_from_slice(b",\n        \"reason\": ");
    serde_json::to_writer(&mut *head, &classified.reason())?;
    head.extend_from_slice(b",\n        \"holders\": ");
    Ok(())
}

/// One [`Row`] two levels deep, as serde_json pretty-prints it.
fn write_entry<'a, W: io::Write + ?Sized>(
    out: &mut W,
    row: &Row<'a>,
    repeated: &mut Repeated<'a>,
) -> io::Result<()> {
    let e = row.entry;
    let key = e.key().ok();
    out.write_all(b"{\n      \"key\": \"")?;
    out.write_all(e.raw.hex().as_bytes())?;
    out.write_all(b"\",\n      \"family\": ")?;
    match key {
        Some(k) => out.write_all(repeated.family.serialized(k.family)?)?,
        None => out.write_all(b"null")?,
    }
    out.write_all(b",\n      \"local\": ")?;
    write_addr(out, key.map(|k| k.local))?;
    out.write_all(b",\n      \"remote\": ")?;
    write_addr(out, key.map(|k| k.remote))?;
    out.write_all(b",\n      \"verdict\": \"")?;
    out.write_all(e.verdict.label().as_bytes())?;
    out.write_all(b"\",\n      \"reason\": ")?;
    out.write_all(repeated.reason.json(&e.verdict, |out, v| {
        serde_json::to_writer(out, &Displayed(v))
    })?)?;
    out.write_all(b",\n      \"reason_code\": \"")?;
    out.write_all(e.verdict.reason_code().as_bytes())?;
    out.write_all(b"\"")?;
    if let Some(h) = &e.held {
        let mut digits = itoa::Buffer::new();
        out.write_all(b",\n      \"socket\": {\n        \"cookie\": ")?;
        out.write_all(digits.format(h.cookie).as_bytes())?;
        out.write_all(b",\n        \"local\": ")?;
        write_addr(out, Some(h.local))?;
        out.write_all(b",\n        \"remote\": ")?;
        write_addr(out, Some(h.remote))?;
        out.write_all(b",\n        \"state\": ")?;
        out.write_all(repeated.state.serialized(h.state)?)?;
        out.write_all(b",\n        \"netns_inode\": ")?;
        out.write_all(digits.format(h.netns_inode).as_bytes())?;
        out.write_all(b",\n        \"inode\": ")?;
        out.write_all(digits.format(h.inode).as_bytes())?;
        out.write_all(if h.orphaned {
            b",\n        \"orphaned\": true" as &[u8]
        } else {
            b",\n        \"orphaned\": false"
        })?;
        if h.error != 0 {
            out.write_all(b",\n        \"error\": ")?;
            serde_json::to_writer(&mut *out, &Displayed(ErrnoName(h.error)))?;
        }
        out.write_all(b"\n      }")?;
    }
    if let Some(d) = row.holder {
        out.write_all(b",\n      \"holder\": ")?;
        out.write_all(repeated.holder_head.json(d.classified, write_holder_head)?)?;
        if d.holders.is_empty() {
            out.write_all(b"[]")?;
        } else {
            for (i, h) in d.holders.iter().enumerate() {
                out.write_all(if i == 0 {
                    b"[\n          "
                } else {
                    b",\n          "
                })?;
                write_nested_with(out, h, 5, &mut repeated.scratch)?;
            }
            out.write_all(b"\n        ]")?;
        }
        out.write_all(b"\n      }")?;
    }
    out.write_all(b"\n    }")
}

/// An address as [`Addr`] serializes it, or `null`. An IPv4 one's text has nothing to escape.
fn write_addr<W: io::Write + ?Sized>(out: &mut W, addr: Option<SocketAddr>) -> io::Result<()> {
    match addr {
        Some(SocketAddr::V4(v4)) => {
            let (text, len) = v4_quoted(v4);
            out.write_all(&text[..len])
        }
        Some(a) => serde_json::to_writer(&mut *out, &Addr(a)).map_err(io::Error::from),
        None => out.write_all(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::Judged;
    use crate::report::fixtures::{diagnosed, observation, source};
    use crate::verdict::{StaleReason, Verdict};

    /// The audit's JSON, written directly, is serde_json's pretty print of [`audit_json`] to
    /// the byte: with and without holders and sockets, every kind of verdict and address, an
    /// undecodable key, and with no entry selected.
    #[test]
    fn the_written_audit_is_serde_json_s_pretty_print_byte_for_byte() {
        let sa = |s: &str| s.parse::<SocketAddr>().expect("address");
        let held = |local: &str, remote: &str, state, orphaned, error| HeldSocket {
            cookie: 18_446_744_073_709_551_615,
            local: sa(local),
            remote: sa(remote),
            state,
            netns_inode: 4026531840,
            inode: 0,
            orphaned,
            error,
        };
        use crate::socket::TcpState;
        use crate::verdict::{LiveReason, StaleReason, UnknownReason};
        let mut with_sockets = diagnosed();
        with_sockets.identity = true;
        with_sockets.entries[0].held = Some(held(
            "127.0.0.1:33339",
            "127.0.0.1:53526",
            TcpState::Established,
            false,
            0,
        ));
        with_sockets.entries[1].held = Some(held(
            "[::ffff:10.0.2.2]:8080",
            "10.0.1.1:40001",
            TcpState::Close,
            true,
            libc::ECONNRESET,
        ));
        with_sockets.entries[2].held = Some(held(
            "10.0.1.1:40002",
            "10.0.1.2:8080",
            TcpState::Established,
            false,
            0,
        ));
        with_sockets.entries[2].verdict = Verdict::Live(LiveReason::HeldIsOwner);
        with_sockets.entries[3].held = Some(held(
            "[fe80::2%3]:80",
            "[fd00::1]:5000",
            TcpState::FinWait1,
            false,
            libc::EPIPE,
        ));
        with_sockets.entries[3].verdict = Verdict::Stale(StaleReason::HeldClosed);
        with_sockets.entries[4].verdict = Verdict::Unknown(UnknownReason::NotJudged);
        // Holders kept between rows must not leak into the next: one entry held by two
        // processes, the next of another class, with why it is unknown.
        let holders = &mut with_sockets.holders.as_mut().expect("diagnosed").diagnosed;
        let [first, _, third] = &mut holders[..] else {
            panic!("three stale entries");
        };
        assert_eq!((first.0, third.0), (0, 3), "entries 0 and 3 are stale");
        first.1.holders.push(crate::holder::Holder {
            pid: 1,
            fd: 3,
            comm: "init \"x\"".into(),
            cgroup: None,
            pod: None,
        });
        third.1.classified = Classified {
            class: crate::holder::HolderClass::HolderUnknown,
            unknown: Some(crate::holder::UnknownHolder::SearchIncomplete),
        };
        with_sockets
            .unreadable
            .push(crate::observation::Unreadable {
                what: "pid 42 \"quoted\"".into(),
                error: "permission denied".into(),
            });
        let none = Filter {
            local: Some("192.0.2.1".parse().expect("ip")),
            remote: None,
        };
        for (o, filter) in [
            (observation(), Filter::default()),
            (diagnosed(), Filter::default()),
            (with_sockets.clone(), Filter::default()),
            (with_sockets, none.clone()),
            (observation(), none),
        ] {
            let want = serde_json::to_string_pretty(&audit_json(&source(), &o, &filter))
                .expect("serialises");
            // In one chunk, and in chunks of one to three rows written on two threads.
            for per_chunk in [ROWS_PER_CHUNK, 1, 2, 3] {
                let mut got = Vec::new();
                write_audit_json_chunked(&mut got, &source(), &o, &filter, per_chunk)
                    .expect("writes");
                assert_eq!(String::from_utf8(got).expect("utf-8"), want, "{per_chunk}");
            }
        }
    }

    #[test]
    fn addresses_are_written_as_serde_writes_them() {
        for text in [
            "0.0.0.0:0",
            "1.2.3.4:5",
            "10.0.1.2:8080",
            "99.100.199.200:10000",
            "255.255.255.255:65535",
            "[::1]:80",
            "[::ffff:10.0.1.2]:8080",
            "[fe80::1%2]:443",
        ] {
            let addr: SocketAddr = text.parse().expect("address");
            assert_eq!(
                serde_json::to_string(&Addr(addr)).expect("serialises"),
                serde_json::to_string(&addr).expect("serialises"),
                "{text}"
            );
        }
    }

    /// An entry is written field by field, not derived: its fields, their order and their
    /// text, as scripts read them.
    #[test]
    fn an_entry_with_its_socket_is_written_in_the_contract_s_order() {
        let sa = |s: &str| s.parse::<std::net::SocketAddr>().expect("address");
        let key = crate::key::SockKey::for_socket(sa("10.0.1.2:8080"), sa("10.0.1.1:40000"))
            .expect("family");
        let entry = Judged {
            raw: key.encode(),
            held: Some(HeldSocket {
                cookie: 42,
                local: sa("[::ffff:10.0.1.2]:8080"),
                remote: sa("10.0.1.1:40000"),
                state: crate::socket::TcpState::Close,
                netns_inode: 4026531840,
                inode: 77,
                orphaned: false,
                error: libc::ECONNRESET,
            }),
            verdict: Verdict::Stale(StaleReason::HeldClosed),
        };
        let json = serde_json::to_string(&Row {
            entry: &entry,
            holder: None,
        })
        .expect("serialises");
        let expected = format!(
            concat!(
                r#"{{"key":"{}","family":"ipv4","local":"10.0.1.2:8080","remote":"10.0.1.1:40000","#,
                r#""verdict":"stale","reason":"{}","reason_code":"held-closed","#,
                r#""socket":{{"cookie":42,"local":"[::ffff:10.0.1.2]:8080","remote":"10.0.1.1:40000","#,
                r#""state":"CLOSE","netns_inode":4026531840,"inode":77,"orphaned":false,"error":"ECONNRESET"}}}}"#
            ),
            entry.raw.to_hex(),
            entry.verdict
        );
        assert_eq!(json, expected);
    }

    #[test]
    fn json_follows_the_contract() {
        let o = observation();
        let v = serde_json::to_value(audit_json(&source(), &o, &Filter::default()))
            .expect("serialises");
        let entries = v["entries"].as_array().expect("entries");
        assert_eq!(entries.len(), 5);
        for e in entries {
            let key = e["key"].as_str().expect("key");
            assert_eq!(key.len(), 88);
            assert!(key
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
            assert!(["live", "stale", "unknown"].contains(&e["verdict"].as_str().expect("v")));
            assert!(e["reason"].is_string());
        }
        assert_eq!(entries[0]["verdict"], "stale");
        let v6 = entries
            .iter()
            .find(|e| e["family"] == "ipv6")
            .expect("ipv6 entry");
        assert_eq!(v6["local"], "[fd00::2]:80");
        assert_eq!(v["summary"]["stale"], 3);
        assert_eq!(v["summary"]["entries"], 5);
        assert_eq!(v["inventory"]["complete"], true);
        let bad = entries
            .iter()
            .find(|e| e["verdict"] == "unknown")
            .expect("bad");
        assert!(bad["local"].is_null());
    }

    #[test]
    fn filter_narrows_entries_summary_and_holders() {
        let o = diagnosed();
        let filter = Filter {
            local: Some("10.0.2.2".parse().expect("ip")),
            remote: None,
        };
        let j = audit_json(&source(), &o, &filter);
        assert_eq!(j.entries.len(), 1);
        assert_eq!(j.summary.stale, 1);
        let by_holder = j.stale_by_holder.expect("diagnosed");
        assert_eq!(
            by_holder.by_class.into_iter().collect::<Vec<_>>(),
            [("app-keeps-fd", 1)]
        );
        assert_eq!(by_holder.top_processes[0].entries, 1);
    }

    #[test]
    fn json_has_a_holder_on_each_stale_entry_and_the_summary() {
        let o = diagnosed();
        let v = serde_json::to_value(audit_json(&source(), &o, &Filter::default()))
            .expect("serialises");
        for e in v["entries"].as_array().expect("entries") {
            assert_eq!(e["holder"].is_object(), e["verdict"] == "stale", "{e}");
        }
        let kept = v["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .find(|e| e["holder"]["class"] == "app-keeps-fd")
            .expect("an app-keeps-fd entry");
        let h = &kept["holder"]["holders"][0];
        assert_eq!(
            (h["pid"].as_u64(), h["comm"].as_str()),
            (Some(4242), Some("nginx"))
        );
        assert_eq!(h["pod"]["pod_uid"], "7c1e3f4a-1b2c-4d5e-8f90-a1b2c3d4e5f6");
        assert!(kept["holder"]["reason"]
            .as_str()
            .expect("reason")
            .starts_with("app-keeps-fd: "));
        let by = &v["stale_by_holder"];
        assert_eq!(by["by_class"]["app-keeps-fd"], 2);
        assert_eq!(by["by_class"]["accept-queue"], 1);
        assert_eq!(by["top_processes"][0]["pid"], 4242);
        assert_eq!(by["top_processes"][0]["entries"], 2);
        assert_eq!(by["top_pods"][0]["entries"], 2);
        assert_eq!(by["search"]["method"], "iterator");
        let plain = serde_json::to_value(audit_json(&source(), &observation(), &Filter::default()))
            .expect("serialises");
        assert!(plain.get("stale_by_holder").is_none());
    }
}
