//! `sockmap-gc-lab`: demonstrates the stuck-connection incident on the real kernel
//! (`incident`), and runs the lab's server and client processes (hidden `peer`).

#![deny(clippy::undocumented_unsafe_blocks)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sockmap_gc::key::SockKey;
use sockmap_gc_lab::peer::bulk;
use sockmap_gc_lab::peer::child::churn::{self, ChurnArgs};
use sockmap_gc_lab::peer::child::{self, ClientArgs, ServerArgs};
use sockmap_gc_lab::{interrupt, map, sys, ClientOpts, Lab, LabConfig, Outcome};

#[derive(Parser)]
#[command(
    name = "sockmap-gc-lab",
    version,
    about = "Real-kernel lab for sockmap-gc"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Reproduce the incident step by step: stale sockhash entries make requests hang.
    Incident(IncidentArgs),
    /// Run a lab peer process (used by the lab library).
    #[command(hide = true, subcommand)]
    Peer(PeerCmd),
}

#[derive(Subcommand)]
enum PeerCmd {
    Server(ServerArgs),
    Client(ClientArgs),
    Churn(ChurnArgs),
    BulkServer(bulk::BulkServerArgs),
    BulkClient(bulk::BulkClientArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Cure {
    /// `bpftool map delete pinned PATH key hex ...` for each stale key (the manual remedy).
    Bpftool,
    /// Leave the stale keys (e.g. to run `sockmap-gc audit --map PATH` with --keep).
    None,
}

#[derive(clap::Args)]
struct IncidentArgs {
    /// Lab id: names its netns (smgc-ID-*), cgroup and pin dir (/sys/fs/bpf/smgc-ID).
    #[arg(long, default_value = "incident")]
    id: String,
    /// How the stale entries are removed at the end.
    #[arg(long, value_enum, default_value = "bpftool")]
    cure: Cure,
    /// Instead of --cure, run this command (through `sh -c`) to remove the stale entries;
    /// `{map}` is replaced by the pinned map path.
    #[arg(long, value_name = "CMD")]
    cure_exec: Option<String>,
    /// Leave the lab up at the end and wait for Ctrl-C (prints the map path).
    #[arg(long)]
    keep: bool,
    /// How long a request waits for its reply before it counts as hung.
    #[arg(long, default_value = "1.5s", value_parser = child::parse_duration)]
    timeout: Duration,
    /// The peer binary (default: this executable).
    #[arg(long, hide = true)]
    peer_bin: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Peer(PeerCmd::Server(a)) => exit_code(child::run_server(&a)),
        Cmd::Peer(PeerCmd::Client(a)) => exit_code(child::run_client(&a)),
        Cmd::Peer(PeerCmd::Churn(a)) => exit_code(churn::run_churn(&a)),
        Cmd::Peer(PeerCmd::BulkServer(a)) => exit_code(bulk::run_bulk_server(&a)),
        Cmd::Peer(PeerCmd::BulkClient(a)) => exit_code(bulk::run_bulk_client(&a)),
        Cmd::Incident(a) => {
            if let Err(e) = interrupt::install(a.id.clone(), Duration::from_secs(10)) {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
            match incident(&a) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if interrupt::is_interrupted() => {
                    eprintln!("stopped: {e:#}");
                    ExitCode::from(130)
                }
                Err(e) => {
                    eprintln!("\nFAILED: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn step(n: &str, title: &str) {
    println!("\n== {n}. {title} ==");
}

fn describe(lab: &Lab, key: &SockKey) -> String {
    let server_port = 8080;
    let role = if key.local.port() == server_port {
        "server end"
    } else if key.remote.port() == server_port {
        "client end"
    } else {
        "other"
    };
    let planted = if lab.planted().contains(key) {
        ", planted"
    } else {
        ""
    };
    format!("{key}  ({role}{planted})")
}

fn show_keys(lab: &Lab) -> Result<()> {
    let keys = lab.keys()?;
    println!(
        "   map {} holds {} key(s):",
        lab.map_path().display(),
        keys.len()
    );
    for k in keys {
        println!("     {}", describe(lab, &k));
    }
    Ok(())
}

fn expect(ok: bool, what: &str) -> Result<()> {
    if ok {
        println!("   ok: {what}");
        Ok(())
    } else {
        bail!("expectation failed: {what}")
    }
}

fn request(lab: &Lab, target: SocketAddr, port: u16, timeout: Duration) -> Result<Outcome> {
    interrupt::check()?;
    let started = Instant::now();
    let outcome = lab.request_from(target, port, timeout)?;
    println!(
        "   request from {}:{port} -> {target}: {outcome}  [{:.1}s]",
        lab.node_ip(0),
        started.elapsed().as_secs_f64()
    );
    Ok(outcome)
}

fn incident(a: &IncidentArgs) -> Result<()> {
    let peer_bin = match &a.peer_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this executable")?,
    };
    let t = a.timeout;

    step("1", "build the lab");
    let mut config = LabConfig::new(&a.id, 1, peer_bin);
    if a.keep {
        // Kept labs wait for Ctrl-C; the busy server must outlive an operator's session.
        config.peer_max_life = Duration::from_secs(7 * 24 * 3600);
    }
    let lab = Lab::with_config(config)?;
    let pod = lab.pod_ip(0);
    let node = lab.node_ip(0);
    println!(
        "   node netns {} ({node}), pod netns {} ({pod})",
        lab.node_netns_path().display(),
        lab.pod_netns_path(0).display()
    );
    println!(
        "   cgroup {} with Cilium-like sock_ops; sk_msg on the sockhash",
        lab.cgroup_path().display()
    );
    println!("   map pinned at {}", lab.map_path().display());
    let server = lab.start_server(0, 8080, true)?;
    let target = server.addr();
    println!("   server on {target} keeps the fds of connections its clients reset (a busy app)");

    step(
        "2",
        "requests work; an open connection is in the map under both ends' keys",
    );
    expect(
        request(&lab, target, 40001, t)?.is_replied(),
        "request from port 40001 gets its reply",
    )?;
    interrupt::check()?;
    let held = lab.hold(&ClientOpts::to(target).from_port(40002).timeout(t))?;
    let client_key = *held
        .client_keys()
        .first()
        .context("the holding client reported no connection")?;
    lab.wait_key(&client_key.peer(), true, Duration::from_secs(2));
    show_keys(&lab)?;
    expect(
        lab.contains(&client_key) && lab.contains(&client_key.peer()),
        "both keys of the open connection are present",
    )?;
    held.release()?;
    let gone = lab.wait_key(&client_key, false, Duration::from_secs(2))
        && lab.wait_key(&client_key.peer(), false, Duration::from_secs(2));
    expect(gone, "after a graceful close both keys are gone")?;

    step(
        "3a",
        "natural stale entry: a client resets, the server keeps the socket's fd",
    );
    let natural_port = 40100;
    interrupt::check()?;
    let reset = lab.request(
        &ClientOpts::to(target)
            .from_port(natural_port)
            .timeout(t)
            .reset(true),
    )?;
    println!("   request from {node}:{natural_port} then reset (SO_LINGER 0): {reset}");
    let natural =
        SockKey::for_socket(target, SocketAddr::new(node.into(), natural_port)).context("key")?;
    let mut stale = Vec::new();
    if !lab.wait_key(&natural, true, Duration::from_secs(1)) && !sys::keeps_reset_sockets()? {
        println!("   this kernel (before 5.16) removes a reset socket's entry on unhash: the natural stale entry does not occur here");
        expect(
            request(&lab, target, natural_port, t)?.is_replied(),
            &format!("the next request from port {natural_port} works"),
        )?;
    } else {
        expect(
            lab.contains(&natural),
            &format!("the server end's key stays after the reset: {natural}"),
        )?;
        show_keys(&lab)?;
        let o = request(&lab, target, natural_port, t)?;
        expect(
            o.is_hang(),
            &format!("the next request from port {natural_port} hangs after the handshake"),
        )?;
        expect(
            request(&lab, target, 40101, t)?.is_replied(),
            "a request from another port (40101) works",
        )?;
        stale.push(natural);
    }

    step(
        "3b",
        "planted stale entry: a socket filed under the server end of a future connection",
    );
    let planted_port = 40200;
    let planted =
        SockKey::for_socket(target, SocketAddr::new(node.into(), planted_port)).context("key")?;
    lab.plant(planted)?;
    println!(
        "   planted A={} B={} (a held loopback socket)",
        planted.a(),
        planted.b()
    );
    show_keys(&lab)?;
    let o = request(&lab, target, planted_port, t)?;
    expect(
        o.is_hang(),
        &format!("a request from port {planted_port} hangs after the handshake"),
    )?;
    expect(
        request(&lab, target, 40201, t)?.is_replied(),
        "a request from another port (40201) works",
    )?;

    stale.push(planted);
    match (&a.cure_exec, a.cure) {
        (Some(cmd), _) => {
            step("4", "cure: external command");
            let cmd = cmd.replace("{map}", &lab.map_path().display().to_string());
            println!("   $ {cmd}");
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .status()
                .context("running --cure-exec")?;
            expect(status.success(), &format!("`{cmd}` succeeded"))?;
        }
        (None, Cure::Bpftool) => {
            step(
                "4",
                "cure: delete the stale keys with bpftool (the manual remedy)",
            );
            for k in &stale {
                println!("   $ {}", map::bpftool_delete_command(&lab.map_path(), k));
                lab.bpftool_delete(k)?;
            }
        }
        (None, Cure::None) => {
            step("4", "cure: none (--cure none)");
        }
    }
    if a.cure_exec.is_some() || a.cure == Cure::Bpftool {
        show_keys(&lab)?;
        for k in &stale {
            expect(!lab.contains(k), &format!("stale key gone: {k}"))?;
        }
        for port in [natural_port, planted_port] {
            expect(
                request(&lab, target, port, t)?.is_replied(),
                &format!("the request from port {port} works again"),
            )?;
        }
    }

    if a.keep {
        step("5", "lab kept up");
        println!("   map: {}", lab.map_path().display());
        println!(
            "   e.g.: sockmap-gc audit --map {}",
            lab.map_path().display()
        );
        println!("   Ctrl-C tears the lab down.");
        while !interrupt::is_interrupted() {
            thread::sleep(Duration::from_millis(100));
        }
        drop(server);
        drop(lab);
        println!("lab {} torn down", a.id);
        return Ok(());
    }
    drop(server);
    drop(lab);
    println!("\nincident reproduced and cured; lab {} torn down", a.id);
    Ok(())
}
