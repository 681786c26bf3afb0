//! Bulk peers for building a full map: a server that accepts and holds thousands of
//! connections without a thread each, and a client that opens thousands of connections to
//! several targets and holds them. No payload is exchanged: sock_ops files both ends at the
//! handshake. Used by the benchmark (`sockmap-gc-bench`); one process holds at most what
//! RLIMIT_NOFILE allows, so a large population is spread over several processes.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Result};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
};

use super::child::{self, exit, say};
use super::{PeerProc, Place, Server};
use crate::Lab;

/// Listen backlog of a bulk server: clients connect faster than one thread accepts.
const BACKLOG: i32 = 4096;

#[derive(Debug, Clone, clap::Args)]
pub struct BulkServerArgs {
    #[arg(long)]
    pub port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,
    #[arg(long, default_value = "600s", value_parser = child::parse_duration)]
    pub max_life: Duration,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BulkClientArgs {
    /// A target; repeatable. Each gets `--count` connections.
    #[arg(long, required = true)]
    pub connect: Vec<SocketAddr>,
    /// Connections per target.
    #[arg(long)]
    pub count: usize,
    /// Bound for each handshake.
    #[arg(long, default_value = "5s", value_parser = child::parse_duration)]
    pub timeout: Duration,
    #[arg(long, default_value = "600s", value_parser = child::parse_duration)]
    pub max_life: Duration,
}

fn listen(bind: SocketAddr) -> nix::Result<OwnedFd> {
    let family = if bind.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(bind))?;
    socket::listen(&fd, Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN))?;
    Ok(fd)
}

/// Accepts connections and holds every one until stdin closes. One thread.
pub fn run_bulk_server(args: &BulkServerArgs) -> i32 {
    child::watchdog(args.max_life);
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = match listen(addr) {
        Ok(fd) => fd,
        Err(e) => {
            say(&format!("error: listen on {addr}: {e}"));
            return exit::ERROR;
        }
    };
    say(&format!("listening {addr}"));
    // Exits when stdin closes (the lab dropped its end, or died).
    thread::spawn(|| {
        child::wait_stdin_eof();
        std::process::exit(exit::OK);
    });
    let mut held: Vec<OwnedFd> = Vec::new();
    loop {
        match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new fd that nothing else owns.
            Ok(fd) => held.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }),
            Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ECONNABORTED) => {}
            Err(e) => {
                // EMFILE and the like: say it once and stop accepting; what is held stays.
                say(&format!("error: accept after {}: {e}", held.len()));
                loop {
                    thread::sleep(Duration::from_secs(3600));
                }
            }
        }
    }
}

/// Opens `--count` connections to each target, says `ready N`, and holds them until stdin
/// closes.
pub fn run_bulk_client(args: &BulkClientArgs) -> i32 {
    child::watchdog(args.max_life);
    let mut held: Vec<TcpStream> = Vec::with_capacity(args.connect.len() * args.count);
    for target in &args.connect {
        for _ in 0..args.count {
            match TcpStream::connect_timeout(target, args.timeout) {
                Ok(s) => held.push(s),
                Err(e) => {
                    say(&format!(
                        "error: connection {} to {target}: {e}",
                        held.len() + 1
                    ));
                    return exit::ERROR;
                }
            }
        }
    }
    say(&format!("ready {}", held.len()));
    child::wait_stdin_eof();
    exit::OK
}

/// A bulk client on its way to holding its connections; killed on drop (the kernel closes
/// them).
pub struct BulkClient {
    proc: PeerProc,
    expected: usize,
}

impl BulkClient {
    /// Waits until every connection is open; returns how many.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<usize> {
        let lines = self.proc.lines_until(timeout, |l| {
            l.starts_with("ready") || l.starts_with("error")
        })?;
        let last = lines.last().cloned().unwrap_or_default();
        let Some(n) = last.strip_prefix("ready ") else {
            bail!("bulk client failed: {last}");
        };
        let n: usize = n.trim().parse().unwrap_or(0);
        if n != self.expected {
            bail!("bulk client opened {n} connections, not {}", self.expected);
        }
        Ok(n)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl Lab {
    /// Starts a bulk server on `pod`:`port` that holds every connection it accepts.
    pub fn start_bulk_server(&self, pod: usize, port: u16) -> Result<Server> {
        let args = vec![
            "peer".to_string(),
            "bulk-server".into(),
            "--port".into(),
            port.to_string(),
        ];
        Ok(Server {
            proc: self.spawn_listening(pod, &args, "bulk server")?,
            addr: SocketAddr::new(IpAddr::V4(self.pod_ip(pod)), port),
        })
    }

    /// Starts a bulk client in the node namespace that opens `per_target` connections to
    /// each of `targets`; returns at once ([`BulkClient::wait_ready`] waits), so several
    /// clients connect in parallel.
    pub fn spawn_bulk_client(
        &self,
        targets: &[SocketAddr],
        per_target: usize,
    ) -> Result<BulkClient> {
        let mut args = vec![
            "peer".to_string(),
            "bulk-client".into(),
            "--count".into(),
            per_target.to_string(),
        ];
        for t in targets {
            args.push("--connect".into());
            args.push(t.to_string());
        }
        let proc = self.spawn(Place::Node, &args)?;
        Ok(BulkClient {
            proc,
            expected: targets.len() * per_target,
        })
    }
}
