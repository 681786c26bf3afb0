//! What runs inside a peer process (`sockmap-gc-lab peer ...`), already in the lab's netns
//! and cgroup: a line-based echo server and a client that requests, resets or holds.
//!
//! Protocol: the client sends `ping TAG`, the server answers `pong TAG`. A client that is
//! done sends `quit`; the server then closes first, so the client never sits in TIME_WAIT and
//! its fixed local port is free again at once. A connection that ends without `quit` (a reset)
//! is one whose peer vanished: a server with `--keep-reset-fds` keeps that socket's fd open,
//! the busy or leaky app that leaves a stale sockhash entry behind.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
use nix::sys::time::TimeVal;

/// Exit codes of `peer client`, read back by the library.
pub mod exit {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    pub const NO_REPLY: i32 = 2;
    pub const REFUSED: i32 = 3;
    pub const CONNECT_TIMEOUT: i32 = 4;
    pub const LIFETIME: i32 = 124;
}

pub mod churn;

/// Parses `1.5s`, `1500ms` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, scale) = if let Some(ms) = t.strip_suffix("ms") {
        (ms, 0.001)
    } else if let Some(s) = t.strip_suffix('s') {
        (s, 1.0)
    } else {
        (t, 1.0)
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 1.5s or 1500ms"))?;
    let secs = value * scale;
    if !(0.0..=31.0 * 86_400.0).contains(&secs) {
        return Err(format!("duration '{text}' out of range (at most 31 days)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Formats a duration the way `parse_duration` reads it back.
pub fn format_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Port to listen on.
    #[arg(long)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Keep the fds of connections that end without `quit` (reset by the client) open.
    #[arg(long)]
    pub keep_reset_fds: bool,
    /// Listen but never accept: connections wait in the accept queue (a stuck server).
    #[arg(long, conflicts_with = "keep_reset_fds")]
    pub never_accept: bool,
    /// Exit after this long whatever happens.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    pub max_life: Duration,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Server address.
    #[arg(long)]
    pub connect: SocketAddr,
    /// Local port to connect from (repeat with --hold for several connections).
    #[arg(long)]
    pub local_port: Vec<u16>,
    /// With --hold and no --local-port: how many connections from ephemeral ports.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Bound for the handshake and for the reply.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// After the reply, reset the connection (SO_LINGER 0, close) instead of saying `quit`.
    #[arg(long)]
    pub reset: bool,
    /// Keep the connections open until stdin closes (or --max-life passes).
    #[arg(long)]
    pub hold: bool,
    /// Exit after this long whatever happens.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    pub max_life: Duration,
}

pub(crate) fn say(line: &str) {
    let mut out = io::stdout().lock();
    // The parent may have stopped reading; a peer never dies of that.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub(crate) fn watchdog(max_life: Duration) {
    thread::spawn(move || {
        thread::sleep(max_life);
        std::process::exit(exit::LIFETIME);
    });
}

/// Blocks until stdin reaches EOF (the parent closed it or died).
pub(crate) fn wait_stdin_eof() {
    let mut buf = [0u8; 256];
    let mut stdin = io::stdin().lock();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

static KEPT: Mutex<Vec<TcpStream>> = Mutex::new(Vec::new());

pub fn run_server(args: &ServerArgs) -> i32 {
    watchdog(args.max_life);
    let listener = match TcpListener::bind(SocketAddr::new(args.bind, args.port)) {
        Ok(l) => l,
        Err(e) => {
            say(&format!(
                "error: listen on {}:{}: {e}",
                args.bind, args.port
            ));
            return exit::ERROR;
        }
    };
    let addr = listener
        .local_addr()
        .unwrap_or(SocketAddr::new(args.bind, args.port));
    say(&format!("listening {addr}"));
    thread::spawn(|| {
        wait_stdin_eof();
        std::process::exit(exit::OK);
    });
    if args.never_accept {
        // The kernel completes handshakes into the backlog; nothing takes them out.
        loop {
            thread::park();
        }
    }
    let keep = args.keep_reset_fds;
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || serve(stream, keep));
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
    exit::OK
}

fn serve(stream: TcpStream, keep: bool) {
    let said_quit = converse(&stream);
    if !said_quit && keep {
        // The busy app: the peer is gone but this socket's fd stays open.
        KEPT.lock().unwrap_or_else(|e| e.into_inner()).push(stream);
    }
}

/// Answers pings until `quit` (true) or until the connection ends otherwise (false).
fn converse(stream: &TcpStream) -> bool {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        let request = line.trim_end();
        if request == "quit" {
            return true;
        }
        let reply = match request.strip_prefix("ping") {
            Some(tag) => format!("pong{tag}\n"),
            None => "error unknown request\n".to_string(),
        };
        let mut writer = stream;
        if writer.write_all(reply.as_bytes()).is_err() {
            return false;
        }
    }
}

enum Failure {
    Refused,
    ConnectTimeout,
    NoReply { local: SocketAddr, waited: Duration },
    Other(String),
}

fn connect(
    local_port: Option<u16>,
    remote: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, Failure> {
    let classify = |e: Errno, what: &str| match e {
        Errno::ECONNREFUSED => Failure::Refused,
        Errno::EINPROGRESS | Errno::ETIMEDOUT | Errno::EAGAIN => Failure::ConnectTimeout,
        other => Failure::Other(format!("{what}: {other}")),
    };
    let family = if remote.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| classify(e, "socket"))?;
    // A fixed local port must be reusable at once by the next request of a test.
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| classify(e, "SO_REUSEADDR"))?;
    if let Some(port) = local_port {
        let any: IpAddr = if remote.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        socket::bind(
            fd.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::new(any, port)),
        )
        .map_err(|e| classify(e, "bind"))?;
    }
    // A blocking connect honours SO_SNDTIMEO (EINPROGRESS when it passes).
    let tv = TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
    socket::setsockopt(&fd, sockopt::SendTimeout, &tv).map_err(|e| classify(e, "SO_SNDTIMEO"))?;
    socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(remote))
        .map_err(|e| classify(e, "connect"))?;
    Ok(TcpStream::from(fd))
}

/// Sends one ping and waits for its pong.
fn ping(stream: &TcpStream, timeout: Duration) -> Result<Duration, Failure> {
    let local = stream
        .local_addr()
        .map_err(|e| Failure::Other(format!("getsockname: {e}")))?;
    let tag = local.port();
    let start = Instant::now();
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| Failure::Other(format!("SO_RCVTIMEO: {e}")))?;
    let mut writer = stream;
    writer
        .write_all(format!("ping {tag}\n").as_bytes())
        .map_err(|e| Failure::Other(format!("send: {e}")))?;
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(_) if line.trim_end() == format!("pong {tag}") => Ok(start.elapsed()),
        Ok(0) => Err(Failure::Other("server closed without a reply".into())),
        Ok(_) => Err(Failure::Other(format!(
            "unexpected reply {:?}",
            line.trim_end()
        ))),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(Failure::NoReply {
                local,
                waited: start.elapsed(),
            })
        }
        Err(e) => Err(Failure::Other(format!("receive: {e}"))),
    }
}

/// Closes with an RST: no FIN exchange, no TIME_WAIT.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = socket::setsockopt(&stream, sockopt::Linger, &linger);
    drop(stream);
}

/// Says `quit` and waits (bounded) for the server to close first.
fn goodbye(stream: TcpStream) {
    let mut writer = &stream;
    if writer.write_all(b"quit\n").is_ok() {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut sink = Vec::new();
        let _ = (&stream).read_to_end(&mut sink);
    }
    drop(stream);
}

fn report(failure: Failure, remote: SocketAddr) -> i32 {
    match failure {
        Failure::Refused => {
            say(&format!("refused remote={remote}"));
            exit::REFUSED
        }
        Failure::ConnectTimeout => {
            say(&format!("connect-timeout remote={remote}"));
            exit::CONNECT_TIMEOUT
        }
        Failure::NoReply { local, waited } => {
            say(&format!(
                "no-reply local={local} remote={remote} us={}",
                waited.as_micros()
            ));
            exit::NO_REPLY
        }
        Failure::Other(msg) => {
            say(&format!("error: {msg}"));
            exit::ERROR
        }
    }
}

/// One connection: connect, ping, and on a missing reply reset so the port stays reusable.
fn open_and_ping(
    local_port: Option<u16>,
    remote: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, Duration), Failure> {
    let stream = connect(local_port, remote, timeout)?;
    match ping(&stream, timeout) {
        Ok(elapsed) => Ok((stream, elapsed)),
        Err(f) => {
            reset(stream);
            Err(f)
        }
    }
}

pub fn run_client(args: &ClientArgs) -> i32 {
    watchdog(args.max_life);
    if args.hold {
        return hold(args);
    }
    let remote = args.connect;
    match open_and_ping(args.local_port.first().copied(), remote, args.timeout) {
        Ok((stream, elapsed)) => {
            let local = stream
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            if args.reset {
                reset(stream);
            } else {
                goodbye(stream);
            }
            say(&format!(
                "ok local={local} remote={remote} us={}",
                elapsed.as_micros()
            ));
            exit::OK
        }
        Err(f) => report(f, remote),
    }
}

fn hold(args: &ClientArgs) -> i32 {
    let remote = args.connect;
    let ports: Vec<Option<u16>> = if args.local_port.is_empty() {
        vec![None; args.count]
    } else {
        args.local_port.iter().copied().map(Some).collect()
    };
    let mut held = Vec::new();
    for port in ports {
        match open_and_ping(port, remote, args.timeout) {
            Ok((stream, _)) => {
                let local = stream
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                say(&format!("held local={local} remote={remote}"));
                held.push(stream);
            }
            Err(f) => {
                held.into_iter().for_each(reset);
                return report(f, remote);
            }
        }
    }
    say("ready");
    wait_stdin_eof();
    for stream in held {
        if args.reset {
            reset(stream);
        } else {
            goodbye(stream);
        }
    }
    exit::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip() {
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        let week = Duration::from_secs(7 * 24 * 3600);
        assert_eq!(parse_duration(&format_duration(week)), Ok(week));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("40d").is_err());
    }
}
