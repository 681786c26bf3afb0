//! Why a stale entry's socket is still alive: the holder class, decided from what the kernel
//! says about the socket and whether a process holding it was found.
//!
//! A sockhash entry lives as long as its socket; since Linux 5.16 a TCP socket leaves the map
//! only when its last file reference goes (KERNEL-FACTS). So a stale entry means something
//! still references a dead connection's socket:
//!
//! | file (inode) | orphaned (`SOCK_DEAD`) | holder found | class |
//! |---|---|---|---|
//! | any | yes | – | `kernel-orphan` |
//! | none (0) | no | – | `accept-queue` |
//! | yes | no | yes | `app-keeps-fd` |
//! | yes | no | no, or not searched | `holder-unknown` |

use serde::Serialize;

/// What the kernel says about a stale entry's socket (from the identity iterator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFacts {
    /// The inode of the file that refers to the socket; 0 when none does.
    pub inode: u64,
    /// `SOCK_DEAD`: the socket was closed by its application (or never had one and was
    /// dropped by the kernel).
    pub orphaned: bool,
}

/// How the search for the socket's holders went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// At least one process holds the inode.
    Found,
    /// Every process was looked at; none holds the inode.
    NoneFound,
    /// The search could not look at every process (refused, or no rights over some).
    Incomplete,
}

/// Why the holder of a stale entry's socket is not known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownHolder {
    /// Identity is off: the socket behind the entry was not seen.
    NoIdentity,
    /// The holder search was refused, or some processes' fds could not be read.
    SearchIncomplete,
    /// A file refers to the socket, but no process this pid namespace shows holds it.
    NotInThisPidNamespace,
}

/// The holder class of a stale entry: who keeps its dead socket, and so what to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderClass {
    /// An application keeps the fd of a connection that is already dead.
    AppKeepsFd,
    /// The socket waits, dead, in a listener's accept queue: the server stopped accepting.
    AcceptQueue,
    /// The application closed the socket, yet the kernel kept the entry: a kernel-side leak.
    KernelOrphan,
    HolderUnknown(UnknownHolder),
}

impl HolderClass {
    /// Every class once, in report order (the metric's `held_by` values).
    pub const ALL: [HolderClass; 4] = [
        HolderClass::AppKeepsFd,
        HolderClass::AcceptQueue,
        HolderClass::KernelOrphan,
        HolderClass::HolderUnknown(UnknownHolder::SearchIncomplete),
    ];

    /// The label shared by the report, the JSON and the metric's `held_by`.
    pub fn label(self) -> &'static str {
        match self {
            HolderClass::AppKeepsFd => "app-keeps-fd",
            HolderClass::AcceptQueue => "accept-queue",
            HolderClass::KernelOrphan => "kernel-orphan",
            HolderClass::HolderUnknown(_) => "holder-unknown",
        }
    }

    /// The fact behind the class.
    pub fn fact(self) -> &'static str {
        match self {
            HolderClass::AppKeepsFd => {
                "a process keeps the fd of a connection that is already dead (reset or \
                 closed by its peer); since Linux 5.16 the entry stays until that fd is closed"
            }
            HolderClass::AcceptQueue => {
                "no file refers to the socket and it is not orphaned: the connection died \
                 in a listener's accept queue, never accepted; the entry stays until the \
                 listener accepts it or closes"
            }
            HolderClass::KernelOrphan => {
                "the socket is orphaned (SOCK_DEAD): its application closed it, yet the \
                 kernel kept the entry, which a correct kernel removes on close"
            }
            HolderClass::HolderUnknown(UnknownHolder::NoIdentity) => {
                "identity is off, so the socket behind the entry was not seen"
            }
            HolderClass::HolderUnknown(UnknownHolder::SearchIncomplete) => {
                "the holder search could not look at every process (the iterator was \
                 refused and some /proc/PID/fd could not be read)"
            }
            HolderClass::HolderUnknown(UnknownHolder::NotInThisPidNamespace) => {
                "a file refers to the socket, but no process in this pid namespace holds \
                 it (another pid namespace, or an fd in flight over a unix socket)"
            }
        }
    }

    /// What to do about it.
    pub fn fix(self) -> &'static str {
        match self {
            HolderClass::AppKeepsFd => {
                "fix the application so it closes sockets whose connection failed, or \
                 restart it to release them"
            }
            HolderClass::AcceptQueue => {
                "look at the server that stopped accepting (its listener's Recv-Q in \
                 `ss -ltn`): unblock or restart it"
            }
            HolderClass::KernelOrphan => {
                "report it to your kernel vendor with this output; until fixed, only \
                 deleting the entry (or a reboot) removes it"
            }
            HolderClass::HolderUnknown(UnknownHolder::NoIdentity) => {
                "run with --identity on (or auto on a kernel that allows it)"
            }
            HolderClass::HolderUnknown(UnknownHolder::SearchIncomplete) => {
                "run as root with CAP_SYS_ADMIN (or CAP_BPF and CAP_PERFMON), in the host's \
                 pid namespace (hostPID)"
            }
            HolderClass::HolderUnknown(UnknownHolder::NotInThisPidNamespace) => {
                "run in the host's pid namespace (hostPID) to see every process"
            }
        }
    }

    /// One line for the report: the class, the fact and the fix.
    pub fn reason(self) -> String {
        format!("{}: {}; {}", self.label(), self.fact(), self.fix())
    }
}

/// The holder class of a stale entry whose socket the kernel described as `socket` (`None`
/// without identity), with `search` the outcome of the holder search for its inode.
pub fn classify(socket: Option<SocketFacts>, search: Search) -> HolderClass {
    let Some(socket) = socket else {
        return HolderClass::HolderUnknown(UnknownHolder::NoIdentity);
    };
    if socket.orphaned {
        return HolderClass::KernelOrphan;
    }
    if socket.inode == 0 {
        return HolderClass::AcceptQueue;
    }
    match search {
        Search::Found => HolderClass::AppKeepsFd,
        Search::NoneFound => HolderClass::HolderUnknown(UnknownHolder::NotInThisPidNamespace),
        Search::Incomplete => HolderClass::HolderUnknown(UnknownHolder::SearchIncomplete),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        use HolderClass::*;
        use Search::*;
        let facts = |inode, orphaned| Some(SocketFacts { inode, orphaned });
        let table = [
            // (socket, search, class)
            (facts(4242, false), Found, AppKeepsFd),
            (
                facts(4242, false),
                NoneFound,
                HolderUnknown(UnknownHolder::NotInThisPidNamespace),
            ),
            (
                facts(4242, false),
                Incomplete,
                HolderUnknown(UnknownHolder::SearchIncomplete),
            ),
            (facts(0, false), Found, AcceptQueue),
            (facts(0, false), NoneFound, AcceptQueue),
            (facts(0, false), Incomplete, AcceptQueue),
            (facts(0, true), NoneFound, KernelOrphan),
            (facts(0, true), Incomplete, KernelOrphan),
            // orphaned with a file: the kernel clears the file first; orphaned still wins
            (facts(4242, true), Found, KernelOrphan),
            (None, Found, HolderUnknown(UnknownHolder::NoIdentity)),
            (None, Incomplete, HolderUnknown(UnknownHolder::NoIdentity)),
        ];
        for (socket, search, want) in table {
            assert_eq!(classify(socket, search), want, "{socket:?} {search:?}");
        }
    }

    #[test]
    fn labels_are_kebab_case_and_reasons_name_the_fix() {
        let labels: Vec<&str> = HolderClass::ALL.iter().map(|c| c.label()).collect();
        assert_eq!(
            labels,
            [
                "app-keeps-fd",
                "accept-queue",
                "kernel-orphan",
                "holder-unknown"
            ]
        );
        assert!(HolderClass::AppKeepsFd.reason().contains("restart it"));
        assert!(HolderClass::AcceptQueue
            .reason()
            .contains("stopped accepting"));
        assert!(HolderClass::KernelOrphan.reason().contains("kernel vendor"));
        assert!(HolderClass::HolderUnknown(UnknownHolder::SearchIncomplete)
            .reason()
            .contains("CAP_SYS_ADMIN"));
    }
}
