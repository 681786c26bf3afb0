//! Who keeps a stale entry's dead socket alive: the holding process and its pod, the
//! listener's accept queue, or the kernel.
//!
//! Run only when an observation has stale entries: [`scan`] maps the stale sockets' inodes to
//! the processes holding them (the `iter/task_file` program, else `/proc/*/fd`), [`kubepods`]
//! reads each holder's pod and container from its cgroup path, and [`class`] decides each
//! entry's [`HolderClass`]. [`summarize`] counts them for the report's "stale by holder".

pub mod class;
pub mod kubepods;
pub mod scan;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::Serialize;

pub use class::{classify, HolderClass, Search, SocketFacts, UnknownHolder};
pub use kubepods::PodCgroup;
pub use scan::{HolderScan, HolderSource, ScanMethod};

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
    pub class: HolderClass,
    /// For `app-keeps-fd`: every process holding the socket (a forked child shares it).
    pub holders: Vec<Holder>,
}

impl Diagnosis {
    /// The entry whose socket the kernel described as `socket` (`None` without identity),
    /// given the holder scan (`None` when it did not run).
    pub fn of(socket: Option<SocketFacts>, scan: Option<&HolderScan>) -> Diagnosis {
        let holders = match (socket, scan) {
            (Some(s), Some(scan)) if s.inode != 0 => {
                scan.holders.get(&s.inode).cloned().unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let search = match scan {
            _ if !holders.is_empty() => Search::Found,
            Some(scan) if scan.complete => Search::NoneFound,
            _ => Search::Incomplete,
        };
        let class = classify(socket, search);
        Diagnosis {
            holders: if class == HolderClass::AppKeepsFd {
                holders
            } else {
                Vec::new()
            },
            class,
        }
    }

    /// The report's holder column: the first holder (and how many more), or the class.
    pub fn column(&self) -> String {
        match self.holders.as_slice() {
            [] => self.class.label().to_string(),
            [one] => one.to_string(),
            [first, rest @ ..] => format!("{first} (+{} more)", rest.len()),
        }
    }
}

/// One process in the "stale by holder" summary.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct HolderProcess {
    pub pid: u32,
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl fmt::Display for HolderProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} {}", self.pid, self.comm)?;
        if let Some(uid) = &self.pod_uid {
            write!(f, " (pod {uid})")?;
        }
        Ok(())
    }
}

/// "Stale by holder": stale entries counted per class, per holding process and per pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HolderSummary {
    /// Per class label, in [`HolderClass::ALL`] order; classes with no entry left out.
    pub by_class: Vec<(&'static str, usize)>,
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
    let mut classes: HashMap<&'static str, usize> = HashMap::new();
    let mut processes: BTreeMap<HolderProcess, usize> = BTreeMap::new();
    let mut pods: BTreeMap<String, usize> = BTreeMap::new();
    for d in diagnoses {
        *classes.entry(d.class.label()).or_default() += 1;
        let mut entry_processes = HashSet::new();
        let mut entry_pods = HashSet::new();
        for h in &d.holders {
            let uid = h.pod.as_ref().map(|p| p.pod_uid.clone());
            entry_processes.insert(HolderProcess {
                pid: h.pid,
                comm: h.comm.clone(),
                pod_uid: uid.clone(),
            });
            entry_pods.extend(uid);
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
            .filter_map(|c| classes.get(c.label()).map(|n| (c.label(), *n)))
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
            method: ScanMethod::Iterator,
            complete,
            notes: Vec::new(),
            took: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn diagnoses_from_facts_and_the_scan() {
        let nginx = holder(4242, "nginx", Some(UID));
        let full = scan(true, &[(10, nginx.clone())]);
        let partial = scan(false, &[(10, nginx.clone())]);
        let facts = |inode, orphaned| Some(SocketFacts { inode, orphaned });
        let unknown = HolderClass::HolderUnknown;
        let table = [
            (facts(10, false), Some(&full), HolderClass::AppKeepsFd, 1),
            (facts(10, false), Some(&partial), HolderClass::AppKeepsFd, 1),
            (
                facts(11, false),
                Some(&full),
                unknown(UnknownHolder::NotInThisPidNamespace),
                0,
            ),
            (
                facts(11, false),
                Some(&partial),
                unknown(UnknownHolder::SearchIncomplete),
                0,
            ),
            (
                facts(10, false),
                None,
                unknown(UnknownHolder::SearchIncomplete),
                0,
            ),
            (facts(0, false), Some(&full), HolderClass::AcceptQueue, 0),
            (facts(0, true), None, HolderClass::KernelOrphan, 0),
            (None, Some(&full), unknown(UnknownHolder::NoIdentity), 0),
        ];
        for (socket, scan, class, holders) in table {
            let d = Diagnosis::of(socket, scan);
            assert_eq!((d.class, d.holders.len()), (class, holders), "{socket:?}");
        }
        let d = Diagnosis::of(facts(10, false), Some(&full));
        assert_eq!(d.column(), "pid 4242 nginx, pod 7c1e3f4a…");
        assert_eq!(
            Diagnosis::of(facts(0, false), None).column(),
            "accept-queue"
        );
    }

    #[test]
    fn stale_by_holder_counts_per_process_pod_and_class() {
        let nginx = holder(4242, "nginx", Some(UID));
        let child = holder(4243, "nginx", Some(UID));
        let java = holder(99, "java", None);
        let app = |hs: Vec<Holder>| Diagnosis {
            class: HolderClass::AppKeepsFd,
            holders: hs,
        };
        let diagnoses = [
            app(vec![nginx.clone()]),
            app(vec![nginx.clone(), child.clone()]),
            app(vec![nginx.clone()]),
            app(vec![java.clone()]),
            Diagnosis {
                class: HolderClass::AcceptQueue,
                holders: vec![],
            },
        ];
        let s = summarize(&diagnoses, 2);
        assert_eq!(s.by_class, [("app-keeps-fd", 4), ("accept-queue", 1)]);
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
