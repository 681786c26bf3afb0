//! Finds the processes that hold given socket inodes: the `iter/task_file` program where the
//! kernel allows it, else a scan of `/proc/*/fd`; then each holder's comm and cgroup.
//!
//! The program (bpf/sockmap_holders.bpf.c, CO-RE) walks every open file of every process in
//! one read and keeps only socket files, with no ptrace rights over those processes. The
//! `/proc/PID/fd` scan needs those rights (root with CAP_SYS_PTRACE, or the same user and
//! no more capabilities than ours): a process it may not read makes the search incomplete,
//! never an error.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::mem;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libbpf_rs::{Iter, Object, ObjectBuilder};

use super::kubepods::{self, PodCgroup};
use super::Holder;

/// The compiled BPF object.
const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sockmap_holders.bpf.o"));
const PROGRAM: &str = "holders";

/// Bytes asked of the iterator per read(2): well below the kernel's 8-page buffer (see
/// identity's READ_CHUNK).
const READ_CHUNK: usize = 16 * 1024;

/// `struct holder_rec` of the BPF program: one per socket fd of a process.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct HolderRecord {
    inode: u64,
    tgid: u32,
    fd: u32,
    comm: [u8; 16],
}
const _: () = assert!(mem::size_of::<HolderRecord>() == 32);

/// How the holders were looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScanMethod {
    /// The `iter/task_file` program.
    Iterator,
    /// `/proc/*/fd` links.
    Procfs,
}

impl ScanMethod {
    pub fn label(self) -> &'static str {
        match self {
            ScanMethod::Iterator => "iterator",
            ScanMethod::Procfs => "procfs",
        }
    }
}

/// The holders of the inodes asked about.
#[derive(Debug, Clone)]
pub struct HolderScan {
    /// Holders per inode, for the inodes asked about that some process holds.
    pub holders: HashMap<u64, Vec<Holder>>,
    pub info: ScanInfo,
}

/// How a holder search went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanInfo {
    pub method: ScanMethod,
    /// Whether every process was looked at.
    pub complete: bool,
    /// Why the iterator was not used, or how many processes' fds could not be read.
    pub notes: Vec<String>,
    pub took: Duration,
}

/// The iterator program, loaded once and read per pass.
pub struct HolderReader {
    object: Object,
}

impl HolderReader {
    /// Loads the program; an error is the kernel's (or the permissions') refusal, in words.
    pub fn new() -> Result<HolderReader, String> {
        // It may load first (preloading): libbpf's messages go to the log, not to stderr.
        crate::identity::route_libbpf_messages();
        let mut open = ObjectBuilder::default()
            .open_memory(OBJECT)
            .map_err(|e| format!("opening the holder iterator: {e:#}"))?;
        for mut prog in open.progs_mut() {
            prog.set_autoload(prog.name() == PROGRAM);
        }
        let object = open.load().map_err(|e| {
            format!("the kernel refused the holder iterator (iter/task_file): {e:#}")
        })?;
        Ok(HolderReader { object })
    }

    /// The socket fds whose inode `keep` wants, of every process this pid namespace shows:
    /// (tgid, fd, inode, comm). Kept as the records are read, so a scan for some inodes never
    /// holds a node's ~100,000 socket fds as a list (a prefetch keeps them all: 32 bytes each).
    fn read(&self, keep: impl Fn(u64) -> bool) -> Result<Vec<HolderRecord>, String> {
        let program = self
            .object
            .progs_mut()
            .find(|p| p.name() == PROGRAM)
            .ok_or_else(|| format!("the holder BPF object has no program {PROGRAM}"))?;
        let link = program
            .attach()
            .map_err(|e| format!("the kernel refused to attach the holder iterator: {e:#}"))?;
        let mut iter =
            Iter::new(&link).map_err(|e| format!("opening the holder iterator: {e:#}"))?;
        let mut found = Vec::new();
        let mut total = 0;
        // The bytes read and not yet parsed: less than a record once each read is parsed.
        let mut pending = Vec::with_capacity(READ_CHUNK + mem::size_of::<HolderRecord>());
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match iter.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    total += n;
                    pending.extend_from_slice(&buf[..n]);
                    let whole = pending.len() - pending.len() % mem::size_of::<HolderRecord>();
                    let records = parse_records(&pending[..whole])?;
                    found.extend(records.into_iter().filter(|r| keep(r.inode)));
                    pending.drain(..whole);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(format!(
                        "reading the holder iterator failed after {total} bytes: {e}"
                    ))
                }
            }
        }
        if !pending.is_empty() {
            return Err(not_whole_records(total));
        }
        Ok(found)
    }
}

fn parse_records(bytes: &[u8]) -> Result<Vec<HolderRecord>, String> {
    let size = mem::size_of::<HolderRecord>();
    if !bytes.len().is_multiple_of(size) {
        return Err(not_whole_records(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(size)
        .map(|chunk| {
            // SAFETY: `chunk` holds exactly size_of::<HolderRecord>() bytes; HolderRecord is a
            // #[repr(C)] record of plain integers, so every byte pattern is a valid value, and
            // read_unaligned makes no alignment demand on the byte buffer.
            unsafe { chunk.as_ptr().cast::<HolderRecord>().read_unaligned() }
        })
        .collect())
}

/// Lowers the calling thread's priority by 10 nice levels (at most to 19) so that it runs on
/// what the map's read leaves of the cores. Best effort: a refusal only leaves it as it was.
fn yield_to_the_read() {
    // SAFETY: gettid has no preconditions; getpriority and setpriority with PRIO_PROCESS and
    // the caller's own thread id read and change only that thread's nice value.
    unsafe {
        let tid = libc::gettid().unsigned_abs();
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, nice.saturating_add(10).min(19));
    }
}

fn not_whole_records(bytes: usize) -> String {
    format!(
        "the holder iterator returned {bytes} bytes, no whole number of {}-byte records; \
         this binary and its BPF program disagree, rebuild sockmap-gc",
        mem::size_of::<HolderRecord>()
    )
}

fn comm_of(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The program loaded, every socket fd it read (sorted by inode; or why not), and how long
/// the read took.
type Prefetched = Result<(HolderReader, Result<Vec<HolderRecord>, String>, Duration), String>;

/// Where the holder search runs: `/proc` (or a fake one in tests), and the iterator once it
/// has loaded; a refusal is remembered and the search falls back to the procfs scan.
pub struct HolderSource {
    proc_root: PathBuf,
    reader: Option<Result<HolderReader, String>>,
    use_iterator: bool,
    /// The program being loaded and read on a thread of its own ([`HolderSource::prefetching`]).
    loading: Option<JoinHandle<Prefetched>>,
}

impl HolderSource {
    pub fn new(proc_root: impl Into<PathBuf>) -> HolderSource {
        HolderSource {
            proc_root: proc_root.into(),
            reader: None,
            use_iterator: true,
            loading: None,
        }
    }

    /// A source that loads the program and reads every socket fd now, on a thread of its own,
    /// for the next scan, which keeps those it asks for: for a one-shot audit, whose map read
    /// leaves a core idle. Loading the program (BTF relocations) and walking every fd of every
    /// process cost more than the audit's lookups; done while the map is read, they are off
    /// the audit's path, and done for nothing when no entry is stale. The walk then happens
    /// during the map's read rather than after it: a snapshot of who holds what, as before.
    pub fn prefetching(proc_root: impl Into<PathBuf>) -> HolderSource {
        let loading = std::thread::Builder::new()
            .name("smgc-holders".into())
            .spawn(|| {
                // Behind the map's read on a busy machine: its result is wanted only after
                // the read, and the read is the audit's longest step.
                yield_to_the_read();
                let reader = HolderReader::new()?;
                let started = Instant::now();
                // Sorted by inode here, off the audit's path: the scan then finds the stale
                // sockets' holders by search rather than by a pass over every socket fd.
                let records = reader.read(|_| true).map(|mut all| {
                    all.sort_unstable_by_key(|r| r.inode);
                    all
                });
                Ok((reader, records, started.elapsed()))
            })
            .ok();
        HolderSource {
            loading,
            ..HolderSource::new(proc_root)
        }
    }

    /// A source that never loads the program: the `/proc/*/fd` scan only.
    pub fn procfs_only(proc_root: impl Into<PathBuf>) -> HolderSource {
        HolderSource {
            use_iterator: false,
            ..HolderSource::new(proc_root)
        }
    }

    /// The holders of `wanted`. Never fails: what could not be looked at makes the scan
    /// incomplete and is said in its notes.
    pub fn scan(&mut self, wanted: &HashSet<u64>) -> HolderScan {
        let mut prefetched = None;
        // A prefetch's walk counts in the search's time, not the wait for it.
        let mut walked = Duration::ZERO;
        if let Some(thread) = self.loading.take() {
            let loaded = thread.join().unwrap_or_else(|_| {
                Err("the thread loading the holder iterator panicked".to_string())
            });
            self.reader = Some(loaded.map(|(reader, records, took)| {
                prefetched = Some(records);
                walked = took;
                reader
            }));
        }
        let now = Instant::now();
        let start = now.checked_sub(walked).unwrap_or(now);
        let mut notes = Vec::new();
        if self.use_iterator {
            let reader = self.reader.get_or_insert_with(HolderReader::new);
            let read = match prefetched {
                Some(records) => records.map(|by_inode| {
                    wanted
                        .iter()
                        .flat_map(|&inode| {
                            let from = by_inode.partition_point(|r| r.inode < inode);
                            by_inode
                                .get(from..)
                                .unwrap_or_default()
                                .iter()
                                .take_while(move |r| r.inode == inode)
                                .copied()
                        })
                        .collect()
                }),
                None => reader
                    .as_ref()
                    .map_err(Clone::clone)
                    .and_then(|r| r.read(|inode| wanted.contains(&inode))),
            };
            match read {
                Ok(records) => {
                    let found = records
                        .iter()
                        .map(|r| (r.inode, r.tgid, r.fd, comm_of(&r.comm)));
                    let holders = self.describe(found);
                    return HolderScan {
                        holders,
                        info: ScanInfo {
                            method: ScanMethod::Iterator,
                            complete: true,
                            notes,
                            took: start.elapsed(),
                        },
                    };
                }
                Err(e) => notes.push(e),
            }
        }
        let (found, denied) = match scan_procfs(&self.proc_root, wanted) {
            Ok(scanned) => scanned,
            Err(e) => {
                notes.push(format!("listing {}: {e}", self.proc_root.display()));
                (Vec::new(), 1)
            }
        };
        if denied > 0 && notes.len() < 2 {
            notes.push(format!(
                "{denied} processes' fds could not be read from {}/PID/fd (no ptrace rights)",
                self.proc_root.display()
            ));
        }
        let with_comm: Vec<(u64, u32, u32, String)> = found
            .into_iter()
            .map(|(inode, pid, fd)| (inode, pid, fd, read_comm(&self.proc_root, pid)))
            .collect();
        let holders = self.describe(with_comm);
        HolderScan {
            holders,
            info: ScanInfo {
                method: ScanMethod::Procfs,
                complete: denied == 0,
                notes,
                took: start.elapsed(),
            },
        }
    }

    /// Holders with their cgroup and pod, one `/proc/PID/cgroup` read per process.
    fn describe(
        &self,
        found: impl IntoIterator<Item = (u64, u32, u32, String)>,
    ) -> HashMap<u64, Vec<Holder>> {
        // A process's cgroup read and parsed once, however many stale sockets it holds.
        let mut cgroups: HashMap<u32, (Option<String>, Option<PodCgroup>)> = HashMap::new();
        let mut seen: HashSet<(u32, u32)> = HashSet::new();
        let mut out: HashMap<u64, Vec<Holder>> = HashMap::new();
        for (inode, pid, fd, comm) in found {
            // A record shown again after a read boundary.
            if !seen.insert((pid, fd)) {
                continue;
            }
            let (cgroup, pod) = cgroups
                .entry(pid)
                .or_insert_with(|| {
                    let cgroup = read_cgroup(&self.proc_root, pid);
                    let pod = cgroup.as_deref().and_then(kubepods::parse);
                    (cgroup, pod)
                })
                .clone();
            out.entry(inode).or_default().push(Holder {
                pid,
                fd,
                comm,
                cgroup,
                pod,
            });
        }
        for holders in out.values_mut() {
            holders.sort_by_key(|h| (h.pid, h.fd));
        }
        out
    }
}

/// (inode, pid, fd) of each fd linking to a wanted socket, and how many processes' fd
/// directories were denied to us.
type Scanned = (Vec<(u64, u32, u32)>, usize);

/// Reads every `proc_root/PID/fd` link; fails only when the process list cannot be read.
fn scan_procfs(proc_root: &Path, wanted: &HashSet<u64>) -> io::Result<Scanned> {
    let mut found = Vec::new();
    let mut denied = 0;
    for entry in fs::read_dir(proc_root)?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let fds = match fs::read_dir(entry.path().join("fd")) {
            Ok(fds) => fds,
            // Exited meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => {
                denied += 1;
                continue;
            }
        };
        for fd in fds.flatten() {
            let Some(fd_num) = fd.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(inode) = target.to_str().and_then(socket_inode) {
                if wanted.contains(&inode) {
                    found.push((inode, pid, fd_num));
                }
            }
        }
    }
    Ok((found, denied))
}

/// The inode of an fd link's target `socket:[INODE]`.
fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn read_comm(proc_root: &Path, pid: u32) -> String {
    fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
        .map(|c| c.trim_end_matches('\n').to_string())
        .unwrap_or_default()
}

/// The process's cgroup path (`/proc/PID/cgroup` is readable by anyone).
fn read_cgroup(proc_root: &Path, pid: u32) -> Option<String> {
    let text = fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    kubepods::cgroup_path(&text).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fake /proc under the system temp dir, removed on drop.
    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(test: &str) -> FakeProc {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "smgc-holder-{test}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            FakeProc(dir)
        }

        fn process(&self, pid: u32, comm: &str, cgroup: &str, fds: &[(u32, &str)]) {
            let dir = self.0.join(pid.to_string());
            fs::create_dir_all(dir.join("fd")).unwrap();
            fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            fs::write(dir.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
            for (fd, target) in fds {
                symlink(target, dir.join("fd").join(fd.to_string())).unwrap();
            }
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const POD: &str = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7c1e3f4a_1b2c_4d5e_8f90_a1b2c3d4e5f6.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope";

    #[test]
    fn procfs_scan_names_holders_with_their_pod() {
        let proc = FakeProc::new("scan");
        proc.process(
            4242,
            "nginx",
            POD,
            &[(0, "/dev/null"), (7, "socket:[555]"), (9, "socket:[556]")],
        );
        proc.process(
            17,
            "sshd",
            "/system.slice/ssh.service",
            &[(3, "socket:[600]")],
        );
        proc.process(
            18,
            "forked",
            "/system.slice/x.service",
            &[(4, "socket:[555]")],
        );
        fs::create_dir_all(proc.0.join("self")).unwrap();
        let wanted: HashSet<u64> = [555, 999].into();
        let scan = HolderSource::procfs_only(&proc.0).scan(&wanted);
        assert_eq!(scan.info.method, ScanMethod::Procfs);
        assert!(scan.info.complete, "{:?}", scan.info.notes);
        assert_eq!(
            scan.holders.len(),
            1,
            "only wanted inodes: {:?}",
            scan.holders
        );
        let holders = &scan.holders[&555];
        let pids: Vec<(u32, u32, &str)> = holders
            .iter()
            .map(|h| (h.pid, h.fd, h.comm.as_str()))
            .collect();
        assert_eq!(pids, [(18, 4, "forked"), (4242, 7, "nginx")]);
        let pod = holders[1].pod.as_ref().expect("nginx is in a pod");
        assert_eq!(pod.pod_uid, "7c1e3f4a-1b2c-4d5e-8f90-a1b2c3d4e5f6");
        assert_eq!(holders[1].cgroup.as_deref(), Some(POD));
        assert!(holders[0].pod.is_none());
    }

    #[test]
    fn a_denied_fd_directory_makes_the_scan_incomplete_not_failed() {
        // Root reads a mode-000 directory anyway: a missing /proc stands in for the denial.
        let scan = HolderSource::procfs_only("/nonexistent-smgc-proc").scan(&[1].into());
        assert!(!scan.info.complete);
        assert!(scan.holders.is_empty());
        let proc = FakeProc::new("denied");
        proc.process(5, "app", "/", &[(3, "socket:[1]")]);
        let fd_dir = proc.0.join("5/fd");
        fs::set_permissions(&fd_dir, fs::Permissions::from_mode(0o000)).unwrap();
        let scan = HolderSource::procfs_only(&proc.0).scan(&[1].into());
        fs::set_permissions(&fd_dir, fs::Permissions::from_mode(0o755)).unwrap();
        // As root the directory is still read; as a user it is denied and counted.
        assert_eq!(scan.info.complete, scan.holders.contains_key(&1));
    }

    #[test]
    fn fd_link_targets() {
        let table = [
            ("socket:[12345]", Some(12345)),
            ("socket:[]", None),
            ("pipe:[12345]", None),
            ("/dev/null", None),
            ("socket:[12x]", None),
        ];
        for (target, want) in table {
            assert_eq!(socket_inode(target), want, "{target}");
        }
    }

    #[test]
    fn records_parse_and_comm_stops_at_nul() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&77u64.to_ne_bytes());
        bytes.extend_from_slice(&4242u32.to_ne_bytes());
        bytes.extend_from_slice(&7u32.to_ne_bytes());
        bytes.extend_from_slice(b"nginx\0\0\0\0\0\0\0\0\0\0\0");
        let records = parse_records(&bytes).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(
            (records[0].inode, records[0].tgid, records[0].fd),
            (77, 4242, 7)
        );
        assert_eq!(comm_of(&records[0].comm), "nginx");
        assert!(parse_records(&bytes[..31]).is_err());
    }
}
