//! The daemon's configuration: a TOML file, validated once into [`Settings`], with command-line
//! overrides applied on top. `config/sockmap-gc.toml` ships every key with its default.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sockmap_gc::events::EventsMode;
use sockmap_gc::guard::{GuardSettings, SettingsError, MAX_DURATION};
use sockmap_gc::identity::IdentityMode;

/// Where the unit and the README put the file.
pub const DEFAULT_PATH: &str = "/etc/sockmap-gc/config.toml";
/// Where the daemon's trail goes unless the file says otherwise (systemd's `StateDirectory`).
pub const DEFAULT_TRAIL: &str = "/var/lib/sockmap-gc/trail.jsonl";
/// Loopback only: the metrics say which pods had stale entries.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9964";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event
    Plain,
    /// One JSON object per line (for log shippers)
    Json,
}

impl LogFormat {
    /// Installs the global tracing subscriber on stderr; colours only on a terminal.
    pub fn install(self) {
        let stderr = io::stderr;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt()
            .with_writer(stderr)
            .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
            .with_env_filter(filter);
        match self {
            LogFormat::Plain => builder.init(),
            LogFormat::Json => builder.json().init(),
        }
    }
}

/// The daemon's validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `None`: Cilium's pins, as `map::SockMap::open_default` tries them.
    pub map: Option<PathBuf>,
    pub interval_min: Duration,
    pub interval_max: Duration,
    pub dry_run: bool,
    /// `None`: no limit.
    pub rate_limit: Option<NonZeroU32>,
    pub max_deletes: usize,
    pub confirm_after: Duration,
    pub trail: Option<PathBuf>,
    /// `None`: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// Empty: the addresses of the `cilium_host` interface, read at each sweep.
    pub gateways: Vec<IpAddr>,
    /// Whether to see the socket behind each entry (the sockmap iterator).
    pub identity: IdentityMode,
    /// The continuous pass's interval; `None`: no continuous pass, full sweeps only.
    pub pass_interval: Option<Duration>,
    /// The share of one core the continuous passes may take on average (0 to 1): a pass's
    /// interval stretches to keep within it.
    pub pass_cpu_budget: f64,
    /// Whether to watch the kernel for sockets in the map closing and inserts refused by a
    /// stale entry, and act on them at once.
    pub events: EventsMode,
}

impl Settings {
    /// The guards these settings sweep with (validated when the file was read).
    pub fn guards(&self) -> Result<GuardSettings, SettingsError> {
        GuardSettings::new(
            self.dry_run,
            self.rate_limit.map_or(0, NonZeroU32::get),
            self.max_deletes,
            self.confirm_after,
        )
    }
}

impl Default for Settings {
    fn default() -> Settings {
        let guards = GuardSettings::default();
        Settings {
            map: None,
            interval_min: Duration::from_secs(30),
            interval_max: Duration::from_secs(600),
            dry_run: true,
            rate_limit: guards.rate_limit,
            max_deletes: guards.max_deletes,
            // Half the command line's 1s: with the continuous pass a stale entry lives about
            // pass_interval / 2 + confirm_after, and each delete is re-checked in the kernel.
            confirm_after: Duration::from_millis(500),
            trail: Some(PathBuf::from(DEFAULT_TRAIL)),
            metrics_listen: DEFAULT_METRICS_LISTEN.parse().ok(),
            log_format: LogFormat::Plain,
            gateways: Vec::new(),
            identity: IdentityMode::Auto,
            pass_interval: Some(Duration::from_secs(1)),
            pass_cpu_budget: 0.01,
            events: EventsMode::Auto,
        }
    }
}

/// Command-line values that win over the file's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub dry_run: Option<bool>,
    pub map: Option<PathBuf>,
    /// `Some(None)`: metrics off.
    pub metrics_listen: Option<Option<SocketAddr>>,
    pub log_format: Option<LogFormat>,
}

impl Overrides {
    fn apply(&self, s: &mut Settings) {
        if let Some(dry_run) = self.dry_run {
            s.dry_run = dry_run;
        }
        if let Some(map) = &self.map {
            s.map = Some(map.clone());
        }
        if let Some(listen) = self.metrics_listen {
            s.metrics_listen = listen;
        }
        if let Some(format) = self.log_format {
            s.log_format = format;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {error}; copy config/sockmap-gc.toml there or give --config FILE")]
    Read { path: PathBuf, error: io::Error },
    #[error("config file {path}, {at}: {message}; fix that line (config/sockmap-gc.toml lists every key)")]
    Parse {
        path: PathBuf,
        at: String,
        message: String,
    },
    #[error("config file {path}: {key} = {value:?}: {why}")]
    Invalid {
        path: PathBuf,
        key: String,
        value: String,
        why: String,
    },
}

/// The file as written: every key optional, strings where the value needs checking.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    map: Option<String>,
    interval_min: Option<String>,
    interval_max: Option<String>,
    dry_run: Option<bool>,
    rate_limit: Option<u32>,
    max_deletes: Option<usize>,
    confirm_after: Option<String>,
    trail: Option<String>,
    metrics_listen: Option<String>,
    log_format: Option<String>,
    gateways: Option<Vec<String>>,
    identity: Option<String>,
    pass_interval: Option<String>,
    pass_cpu_budget: Option<f64>,
    events: Option<String>,
}

/// Reads, validates and overrides the config at `path`.
pub fn load(path: &Path, overrides: &Overrides) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let mut settings = parse(path, &text)?;
    overrides.apply(&mut settings);
    Ok(settings)
}

/// Validates `text`, the contents of the file at `path` (named in errors).
pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| parse_error(path, text, &e))?;
    let invalid = |key: &str, value: &str, why: &str| ConfigError::Invalid {
        path: path.to_path_buf(),
        key: key.to_string(),
        value: value.to_string(),
        why: why.to_string(),
    };
    let duration = |key: &str, value: &Option<String>, default: Duration| match value {
        None => Ok(default),
        Some(v) => match humantime::parse_duration(v) {
            Err(e) => Err(invalid(
                key,
                v,
                &format!("{e}; write a duration such as \"30s\", \"5m\" or \"1h 30m\""),
            )),
            Ok(d) if d > MAX_DURATION => Err(invalid(
                key,
                v,
                &format!(
                    "longer than {}, the most any duration here may be",
                    humantime::format_duration(MAX_DURATION)
                ),
            )),
            Ok(d) => Ok(d),
        },
    };
    let absolute = |key: &str, value: &str| {
        let p = PathBuf::from(value);
        if p.is_absolute() {
            Ok(p)
        } else {
            Err(invalid(
                key,
                value,
                "give an absolute path, or \"\" for the default",
            ))
        }
    };
    let defaults = Settings::default();
    let mut s = defaults.clone();
    s.map = match file.map.as_deref() {
        None | Some("") => None,
        Some(v) => Some(absolute("map", v)?),
    };
    s.interval_min = duration("interval_min", &file.interval_min, defaults.interval_min)?;
    s.interval_max = duration("interval_max", &file.interval_max, defaults.interval_max)?;
    if s.interval_min.is_zero() {
        return Err(invalid(
            "interval_min",
            file.interval_min.as_deref().unwrap_or_default(),
            "must be more than 0s",
        ));
    }
    if s.interval_max < s.interval_min {
        // Blame the key the file set: the other one is a default.
        return Err(match &file.interval_max {
            Some(v) => invalid(
                "interval_max",
                v,
                &format!(
                    "is shorter than interval_min ({}); make it at least as long",
                    humantime::format_duration(s.interval_min)
                ),
            ),
            None => invalid(
                "interval_min",
                file.interval_min.as_deref().unwrap_or_default(),
                &format!(
                    "is longer than interval_max (default {}); set interval_max too",
                    humantime::format_duration(s.interval_max)
                ),
            ),
        });
    }
    // The guards' keys are checked where the command line's flags are: GuardSettings::new.
    let confirm_after = match &file.confirm_after {
        None => defaults.confirm_after,
        Some(v) => humantime::parse_duration(v).map_err(|e| {
            invalid(
                "confirm_after",
                v,
                &format!("{e}; write a duration such as \"30s\", \"5m\" or \"1h 30m\""),
            )
        })?,
    };
    let guards = GuardSettings::new(
        file.dry_run.unwrap_or(defaults.dry_run),
        file.rate_limit
            .unwrap_or(defaults.rate_limit.map_or(0, NonZeroU32::get)),
        file.max_deletes.unwrap_or(defaults.max_deletes),
        confirm_after,
    )
    .map_err(|e| match e {
        SettingsError::NoDeletes => invalid(
            "max_deletes",
            &file.max_deletes.unwrap_or_default().to_string(),
            &e.to_string(),
        ),
        SettingsError::ConfirmTooLong => invalid(
            "confirm_after",
            file.confirm_after.as_deref().unwrap_or_default(),
            &e.to_string(),
        ),
    })?;
    s.dry_run = guards.dry_run;
    s.rate_limit = guards.rate_limit;
    s.max_deletes = guards.max_deletes;
    s.confirm_after = guards.confirm_after;
    s.trail = match file.trail.as_deref() {
        None => defaults.trail,
        Some("") => None,
        Some(v) => Some(absolute("trail", v)?),
    };
    s.metrics_listen = match file.metrics_listen.as_deref() {
        None => defaults.metrics_listen,
        Some(v) => parse_listen(v).map_err(|why| invalid("metrics_listen", v, &why))?,
    };
    s.log_format = match file.log_format.as_deref() {
        None => defaults.log_format,
        Some("plain") => LogFormat::Plain,
        Some("json") => LogFormat::Json,
        Some(v) => return Err(invalid("log_format", v, "use \"plain\" or \"json\"")),
    };
    s.gateways = file
        .gateways
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<IpAddr>().map_err(|_| {
                invalid(
                    &format!("gateways[{i}]"),
                    v,
                    "not an IP address; list cilium_host's addresses, e.g. [\"10.0.0.1\"]",
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let modes = |key: &str, value: &str| invalid(key, value, "use \"auto\", \"on\" or \"off\"");
    s.identity = auto_on_off(
        file.identity.as_deref(),
        defaults.identity,
        [IdentityMode::Auto, IdentityMode::On, IdentityMode::Off],
    )
    .map_err(|v| modes("identity", v))?;
    s.pass_interval = match &file.pass_interval {
        None => defaults.pass_interval,
        // "0s": no continuous pass.
        Some(_) => Some(duration(
            "pass_interval",
            &file.pass_interval,
            Duration::ZERO,
        )?)
        .filter(|d| !d.is_zero()),
    };
    if let Some(budget) = file.pass_cpu_budget {
        if !(budget > 0.0 && budget <= 1.0) {
            return Err(invalid(
                "pass_cpu_budget",
                &budget.to_string(),
                "must be more than 0 and at most 1 (a share of one core, e.g. 0.01); set pass_interval = \"0s\" for no continuous pass",
            ));
        }
        s.pass_cpu_budget = budget;
    }
    s.events = auto_on_off(
        file.events.as_deref(),
        defaults.events,
        [EventsMode::Auto, EventsMode::On, EventsMode::Off],
    )
    .map_err(|v| modes("events", v))?;
    Ok(s)
}

/// The value of an `"auto"`, `"on"` or `"off"` key: `modes` in that order, `default` when
/// absent, and `Err` with the value given for any other.
fn auto_on_off<T>(value: Option<&str>, default: T, [auto, on, off]: [T; 3]) -> Result<T, &str> {
    match value {
        None => Ok(default),
        Some("auto") => Ok(auto),
        Some("on") => Ok(on),
        Some("off") => Ok(off),
        Some(v) => Err(v),
    }
}

/// `--metrics-listen` as given: `Listen(None)` turns the listener off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

/// Parses `--metrics-listen` (clap needs one value type, not a nested `Option`).
pub fn parse_listen_flag(v: &str) -> Result<Listen, String> {
    parse_listen(v).map(Listen)
}

/// `""` turns the listener off; otherwise `IP:PORT`.
pub fn parse_listen(v: &str) -> Result<Option<SocketAddr>, String> {
    if v.is_empty() {
        return Ok(None);
    }
    v.parse().map(Some).map_err(|_| {
        format!("not an address and port; write e.g. \"{DEFAULT_METRICS_LISTEN}\", or \"\" for no metrics")
    })
}

/// One line naming where the file went wrong; toml's own message names the key (an unknown
/// field, a wrong type) and the line shows it.
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or_else(
        || "somewhere".to_string(),
        |span| {
            let start = span.start.min(text.len());
            let line_no = text[..start].matches('\n').count() + 1;
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            let line = text[line_start..].lines().next().unwrap_or_default().trim();
            format!("line {line_no} `{line}`")
        },
    );
    ConfigError::Parse {
        path: path.to_path_buf(),
        at,
        message: e.message().trim().to_string(),
    }
}

/// Every key the config file takes, for the tests of the shipped file and of the parser.
#[cfg(test)]
const KEYS: [&str; 15] = [
    "map",
    "interval_min",
    "interval_max",
    "dry_run",
    "rate_limit",
    "max_deletes",
    "confirm_after",
    "trail",
    "metrics_listen",
    "log_format",
    "gateways",
    "identity",
    "pass_interval",
    "pass_cpu_budget",
    "events",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Settings, ConfigError> {
        parse(Path::new("/etc/test.toml"), text)
    }

    #[test]
    fn shipped_file_is_the_built_in_defaults() {
        let text = include_str!("../../config/sockmap-gc.toml");
        assert_eq!(
            parse_str(text).expect("shipped file parses"),
            Settings::default()
        );
    }

    #[test]
    fn shipped_file_lists_every_key_with_a_comment() {
        let text = include_str!("../../config/sockmap-gc.toml");
        let lines: Vec<&str> = text.lines().collect();
        for key in KEYS {
            let at = lines
                .iter()
                .position(|l| l.starts_with(&format!("{key} = ")))
                .unwrap_or_else(|| panic!("key {key} missing from the shipped file"));
            assert!(
                at > 0 && lines[at - 1].starts_with('#'),
                "key {key} has no comment line above it"
            );
        }
        let set = lines
            .iter()
            .filter(|l| !l.starts_with('#') && l.contains(" = "))
            .count();
        assert_eq!(set, KEYS.len(), "a key in the file is not in this list");
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        assert_eq!(parse_str("").expect("parses"), Settings::default());
    }

    #[test]
    fn values_are_read() {
        let s = parse_str(
            r#"
map = "/sys/fs/bpf/x/cilium_sock_ops"
interval_min = "1s"
interval_max = "1m 30s"
dry_run = false
rate_limit = 0
max_deletes = 5
confirm_after = "0s"
trail = ""
metrics_listen = ""
log_format = "json"
gateways = ["10.0.0.1", "fd00::1"]
pass_interval = "250ms"
pass_cpu_budget = 0.05
"#,
        )
        .expect("parses");
        assert_eq!(s.map, Some(PathBuf::from("/sys/fs/bpf/x/cilium_sock_ops")));
        assert_eq!(s.interval_min, Duration::from_secs(1));
        assert_eq!(s.interval_max, Duration::from_secs(90));
        assert!(!s.dry_run);
        assert_eq!(s.rate_limit, None);
        assert_eq!(s.max_deletes, 5);
        assert_eq!(s.confirm_after, Duration::ZERO);
        assert_eq!(s.trail, None);
        assert_eq!(s.metrics_listen, None);
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.gateways.len(), 2);
        assert_eq!(s.pass_interval, Some(Duration::from_millis(250)));
        assert_eq!(s.pass_cpu_budget, 0.05);
        let off = parse_str("pass_interval = \"0s\"").expect("parses");
        assert_eq!(off.pass_interval, None, "0s: full sweeps only");
    }

    /// Each bad file and the key its error must name.
    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("intervall = \"1s\"", "intervall"),
            ("dry_run = \"yes\"", "dry_run"),
            ("rate_limit = -1", "rate_limit"),
            ("rate_limit = \"fast\"", "rate_limit"),
            ("max_deletes = 0", "max_deletes"),
            ("interval_min = \"soon\"", "interval_min"),
            ("interval_min = \"0s\"", "interval_min"),
            (
                "interval_min = \"1m\"\ninterval_max = \"10s\"",
                "interval_max",
            ),
            ("confirm_after = \"1 fortnight\"", "confirm_after"),
            ("interval_max = \"500000000000y\"", "interval_max"),
            ("confirm_after = \"8d\"", "confirm_after"),
            ("metrics_listen = \"localhost\"", "metrics_listen"),
            ("log_format = \"xml\"", "log_format"),
            ("gateways = [\"10.0.0.1\", \"cilium_host\"]", "gateways[1]"),
            ("trail = \"trail.jsonl\"", "trail"),
            ("map = \"cilium_sock_ops\"", "map"),
            ("[daemon]\ndry_run = true", "daemon"),
            ("dry_run = true\ndry_run = false", "dry_run"),
            ("pass_interval = \"soon\"", "pass_interval"),
            ("pass_interval = \"8d\"", "pass_interval"),
            ("pass_cpu_budget = 0.0", "pass_cpu_budget"),
            ("pass_cpu_budget = 1.5", "pass_cpu_budget"),
            ("pass_cpu_budget = \"1%\"", "pass_cpu_budget"),
        ];
        for (text, key) in cases {
            let e = parse_str(text).expect_err(text).to_string();
            assert!(
                e.contains(key),
                "error for {text:?} does not name {key}: {e}"
            );
            assert!(e.contains("/etc/test.toml"), "error names no file: {e}");
            assert!(!e.contains('\n'), "error is not one line: {e}");
        }
    }

    #[test]
    fn overrides_win() {
        let mut s = Settings::default();
        Overrides {
            dry_run: Some(false),
            map: Some(PathBuf::from("/sys/fs/bpf/m")),
            metrics_listen: Some(None),
            log_format: Some(LogFormat::Json),
        }
        .apply(&mut s);
        assert!(!s.dry_run);
        assert_eq!(s.map, Some(PathBuf::from("/sys/fs/bpf/m")));
        assert_eq!(s.metrics_listen, None);
        assert_eq!(s.log_format, LogFormat::Json);
        let before = Settings::default();
        let mut same = before.clone();
        Overrides::default().apply(&mut same);
        assert_eq!(same, before);
    }

    #[test]
    fn daemon_flags_parse_into_overrides() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            let argv = ["sockmap-gc", "daemon"].iter().chain(args).copied();
            match crate::cmd::cli::Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(crate::cmd::cli::Command::Daemon(a)) => Ok(a),
                Ok(other) => panic!("parsed as {other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        let a = parse(&["--metrics-listen", "", "--log-format", "json", "--execute"]).expect("ok");
        assert_eq!(a.metrics_listen, Some(Listen(None)));
        assert_eq!(a.log_format, Some(LogFormat::Json));
        assert!(a.execute && !a.dry_run);
        let a = parse(&["--metrics-listen", "[::1]:9", "--map", "/sys/fs/bpf/m"]).expect("ok");
        assert!(a.metrics_listen.is_some_and(|l| l.0.is_some()));
        assert_eq!(a.config, PathBuf::from(DEFAULT_PATH));
        assert!(parse(&["--metrics-listen", "localhost"]).is_err());
        assert!(parse(&["--dry-run", "--execute"]).is_err());
    }

    /// Moved from the package tests with this module: the Kubernetes ConfigMap's file loads,
    /// as a dry run serving metrics where kubelet probes and Prometheus reach the pod.
    #[test]
    fn the_configmap_is_a_dry_run_serving_metrics_on_the_pod_ip() {
        let yaml = include_str!("../../deploy/configmap.yaml");
        // The file is the block under `config.toml: |`, indented by four spaces.
        let text: String = yaml
            .lines()
            .skip_while(|l| l.trim() != "config.toml: |")
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| format!("{}\n", l.get(4..).unwrap_or_default()))
            .collect();
        assert!(text.contains("dry_run"), "no config.toml block found");
        let settings = parse(Path::new("deploy/configmap.yaml"), &text)
            .unwrap_or_else(|e| panic!("the ConfigMap's config does not load: {e}"));
        assert!(settings.dry_run, "dry run by default");
        let listen = settings.metrics_listen.expect("metrics on");
        assert!(
            listen.ip().is_unspecified(),
            "kubelet probes the pod IP: {listen}"
        );
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen(""), Ok(None));
        assert!(parse_listen("[::1]:9964").expect("v6").is_some());
        assert!(parse_listen("127.0.0.1").is_err());
    }
}

/// Property tests: no text, well-formed or not, and no value for any key panics the loader;
/// every refusal is one line naming the file. `PROPTEST_CASES=100000 cargo test config::fuzz`
/// runs longer; failing cases are kept in `proptest-regressions/cmd/config.txt`.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// A TOML string literal holding `s`, escaped as TOML wants.
    fn quoted(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// Values of every TOML type, and strings shaped like what the keys take.
    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            Just("inf".to_string()),
            Just("nan".to_string()),
            ".{0,40}".prop_map(|s| quoted(&s)),
            "[0-9]{0,12}(ns|us|ms|s|m|h|d|w|y| |fortnight){0,3}".prop_map(|s| quoted(&s)),
            any::<u64>().prop_map(|n| quoted(&format!("{n}s"))),
            "(/[a-z_]{0,8}){0,4}".prop_map(|s| quoted(&s)),
            "[0-9a-f:.\\[\\]]{0,30}".prop_map(|s| quoted(&s)),
            Just("1979-05-27T07:32:00Z".to_string()),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(", "))),
                proptest::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|v| {
                    let kv: Vec<String> = v.iter().map(|(k, x)| format!("{k} = {x}")).collect();
                    format!("{{ {} }}", kv.join(", "))
                }),
            ]
        })
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => proptest::sample::select(KEYS.to_vec()).prop_map(str::to_string),
            1 => "[a-z_.\"]{1,14}",
        ]
    }

    /// Lines of `key = value`, with now and then a table header, a comment or junk.
    fn document() -> impl Strategy<Value = String> {
        let line = prop_oneof![
            8 => (key(), value()).prop_map(|(k, v)| format!("{k} = {v}")),
            1 => "\\[[a-z_.]{0,10}\\]",
            1 => "#.{0,20}",
            1 => ".{0,30}",
        ];
        proptest::collection::vec(line, 0..8).prop_map(|l| l.join("\n"))
    }

    fn check(text: &str) -> Result<(), TestCaseError> {
        match parse(Path::new("/etc/fuzz.toml"), text) {
            Ok(s) => {
                prop_assert!(s.interval_min > Duration::ZERO);
                prop_assert!(s.interval_min <= s.interval_max);
                prop_assert!(s.max_deletes >= 1);
                // What the daemon computes from them must not overflow (it once panicked).
                for d in [s.interval_min, s.interval_max, s.confirm_after] {
                    let later = d
                        .checked_mul(2)
                        .and_then(|d| std::time::Instant::now().checked_add(d));
                    prop_assert!(later.is_some(), "{:?} overflows the clock", d);
                }
                let w = crate::cmd::daemon::next_wait(
                    s.interval_max,
                    false,
                    s.interval_min,
                    s.interval_max,
                );
                prop_assert!(w <= s.interval_max);
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains("/etc/fuzz.toml"), "names no file: {}", msg);
                prop_assert!(!msg.contains('\n'), "not one line: {}", msg);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn any_text_never_panics(text in ".{0,400}") {
            check(&text)?;
        }

        #[test]
        fn toml_like_documents_never_panic(text in document()) {
            check(&text)?;
        }

        /// Each key alone with every kind of value: accepted, or refused naming that key.
        #[test]
        fn every_key_with_any_value(k in proptest::sample::select(KEYS.to_vec()), v in value()) {
            let text = format!("{k} = {v}");
            check(&text)?;
            if let Err(ConfigError::Invalid { key, .. }) = parse(Path::new("/etc/fuzz.toml"), &text) {
                prop_assert!(key.starts_with(k), "blames {} for {}", key, text);
            }
        }
    }
}
