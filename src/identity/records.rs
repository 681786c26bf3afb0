//! The records of the socket-identity programs, read as `#[repr(C)]` structs, and the
//! iterator's bytes read to their end.

use std::io::{self, Read};
use std::mem;
use std::net::SocketAddr;

use foldhash::HashMap;
use libbpf_rs::Iter;

use super::{HeldSocket, IdentityError};
use crate::key::{RawKey, KEY_LEN};
use crate::socket::{record_ends, TcpState};
use crate::verdict::HeldView;

/// `struct identity_rec` of the BPF program: one per entry.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct IdentityRecord {
    key: [u8; KEY_LEN],
    family: u16,
    state: u8,
    pad: u8,
    cookie: u64,
    local_addr: [u8; 16],
    remote_addr: [u8; 16],
    /// Host order (the kernel's `skc_num`).
    local_port: u16,
    /// Host order (the program converts `skc_dport`).
    remote_port: u16,
    netns_inode: u32,
    /// The inode of the file that refers to the socket; 0 when none does.
    inode: u64,
    /// `sk_err`.
    error: i32,
    flags: u32,
}
const _: () = assert!(mem::size_of::<IdentityRecord>() == 112);

/// `flags` bit: the socket is orphaned (`SOCK_DEAD`).
const ORPHANED: u32 = 1;

/// `struct cad_rec` of the BPF program: one per target the iteration met.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct CadRecord {
    /// The entry's key and the socket it held when met.
    held: IdentityRecord,
    pub(super) outcome: i32,
    pad: u32,
}
const _: () = assert!(mem::size_of::<CadRecord>() == 120);

impl CadRecord {
    pub(super) fn key(&self) -> RawKey {
        RawKey(self.held.key)
    }

    /// The socket the entry held when the program met it.
    pub(super) fn held(&self, map_id: u32) -> Result<HeldSocket, IdentityError> {
        held_socket(map_id, &self.held)
    }
}

/// `struct cad_target`: the value of the program's `targets` map.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct TargetRecord {
    pub(super) cookie: u64,
    pub(super) outcome: i32,
    /// CAD_LOCAL_ONLY for an L7-proxy entry.
    pub(super) flags: u32,
}
const _: () = assert!(mem::size_of::<TargetRecord>() == 16);

/// Plain integers only, so every byte pattern is a valid value.
pub(super) trait Record: Copy {}
impl Record for IdentityRecord {}
impl Record for CadRecord {}
impl Record for TargetRecord {}

/// Bytes asked of the iterator per read(2): about 16 KiB, a whole number of identity records.
/// The kernel fills a buffer of 8 pages per read and stops once it holds this much, so with a
/// request well below 8 pages no record overflows its buffer and has to be shown again; and
/// ending on a record's end leaves no bytes over for a read(2) of their own.
const READ_CHUNK: usize =
    16 * 1024 / mem::size_of::<IdentityRecord>() * mem::size_of::<IdentityRecord>();

/// Where the read files each entry: its place (the number of entries filed so far for a new
/// one; an earlier place for an entry shown again after a read boundary, whose newer sighting
/// replaces the older), its key and its socket.
pub type EntrySink<'a> = dyn FnMut(usize, RawKey, HeldSocket) + 'a;

/// [`EntrySink`] for a read of the ends alone: the held socket as a verdict weighs it.
pub type ViewSink<'a> = dyn FnMut(usize, RawKey, HeldView) + 'a;

/// Reads the identity iterator behind `link` to its end: the socket behind every entry, one
/// place per key, in the iterator's order, each record made a `T` by `decode` and filed into
/// `sink`. Returns how many entries were filed.
pub(super) fn read_entries<T>(
    map_id: u32,
    link: &libbpf_rs::Link,
    decode: fn(u32, &IdentityRecord) -> Result<T, IdentityError>,
    sink: &mut dyn FnMut(usize, RawKey, T),
) -> Result<usize, IdentityError> {
    let mut places = Places::default();
    let mut file = |record: &IdentityRecord, places: &mut Places| -> Result<(), IdentityError> {
        let key = RawKey(record.key);
        let held = decode(map_id, record)?;
        sink(places.of(key), key, held);
        Ok(())
    };
    // Parsed as the bytes come: a full map's records as a buffer and again as a list
    // would double what the read costs in memory.
    let mut partial: Vec<u8> = Vec::with_capacity(mem::size_of::<IdentityRecord>());
    read_chunks(map_id, link, |chunk| {
        places.next_read();
        let mut rest = chunk;
        if !partial.is_empty() {
            let need = mem::size_of::<IdentityRecord>() - partial.len();
            let take = need.min(rest.len());
            partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if partial.len() < mem::size_of::<IdentityRecord>() {
                return Ok(());
            }
            let whole = std::mem::take(&mut partial);
            for record in parse_records::<IdentityRecord>(map_id, &whole)? {
                file(&record, &mut places)?;
            }
        }
        let whole = rest.len() - rest.len() % mem::size_of::<IdentityRecord>();
        for record in parse_records::<IdentityRecord>(map_id, &rest[..whole])? {
            file(&record, &mut places)?;
        }
        partial.extend_from_slice(&rest[whole..]);
        Ok(())
    })?;
    if !partial.is_empty() {
        return Err(IdentityError::Malformed {
            map_id,
            what: format!(
                "the read ended inside a record ({} of {} bytes)",
                partial.len(),
                mem::size_of::<IdentityRecord>()
            ),
        });
    }
    Ok(places.filed)
}

/// How many read(2)s back an entry's earlier sighting can be, the current one included. The
/// iterator shows an entry a second time only when it refills its buffer inside the entry's
/// hash bucket: it restarts that bucket (6.1 and 6.18 both do; an iterator that kept its place
/// would show none). A fill is delivered by one read, or two when a record straddles the
/// request's end, so the earlier sighting is at most two reads back; one more for margin.
const RECENT_READS: usize = 4;

/// Each entry's place: the keys of the last [`RECENT_READS`] reads with their places and the
/// read that showed each last. A few hundred keys: the whole map's made a table of 7 MB at
/// 65,535 entries, and a cache miss per record.
#[derive(Default)]
struct Places {
    recent: HashMap<RawKey, (usize, usize)>,
    filed: usize,
    reads: usize,
}

impl Places {
    /// A new read(2) begins: the keys shown before the window are forgotten.
    fn next_read(&mut self) {
        self.reads += 1;
        let reads = self.reads;
        self.recent
            .retain(|_, (_, seen)| reads - *seen < RECENT_READS);
    }

    /// `key`'s place: its earlier sighting's, or the next one.
    fn of(&mut self, key: RawKey) -> usize {
        // One hash of the key per record.
        let (at, seen) = self.recent.entry(key).or_insert((self.filed, self.reads));
        *seen = self.reads;
        if *at == self.filed {
            self.filed += 1;
        }
        *at
    }
}

/// The most entries a read sizes its tables for at once ([`super::entries_capacity`]).
pub(super) const MAX_CAPACITY: usize = 1 << 20;

/// Files `entry` at `at` in `entries` ([`EntrySink`]).
pub fn file_at<T>(entries: &mut Vec<T>, at: usize, entry: T) {
    match entries.get_mut(at) {
        Some(earlier) => *earlier = entry,
        None => entries.push(entry),
    }
}

/// Reads the iterator to its end.
pub(super) fn read_iter(map_id: u32, link: &libbpf_rs::Link) -> Result<Vec<u8>, IdentityError> {
    let mut out = Vec::with_capacity(READ_CHUNK);
    read_chunks(map_id, link, |chunk| {
        out.extend_from_slice(chunk);
        Ok(())
    })?;
    Ok(out)
}

/// Reads the iterator to its end in READ_CHUNK reads, handing each read's bytes to `each`
/// (a record may straddle two reads).
fn read_chunks(
    map_id: u32,
    link: &libbpf_rs::Link,
    mut each: impl FnMut(&[u8]) -> Result<(), IdentityError>,
) -> Result<(), IdentityError> {
    let mut iter = Iter::new(link).map_err(|e| IdentityError::Read {
        map_id,
        bytes: 0,
        source: io::Error::other(format!("{e:#}")),
    })?;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut total = 0;
    loop {
        match iter.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                total += n;
                each(&buf[..n])?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(IdentityError::Read {
                    map_id,
                    bytes: total,
                    source,
                })
            }
        }
    }
}

pub(super) fn parse_records<T: Record>(map_id: u32, bytes: &[u8]) -> Result<Vec<T>, IdentityError> {
    let size = mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return Err(IdentityError::Malformed {
            map_id,
            what: format!(
                "{} bytes are no whole number of {size}-byte records",
                bytes.len()
            ),
        });
    }
    Ok(bytes
        .chunks_exact(size)
        .map(|chunk| {
            // SAFETY: `chunk` holds exactly size_of::<T>() bytes; T is a #[repr(C)] record of
            // plain integers (the Record trait), so every byte pattern is a valid T, and
            // read_unaligned makes no alignment demand on the byte buffer.
            unsafe { chunk.as_ptr().cast::<T>().read_unaligned() }
        })
        .collect())
}

pub(super) fn record_bytes<T: Record>(value: &T) -> &[u8] {
    // SAFETY: `value` is a live T of size_of::<T>() bytes, readable as bytes for the borrow's
    // life; the records are #[repr(C)] with explicit padding fields, so no byte is
    // uninitialised.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), mem::size_of::<T>()) }
}

/// A record's held socket, every field.
pub(super) fn held_socket(map_id: u32, r: &IdentityRecord) -> Result<HeldSocket, IdentityError> {
    let (local, remote) = ends(map_id, r)?;
    Ok(HeldSocket {
        cookie: r.cookie,
        local,
        remote,
        state: TcpState::from_kernel(r.state),
        netns_inode: u64::from(r.netns_inode),
        inode: r.inode,
        orphaned: r.flags & ORPHANED != 0,
        error: r.error,
    })
}

/// A record's held socket as a verdict weighs it: all a read of the ends alone fills.
pub(super) fn held_view(map_id: u32, r: &IdentityRecord) -> Result<HeldView, IdentityError> {
    held_socket(map_id, r).map(|h| h.view())
}

/// The held socket's own local and remote end.
fn ends(map_id: u32, r: &IdentityRecord) -> Result<(SocketAddr, SocketAddr), IdentityError> {
    record_ends(
        r.family,
        (r.local_addr, r.local_port),
        (r.remote_addr, r.remote_port),
    )
    .ok_or_else(|| IdentityError::Malformed {
        map_id,
        what: format!(
            "key {} holds a socket of family {}, not AF_INET or AF_INET6",
            RawKey(r.key).to_hex(),
            r.family
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AF_INET: u16 = libc::AF_INET as u16;
    const AF_INET6: u16 = libc::AF_INET6 as u16;

    fn record(family: u16) -> IdentityRecord {
        let mut local_addr = [0u8; 16];
        let mut remote_addr = [0u8; 16];
        local_addr[..4].copy_from_slice(&[10, 1, 2, 2]);
        remote_addr[..4].copy_from_slice(&[10, 1, 2, 1]);
        IdentityRecord {
            key: [7; KEY_LEN],
            family,
            state: 1,
            pad: 0,
            cookie: 0x1234,
            local_addr,
            remote_addr,
            local_port: 8080,
            remote_port: 40000,
            netns_inode: 4026532000,
            inode: 0,
            error: 0,
            flags: 0,
        }
    }

    #[test]
    fn an_entry_shown_again_replaces_its_earlier_sighting_in_place() {
        let mut entries = Vec::new();
        for (at, sighting) in [(0, "a"), (1, "b"), (0, "a again"), (2, "c")] {
            file_at(&mut entries, at, sighting);
        }
        assert_eq!(entries, ["a again", "b", "c"]);
    }

    /// Each sighting's place, read by read (a key per byte): a new key takes the next place; a
    /// key shown again keeps its first place while its last sighting is within
    /// RECENT_READS reads, the current one included, and is a new entry after that.
    #[test]
    fn an_entry_shown_again_within_the_last_reads_keeps_its_place() {
        let reads: [&[(u8, usize)]; 7] = [
            &[(1, 0), (2, 1)],
            &[(2, 1), (3, 2)],
            &[],
            &[(2, 1), (1, 0)],
            &[],
            &[(3, 3)],
            &[(4, 4), (1, 0)],
        ];
        let mut places = Places::default();
        for (n, read) in reads.iter().enumerate() {
            places.next_read();
            for &(key, place) in *read {
                assert_eq!(
                    places.of(RawKey([key; KEY_LEN])),
                    place,
                    "read {n}, key {key}"
                );
            }
        }
        assert_eq!(places.filed, 5);
    }

    #[test]
    fn records_round_trip_through_bytes() {
        let r = record(AF_INET);
        let mut bytes = record_bytes(&r).to_vec();
        bytes.extend_from_slice(record_bytes(&r));
        let back: Vec<IdentityRecord> = parse_records(1, &bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].cookie, 0x1234);
        assert_eq!(back[1].key, [7; KEY_LEN]);
        let held = held_socket(1, &back[0]).unwrap();
        assert_eq!(held.local, "10.1.2.2:8080".parse().unwrap());
        assert_eq!(held.remote, "10.1.2.1:40000".parse().unwrap());
        assert_eq!(held.state, TcpState::Established);
        assert_eq!(held.netns_inode, 4026532000);
        assert_eq!((held.inode, held.orphaned, held.error), (0, false, 0));
    }

    #[test]
    fn who_keeps_the_socket_is_read_from_the_record() {
        let mut r = record(AF_INET);
        r.inode = 259827;
        r.error = libc::ECONNRESET;
        r.flags = ORPHANED;
        let held = held_socket(1, &r).unwrap();
        assert_eq!(held.inode, 259827);
        assert_eq!(held.error, libc::ECONNRESET);
        assert!(held.orphaned);
        r.flags = 0;
        assert!(!held_socket(1, &r).unwrap().orphaned);
    }

    #[test]
    fn field_offsets_match_the_c_layout() {
        let r = record(AF_INET6);
        let base = std::ptr::addr_of!(r) as usize;
        assert_eq!(std::ptr::addr_of!(r.family) as usize - base, 44);
        assert_eq!(std::ptr::addr_of!(r.state) as usize - base, 46);
        assert_eq!(std::ptr::addr_of!(r.cookie) as usize - base, 48);
        assert_eq!(std::ptr::addr_of!(r.local_addr) as usize - base, 56);
        assert_eq!(std::ptr::addr_of!(r.remote_addr) as usize - base, 72);
        assert_eq!(std::ptr::addr_of!(r.local_port) as usize - base, 88);
        assert_eq!(std::ptr::addr_of!(r.remote_port) as usize - base, 90);
        assert_eq!(std::ptr::addr_of!(r.netns_inode) as usize - base, 92);
        assert_eq!(std::ptr::addr_of!(r.inode) as usize - base, 96);
        assert_eq!(std::ptr::addr_of!(r.error) as usize - base, 104);
        assert_eq!(std::ptr::addr_of!(r.flags) as usize - base, 108);
        let c = CadRecord {
            held: r,
            outcome: 0,
            pad: 0,
        };
        let base = std::ptr::addr_of!(c) as usize;
        assert_eq!(std::ptr::addr_of!(c.held.cookie) as usize - base, 48);
        assert_eq!(std::ptr::addr_of!(c.outcome) as usize - base, 112);
    }

    #[test]
    fn ipv6_and_unknown_families() {
        let held = held_socket(1, &record(AF_INET6)).unwrap();
        assert!(held.local.is_ipv6());
        assert!(matches!(
            held_socket(1, &record(1)),
            Err(IdentityError::Malformed { .. })
        ));
    }

    #[test]
    fn a_partial_record_is_malformed() {
        let r = record(AF_INET);
        let bytes = &record_bytes(&r)[..111];
        assert!(matches!(
            parse_records::<IdentityRecord>(3, bytes),
            Err(IdentityError::Malformed { map_id: 3, .. })
        ));
    }
}
