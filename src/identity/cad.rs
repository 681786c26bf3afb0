//! In-kernel compare-and-delete: the `compare_and_delete` program deletes each target's entry
//! only while it holds the socket with the cookie that was judged (or, for a target without
//! one, while the socket it holds is stale), in passes of at most as many targets as the
//! program's `targets` map holds.
//!
//! The program is loaded and attached once per map; each pass makes a new iterator from that
//! link. Under emulation, where every syscall costs a TLB flush, each one saved shows.

use std::collections::HashMap;
use std::io;
use std::mem;

use libbpf_rs::{Link, MapCore, MapFlags, Object, ObjectBuilder};

use super::records::{parse_records, read_iter, record_bytes, CadRecord, TargetRecord};
use super::{CadOutcome, CadResult, HeldSocket, IdentityError, IdentityReader, Target, OBJECT};
use crate::key::{RawKey, KEY_LEN};
use crate::map::SockMap;

const CAD_PROGRAM: &str = "compare_and_delete";
const HELD_MAP: &str = "held";
const TARGETS_MAP: &str = "targets";

/// Outcome codes of the BPF program.
const CAD_PENDING: i32 = 0;
const CAD_DELETED: i32 = 1;
const CAD_COOKIE_CHANGED: i32 = 2;
const CAD_NOT_STALE: i32 = 3;
/// `struct cad_target` flags: compare only the local end (an L7-proxy entry); no cookie to
/// compare (whichever socket the entry holds).
const CAD_LOCAL_ONLY: u32 = 1;
const CAD_ANY_SOCKET: u32 = 2;

/// The compare-and-delete program loaded for one map, attached to it.
pub(super) struct Cad {
    map_id: u32,
    // Dropped before the object: the link refers to its program.
    link: Link,
    object: Object,
    /// The `targets` map may hold a failed pass's leftovers.
    dirty: bool,
}

impl IdentityReader {
    /// Deletes each target's entry from inside the kernel only if it still holds the socket
    /// with the given cookie and that socket is still stale (closed, or with ends other than
    /// the key's: a socket that reconnected to the key's tuple is kept). One outcome per target, in order. A key given twice is handled
    /// in a later pass the second time (it is then `Gone` if the first pass deleted it).
    ///
    /// Fails with [`IdentityError::CompareAndDeleteRefused`] when the kernel refuses the
    /// program: delete by key with the re-check instead.
    pub fn compare_and_delete(
        &mut self,
        map: &SockMap,
        targets: &[Target],
    ) -> Result<Vec<(RawKey, CadOutcome)>, IdentityError> {
        Ok(self
            .compare_and_delete_met(map, targets)?
            .into_iter()
            .map(|r| (r.key, r.outcome))
            .collect())
    }

    /// [`IdentityReader::compare_and_delete`], with the socket each entry held when met.
    pub fn compare_and_delete_met(
        &mut self,
        map: &SockMap,
        targets: &[Target],
    ) -> Result<Vec<CadResult>, IdentityError> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        require_writable(map)?;
        let cad = self.cad_for(map)?;
        let table = cad
            .object
            .maps()
            .find(|m| m.name() == TARGETS_MAP)
            .ok_or_else(|| IdentityError::Malformed {
                map_id: map.id(),
                what: format!("the BPF object has no map {TARGETS_MAP}"),
            })?;
        let mut results = Vec::with_capacity(targets.len());
        // A pass takes as many targets as the program's `targets` map holds.
        let batch = usize::try_from(table.max_entries()).unwrap_or(1).max(1);
        for chunk in chunks(targets, batch) {
            if cad.dirty {
                // Left over from a pass that failed half-way.
                clear(&table, map.id())?;
            }
            cad.dirty = true;
            results.extend(cad_pass(&cad.link, &table, map, chunk)?);
            cad.dirty = false;
        }
        Ok(results)
    }

    /// Loads the compare-and-delete program for `map` now rather than at its first use.
    pub fn prepare_compare_and_delete(&mut self, map: &SockMap) -> Result<(), IdentityError> {
        require_writable(map)?;
        self.cad_for(map).map(|_| ())
    }

    fn cad_for(&mut self, map: &SockMap) -> Result<&mut Cad, IdentityError> {
        if !matches!(&self.cad, Some(cad) if cad.map_id == map.id()) {
            // Drop the program of a replaced map before loading the next one.
            self.cad = None;
        }
        if self.cad.is_none() {
            let refused = |e: libbpf_rs::Error| IdentityError::CompareAndDeleteRefused {
                map_id: map.id(),
                kind: Some(e.kind()),
                error: format!("{e:#}"),
            };
            let object = load_cad(map).map_err(refused)?;
            let link = find_program(&object, CAD_PROGRAM, map.id())?
                .attach_iter(map.fd())
                .map_err(refused)?;
            self.cad = Some(Cad {
                map_id: map.id(),
                link,
                object,
                dirty: false,
            });
        }
        self.cad
            .as_mut()
            .ok_or_else(|| IdentityError::CompareAndDeleteRefused {
                map_id: map.id(),
                kind: None,
                error: "the program was not kept after loading".to_string(),
            })
    }
}

/// Opens the object without its skeleton: `bpf_map__reuse_fd` renames `held` after the
/// reused map (e.g. `cilium_sock_ops`), a name the generated skeleton does not know.
fn load_cad(map: &SockMap) -> libbpf_rs::Result<Object> {
    let mut open = ObjectBuilder::default().open_memory(OBJECT)?;
    for mut prog in open.progs_mut() {
        if prog.name() != CAD_PROGRAM {
            prog.set_autoload(false);
        }
    }
    let mut reused = false;
    for mut m in open.maps_mut() {
        if m.name() == HELD_MAP {
            m.reuse_fd(map.fd())?;
            reused = true;
        }
    }
    if !reused {
        return Err(libbpf_rs::Error::from(io::Error::other(format!(
            "the BPF object has no map {HELD_MAP}"
        ))));
    }
    open.load()
}

fn find_program<'obj>(
    object: &'obj Object,
    name: &str,
    map_id: u32,
) -> Result<libbpf_rs::ProgramMut<'obj>, IdentityError> {
    object
        .progs_mut()
        .find(|p| p.name() == name)
        .ok_or_else(|| IdentityError::Malformed {
            map_id,
            what: format!("the BPF object has no program {name}"),
        })
}

/// Splits targets into passes of at most `batch` distinct keys, in order.
fn chunks(targets: &[Target], batch: usize) -> Vec<&[Target]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut keys = std::collections::HashSet::new();
    for (i, Target { key, .. }) in targets.iter().enumerate() {
        if keys.len() == batch || !keys.insert(*key) {
            out.push(&targets[start..i]);
            start = i;
            keys.clear();
            keys.insert(*key);
        }
    }
    out.push(&targets[start..]);
    out
}

/// Empties `targets`.
fn clear(table: &libbpf_rs::Map<'_>, map_id: u32) -> Result<(), IdentityError> {
    let stale: Vec<Vec<u8>> = table.keys().collect();
    for key in stale {
        table.delete(&key).map_err(|e| IdentityError::Targets {
            map_id,
            error: format!("{e:#}"),
        })?;
    }
    Ok(())
}

/// One pass: fill `targets`, run the iterator once, collect outcomes, empty `targets`.
fn cad_pass(
    link: &Link,
    table: &libbpf_rs::Map<'_>,
    map: &SockMap,
    chunk: &[Target],
) -> Result<Vec<CadResult>, IdentityError> {
    let id = map.id();
    let fill_error = |e: libbpf_rs::Error| IdentityError::Targets {
        map_id: id,
        error: format!("{e:#}"),
    };
    // One syscall each way for the whole chunk (hash map batch ops, Linux 5.6).
    let count = u32::try_from(chunk.len()).map_err(|_| IdentityError::Targets {
        map_id: id,
        error: format!("{} targets in one pass", chunk.len()),
    })?;
    let mut keys = Vec::with_capacity(chunk.len() * KEY_LEN);
    let mut values = Vec::with_capacity(chunk.len() * mem::size_of::<TargetRecord>());
    for target in chunk {
        keys.extend_from_slice(&target.key.0);
        let value = TargetRecord {
            cookie: target.cookie.unwrap_or(0),
            outcome: CAD_PENDING,
            flags: target_flags(target),
        };
        values.extend_from_slice(record_bytes(&value));
    }
    table
        .update_batch(&keys, &values, count, MapFlags::ANY, MapFlags::ANY)
        .map_err(fill_error)?;
    let records: Vec<CadRecord> = parse_records(id, &read_iter(id, link)?)?;
    let mut met: HashMap<RawKey, (i32, HeldSocket)> = HashMap::with_capacity(records.len());
    for r in &records {
        met.insert(r.key(), (r.outcome, r.held(id)?));
    }
    let mut results = Vec::with_capacity(chunk.len());
    for Target { key, .. } in chunk {
        // A record lost to a read boundary still left its outcome in the target.
        let (code, held) = match met.remove(key) {
            Some((code, held)) => (code, Some(held)),
            None => (stored_outcome(id, table, key)?, None),
        };
        results.push(CadResult {
            key: *key,
            outcome: outcome(id, key, code)?,
            held,
        });
    }
    table
        .delete_batch(&keys, count, MapFlags::ANY, MapFlags::ANY)
        .map_err(fill_error)?;
    Ok(results)
}

fn stored_outcome(
    map_id: u32,
    table: &libbpf_rs::Map<'_>,
    key: &RawKey,
) -> Result<i32, IdentityError> {
    let value = table
        .lookup(&key.0, MapFlags::ANY)
        .map_err(|e| IdentityError::Targets {
            map_id,
            error: format!("{e:#}"),
        })?;
    match value {
        Some(bytes) => Ok(parse_records::<TargetRecord>(map_id, &bytes)?
            .first()
            .map_or(CAD_PENDING, |t| t.outcome)),
        None => Ok(CAD_PENDING),
    }
}

fn outcome(map_id: u32, key: &RawKey, code: i32) -> Result<CadOutcome, IdentityError> {
    match code {
        CAD_PENDING => Ok(CadOutcome::Gone),
        CAD_DELETED => Ok(CadOutcome::Deleted),
        CAD_COOKIE_CHANGED => Ok(CadOutcome::CookieChanged),
        CAD_NOT_STALE => Ok(CadOutcome::NotStale),
        // Removed between the lookup and the delete: gone by itself.
        n if n == -libc::ENOENT => Ok(CadOutcome::Gone),
        n if n < 0 => Ok(CadOutcome::Failed(-n)),
        n => Err(IdentityError::Malformed {
            map_id,
            what: format!("unknown outcome {n} for key {}", key.to_hex()),
        }),
    }
}

fn target_flags(target: &Target) -> u32 {
    let local_only = if target.local_only { CAD_LOCAL_ONLY } else { 0 };
    let any = if target.cookie.is_none() {
        CAD_ANY_SOCKET
    } else {
        0
    };
    local_only | any
}

/// Refuses a map opened read-only: the program would delete through it regardless.
fn require_writable(map: &SockMap) -> Result<(), IdentityError> {
    let flags = nix::fcntl::fcntl(map.fd(), nix::fcntl::FcntlArg::F_GETFL).map_err(|e| {
        IdentityError::CompareAndDeleteRefused {
            map_id: map.id(),
            kind: Some(libbpf_rs::Error::from_raw_os_error(e as i32).kind()),
            error: format!("fcntl(F_GETFL) on the map fd: {e}"),
        }
    })?;
    let mode = nix::fcntl::OFlag::from_bits_truncate(flags) & nix::fcntl::OFlag::O_ACCMODE;
    if mode == nix::fcntl::OFlag::O_RDONLY {
        return Err(IdentityError::ReadOnlyMap {
            path: map.path().to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_codes() {
        let k = RawKey([0; KEY_LEN]);
        assert_eq!(outcome(1, &k, 0).unwrap(), CadOutcome::Gone);
        assert_eq!(outcome(1, &k, 1).unwrap(), CadOutcome::Deleted);
        assert_eq!(outcome(1, &k, 2).unwrap(), CadOutcome::CookieChanged);
        assert_eq!(outcome(1, &k, 3).unwrap(), CadOutcome::NotStale);
        assert_eq!(outcome(1, &k, -libc::ENOENT).unwrap(), CadOutcome::Gone);
        assert_eq!(
            outcome(1, &k, -libc::EBUSY).unwrap(),
            CadOutcome::Failed(libc::EBUSY)
        );
        assert!(outcome(1, &k, 9).is_err());
    }

    #[test]
    fn chunks_split_on_size_and_repeated_keys() {
        let key = |i: u32| {
            let mut k = [0u8; KEY_LEN];
            k[..4].copy_from_slice(&i.to_be_bytes());
            RawKey(k)
        };
        const BATCH: usize = 8192;
        let many: Vec<Target> = (0..(BATCH as u32 * 2 + 5))
            .map(|i| Target::new(key(i), 1))
            .collect();
        let sizes: Vec<usize> = chunks(&many, BATCH).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![BATCH, BATCH, 5]);
        let repeated = [
            Target::new(key(1), 1),
            Target::new(key(2), 2),
            Target::new(key(1), 3),
        ];
        let sizes: Vec<usize> = chunks(&repeated, BATCH).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![2, 1]);
    }

    #[test]
    fn target_flags_as_a_table() {
        let k = RawKey([0; KEY_LEN]);
        let cases = [
            ("a judged socket", Target::new(k, 7), 0),
            (
                "a judged proxy entry",
                Target {
                    local_only: true,
                    ..Target::new(k, 7)
                },
                CAD_LOCAL_ONLY,
            ),
            (
                "whichever socket (a collision)",
                Target {
                    cookie: None,
                    ..Target::new(k, 7)
                },
                CAD_ANY_SOCKET,
            ),
            (
                "whichever socket of a proxy entry",
                Target {
                    key: k,
                    cookie: None,
                    local_only: true,
                },
                CAD_LOCAL_ONLY | CAD_ANY_SOCKET,
            ),
        ];
        for (what, target, want) in cases {
            assert_eq!(target_flags(&target), want, "{what}");
        }
    }
}
