//! Hears from the kernel the moment an entry goes stale (its socket closes) or does harm (a new connection collides with it), where the kernel allows tracing programs.
//!
//! Two programs (bpf/sockmap_events.bpf.c, CO-RE, built by build.rs) report through one ring
//! buffer:
//!
//! - `on_close` (`tp_btf/inet_sock_set_state`): a socket that still has a psock goes to
//!   TCP_CLOSE. An ordinary close detaches the psock first, so this is the reset socket whose
//!   application keeps the fd: its entry is stale from now on.
//! - `on_update` (`fexit/sock_hash_update_common`): an insert into the watched map refused
//!   with EEXIST: the request that hangs, as it happens. It reads the key with
//!   `bpf_probe_read_kernel`, which lockdown's confidentiality mode refuses.
//!
//! Kernels that refuse tracing programs (EPERM on this project's 6.18 machines) get no events;
//! [`EventsMode::Auto`] then says so once and the caller keeps its periodic pass. The ring
//! buffer is read on a thread of its own (never a tokio thread), which hands the decoded
//! [`Event`]s of each wake-up to the caller's sink, on that thread: a sink that acts on them
//! at once saves the hand-over to another thread (milliseconds under emulation).

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use libbpf_rs::{
    ErrorKind, Link, MapCore, MapFlags, MapHandle, Object, ObjectBuilder, RingBufferBuilder,
};

use crate::clock::monotonic_now;
use crate::identity::kind_text;
use crate::key::{RawKey, SockKey, KEY_LEN};
use crate::label::labels;
use crate::socket::{record_ends, TcpState};

/// The compiled BPF object (build.rs also generates its skeleton; the object is opened
/// directly so that one or both programs can be left out when the kernel refuses them).
const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sockmap_events.bpf.o"));
const CLOSE_PROGRAM: &str = "on_close";
const COLLISION_PROGRAM: &str = "on_update";
const RING_MAP: &str = "events";
const CONTROL_MAP: &str = "control";
/// Slots of the `control` map.
const CONTROL_MAP_ID: u32 = 0;
const CONTROL_LOST: u32 = 1;

const EVENT_CLOSE: u32 = 1;
const EVENT_COLLISION: u32 = 2;

/// How long the reader waits for a record before it looks at its stop flag (and calls the
/// sink with no events).
const POLL: Duration = Duration::from_millis(100);

/// `struct event_rec` of the BPF program.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct EventRecord {
    kind: u32,
    map_id: u32,
    cookie: u64,
    key: [u8; KEY_LEN],
    family: u16,
    old_state: u8,
    pad: u8,
    local_addr: [u8; 16],
    remote_addr: [u8; 16],
    /// Host order.
    local_port: u16,
    /// Host order.
    remote_port: u16,
    netns_inode: u32,
    ktime_ns: u64,
}
const _: () = assert!(mem::size_of::<EventRecord>() == 112);

/// Whether to watch the kernel for closes and collisions: `--events` and the `events` config
/// key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EventsMode {
    /// Use the programs the kernel accepts; else say once why, and rely on the pass.
    #[default]
    Auto,
    /// Both programs; a refusal is an error.
    On,
    /// The pass only.
    Off,
}

/// A socket's own ends, as the kernel had them when the event fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSocket {
    /// `bpf_get_socket_cookie`: the cookie the identity iterator reports.
    pub cookie: u64,
    /// Its local end (the port survives the unhash that zeroes the iterator's local port).
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The inode of its network namespace.
    pub netns_inode: u64,
}

impl EventSocket {
    /// The key under which Cilium files this socket (A = its remote end, B = its local end).
    pub fn key(&self) -> Option<RawKey> {
        SockKey::for_socket(self.local, self.remote).map(|k| k.encode())
    }
}

/// What the kernel reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A socket with a psock went to TCP_CLOSE, from `from`.
    Closed {
        socket: EventSocket,
        from: TcpState,
        /// CLOCK_MONOTONIC when it happened.
        at: Duration,
    },
    /// Map `map_id` refused to file `socket` under `key`: an entry is filed there already.
    Collision {
        map_id: u32,
        key: RawKey,
        socket: EventSocket,
        at: Duration,
    },
}

impl Event {
    /// CLOCK_MONOTONIC when the kernel saw it.
    pub fn at(&self) -> Duration {
        match self {
            Event::Closed { at, .. } | Event::Collision { at, .. } => *at,
        }
    }
}

/// An event as the reader thread handed it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heard {
    pub event: Event,
    /// CLOCK_MONOTONIC when the reader decoded it: minus the event's `at`, the ring buffer's
    /// delay (the reader's wake-up).
    pub at: Duration,
}

/// Which programs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watching {
    pub closes: bool,
    pub collisions: bool,
}

impl Watching {
    pub fn label(&self) -> &'static str {
        EventsState::of(EventsMode::On, Some(*self)).as_str()
    }
}

labels! {
    /// What a daemon hears from the kernel: its start line and the `mode` label of
    /// `sockmap_gc_events`.
    pub enum EventsState {
        /// `events = "off"`.
        Off => "off",
        /// The kernel refused the programs (or they were given up): the pass alone.
        Unavailable => "unavailable",
        Closes => "closes",
        Collisions => "collisions",
        ClosesAndCollisions => "closes-and-collisions",
    }
}

impl EventsState {
    /// The state for `mode` with these programs running (`None`: none).
    pub fn of(mode: EventsMode, watching: Option<Watching>) -> EventsState {
        match (mode, watching) {
            (
                _,
                Some(Watching {
                    closes: true,
                    collisions: true,
                }),
            ) => EventsState::ClosesAndCollisions,
            (
                _,
                Some(Watching {
                    closes: true,
                    collisions: false,
                }),
            ) => EventsState::Closes,
            (
                _,
                Some(Watching {
                    closes: false,
                    collisions: true,
                }),
            ) => EventsState::Collisions,
            (EventsMode::Off, _) => EventsState::Off,
            _ => EventsState::Unavailable,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("the kernel refused the event program {program}{}: {error}; {hint}", kind_text(*kind))]
    Refused {
        program: &'static str,
        kind: Option<ErrorKind>,
        error: String,
        hint: &'static str,
    },
    #[error("setting up the event ring buffer failed: {error}; check memory limits (RLIMIT_MEMLOCK on kernels before 5.11), or use events = \"off\"")]
    Ring { error: String },
    #[error("starting the event reader thread failed: {0}")]
    Thread(io::Error),
    #[error("the event program's ring buffer sent a malformed record: {what}; this binary and its BPF program disagree, rebuild sockmap-gc")]
    Malformed { what: String },
}

impl EventsError {
    /// Whether the kernel or the permissions refused a program: `events = "auto"` then
    /// does without it.
    pub fn is_refusal(&self) -> bool {
        matches!(self, EventsError::Refused { .. })
    }
}

fn refusal_hint(kind: Option<ErrorKind>) -> &'static str {
    match kind {
        Some(ErrorKind::PermissionDenied) => {
            "this kernel (or its security policy) forbids tracing programs (fentry, fexit, \
             tp_btf), or the process lacks CAP_BPF and CAP_PERFMON; the periodic pass still \
             finds stale entries"
        }
        Some(ErrorKind::NotFound) => {
            "this kernel's BTF lacks the traced function (inlined, or renamed); the periodic \
             pass still finds stale entries"
        }
        _ => {
            "the kernel needs BTF and BPF trampolines (x86_64 or arm64, Linux 5.5 or later; \
             collisions also need bpf_probe_read_kernel, which lockdown's confidentiality mode \
             refuses); the sweeps still find stale entries"
        }
    }
}

/// The running programs and their reader thread. Dropping it stops the thread and detaches
/// the programs.
pub struct EventWatcher {
    watching: Watching,
    control: MapHandle,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventWatcher {
    /// Loads and attaches what `mode` asks, watching collisions on the map with id `map_id`,
    /// and starts the reader, which calls `sink` on its own thread after each wait, at least
    /// every [`POLL`], with the events that came (none when the wait timed out: a sink can do
    /// its periodic work then). `Ok(None)` when the mode is off, or when `auto` met a refusal
    /// of both programs (warned once, with the reason).
    pub fn start(
        mode: EventsMode,
        map_id: u32,
        sink: impl FnMut(&[Heard]) + Send + 'static,
    ) -> Result<Option<EventWatcher>, EventsError> {
        let loaded = match mode {
            EventsMode::Off => return Ok(None),
            EventsMode::On => load(true, true)?,
            EventsMode::Auto => match load_what_the_kernel_accepts() {
                Ok(loaded) => loaded,
                Err(e) if e.is_refusal() => {
                    tracing::warn!(error = %e, "kernel events unavailable; stale entries are found by the periodic pass only (events = \"on\" makes this an error)");
                    return Ok(None);
                }
                Err(e) => return Err(e),
            },
        };
        let watcher = EventWatcher::run(loaded, sink)?;
        watcher.watch_map(map_id)?;
        Ok(Some(watcher))
    }

    fn run(
        loaded: Loaded,
        mut sink: impl FnMut(&[Heard]) + Send + 'static,
    ) -> Result<EventWatcher, EventsError> {
        let Loaded {
            object,
            links,
            watching,
        } = loaded;
        let ring_error = |e: libbpf_rs::Error| EventsError::Ring {
            error: format!("{e:#}"),
        };
        let control = object
            .maps()
            .find(|m| m.name() == CONTROL_MAP)
            .ok_or_else(|| EventsError::Malformed {
                what: format!("the BPF object has no map {CONTROL_MAP}"),
            })
            .and_then(|m| MapHandle::try_from(&m).map_err(ring_error))?;
        let heard: Arc<Mutex<Vec<Heard>>> = Arc::default();
        let ring = {
            let map = object
                .maps()
                .find(|m| m.name() == RING_MAP)
                .ok_or_else(|| EventsError::Malformed {
                    what: format!("the BPF object has no map {RING_MAP}"),
                })?;
            let mut builder = RingBufferBuilder::new();
            let filled = Arc::clone(&heard);
            builder
                .add(&map, move |bytes: &[u8]| {
                    match decode(bytes) {
                        Ok(event) => lock(&filled).push(Heard {
                            event,
                            at: monotonic_now(),
                        }),
                        Err(e) => tracing::warn!(error = %e, "event record dropped"),
                    }
                    0
                })
                .map_err(ring_error)?;
            builder.build().map_err(ring_error)?
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("sockmap-gc-events".into())
            .spawn(move || {
                // The programs stay attached, and their object loaded, while the reader runs.
                let _keep = (object, links);
                let mut batch = Vec::new();
                while !stopped.load(Ordering::Relaxed) {
                    if let Err(e) = ring.poll(POLL) {
                        if e.kind() == ErrorKind::Interrupted {
                            continue;
                        }
                        tracing::error!(error = %e, "reading kernel events failed; the periodic pass goes on alone");
                        return;
                    }
                    std::mem::swap(&mut batch, &mut *lock(&heard));
                    sink(&batch);
                    batch.clear();
                }
            })
            .map_err(EventsError::Thread)?;
        Ok(EventWatcher {
            watching,
            control,
            stop,
            thread: Some(thread),
        })
    }

    pub fn watching(&self) -> Watching {
        self.watching
    }

    /// Reports collisions on the map with this id (the map was replaced: a new id).
    pub fn watch_map(&self, map_id: u32) -> Result<(), EventsError> {
        self.control
            .update(
                &CONTROL_MAP_ID.to_ne_bytes(),
                &u64::from(map_id).to_ne_bytes(),
                MapFlags::ANY,
            )
            .map_err(|e| EventsError::Ring {
                error: format!("setting the watched map id: {e:#}"),
            })
    }

    /// Records the programs could not report because the ring buffer was full.
    pub fn lost(&self) -> u64 {
        self.control
            .lookup(&CONTROL_LOST.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .and_then(|v| v.try_into().ok().map(u64::from_ne_bytes))
            .unwrap_or(0)
    }

    /// Whether the reader thread still runs (it ends only on a read error or on drop).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for EventWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // It wakes within POLL; a panic there was already reported.
            let _ = thread.join();
        }
    }
}

/// The reader's own records, filled by the ring buffer's callback (on the same thread: the
/// lock is never contended).
fn lock(heard: &Mutex<Vec<Heard>>) -> std::sync::MutexGuard<'_, Vec<Heard>> {
    heard.lock().unwrap_or_else(|e| e.into_inner())
}

/// A loaded object and the links that attach its programs.
struct Loaded {
    object: Object,
    links: Vec<Link>,
    watching: Watching,
}

/// Both programs if the kernel takes them, else the one it takes; the first refusal when it
/// takes neither.
fn load_what_the_kernel_accepts() -> Result<Loaded, EventsError> {
    let both = match load(true, true) {
        Ok(loaded) => return Ok(loaded),
        Err(e) if e.is_refusal() => e,
        Err(e) => return Err(e),
    };
    for (closes, collisions) in [(true, false), (false, true)] {
        match load(closes, collisions) {
            Ok(loaded) => {
                tracing::warn!(error = %both, "kernel events: only {} watched", loaded.watching.label());
                return Ok(loaded);
            }
            Err(e) if e.is_refusal() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(both)
}

fn load(closes: bool, collisions: bool) -> Result<Loaded, EventsError> {
    crate::identity::route_libbpf_messages();
    let wanted = |name: &str| match name {
        CLOSE_PROGRAM => closes,
        COLLISION_PROGRAM => collisions,
        _ => false,
    };
    let program_name = || match (closes, collisions) {
        (true, false) => CLOSE_PROGRAM,
        (false, true) => COLLISION_PROGRAM,
        _ => "on_close and on_update",
    };
    let refused = |e: libbpf_rs::Error, program: &'static str| {
        let kind = Some(e.kind());
        EventsError::Refused {
            program,
            kind,
            error: format!("{e:#}"),
            hint: refusal_hint(kind),
        }
    };
    let mut open = ObjectBuilder::default()
        .open_memory(OBJECT)
        .map_err(|e| refused(e, program_name()))?;
    for mut prog in open.progs_mut() {
        let keep = prog.name().to_str().is_some_and(wanted);
        prog.set_autoload(keep);
    }
    let object = open.load().map_err(|e| refused(e, program_name()))?;
    let mut links = Vec::new();
    for prog in object.progs_mut() {
        let Some(name) = prog.name().to_str().filter(|n| wanted(n)) else {
            continue;
        };
        let program = if name == CLOSE_PROGRAM {
            CLOSE_PROGRAM
        } else {
            COLLISION_PROGRAM
        };
        links.push(prog.attach().map_err(|e| refused(e, program))?);
    }
    Ok(Loaded {
        object,
        links,
        watching: Watching { closes, collisions },
    })
}

/// Decodes one ring buffer sample.
fn decode(bytes: &[u8]) -> Result<Event, EventsError> {
    if bytes.len() != mem::size_of::<EventRecord>() {
        return Err(EventsError::Malformed {
            what: format!(
                "{} bytes, not one {}-byte record",
                bytes.len(),
                mem::size_of::<EventRecord>()
            ),
        });
    }
    // SAFETY: `bytes` holds exactly size_of::<EventRecord>() bytes; EventRecord is a
    // #[repr(C)] record of plain integers, so every byte pattern is a valid value, and
    // read_unaligned makes no alignment demand on the buffer.
    let r = unsafe { bytes.as_ptr().cast::<EventRecord>().read_unaligned() };
    let (local, remote) = record_ends(
        r.family,
        (r.local_addr, r.local_port),
        (r.remote_addr, r.remote_port),
    )
    .ok_or_else(|| EventsError::Malformed {
        what: format!("a socket of family {}, not AF_INET or AF_INET6", r.family),
    })?;
    let socket = EventSocket {
        cookie: r.cookie,
        local,
        remote,
        netns_inode: u64::from(r.netns_inode),
    };
    let at = Duration::from_nanos(r.ktime_ns);
    match r.kind {
        EVENT_CLOSE => Ok(Event::Closed {
            socket,
            from: TcpState::from_kernel(r.old_state),
            at,
        }),
        EVENT_COLLISION => Ok(Event::Collision {
            map_id: r.map_id,
            key: RawKey(r.key),
            socket,
            at,
        }),
        other => Err(EventsError::Malformed {
            what: format!("unknown event kind {other}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AF_INET: u16 = libc::AF_INET as u16;
    const AF_INET6: u16 = libc::AF_INET6 as u16;

    fn record(kind: u32, family: u16) -> EventRecord {
        let mut local_addr = [0u8; 16];
        let mut remote_addr = [0u8; 16];
        local_addr[..4].copy_from_slice(&[10, 1, 2, 2]);
        remote_addr[..4].copy_from_slice(&[10, 1, 2, 1]);
        EventRecord {
            kind,
            map_id: 42,
            cookie: 0x1234,
            key: [7; KEY_LEN],
            family,
            old_state: 1,
            pad: 0,
            local_addr,
            remote_addr,
            local_port: 8080,
            remote_port: 40000,
            netns_inode: 4026532000,
            ktime_ns: 1_500_000_000,
        }
    }

    fn bytes(r: &EventRecord) -> Vec<u8> {
        // SAFETY: `r` is a live EventRecord of size_of bytes with explicit padding fields,
        // so every byte is initialised.
        unsafe {
            std::slice::from_raw_parts(
                (r as *const EventRecord).cast::<u8>(),
                mem::size_of::<EventRecord>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn field_offsets_match_the_c_layout() {
        let r = record(EVENT_CLOSE, AF_INET);
        let base = std::ptr::addr_of!(r) as usize;
        let at = |p: usize| p - base;
        assert_eq!(at(std::ptr::addr_of!(r.map_id) as usize), 4);
        assert_eq!(at(std::ptr::addr_of!(r.cookie) as usize), 8);
        assert_eq!(at(std::ptr::addr_of!(r.key) as usize), 16);
        assert_eq!(at(std::ptr::addr_of!(r.family) as usize), 60);
        assert_eq!(at(std::ptr::addr_of!(r.old_state) as usize), 62);
        assert_eq!(at(std::ptr::addr_of!(r.local_addr) as usize), 64);
        assert_eq!(at(std::ptr::addr_of!(r.remote_addr) as usize), 80);
        assert_eq!(at(std::ptr::addr_of!(r.local_port) as usize), 96);
        assert_eq!(at(std::ptr::addr_of!(r.remote_port) as usize), 98);
        assert_eq!(at(std::ptr::addr_of!(r.netns_inode) as usize), 100);
        assert_eq!(at(std::ptr::addr_of!(r.ktime_ns) as usize), 104);
    }

    #[test]
    fn a_close_decodes_with_its_ends_and_key() {
        let event = decode(&bytes(&record(EVENT_CLOSE, AF_INET))).unwrap();
        let Event::Closed { socket, from, at } = event else {
            panic!("not a close: {event:?}");
        };
        assert_eq!(socket.cookie, 0x1234);
        assert_eq!(socket.local, "10.1.2.2:8080".parse().unwrap());
        assert_eq!(socket.remote, "10.1.2.1:40000".parse().unwrap());
        assert_eq!(socket.netns_inode, 4026532000);
        assert_eq!(from, TcpState::Established);
        assert_eq!(at, Duration::from_millis(1500));
        // Filed by Cilium under A = its remote end, B = its local end.
        let key = SockKey::decode(&socket.key().unwrap()).unwrap();
        assert_eq!(key.a(), socket.remote);
        assert_eq!(key.b(), socket.local);
    }

    #[test]
    fn a_collision_decodes_with_the_refused_key() {
        let event = decode(&bytes(&record(EVENT_COLLISION, AF_INET6))).unwrap();
        let Event::Collision {
            map_id,
            key,
            socket,
            ..
        } = event
        else {
            panic!("not a collision: {event:?}");
        };
        assert_eq!(map_id, 42);
        assert_eq!(key, RawKey([7; KEY_LEN]));
        assert!(socket.local.is_ipv6());
        assert_eq!(socket.local.port(), 8080);
    }

    #[test]
    fn malformed_records_are_refused() {
        let good = bytes(&record(EVENT_CLOSE, AF_INET));
        assert!(decode(&good[..111]).is_err());
        assert!(decode(&bytes(&record(9, AF_INET))).is_err());
        assert!(decode(&bytes(&record(EVENT_CLOSE, 1))).is_err());
    }

    #[test]
    fn labels_and_refusals() {
        let both = Watching {
            closes: true,
            collisions: true,
        };
        assert_eq!(both.label(), "closes-and-collisions");
        let e = EventsError::Refused {
            program: CLOSE_PROGRAM,
            kind: Some(ErrorKind::PermissionDenied),
            error: "Operation not permitted (os error 1)".into(),
            hint: refusal_hint(Some(ErrorKind::PermissionDenied)),
        };
        assert!(e.is_refusal());
        assert!(e.to_string().contains("PermissionDenied"));
        assert!(e.to_string().contains("os error 1"));
        assert!(!EventsError::Ring { error: "x".into() }.is_refusal());
    }
}
