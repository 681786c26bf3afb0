//! The command line: flags turned into validated settings once, and each subcommand's run.

use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::audit::{self, Filter};
use crate::key::{self, SockKey};
use crate::map::{Access, SockMap};
use crate::report::{self, MapSource};

const EXIT_CODES: &str = "\
Exit codes:
  0  success; for audit: no stale entry
  1  audit: stale entries found
  2  error (bad input, map not found or not Cilium's, not root)";

#[derive(Debug, Parser)]
#[command(
    name = "sockmap-gc",
    version,
    about = "Finds and removes stale entries of Cilium's socket-acceleration sockhash (cilium_sock_ops)",
    long_about = "Finds and removes stale entries of Cilium's socket-acceleration sockhash \
(cilium_sock_ops). A stale entry outlives its connection; the next connection with the same \
addresses and ports then hangs right after the handshake. sockmap-gc decodes each key and \
cross-checks it against the live TCP sockets of every network namespace on the node.",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Decode cilium_sock_ops keys as bpftool prints them (44 hex bytes, or 88 hex characters)
    #[command(after_help = EXIT_CODES)]
    Decode(DecodeArgs),
    /// Judge every entry of the map live, stale or unknown; changes nothing, ever
    #[command(after_help = EXIT_CODES)]
    Audit(AuditArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people: aligned text that pastes into a ticket
    Text,
    /// For scripts: one JSON object
    Json,
}

#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// Key bytes in hex: `0a 0a 86 30 ...` (any spacing, several lines, `0x` allowed) or one
    /// 88-character string; several keys in a row are decoded one by one. Read from standard
    /// input when absent
    #[arg(value_name = "HEX")]
    pub hex: Vec<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct MapArgs {
    /// The pinned sockhash [default: /sys/fs/bpf/tc/globals/cilium_sock_ops, then
    /// /sys/fs/bpf/cilium_sock_ops]
    #[arg(long, value_name = "PATH")]
    pub map: Option<PathBuf>,
    /// Address of Cilium's gateway (cilium_host) whose L7-proxy entries are never judged
    /// stale on tuple evidence; repeatable [default: the addresses of the cilium_host interface]
    #[arg(long, value_name = "IP")]
    pub gateway: Vec<IpAddr>,
    /// Root under which /proc and /run are read (for tests and chroots)
    #[arg(long, value_name = "DIR", default_value = "/", hide = true)]
    pub root: PathBuf,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub map: MapArgs,
    /// Only entries whose held socket's local IP is this (a pod IP, say)
    #[arg(long, value_name = "IP")]
    pub local: Option<IpAddr>,
    /// Only entries whose held socket's remote IP is this (a node IP, say)
    #[arg(long, value_name = "IP")]
    pub remote: Option<IpAddr>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// How a successful run ended, as the process exit code says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Clean,
    StaleFound,
}

impl Outcome {
    pub fn code(self) -> u8 {
        match self {
            Outcome::Clean => 0,
            Outcome::StaleFound => 1,
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::Decode(args) => decode(args),
        Command::Audit(args) => audit(args),
    }
}

fn decode(args: DecodeArgs) -> anyhow::Result<Outcome> {
    let text = if args.hex.is_empty() {
        let mut s = String::new();
        io::stdin()
            .read_to_string(&mut s)
            .context("reading the key from standard input")?;
        s
    } else {
        args.hex.join(" ")
    };
    let keys = key::parse_hex_keys(&text)?;
    let mut out = String::new();
    let mut json = Vec::new();
    for raw in &keys {
        let decoded = SockKey::decode(raw).with_context(|| format!("key {}", raw.to_hex()))?;
        match args.output {
            Output::Text => out.push_str(&describe(raw, &decoded)),
            Output::Json => json.push(serde_json::json!({
                "key": raw.to_hex(),
                "family": decoded.family,
                "a": decoded.a().to_string(),
                "b": decoded.b().to_string(),
                "local": decoded.local.to_string(),
                "remote": decoded.remote.to_string(),
            })),
        }
    }
    if args.output == Output::Json {
        out = serde_json::to_string_pretty(&json)? + "\n";
    }
    write_stdout(&out)?;
    Ok(Outcome::Clean)
}

fn describe(raw: &key::RawKey, k: &SockKey) -> String {
    format!(
        "key      {hex}
family   {family}
A        {a}  (first address and port of the key; Cilium's C fields sip/sport)
B        {b}  (second address and port; dip/dport)
held     the socket whose local end is {local} and remote end is {remote}
         (a socket is filed under the key its peer computes when sending)
ss       ss -tnp src {local} dst {remote}   (run in the namespace owning {local_ip})
peer     its peer socket (local {remote}, remote {local}) is filed under the twin key
         {twin}
",
        hex = raw.to_hex(),
        family = k.family,
        a = k.a(),
        b = k.b(),
        local = k.local,
        remote = k.remote,
        local_ip = k.local.ip(),
        twin = k.peer().encode().to_bpftool_hex(),
    )
}

fn audit(args: AuditArgs) -> anyhow::Result<Outcome> {
    let filter = Filter {
        local: args.local,
        remote: args.remote,
    };
    let map = SockMap::open_default(args.map.map.as_deref(), Access::ReadOnly)?;
    let gateways = gateways(&args.map);
    let observation = audit::observe(&map, &args.map.root, &gateways)?;
    let source = map_source(&map);
    let selected = report::selected(&observation, &filter);
    let stale = selected.iter().any(|e| e.verdict.is_stale());
    match args.output {
        Output::Text => write_stdout(&report::audit_table(&source, &observation, &filter))?,
        Output::Json => {
            let mut s =
                serde_json::to_string_pretty(&report::audit_json(&source, &observation, &filter))?;
            s.push('\n');
            write_stdout(&s)?;
        }
    }
    Ok(if stale {
        Outcome::StaleFound
    } else {
        Outcome::Clean
    })
}

fn gateways(args: &MapArgs) -> Vec<IpAddr> {
    if !args.gateway.is_empty() {
        return args.gateway.clone();
    }
    let found = audit::cilium_host_addresses();
    if found.is_empty() {
        tracing::warn!(
            "no cilium_host interface here: L7-proxy entries cannot be recognised; give --gateway IP if Cilium's proxy is in use"
        );
    }
    found
}

fn map_source(map: &SockMap) -> MapSource {
    MapSource {
        path: map.path().display().to_string(),
        id: map.id(),
        map_type: format!("{:?}", map.map_type()).to_lowercase(),
        max_entries: map.max_entries(),
    }
}

/// Writes to stdout; a closed pipe (`| head`) ends quietly rather than as an error.
fn write_stdout(s: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
