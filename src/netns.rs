//! Finds every network namespace on the node, each once, with a path that reaches it.
//!
//! Where namespaces are found, all under a root (`/` in production, a fake tree in tests):
//! - bind mounts in the directories runtimes use: `var/run/netns` and `run/netns` (`ip netns`,
//!   containerd's and CRI-O's CRI `cni-…` namespaces, podman), `var/run/docker/netns` and
//!   `run/docker/netns` (Docker);
//! - every `nsfs` mount of a network namespace listed in `proc/self/mountinfo`, wherever it
//!   is mounted (rootless podman, custom runtimes);
//! - `proc/self/ns/net` (this process, even when it cannot see its own pid), then
//!   `proc/PID/ns/net` and `proc/PID/task/TID/ns/net` for every process and thread (a thread
//!   may have `setns`'d alone into a namespace nothing else holds).
//!
//! Namespaces are deduplicated by the `(st_dev, st_ino)` that `stat` reports through the
//! path (it follows the magic link). Stable paths (bind mounts) are found first, so they become
//! [`Netns::path`]; a few other paths are kept as [`Netns::fallbacks`] in case a process exits
//! before the namespace is read.
//!
//! A `/proc/PID/ns/net` that cannot be `stat`ed (ptrace access refused: a process holding
//! capabilities this one lacks) is matched to an already found namespace through
//! `/proc/PID/net/dev`, whose inode is per namespace and needs no ptrace access; only
//! unmatched ones are reported as unreadable, since they may hide a namespace.
//!
//! Not found: namespaces held only by an open file descriptor or a socket, with no process,
//! thread or mount in them. Reaching those would mean walking every fd of every process.
//!
//! `walk` runs work inside each namespace found, on threads of its own.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

mod walk;

pub(crate) use walk::walk;
pub use walk::{WalkError, Walked};

/// How many extra paths a [`Netns`] keeps besides its first one.
const MAX_FALLBACKS: usize = 3;

/// Directories where runtimes bind-mount network namespace files, relative to the root.
const NETNS_DIRS: [(&str, &str); 4] = [
    ("var/run/netns", "netns"),
    ("run/netns", "netns"),
    ("var/run/docker/netns", "docker netns"),
    ("run/docker/netns", "docker netns"),
];

/// The identity of a network namespace: the device and inode of its `nsfs` file.
///
/// `inode` is what `ls -l /proc/PID/ns/net` shows as `net:[INODE]` and what a BPF program reads
/// as the socket's `skc_net` inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct NetnsId {
    pub dev: u64,
    pub inode: u64,
}

impl NetnsId {
    /// The namespace a path reaches (follows `/proc/PID/ns/net` magic links).
    pub fn of_path(path: &Path) -> io::Result<NetnsId> {
        fs::metadata(path).map(|m| NetnsId::from_metadata(&m))
    }

    /// The namespace of the calling thread (not of the process: threads may differ).
    pub fn of_current_thread() -> io::Result<NetnsId> {
        NetnsId::of_path(Path::new("/proc/thread-self/ns/net"))
    }

    fn from_metadata(m: &fs::Metadata) -> NetnsId {
        NetnsId {
            dev: m.dev(),
            inode: m.ino(),
        }
    }
}

impl From<&fs::Metadata> for NetnsId {
    fn from(m: &fs::Metadata) -> NetnsId {
        NetnsId::from_metadata(m)
    }
}

impl fmt::Display for NetnsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]", self.inode)
    }
}

/// One network namespace and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    pub id: NetnsId,
    /// The first path found that reaches the namespace (a bind mount when there is one).
    pub path: PathBuf,
    /// Other paths that reached it at discovery time, tried in order if `path` no longer does.
    pub fallbacks: Vec<PathBuf>,
    /// Who holds it, for people: `netns cni-1234`, `pid 1234 (nginx)`, `nsfs mount /x/y`.
    pub label: String,
}

impl Netns {
    /// A namespace given by path (e.g. on the command line). Only `stat`s the path: whether it
    /// really is a network namespace shows when the inventory tries to enter it.
    pub fn from_path(path: &Path, label: impl Into<String>) -> Result<Netns, NetnsError> {
        let id = NetnsId::of_path(path).map_err(|source| NetnsError::Stat {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Netns {
            id,
            path: path.to_path_buf(),
            fallbacks: Vec::new(),
            label: label.into(),
        })
    }

    /// Every path that reached this namespace, the preferred first.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.path.as_path()).chain(self.fallbacks.iter().map(PathBuf::as_path))
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.id, self.label, self.path.display())
    }
}

/// Why a namespace path could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot stat namespace file {path}: {source}; it may hide a network namespace (run as root with CAP_SYS_ADMIN and CAP_SYS_PTRACE)")]
    Stat { path: PathBuf, source: io::Error },
    #[error("cannot list {path}: {source}; without it the node's namespaces cannot be found (is procfs mounted there?)")]
    ListDir { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
}

impl NetnsError {
    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            NetnsError::Stat { path, .. }
            | NetnsError::ListDir { path, .. }
            | NetnsError::Read { path, .. } => path,
        }
    }
}

/// The namespaces found on the node.
#[derive(Debug, Default)]
pub struct Discovery {
    pub namespaces: Vec<Netns>,
    /// Paths that could not be examined other than because their holder is gone. Each may hide
    /// a namespace, so an inventory built on this discovery is incomplete while this is not
    /// empty.
    pub unreadable: Vec<NetnsError>,
    /// `/proc/PID/ns/net` paths that could not be `stat`ed (ptrace access refused, e.g. a
    /// process with more capabilities than this one) but whose namespace was recognised as
    /// one already found, through `/proc/PID/net/`: not a gap in the inventory.
    pub recognised: Vec<(PathBuf, NetnsId)>,
    /// Files in the namespace directories that are not namespace mounts: leftovers of a runtime
    /// that crashed between `umount` and `unlink`, or a mount this mount namespace does not
    /// see (a container without `rslave` propagation). Skipped; worth a warning.
    pub not_namespaces: Vec<PathBuf>,
}

/// Finds every network namespace reachable under `root` (`/` in production).
///
/// Fails only if `<root>/proc` cannot be listed; anything else is recorded in the result.
pub fn discover(root: &Path) -> Result<Discovery, NetnsError> {
    discover_with(root, NsCheck::Nsfs)
}

/// How to tell a namespace file from a leftover regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NsCheck {
    /// The file must live on `nsfs` (production).
    Nsfs,
    /// Accept any file (unit tests, where regular files stand in for namespaces).
    #[cfg(test)]
    Any,
}

/// Whether a lookup error means the holder is gone (a process exited, a mount was removed).
fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::ENOTDIR)
    )
}

struct Collector {
    check: NsCheck,
    by_id: HashMap<NetnsId, usize>,
    /// For each namespace, one `/proc` process or thread directory found in it.
    proc_dir_of: HashMap<NetnsId, PathBuf>,
    /// Unreadable `/proc` namespace paths: (path, its process or thread directory, error).
    pending: Vec<(PathBuf, PathBuf, io::Error)>,
    out: Discovery,
}

impl Collector {
    /// Records `path` (in `proc_dir` if it is a process' or thread's); `label` is computed only
    /// when it reaches a namespace not seen before.
    fn add(&mut self, path: PathBuf, proc_dir: Option<&Path>, label: impl FnOnce() -> String) {
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if is_gone(&e) => return,
            Err(source) => {
                tracing::debug!(path = %path.display(), error = %source, "namespace path unreadable");
                match proc_dir {
                    Some(dir) => self.pending.push((path, dir.to_path_buf(), source)),
                    None => self.out.unreadable.push(NetnsError::Stat { path, source }),
                }
                return;
            }
        };
        let id = NetnsId::from_metadata(&meta);
        if let Some(dir) = proc_dir {
            self.proc_dir_of
                .entry(id)
                .or_insert_with(|| dir.to_path_buf());
        }
        if let Some(&i) = self.by_id.get(&id) {
            let ns = &mut self.out.namespaces[i];
            if ns.fallbacks.len() < MAX_FALLBACKS && ns.path != path {
                ns.fallbacks.push(path);
            }
            return;
        }
        if !self.is_namespace(&path) {
            self.out.not_namespaces.push(path);
            return;
        }
        self.by_id.insert(id, self.out.namespaces.len());
        self.out.namespaces.push(Netns {
            id,
            path,
            fallbacks: Vec::new(),
            label: label(),
        });
    }

    /// Settles the unreadable `/proc` paths. `stat` and `readlink` of `/proc/PID/ns/net` need
    /// ptrace access to the process, but `/proc/PID/net/` does not, and the inode of
    /// `/proc/PID/net/dev` is allocated per network namespace (it is the namespace's own
    /// `/proc/net/dev` entry). A path whose `net/dev` matches that of a namespace already found
    /// is in that namespace; any other stays unreadable.
    fn resolve_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut by_fingerprint: HashMap<(u64, u64), NetnsId> = HashMap::new();
        for (id, dir) in &self.proc_dir_of {
            if let Some(fp) = proc_net_fingerprint(dir) {
                by_fingerprint.insert(fp, *id);
            }
        }
        for (path, dir, source) in std::mem::take(&mut self.pending) {
            match fs::metadata(dir.join("net/dev")) {
                Err(e) if is_gone(&e) => {}
                Ok(m) if by_fingerprint.contains_key(&(m.dev(), m.ino())) => {
                    let id = by_fingerprint[&(m.dev(), m.ino())];
                    self.out.recognised.push((path, id));
                }
                _ => self.out.unreadable.push(NetnsError::Stat { path, source }),
            }
        }
    }

    fn is_namespace(&self, path: &Path) -> bool {
        match self.check {
            NsCheck::Nsfs => nix::sys::statfs::statfs(path)
                .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
                .unwrap_or(false),
            #[cfg(test)]
            NsCheck::Any => true,
        }
    }

    /// Lists a directory; a missing one is empty, an unreadable one is recorded.
    fn list(&mut self, dir: &Path) -> Vec<fs::DirEntry> {
        match fs::read_dir(dir) {
            Ok(entries) => entries.filter_map(Result::ok).collect(),
            Err(e) if is_gone(&e) => Vec::new(),
            Err(source) => {
                self.out.unreadable.push(NetnsError::ListDir {
                    path: dir.to_path_buf(),
                    source,
                });
                Vec::new()
            }
        }
    }
}

fn discover_with(root: &Path, check: NsCheck) -> Result<Discovery, NetnsError> {
    let mut c = Collector {
        check,
        by_id: HashMap::new(),
        proc_dir_of: HashMap::new(),
        pending: Vec::new(),
        out: Discovery::default(),
    };

    // Bind mounts first: their paths outlive any process, so they make the best `path`.
    for (dir, kind) in NETNS_DIRS {
        let dir = root.join(dir);
        let mut entries = c.list(&dir);
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            c.add(entry.path(), None, || format!("{kind} {name}"));
        }
    }

    let proc_dir = root.join("proc");
    let mountinfo = proc_dir.join("self/mountinfo");
    match fs::read_to_string(&mountinfo) {
        Ok(text) => {
            for mount_point in nsfs_net_mounts(&text) {
                let label = format!("nsfs mount {}", mount_point.display());
                c.add(mount_point, None, || label);
            }
        }
        Err(e) if is_gone(&e) => {}
        Err(source) => c.out.unreadable.push(NetnsError::Read {
            path: mountinfo,
            source,
        }),
    }

    let self_dir = proc_dir.join("self");
    c.add(self_dir.join("ns/net"), Some(&self_dir), || {
        "this process".to_string()
    });

    let entries = fs::read_dir(&proc_dir).map_err(|source| NetnsError::ListDir {
        path: proc_dir.clone(),
        source,
    })?;
    let mut pids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let pid_dir = proc_dir.join(pid.to_string());
        c.add(pid_dir.join("ns/net"), Some(&pid_dir), || {
            format!("pid {pid}{}", comm_suffix(&pid_dir))
        });
        let task_dir = pid_dir.join("task");
        let mut tids: Vec<u32> = match fs::read_dir(&task_dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|&tid| tid != pid)
                .collect(),
            // Gone, or not listable: the leader's path above already covers the common case,
            // and an unlistable task dir of a live process is as opaque as its ns file.
            Err(_) => Vec::new(),
        };
        tids.sort_unstable();
        for tid in tids {
            let tid_dir = task_dir.join(tid.to_string());
            c.add(tid_dir.join("ns/net"), Some(&tid_dir), || {
                format!("pid {pid} tid {tid}{}", comm_suffix(&tid_dir))
            });
        }
    }
    c.resolve_pending();
    Ok(c.out)
}

/// `(st_dev, st_ino)` of a process' or thread's `net/dev`: the same for every process in one
/// network namespace, different across namespaces.
pub(crate) fn proc_net_fingerprint(dir: &Path) -> Option<(u64, u64)> {
    fs::metadata(dir.join("net/dev"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// ` (comm)` of a process or thread directory, or nothing if it cannot be read.
fn comm_suffix(dir: &Path) -> String {
    match fs::read_to_string(dir.join("comm")) {
        Ok(comm) => format!(" ({})", comm.trim_end()),
        Err(_) => String::new(),
    }
}

/// Mount points of network namespace files (`nsfs` mounts whose root is `net:[…]`) in a
/// `mountinfo` text. Mount points are used as written: they are paths in the reading process'
/// own mount namespace, not relative to the discovery root.
fn nsfs_net_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split(' ').next() != Some("nsfs") {
            continue;
        }
        let mut fields = left.split(' ');
        let (Some(root), Some(mount_point)) = (fields.nth(3), fields.next()) else {
            continue;
        };
        if root.starts_with("net:[") {
            out.push(PathBuf::from(unescape_mount_path(mount_point)));
        }
    }
    out
}

/// Undoes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` `\`).
fn unescape_mount_path(s: &str) -> String {
    use std::os::unix::ffi::OsStringExt;
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    std::ffi::OsString::from_vec(out)
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct FakeRoot(PathBuf);

    impl FakeRoot {
        fn new(test: &str) -> FakeRoot {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "smgc-netns-{test}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            FakeRoot(dir)
        }

        fn file(&self, rel: &str, content: &str) -> PathBuf {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, content).unwrap();
            p
        }

        fn link(&self, existing: &Path, rel: &str) -> PathBuf {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::hard_link(existing, &p).unwrap();
            p
        }

        /// `proc/PID/ns/net` as a symlink to `to`: a symlink loop when `to` is "net", standing in
        /// for a namespace that cannot be stat'ed (EACCES).
        fn ns_symlink(&self, pid: &str, to: impl AsRef<Path>) {
            let dir = self.0.join(format!("proc/{pid}/ns"));
            fs::create_dir_all(&dir).unwrap();
            std::os::unix::fs::symlink(to, dir.join("net")).unwrap();
        }
    }

    /// The only namespace `d` could not read is `rel`'s, below `root`.
    fn assert_unreadable(d: &Discovery, root: &FakeRoot, rel: &str) {
        let paths: Vec<&Path> = d.unreadable.iter().map(|e| e.path()).collect();
        assert_eq!(paths, vec![root.0.join(rel)]);
    }

    impl Drop for FakeRoot {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn fake_discover(root: &FakeRoot) -> Discovery {
        discover_with(&root.0, NsCheck::Any).unwrap()
    }

    #[test]
    fn dedupes_by_inode_and_prefers_bind_mounts() {
        let root = FakeRoot::new("dedupe");
        let host = root.file("proc/1/ns/net", "");
        root.file("proc/1/comm", "systemd\n");
        root.link(&host, "proc/77/ns/net");
        root.link(&host, "proc/77/task/78/ns/net");
        let pod = root.file("var/run/netns/cni-aaaa", "");
        root.link(&pod, "proc/500/ns/net");
        root.file("proc/500/comm", "pause\n");
        root.link(&pod, "run/netns/cni-aaaa");
        root.file("proc/not-a-pid/ns/net", "");

        let d = fake_discover(&root);
        assert!(d.unreadable.is_empty(), "{:?}", d.unreadable);
        assert_eq!(d.namespaces.len(), 2, "{:#?}", d.namespaces);

        let pod_ns = &d.namespaces[0];
        assert_eq!(pod_ns.path, pod);
        assert_eq!(pod_ns.label, "netns cni-aaaa");
        assert_eq!(pod_ns.id, NetnsId::of_path(&pod).unwrap());
        assert_eq!(
            pod_ns.fallbacks,
            vec![
                root.0.join("run/netns/cni-aaaa"),
                root.0.join("proc/500/ns/net")
            ]
        );

        let host_ns = &d.namespaces[1];
        assert_eq!(host_ns.path, host);
        assert_eq!(host_ns.label, "pid 1 (systemd)");
        assert_eq!(host_ns.fallbacks.len(), 2);
    }

    #[test]
    fn threads_in_their_own_namespace_are_found() {
        let root = FakeRoot::new("threads");
        root.file("proc/10/ns/net", "");
        root.file("proc/10/task/10/ns/net", "");
        root.file("proc/10/task/11/ns/net", "other");
        root.file("proc/10/task/11/comm", "worker\n");
        let d = fake_discover(&root);
        let labels: Vec<_> = d.namespaces.iter().map(|n| n.label.as_str()).collect();
        assert_eq!(labels, ["pid 10", "pid 10 tid 11 (worker)"]);
    }

    #[test]
    fn fallbacks_are_bounded() {
        let root = FakeRoot::new("bounded");
        let first = root.file("proc/1/ns/net", "");
        for pid in 2..20 {
            root.link(&first, &format!("proc/{pid}/ns/net"));
        }
        let d = fake_discover(&root);
        assert_eq!(d.namespaces.len(), 1);
        assert_eq!(d.namespaces[0].fallbacks.len(), MAX_FALLBACKS);
    }

    #[test]
    fn missing_dirs_and_exited_processes_are_not_errors() {
        let root = FakeRoot::new("missing");
        fs::create_dir_all(root.0.join("proc/42/ns")).unwrap(); // exited: no `net` entry
        root.file("proc/43/ns/net", "");
        let d = fake_discover(&root);
        assert_eq!(d.namespaces.len(), 1);
        assert!(d.unreadable.is_empty());
    }

    #[test]
    fn missing_proc_is_fatal() {
        let root = FakeRoot::new("noproc");
        let err = discover_with(&root.0, NsCheck::Any).unwrap_err();
        assert!(matches!(err, NetnsError::ListDir { .. }), "{err}");
        assert_eq!(err.path(), root.0.join("proc"));
    }

    #[test]
    fn dangling_symlink_is_gone_but_loop_is_unreadable() {
        let root = FakeRoot::new("links");
        root.ns_symlink("5", root.0.join("nowhere"));
        root.ns_symlink("6", "net");
        root.file("proc/6/net/dev", ""); // alive, in a namespace seen nowhere else
        let d = fake_discover(&root);
        assert!(d.namespaces.is_empty());
        assert_unreadable(&d, &root, "proc/6/ns/net");
    }

    #[test]
    fn unreadable_pid_in_a_known_namespace_is_recognised() {
        let root = FakeRoot::new("recognise");
        root.file("proc/1/ns/net", "");
        let net_dev = root.file("proc/1/net/dev", "");
        // pid 2 cannot be stat'ed (a symlink loop stands in for EACCES) but shares pid 1's
        // /proc/PID/net; pid 3 cannot be stat'ed and is elsewhere.
        for pid in ["2", "3"] {
            root.ns_symlink(pid, "net");
        }
        root.link(&net_dev, "proc/2/net/dev");
        root.file("proc/3/net/dev", "");
        let d = fake_discover(&root);
        assert_eq!(d.namespaces.len(), 1);
        assert_eq!(
            d.recognised,
            vec![(root.0.join("proc/2/ns/net"), d.namespaces[0].id)]
        );
        assert_unreadable(&d, &root, "proc/3/ns/net");
    }

    #[test]
    fn nsfs_check_rejects_regular_files() {
        let root = FakeRoot::new("nsfs");
        root.file("var/run/netns/leftover", "");
        fs::create_dir_all(root.0.join("proc")).unwrap();
        let d = discover_with(&root.0, NsCheck::Nsfs).unwrap();
        assert!(d.namespaces.is_empty());
        assert_eq!(
            d.not_namespaces,
            vec![root.0.join("var/run/netns/leftover")]
        );
    }

    #[test]
    fn mountinfo_nsfs_entries_are_found() {
        let root = FakeRoot::new("mountinfo");
        let custom = root.file("elsewhere/my ns", "");
        let mountinfo = format!(
            "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
             600 25 0:4 net:[4026532500] {} rw shared:5 - nsfs nsfs rw\n\
             601 25 0:4 mnt:[4026532501] /x rw - nsfs nsfs rw\n\
             garbage line\n",
            custom.display().to_string().replace(' ', "\\040")
        );
        root.file("proc/self/mountinfo", &mountinfo);
        let d = fake_discover(&root);
        assert_eq!(d.namespaces.len(), 1);
        assert_eq!(d.namespaces[0].path, custom);
        assert!(d.namespaces[0].label.starts_with("nsfs mount "));
    }

    #[test]
    fn mountinfo_unescaping() {
        assert_eq!(unescape_mount_path(r"/a\040b\011c\134d"), "/a b\tc\\d");
        assert_eq!(unescape_mount_path(r"/trailing\04"), r"/trailing\04");
        assert_eq!(unescape_mount_path(r"\777x"), r"\777x");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }

    #[test]
    fn real_root_finds_this_threads_namespace() {
        let d = discover(Path::new("/")).unwrap();
        let mine = NetnsId::of_current_thread().unwrap();
        assert!(d.namespaces.iter().any(|n| n.id == mine), "{d:#?}");
        assert_eq!(mine.to_string(), format!("net:[{}]", mine.inode));
    }
}
