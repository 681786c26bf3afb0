//! Planting stale entries from userspace: `BPF_MAP_UPDATE_ELEM` with an fd of a live TCP
//! socket the lab holds, under a key no live socket of that tuple owns.
//!
//! The held sockets are loopback pairs made inside a lab namespace (the node's, unless told
//! otherwise) by a helper thread: the test process is not in the lab cgroup, so sock_ops never
//! files them itself. A socket can
//! join a map with an sk_msg program only once (EBUSY), so each key takes its own socket; both
//! ends of a pair serve.

use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread;

use anyhow::{anyhow, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use nix::sched::CloneFlags;
use sockmap_gc::key::SockKey;

pub(crate) struct Planter {
    node_netns: PathBuf,
    /// The other end of the last pair made, per namespace.
    spare: HashMap<PathBuf, Vec<TcpStream>>,
    planted: Vec<(SockKey, TcpStream)>,
}

impl Planter {
    pub(crate) fn new(node_netns: &Path) -> Planter {
        Planter {
            node_netns: node_netns.to_path_buf(),
            spare: HashMap::new(),
            planted: Vec::new(),
        }
    }

    fn socket(&mut self, netns: &Path) -> Result<TcpStream> {
        let spare = self.spare.entry(netns.to_path_buf()).or_default();
        if spare.is_empty() {
            let (a, b) = loopback_pair(netns)?;
            spare.push(a);
            spare.push(b);
        }
        spare
            .pop()
            .ok_or_else(|| anyhow!("no spare socket after making a pair"))
    }

    /// Files a socket held in the node's namespace under `key`; fails if the key is taken
    /// (BPF_NOEXIST: a plant never evicts a live entry).
    pub(crate) fn plant(&mut self, map: &MapHandle, key: SockKey) -> Result<()> {
        let node = self.node_netns.clone();
        self.plant_in(map, key, &node)
    }

    /// As [`Planter::plant`], with the held socket made in `netns`.
    pub(crate) fn plant_in(&mut self, map: &MapHandle, key: SockKey, netns: &Path) -> Result<()> {
        let sock = self.socket(netns)?;
        let fd = u32::try_from(sock.as_raw_fd()).context("negative fd")?;
        match map.update(&key.encode().0, &fd.to_ne_bytes(), MapFlags::NO_EXIST) {
            Ok(()) => {
                self.planted.push((key, sock));
                Ok(())
            }
            Err(e) => {
                self.spare
                    .entry(netns.to_path_buf())
                    .or_default()
                    .push(sock);
                Err(anyhow!("planting {key}: {e}"))
            }
        }
    }

    /// Files `sock` itself under `key` and keeps it open as long as the lab.
    pub(crate) fn plant_socket(
        &mut self,
        map: &MapHandle,
        key: SockKey,
        sock: TcpStream,
    ) -> Result<()> {
        let fd = u32::try_from(sock.as_raw_fd()).context("negative fd")?;
        map.update(&key.encode().0, &fd.to_ne_bytes(), MapFlags::NO_EXIST)
            .map_err(|e| anyhow!("planting {key}: {e}"))?;
        self.planted.push((key, sock));
        Ok(())
    }

    pub(crate) fn planted(&self) -> Vec<SockKey> {
        self.planted.iter().map(|(k, _)| *k).collect()
    }

    /// Keeps the planted sockets whose key satisfies `keep`, closes the others; returns how
    /// many were closed.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&SockKey) -> bool) -> usize {
        let before = self.planted.len();
        self.planted.retain(|(k, sock)| {
            let kept = keep(k);
            if !kept {
                close_without_time_wait(sock);
            }
            kept
        });
        let closed = before - self.planted.len();
        if closed > 0 {
            // A spare may be the other end of a pair just closed: no longer ESTABLISHED, a
            // map refuses it (EOPNOTSUPP).
            self.spare
                .values()
                .flatten()
                .for_each(close_without_time_wait);
            self.spare.clear();
        }
        closed
    }

    /// Closes every held socket; the kernel drops their entries with the last fd.
    pub(crate) fn clear(&mut self) {
        self.planted.clear();
        self.spare.clear();
    }
}

/// Makes the socket's close a reset, which leaves no TIME_WAIT behind: planting again and again
/// (the bench re-plants 7,325 keys per run) would otherwise fill the node namespace's ports
/// with TIME_WAIT sockets within a minute.
fn close_without_time_wait(sock: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // Best effort: without it the close is an ordinary one.
    let _ = nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::Linger, &linger);
}

/// A connection from inside `netns` to `target`, made on a short-lived thread that joins the
/// namespace. The test process is not in the lab cgroup, so sock_ops does not file it.
pub(crate) fn connect_in(netns: &Path, target: SocketAddr) -> Result<TcpStream> {
    let netns = netns.to_path_buf();
    thread::spawn(move || -> Result<TcpStream> {
        let ns = File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into {}", netns.display()))?;
        TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2))
            .with_context(|| format!("connecting to {target}"))
    })
    .join()
    .map_err(|_| anyhow!("connect thread panicked"))?
}

/// An established 127.0.0.1 pair inside `netns`, made on a short-lived thread that joins the
/// namespace (setns affects only the calling thread).
fn loopback_pair(netns: &Path) -> Result<(TcpStream, TcpStream)> {
    let netns = netns.to_path_buf();
    thread::spawn(move || -> Result<(TcpStream, TcpStream)> {
        let ns = File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into {}", netns.display()))?;
        let listener = TcpListener::bind("127.0.0.1:0").context("loopback listener")?;
        let client = TcpStream::connect(listener.local_addr()?).context("loopback connect")?;
        let (server, _) = listener.accept().context("loopback accept")?;
        Ok((client, server))
    })
    .join()
    .map_err(|_| anyhow!("loopback pair thread panicked"))?
}
