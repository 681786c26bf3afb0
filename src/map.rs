//! Opens the pinned sockhash, checks that it is Cilium's, snapshots its keys and deletes keys.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use libbpf_rs::{MapCore, MapHandle, MapType};

use crate::key::{RawKey, KEY_LEN};

/// Cilium v1.11's pin, written by the agent through bpftool.
pub const CILIUM_PIN: &str = "/sys/fs/bpf/tc/globals/cilium_sock_ops";
/// libbpf's by-name pin of the same map (`LIBBPF_PIN_BY_NAME`); it outlives an agent restart.
pub const LIBBPF_PIN: &str = "/sys/fs/bpf/cilium_sock_ops";

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("no pinned map at {path}: is Cilium running with socket acceleration? Give the pin with --map PATH")]
    NotFound { path: PathBuf },
    #[error("no pinned map at {} nor at {}: is Cilium running with socket acceleration? Give the pin with --map PATH", CILIUM_PIN, LIBBPF_PIN)]
    NoDefault,
    #[error("cannot open {path} as a BPF object: {error} (run as root, and point --map at a pin under the BPF filesystem, e.g. {CILIUM_PIN})")]
    Open { path: PathBuf, error: io::Error },
    #[error("{path} is not on the BPF filesystem, so it is no pinned map: point --map at Cilium's pin, e.g. {CILIUM_PIN}")]
    NotBpffs { path: PathBuf },
    #[error("{path} is a {found}, not a pinned map: point --map at Cilium's cilium_sock_ops pin")]
    NotAMap { path: PathBuf, found: String },
    #[error("{path} is a {found:?} map with {key_size}-byte keys; Cilium's cilium_sock_ops is a sockhash with {KEY_LEN}-byte keys: point --map at its pin")]
    WrongShape {
        path: PathBuf,
        found: MapType,
        key_size: u32,
    },
    #[error("walking the keys of {path} failed after {seen} keys: {error}; try again, and check the kernel log if it persists")]
    Walk {
        path: PathBuf,
        seen: usize,
        error: io::Error,
    },
    #[error("the keys of {path} changed too fast to walk: gave up after {steps} steps (is an agent re-filling the map?); try again")]
    Unstable { path: PathBuf, steps: usize },
}

/// How a delete by key ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    /// The kernel had removed the key meanwhile (its socket closed).
    AlreadyGone,
}

/// An opened, validated sockhash.
#[derive(Debug)]
pub struct SockMap {
    handle: MapHandle,
    path: PathBuf,
    id: u32,
    max_entries: u32,
    map_type: MapType,
    /// The pin's (device, inode) when it was the same before and after the open: while the
    /// path still has it, the path still holds this map (bpffs numbers its inodes without
    /// reuse), and [`SockMap::id_at_path_now`] needs one `stat` instead of an open.
    pin: Option<(u64, u64)>,
}

/// The keys of the map at one moment, with the map's identity.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub map_id: u32,
    pub keys: Vec<RawKey>,
}

/// Whether the map is opened for reading only (audit) or also for deleting (sweep).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

impl SockMap {
    /// Opens the map at `path`, or the first of Cilium's default pins that exists.
    pub fn open_default(path: Option<&Path>, access: Access) -> Result<SockMap, MapError> {
        if let Some(path) = path {
            return SockMap::open(path, access);
        }
        for candidate in [CILIUM_PIN, LIBBPF_PIN] {
            match SockMap::open(Path::new(candidate), access) {
                Err(MapError::NotFound { .. }) => continue,
                other => return other,
            }
        }
        Err(MapError::NoDefault)
    }

    pub fn open(path: &Path, access: Access) -> Result<SockMap, MapError> {
        let flags = match access {
            Access::ReadOnly => libbpf_sys::BPF_F_RDONLY,
            Access::ReadWrite => 0,
        };
        let pin_before = pin_of(path);
        let handle = match MapHandle::from_pinned_path_with_file_flags(path, flags) {
            Ok(handle) => handle,
            Err(_) => return Err(diagnose_open(path, flags)),
        };
        let kind = fd_kind(handle.as_fd());
        if kind != "map" {
            return Err(MapError::NotAMap {
                path: path.to_path_buf(),
                found: format!("pinned BPF {kind}"),
            });
        }
        let info = handle.info().map_err(|e| MapError::Open {
            path: path.to_path_buf(),
            error: io::Error::other(e.to_string()),
        })?;
        let map_type = info.map_type();
        if !matches!(map_type, MapType::Sockhash | MapType::Sockmap)
            || info.info.key_size as usize != KEY_LEN
        {
            return Err(MapError::WrongShape {
                path: path.to_path_buf(),
                found: map_type,
                key_size: info.info.key_size,
            });
        }
        let pin = pin_before.filter(|before| pin_of(path) == Some(*before));
        Ok(SockMap {
            id: info.info.id,
            max_entries: info.info.max_entries,
            map_type,
            handle,
            path: path.to_path_buf(),
            pin,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel's id of the map; a new id at the same path means an agent re-created it.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The id of the map pinned at this map's path *now*: this handle keeps reading the map
    /// it opened, whatever the path holds since. `Err(NotFound)` when nothing is pinned there.
    pub fn id_at_path_now(&self) -> Result<u32, MapError> {
        if self.pin.is_some() && pin_of(&self.path) == self.pin {
            return Ok(self.id);
        }
        SockMap::open(&self.path, Access::ReadOnly).map(|m| m.id)
    }

    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    pub fn map_type(&self) -> MapType {
        self.map_type
    }

    /// The map's fd, for attaching programs to it (the identity iterator).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.handle.as_fd()
    }

    /// Walks every key with `get_next_key`.
    ///
    /// Unlike libbpf-rs's `keys()`, a syscall error is an error, not a silent end. A key
    /// deleted under the walk makes the kernel restart from the first key, so keys are
    /// deduplicated and the walk is bounded.
    pub fn snapshot(&self) -> Result<Snapshot, MapError> {
        let fd = self.handle.as_fd().as_raw_fd();
        let bound = (self.max_entries as usize).saturating_mul(4).max(1024);
        let mut seen = HashSet::with_capacity(1024);
        let mut keys = Vec::with_capacity(1024);
        let mut prev: Option<[u8; KEY_LEN]> = None;
        for _ in 0..bound {
            let mut next = [0u8; KEY_LEN];
            let prev_ptr = prev
                .as_ref()
                .map_or(std::ptr::null(), |k| k.as_ptr().cast());
            // SAFETY: `prev_ptr` is null or points at KEY_LEN readable bytes, `next` has
            // KEY_LEN writable bytes, and the map's key size was checked to be KEY_LEN.
            let rc =
                unsafe { libbpf_sys::bpf_map_get_next_key(fd, prev_ptr, next.as_mut_ptr().cast()) };
            if rc != 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENOENT) {
                    return Ok(Snapshot {
                        map_id: self.id,
                        keys,
                    });
                }
                return Err(MapError::Walk {
                    path: self.path.clone(),
                    seen: keys.len(),
                    error: err,
                });
            }
            if seen.insert(next) {
                keys.push(RawKey(next));
            }
            prev = Some(next);
        }
        Err(MapError::Unstable {
            path: self.path.clone(),
            steps: bound,
        })
    }

    /// Deletes one key: one syscall, nothing else.
    pub fn delete(&self, key: &RawKey) -> io::Result<DeleteOutcome> {
        // SAFETY: the key buffer holds KEY_LEN bytes, the map's checked key size.
        let rc = unsafe {
            libbpf_sys::bpf_map_delete_elem(self.handle.as_fd().as_raw_fd(), key.0.as_ptr().cast())
        };
        if rc == 0 {
            return Ok(DeleteOutcome::Deleted);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            Ok(DeleteOutcome::AlreadyGone)
        } else {
            Err(err)
        }
    }
}

/// Says why libbpf-rs could not open `path` as a map: opens the object raw, which also
/// succeeds for a pinned program or link, so the message can name what was found.
fn diagnose_open(path: &Path, flags: u32) -> MapError {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return MapError::NotFound {
            path: path.to_path_buf(),
        };
    };
    let opts = libbpf_sys::bpf_obj_get_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_obj_get_opts>() as libbpf_sys::size_t,
        file_flags: flags,
        ..Default::default()
    };
    // SAFETY: `c_path` is a valid NUL-terminated string and `opts` a valid options struct.
    let rc = unsafe { libbpf_sys::bpf_obj_get_opts(c_path.as_ptr(), &opts) };
    if rc < 0 {
        let error = io::Error::from_raw_os_error(-rc);
        return if error.kind() == io::ErrorKind::NotFound {
            MapError::NotFound {
                path: path.to_path_buf(),
            }
        } else if path.is_dir() {
            MapError::NotAMap {
                path: path.to_path_buf(),
                found: "directory".to_string(),
            }
        } else if !on_bpffs(path) {
            MapError::NotBpffs {
                path: path.to_path_buf(),
            }
        } else {
            MapError::Open {
                path: path.to_path_buf(),
                error,
            }
        };
    }
    // SAFETY: a non-negative return of bpf_obj_get is a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(rc) };
    MapError::NotAMap {
        path: path.to_path_buf(),
        found: format!("pinned BPF {}", fd_kind(fd.as_fd())),
    }
}

fn on_bpffs(path: &Path) -> bool {
    // BPF_FS_MAGIC from include/uapi/linux/magic.h.
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    // The field's type differs between architectures, hence the cast.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
        .unwrap_or(true)
}

/// "map", "prog", "link", ... as the kernel names the fd's anonymous inode.
/// The (device, inode) of the pin at `path`, if it can be read.
fn pin_of(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn fd_kind(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .ok()
        .and_then(|p| {
            p.to_str()
                .and_then(|s| s.strip_prefix("anon_inode:bpf-"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "object of unknown kind".to_string())
}
