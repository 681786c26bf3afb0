//! Faults injected on the real kernel, each with its expected outcome: a clear message, no
//! wrong delete, recovery. An agent restart between the two observations of a sweep (the map
//! unpinned and re-created at its path); the map missing for a while, then back; a full map
//! (65,535 entries); a namespace whose file is denied to the daemon; namespaces deleted while
//! the daemon inventories them.
//!
//! Covered elsewhere and not repeated here: SIGTERM mid-sweep and SIGHUP with a broken config
//! (`daemon.rs`), no namespace readable at all (`sweep.rs`), a namespace deleted after
//! discovery (`inventory.rs`), `NLM_F_DUMP_INTR` and truncated replies (unit tests in
//! `src/diag.rs`; see docs/RELIABILITY.md for why not here).

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};
use nix::sys::signal::Signal;
use sockmap_gc::key::SockKey;
use sockmap_gc_lab::{sys, Held, Lab, Server};

use crate::rig::{lab_and_scratch, read_trail, Daemon, Scratch};
use crate::support::{
    evidence, hex, lab, natural_stale, natural_stale_under_daemon, plant_stale, product,
    run_command, serve_and_hold, PEER,
};

fn sa(ip: impl Into<std::net::IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Stale keys for `server`: a natural one (a reset client from `natural`) and planted ones.
fn make_stale(
    lab: &Lab,
    server: SocketAddr,
    natural: u16,
    planted: std::ops::Range<u16>,
) -> Vec<SockKey> {
    let mut stale = vec![natural_stale(lab, server, sa(lab.node_ip(0), natural))];
    stale.extend(plant_stale(lab, server, planted));
    stale
}

/// The keys the daemon's trail says it deleted.
fn trail_keys(scratch: &Scratch) -> HashSet<String> {
    read_trail(&scratch.trail())
        .into_iter()
        .map(|t| t.key)
        .collect()
}

/// A lab whose busy server holds one live connection from `port`, and a daemon deleting
/// (sweeps 1 s apart, stale entries confirmed after `confirm_after`) that has finished a sweep.
/// In the order the tests declare them, so that they drop daemon first, scratch dir last.
fn running(
    id: &str,
    port: u16,
    confirm_after: &str,
) -> (Scratch, Lab, Server, Held, HashSet<SockKey>, Daemon) {
    let (scratch, lab) = lab_and_scratch(id);
    let (server, held, live) = serve_and_hold(&lab, true, |c| c.from_port(port));
    let config = scratch.config(
        &lab.map_path(),
        &format!(
            "dry_run = false\ninterval_min = \"1s\"\ninterval_max = \"1s\"\nconfirm_after = \"{confirm_after}\""
        ),
    );
    let daemon = Daemon::start(&config);
    daemon.wait_more_sweeps(1, Duration::from_secs(20));
    (scratch, lab, server, held, live, daemon)
}

/// A sockhash shaped like Cilium's (44-byte keys, 4-byte values), pinned at `path`.
fn create_sockhash(path: &Path, max_entries: u32) -> MapHandle {
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as libbpf_sys::size_t,
        ..Default::default()
    };
    let mut map = MapHandle::create(
        MapType::Sockhash,
        Some("cilium_sock_ops"),
        44,
        4,
        max_entries,
        &opts,
    )
    .expect("create a sockhash");
    map.pin(path).expect("pin the sockhash");
    map
}

/// An established loopback pair in this thread's namespace: (client, server end).
fn loopback_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

fn file_under(map: &MapHandle, key: &SockKey, sock: &TcpStream) -> Result<(), libbpf_rs::Error> {
    let fd = u32::try_from(sock.as_raw_fd()).expect("fd");
    map.update(&key.encode().0, &fd.to_ne_bytes(), MapFlags::NO_EXIST)
}

fn has_key(map: &MapHandle, key: &SockKey) -> bool {
    map.keys()
        .any(|k| k.as_slice() == key.encode().0.as_slice())
}

/// Waits until the daemon's sweep is between its two observations: its `sweep` thread sleeps
/// out `confirm_after` (in `nanosleep`, which nothing else in a sweep before the deletes does).
/// Watching the `smgc-netns-*` threads instead missed a quick first inventory under load.
fn wait_between_observations(pid: u32, timeout: Duration) -> bool {
    let sleeping = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten().any(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "sweep")
                        && std::fs::read_to_string(t.path().join("wchan"))
                            .is_ok_and(|w| w.contains("nanosleep"))
                })
            })
            .unwrap_or(false)
    };
    sys::wait_until(timeout, sleeping)
}

const SLOW: &str = "interval_min = \"1h\"\ninterval_max = \"1h\"";

#[test]
fn an_agent_restart_between_the_observations_holds_the_sweep_and_the_next_sweep_uses_the_new_map() {
    let id = "flt-restart";
    let (scratch, lab) = lab_and_scratch(id);
    let server = lab.start_server(0, 8080, false).expect("server");
    let old_stale = plant_stale(&lab, server.addr(), 41000..41003);
    let config = scratch.config(
        &lab.map_path(),
        // Full sweeps only: the continuous pass would delete the old map's keys itself.
        &format!("dry_run = false\n{SLOW}\nconfirm_after = \"5s\"\npass_interval = \"0s\""),
    );
    // The first sweep starts at once; the next only on SIGUSR1.
    let daemon = Daemon::start(&config);
    assert!(
        wait_between_observations(daemon.pid(), Duration::from_secs(60)),
        "the sweep never reached the wait between its observations:\n{}",
        daemon.log()
    );
    // The agent restarts: the old pin goes, a new map is pinned at the same path.
    let old_id = lab.map_id().expect("old map id");
    std::fs::remove_file(lab.map_path()).expect("unpin the old map");
    let new_map = create_sockhash(&lab.map_path(), 65535);
    let new_id = new_map.info().expect("info").info.id;
    assert_ne!(old_id, new_id);
    let (a, b) = loopback_pair();
    let new_stale = [
        SockKey::for_socket(server.addr(), sa(lab.node_ip(0), 42000)).expect("v4"),
        SockKey::for_socket(server.addr(), sa(lab.node_ip(0), 42001)).expect("v4"),
    ];
    file_under(&new_map, &new_stale[0], &a).expect("file in the new map");
    file_under(&new_map, &new_stale[1], &b).expect("file in the new map");

    let held = daemon
        .wait_line(Duration::from_secs(30), crate::rig::is_summary)
        .unwrap_or_else(|| panic!("no first sweep:\n{}", daemon.log()));
    assert!(held.contains("sweep held:"), "{held}");
    assert!(held.contains("map-replaced"), "{held}");
    assert!(held.contains("nothing deleted"), "{held}");
    for k in &old_stale {
        assert!(lab.contains(k), "{k} deleted from the replaced map");
    }
    assert!(
        read_trail(&scratch.trail()).is_empty(),
        "a held sweep deleted"
    );

    // The next sweep opens the path afresh: the new map, its own verdicts.
    daemon.signal(Signal::SIGUSR1);
    let gone = sys::wait_until(Duration::from_secs(30), || {
        new_stale.iter().all(|k| !has_key(&new_map, k))
    });
    assert!(gone, "new map's stale keys left:\n{}", daemon.log());
    // Compare-and-delete deletes in the kernel first; the trail lines follow its outcome.
    let want: HashSet<String> = new_stale.iter().map(hex).collect();
    sys::wait_until(Duration::from_secs(10), || {
        read_trail(&scratch.trail()).len() >= want.len()
    });
    let trail = read_trail(&scratch.trail());
    assert_eq!(
        trail.iter().map(|t| t.key.clone()).collect::<HashSet<_>>(),
        want
    );
    assert!(
        trail.iter().all(|t| t.map_id == u64::from(new_id)),
        "{trail:?}"
    );
    for k in &old_stale {
        assert!(lab.contains(k), "{k} of the old map touched");
    }
    let (status, took, log) = daemon.terminate();
    assert!(status.success() && took < Duration::from_secs(2), "{log}");
    assert!(log.contains(&format!("(id {new_id})")), "{log}");
    evidence(&format!(
        "agent restart mid-sweep: map {old_id} replaced by {new_id}: sweep held (map-replaced), \
         {} keys of the old map untouched; the next sweep deleted the new map's {} stale keys",
        old_stale.len(),
        new_stale.len()
    ));
    // The lab's teardown unpins whatever is at its path.
    drop(new_map);
}

#[test]
fn the_map_missing_for_a_while_fails_those_sweeps_and_the_daemon_carries_on() {
    let id = "flt-gone";
    let (scratch, lab, server, held, live, daemon) = running(id, 43000, "0s");
    let aside = lab.pin_dir().join("aside");
    std::fs::rename(lab.map_path(), &aside).expect("move the pin aside");
    let missing = Instant::now();
    let path = lab.map_path().display().to_string();
    let failed_before = daemon.sweeps_with("failed");
    sys::wait_until(Duration::from_secs(30), || {
        daemon.sweeps_with("failed") >= failed_before + 2
    });
    assert!(
        daemon.sweeps_with("failed") >= failed_before + 2,
        "no failed sweeps while the map was missing:\n{}",
        daemon.log()
    );
    // Stale entries appear while it is missing.
    let stale = make_stale(&lab, server.addr(), 43010, 43020..43022);
    std::fs::rename(&aside, lab.map_path()).expect("put the pin back");
    let gone = sys::wait_until(Duration::from_secs(30), || {
        stale.iter().all(|k| !lab.contains(k))
    });
    let back_after = missing.elapsed();
    assert!(
        gone,
        "stale keys left after the map came back:\n{}",
        daemon.log()
    );
    for k in &live {
        assert!(lab.contains(k), "live key {k} deleted");
    }
    let (status, _, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    let failure = log
        .lines()
        .find(|l| l.contains("sweep failed:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        failure.contains(&format!("no pinned map at {path}")) && failure.contains("next in"),
        "the failure says what is missing and when it tries again: {failure}"
    );
    let want: HashSet<String> = stale.iter().map(hex).collect();
    let trail = trail_keys(&scratch);
    assert_eq!(trail, want, "only the stale keys were deleted");
    evidence(&format!(
        "map missing: {} sweeps failed with \"{}\"; back after {:.1} s and the {} stale keys deleted",
        log.matches("sweep failed:").count(),
        failure.split("sweep failed: ").nth(1).unwrap_or_default(),
        back_after.as_secs_f64(),
        stale.len()
    ));
    held.release().expect("graceful close");
}

/// A pin directory of this test's own, removed on drop (and before, if a crash left it).
struct PinDir(PathBuf);

impl PinDir {
    fn new(id: &str) -> PinDir {
        let dir = Path::new(sys::BPFFS).join(format!("smgc-{id}"));
        sockmap_gc_lab::bpf::remove_pin_dir(&dir);
        std::fs::create_dir(&dir).expect("pin dir");
        PinDir(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        sockmap_gc_lab::bpf::remove_pin_dir(&self.0);
    }
}

#[test]
fn a_full_map_of_65535_entries_is_swept_and_its_live_entry_kept() {
    const MAX: u32 = 65535;
    let dir = PinDir::new("flt-full");
    let path = dir.0.join("cilium_sock_ops");
    let map = create_sockhash(&path, MAX);
    // The live entry: a loopback connection of this process, filed under its own key.
    let (client, _server) = loopback_pair();
    let live = SockKey::for_socket(
        client.local_addr().expect("local"),
        client.peer_addr().expect("peer"),
    )
    .expect("v4");
    file_under(&map, &live, &client).expect("file the live socket");
    // The rest: stale keys held by sockets of other ends. Without an sk_msg program on the
    // map one socket may be filed under many keys.
    let pairs: Vec<(TcpStream, TcpStream)> = (0..32).map(|_| loopback_pair()).collect();
    let mut n = 0u32;
    'fill: for (a, b) in &pairs {
        for sock in [a, b] {
            for _ in 0..(MAX as usize).div_ceil(64) {
                if n == MAX - 1 {
                    break 'fill;
                }
                let key = SockKey::for_socket(
                    sa([10, 99, (n >> 16) as u8, (n >> 8) as u8], 8080),
                    sa([10, 98, 0, n as u8], 30000 + (n % 30000) as u16),
                )
                .expect("v4");
                file_under(&map, &key, sock).expect("fill");
                n += 1;
            }
        }
    }
    assert_eq!(map.keys().count(), MAX as usize, "the map is full");
    let one_more = SockKey::for_socket(sa([10, 97, 0, 1], 1), sa([10, 97, 0, 2], 2)).expect("v4");
    assert!(
        file_under(&map, &one_more, &pairs[0].0).is_err(),
        "a full map takes no more"
    );
    let started = Instant::now();
    let out = run_command(
        Command::new(product())
            .args(["sweep", "--map"])
            .arg(&path)
            .args(["--execute", "--confirm-after", "0s", "--rate-limit", "0"])
            .args(["--max-deletes", "70000", "--output", "json"]),
    );
    let took = started.elapsed();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let j = out.json();
    assert_eq!(
        j["deleted"].as_array().expect("deleted").len(),
        MAX as usize - 1,
        "{}",
        out.stderr
    );
    let left: Vec<Vec<u8>> = map.keys().collect();
    assert_eq!(
        left,
        vec![live.encode().0.to_vec()],
        "only the live entry stays"
    );
    file_under(&map, &one_more, &pairs[0].0).expect("room again");
    evidence(&format!(
        "full map: {} entries, sweep --execute deleted {} and kept the live one in {:.1} s",
        MAX,
        MAX - 1,
        took.as_secs_f64()
    ));
}

/// A process of another user in a network namespace of its own: its namespace file is
/// denied to a daemon without CAP_SYS_PTRACE (ptrace access rules), so only
/// `/proc/PID/net/tcp` shows its sockets. It holds one loopback connection.
struct Hidden {
    child: Child,
    conn: (SocketAddr, SocketAddr),
}

impl Hidden {
    fn start() -> Hidden {
        let script = format!(
            "ip link set lo up; exec 3<&0; \
             setpriv --reuid=65534 --regid=65534 --clear-groups {PEER} peer server --port 7000 --bind 127.0.0.1 --max-life 120s <&3 & \
             i=0; until ss -Hltn 'sport = :7000' | grep -q . || [ $i -ge 300 ]; do sleep 0.1; i=$((i+1)); done; \
             exec setpriv --reuid=65534 --regid=65534 --clear-groups {PEER} peer client --connect 127.0.0.1:7000 --hold --count 1 --max-life 120s"
        );
        let mut child = Command::new("unshare")
            .args(["--net", "--", "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare");
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
            child.stdout.take().expect("stdout"),
        ));
        let mut conn = None;
        for line in lines.by_ref().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("held ") {
                let get = |name: &str| -> SocketAddr {
                    rest.split_whitespace()
                        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                        .and_then(|s| s.parse().ok())
                        .expect("held line")
                };
                conn = Some((get("local"), get("remote")));
            }
            if line == "ready" || line.starts_with("error") {
                break;
            }
        }
        let conn = conn.expect("the hidden client holds a connection");
        Hidden { child, conn }
    }
}

impl Drop for Hidden {
    fn drop(&mut self) {
        // Closing stdin ends the client and the server (both read it: the server through the
        // shell's fd 3, since sh gives a background job /dev/null otherwise).
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sockmap-gc SUBCOMMAND --map <the lab's map>` as the unit runs it: CAP_SYS_ADMIN only.
fn as_the_unit(subcommand: &str, lab: &Lab) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=0", "--regid=0", "--clear-groups", "--no-new-privs"])
        .args(["--inh-caps=-all", "--ambient-caps=-all"])
        .arg("--bounding-set=-all,+sys_admin")
        .arg("--")
        .arg(product())
        .args([subcommand, "--map"])
        .arg(lab.map_path());
    cmd
}

#[test]
fn a_namespace_denied_to_the_daemon_is_read_through_procfs_and_its_connection_kept() {
    let lab = lab("flt-denied", 1);
    let hidden = Hidden::start();
    // An entry whose tuple only the hidden namespace's connection owns, and a stale one.
    let owned = SockKey::for_socket(hidden.conn.0, hidden.conn.1).expect("v4");
    lab.plant(owned).expect("plant");
    let server = lab.start_server(0, 8080, false).expect("server");
    let stale = plant_stale(&lab, server.addr(), 44000..44001);
    // As the unit runs it. Tuple evidence only, so the hidden namespace's table is what decides.
    let out = run_command(
        as_the_unit("sweep", &lab)
            .args(["--execute", "--confirm-after", "0s", "--identity", "off"])
            .args(["--output", "json"]),
    );
    let j = out.json();
    assert_eq!(
        j["inventory"]["complete"], true,
        "{}\n{}",
        out.stdout, out.stderr
    );
    assert!(
        j["inventory"]["procfs_tables"].as_u64().unwrap_or(0) >= 1,
        "the denied namespace was not read through procfs: {}",
        j["inventory"]
    );
    assert!(
        lab.contains(&owned),
        "the hidden connection's entry was deleted"
    );
    assert!(!lab.contains(&stale[0]), "{}", out.stdout);
    let text = run_command(as_the_unit("audit", &lab).args(["--identity", "off"]));
    assert!(
        text.stdout
            .contains("read from /proc/PID/net (namespace file denied)"),
        "{}",
        text.stdout
    );
    evidence(&format!(
        "namespace denied (uid 65534, no CAP_SYS_PTRACE): read through /proc/PID/net; {} kept live, stale one deleted",
        owned
    ));
    drop(hidden);
}

#[test]
fn namespaces_deleted_while_the_daemon_inventories_them_neither_fail_nor_hold_a_sweep() {
    let id = "flt-nsdel";
    let (scratch, lab, server, held, live, daemon) = running(id, 45500, "200ms");
    let churning = AtomicBool::new(true);
    let names: Vec<String> = (0..4).map(|i| format!("smgc-{id}-x{i}")).collect();
    let mut made = 0usize;
    let mut stale = Vec::new();
    let before = daemon.sweeps();
    std::thread::scope(|s| {
        let churner = s.spawn(|| {
            let mut n = 0usize;
            while churning.load(Ordering::Relaxed) {
                let name = &names[n % names.len()];
                let _ = Command::new("ip").args(["netns", "add", name]).output();
                // A process in a namespace of its own, with a socket, gone a moment later.
                let _ = Command::new("unshare")
                    .args(["--net", "sh", "-c", "ip link set lo up; sleep 0.05"])
                    .output();
                let _ = Command::new("ip").args(["netns", "del", name]).output();
                n += 1;
            }
            n
        });
        for i in 0..5u16 {
            stale.push(natural_stale_under_daemon(
                &lab,
                server.addr(),
                sa(lab.node_ip(0), 45510 + i),
            ));
            stale.extend(plant_stale(
                &lab,
                server.addr(),
                45520 + 2 * i..45522 + 2 * i,
            ));
            daemon.wait_more_sweeps(1, Duration::from_secs(30));
        }
        sys::wait_until(Duration::from_secs(30), || {
            stale.iter().all(|k| !lab.contains(k))
        });
        churning.store(false, Ordering::Relaxed);
        made = churner.join().expect("churner");
    });
    for name in &names {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    }
    // Before SIGTERM: a sweep the stop interrupts is no fault of the namespaces.
    let swept = daemon.log();
    let (status, _, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    let during: Vec<&str> = swept
        .lines()
        .filter(|l| crate::rig::is_summary(l))
        .skip(before)
        .collect();
    let left: Vec<String> = stale
        .iter()
        .filter(|k| lab.contains(k))
        .map(|k| k.to_string())
        .collect();
    assert!(left.is_empty(), "stale keys left: {left:?}\n{log}");
    for k in &live {
        assert!(lab.contains(k), "live key {k} deleted");
    }
    let not_ok: Vec<&&str> = during.iter().filter(|l| !l.contains("sweep ok:")).collect();
    assert!(
        not_ok.is_empty(),
        "sweeps failed or held while namespaces came and went: {not_ok:?}"
    );
    let want: HashSet<String> = stale.iter().map(hex).collect();
    let trail = trail_keys(&scratch);
    assert_eq!(trail, want);
    evidence(&format!(
        "namespace churn: {made} namespaces made and deleted during {} sweeps, all ok; {} stale keys deleted, {} live kept",
        during.len(),
        stale.len(),
        live.len()
    ));
    held.release().expect("graceful close");
}

/// Disconnects `sock` (`connect` with `AF_UNSPEC`), so that it can connect again.
fn disconnect(sock: &TcpStream) {
    // SAFETY: a zeroed sockaddr with family AF_UNSPEC is a valid argument to connect(2),
    // which reads only its first `size_of::<sockaddr>()` bytes; `sock` owns a live fd.
    let rc = unsafe {
        let mut unspec: libc::sockaddr = std::mem::zeroed();
        unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            sock.as_raw_fd(),
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "disconnect: {}", std::io::Error::last_os_error());
}

#[test]
fn a_socket_that_reconnects_to_the_keys_tuple_between_the_judgement_and_the_delete_is_kept() {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
    use sockmap_gc::identity::{CadOutcome, IdentityReader, Target};
    use sockmap_gc::map::{Access, SockMap};

    let dir = PinDir::new("flt-reconnect");
    let path = dir.0.join("cilium_sock_ops");
    let handle = create_sockhash(&path, 64);
    let first = TcpListener::bind("127.0.0.1:0").expect("listen");
    let second = TcpListener::bind("127.0.0.1:0").expect("listen");
    // The socket that will reconnect: bound to a port of its own (an explicit bind survives
    // the disconnect), connected to `first`.
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    let probe = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = probe.local_addr().expect("addr").port();
    drop(probe);
    socket::bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(sa([127, 0, 0, 1], port)),
    )
    .expect("bind");
    let sock = TcpStream::from(fd);
    let connect = |to: &TcpListener| {
        socket::connect(
            sock.as_raw_fd(),
            &SockaddrStorage::from(to.local_addr().expect("addr")),
        )
        .expect("connect");
        to.accept().expect("accept").0
    };
    let _first_end = connect(&first);
    // Filed under the key of its *future* tuple (to `second`): stale, held elsewhere.
    let key = SockKey::for_socket(sa([127, 0, 0, 1], port), second.local_addr().expect("addr"))
        .expect("v4");
    file_under(&handle, &key, &sock).expect("file the socket");
    // A control that stays stale: a socket of other ends under a key of its own.
    let (other, _other_end) = loopback_pair();
    let control = SockKey::for_socket(sa([127, 0, 0, 1], 1), sa([127, 0, 0, 1], 2)).expect("v4");
    file_under(&handle, &control, &other).expect("file the control");

    let map = SockMap::open(&path, Access::ReadWrite).expect("open");
    let mut reader = IdentityReader::new().expect("identity iterator");
    let judged: std::collections::HashMap<_, _> = reader
        .read(&map)
        .expect("identity read")
        .entries
        .into_iter()
        .collect();
    let held = judged[&key.encode()];
    assert_ne!(
        (held.local, held.remote),
        (key.local, key.remote),
        "judged stale: its own ends are not the key's"
    );

    // Between the judgement and the delete the socket reconnects to exactly the key's tuple.
    disconnect(&sock);
    let _second_end = connect(&second);
    let now = reader.read(&map).expect("identity read").entries;
    let (_, now) = now
        .iter()
        .find(|(k, _)| *k == key.encode())
        .expect("still filed after the reconnect");
    assert_eq!(now.cookie, held.cookie, "the same socket");
    assert_eq!((now.local, now.remote), (key.local, key.remote));

    let outcomes = reader
        .compare_and_delete(
            &map,
            &[
                Target::new(key.encode(), held.cookie),
                Target::new(control.encode(), judged[&control.encode()].cookie),
            ],
        )
        .expect("compare-and-delete");
    assert_eq!(
        outcomes,
        vec![
            (key.encode(), CadOutcome::NotStale),
            (control.encode(), CadOutcome::Deleted),
        ]
    );
    assert!(
        has_key(&handle, &key),
        "the reconnected socket's entry is kept"
    );
    assert!(!has_key(&handle, &control), "the control is deleted");
    evidence(&format!(
        "a socket judged stale under {key} (own ends {} -> {}) reconnected to the key's tuple \
         before the delete: in-kernel compare-and-delete kept it (not stale now); the control \
         entry was deleted",
        held.local, held.remote
    ));
}
