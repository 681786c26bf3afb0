//! sockmap-gc-lab: a real-kernel lab for sockmap-gc. It recreates the stuck-connection incident
//! with Cilium v1.11.10-like sockops/sk_msg programs in namespaces, cgroups and pins it creates
//! and names itself, so parallel labs (and the host) never see each other's resources.
//!
//! A [`Lab`] with id `ID` owns: netns `smgc-ID-node` (the "host", where clients run) and
//! `smgc-ID-p<i>` (pods, where servers run) joined by veth pairs; cgroup `<cgroup2>/smgc-ID`
//! (sock_ops scope, home of every peer process); pin dir `/sys/fs/bpf/smgc-ID/` with the
//! sockhash at `/sys/fs/bpf/smgc-ID/cilium_sock_ops`. Everything goes on drop; leftovers of the
//! same names from a crashed run are removed at creation (they are ours by name).

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bpf;
pub mod cgroup;
pub mod interrupt;
pub mod map;
pub mod netns;
pub mod peer;
mod plant;
pub mod progstats;
pub mod sys;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use libbpf_rs::MapHandle;
use sockmap_gc::key::{RawKey, SockKey};

pub use peer::{ClientOpts, Held, Outcome, Place, Server};

/// Prefix of every resource name the lab makes.
pub const PREFIX: &str = "smgc";

/// Client ports never handed out as ephemeral ports in the node namespace: tests use them as
/// fixed client ports and in planted keys.
pub const FIXED_PORTS: &str = "40000-49999";

/// Most pods a lab may have (one /24 per pod link within a derived 10.a.b.0 range; the
/// benchmark spreads a full map over 100).
pub const MAX_PODS: usize = 128;

/// What to build.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Short unique id per test: lowercase letters, digits, '-'; at most 24 characters.
    pub id: String,
    /// Number of pod namespaces (1..=MAX_PODS).
    pub pods: usize,
    /// The `sockmap-gc-lab` binary (its hidden `peer` subcommand runs servers and clients).
    pub peer_bin: PathBuf,
    /// Also file IPv6 sockets (Cilium v1.11 does not; off by default).
    pub ipv6: bool,
    /// Every peer process exits after this long whatever happens (bounds a leaked peer).
    pub peer_max_life: Duration,
    /// The sockhash's max_entries; `None` keeps Cilium's 65535. A smaller map fills up like
    /// the incident's, and the connections it cannot file stay unfiled (the benchmark).
    pub map_max_entries: Option<u32>,
}

impl LabConfig {
    pub fn new(id: &str, pods: usize, peer_bin: impl Into<PathBuf>) -> LabConfig {
        LabConfig {
            id: id.to_string(),
            pods,
            peer_bin: peer_bin.into(),
            ipv6: false,
            peer_max_life: Duration::from_secs(600),
            map_max_entries: None,
        }
    }
}

/// Checks an id: it becomes part of netns, cgroup and pin names.
pub fn validate_id(id: &str) -> Result<()> {
    let ok_chars = id
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if id.is_empty() || id.len() > 24 || !ok_chars || id.starts_with('-') || id.ends_with('-') {
        bail!("lab id {id:?}: use 1-24 characters of a-z, 0-9 and '-', not starting or ending with '-'");
    }
    Ok(())
}

/// Names of one lab's resources, derivable from the id alone (used for leftover removal).
#[derive(Debug, Clone)]
pub struct Names {
    pub id: String,
}

impl Names {
    pub fn new(id: &str) -> Result<Names> {
        validate_id(id)?;
        Ok(Names { id: id.to_string() })
    }

    pub fn node_netns(&self) -> String {
        format!("{PREFIX}-{}-node", self.id)
    }

    pub fn pod_netns(&self, i: usize) -> String {
        format!("{PREFIX}-{}-p{i}", self.id)
    }

    /// Whether `name` (in /run/netns) is one of this lab's namespaces.
    pub fn owns_netns(&self, name: &str) -> bool {
        if name == self.node_netns() {
            return true;
        }
        let prefix = format!("{PREFIX}-{}-p", self.id);
        name.strip_prefix(&prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    pub fn cgroup(&self, cgroup2: &Path) -> PathBuf {
        cgroup2.join(format!("{PREFIX}-{}", self.id))
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new(sys::BPFFS).join(format!("{PREFIX}-{}", self.id))
    }

    pub fn map_path(&self) -> PathBuf {
        self.pin_dir().join(bpf::MAP_NAME)
    }
}

/// Removes whatever a crashed run with this id left: kills its cgroup's processes, unpins,
/// removes the cgroup, deletes its namespaces. Touches nothing not named from the id.
pub fn remove_leftovers(id: &str) -> Result<()> {
    let names = Names::new(id)?;
    let cg = names.cgroup(&sys::cgroup2_mount()?);
    cgroup::kill_all(&cg);
    if sys::exists(&names.pin_dir()) {
        bpf::remove_pin_dir(&names.pin_dir());
    }
    cgroup::remove(&cg)?;
    for ns in netns::list() {
        if names.owns_netns(&ns) {
            netns::delete(&ns)?;
        }
    }
    Ok(())
}

/// Kills the processes of lab `id` (for a signal handler: quick, touches nothing else).
pub fn kill_peers(id: &str) {
    if let (Ok(names), Ok(cg2)) = (Names::new(id), sys::cgroup2_mount()) {
        cgroup::kill_all(&names.cgroup(&cg2));
    }
}

/// Stable 32-bit FNV-1a of the id: spreads labs over 10.x address ranges so that labs running
/// at once rarely share addresses (they could: each lives in its own namespaces).
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// How [`Lab::start_server_with`] runs a server.
#[derive(Debug, Clone, Default)]
pub struct ServerOpts {
    /// Keep the fds of connections reset by the client (the leaky app).
    pub keep_reset_fds: bool,
    /// Listen but never accept (the stuck app).
    pub never_accept: bool,
    /// Run in this cgroup (under the lab's) instead of the lab's own.
    pub cgroup: Option<PathBuf>,
}

fn wait_listening(
    proc: &mut peer::PeerProc,
    pod: usize,
    args: &[String],
    what: &str,
) -> Result<()> {
    let lines = proc.lines_until(Duration::from_secs(5), |l| {
        l.starts_with("listening") || l.starts_with("error")
    })?;
    let last = lines.last().cloned().unwrap_or_default();
    if !last.starts_with("listening") {
        bail!(
            "{what} on pod {pod} did not start ({}): {last}",
            args.join(" ")
        );
    }
    Ok(())
}

/// A running lab. Dropping it tears everything down: peers, programs, pin, cgroup, netns.
pub struct Lab {
    names: Names,
    peer_bin: PathBuf,
    pods: usize,
    net_a: u8,
    net_b: u8,
    ipv6: bool,
    peer_max_life: Duration,
    planter: Mutex<plant::Planter>,
    map: MapHandle,
    // Torn down explicitly in Drop, in this order.
    programs: Option<bpf::Programs>,
    cgroup: Option<cgroup::Cgroup>,
    netns: Vec<netns::Netns>,
}

impl Lab {
    /// Builds a lab with `pods` pod namespaces; see [`LabConfig`].
    pub fn new(id: &str, pods: usize, peer_bin: impl Into<PathBuf>) -> Result<Lab> {
        Lab::with_config(LabConfig::new(id, pods, peer_bin))
    }

    pub fn with_config(config: LabConfig) -> Result<Lab> {
        sys::require_root()?;
        let names = Names::new(&config.id)?;
        if config.pods == 0 || config.pods > MAX_PODS {
            bail!("a lab has 1..={MAX_PODS} pods, not {}", config.pods);
        }
        if !config.peer_bin.is_file() {
            bail!("peer binary {} not found", config.peer_bin.display());
        }
        sys::ensure_bpffs()?;
        let cg2 = sys::cgroup2_mount()?;
        remove_leftovers(&config.id)
            .with_context(|| format!("removing leftovers of lab {:?}", config.id))?;

        let h = fnv1a(&config.id);
        let net_a = 1 + (h % 250) as u8;
        let net_b = ((h >> 8) % (256 - MAX_PODS as u32)) as u8;

        // Guards are locals until the end: an early return drops them in reverse order.
        let mut spaces = Vec::new();
        let node = netns::Netns::create(&names.node_netns())?;
        // Tests pick client ports and plant keys in this range; an ephemeral port landing
        // there would collide with them.
        sys::ip(&[
            "netns",
            "exec",
            &names.node_netns(),
            "sysctl",
            "-qw",
            &format!("net.ipv4.ip_local_reserved_ports={FIXED_PORTS}"),
        ])?;
        spaces.push(node);
        for i in 0..config.pods {
            let pod = netns::Netns::create(&names.pod_netns(i))?;
            let node_if = format!("p{i}");
            let node_ip = format!("10.{net_a}.{}.1/24", net_b as usize + i);
            let pod_ip = format!("10.{net_a}.{}.2/24", net_b as usize + i);
            let node_ns = names.node_netns();
            sys::ip(&[
                "-n",
                &node_ns,
                "link",
                "add",
                &node_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.name(),
            ])?;
            sys::ip(&["-n", &node_ns, "addr", "add", &node_ip, "dev", &node_if])?;
            sys::ip(&["-n", &node_ns, "link", "set", &node_if, "up"])?;
            sys::ip(&["-n", pod.name(), "addr", "add", &pod_ip, "dev", "eth0"])?;
            sys::ip(&["-n", pod.name(), "link", "set", "eth0", "up"])?;
            if config.ipv6 {
                let n6 = format!("fd00:{net_a:x}:{:x}::1/64", net_b as usize + i);
                let p6 = format!("fd00:{net_a:x}:{:x}::2/64", net_b as usize + i);
                sys::ip(&["-n", &node_ns, "addr", "add", &n6, "dev", &node_if, "nodad"])?;
                sys::ip(&["-n", pod.name(), "addr", "add", &p6, "dev", "eth0", "nodad"])?;
            }
            spaces.push(pod);
        }
        let cgroup = cgroup::Cgroup::create(&names.cgroup(&cg2))?;
        let programs = bpf::Programs::load(
            &names.pin_dir(),
            cgroup.dir(),
            config.ipv6,
            config.map_max_entries,
        )?;
        let map = map::open_pinned(programs.map_path())?;
        let planter = Mutex::new(plant::Planter::new(&netns::path_of(&names.node_netns())));
        Ok(Lab {
            names,
            peer_bin: config.peer_bin,
            pods: config.pods,
            net_a,
            net_b,
            ipv6: config.ipv6,
            peer_max_life: config.peer_max_life,
            planter,
            map,
            programs: Some(programs),
            cgroup: Some(cgroup),
            netns: spaces,
        })
    }

    pub fn id(&self) -> &str {
        &self.names.id
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn pods(&self) -> usize {
        self.pods
    }

    /// `/sys/fs/bpf/smgc-ID/cilium_sock_ops`.
    pub fn map_path(&self) -> PathBuf {
        self.names.map_path()
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.names.pin_dir()
    }

    /// The map's kernel id.
    pub fn map_id(&self) -> Option<u32> {
        self.programs.as_ref().and_then(|p| p.map_id())
    }

    /// The lab's own handle on the pinned map.
    pub fn map(&self) -> &MapHandle {
        &self.map
    }

    pub fn cgroup_path(&self) -> PathBuf {
        self.cgroup
            .as_ref()
            .map(|c| c.path().to_path_buf())
            .unwrap_or_default()
    }

    pub fn node_netns_name(&self) -> String {
        self.names.node_netns()
    }

    /// `/run/netns/smgc-ID-node`.
    pub fn node_netns_path(&self) -> PathBuf {
        netns::path_of(&self.names.node_netns())
    }

    pub fn pod_netns_name(&self, pod: usize) -> String {
        self.names.pod_netns(pod)
    }

    /// `/run/netns/smgc-ID-p<pod>`.
    pub fn pod_netns_path(&self, pod: usize) -> PathBuf {
        netns::path_of(&self.names.pod_netns(pod))
    }

    /// The pod's address (pod side of its veth).
    pub fn pod_ip(&self, pod: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net_a, self.net_b.wrapping_add(pod as u8), 2)
    }

    /// The node's address on the link to `pod`: the source of node clients talking to it.
    pub fn node_ip(&self, pod: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net_a, self.net_b.wrapping_add(pod as u8), 1)
    }

    /// The pod's IPv6 address (only with [`LabConfig::ipv6`]).
    pub fn pod_ip6(&self, pod: usize) -> Option<Ipv6Addr> {
        self.ip6(pod, 2)
    }

    /// The node's IPv6 address on the link to `pod` (only with [`LabConfig::ipv6`]).
    pub fn node_ip6(&self, pod: usize) -> Option<Ipv6Addr> {
        self.ip6(pod, 1)
    }

    fn ip6(&self, pod: usize, host: u16) -> Option<Ipv6Addr> {
        self.ipv6.then(|| {
            let b = u16::from(self.net_b) + pod as u16;
            Ipv6Addr::new(0xfd00, u16::from(self.net_a), b, 0, 0, 0, 0, host)
        })
    }

    fn netns_of(&self, place: Place) -> Result<PathBuf> {
        match place {
            Place::Node => Ok(self.node_netns_path()),
            Place::Pod(i) if i < self.pods => Ok(self.pod_netns_path(i)),
            Place::Pod(i) => bail!("lab {} has no pod {i}", self.id()),
        }
    }

    fn spawn(&self, place: Place, args: &[String]) -> Result<peer::PeerProc> {
        self.spawn_in(place, args, None)
    }

    /// Spawns a peer in `cgroup` (a directory under the lab's cgroup), or in the lab's own.
    fn spawn_in(
        &self,
        place: Place,
        args: &[String],
        cgroup: Option<&Path>,
    ) -> Result<peer::PeerProc> {
        let lab_cgroup = self.cgroup.as_ref().context("lab is being torn down")?;
        let cgroup = match cgroup {
            None => lab_cgroup.procs_for_join()?,
            Some(dir) if dir.starts_with(lab_cgroup.path()) => cgroup::procs_for_join(dir)?,
            Some(dir) => bail!(
                "cgroup {} is not under the lab's {}",
                dir.display(),
                lab_cgroup.path().display()
            ),
        };
        let mut args = args.to_vec();
        args.push("--max-life".into());
        args.push(peer::child::format_duration(self.peer_max_life));
        peer::PeerProc::spawn(&self.peer_bin, &self.netns_of(place)?, cgroup, &args)
    }

    /// Starts an echo server on `pod`:`port`; with `keep_reset_fds` it keeps sockets of
    /// connections reset by the client open (the busy app that leaves stale entries).
    pub fn start_server(&self, pod: usize, port: u16, keep_reset_fds: bool) -> Result<Server> {
        self.start_server_on(pod, Ipv4Addr::UNSPECIFIED.into(), port, keep_reset_fds)
    }

    /// Starts a server on `pod`:`port` as `opts` say: in a container's cgroup (see
    /// [`Lab::kube_cgroup`]), keeping reset fds, or never accepting.
    pub fn start_server_with(&self, pod: usize, port: u16, opts: &ServerOpts) -> Result<Server> {
        let mut args = vec![
            "peer".to_string(),
            "server".into(),
            "--port".into(),
            port.to_string(),
        ];
        if opts.keep_reset_fds {
            args.push("--keep-reset-fds".into());
        }
        if opts.never_accept {
            args.push("--never-accept".into());
        }
        let mut proc = self.spawn_in(Place::Pod(pod), &args, opts.cgroup.as_deref())?;
        wait_listening(&mut proc, pod, &args, "server")?;
        Ok(Server {
            proc,
            addr: SocketAddr::new(IpAddr::V4(self.pod_ip(pod)), port),
        })
    }

    /// Makes the cgroup the kubelet (systemd driver) and containerd give one container of a
    /// Burstable pod, inside the lab's cgroup:
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID with _>.slice/cri-containerd-<ID>.scope`.
    /// Removed with the lab's cgroup.
    pub fn kube_cgroup(&self, pod_uid: &str, container_id: &str) -> Result<PathBuf> {
        let lab_cgroup = self.cgroup.as_ref().context("lab is being torn down")?;
        let dir = lab_cgroup
            .path()
            .join("kubepods.slice")
            .join("kubepods-burstable.slice")
            .join(format!(
                "kubepods-burstable-pod{}.slice",
                pod_uid.replace('-', "_")
            ))
            .join(format!("cri-containerd-{container_id}.scope"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(dir)
    }

    /// Like [`Lab::start_server`], listening on `bind` (e.g. `::` for IPv6, which on Linux
    /// also takes IPv4 as mapped addresses: those sockets are AF_INET6 to sock_ops).
    pub fn start_server_on(
        &self,
        pod: usize,
        bind: IpAddr,
        port: u16,
        keep_reset_fds: bool,
    ) -> Result<Server> {
        let addr = match bind {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(self.pod_ip(pod)),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(
                self.pod_ip6(pod)
                    .context("IPv6 server in a lab built without ipv6")?,
            ),
            other => other,
        };
        let mut args = vec![
            "peer".to_string(),
            "server".into(),
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            bind.to_string(),
        ];
        if keep_reset_fds {
            args.push("--keep-reset-fds".into());
        }
        Ok(Server {
            proc: self.spawn_listening(pod, &args, "server")?,
            addr: SocketAddr::new(addr, port),
        })
    }

    /// Spawns a server peer (`args`) in `pod` and waits for the line saying it listens.
    fn spawn_listening(&self, pod: usize, args: &[String], what: &str) -> Result<peer::PeerProc> {
        let mut proc = self.spawn(Place::Pod(pod), args)?;
        wait_listening(&mut proc, pod, args, what)?;
        Ok(proc)
    }

    /// One request (ping/pong) with a bounded wait; see [`ClientOpts`].
    pub fn request(&self, opts: &ClientOpts) -> Result<Outcome> {
        let proc = self.spawn(opts.place, &opts.args(false))?;
        // The client bounds itself (handshake + reply); this is only a backstop.
        let (code, lines) = proc.finish(opts.timeout * 2 + Duration::from_secs(5))?;
        Outcome::parse(code, &lines)
    }

    /// Shorthand: a request from the node to `target` from `local_port`.
    pub fn request_from(
        &self,
        target: SocketAddr,
        local_port: u16,
        timeout: Duration,
    ) -> Result<Outcome> {
        self.request(
            &ClientOpts::to(target)
                .from_port(local_port)
                .timeout(timeout),
        )
    }

    /// Opens connections (each after one successful ping) and holds them until the returned
    /// guard is released or dropped.
    pub fn hold(&self, opts: &ClientOpts) -> Result<Held> {
        let proc = self.spawn(opts.place, &opts.args(true))?;
        let conns = opts.local_ports.len().max(opts.count) as u32;
        Held::from_ready(proc, opts.timeout * (conns + 1) + Duration::from_secs(5))
    }

    /// Plants a stale entry: files a socket the lab holds under `key`. Fails if the key is
    /// present. Works for IPv4 and IPv6 keys alike.
    pub fn plant(&self, key: SockKey) -> Result<()> {
        self.planter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .plant(&self.map, key)
    }

    /// Plants a stale entry as a real one is held: by a socket in the namespace of the key's
    /// local address, here pod `pod`'s (a socket is filed under its own tuple, in its own
    /// namespace). Its ends are a loopback pair's, not the key's.
    pub fn plant_in_pod(&self, key: SockKey, pod: usize) -> Result<()> {
        let netns = self.netns_of(Place::Pod(pod))?;
        self.planter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .plant_in(&self.map, key, &netns)
    }

    /// Opens a connection from the node netns to `target` that belongs to the test process,
    /// not to a peer: outside the lab cgroup, so sock_ops files only the server's end.
    pub fn connect_from_node(&self, target: SocketAddr) -> Result<TcpStream> {
        plant::connect_in(&self.node_netns_path(), target)
    }

    /// Files `sock` itself under `key` (say, an L7-proxy-style key whose B side is the
    /// socket's own local end); the lab keeps it open.
    pub fn plant_socket(&self, key: SockKey, sock: TcpStream) -> Result<()> {
        self.planter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .plant_socket(&self.map, key, sock)
    }

    /// Closes the held sockets of planted keys that are no longer in the map (deleted by a
    /// sweep, say), so planting again does not pile up fds; returns how many were closed.
    pub fn forget_deleted_plants(&self) -> usize {
        let present: std::collections::HashSet<RawKey> = self.raw_keys().into_iter().collect();
        self.planter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k| present.contains(&k.encode()))
    }

    /// Keys planted so far.
    pub fn planted(&self) -> Vec<SockKey> {
        self.planter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .planted()
    }

    pub fn raw_keys(&self) -> Vec<RawKey> {
        map::raw_keys(&self.map)
    }

    /// The map's current keys, decoded.
    pub fn keys(&self) -> Result<Vec<SockKey>> {
        map::keys(&self.map)
    }

    pub fn contains(&self, key: &SockKey) -> bool {
        self.raw_keys().contains(&key.encode())
    }

    /// Waits up to `timeout` for `key` to be present (`true`) or absent (`false`).
    pub fn wait_key(&self, key: &SockKey, present: bool, timeout: Duration) -> bool {
        sys::wait_until(timeout, || self.contains(key) == present)
    }

    /// Deletes an entry through the map handle (BPF_MAP_DELETE_ELEM).
    pub fn delete_key(&self, key: &SockKey) -> Result<()> {
        map::delete(&self.map, key)
    }

    /// Deletes an entry the manual way: `bpftool map delete pinned PATH key hex ...`.
    pub fn bpftool_delete(&self, key: &SockKey) -> Result<()> {
        map::bpftool_delete(&self.map_path(), key)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // 1. peers: every one of them is in the cgroup.
        if let Some(cg) = &self.cgroup {
            cg.kill_all();
        }
        // 2. planted sockets, 3. programs, pin and pin dir, 4. cgroup, 5. namespaces.
        self.planter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        drop(self.programs.take());
        drop(self.cgroup.take());
        while let Some(ns) = self.netns.pop() {
            drop(ns);
        }
    }
}

// Tests share one lab across threads (`std::thread::scope`); keep that possible.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Lab>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for ok in ["a", "hang-nat", "it-v6", "x1234567890123456789012y"] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a/b",
            "a b",
            "x1234567890123456789012yz",
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_lab_owns_exactly_the_names_its_id_produces() {
        let n = Names::new("a").unwrap();
        assert_eq!(n.node_netns(), "smgc-a-node");
        assert_eq!(n.pod_netns(3), "smgc-a-p3");
        assert!(n.owns_netns("smgc-a-node"));
        assert!(n.owns_netns("smgc-a-p0"));
        assert!(n.owns_netns("smgc-a-p31"));
        for other in [
            "smgc-a-p",
            "smgc-a-p0-node",
            "smgc-a-p0-p1",
            "smgc-ab-node",
            "smgc-a-px",
            "a-node",
        ] {
            assert!(!n.owns_netns(other), "{other}");
        }
        assert_eq!(n.pin_dir(), Path::new("/sys/fs/bpf/smgc-a"));
        assert_eq!(
            n.map_path(),
            Path::new("/sys/fs/bpf/smgc-a/cilium_sock_ops")
        );
        assert_eq!(
            n.cgroup(Path::new("/sys/fs/cgroup")),
            Path::new("/sys/fs/cgroup/smgc-a")
        );
    }

    #[test]
    fn address_ranges_are_stable_per_id() {
        assert_eq!(fnv1a("hang-nat"), fnv1a("hang-nat"));
        assert_ne!(fnv1a("it-held"), fnv1a("it-natural"));
    }

    #[test]
    fn client_outcomes_parse() {
        let lines = |s: &str| vec![s.to_string()];
        assert_eq!(
            Outcome::parse(
                0,
                &lines("ok local=10.1.2.1:40000 remote=10.1.2.2:8080 us=250")
            )
            .unwrap(),
            Outcome::Replied {
                local: "10.1.2.1:40000".parse().unwrap(),
                elapsed: Duration::from_micros(250)
            }
        );
        assert!(Outcome::parse(
            2,
            &lines("no-reply local=[fd00::1]:1 remote=[fd00::2]:2 us=1500000")
        )
        .unwrap()
        .is_hang());
        assert_eq!(
            Outcome::parse(3, &lines("refused remote=10.1.2.2:8080")).unwrap(),
            Outcome::Refused
        );
        assert_eq!(Outcome::parse(4, &[]).unwrap(), Outcome::ConnectTimedOut);
        assert!(Outcome::parse(1, &lines("error: bind: EADDRINUSE")).is_err());
        assert!(Outcome::parse(0, &lines("ok")).is_err());
    }
}
