//! Dumps the TCP sockets of network namespaces through sock_diag (`NETLINK_SOCK_DIAG`,
//! inet_diag), IPv4 and IPv6, all states.
//!
//! sock_diag answers only for the namespace the netlink socket was created in, so the walk
//! over namespaces runs on dedicated threads that `setns` into each namespace and then open a
//! fresh netlink socket there. The threads are thrown away afterwards, so nothing needs to be
//! restored, and no caller's thread (nor a tokio worker) ever changes namespace.
//!
//! Replies are parsed in place from one reused receive buffer: per socket, the only work is
//! decoding a fixed-size header and pushing a `Copy` value.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, Parseable, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP,
    NLMSG_OVERRUN, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_packet_sock_diag::{
    SockDiagMessage, AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

use crate::netns::{discover, Netns, NetnsError, NetnsId};

/// Receive buffer size. The kernel fills at most ~32 KiB per dump datagram (it sizes dump
/// skbs after the reader's buffer, capped at 32 KiB), so 64 KiB never truncates.
const RECV_BUF_LEN: usize = 64 * 1024;
/// How long one `recv` may block before the dump is declared stuck.
pub(crate) const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on datagrams per dump: ~370 sockets fit in one, so this allows ~370 million.
const MAX_DATAGRAMS_PER_DUMP: usize = 1 << 20;
/// How often a dump the kernel flags as inconsistent (`NLM_F_DUMP_INTR`) is redone.
const DUMP_ATTEMPTS: u32 = 3;
/// Threads walking namespaces in parallel.
const WORKERS: usize = 2;
/// Netlink messages are aligned to 4 bytes.
pub(crate) const NLMSG_ALIGN: usize = 4;

/// A TCP state with the kernel's numbering (`include/net/tcp_states.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    /// A request socket of a handshake in progress (what `ss` shows as SYN-RECV).
    NewSynRecv,
    /// Bound but neither listening nor connected (dumped since Linux 6.8).
    BoundInactive,
    /// A state this code does not know.
    Unknown(u8),
}

impl TcpState {
    pub fn from_kernel(code: u8) -> TcpState {
        match code {
            1 => TcpState::Established,
            2 => TcpState::SynSent,
            3 => TcpState::SynRecv,
            4 => TcpState::FinWait1,
            5 => TcpState::FinWait2,
            6 => TcpState::TimeWait,
            7 => TcpState::Close,
            8 => TcpState::CloseWait,
            9 => TcpState::LastAck,
            10 => TcpState::Listen,
            11 => TcpState::Closing,
            12 => TcpState::NewSynRecv,
            13 => TcpState::BoundInactive,
            other => TcpState::Unknown(other),
        }
    }

    /// The kernel's number for this state.
    pub fn code(self) -> u8 {
        match self {
            TcpState::Established => 1,
            TcpState::SynSent => 2,
            TcpState::SynRecv => 3,
            TcpState::FinWait1 => 4,
            TcpState::FinWait2 => 5,
            TcpState::TimeWait => 6,
            TcpState::Close => 7,
            TcpState::CloseWait => 8,
            TcpState::LastAck => 9,
            TcpState::Listen => 10,
            TcpState::Closing => 11,
            TcpState::NewSynRecv => 12,
            TcpState::BoundInactive => 13,
            TcpState::Unknown(code) => code,
        }
    }

    /// What the classifier cares about in this state.
    pub fn kind(self) -> crate::verdict::SocketKind {
        use crate::verdict::SocketKind;
        match self {
            TcpState::Established
            | TcpState::SynSent
            | TcpState::SynRecv
            | TcpState::FinWait1
            | TcpState::FinWait2
            | TcpState::CloseWait
            | TcpState::LastAck
            | TcpState::Closing => SocketKind::Connection,
            TcpState::TimeWait => SocketKind::TimeWait,
            TcpState::NewSynRecv => SocketKind::SynRequest,
            TcpState::Close | TcpState::Listen | TcpState::BoundInactive | TcpState::Unknown(_) => {
                SocketKind::Other
            }
        }
    }
}

/// One TCP socket as sock_diag reports it.
///
/// Addresses are as the kernel gives them: an IPv4 connection on a dual-stack `AF_INET6`
/// socket (e.g. accepted by a `[::]` listener) appears with family IPv6 and IPv4-mapped
/// addresses, `[::ffff:10.0.0.1]:8080`. Cilium files such a connection under an IPv4 key, so
/// compare through [`LiveSocket::ipv4_unmapped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LiveSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    /// The socket cookie (`idiag_cookie`), what `bpf_get_socket_cookie` returns.
    pub cookie: u64,
    /// The socket's inode; `None` for sockets without a file (TIME_WAIT, NEW_SYN_RECV,
    /// orphaned).
    pub inode: Option<u32>,
    pub netns: NetnsId,
}

impl LiveSocket {
    /// Whether both ends are IPv4-mapped IPv6 addresses (an IPv4 connection on an `AF_INET6`
    /// socket).
    pub fn is_ipv4_mapped(&self) -> bool {
        mapped_v4(&self.local).is_some() && mapped_v4(&self.remote).is_some()
    }

    /// This socket with IPv4-mapped ends turned into plain IPv4 ones, so it matches IPv4 keys.
    /// Unchanged unless both ends are mapped (a `[::]` listener stays IPv6).
    pub fn ipv4_unmapped(&self) -> LiveSocket {
        match (mapped_v4(&self.local), mapped_v4(&self.remote)) {
            (Some(local), Some(remote)) => LiveSocket {
                local: SocketAddr::V4(local),
                remote: SocketAddr::V4(remote),
                ..*self
            },
            _ => *self,
        }
    }

    /// The classifier's view of this socket.
    pub fn seen(&self) -> crate::verdict::SeenSocket {
        crate::verdict::SeenSocket {
            local: self.local,
            remote: self.remote,
            kind: self.state.kind(),
            cookie: Some(self.cookie),
        }
    }
}

fn mapped_v4(addr: &SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, a.port())),
        SocketAddr::V4(_) => None,
    }
}

/// Why the sockets of a namespace could not be (fully) read.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("cannot open namespace file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a network namespace (setns: EINVAL)")]
    NotNetns { path: PathBuf },
    #[error(
        "cannot enter the network namespace {path}: {source}; needs CAP_SYS_ADMIN (run as root)"
    )]
    Setns { path: PathBuf, source: nix::Error },
    #[error("cannot open a NETLINK_SOCK_DIAG socket: {0}")]
    Socket(io::Error),
    #[error("cannot send the sock_diag request: {0}")]
    Send(io::Error),
    #[error("reading the sock_diag reply failed: {0}")]
    Recv(io::Error),
    #[error("no sock_diag reply for {}s; the dump is stuck", RECV_TIMEOUT.as_secs())]
    Timeout,
    #[error("the kernel refused the {family} TCP dump: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { family: &'static str, errno: i32 },
    #[error("the kernel's netlink socket overran (NLMSG_OVERRUN); sockets were lost")]
    Overrun,
    #[error("truncated sock_diag reply: {detail}")]
    Truncated { detail: String },
    #[error("malformed sock_diag reply: {detail}")]
    Malformed { detail: String },
    #[error("the {family} TCP dump was inconsistent (NLM_F_DUMP_INTR) {attempts} times in a row")]
    DumpInterrupted { family: &'static str, attempts: u32 },
    #[error("the {family} TCP dump did not end after {MAX_DATAGRAMS_PER_DUMP} datagrams")]
    Endless { family: &'static str },
    #[error("cannot start a namespace worker thread: {0}")]
    Spawn(io::Error),
    #[error("the namespace worker thread died before reading this namespace")]
    WorkerLost,
    #[error("cannot identify the current network namespace: {0}")]
    CurrentNetns(io::Error),
    #[error("the kernel refused the sock_diag lookup of local {local} remote {remote}: {}", io::Error::from_raw_os_error(*errno))]
    Lookup {
        local: SocketAddr,
        remote: SocketAddr,
        errno: i32,
    },
    #[error("cannot list the namespace's addresses (getifaddrs): {0}")]
    Addresses(nix::Error),
}

/// The live TCP sockets of a set of namespaces.
#[derive(Debug, Default)]
pub struct Inventory {
    /// Empty when the sockets went to a [`Sink`] instead.
    pub sockets: Vec<LiveSocket>,
    /// Namespaces dumped completely.
    pub read: usize,
    /// Namespaces gone between discovery and the walk (no path reaches them any more): fine,
    /// their sockets are gone or unreachable to anyone.
    pub vanished: Vec<Netns>,
    /// Namespaces that exist but could not be read: the inventory is incomplete.
    pub failed: Vec<(Netns, DiagError)>,
    /// Paths discovery could not examine (see [`crate::netns::Discovery::unreadable`]): each may
    /// hide a namespace, so the inventory is incomplete.
    pub unreadable: Vec<NetnsError>,
}

impl Inventory {
    /// Whether every namespace on the node was read, so a tuple missing here is missing
    /// everywhere.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty() && self.unreadable.is_empty()
    }

    /// How many namespaces (or paths that may be namespaces) could not be read.
    pub fn unreadable_count(&self) -> usize {
        self.failed.len() + self.unreadable.len()
    }
}

/// Dumps all TCP sockets (IPv4 and IPv6, all states) of the calling thread's namespace.
pub fn dump_current_netns() -> Result<Vec<LiveSocket>, DiagError> {
    let netns = NetnsId::of_current_thread().map_err(DiagError::CurrentNetns)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; RECV_BUF_LEN];
    dump_into(netns, &mut buf, &mut out)?;
    Ok(out)
}

/// Discovers the namespaces under `root` (`/` in production) and inventories them. Paths
/// discovery could not examine make the result incomplete.
pub fn inventory_node(root: &Path) -> Result<Inventory, NetnsError> {
    let mut sockets = Vec::new();
    let mut inv = inventory_node_into(root, &mut |_, s| collect(&mut sockets, s))?;
    inv.sockets = sockets;
    Ok(inv)
}

/// [`inventory_node`], handing each namespace's sockets to `sink` as they come in instead of
/// gathering them (the result's `sockets` stays empty).
pub fn inventory_node_into(root: &Path, sink: &mut Sink<'_>) -> Result<Inventory, NetnsError> {
    let discovery = discover(root)?;
    for path in &discovery.not_namespaces {
        tracing::warn!(path = %path.display(), "not a network namespace mount; skipped");
    }
    for (path, id) in &discovery.recognised {
        tracing::debug!(path = %path.display(), netns = %id, "namespace file denied; its namespace is read through another path");
    }
    let mut inv = walk(&discovery.namespaces, dump_work, sink);
    inv.unreadable = discovery.unreadable;
    Ok(inv)
}

/// Takes the sockets of one namespace as they are read.
pub type Sink<'a> = dyn FnMut(&Netns, Vec<LiveSocket>) + 'a;

fn collect(all: &mut Vec<LiveSocket>, sockets: Vec<LiveSocket>) {
    if all.is_empty() {
        *all = sockets;
    } else {
        all.extend_from_slice(&sockets);
    }
}

fn dump_work(ns: &Netns, buf: &mut [u8]) -> Result<Vec<LiveSocket>, DiagError> {
    let mut sockets = Vec::new();
    dump_into(ns.id, buf, &mut sockets)?;
    Ok(sockets)
}

/// What became of one namespace.
enum Visit {
    Read(Vec<LiveSocket>),
    Vanished,
    Failed(DiagError),
}

/// Dumps every namespace in `namespaces` from dedicated threads (at most [`WORKERS`]), each
/// `setns`-ing into one namespace after the other and discarded at the end.
pub fn inventory(namespaces: &[Netns]) -> Inventory {
    let mut sockets = Vec::new();
    let mut inv = walk(namespaces, dump_work, &mut |_, s| collect(&mut sockets, s));
    inv.sockets = sockets;
    inv
}

/// What a namespace worker does once inside a namespace: read some of its sockets.
pub(crate) type Work<'a> =
    dyn Fn(&Netns, &mut [u8]) -> Result<Vec<LiveSocket>, DiagError> + Sync + 'a;

/// Runs `work` inside every namespace in `namespaces`, on dedicated threads (at most
/// [`WORKERS`]) that `setns` into one namespace after the other and are discarded at the end.
/// Each namespace's sockets go to `sink`, on the calling thread, as they come in; the
/// result's `sockets` stays empty.
pub(crate) fn walk<F>(namespaces: &[Netns], work: F, sink: &mut Sink<'_>) -> Inventory
where
    F: Fn(&Netns, &mut [u8]) -> Result<Vec<LiveSocket>, DiagError> + Sync,
{
    let work: &Work<'_> = &work;
    let mut results: Vec<Option<Visit>> = Vec::new();
    results.resize_with(namespaces.len(), || None);
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel::<(usize, Visit)>();
    let mut spawn_error: Option<io::Error> = None;
    let mut spawned = 0usize;

    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for n in 0..WORKERS.min(namespaces.len()) {
            let tx = tx.clone();
            let next = &next;
            let handle = std::thread::Builder::new()
                .name(format!("smgc-netns-{n}"))
                .spawn_scoped(scope, move || {
                    let mut buf = vec![0u8; RECV_BUF_LEN];
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
                Visit::Read(sockets) => {
                    sink(ns, sockets);
                    Visit::Read(Vec::new())
                }
                other => other,
            });
        }
        for h in handles {
            // A panicking worker leaves its namespace without a result: reported below.
            if h.join().is_err() {
                tracing::error!("a namespace worker thread panicked");
            }
        }
    });

    let mut inv = Inventory::default();
    for (ns, result) in namespaces.iter().zip(results) {
        match result {
            Some(Visit::Read(_)) => inv.read += 1,
            Some(Visit::Vanished) => inv.vanished.push(ns.clone()),
            Some(Visit::Failed(e)) => inv.failed.push((ns.clone(), e)),
            None => {
                let e = match &spawn_error {
                    Some(e) if spawned == 0 => {
                        DiagError::Spawn(io::Error::new(e.kind(), e.to_string()))
                    }
                    _ => DiagError::WorkerLost,
                };
                inv.failed.push((ns.clone(), e));
            }
        }
    }
    for (ns, e) in &inv.failed {
        tracing::warn!(netns = %ns, error = %e, "network namespace not inventoried");
    }
    inv
}

/// Enters `ns` on the calling (dedicated) thread and runs `work` there. Tries each of its
/// paths; the namespace vanished if none still reaches it.
fn visit(ns: &Netns, buf: &mut [u8], work: &Work<'_>) -> Visit {
    for path in ns.paths() {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if is_gone(&e) => continue,
            Err(source) => {
                return Visit::Failed(DiagError::Open {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        // The path may now lead elsewhere: a reused pid, or a bind mount removed and its
        // mount point left behind as an empty file.
        match file.metadata() {
            Ok(m) if NetnsId::from(&m) == ns.id => {}
            Ok(_) => continue,
            Err(source) => {
                return Visit::Failed(DiagError::Open {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        if let Err(e) = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET) {
            return Visit::Failed(match e {
                nix::Error::EINVAL => DiagError::NotNetns {
                    path: path.to_path_buf(),
                },
                source => DiagError::Setns {
                    path: path.to_path_buf(),
                    source,
                },
            });
        }
        drop(file);
        return match work(ns, buf) {
            Ok(sockets) => Visit::Read(sockets),
            Err(e) => Visit::Failed(e),
        };
    }
    Visit::Vanished
}

fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
}

/// Dumps the TCP sockets (IPv4 and IPv6) of the calling thread's namespace into `out`.
///
/// One request of the legacy `TCPDIAG_GETSOCK` type dumps both families in a single walk of
/// the kernel's TCP hash tables (the kernel serves it as family `AF_UNSPEC`). Those tables are
/// shared by every namespace on the node, so each namespace's dump walks all of the node's
/// sockets: one walk instead of one per family halves the cost of an inventory. A kernel that
/// refuses the request gets the two per-family `SOCK_DIAG_BY_FAMILY` dumps instead.
fn dump_into(netns: NetnsId, buf: &mut [u8], out: &mut Vec<LiveSocket>) -> Result<(), DiagError> {
    // Created after any setns: a netlink socket belongs to the namespace it was created in.
    let socket = Socket::new(NETLINK_SOCK_DIAG).map_err(DiagError::Socket)?;
    // Connected to the kernel (port 0), the socket accepts datagrams from the kernel only.
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(DiagError::Socket)?;
    set_recv_timeout(&socket, RECV_TIMEOUT).map_err(DiagError::Socket)?;
    let mut seq = 0u32;
    if !BOTH_REFUSED.load(Ordering::Relaxed) {
        let start = out.len();
        match dump_retrying(&socket, BOTH_FAMILIES, &mut seq, netns, buf, out) {
            Ok(()) => return Ok(()),
            Err(DiagError::Kernel { errno, .. }) => {
                out.truncate(start);
                BOTH_REFUSED.store(true, Ordering::Relaxed);
                tracing::debug!(%netns, errno, "single-walk TCPDIAG_GETSOCK dump refused; dumping per family");
            }
            Err(e) => return Err(e),
        }
    }
    for family in [AF_INET, AF_INET6] {
        dump_retrying(&socket, family, &mut seq, netns, buf, out)?;
    }
    Ok(())
}

/// `family` value that asks for both families in one walk (the legacy request).
const BOTH_FAMILIES: u8 = 0;
/// The legacy request type, and the type of its replies (`TCPDIAG_GETSOCK`, linux/inet_diag.h).
const TCPDIAG_GETSOCK: u16 = 18;
/// Set once the kernel refused the single-walk dump: later dumps go per family at once.
static BOTH_REFUSED: AtomicBool = AtomicBool::new(false);

/// One dump, redone while the kernel flags it inconsistent (at most [`DUMP_ATTEMPTS`] times).
fn dump_retrying(
    socket: &Socket,
    family: u8,
    seq: &mut u32,
    netns: NetnsId,
    buf: &mut [u8],
    out: &mut Vec<LiveSocket>,
) -> Result<(), DiagError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        *seq += 1;
        let start = out.len();
        match dump_family(socket, family, *seq, netns, buf, out)? {
            DumpEnd::Consistent => return Ok(()),
            DumpEnd::Interrupted => {
                out.truncate(start);
                tracing::debug!(%netns, family = family_name(family), attempt, "sock_diag dump interrupted; retrying");
                if attempt >= DUMP_ATTEMPTS {
                    return Err(DiagError::DumpInterrupted {
                        family: family_name(family),
                        attempts: attempt,
                    });
                }
            }
        }
    }
}

fn family_name(family: u8) -> &'static str {
    match family {
        AF_INET => "IPv4",
        BOTH_FAMILIES => "IPv4 and IPv6",
        _ => "IPv6",
    }
}

pub(crate) fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: the fd is a live socket owned by `socket`; `tv` is a valid timeval that outlives
    // the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum DumpEnd {
    Consistent,
    /// The kernel flagged the dump `NLM_F_DUMP_INTR`: sockets may be missing or doubled.
    Interrupted,
}

/// The legacy `TCPDIAG_GETSOCK` dump request: `nlmsghdr` and `struct inet_diag_req` (family,
/// address lengths, extensions, a zero socket id, the state mask, `idiag_dbs`), which the
/// kernel answers with the TCP sockets of both families.
fn dump_request_both(seq: u32) -> Vec<u8> {
    const HEADER_LEN: usize = 16;
    const REQ_LEN: usize = 4 + 48 + 4 + 4;
    let len = HEADER_LEN + REQ_LEN;
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(&(len as u32).to_ne_bytes());
    bytes.extend_from_slice(&TCPDIAG_GETSOCK.to_ne_bytes());
    bytes.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    bytes.extend_from_slice(&seq.to_ne_bytes());
    bytes.extend_from_slice(&0u32.to_ne_bytes());
    // idiag_family (ignored for a dump: the kernel uses AF_UNSPEC), src_len, dst_len, ext.
    bytes.extend_from_slice(&[AF_INET, 0, 0, 0]);
    // inet_diag_sockid: ports, addresses, interface and cookie all zero (no filter).
    bytes.extend_from_slice(&[0u8; 48]);
    // Every state bit, as below.
    bytes.extend_from_slice(&u32::MAX.to_ne_bytes());
    bytes.extend_from_slice(&0u32.to_ne_bytes());
    bytes
}

fn dump_request(family: u8, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut msg = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            // Every state bit, including NEW_SYN_RECV and BOUND_INACTIVE that `StateFlags`
            // does not name; the kernel ignores bits it does not know.
            states: StateFlags::from_bits_retain(u32::MAX),
            socket_id,
        })
        .into(),
    );
    msg.finalize();
    let mut bytes = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut bytes);
    bytes
}

fn dump_family(
    socket: &Socket,
    family: u8,
    seq: u32,
    netns: NetnsId,
    buf: &mut [u8],
    out: &mut Vec<LiveSocket>,
) -> Result<DumpEnd, DiagError> {
    let request = if family == BOTH_FAMILIES {
        dump_request_both(seq)
    } else {
        dump_request(family, seq)
    };
    socket.send(&request, 0).map_err(DiagError::Send)?;
    let mut parser = DumpParser::new(family, seq, netns);
    for _ in 0..MAX_DATAGRAMS_PER_DUMP {
        // MSG_TRUNC: the return value is the datagram's real length even if it did not fit.
        let len = match socket.recv(&mut &mut buf[..], libc::MSG_TRUNC) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(DiagError::Timeout),
            Err(e) => return Err(DiagError::Recv(e)),
        };
        if len > buf.len() {
            return Err(DiagError::Truncated {
                detail: format!("datagram of {len} bytes, buffer of {}", buf.len()),
            });
        }
        if let Some(end) = parser.feed(&buf[..len], out)? {
            return Ok(end);
        }
    }
    Err(DiagError::Endless {
        family: family_name(family),
    })
}

/// Parses the datagrams of one dump.
struct DumpParser {
    family: u8,
    seq: u32,
    netns: NetnsId,
    interrupted: bool,
}

impl DumpParser {
    fn new(family: u8, seq: u32, netns: NetnsId) -> DumpParser {
        DumpParser {
            family,
            seq,
            netns,
            interrupted: false,
        }
    }

    /// Parses one datagram, pushing its sockets; `Some` once the dump has ended.
    fn feed(
        &mut self,
        datagram: &[u8],
        out: &mut Vec<LiveSocket>,
    ) -> Result<Option<DumpEnd>, DiagError> {
        let mut rest = datagram;
        while !rest.is_empty() {
            let msg = NetlinkBuffer::new_checked(rest).map_err(|e| DiagError::Truncated {
                detail: format!(
                    "netlink message at offset {}: {e}",
                    datagram.len() - rest.len()
                ),
            })?;
            let len = msg.length() as usize;
            if msg.sequence_number() == self.seq {
                if msg.flags() & NLM_F_DUMP_INTR != 0 {
                    self.interrupted = true;
                }
                match msg.message_type() {
                    NLMSG_NOOP => {}
                    NLMSG_DONE => return self.done(msg.payload()).map(Some),
                    NLMSG_ERROR => {
                        let code = read_i32(msg.payload()).ok_or_else(|| DiagError::Truncated {
                            detail: "NLMSG_ERROR without an error code".into(),
                        })?;
                        // 0 is an acknowledgement, which a dump does not ask for: ignore it.
                        if code != 0 {
                            return Err(self.kernel_error(code));
                        }
                    }
                    NLMSG_OVERRUN => return Err(DiagError::Overrun),
                    SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => out.push(self.socket(msg.payload())?),
                    // Unknown types are not ours to interpret; skip them.
                    _ => {}
                }
            }
            // Messages of another sequence number are leftovers of an abandoned dump.
            let step = len.div_ceil(NLMSG_ALIGN) * NLMSG_ALIGN;
            rest = rest.get(step..).unwrap_or_default();
        }
        Ok(None)
    }

    fn done(&self, payload: &[u8]) -> Result<DumpEnd, DiagError> {
        // NLMSG_DONE carries the dump's final status; old kernels may send no payload at all.
        match read_i32(payload) {
            Some(code) if code < 0 => Err(self.kernel_error(code)),
            _ if self.interrupted => Ok(DumpEnd::Interrupted),
            _ => Ok(DumpEnd::Consistent),
        }
    }

    fn kernel_error(&self, code: i32) -> DiagError {
        DiagError::Kernel {
            family: family_name(self.family),
            errno: code.saturating_neg(),
        }
    }

    fn socket(&self, payload: &[u8]) -> Result<LiveSocket, DiagError> {
        parse_socket(payload, self.netns)
    }
}

/// One `inet_diag_msg` (a dump's or an exact lookup's reply) as a socket of `netns`.
pub(crate) fn parse_socket(payload: &[u8], netns: NetnsId) -> Result<LiveSocket, DiagError> {
    let header = InetResponseHeader::parse(payload).map_err(|e| DiagError::Malformed {
        detail: format!("inet_diag_msg: {e}"),
    })?;
    let id = &header.socket_id;
    let local = socket_addr(id.source_address, id.source_port);
    let remote = socket_addr(id.destination_address, id.destination_port);
    Ok(LiveSocket {
        local,
        remote,
        state: TcpState::from_kernel(header.state),
        cookie: cookie(id.cookie),
        inode: (header.inode != 0).then_some(header.inode),
        netns,
    })
}

/// `idiag_cookie` is two host-endian `u32`s, low half first.
fn cookie(raw: [u8; 8]) -> u64 {
    let low = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let high = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    (u64::from(high) << 32) | u64::from(low)
}

fn socket_addr(ip: IpAddr, port: u16) -> SocketAddr {
    match ip {
        IpAddr::V4(ip) => SocketAddr::V4(SocketAddrV4::new(ip, port)),
        // Scope ids are dropped: sockmap keys carry none.
        IpAddr::V6(ip) => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
    }
}

pub(crate) fn read_i32(payload: &[u8]) -> Option<i32> {
    let bytes: [u8; 4] = payload.get(..4)?.try_into().ok()?;
    Some(i32::from_ne_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_sock_diag::inet::InetResponse;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const NETNS: NetnsId = NetnsId {
        dev: 4,
        inode: 4026531840,
    };

    fn response(
        family: u8,
        state: u8,
        local: (IpAddr, u16),
        remote: (IpAddr, u16),
        cookie: u64,
        inode: u32,
    ) -> SockDiagMessage {
        let low = (cookie as u32).to_ne_bytes();
        let high = ((cookie >> 32) as u32).to_ne_bytes();
        let mut raw_cookie = [0u8; 8];
        raw_cookie[..4].copy_from_slice(&low);
        raw_cookie[4..].copy_from_slice(&high);
        SockDiagMessage::InetResponse(Box::new(InetResponse {
            header: InetResponseHeader {
                family,
                state,
                timer: None,
                socket_id: SocketId {
                    source_port: local.1,
                    destination_port: remote.1,
                    source_address: local.0,
                    destination_address: remote.0,
                    interface_id: 0,
                    cookie: raw_cookie,
                },
                recv_queue: 0,
                send_queue: 0,
                uid: 0,
                inode,
            },
            nlas: Default::default(),
        }))
    }

    /// One netlink message with the crate's emitter.
    fn frame(msg: SockDiagMessage, seq: u32, flags: u16) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        header.flags = flags;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        m.finalize();
        let mut bytes = vec![0u8; m.buffer_len()];
        m.serialize(&mut bytes);
        bytes
    }

    /// A control message (DONE, ERROR) with an i32 payload, by hand.
    fn control(kind: u16, code: i32, seq: u32, flags: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&20u32.to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&code.to_ne_bytes());
        b
    }

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }

    fn established_v4(seq: u32) -> Vec<u8> {
        frame(
            response(
                AF_INET,
                1,
                (v4([10, 0, 0, 1]), 8080),
                (v4([10, 0, 0, 2]), 40000),
                0x1234_5678_9abc_def0,
                777,
            ),
            seq,
            libc::NLM_F_MULTI as u16,
        )
    }

    #[test]
    fn parses_a_multipart_dump() {
        let mut first = established_v4(1);
        first.extend(frame(
            response(
                AF_INET6,
                10,
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 443),
                (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
                5,
                0,
            ),
            1,
            libc::NLM_F_MULTI as u16,
        ));
        let mut p = DumpParser::new(AF_INET, 1, NETNS);
        let mut out = Vec::new();
        assert_eq!(p.feed(&first, &mut out).unwrap(), None);
        let second = control(NLMSG_DONE, 0, 1, libc::NLM_F_MULTI as u16);
        assert_eq!(
            p.feed(&second, &mut out).unwrap(),
            Some(DumpEnd::Consistent)
        );

        assert_eq!(out.len(), 2);
        assert_eq!(out[0].local, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(out[0].remote, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(out[0].state, TcpState::Established);
        assert_eq!(out[0].cookie, 0x1234_5678_9abc_def0);
        assert_eq!(out[0].inode, Some(777));
        assert_eq!(out[0].netns, NETNS);
        assert_eq!(out[1].local, "[::1]:443".parse().unwrap());
        assert_eq!(out[1].state, TcpState::Listen);
        assert_eq!(out[1].inode, None);
    }

    #[test]
    fn other_sequence_numbers_are_skipped() {
        let mut datagram = established_v4(7);
        datagram.extend(control(NLMSG_DONE, 0, 7, 0));
        datagram.extend(established_v4(2));
        let mut p = DumpParser::new(AF_INET, 2, NETNS);
        let mut out = Vec::new();
        assert_eq!(p.feed(&datagram, &mut out).unwrap(), None);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn dump_intr_marks_the_dump_interrupted() {
        let mut datagram = frame(
            response(
                AF_INET,
                1,
                (v4([1, 1, 1, 1]), 1),
                (v4([2, 2, 2, 2]), 2),
                1,
                1,
            ),
            3,
            (libc::NLM_F_MULTI | libc::NLM_F_DUMP_INTR) as u16,
        );
        datagram.extend(control(NLMSG_DONE, 0, 3, 0));
        let mut p = DumpParser::new(AF_INET, 3, NETNS);
        let mut out = Vec::new();
        assert_eq!(
            p.feed(&datagram, &mut out).unwrap(),
            Some(DumpEnd::Interrupted)
        );

        // Also when only the DONE message carries the flag.
        let mut p = DumpParser::new(AF_INET, 4, NETNS);
        let done = control(NLMSG_DONE, 0, 4, libc::NLM_F_DUMP_INTR as u16);
        assert_eq!(p.feed(&done, &mut out).unwrap(), Some(DumpEnd::Interrupted));
    }

    #[test]
    fn kernel_errors_are_typed() {
        let mut p = DumpParser::new(AF_INET6, 1, NETNS);
        let err = p
            .feed(&control(NLMSG_ERROR, -libc::EPERM, 1, 0), &mut Vec::new())
            .unwrap_err();
        assert!(
            matches!(err, DiagError::Kernel { family: "IPv6", errno } if errno == libc::EPERM),
            "{err}"
        );
        let err = p
            .feed(&control(NLMSG_DONE, -libc::ENOMEM, 1, 0), &mut Vec::new())
            .unwrap_err();
        assert!(matches!(err, DiagError::Kernel { errno, .. } if errno == libc::ENOMEM));
        // An ACK (error 0) is not an error.
        assert_eq!(
            p.feed(&control(NLMSG_ERROR, 0, 1, 0), &mut Vec::new())
                .unwrap(),
            None
        );
        let overrun = control(NLMSG_OVERRUN, 0, 1, 0);
        assert!(matches!(
            p.feed(&overrun, &mut Vec::new()),
            Err(DiagError::Overrun)
        ));
    }

    #[test]
    fn truncated_and_malformed_replies_are_errors_not_panics() {
        let full = established_v4(1);
        let mut out = Vec::new();
        // Every prefix of a valid message, and garbage lengths.
        for cut in 1..full.len() {
            let mut p = DumpParser::new(AF_INET, 1, NETNS);
            assert!(p.feed(&full[..cut], &mut out).is_err(), "cut at {cut}");
        }
        let mut p = DumpParser::new(AF_INET, 1, NETNS);
        let mut short = full.clone();
        short[..4].copy_from_slice(&20u32.to_ne_bytes()); // header + 4 bytes of inet_diag_msg
        assert!(matches!(
            p.feed(&short[..20], &mut out),
            Err(DiagError::Malformed { .. })
        ));
        let mut bad_family = full.clone();
        bad_family[16] = 99;
        assert!(matches!(
            p.feed(&bad_family, &mut out),
            Err(DiagError::Malformed { .. })
        ));
        let mut bad_len = full;
        bad_len[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(p.feed(&bad_len, &mut out).is_err());
        assert!(out.is_empty());
        assert!(matches!(
            p.feed(&control(NLMSG_ERROR, 0, 1, 0)[..18], &mut out),
            Err(DiagError::Truncated { .. })
        ));
    }

    #[test]
    fn tcp_state_numbering_round_trips() {
        let expected = [
            (1, TcpState::Established),
            (2, TcpState::SynSent),
            (3, TcpState::SynRecv),
            (4, TcpState::FinWait1),
            (5, TcpState::FinWait2),
            (6, TcpState::TimeWait),
            (7, TcpState::Close),
            (8, TcpState::CloseWait),
            (9, TcpState::LastAck),
            (10, TcpState::Listen),
            (11, TcpState::Closing),
            (12, TcpState::NewSynRecv),
            (13, TcpState::BoundInactive),
        ];
        for (code, state) in expected {
            assert_eq!(TcpState::from_kernel(code), state);
            assert_eq!(state.code(), code);
        }
        for code in 0..=255u8 {
            assert_eq!(TcpState::from_kernel(code).code(), code);
        }
        assert_eq!(TcpState::from_kernel(0), TcpState::Unknown(0));
        assert_eq!(
            netlink_packet_sock_diag::TCP_LISTEN,
            TcpState::Listen.code(),
            "agrees with the crate's constants"
        );
    }

    #[test]
    fn ipv4_mapped_sockets_unmap() {
        let s = LiveSocket {
            local: "[::ffff:10.0.0.1]:8080".parse().unwrap(),
            remote: "[::ffff:10.0.0.2]:40000".parse().unwrap(),
            state: TcpState::Established,
            cookie: 9,
            inode: Some(1),
            netns: NETNS,
        };
        assert!(s.is_ipv4_mapped());
        let u = s.ipv4_unmapped();
        assert_eq!(u.local, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(u.remote, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(
            (u.cookie, u.state, u.netns),
            (9, TcpState::Established, NETNS)
        );

        let listener = LiveSocket {
            local: "[::]:80".parse().unwrap(),
            remote: "[::]:0".parse().unwrap(),
            ..s
        };
        assert!(!listener.is_ipv4_mapped());
        assert_eq!(listener.ipv4_unmapped(), listener);
        let v6 = LiveSocket {
            local: "[fd00::1]:80".parse().unwrap(),
            remote: "[::ffff:10.0.0.2]:1".parse().unwrap(),
            ..s
        };
        assert_eq!(v6.ipv4_unmapped(), v6);
        let plain = LiveSocket {
            local: "10.0.0.1:1".parse().unwrap(),
            remote: "10.0.0.2:2".parse().unwrap(),
            ..s
        };
        assert_eq!(plain.ipv4_unmapped(), plain);
    }

    #[test]
    fn cookie_halves() {
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&0xdead_beefu32.to_ne_bytes());
        raw[4..].copy_from_slice(&0x0000_0001u32.to_ne_bytes());
        assert_eq!(cookie(raw), 0x1_dead_beef);
    }

    #[test]
    fn request_asks_for_every_state_and_tcp() {
        let req = dump_request(AF_INET6, 9);
        let msg = NetlinkBuffer::new_checked(&req[..]).unwrap();
        assert_eq!(msg.message_type(), SOCK_DIAG_BY_FAMILY);
        assert_eq!(msg.flags(), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(msg.sequence_number(), 9);
        let p = msg.payload();
        assert_eq!((p[0], p[1]), (AF_INET6, IPPROTO_TCP));
        assert_eq!(&p[4..8], &u32::MAX.to_ne_bytes());
    }

    #[test]
    fn single_walk_request_is_the_legacy_tcp_dump() {
        let req = dump_request_both(5);
        let msg = NetlinkBuffer::new_checked(&req[..]).unwrap();
        assert_eq!(msg.message_type(), TCPDIAG_GETSOCK);
        assert_eq!(msg.flags(), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(msg.sequence_number(), 5);
        // sizeof(struct inet_diag_req) is 60; the state mask follows the 48-byte socket id.
        let p = msg.payload();
        assert_eq!(p.len(), 60);
        assert_eq!(&p[52..56], &u32::MAX.to_ne_bytes());
    }

    #[test]
    fn both_families_of_one_namespace_in_one_dump() {
        // The single-walk dump sees what the two per-family dumps see.
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        let sockets = dump_current_netns().unwrap();
        let has = |addr: SocketAddr| sockets.iter().any(|s| s.local == addr);
        assert!(has(v4.local_addr().unwrap()));
        if let Some(v6) = v6 {
            assert!(has(v6.local_addr().unwrap()));
        }
    }

    #[test]
    fn inventory_of_nothing_is_complete() {
        let inv = inventory(&[]);
        assert!(inv.is_complete());
        assert_eq!(
            (inv.read, inv.sockets.len(), inv.unreadable_count()),
            (0, 0, 0)
        );
    }

    #[test]
    fn a_namespace_no_path_reaches_has_vanished() {
        let gone = Netns {
            id: NETNS,
            path: PathBuf::from("/proc/0/ns/net"),
            fallbacks: vec![PathBuf::from("/nonexistent/smgc/netns")],
            label: "gone".into(),
        };
        let inv = inventory(std::slice::from_ref(&gone));
        assert_eq!(inv.vanished, vec![gone]);
        assert!(inv.is_complete());
    }

    #[test]
    fn dumps_this_threads_namespace() {
        // Unprivileged and harmless: a listener of our own must show up.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sockets = dump_current_netns().unwrap();
        let mine = sockets
            .iter()
            .find(|s| s.local == addr && s.state == TcpState::Listen)
            .expect("own listener in the dump");
        assert_ne!(mine.cookie, 0);
        assert!(mine.inode.is_some());
        assert_eq!(mine.netns, NetnsId::of_current_thread().unwrap());
    }
}
