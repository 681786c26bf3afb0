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

use crate::label::labels;

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

labels! {
    /// Why the holder of a stale entry's socket is not known.
    pub enum UnknownHolder {
        /// Identity is off: the socket behind the entry was not seen.
        NoIdentity => "no-identity",
        /// The holder search was refused, or some processes' fds could not be read.
        SearchIncomplete => "search-incomplete",
        /// A file refers to the socket, but no process this pid namespace shows holds it.
        NotInThisPidNamespace => "not-in-this-pid-namespace",
    }
}

labels! {
    /// The holder class of a stale entry: who keeps its dead socket, and so what to fix.
    /// Its labels are shared by the report, the JSON and the metric's `held_by`.
    pub enum HolderClass {
        /// An application keeps the fd of a connection that is already dead.
        AppKeepsFd => "app-keeps-fd",
        /// The socket waits, dead, in a listener's accept queue: the server stopped accepting.
        AcceptQueue => "accept-queue",
        /// The application closed the socket, yet the kernel kept the entry: a kernel-side leak.
        KernelOrphan => "kernel-orphan",
        /// Not known; the [`UnknownHolder`] says why.
        HolderUnknown => "holder-unknown",
    }
}

/// A stale entry's holder class, with why when it is `holder-unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Classified {
    pub class: HolderClass,
    /// Set exactly when `class` is `holder-unknown`.
    pub unknown: Option<UnknownHolder>,
}

impl Classified {
    fn known(class: HolderClass) -> Classified {
        Classified {
            class,
            unknown: None,
        }
    }

    fn unknown(why: UnknownHolder) -> Classified {
        Classified {
            class: HolderClass::HolderUnknown,
            unknown: Some(why),
        }
    }

    /// The fact behind the class.
    pub fn fact(self) -> &'static str {
        match (self.class, self.unknown) {
            (HolderClass::AppKeepsFd, _) => {
                "a process keeps the fd of a connection that is already dead (reset or \
                 closed by its peer); since Linux 5.16 the entry stays until that fd is closed"
            }
            (HolderClass::AcceptQueue, _) => {
                "no file refers to the socket and it is not orphaned: the connection died \
                 in a listener's accept queue, never accepted; the entry stays until the \
                 listener accepts it or closes"
            }
            (HolderClass::KernelOrphan, _) => {
                "the socket is orphaned (SOCK_DEAD): its application closed it, yet the \
                 kernel kept the entry, which a correct kernel removes on close"
            }
            (HolderClass::HolderUnknown, Some(UnknownHolder::NoIdentity)) => {
                "identity is off, so the socket behind the entry was not seen"
            }
            (HolderClass::HolderUnknown, Some(UnknownHolder::NotInThisPidNamespace)) => {
                "a file refers to the socket, but no process in this pid namespace holds \
                 it (another pid namespace, or an fd in flight over a unix socket)"
            }
            (HolderClass::HolderUnknown, _) => {
                "the holder search could not look at every process (the iterator was \
                 refused and some /proc/PID/fd could not be read)"
            }
        }
    }

    /// What to do about it.
    pub fn fix(self) -> &'static str {
        match (self.class, self.unknown) {
            (HolderClass::AppKeepsFd, _) => {
                "fix the application so it closes sockets whose connection failed, or \
                 restart it to release them"
            }
            (HolderClass::AcceptQueue, _) => {
                "look at the server that stopped accepting (its listener's Recv-Q in \
                 `ss -ltn`): unblock or restart it"
            }
            (HolderClass::KernelOrphan, _) => {
                "report it to your kernel vendor with this output; until fixed, only \
                 deleting the entry (or a reboot) removes it"
            }
            (HolderClass::HolderUnknown, Some(UnknownHolder::NoIdentity)) => {
                "run with --identity on (or auto on a kernel that allows it)"
            }
            (HolderClass::HolderUnknown, Some(UnknownHolder::NotInThisPidNamespace)) => {
                "run in the host's pid namespace (hostPID) to see every process"
            }
            (HolderClass::HolderUnknown, _) => {
                "run as root with CAP_SYS_ADMIN (or CAP_BPF and CAP_PERFMON), in the host's \
                 pid namespace (hostPID)"
            }
        }
    }

    /// One line for the report: the class, the fact and the fix.
    pub fn reason(self) -> String {
        format!("{}: {}; {}", self.class, self.fact(), self.fix())
    }
}

/// The holder class of a stale entry whose socket the kernel described as `socket` (`None`
/// without identity), with `search` the outcome of the holder search for its inode.
pub fn classify(socket: Option<SocketFacts>, search: Search) -> Classified {
    let Some(socket) = socket else {
        return Classified::unknown(UnknownHolder::NoIdentity);
    };
    if socket.orphaned {
        return Classified::known(HolderClass::KernelOrphan);
    }
    if socket.inode == 0 {
        return Classified::known(HolderClass::AcceptQueue);
    }
    match search {
        Search::Found => Classified::known(HolderClass::AppKeepsFd),
        Search::NoneFound => Classified::unknown(UnknownHolder::NotInThisPidNamespace),
        Search::Incomplete => Classified::unknown(UnknownHolder::SearchIncomplete),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        use HolderClass::*;
        use Search::*;
        use UnknownHolder::*;
        let facts = |inode, orphaned| Some(SocketFacts { inode, orphaned });
        let table = [
            // (socket, search, class, why unknown)
            (facts(4242, false), Found, AppKeepsFd, None),
            (
                facts(4242, false),
                NoneFound,
                HolderUnknown,
                Some(NotInThisPidNamespace),
            ),
            (
                facts(4242, false),
                Incomplete,
                HolderUnknown,
                Some(SearchIncomplete),
            ),
            (facts(0, false), Found, AcceptQueue, None),
            (facts(0, false), NoneFound, AcceptQueue, None),
            (facts(0, false), Incomplete, AcceptQueue, None),
            (facts(0, true), NoneFound, KernelOrphan, None),
            (facts(0, true), Incomplete, KernelOrphan, None),
            // orphaned with a file: the kernel clears the file first; orphaned still wins
            (facts(4242, true), Found, KernelOrphan, None),
            (None, Found, HolderUnknown, Some(NoIdentity)),
            (None, Incomplete, HolderUnknown, Some(NoIdentity)),
        ];
        for (socket, search, class, unknown) in table {
            assert_eq!(
                classify(socket, search),
                Classified { class, unknown },
                "{socket:?} {search:?}"
            );
        }
    }

    #[test]
    fn labels_are_kebab_case_and_reasons_name_the_fix() {
        let labels: Vec<&str> = HolderClass::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            labels,
            [
                "app-keeps-fd",
                "accept-queue",
                "kernel-orphan",
                "holder-unknown"
            ]
        );
        let reason = |class| Classified::known(class).reason();
        assert!(reason(HolderClass::AppKeepsFd).contains("restart it"));
        assert!(reason(HolderClass::AcceptQueue).contains("stopped accepting"));
        assert!(reason(HolderClass::KernelOrphan).contains("kernel vendor"));
        for why in UnknownHolder::ALL {
            let r = Classified::unknown(*why).reason();
            assert!(r.starts_with("holder-unknown: "), "{r}");
        }
        assert!(Classified::unknown(UnknownHolder::SearchIncomplete)
            .reason()
            .contains("CAP_SYS_ADMIN"));
    }
}
