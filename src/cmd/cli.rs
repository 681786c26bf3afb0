//! The command line: flags turned into validated settings once, and each subcommand's run.

use std::io::{self, IsTerminal, Read, Write};
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use signal_hook::consts::{SIGINT, SIGTERM};

use sockmap_gc::guard::{GuardSettings, SettingsError};
use sockmap_gc::holder::HolderSource;
use sockmap_gc::identity::{IdentityMode, IdentitySource};
use sockmap_gc::key::{self, SockKey};
use sockmap_gc::map::{Access, SockMap};
use sockmap_gc::observation::Filter;
use sockmap_gc::observe;
use sockmap_gc::report::{self, MapSource};
use sockmap_gc::sweep::{self, SweepSettings, Trail};

use crate::cmd::config;

const EXIT_CODES: &str = "\
Exit codes:
  0  success; audit: no stale entry; sweep: no stale entry left behind
  1  audit: stale entries found; sweep: stale entries left, or a guard held it back, or a
     signal stopped it
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
    /// Delete stale entries behind guards; a dry run unless --execute is given
    #[command(after_help = EXIT_CODES)]
    Sweep(SweepArgs),
    /// Sweep on an adaptive interval, as a systemd service; a dry run unless the config says
    /// dry_run = false (or --execute is given)
    Daemon(DaemonArgs),
    /// Write the man page or a shell completion script to standard output, generated from these
    /// definitions (for packaging; hidden from --help)
    #[command(hide = true)]
    Generate(GenerateArgs),
}

/// What `sockmap-gc generate` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Generated {
    /// The man page, section 1, in roff: every visible subcommand and flag
    Man,
    /// The bash completion script
    CompleteBash,
    /// The zsh completion script
    CompleteZsh,
    /// The fish completion script
    CompleteFish,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[arg(value_enum)]
    pub what: Generated,
}

/// `--identity`: the library's [`IdentityMode`], as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Identity {
    /// Use the iterator when the kernel allows it; else warn once and use tuple evidence.
    Auto,
    /// Use the iterator; a refusal is an error.
    On,
    /// Tuple evidence only.
    Off,
}

impl From<Identity> for IdentityMode {
    fn from(flag: Identity) -> IdentityMode {
        match flag {
            Identity::Auto => IdentityMode::Auto,
            Identity::On => IdentityMode::On,
            Identity::Off => IdentityMode::Off,
        }
    }
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
    /// See the socket behind each entry through a BPF sockmap iterator: `auto` uses it when
    /// the kernel allows and warns once otherwise, `on` makes a refusal an error
    #[arg(long, value_enum, default_value_t = Identity::Auto)]
    pub identity: Identity,
    /// Root under which /proc and /run are read (for tests and chroots)
    #[arg(long, value_name = "DIR", default_value = "/", hide = true)]
    pub root: PathBuf,
}

/// `--local` and `--remote`: the entries of one pod or one node IP.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only entries whose held socket's local IP is this (a pod IP, say)
    #[arg(long, value_name = "IP")]
    pub local: Option<IpAddr>,
    /// Only entries whose held socket's remote IP is this (a node IP, say)
    #[arg(long, value_name = "IP")]
    pub remote: Option<IpAddr>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter {
            local: self.local,
            remote: self.remote,
        }
    }
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub map: MapArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub map: MapArgs,
    /// Delete for real; without it the sweep only says what it would delete
    #[arg(long)]
    pub execute: bool,
    /// Deletions per second; 0 for no limit
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub rate_limit: u32,
    /// At most this many deletions in this sweep
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_deletes: usize,
    /// Delete only entries judged stale in two observations at least this far apart
    /// (`0s` allowed)
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub confirm_after: Duration,
    /// Append one JSON line per deletion to this file (the post-mortem trail)
    #[arg(long, value_name = "PATH")]
    pub trail: Option<PathBuf>,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

impl SweepArgs {
    /// The validated guards this sweep runs with; a refused value names its flag.
    fn guards(&self) -> anyhow::Result<GuardSettings> {
        GuardSettings::new(
            !self.execute,
            self.rate_limit,
            self.max_deletes,
            self.confirm_after,
        )
        .map_err(|e| match e {
            SettingsError::NoDeletes => {
                anyhow::anyhow!("--max-deletes {}: {e}", self.max_deletes)
            }
            SettingsError::ConfirmTooLong => anyhow::anyhow!(
                "--confirm-after {}: {e}",
                humantime::format_duration(self.confirm_after)
            ),
        })
    }
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The TOML config (config/sockmap-gc.toml lists every key with its default)
    #[arg(long, value_name = "FILE", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Only report, whatever the config's dry_run says
    #[arg(long, conflicts_with = "execute")]
    pub dry_run: bool,
    /// Delete, whatever the config's dry_run says
    #[arg(long)]
    pub execute: bool,
    /// The pinned sockhash, instead of the config's map
    #[arg(long, value_name = "PATH")]
    pub map: Option<PathBuf>,
    /// Serve metrics on IP:PORT instead of the config's metrics_listen; "" for none
    #[arg(long, value_name = "ADDR", value_parser = config::parse_listen_flag)]
    pub metrics_listen: Option<config::Listen>,
    /// Log format, instead of the config's log_format
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<config::LogFormat>,
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
        Command::Sweep(args) => sweep(args),
        Command::Daemon(args) => {
            let overrides = config::Overrides {
                dry_run: (args.dry_run || args.execute).then_some(args.dry_run),
                map: args.map,
                metrics_listen: args.metrics_listen.map(|l| l.0),
                log_format: args.log_format,
            };
            crate::cmd::daemon::run(&args.config, overrides).map(|()| Outcome::Clean)
        }
        Command::Generate(args) => {
            let mut out = Vec::new();
            generate(args.what, &mut out)?;
            write_stdout(&String::from_utf8_lossy(&out))?;
            Ok(Outcome::Clean)
        }
    }
}

/// Writes the man page or a completion script for the command line as `--help` shows it:
/// hidden subcommands and flags (`generate`, `--root`) are left out of both.
pub fn generate(what: Generated, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut cli = Cli::command();
    cli.build();
    let visible = visible_only(&cli);
    let shell = match what {
        Generated::Man => return man_page(&cli, out).context("rendering the man page"),
        Generated::CompleteBash => clap_complete::Shell::Bash,
        Generated::CompleteZsh => clap_complete::Shell::Zsh,
        Generated::CompleteFish => clap_complete::Shell::Fish,
    };
    let mut visible = visible;
    clap_complete::generate(shell, &mut visible, "sockmap-gc", out);
    Ok(())
}

/// A copy of `cmd` without its hidden subcommands and flags (clap_complete would offer them),
/// keeping what completion uses: names, help, flags, values and nested subcommands.
fn visible_only(cmd: &clap::Command) -> clap::Command {
    let mut copy = clap::Command::new(cmd.get_name().to_string());
    if let Some(about) = cmd.get_about() {
        copy = copy.about(about.clone());
    }
    if let Some(about) = cmd.get_long_about() {
        copy = copy.long_about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        copy = copy.version(version.to_string());
    }
    // clap adds --help and --version to the copy itself.
    let auto = |a: &&clap::Arg| a.get_id() == "help" || a.get_id() == "version";
    copy = copy.args(
        cmd.get_arguments()
            .filter(|a| !a.is_hide_set() && !auto(a))
            .cloned(),
    );
    copy.subcommands(
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .map(visible_only),
    )
}

/// One page for the whole tool (`man sockmap-gc`): name, synopsis, description, the
/// subcommands, then a section per subcommand with its synopsis and every visible flag, and
/// the exit codes.
fn man_page(cli: &clap::Command, out: &mut dyn Write) -> io::Result<()> {
    let top = clap_mangen::Man::new(cli.clone())
        .manual("sockmap-gc manual")
        .source(format!("sockmap-gc {}", env!("CARGO_PKG_VERSION")));
    top.render_title(out)?;
    top.render_name_section(out)?;
    top.render_synopsis_section(out)?;
    top.render_description_section(out)?;
    top.render_options_section(out)?;
    let subs: Vec<&clap::Command> = cli
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .collect();
    // clap_mangen's own list points at one page per subcommand; this page holds them all.
    writeln!(out, ".SH SUBCOMMANDS")?;
    for sub in &subs {
        writeln!(out, ".TP\n\\fB{}\\fR", sub.get_name())?;
        if let Some(about) = sub.get_about() {
            writeln!(out, "{}", roff_text(&about.to_string()))?;
        }
    }
    for sub in &subs {
        let man = clap_mangen::Man::new((*sub).clone());
        let mut section = Vec::new();
        man.render_synopsis_section(&mut section)?;
        man.render_description_section(&mut section)?;
        man.render_options_section(&mut section)?;
        let section = String::from_utf8_lossy(&section)
            .replace(".SH SYNOPSIS", ".SS Synopsis")
            .replace(".SH DESCRIPTION", ".SS Description")
            .replace(".SH OPTIONS", ".SS Options");
        writeln!(out, ".SH {}", sub.get_name().to_uppercase())?;
        out.write_all(section.as_bytes())?;
    }
    writeln!(out, ".SH \"EXIT STATUS\"\n.nf")?;
    for line in EXIT_CODES.lines().skip(1) {
        writeln!(out, "{}", roff_text(line))?;
    }
    writeln!(out, ".fi")?;
    top.render_version_section(out)?;
    Ok(())
}

/// Text for a roff line: backslashes escaped, and no line read as a request.
fn roff_text(text: &str) -> String {
    let escaped = text.replace('\\', "\\e");
    if escaped.starts_with(['.', '\'']) {
        format!("\\&{escaped}")
    } else {
        escaped
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
    let filter = args.filter.filter();
    // With identity, stale sockets' holders are searched through a program of their own:
    // it loads and reads alongside the identity program and the map's read.
    let proc_root = args.map.root.join("proc");
    let mut holders = match args.map.identity {
        Identity::Off => HolderSource::new(proc_root),
        Identity::Auto | Identity::On => HolderSource::prefetching(proc_root),
    };
    let map = SockMap::open_default(args.map.map.as_deref(), Access::ReadOnly)?;
    let gateways = observe::gateways(&args.map.gateway);
    let mut identity = IdentitySource::new(args.map.identity.into())?;
    let observation =
        observe::observe_diagnosed(&map, &args.map.root, &gateways, &mut identity, &mut holders)?;
    let source = map_source(&map);
    let stale = observation
        .entries
        .iter()
        .any(|e| e.verdict.is_stale() && filter.selects(e));
    write_stdout_with(|out| match args.output {
        Output::Text => report::write_audit_table(out, &source, &observation, &filter),
        Output::Json => {
            report::write_audit_json(out, &source, &observation, &filter)?;
            out.write_all(b"\n")
        }
    })?;
    // The process ends next, and the kernel takes its memory back at once: freeing a full
    // map's observation piece by piece took a few milliseconds of the audit.
    std::mem::forget(observation);
    Ok(if stale {
        Outcome::StaleFound
    } else {
        Outcome::Clean
    })
}

fn sweep(args: SweepArgs) -> anyhow::Result<Outcome> {
    let access = if args.execute {
        Access::ReadWrite
    } else {
        Access::ReadOnly
    };
    let guards = args.guards()?;
    let map = SockMap::open_default(args.map.map.as_deref(), access)?;
    let settings = SweepSettings::new(
        guards,
        args.filter.filter(),
        observe::gateways(&args.map.gateway),
        args.map.root.clone(),
    );
    let mut trail = args.trail.as_deref().map(Trail::open).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // A second signal while stopping ends the process at once.
        signal_hook::flag::register_conditional_shutdown(signal, 2, Arc::clone(&stop))
            .context("installing the signal handler")?;
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handler")?;
    }
    let mut display = ProgressDisplay::new();
    let mut identity = IdentitySource::new(args.map.identity.into())?;
    let report = sweep::sweep(
        &map,
        &settings,
        &mut identity,
        &stop,
        trail.as_mut(),
        &mut |p| display.update(p),
    )?;
    display.finish();
    let source = map_source(&map);
    let text = match args.output {
        Output::Text => report::sweep_text(&source, &report),
        Output::Json => serde_json::to_string_pretty(&report::sweep_json(&source, &report))? + "\n",
    };
    write_stdout(&text)?;
    Ok(if report.is_clean() {
        Outcome::Clean
    } else {
        Outcome::StaleFound
    })
}

/// A progress bar on a terminal; otherwise a plain line every few seconds.
struct ProgressDisplay {
    bar: Option<indicatif::ProgressBar>,
    last_line: Instant,
}

impl ProgressDisplay {
    const LINE_EVERY: Duration = Duration::from_secs(5);

    fn new() -> ProgressDisplay {
        ProgressDisplay {
            bar: None,
            last_line: Instant::now(),
        }
    }

    fn update(&mut self, p: sweep::Progress) {
        if io::stderr().is_terminal() {
            let bar = self.bar.get_or_insert_with(|| {
                let bar = indicatif::ProgressBar::new(p.total as u64);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "deleting {bar:40} {pos}/{len} ({per_sec}, {eta} left)",
                ) {
                    bar.set_style(style);
                }
                bar
            });
            bar.set_position(p.done as u64);
        } else if self.last_line.elapsed() >= Self::LINE_EVERY || p.done == p.total {
            self.last_line = Instant::now();
            eprintln!("sockmap-gc: deleted {} of {}", p.done, p.total);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
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
    write_stdout_with(|out| out.write_all(s.as_bytes()))
}

/// Runs `write` on a buffered stdout; a reader that went away (`| head`) is not an error.
/// The writer's type is concrete, not `dyn`: the JSON of a full map is ~45 MB written in
/// small pieces, each a call the compiler can then inline.
fn write_stdout_with(
    write: impl FnOnce(&mut io::BufWriter<io::StdoutLock<'static>>) -> io::Result<()>,
) -> io::Result<()> {
    let stdout = io::stdout().lock();
    widen_if_pipe(&stdout);
    let mut out = io::BufWriter::with_capacity(64 * 1024, stdout);
    match write(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// The capacity asked for a pipe on stdout: 1 MiB, `/proc/sys/fs/pipe-max-size`'s default, so
/// any user may ask it. A full map's JSON is ~45 MB; through the default 64 KiB pipe the two
/// processes took turns ~700 times (docs/BENCHMARKS.md).
const PIPE_BYTES: libc::c_int = 1 << 20;

/// Widens stdout's pipe to [`PIPE_BYTES`] when stdout is a pipe narrower than that. Best
/// effort: a user over `pipe-user-pages-soft` keeps the pipe as it is.
fn widen_if_pipe(stdout: &impl AsFd) {
    use nix::fcntl::{fcntl, FcntlArg};
    use nix::sys::stat::{fstat, SFlag};
    let fd = stdout.as_fd();
    let is_pipe = fstat(fd)
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFIFO);
    if is_pipe && fcntl(fd, FcntlArg::F_GETPIPE_SZ).is_ok_and(|n| n < PIPE_BYTES) {
        let _ = fcntl(fd, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each sweep's flags and the flag the refusal names (none: accepted); the config file's
    /// keys go through the same validator (config::tests::errors_name_the_key).
    #[test]
    fn sweep_flags_are_validated_as_the_config_is() {
        let cases: [(&[&str], Option<&str>); 5] = [
            (&[], None),
            (&["--max-deletes", "1", "--confirm-after", "7d"], None),
            (&["--rate-limit", "0", "--confirm-after", "0s"], None),
            (
                &["--max-deletes", "0"],
                Some("--max-deletes 0: must be at least 1"),
            ),
            (
                &["--confirm-after", "8d"],
                Some("--confirm-after 8days: longer than"),
            ),
        ];
        for (flags, refused) in cases {
            let argv = ["sockmap-gc", "sweep"].iter().chain(flags).copied();
            let Ok(Cli {
                command: Command::Sweep(args),
            }) = Cli::try_parse_from(argv)
            else {
                panic!("{flags:?} did not parse as a sweep");
            };
            match (args.guards(), refused) {
                (Ok(_), None) => {}
                (Err(e), Some(want)) => {
                    assert!(e.to_string().starts_with(want), "{flags:?}: {e}");
                }
                (got, want) => panic!("{flags:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
