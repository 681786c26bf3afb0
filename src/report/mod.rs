//! Renders an observation for people (a table that pastes into a ticket) and for scripts (JSON).
//!
//! [`table`] writes the text table, [`json`] the JSON, [`holders`] the "stale by holder"
//! summary both share, and [`sweep`] a sweep's report; this module holds what they all use:
//! the map's name, the summary counts and the selected entries' order.

pub mod holders;
pub mod json;
pub mod sweep;
pub mod table;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::IpAddr;
use std::sync::mpsc;

use serde::Serialize;

use crate::helper_thread;
use crate::holder::{Diagnosis, HolderSummary};
use crate::key::KEY_LEN;
use crate::observation::{Filter, Judged, Observation};
use crate::verdict::Verdict;

pub use holders::{holder_lines, holder_reasons, stale_by_holder, TOP_HOLDERS};
pub use json::{
    audit_json, write_audit_json, AuditJson, JsonEntries, JsonHolder, JsonHolderCount,
    JsonHolderSearch, JsonInventory, JsonPodCount, JsonSocket, JsonStaleByHolder, JsonUnreadable,
};
pub use sweep::{
    guard_outcomes, sweep_json, sweep_summary, sweep_text, GuardOutcome, SweepJson, SweepSummary,
};
pub use table::{header, summary_lines, write_audit_table};

/// Where the map came from, as the report names it.
#[derive(Debug, Clone, Serialize)]
pub struct MapSource {
    pub path: String,
    pub id: u32,
    #[serde(rename = "type")]
    pub map_type: String,
    pub max_entries: u32,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub entries: usize,
    pub live: usize,
    pub stale: usize,
    pub unknown: usize,
    /// Stale entries by the held socket's remote IP (the key's A address), as the incident
    /// report grepped the map by node IP.
    pub stale_by_remote_ip: BTreeMap<String, usize>,
}

impl Summary {
    pub fn of<'a>(entries: impl IntoIterator<Item = &'a Judged>) -> Summary {
        let mut s = Summary::default();
        // Counted by address, each written once: a full map has thousands of stale entries
        // on a few addresses (`None`: the key does not decode).
        let mut by_ip: HashMap<Option<IpAddr>, usize> = HashMap::new();
        for e in entries {
            s.entries += 1;
            match &e.verdict {
                Verdict::Live(_) => s.live += 1,
                Verdict::Unknown(_) => s.unknown += 1,
                Verdict::Stale(_) => {
                    s.stale += 1;
                    *by_ip
                        .entry(e.key().ok().map(|k| k.remote.ip()))
                        .or_default() += 1;
                }
            }
        }
        for (ip, n) in by_ip {
            let ip = ip.map_or_else(|| "?".to_string(), |ip| ip.to_string());
            *s.stale_by_remote_ip.entry(ip).or_default() += n;
        }
        s
    }
}

/// One row of a report: an entry, with its holder diagnosis when it has one (a stale entry,
/// once the holder pass ran). Looked up once per row, as the rows are selected.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub entry: &'a Judged,
    pub holder: Option<&'a Diagnosis>,
}

/// What a report shows of an observation: the selected rows, their summary and "stale by
/// holder".
#[derive(Debug)]
pub struct Selection<'a> {
    /// In the report's order ([`selected`]).
    pub rows: Vec<Row<'a>>,
    pub summary: Summary,
    /// Once the holder pass ran.
    pub by_holder: Option<HolderSummary>,
}

/// The entries an operator asked about ([`Filter`]), with their counts. These are counted on
/// a second thread while this one puts the rows in order: neither needs the other, and on a
/// full map the counts took ~5 ms and the order ~8 ms, one core idle.
pub fn select<'a>(o: &'a Observation, filter: &Filter) -> Selection<'a> {
    let counts = || {
        let summary = Summary::of(o.entries.iter().filter(|e| filter.selects(e)));
        (summary, stale_by_holder(o, filter))
    };
    std::thread::scope(|scope| {
        // No thread to be had (a pids limit, say): counted here, after the rows.
        let counting = helper_thread::spawn(scope, "smgc-counts", counts);
        let rows = selected(o, filter);
        let (summary, by_holder) = match counting {
            Some(counting) => counting
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => counts(),
        };
        Selection {
            rows,
            summary,
            by_holder,
        }
    })
}

/// The entries an operator asked about, in a stable order: stale first, then by key.
fn selected<'a>(o: &'a Observation, filter: &Filter) -> Vec<Row<'a>> {
    let chosen: Vec<(usize, &Judged)> = o
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| filter.selects(e))
        .collect();
    let varying = varying_bytes(chosen.iter().map(|&(_, e)| e));
    // The fewer words a key takes, the less the sort moves: a node's keys differ in a few
    // address bytes and the ports (a full map of the bench's: 8 bytes, two words).
    match (1 + varying.len()).div_ceil(8) {
        0 | 1 => in_order::<1>(o, chosen, &varying),
        2 => in_order::<2>(o, chosen, &varying),
        3 => in_order::<3>(o, chosen, &varying),
        _ => in_order::<6>(o, chosen, &varying),
    }
}

/// `chosen` as rows, sorted on `WORDS`-word keys ([`sort_key`]).
fn in_order<'a, const WORDS: usize>(
    o: &'a Observation,
    chosen: Vec<(usize, &'a Judged)>,
    varying: &[usize],
) -> Vec<Row<'a>> {
    let mut v: Vec<([u64; WORDS], usize)> = chosen
        .into_iter()
        .map(|(at, e)| (sort_key(e, varying), at))
        .collect();
    // Keys are unique, so an unstable sort gives the same order.
    v.sort_unstable_by_key(|&(key, _)| key);
    let holders = o.holders.as_ref();
    v.into_iter()
        .map(|(key, at)| Row {
            entry: &o.entries[at],
            // Only stale entries have one, so the others are not looked up.
            holder: holders
                .filter(|_| rank(key[0]) == STALE_RANK)
                .and_then(|h| h.at(at)),
        })
        .collect()
}

/// The positions, in order, at which the keys of `entries` differ. A byte every key shares
/// cannot decide their order; left out of the sort keys, the first word decides most
/// comparisons (an IPv4 key is mostly zeros, and a node's keys share most address bytes).
fn varying_bytes<'a>(mut entries: impl Iterator<Item = &'a Judged>) -> Vec<usize> {
    let Some(first) = entries.next() else {
        return Vec::new();
    };
    let mut differs = [0u8; KEY_LEN];
    for e in entries {
        for (d, (a, b)) in differs.iter_mut().zip(e.raw.0.iter().zip(&first.raw.0)) {
            *d |= a ^ b;
        }
    }
    (0..KEY_LEN).filter(|&at| differs[at] != 0).collect()
}

/// How many rows [`write_rows`] writes at a time: a chunk's buffer is under a megabyte,
/// and a full map's 65,535 rows are 64 chunks, shared evenly between the two threads.
const ROWS_PER_CHUNK: usize = 1024;

/// Writes `rows` to `out` in order, `write` turning each chunk of `per_chunk` rows (given
/// the index of its first row) into bytes. Beyond one chunk, a second thread writes every
/// other chunk while this one writes the rest and passes each on in turn: the rows are most
/// of a full map's report, and the second core was idle while they were written.
fn write_rows<W, T, F>(out: &mut W, rows: &[T], per_chunk: usize, write: F) -> io::Result<()>
where
    W: io::Write + ?Sized,
    T: Sync,
    F: Fn(&mut Vec<u8>, usize, &[T]) -> io::Result<()> + Sync,
{
    let per_chunk = per_chunk.max(1);
    let mut mine = Vec::new();
    if rows.len() <= per_chunk {
        write(&mut mine, 0, rows)?;
        return out.write_all(&mine);
    }
    std::thread::scope(|scope| {
        let (written, next) = mpsc::channel::<io::Result<Vec<u8>>>();
        let (spent, reuse) = mpsc::channel::<Vec<u8>>();
        let write = &write;
        let second = helper_thread::spawn(scope, "smgc-rows", move || {
            // Two buffers, each back from the reader before it is filled again: memory stays
            // a few chunks, and the chunks after them go to pages already touched (fresh
            // pages cost more than writing the rows into them).
            let mut fresh = 2;
            for (k, chunk) in rows.chunks(per_chunk).enumerate().skip(1).step_by(2) {
                let mut buf = if fresh > 0 {
                    fresh -= 1;
                    Vec::new()
                } else {
                    // Closed: this thread's reader gave up (an error on `out`).
                    let Ok(buf) = reuse.recv() else { return };
                    buf
                };
                buf.clear();
                let done = write(&mut buf, k * per_chunk, chunk).map(|()| buf);
                let failed = done.is_err();
                if written.send(done).is_err() || failed {
                    return;
                }
            }
        });
        // No second thread to be had (a pids limit, say): every chunk is written here.
        let alone = second.is_none();
        for (k, chunk) in rows.chunks(per_chunk).enumerate() {
            if alone || k % 2 == 0 {
                mine.clear();
                write(&mut mine, k * per_chunk, chunk)?;
                out.write_all(&mine)?;
            } else {
                let theirs = next
                    .recv()
                    .map_err(|_| io::Error::other("the second row writer stopped"))??;
                out.write_all(&theirs)?;
                // Gone only once the writer is done with every chunk.
                let _ = spent.send(theirs);
            }
        }
        Ok(())
    })
}

/// Reads what the writers read of each row's entry, and nothing else: the rows are in key
/// order, not in memory order, so each entry is a cache miss. Here the misses overlap; in
/// the writer each stalled it (about a tenth of a full map's rows' time).
fn warm(rows: &[Row]) {
    let read = rows.iter().fold(0u64, |acc, r| {
        let e = r.entry;
        let held = e.held.as_ref().map_or(0, |h| {
            h.cookie ^ h.inode ^ h.netns_inode ^ u64::from(h.local.port() ^ h.remote.port())
        });
        acc ^ u64::from(e.raw.0[0] ^ e.raw.0[KEY_LEN - 1])
            ^ held
            ^ u64::from(verdict_rank(&e.verdict))
    });
    std::hint::black_box(read);
}

/// An entry's place in the report, (verdict rank, the key's `varying` bytes), as big-endian
/// words: they compare as the bytes do, with no pointer to follow and no byte loop per
/// comparison (a full map's sort was a twentieth of the audit). The bytes that do not fit
/// `WORDS` words are left out: the caller gives enough.
fn sort_key<const WORDS: usize>(e: &Judged, varying: &[usize]) -> [u64; WORDS] {
    let mut key = [0u64; WORDS];
    let bytes =
        std::iter::once(verdict_rank(&e.verdict)).chain(varying.iter().map(|&at| e.raw.0[at]));
    for (n, byte) in bytes.take(WORDS * 8).enumerate() {
        key[n / 8] |= u64::from(byte) << (8 * (7 - n % 8));
    }
    key
}

/// The verdict rank a sort key's first word starts with.
fn rank(first: u64) -> u8 {
    first.to_be_bytes()[0]
}

const STALE_RANK: u8 = 0;

fn verdict_rank(v: &Verdict) -> u8 {
    match v {
        Verdict::Stale(_) => STALE_RANK,
        Verdict::Unknown(_) => 1,
        Verdict::Live(_) => 2,
    }
}

/// The observations, map and entries the submodules' tests share.
#[cfg(test)]
mod fixtures {
    use super::*;
    use crate::holder::{Classified, Diagnosis, Holder, HolderClass, ScanInfo, ScanMethod};
    use crate::key::{KeyError, RawKey, SockKey};
    use crate::verdict::{LiveReason, StaleReason, UnknownReason};
    use std::time::Duration;

    fn judged(local: &str, remote: &str, verdict: Verdict) -> Judged {
        let key = SockKey::for_socket(local.parse().expect("a"), remote.parse().expect("a"))
            .expect("family");
        Judged {
            raw: key.encode(),
            held: None,
            verdict,
        }
    }

    pub(super) fn observation() -> Observation {
        Observation {
            map_id: 7,
            identity: false,
            entries: vec![
                judged(
                    "10.0.1.2:8080",
                    "10.0.1.1:40000",
                    Verdict::Stale(StaleReason::NoSocket { namespaces: 2 }),
                ),
                judged(
                    "10.0.2.2:8080",
                    "10.0.1.1:40001",
                    Verdict::Stale(StaleReason::OnlyTimeWait),
                ),
                judged(
                    "10.0.1.1:40002",
                    "10.0.1.2:8080",
                    Verdict::Live(LiveReason::TupleOwned),
                ),
                judged(
                    "[fd00::2]:80",
                    "[fd00::1]:5000",
                    Verdict::Stale(StaleReason::NoSocket { namespaces: 2 }),
                ),
                Judged {
                    raw: RawKey([0; 44]),
                    held: None,
                    verdict: Verdict::Unknown(UnknownReason::Undecodable(KeyError::Family(0))),
                },
            ],
            namespaces_read: 2,
            namespaces_vanished: 0,
            procfs_tables: 0,
            unreadable: vec![],
            sockets: 10,
            lookups: None,
            per_netns: Default::default(),
            took: Duration::from_millis(3),
            holders: None,
        }
    }

    pub(super) fn source() -> MapSource {
        MapSource {
            path: "/sys/fs/bpf/x".into(),
            id: 7,
            map_type: "sockhash".into(),
            max_entries: 65535,
        }
    }

    /// The observation with its three stale entries diagnosed: two kept by one process in
    /// a pod, one in an accept queue.
    pub(super) fn diagnosed() -> Observation {
        use crate::holder::{kubepods, PodCgroup, StaleHolders};
        let mut o = observation();
        let nginx = Holder {
            pid: 4242,
            fd: 7,
            comm: "nginx".into(),
            cgroup: Some("/kubepods/pod7c1e3f4a-1b2c-4d5e-8f90-a1b2c3d4e5f6/c0ffee".into()),
            pod: Some(PodCgroup {
                pod_uid: "7c1e3f4a-1b2c-4d5e-8f90-a1b2c3d4e5f6".into(),
                qos: kubepods::QosClass::Guaranteed,
                container: None,
            }),
        };
        let kept = |holders| Diagnosis {
            classified: Classified {
                class: HolderClass::AppKeepsFd,
                unknown: None,
            },
            holders,
        };
        let stale: Vec<usize> = (0..o.entries.len())
            .filter(|&at| o.entries[at].verdict.is_stale())
            .collect();
        let diagnosed = vec![
            (stale[0], kept(vec![nginx.clone()])),
            (stale[1], kept(vec![nginx])),
            (
                stale[2],
                Diagnosis {
                    classified: Classified {
                        class: HolderClass::AcceptQueue,
                        unknown: None,
                    },
                    holders: vec![],
                },
            ),
        ];
        o.holders = Some(StaleHolders {
            diagnosed,
            scan: Some(ScanInfo {
                method: ScanMethod::Iterator,
                complete: true,
                notes: vec![],
                took: Duration::from_millis(4),
            }),
        });
        o
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::observation;
    use super::*;

    /// Stale first, then unknown, then live; within each, by the key's bytes (the first
    /// byte that differs decides, wherever it is).
    #[test]
    fn entries_are_selected_stale_first_then_by_key_bytes() {
        use crate::key::RawKey;
        use crate::verdict::{LiveReason, UnknownReason};
        let verdicts = [
            Verdict::Live(LiveReason::HeldIsOwner),
            Verdict::Stale(crate::verdict::StaleReason::HeldClosed),
            Verdict::Unknown(UnknownReason::NotJudged),
        ];
        // Keys that differ in 2, 12, 20 and 44 bytes: sort keys of one, two, three and six
        // words; the last with the fixture's entries too.
        let positions: [(Vec<usize>, bool); 5] = [
            (vec![43], false),
            ((0..6).collect(), false),
            ((0..10).collect(), false),
            ((0..22).collect(), false),
            (vec![0, 6, 7, 8, 31, 39, 43], true),
        ];
        for (positions, with_fixture) in positions {
            let mut o = observation();
            if !with_fixture {
                o.entries.clear();
            }
            for (i, &at) in positions.iter().enumerate() {
                for (j, verdict) in verdicts.iter().enumerate() {
                    // Twins that differ only in the mirrored byte, the key's last ones.
                    let bytes = [0x01, 0x80, 0xff].into_iter();
                    for (byte, twin) in bytes.flat_map(|b| [(b, 0), (b, 0x40)]) {
                        let mut raw = [0x10u8; 44];
                        raw[at] = byte;
                        raw[43 - at] ^= u8::try_from(i * 3 + j).expect("small") ^ twin;
                        o.entries.push(Judged {
                            raw: RawKey(raw),
                            held: None,
                            verdict: verdict.clone(),
                        });
                    }
                }
            }
            let order = |v: Vec<Row>| v.iter().map(|r| r.entry.raw).collect::<Vec<_>>();
            let mut want: Vec<&Judged> = o.entries.iter().collect();
            want.sort_by_key(|e| (verdict_rank(&e.verdict), e.raw));
            want.dedup_by_key(|e| e.raw);
            assert_eq!(want.len(), o.entries.len(), "the test's keys are unique");
            let want = want.into_iter().map(|entry| Row {
                entry,
                holder: None,
            });
            assert_eq!(
                order(selected(&o, &Filter::default())),
                order(want.collect()),
                "{positions:?}"
            );
        }
    }

    #[test]
    fn summary_counts_and_groups_by_remote_ip() {
        let o = observation();
        let s = Summary::of(&o.entries);
        assert_eq!((s.entries, s.live, s.stale, s.unknown), (5, 1, 3, 1));
        assert_eq!(s.stale_by_remote_ip.get("10.0.1.1"), Some(&2));
        assert_eq!(s.stale_by_remote_ip.get("fd00::1"), Some(&1));
    }
}
