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
//!
//! `records` reads what the programs emit; `cad` runs the compare-and-delete passes.

use std::io;
use std::mem::{ManuallyDrop, MaybeUninit};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::ptr::NonNull;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Object, OpenObject};

use crate::key::RawKey;
use crate::map::SockMap;
use crate::socket::TcpState;

#[allow(clippy::all, clippy::pedantic, unsafe_op_in_unsafe_fn)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/sockmap_identity.skel.rs"));
}

use skel::{OpenSockmapIdentitySkel, SockmapIdentitySkel, SockmapIdentitySkelBuilder};

mod cad;
mod records;

/// The compiled BPF object (the skeleton embeds the same bytes).
const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sockmap_identity.bpf.o"));

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

fn errno_text(errno: Option<i32>) -> String {
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
fn errno_of(error: &libbpf_rs::Error) -> Option<i32> {
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
fn route_libbpf_messages() {
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
        let entries = records::read_entries(map.id(), map.max_entries(), &link)?;
        Ok(Identities {
            map_id: map.id(),
            entries,
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
