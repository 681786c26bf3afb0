//! Sees the socket behind every entry through a BPF sockmap iterator, and deletes an entry only if it still holds the socket that was judged.
//!
//! Two `iter/sockmap` programs (bpf/sockmap_identity.bpf.c, CO-RE, built into a libbpf-rs
//! skeleton by build.rs) are attached to the map at run time:
//!
//! - `identity` emits, for every entry, the raw key and the held socket's cookie, own local
//!   and remote end, TCP state and network namespace inode: one read of the whole map, no
//!   syscall per key. It needs only direct BTF reads and `bpf_get_socket_cookie`, which a
//!   kernel in lockdown's confidentiality mode allows.
//! - `compare_and_delete` deletes an entry from inside the kernel only while it holds the
//!   socket with the cookie that was judged stale, closing the window a delete by key leaves
//!   between the last check and the delete. It references the sockhash itself, so it is
//!   loaded once per map (its fd replaces the object's `held` map before load).
//!
//! The sockhash iterator is no snapshot: it restarts its current hash bucket after each read,
//! so an entry can be shown twice (records are deduplicated by key; the in-kernel delete keeps
//! each target's outcome in the `targets` map and acts at most once), and entries added or
//! removed during the read may or may not appear.

use std::collections::HashMap;
use std::io::{self, Read};
use std::mem::{self, ManuallyDrop, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::ptr::NonNull;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Iter, MapCore, MapFlags, Object, ObjectBuilder, OpenObject};

use crate::diag::TcpState;
use crate::key::{RawKey, KEY_LEN};
use crate::map::SockMap;

#[allow(clippy::all, clippy::pedantic, unsafe_op_in_unsafe_fn)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/sockmap_identity.skel.rs"));
}

use skel::{OpenSockmapIdentitySkel, SockmapIdentitySkel, SockmapIdentitySkelBuilder};

/// `struct identity_rec` of the BPF program: one per entry.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct IdentityRecord {
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
}
const _: () = assert!(mem::size_of::<IdentityRecord>() == 96);

/// `struct cad_rec` of the BPF program: one per target the iteration met.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct CadRecord {
    key: [u8; KEY_LEN],
    outcome: i32,
    cookie: u64,
}
const _: () = assert!(mem::size_of::<CadRecord>() == 56);

/// `struct cad_target`: the value of the program's `targets` map.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct CadTarget {
    cookie: u64,
    outcome: i32,
    pad: u32,
}
const _: () = assert!(mem::size_of::<CadTarget>() == 16);

/// Plain integers only, so every byte pattern is a valid value.
trait Record: Copy {}
impl Record for IdentityRecord {}
impl Record for CadRecord {}
impl Record for CadTarget {}

/// The compiled BPF object (the skeleton embeds the same bytes).
const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sockmap_identity.bpf.o"));
const CAD_PROGRAM: &str = "compare_and_delete";
const HELD_MAP: &str = "held";
const TARGETS_MAP: &str = "targets";

/// Targets per pass: the `targets` map's max_entries in the BPF program (CAD_BATCH).
const CAD_BATCH: usize = 8192;
/// Outcome codes of the BPF program.
const CAD_PENDING: i32 = 0;
const CAD_DELETED: i32 = 1;
const CAD_COOKIE_CHANGED: i32 = 2;

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

/// Bytes asked of the iterator per read(2). The kernel fills a buffer of 8 pages per read and
/// stops once it holds this much, so with a request well below 8 pages no record overflows
/// its buffer and has to be shown again.
const READ_CHUNK: usize = 16 * 1024;

/// The socket an entry holds, as the kernel has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeldSocket {
    /// `bpf_get_socket_cookie`: what sock_diag reports as `idiag_cookie`.
    pub cookie: u64,
    /// The held socket's own local end (as the kernel has it; IPv4 for AF_INET, and for an
    /// IPv4 connection on an AF_INET6 socket an IPv4-mapped IPv6 address). A socket that is
    /// no longer hashed (closed) reads port 0.
    pub local: SocketAddr,
    /// Its own remote end.
    pub remote: SocketAddr,
    pub state: TcpState,
    /// The inode of its network namespace (`net:[INODE]`, [`crate::netns::NetnsId::inode`]).
    pub netns_inode: u64,
}

/// The socket behind every entry of one map, from one pass of the iterator.
#[derive(Debug, Clone)]
pub struct Identities {
    pub map_id: u32,
    /// One per key, in the iterator's order.
    pub entries: Vec<(RawKey, HeldSocket)>,
}

/// How an in-kernel compare-and-delete of one target ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CadOutcome {
    /// The entry held the socket with the given cookie and was deleted.
    Deleted,
    /// The entry holds another socket now; it was kept.
    CookieChanged,
    /// The iteration never met the key: the entry was gone already.
    Gone,
    /// The delete failed with this errno; the entry was kept.
    Failed(i32),
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the kernel refused to load the socket-identity iterator (iter/sockmap){}: {error}; {hint}", errno_text(*errno))]
    LoadRefused {
        errno: Option<i32>,
        error: String,
        hint: &'static str,
    },
    #[error("the kernel refused to attach the socket-identity iterator to map {map_id} ({}){}: {error}; {hint}", path.display(), errno_text(*errno))]
    AttachRefused {
        map_id: u32,
        path: PathBuf,
        errno: Option<i32>,
        error: String,
        hint: &'static str,
    },
    #[error("reading the socket-identity iterator of map {map_id} failed after {bytes} bytes: {source}; try again, and check the kernel log if it persists")]
    Read {
        map_id: u32,
        bytes: usize,
        source: io::Error,
    },
    #[error("the socket-identity iterator of map {map_id} returned a malformed record: {what}; this binary and its BPF program disagree, rebuild sockmap-gc")]
    Malformed { map_id: u32, what: String },
    #[error("the kernel refused in-kernel compare-and-delete on map {map_id}{}: {error}; delete by key with the re-check instead", errno_text(*errno))]
    CompareAndDeleteRefused {
        map_id: u32,
        errno: Option<i32>,
        error: String,
    },
    #[error("compare-and-delete needs {} opened for writing; open it with Access::ReadWrite", path.display())]
    ReadOnlyMap { path: PathBuf },
    #[error("filling the compare-and-delete targets for map {map_id} failed: {error}; try again, and check memory limits if it persists")]
    Targets { map_id: u32, error: String },
}

impl IdentityError {
    /// Whether the kernel or the permissions refused the program: `--identity auto` falls
    /// back to tuple evidence (and the sweep to a delete by key with its re-check).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            IdentityError::LoadRefused { .. }
                | IdentityError::AttachRefused { .. }
                | IdentityError::CompareAndDeleteRefused { .. }
        )
    }
}

pub(crate) fn errno_text(errno: Option<i32>) -> String {
    match errno {
        Some(n) => format!(" (errno {n}, {})", errno_name(n)),
        None => String::new(),
    }
}

fn errno_name(n: i32) -> &'static str {
    match n {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::E2BIG => "E2BIG",
        libc::ENOENT => "ENOENT",
        libc::ENOMEM => "ENOMEM",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOSYS => "ENOSYS",
        libc::ESRCH => "ESRCH",
        // The kernel's internal ENOTSUPP, which BPF returns for helpers it lacks.
        524 => "ENOTSUPP",
        _ => "errno",
    }
}

fn load_hint(errno: Option<i32>) -> &'static str {
    match errno {
        Some(libc::EPERM | libc::EACCES) => {
            "run as root (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN), and check that no LSM or \
             lockdown policy forbids tracing programs; use --identity off to rely on tuple \
             evidence"
        }
        Some(libc::EINVAL | libc::E2BIG | libc::ENOENT | 524) => {
            "this kernel lacks iter/sockmap with BTF (Linux 5.10 or later with \
             CONFIG_DEBUG_INFO_BTF is needed); use --identity off to rely on tuple evidence"
        }
        _ => "use --identity off to rely on tuple evidence",
    }
}

/// The errno behind a libbpf-rs error. libbpf-rs keeps it inside a `std::io::Error`, whose
/// text ends in `(os error N)`, and does not expose it otherwise.
pub(crate) fn errno_of(error: &libbpf_rs::Error) -> Option<i32> {
    let text = error.to_string();
    let start = text.rfind("(os error ")? + "(os error ".len();
    let end = start + text[start..].find(')')?;
    text[start..end].parse().ok()
}

/// A loaded skeleton and the storage its object lives in. The skeleton borrows the storage
/// for its whole life, so both are owned here and freed in that order.
struct Loaded {
    skel: ManuallyDrop<SockmapIdentitySkel<'static>>,
    storage: NonNull<MaybeUninit<OpenObject>>,
}

// SAFETY: libbpf objects are not bound to a thread (libbpf-rs marks the skeleton and its
// object Send); `storage` is only the skeleton's own allocation, moved together with it.
unsafe impl Send for Loaded {}

impl Loaded {
    fn load(
        configure: impl FnOnce(&mut OpenSockmapIdentitySkel<'static>) -> libbpf_rs::Result<()>,
    ) -> libbpf_rs::Result<Loaded> {
        let storage = NonNull::from(Box::leak(Box::new(MaybeUninit::<OpenObject>::uninit())));
        // SAFETY: `storage` is a fresh allocation that nothing else references; it is freed
        // only after the skeleton that borrows it is gone (below on error, in Drop otherwise).
        let object: &'static mut MaybeUninit<OpenObject> = unsafe { &mut *storage.as_ptr() };
        let loaded = SockmapIdentitySkelBuilder::default()
            .open(object)
            .and_then(|mut open| {
                configure(&mut open)?;
                open.load()
            });
        match loaded {
            Ok(skel) => Ok(Loaded {
                skel: ManuallyDrop::new(skel),
                storage,
            }),
            Err(error) => {
                // SAFETY: the failed skeleton was dropped inside `open`/`load`, ending every
                // borrow of the storage; Box::from_raw takes back the allocation made above
                // (a MaybeUninit, so no value is dropped twice).
                drop(unsafe { Box::from_raw(storage.as_ptr()) });
                Err(error)
            }
        }
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        // SAFETY: the skeleton is dropped exactly once, here, before the storage it borrows;
        // the storage came from Box::leak in `Loaded::load` and is freed exactly once.
        unsafe {
            ManuallyDrop::drop(&mut self.skel);
            drop(Box::from_raw(self.storage.as_ptr()));
        }
    }
}

/// Whether to look at the socket behind each entry: `--identity` and the `identity` config key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IdentityMode {
    /// Use the iterator when the kernel allows it; else warn once and use tuple evidence.
    #[default]
    Auto,
    /// Use the iterator; a refusal is an error.
    On,
    /// Tuple evidence only.
    Off,
}

/// The identity iterator as the commands use it: absent when off, or when `auto` met a
/// refusal (warned once); in-kernel compare-and-delete given up after its first refusal.
pub struct IdentitySource {
    mode: IdentityMode,
    reader: Option<IdentityReader>,
    cad_refused: bool,
}

impl IdentitySource {
    pub fn new(mode: IdentityMode) -> Result<IdentitySource, IdentityError> {
        let reader = match mode {
            IdentityMode::Off => None,
            IdentityMode::On => Some(IdentityReader::new()?),
            IdentityMode::Auto => match IdentityReader::new() {
                Ok(reader) => Some(reader),
                Err(e) if e.is_refusal() => {
                    warn_fallback(&e);
                    None
                }
                Err(e) => return Err(e),
            },
        };
        Ok(IdentitySource {
            mode,
            reader,
            cad_refused: false,
        })
    }

    /// Tuple evidence only.
    pub fn off() -> IdentitySource {
        IdentitySource {
            mode: IdentityMode::Off,
            reader: None,
            cad_refused: false,
        }
    }

    pub fn is_active(&self) -> bool {
        self.reader.is_some()
    }

    /// The socket behind every entry, or `None` when identity is not in use.
    pub fn read(&mut self, map: &SockMap) -> Result<Option<Identities>, IdentityError> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(None);
        };
        match reader.read(map) {
            Ok(ids) => Ok(Some(ids)),
            Err(e) if e.is_refusal() && self.mode == IdentityMode::Auto => {
                warn_fallback(&e);
                self.reader = None;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// In-kernel compare-and-delete, or `None` when it is not available: the caller then
    /// deletes by key.
    pub fn compare_and_delete(
        &mut self,
        map: &SockMap,
        targets: &[(RawKey, u64)],
    ) -> Result<Option<Vec<(RawKey, CadOutcome)>>, IdentityError> {
        let Some(reader) = self.reader.as_mut().filter(|_| !self.cad_refused) else {
            return Ok(None);
        };
        match reader.compare_and_delete(map, targets) {
            Ok(outcomes) => Ok(Some(outcomes)),
            Err(e) if e.is_refusal() => {
                tracing::warn!(error = %e, "in-kernel compare-and-delete refused; deleting by key after the re-check");
                self.cad_refused = true;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// libbpf prints its own diagnostics to stderr; an operator sees our one-line error
/// instead, and the details with `RUST_LOG=libbpf=debug`.
pub(crate) fn route_libbpf_messages() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Debug, |_, msg| {
            tracing::debug!(target: "libbpf", "{}", msg.trim_end());
        })));
    });
}

fn warn_fallback(e: &IdentityError) {
    tracing::warn!(error = %e, "socket identity unavailable; judging by tuple evidence only (--identity on makes this an error)");
}

/// Loaded once, reused across reads (the daemon keeps one).
pub struct IdentityReader {
    identity: Loaded,
    /// The compare-and-delete program, loaded for one map (by id) on first use.
    cad: Option<(u32, Object)>,
}

impl IdentityReader {
    /// Loads the identity iterator; a refusal ([`IdentityError::is_refusal`]) means this
    /// kernel or these permissions do not allow it.
    pub fn new() -> Result<IdentityReader, IdentityError> {
        route_libbpf_messages();
        let identity = Loaded::load(|open| {
            open.progs.compare_and_delete.set_autoload(false);
            // Made only by the compare-and-delete object.
            open.maps.held.set_autocreate(false)?;
            open.maps.targets.set_autocreate(false)
        })
        .map_err(|e| {
            let errno = errno_of(&e);
            IdentityError::LoadRefused {
                errno,
                error: format!("{e:#}"),
                hint: load_hint(errno),
            }
        })?;
        Ok(IdentityReader {
            identity,
            cad: None,
        })
    }

    /// One pass over the whole map: the socket behind every entry.
    pub fn read(&mut self, map: &SockMap) -> Result<Identities, IdentityError> {
        let link = self
            .identity
            .skel
            .progs
            .identity
            .attach_iter(map.fd())
            .map_err(|e| attach_refused(map, &e))?;
        // Sized for a full map once, rather than grown through copies (capped, as the map's
        // own size is not ours to trust with an allocation).
        let capacity = usize::try_from(map.max_entries()).map_or(0, |n| n.min(1 << 20));
        let mut index: HashMap<RawKey, usize> = HashMap::with_capacity(capacity);
        let mut entries: Vec<(RawKey, HeldSocket)> = Vec::with_capacity(capacity);
        // Parsed as the bytes come: a full map's records as a buffer and again as a list
        // would double what the read costs in memory.
        let mut partial: Vec<u8> = Vec::with_capacity(mem::size_of::<IdentityRecord>());
        read_chunks(map.id(), &link, |chunk| {
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
                for record in parse_records::<IdentityRecord>(map.id(), &whole)? {
                    file_entry(map.id(), &record, &mut index, &mut entries)?;
                }
            }
            let whole = rest.len() - rest.len() % mem::size_of::<IdentityRecord>();
            for record in parse_records::<IdentityRecord>(map.id(), &rest[..whole])? {
                file_entry(map.id(), &record, &mut index, &mut entries)?;
            }
            partial.extend_from_slice(&rest[whole..]);
            Ok(())
        })?;
        if !partial.is_empty() {
            return Err(IdentityError::Malformed {
                map_id: map.id(),
                what: format!(
                    "the read ended inside a record ({} of {} bytes)",
                    partial.len(),
                    mem::size_of::<IdentityRecord>()
                ),
            });
        }
        Ok(Identities {
            map_id: map.id(),
            entries,
        })
    }

    /// Deletes each target's entry from inside the kernel only if it still holds the socket
    /// with the given cookie. One outcome per target, in order. A key given twice is handled
    /// in a later pass the second time (it is then `Gone` if the first pass deleted it).
    ///
    /// Fails with [`IdentityError::CompareAndDeleteRefused`] when the kernel refuses the
    /// program: delete by key with the re-check instead.
    pub fn compare_and_delete(
        &mut self,
        map: &SockMap,
        targets: &[(RawKey, u64)],
    ) -> Result<Vec<(RawKey, CadOutcome)>, IdentityError> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        require_writable(map)?;
        let object = self.cad_for(map)?;
        let program = find_program(object, CAD_PROGRAM, map.id())?;
        let table = object
            .maps()
            .find(|m| m.name() == TARGETS_MAP)
            .ok_or_else(|| IdentityError::Malformed {
                map_id: map.id(),
                what: format!("the BPF object has no map {TARGETS_MAP}"),
            })?;
        let mut results = Vec::with_capacity(targets.len());
        for chunk in chunks(targets) {
            results.extend(cad_pass(&program, &table, map, chunk)?);
        }
        Ok(results)
    }

    fn cad_for(&mut self, map: &SockMap) -> Result<&Object, IdentityError> {
        if !matches!(&self.cad, Some((id, _)) if *id == map.id()) {
            // Drop the program of a replaced map before loading the next one.
            self.cad = None;
            let object = load_cad(map).map_err(|e| IdentityError::CompareAndDeleteRefused {
                map_id: map.id(),
                errno: errno_of(&e),
                error: format!("{e:#}"),
            })?;
            self.cad = Some((map.id(), object));
        }
        match &self.cad {
            Some((_, object)) => Ok(object),
            None => Err(IdentityError::CompareAndDeleteRefused {
                map_id: map.id(),
                errno: None,
                error: "the program was not kept after loading".to_string(),
            }),
        }
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

fn attach_refused(map: &SockMap, e: &libbpf_rs::Error) -> IdentityError {
    let errno = errno_of(e);
    IdentityError::AttachRefused {
        map_id: map.id(),
        path: map.path().to_path_buf(),
        errno,
        error: format!("{e:#}"),
        hint: match errno {
            Some(libc::EACCES) => {
                "the map's keys are shorter than the 44 bytes the program reads: point --map \
                 at Cilium's cilium_sock_ops"
            }
            Some(libc::EPERM) => "run as root; use --identity off to rely on tuple evidence",
            _ => "use --identity off to rely on tuple evidence",
        },
    }
}

/// Splits targets into passes of at most CAD_BATCH distinct keys, in order.
fn chunks(targets: &[(RawKey, u64)]) -> Vec<&[(RawKey, u64)]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut keys = std::collections::HashSet::new();
    for (i, (key, _)) in targets.iter().enumerate() {
        if keys.len() == CAD_BATCH || !keys.insert(*key) {
            out.push(&targets[start..i]);
            start = i;
            keys.clear();
            keys.insert(*key);
        }
    }
    out.push(&targets[start..]);
    out
}

/// One pass: fill `targets`, run the iterator once, collect outcomes, empty `targets`.
fn cad_pass(
    program: &libbpf_rs::ProgramMut<'_>,
    table: &libbpf_rs::Map<'_>,
    map: &SockMap,
    chunk: &[(RawKey, u64)],
) -> Result<Vec<(RawKey, CadOutcome)>, IdentityError> {
    let id = map.id();
    let fill_error = |e: libbpf_rs::Error| IdentityError::Targets {
        map_id: id,
        error: format!("{e:#}"),
    };
    // Left over from a pass that failed half-way.
    let stale: Vec<Vec<u8>> = table.keys().collect();
    for key in stale {
        table.delete(&key).map_err(fill_error)?;
    }
    // One syscall each way for the whole chunk (hash map batch ops, Linux 5.6).
    let count = u32::try_from(chunk.len()).map_err(|_| IdentityError::Targets {
        map_id: id,
        error: format!("{} targets in one pass", chunk.len()),
    })?;
    let mut keys = Vec::with_capacity(chunk.len() * KEY_LEN);
    let mut values = Vec::with_capacity(chunk.len() * mem::size_of::<CadTarget>());
    for (key, cookie) in chunk {
        keys.extend_from_slice(&key.0);
        let value = CadTarget {
            cookie: *cookie,
            outcome: CAD_PENDING,
            pad: 0,
        };
        values.extend_from_slice(record_bytes(&value));
    }
    table
        .update_batch(&keys, &values, count, MapFlags::ANY, MapFlags::ANY)
        .map_err(fill_error)?;
    let link =
        program
            .attach_iter(map.fd())
            .map_err(|e| IdentityError::CompareAndDeleteRefused {
                map_id: id,
                errno: errno_of(&e),
                error: format!("{e:#}"),
            })?;
    let read = read_iter(id, &link);
    drop(link);
    let records: Vec<CadRecord> = parse_records(id, &read?)?;
    let mut met: HashMap<RawKey, i32> =
        records.iter().map(|r| (RawKey(r.key), r.outcome)).collect();
    let mut results = Vec::with_capacity(chunk.len());
    for (key, _) in chunk {
        // A record lost to a read boundary still left its outcome in the target.
        let code = match met.remove(key) {
            Some(code) => code,
            None => stored_outcome(id, table, key)?,
        };
        results.push((*key, outcome(id, key, code)?));
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
        Some(bytes) => Ok(parse_records::<CadTarget>(map_id, &bytes)?
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
        // Removed between the lookup and the delete: gone by itself.
        n if n == -libc::ENOENT => Ok(CadOutcome::Gone),
        n if n < 0 => Ok(CadOutcome::Failed(-n)),
        n => Err(IdentityError::Malformed {
            map_id,
            what: format!("unknown outcome {n} for key {}", key.to_hex()),
        }),
    }
}

/// Refuses a map opened read-only: the program would delete through it regardless.
fn require_writable(map: &SockMap) -> Result<(), IdentityError> {
    let flags = nix::fcntl::fcntl(map.fd(), nix::fcntl::FcntlArg::F_GETFL).map_err(|e| {
        IdentityError::CompareAndDeleteRefused {
            map_id: map.id(),
            errno: Some(e as i32),
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

/// Files one record's entry; a bucket shown again after a read boundary replaces the earlier
/// sighting, which is older.
fn file_entry(
    map_id: u32,
    record: &IdentityRecord,
    index: &mut HashMap<RawKey, usize>,
    entries: &mut Vec<(RawKey, HeldSocket)>,
) -> Result<(), IdentityError> {
    let key = RawKey(record.key);
    let held = held_socket(map_id, record)?;
    match index.get(&key).and_then(|&at| entries.get_mut(at)) {
        Some(entry) => entry.1 = held,
        None => {
            index.insert(key, entries.len());
            entries.push((key, held));
        }
    }
    Ok(())
}

/// Reads the iterator to its end.
fn read_iter(map_id: u32, link: &libbpf_rs::Link) -> Result<Vec<u8>, IdentityError> {
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

fn parse_records<T: Record>(map_id: u32, bytes: &[u8]) -> Result<Vec<T>, IdentityError> {
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

fn record_bytes<T: Record>(value: &T) -> &[u8] {
    // SAFETY: `value` is a live T of size_of::<T>() bytes, readable as bytes for the borrow's
    // life; the records are #[repr(C)] with explicit padding fields, so no byte is
    // uninitialised.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), mem::size_of::<T>()) }
}

fn held_socket(map_id: u32, r: &IdentityRecord) -> Result<HeldSocket, IdentityError> {
    let (local, remote) = match r.family {
        AF_INET => {
            let ip = |a: &[u8; 16]| IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]));
            (ip(&r.local_addr), ip(&r.remote_addr))
        }
        AF_INET6 => (
            IpAddr::V6(Ipv6Addr::from(r.local_addr)),
            IpAddr::V6(Ipv6Addr::from(r.remote_addr)),
        ),
        other => {
            return Err(IdentityError::Malformed {
                map_id,
                what: format!(
                    "key {} holds a socket of family {other}, not AF_INET or AF_INET6",
                    RawKey(r.key).to_hex()
                ),
            })
        }
    };
    Ok(HeldSocket {
        cookie: r.cookie,
        local: SocketAddr::new(local, r.local_port),
        remote: SocketAddr::new(remote, r.remote_port),
        state: TcpState::from_kernel(r.state),
        netns_inode: u64::from(r.netns_inode),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
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
        let c = CadRecord {
            key: [0; KEY_LEN],
            outcome: 0,
            cookie: 0,
        };
        let base = std::ptr::addr_of!(c) as usize;
        assert_eq!(std::ptr::addr_of!(c.outcome) as usize - base, 44);
        assert_eq!(std::ptr::addr_of!(c.cookie) as usize - base, 48);
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
        let bytes = &record_bytes(&r)[..95];
        assert!(matches!(
            parse_records::<IdentityRecord>(3, bytes),
            Err(IdentityError::Malformed { map_id: 3, .. })
        ));
    }

    #[test]
    fn outcome_codes() {
        let k = RawKey([0; KEY_LEN]);
        assert_eq!(outcome(1, &k, 0).unwrap(), CadOutcome::Gone);
        assert_eq!(outcome(1, &k, 1).unwrap(), CadOutcome::Deleted);
        assert_eq!(outcome(1, &k, 2).unwrap(), CadOutcome::CookieChanged);
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
        let many: Vec<(RawKey, u64)> = (0..(CAD_BATCH as u32 * 2 + 5))
            .map(|i| (key(i), 1))
            .collect();
        let sizes: Vec<usize> = chunks(&many).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![CAD_BATCH, CAD_BATCH, 5]);
        let repeated = [(key(1), 1), (key(2), 2), (key(1), 3)];
        let sizes: Vec<usize> = chunks(&repeated).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![2, 1]);
    }

    #[test]
    fn errno_is_read_from_the_error_text() {
        let e = libbpf_rs::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(errno_of(&e), Some(libc::EPERM));
        let refused = IdentityError::LoadRefused {
            errno: Some(libc::EPERM),
            error: e.to_string(),
            hint: load_hint(Some(libc::EPERM)),
        };
        assert!(refused.is_refusal());
        assert!(refused.to_string().contains("EPERM"));
        let read = IdentityError::Read {
            map_id: 1,
            bytes: 0,
            source: io::Error::other("x"),
        };
        assert!(!read.is_refusal());
    }
}
