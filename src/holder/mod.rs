//! Who keeps a stale entry's dead socket alive: the holding process and its pod, the
//! listener's accept queue, or the kernel.
//!
//! [`diagnose`] runs only when an observation has stale entries: [`scan`] maps the stale
//! sockets' inodes (from identity) to the processes holding them (the `iter/task_file`
//! program, else `/proc/*/fd`), [`kubepods`] reads each holder's pod and container from its
//! cgroup path, and [`class`] decides each entry's [`HolderClass`]. [`summarize`] counts them
//! for the report's "stale by holder".

pub mod class;
pub mod kubepods;
pub mod scan;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use crate::identity::HeldSocket;
use crate::observation::Observation;

pub use class::{classify, Classified, HolderClass, Search, SocketFacts, UnknownHolder};
pub use kubepods::PodCgroup;
pub use scan::{HolderScan, HolderSource, ScanInfo, ScanMethod};

/// One process holding a socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    /// As the reader's pid namespace numbers it (the host's, with hostPID).
    pub pid: u32,
    pub fd: u32,
    pub comm: String,
    /// Its cgroup v2 path, from `/proc/PID/cgroup`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The Kubernetes pod and container that cgroup names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodCgroup>,
}

impl fmt::Display for Holder {
    /// `pid 4242 nginx, pod 7c1e3f4a… ctr 0123456789ab…`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} {}", self.pid, self.comm)?;
        if let Some(pod) = &self.pod {
            write!(f, ", {pod}")?;
        }
        Ok(())
    }
}

/// Why one stale entry's socket is alive, and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    pub classified: Classified,
    /// For `app-keeps-fd`: every process holding the socket (a forked child shares it).
    pub holders: Vec<Holder>,
}

impl Diagnosis {
    /// The entry whose socket the kernel described as `socket` (`None` without identity),
    /// given how the holder scan went (`None`: it did not run) and the holders it found for
    /// the socket's inode.
    pub fn of(
        socket: Option<SocketFacts>,
        scan: Option<&ScanInfo>,
        holders: Vec<Holder>,
    ) -> Diagnosis {
        let search = match scan {
            _ if !holders.is_empty() => Search::Found,
            Some(scan) if scan.complete => Search::NoneFound,
            _ => Search::Incomplete,
        };
        let classified = classify(socket, search);
        Diagnosis {
            holders: if classified.class == HolderClass::AppKeepsFd {
                holders
            } else {
                Vec::new()
            },
            classified,
        }
    }

    pub fn class(&self) -> HolderClass {
        self.classified.class
    }

    /// The report's holder column: the first holder (and how many more), or the class.
    pub fn column(&self) -> String {
        match self.holders.as_slice() {
            [] => self.class().to_string(),
            [one] => one.to_string(),
            [first, rest @ ..] => format!("{first} (+{} more)", rest.len()),
        }
    }
}

/// What the kernel says about a held socket, as the holder class weighs it.
pub fn facts(h: &HeldSocket) -> SocketFacts {
    SocketFacts {
        inode: h.inode,
        orphaned: h.orphaned,
    }
}

/// Who keeps each stale entry of one observation.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleHolders {
    /// One per stale entry, as (the entry's index in [`Observation::entries`], its
    /// diagnosis), in that order; [`diagnose`] runs on entries that stay as they are. By
    /// index, not by key: a report finds each stale row's as it selects the rows, with no
    /// 44-byte key hashed (it was, three times per stale row).
    pub diagnosed: Vec<(usize, Diagnosis)>,
    /// How the holders were searched; `None` when no stale socket had a file to search for
    /// (identity off, or only accept-queue and orphaned sockets).
    pub scan: Option<ScanInfo>,
}

impl StaleHolders {
    /// The diagnosis of the entry at `index` in the observation's entries.
    pub fn at(&self, index: usize) -> Option<&Diagnosis> {
        let i = self
            .diagnosed
            .binary_search_by_key(&index, |&(at, _)| at)
            .ok()?;
        Some(&self.diagnosed[i].1)
    }

    /// Every stale entry's diagnosis.
    pub fn diagnoses(&self) -> impl Iterator<Item = &Diagnosis> {
        self.diagnosed.iter().map(|(_, d)| d)
    }
}

/// The inodes whose holders are searched, given the stale entries' sockets: those a file
/// refers to (not an accept queue's or an orphan's).
pub fn wanted(stale: impl IntoIterator<Item = SocketFacts>) -> HashSet<u64> {
    stale
        .into_iter()
        .filter(searched)
        .map(|f| f.inode)
        .collect()
}

/// Whether the holders of the socket described by `f` are searched: a file refers to it, and
/// its application did not close it.
fn searched(f: &SocketFacts) -> bool {
    f.inode != 0 && !f.orphaned
}

/// A holder scan made before the verdicts were final: with identity, the iterator's read
/// already tells which entries are stale, so an observation can scan alongside its lookups
/// ([`crate::observe::observe_diagnosed`]).
#[derive(Debug)]
pub struct EarlyScan {
    /// The inodes it searched for.
    pub wanted: HashSet<u64>,
    pub scan: HolderScan,
}

/// Names who keeps each stale entry of `o` (in [`Observation::holders`]); does nothing when
/// it has none. Never fails: what the search could not see is `holder-unknown`.
pub fn diagnose(o: &mut Observation, source: &mut HolderSource) {
    diagnose_with(o, source, None);
}

/// [`diagnose`], with the scan `early` when it searched for every inode wanted now (else a
/// scan of its own, as [`diagnose`] makes).
pub fn diagnose_with(o: &mut Observation, source: &mut HolderSource, early: Option<EarlyScan>) {
    let stale: Vec<(usize, Option<SocketFacts>)> = o
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.verdict.is_stale())
        .map(|(at, e)| (at, e.held.as_ref().map(facts)))
        .collect();
    if stale.is_empty() {
        o.holders = None;
        return;
    }
    let wanted = wanted(stale.iter().filter_map(|(_, f)| *f));
    let mut scan = (!wanted.is_empty()).then(|| match early {
        Some(early) if wanted.is_subset(&early.wanted) => early.scan,
        _ => source.scan(&wanted),
    });
    // An inode is usually one stale entry's: its holders then move into that entry's
    // diagnosis instead of being copied (on a full map, copying was most of this step).
    let one_each = stale
        .iter()
        .filter(|(_, f)| f.is_some_and(|f| searched(&f)))
        .count()
        == wanted.len();
    let diagnosed = stale
        .into_iter()
        .map(|(at, f)| {
            let holders = match (f, scan.as_mut()) {
                (Some(f), Some(scan)) if searched(&f) && one_each => scan.holders.remove(&f.inode),
                (Some(f), Some(scan)) if searched(&f) => scan.holders.get(&f.inode).cloned(),
                _ => None,
            };
            let info = scan.as_ref().map(|s| &s.info);
            (at, Diagnosis::of(f, info, holders.unwrap_or_default()))
        })
        .collect();
    if let Some(info) = scan.as_ref().map(|s| &s.info) {
        tracing::debug!(
            method = info.method.label(),
            complete = info.complete,
            inodes = wanted.len(),
            ms = info.took.as_millis(),
            "holders searched"
        );
    }
    o.holders = Some(StaleHolders {
        diagnosed,
        scan: scan.map(|s| s.info),
    });
}

/// One process in the "stale by holder" summary.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct HolderProcess {
    pub pid: u32,
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

impl HolderProcess {
    fn of(h: &Holder) -> HolderProcess {
        HolderProcess {
            pid: h.pid,
            comm: h.comm.clone(),
            pod_uid: h.pod.as_ref().map(|p| p.pod_uid.clone()),
            container_id: h
                .pod
                .as_ref()
                .and_then(|p| p.container.as_ref())
                .map(|c| c.id.clone()),
        }
    }
}

impl fmt::Display for HolderProcess {
    /// `pid 4242 nginx (pod UID, container ID)`, in full: the line to paste into a ticket.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} {}", self.pid, self.comm)?;
        match (&self.pod_uid, &self.container_id) {
            (Some(uid), Some(id)) => write!(f, " (pod {uid}, container {id})"),
            (Some(uid), None) => write!(f, " (pod {uid})"),
            _ => Ok(()),
        }
    }
}

/// "Stale by holder": stale entries counted per class, per holding process and per pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HolderSummary {
    /// Per class, in [`HolderClass::ALL`] order; classes with no entry left out.
    pub by_class: Vec<(HolderClass, usize)>,
    /// The processes holding the most stale entries, most first (ties by pid).
    pub top_processes: Vec<(HolderProcess, usize)>,
    /// The pods whose processes hold the most stale entries, most first (ties by UID).
    pub top_pods: Vec<(String, usize)>,
}

/// Counts `diagnoses` (one per stale entry); an entry counts once for each distinct process
/// and pod holding it. Keeps the `top` processes and pods.
pub fn summarize<'a>(
    diagnoses: impl IntoIterator<Item = &'a Diagnosis>,
    top: usize,
) -> HolderSummary {
    let mut classes: HashMap<HolderClass, usize> = HashMap::new();
    let mut processes: BTreeMap<HolderProcess, usize> = BTreeMap::new();
    let mut pods: BTreeMap<String, usize> = BTreeMap::new();
    for d in diagnoses {
        *classes.entry(d.class()).or_default() += 1;
        let mut entry_processes = HashSet::new();
        let mut entry_pods = HashSet::new();
        for h in &d.holders {
            entry_processes.insert(HolderProcess::of(h));
            entry_pods.extend(h.pod.as_ref().map(|p| p.pod_uid.clone()));
        }
        for p in entry_processes {
            *processes.entry(p).or_default() += 1;
        }
        for p in entry_pods {
            *pods.entry(p).or_default() += 1;
        }
    }
    HolderSummary {
        by_class: HolderClass::ALL
            .iter()
            .filter_map(|c| classes.get(c).map(|n| (*c, *n)))
            .collect(),
        top_processes: top_n(processes, top),
        top_pods: top_n(pods, top),
    }
}

/// The `n` largest counts, most first; equal counts keep the map's (sorted) order.
fn top_n<K: Ord>(counts: BTreeMap<K, usize>, n: usize) -> Vec<(K, usize)> {
    let mut all: Vec<(K, usize)> = counts.into_iter().collect();
    all.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    all.truncate(n);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "7c1e3f4a-1b2c-4d5e-8f90-a1b2c3d4e5f6";

    fn holder(pid: u32, comm: &str, pod: Option<&str>) -> Holder {
        Holder {
            pid,
            fd: 7,
            comm: comm.to_string(),
            cgroup: None,
            pod: pod.map(|uid| PodCgroup {
                pod_uid: uid.to_string(),
                qos: kubepods::QosClass::Burstable,
                container: None,
            }),
        }
    }

    fn scan(complete: bool, holders: &[(u64, Holder)]) -> HolderScan {
        let mut by_inode: HashMap<u64, Vec<Holder>> = HashMap::new();
        for (inode, h) in holders {
            by_inode.entry(*inode).or_default().push(h.clone());
        }
        HolderScan {
            holders: by_inode,
            info: ScanInfo {
                method: ScanMethod::Iterator,
                complete,
                notes: Vec::new(),
                took: std::time::Duration::ZERO,
            },
        }
    }

    #[test]
    fn diagnoses_from_facts_and_the_scan() {
        let nginx = holder(4242, "nginx", Some(UID));
        let full = scan(true, &[(10, nginx.clone())]);
        let partial = scan(false, &[(10, nginx.clone())]);
        let facts = |inode, orphaned| Some(SocketFacts { inode, orphaned });
        use HolderClass::*;
        use UnknownHolder::*;
        let table = [
            (facts(10, false), Some(&full), AppKeepsFd, None, 1),
            (facts(10, false), Some(&partial), AppKeepsFd, None, 1),
            (
                facts(11, false),
                Some(&full),
                HolderUnknown,
                Some(NotInThisPidNamespace),
                0,
            ),
            (
                facts(11, false),
                Some(&partial),
                HolderUnknown,
                Some(SearchIncomplete),
                0,
            ),
            (
                facts(10, false),
                None,
                HolderUnknown,
                Some(SearchIncomplete),
                0,
            ),
            (facts(0, false), Some(&full), AcceptQueue, None, 0),
            (facts(0, true), None, KernelOrphan, None, 0),
            (None, Some(&full), HolderUnknown, Some(NoIdentity), 0),
        ];
        let of = |socket: Option<SocketFacts>, scan: Option<&HolderScan>| {
            let found = socket
                .zip(scan)
                .and_then(|(s, scan)| scan.holders.get(&s.inode));
            Diagnosis::of(
                socket,
                scan.map(|s| &s.info),
                found.cloned().unwrap_or_default(),
            )
        };
        for (socket, scan, class, unknown, holders) in table {
            let d = of(socket, scan);
            assert_eq!(
                (d.classified, d.holders.len()),
                (Classified { class, unknown }, holders),
                "{socket:?}"
            );
        }
        let d = of(facts(10, false), Some(&full));
        assert_eq!(d.column(), "pid 4242 nginx, pod 7c1e3f4a…");
        assert_eq!(of(facts(0, false), None).column(), "accept-queue");
    }

    #[test]
    fn stale_by_holder_counts_per_process_pod_and_class() {
        let nginx = holder(4242, "nginx", Some(UID));
        let child = holder(4243, "nginx", Some(UID));
        let java = holder(99, "java", None);
        let diagnosis = |class, holders| Diagnosis {
            classified: Classified {
                class,
                unknown: None,
            },
            holders,
        };
        let app = |hs: Vec<Holder>| diagnosis(HolderClass::AppKeepsFd, hs);
        let diagnoses = [
            app(vec![nginx.clone()]),
            app(vec![nginx.clone(), child.clone()]),
            app(vec![nginx.clone()]),
            app(vec![java.clone()]),
            diagnosis(HolderClass::AcceptQueue, vec![]),
        ];
        let s = summarize(&diagnoses, 2);
        assert_eq!(
            s.by_class,
            [(HolderClass::AppKeepsFd, 4), (HolderClass::AcceptQueue, 1)]
        );
        let procs: Vec<(u32, usize)> = s.top_processes.iter().map(|(p, n)| (p.pid, *n)).collect();
        assert_eq!(
            procs,
            [(4242, 3), (99, 1)],
            "top 2, most first, ties by pid"
        );
        assert_eq!(
            s.top_pods,
            [(UID.to_string(), 3)],
            "an entry counts once per pod"
        );
    }
}
