//! Runs work inside network namespaces, on dedicated threads.
//!
//! sock_diag answers only for the namespace its netlink socket was created in, so reading a
//! namespace means entering it. `setns` moves only the calling thread: the walk runs on
//! threads of its own that `setns` into one namespace after the other and are thrown away at
//! the end, so nothing needs to be restored, and no caller's thread (nor a tokio worker) ever
//! changes namespace.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use super::{Netns, NetnsId};

/// Threads walking namespaces in parallel.
const WORKERS: usize = 2;

/// Why a namespace could not be entered (or its worker did not report).
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("cannot open namespace file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a network namespace (setns: EINVAL)")]
    NotNetns { path: PathBuf },
    #[error(
        "cannot enter the network namespace {path}: {source}; needs CAP_SYS_ADMIN (run as root)"
    )]
    Setns { path: PathBuf, source: nix::Error },
    #[error("cannot start a namespace worker thread: {0}")]
    Spawn(io::Error),
    #[error("the namespace worker thread died before reading this namespace")]
    WorkerLost,
}

/// What a walk did, namespace by namespace (what was read went to the sink).
#[derive(Debug)]
pub struct Walked<E> {
    /// Namespaces the work completed in.
    pub read: usize,
    /// Namespaces gone between discovery and the walk (no path reaches them any more).
    pub vanished: Vec<Netns>,
    /// Namespaces that exist but could not be entered, or where the work failed.
    pub failed: Vec<(Netns, E)>,
}

/// What became of one namespace.
enum Visit<T, E> {
    Read(T),
    Vanished,
    Failed(E),
}

/// Runs `work` inside every namespace in `namespaces`, on dedicated threads (at most
/// [`WORKERS`]) that `setns` into one namespace after the other and are discarded at the end.
/// `work` gets a scratch buffer kept by its thread across namespaces. What it reads goes to
/// `sink`, on the calling thread, as it comes in.
pub(crate) fn walk<T, E, W>(
    namespaces: &[Netns],
    work: W,
    sink: &mut dyn FnMut(&Netns, T),
) -> Walked<E>
where
    W: Fn(&Netns, &mut Vec<u8>) -> Result<T, E> + Sync,
    T: Send,
    E: From<WalkError> + fmt::Display + Send,
{
    let mut results: Vec<Option<Visit<(), E>>> = Vec::new();
    results.resize_with(namespaces.len(), || None);
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel::<(usize, Visit<T, E>)>();
    let mut spawn_error: Option<io::Error> = None;
    let mut spawned = 0usize;
    let work = &work;

    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for n in 0..WORKERS.min(namespaces.len()) {
            let tx = tx.clone();
            let next = &next;
            let handle = std::thread::Builder::new()
                .name(format!("smgc-netns-{n}"))
                .spawn_scoped(scope, move || {
                    let mut buf = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(ns) = namespaces.get(i) else { break };
                        if tx.send((i, visit(ns, &mut buf, work))).is_err() {
                            break;
                        }
                    }
                });
            match handle {
                Ok(h) => {
                    spawned += 1;
                    handles.push(h);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a namespace worker thread");
                    spawn_error = Some(e);
                }
            }
        }
        drop(tx);
        for (i, visit) in rx {
            let (Some(slot), Some(ns)) = (results.get_mut(i), namespaces.get(i)) else {
                continue;
            };
            *slot = Some(match visit {
                Visit::Read(read) => {
                    sink(ns, read);
                    Visit::Read(())
                }
                Visit::Vanished => Visit::Vanished,
                Visit::Failed(e) => Visit::Failed(e),
            });
        }
        for h in handles {
            // A panicking worker leaves its namespace without a result: reported below.
            if h.join().is_err() {
                tracing::error!("a namespace worker thread panicked");
            }
        }
    });

    let mut walked = Walked {
        read: 0,
        vanished: Vec::new(),
        failed: Vec::new(),
    };
    for (ns, result) in namespaces.iter().zip(results) {
        match result {
            Some(Visit::Read(())) => walked.read += 1,
            Some(Visit::Vanished) => walked.vanished.push(ns.clone()),
            Some(Visit::Failed(e)) => walked.failed.push((ns.clone(), e)),
            None => {
                let e = match &spawn_error {
                    Some(e) if spawned == 0 => {
                        WalkError::Spawn(io::Error::new(e.kind(), e.to_string()))
                    }
                    _ => WalkError::WorkerLost,
                };
                walked.failed.push((ns.clone(), e.into()));
            }
        }
    }
    for (ns, e) in &walked.failed {
        tracing::warn!(netns = %ns, error = %e, "network namespace not inventoried");
    }
    walked
}

/// Enters `ns` on the calling (dedicated) thread and runs `work` there. Tries each of its
/// paths; the namespace vanished if none still reaches it.
fn visit<T, E, W>(ns: &Netns, buf: &mut Vec<u8>, work: &W) -> Visit<T, E>
where
    W: Fn(&Netns, &mut Vec<u8>) -> Result<T, E>,
    E: From<WalkError>,
{
    for path in ns.paths() {
        let failed = |source| {
            Visit::Failed(E::from(WalkError::Open {
                path: path.to_path_buf(),
                source,
            }))
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if is_gone(&e) => continue,
            Err(source) => return failed(source),
        };
        // The path may now lead elsewhere: a reused pid, or a bind mount removed and its
        // mount point left behind as an empty file.
        match file.metadata() {
            Ok(m) if NetnsId::from(&m) == ns.id => {}
            Ok(_) => continue,
            Err(source) => return failed(source),
        }
        if let Err(e) = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET) {
            let path = path.to_path_buf();
            return Visit::Failed(E::from(match e {
                nix::Error::EINVAL => WalkError::NotNetns { path },
                source => WalkError::Setns { path, source },
            }));
        }
        drop(file);
        return match work(ns, buf) {
            Ok(read) => Visit::Read(read),
            Err(e) => Visit::Failed(e),
        };
    }
    Visit::Vanished
}

/// Whether opening a namespace path failed because its holder is gone.
fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
}
