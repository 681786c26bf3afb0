//! Peer processes: the library side. Servers and clients run as child processes of the lab
//! binary's hidden `peer` subcommand, moved into a lab netns and the lab cgroup between fork
//! and exec: sock_ops files a socket by the cgroup of the process that creates it, and the
//! test process itself (many tests in threads) must stay outside.

pub mod bulk;
pub mod child;

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sockmap_gc::key::SockKey;

/// Where a peer runs: the node netns (clients) or a pod netns (servers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Node,
    Pod(usize),
}

/// A running peer with its stdout read line by line on a helper thread (so it never blocks
/// on a full pipe) and its stdin held open: closing stdin tells it to finish.
pub(crate) struct PeerProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl PeerProc {
    /// Spawns `peer_bin ARGS` inside `netns` and `cgroup_procs` (already opened).
    pub(crate) fn spawn(
        peer_bin: &Path,
        netns: &Path,
        cgroup_procs: File,
        args: &[String],
    ) -> Result<PeerProc> {
        // Opened before fork: the child only does two syscalls between fork and exec.
        let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let ns_fd = ns.as_raw_fd();
        let procs_fd = cgroup_procs.as_raw_fd();
        let mut cmd = Command::new(peer_bin);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("SMGC_LAB_DEBUG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // async-signal-safe syscalls setns(2) and write(2) on fds opened above, which stay
        // open in the parent until spawn returns; no allocation, no locks.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process: this child, before its first socket.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting peer {} {}", peer_bin.display(), args.join(" ")))?;
        drop(ns);
        drop(cgroup_procs);
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("peer stdout not piped"))?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        // The receiver may be gone; keep draining until EOF anyway.
                        let _ = tx.send(l);
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(PeerProc {
            child,
            stdin,
            lines,
        })
    }

    /// Collects lines until one satisfies `last` (returned last) or `timeout` passes.
    pub(crate) fn lines_until(
        &mut self,
        timeout: Duration,
        last: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = last(&line);
                    got.push(line);
                    if done {
                        return Ok(got);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("peer said nothing conclusive within {timeout:?} (so far: {got:?})")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!("peer exited ({status:?}) before finishing; it said {got:?}")
                }
            }
        }
    }

    /// Waits for exit, killing the peer after `timeout`; returns (exit code, all lines).
    pub(crate) fn finish(mut self, timeout: Duration) -> Result<(i32, Vec<String>)> {
        drop(self.stdin.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("peer did not exit within {timeout:?}; killed");
            }
            thread::sleep(Duration::from_millis(5));
        };
        // The reader thread sees EOF once the child is gone; bounded in case a grandchild
        // inherited the pipe.
        let mut lines = Vec::new();
        let until = Instant::now() + Duration::from_secs(1);
        while let Ok(line) = self
            .lines
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            lines.push(line);
        }
        Ok((status.code().unwrap_or(-1), lines))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PeerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A server peer in a pod; killed on drop.
pub struct Server {
    pub(crate) proc: PeerProc,
    pub(crate) addr: SocketAddr,
}

impl Server {
    /// The pod address and port it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Stops the server (closing its stdin), bounded.
    pub fn stop(self) -> Result<()> {
        self.proc.finish(Duration::from_secs(3)).map(|_| ())
    }
}

/// Options of a client peer.
#[derive(Debug, Clone)]
pub struct ClientOpts {
    pub target: SocketAddr,
    /// Fixed local ports (one per held connection); empty = ephemeral.
    pub local_ports: Vec<u16>,
    /// Connections to hold when `local_ports` is empty.
    pub count: usize,
    /// Bound for the handshake and for the reply.
    pub timeout: Duration,
    /// Reset (SO_LINGER 0 + close) after the reply instead of a graceful `quit`.
    pub reset: bool,
    pub place: Place,
}

impl ClientOpts {
    pub fn to(target: SocketAddr) -> ClientOpts {
        ClientOpts {
            target,
            local_ports: Vec::new(),
            count: 1,
            timeout: Duration::from_secs(2),
            reset: false,
            place: Place::Node,
        }
    }

    pub fn from_port(mut self, port: u16) -> ClientOpts {
        self.local_ports.push(port);
        self
    }

    pub fn count(mut self, n: usize) -> ClientOpts {
        self.count = n;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> ClientOpts {
        self.timeout = timeout;
        self
    }

    pub fn reset(mut self, reset: bool) -> ClientOpts {
        self.reset = reset;
        self
    }

    pub fn place(mut self, place: Place) -> ClientOpts {
        self.place = place;
        self
    }

    pub(crate) fn args(&self, hold: bool) -> Vec<String> {
        let mut a = vec![
            "peer".to_string(),
            "client".into(),
            "--connect".into(),
            self.target.to_string(),
            "--timeout".into(),
            child::format_duration(self.timeout),
        ];
        for p in &self.local_ports {
            a.push("--local-port".into());
            a.push(p.to_string());
        }
        if hold {
            a.push("--hold".into());
            a.push("--count".into());
            a.push(self.count.to_string());
        }
        if self.reset {
            a.push("--reset".into());
        }
        a
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The reply came back.
    Replied {
        local: SocketAddr,
        elapsed: Duration,
    },
    /// Handshake done, no reply within the timeout: the incident's hang.
    NoReply {
        local: SocketAddr,
        waited: Duration,
    },
    Refused,
    ConnectTimedOut,
}

impl Outcome {
    pub fn is_replied(&self) -> bool {
        matches!(self, Outcome::Replied { .. })
    }

    pub fn is_hang(&self) -> bool {
        matches!(self, Outcome::NoReply { .. })
    }

    pub(crate) fn parse(code: i32, lines: &[String]) -> Result<Outcome> {
        let line = lines
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(String::as_str)
            .unwrap_or("");
        let field = |name: &str| -> Option<&str> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        };
        let local = || -> Result<SocketAddr> {
            field("local")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("peer line lacks local=: {line:?}"))
        };
        let us = || -> Duration {
            Duration::from_micros(field("us").and_then(|s| s.parse().ok()).unwrap_or(0))
        };
        match code {
            child::exit::OK => Ok(Outcome::Replied {
                local: local()?,
                elapsed: us(),
            }),
            child::exit::NO_REPLY => Ok(Outcome::NoReply {
                local: local()?,
                waited: us(),
            }),
            child::exit::REFUSED => Ok(Outcome::Refused),
            child::exit::CONNECT_TIMEOUT => Ok(Outcome::ConnectTimedOut),
            other => bail!("client peer failed (exit {other}): {line}"),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Replied { local, elapsed } => {
                write!(f, "reply received from {local} in {elapsed:?}")
            }
            Outcome::NoReply { local, waited } => write!(
                f,
                "no reply: connected from {local}, then timed out after {:.1}s",
                waited.as_secs_f64()
            ),
            Outcome::Refused => f.write_str("connection refused"),
            Outcome::ConnectTimedOut => f.write_str("handshake timed out"),
        }
    }
}

/// Client connections held open by one peer; released on drop (killed: the kernel closes).
pub struct Held {
    pub(crate) proc: Option<PeerProc>,
    pub(crate) conns: Vec<(SocketAddr, SocketAddr)>,
}

impl Held {
    /// (local, remote) of each held client socket.
    pub fn connections(&self) -> &[(SocketAddr, SocketAddr)] {
        &self.conns
    }

    /// The key each held client socket is filed under (its twin is `.peer()`).
    pub fn client_keys(&self) -> Vec<SockKey> {
        self.conns
            .iter()
            .filter_map(|(l, r)| SockKey::for_socket(*l, *r))
            .collect()
    }

    /// Closes the connections the way the client was told (graceful `quit` or reset) and
    /// waits for the peer to exit.
    pub fn release(mut self) -> Result<()> {
        match self.proc.take() {
            Some(p) => {
                let (code, lines) = p.finish(Duration::from_secs(5))?;
                if code != 0 {
                    bail!("holding client exited {code}: {lines:?}");
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    pub(crate) fn from_ready(mut proc: PeerProc, timeout: Duration) -> Result<Held> {
        let lines = proc.lines_until(timeout, |l| {
            l == "ready" || l.starts_with("error") || !l.starts_with("held")
        })?;
        if lines.last().map(String::as_str) != Some("ready") {
            let (code, rest) = proc.finish(Duration::from_secs(2))?;
            let all: Vec<String> = lines.into_iter().chain(rest).collect();
            bail!("client could not open its connections (exit {code}): {all:?}");
        }
        let mut conns = Vec::new();
        for l in &lines {
            if let Some(rest) = l.strip_prefix("held ") {
                let get = |name: &str| -> Result<SocketAddr> {
                    rest.split_whitespace()
                        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| anyhow!("bad held line {l:?}"))
                };
                conns.push((get("local")?, get("remote")?));
            }
        }
        Ok(Held {
            proc: Some(proc),
            conns,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            // Graceful first, so the server closes; kill if it takes long.
            let _ = p.finish(Duration::from_secs(3));
        }
    }
}
