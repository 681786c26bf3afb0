//! The alerting rules and the Grafana dashboard in `deploy/`: promtool's unit tests pass, each
//! alert fires in one and stays silent on every benign node, the PrometheusRule is the plain
//! rules file wrapped, every query parses, and every metric and label that an alert or a panel
//! reads is one a running daemon exports (a real scrape in the lab).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::daemon::{write_config, Daemon};
use crate::rig::{lab_and_scratch, Scratch};
use crate::support::{evidence, said};

const RULES: &str = "deploy/prometheus/standalone/sockmap-gc.rules.yaml";
const PROMETHEUS_RULE: &str = "deploy/prometheus/rules.yaml";
const RULE_TESTS: &str = "deploy/prometheus/tests/sockmap-gc.test.yaml";
const DASHBOARD: &str = "deploy/grafana/sockmap-gc.json";
/// The nodes of the benign scenario in the rule tests; no alert may fire on any of them.
const BENIGN: [&str; 5] = [
    "healthy",
    "dry-run",
    "transient",
    "agent-restart",
    "restarted",
];
/// Labels Prometheus adds to every scraped series (the PodMonitor's relabeling adds `node`);
/// the daemon's page cannot show them.
const TARGET_LABELS: [&str; 3] = ["node", "instance", "job"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} does not run ({e}): scripts/setup.sh installs it"));
    let said = said(&out);
    (out, said)
}

fn promtool(args: &[&str]) -> String {
    let (out, said) = run(Command::new("promtool").args(args));
    assert!(out.status.success(), "promtool {args:?}:\n{said}");
    said
}

/// A YAML file as JSON, through Debian's python3-yaml (scripts/setup.sh installs it).
fn yaml(path: &str) -> Value {
    let (out, said) = run(Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(repo(path)));
    assert!(out.status.success(), "{path} is not YAML:\n{said}");
    serde_json::from_slice(&out.stdout).expect("YAML as JSON")
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Every rule of the plain rules file.
fn rules() -> Vec<Value> {
    let file = yaml(RULES);
    let rules: Vec<Value> = array(&file["groups"])
        .iter()
        .flat_map(|g| array(&g["rules"]).iter().cloned())
        .collect();
    assert!(!rules.is_empty(), "no rules in {RULES}");
    rules
}

fn alert_names() -> Vec<String> {
    rules()
        .iter()
        .map(|r| {
            r["alert"]
                .as_str()
                .unwrap_or_else(|| panic!("{RULES}: only alerts expected: {r}"))
                .to_string()
        })
        .collect()
}

/// A Prometheus duration (`1h30m`, `15m`, `0s`).
fn duration(text: &str) -> Duration {
    let mut total = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number
            .parse()
            .unwrap_or_else(|_| panic!("duration {text:?}"));
        number.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => panic!("duration {text:?}: unit {c:?}"),
        };
    }
    assert!(number.is_empty(), "duration {text:?} without a unit");
    Duration::from_secs(total)
}

#[test]
fn the_alerts_pass_their_promtool_unit_tests() {
    let checked = promtool(&["check", "rules", repo(RULES).to_str().expect("utf-8 path")]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alert_names().len())),
        "{checked}"
    );
    let tested = promtool(&[
        "test",
        "rules",
        repo(RULE_TESTS).to_str().expect("utf-8 path"),
    ]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    evidence(&format!("promtool test rules {RULE_TESTS}: SUCCESS"));
}

/// A rule test cannot fail on an alert it never asserts: every alert needs a case in which
/// it fires, and an assertion that it is silent in the benign scenario at a time when it could
/// have fired (its `for:` plus the hour that its longest range window is allowed to be).
#[test]
fn every_alert_fires_in_a_test_and_is_silent_on_every_benign_node() {
    let tests = yaml(RULE_TESTS);
    let groups = array(&tests["tests"]);
    let benign = groups
        .iter()
        .find(|g| {
            let nodes: BTreeSet<String> = array(&g["input_series"])
                .iter()
                .filter_map(|s| s["series"].as_str())
                .filter_map(|s| s.split("node=\"").nth(1))
                .filter_map(|rest| rest.split('"').next())
                .map(str::to_string)
                .collect();
            BENIGN.iter().all(|n| nodes.contains(*n))
        })
        .unwrap_or_else(|| panic!("{RULE_TESTS}: no group with the nodes {BENIGN:?}"));
    let asserts = |g: &Value| -> Vec<(String, Duration, bool)> {
        array(&g["alert_rule_test"])
            .iter()
            .map(|t| {
                (
                    t["alertname"].as_str().unwrap_or_default().to_string(),
                    duration(t["eval_time"].as_str().unwrap_or("0s")),
                    !array(&t["exp_alerts"]).is_empty(),
                )
            })
            .collect()
    };
    for rule in rules() {
        let name = rule["alert"].as_str().expect("alert name");
        let wait = duration(rule["for"].as_str().unwrap_or("0s"));
        let fires = groups
            .iter()
            .flat_map(asserts)
            .any(|(a, _, firing)| a == name && firing);
        assert!(fires, "{name}: no test in {RULE_TESTS} in which it fires");
        let late_enough = wait + Duration::from_secs(3600);
        let silent = asserts(benign)
            .into_iter()
            .any(|(a, at, firing)| a == name && !firing && at >= late_enough);
        assert!(
            silent,
            "{name}: the benign scenario never asserts it silent at {late_enough:?} or later"
        );
    }
}

#[test]
fn the_prometheus_rule_is_the_plain_rules_file_wrapped() {
    let (out, said) = run(Command::new("bash")
        .arg(repo("scripts/prometheus-rule.sh"))
        .arg("--check"));
    assert!(out.status.success(), "{said}");
    let wrapped = yaml(PROMETHEUS_RULE);
    assert_eq!(wrapped["kind"], "PrometheusRule");
    assert_eq!(wrapped["spec"], yaml(RULES), "the same groups");
    let monitor = yaml("deploy/prometheus/podmonitor.yaml");
    assert_eq!(
        wrapped["metadata"]["namespace"],
        monitor["metadata"]["namespace"]
    );
    assert_eq!(wrapped["metadata"]["labels"], monitor["metadata"]["labels"]);
}

#[test]
fn every_alert_says_what_to_do_and_has_a_runbook_in_the_readme() {
    let readme = std::fs::read_to_string(repo("README.md")).expect("README.md");
    for rule in rules() {
        let name = rule["alert"].as_str().expect("alert name");
        for key in ["summary", "description"] {
            let text = rule["annotations"][key].as_str().unwrap_or_default();
            assert!(text.len() > 20, "{name}: no {key}");
        }
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        assert!(
            readme.contains(&format!("\n#### {name}\n")),
            "README.md: no runbook section `#### {name}`"
        );
        assert!(
            readme.contains(&format!("| [`{name}`](#")),
            "README.md: {name} is not in the alert table"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// What the queries read

/// One label matcher: name, operator, value.
type Matcher = (String, String, String);

/// What a PromQL expression reads: each selector's metric name and matchers, and the labels
/// that `by`, `without`, `on`, `ignoring` and `group_left/right` name. A lexer, not a parser:
/// promtool's parser has already accepted the expression.
#[derive(Debug, Default)]
struct Reads {
    selectors: Vec<(String, Vec<Matcher>)>,
    grouping: BTreeSet<String>,
}

/// Words that are not metric names even without a `(` after them: binary keywords, and the
/// aggregations, which may be followed by `by (...)` or `without (...)` first.
const KEYWORDS: [&str; 17] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn reads(expr: &str) -> Reads {
    let chars: Vec<char> = expr.chars().collect();
    let mut reads = Reads::default();
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            quoted(&chars, &mut i);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            panic!("{expr}: a selector without a metric name");
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            skip_space(&mut i);
            let next = chars.get(i).copied();
            if GROUPING.contains(&word.as_str()) {
                if next == Some('(') {
                    let end = chars[i..]
                        .iter()
                        .position(|&c| c == ')')
                        .map(|p| i + p)
                        .unwrap_or_else(|| panic!("{expr}: unclosed label list"));
                    let list: String = chars[i + 1..end].iter().collect();
                    reads.grouping.extend(
                        list.split(',')
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(str::to_string),
                    );
                    i = end + 1;
                }
            } else if next == Some('(') || KEYWORDS.contains(&word.as_str()) {
                // A function or an aggregation, or a binary keyword.
            } else {
                let mut matchers = Vec::new();
                if next == Some('{') {
                    i += 1;
                    matchers = label_pairs(&chars, &mut i, expr);
                }
                reads.selectors.push((word, matchers));
            }
        } else {
            i += 1;
        }
    }
    reads
}

/// A quoted string starting at `chars[*i]`; leaves `*i` after its closing quote.
fn quoted(chars: &[char], i: &mut usize) -> String {
    let quote = chars[*i];
    let mut text = String::new();
    *i += 1;
    while *i < chars.len() && chars[*i] != quote {
        if chars[*i] == '\\' && quote != '`' {
            *i += 1;
        }
        if let Some(&c) = chars.get(*i) {
            text.push(c);
        }
        *i += 1;
    }
    *i += 1;
    text
}

/// `name op "value"` pairs up to the closing `}`, starting after the `{`: label matchers in
/// a query, or a sample's labels in the exposition format.
fn label_pairs(chars: &[char], i: &mut usize, text: &str) -> Vec<Matcher> {
    let mut pairs = Vec::new();
    loop {
        while *i < chars.len() && (chars[*i].is_whitespace() || chars[*i] == ',') {
            *i += 1;
        }
        match chars.get(*i) {
            Some('}') => {
                *i += 1;
                return pairs;
            }
            None => panic!("{text}: unclosed {{"),
            _ => {}
        }
        let start = *i;
        while *i < chars.len() && (chars[*i].is_ascii_alphanumeric() || chars[*i] == '_') {
            *i += 1;
        }
        let name: String = chars[start..*i].iter().collect();
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
        let start = *i;
        while *i < chars.len() && "=!~".contains(chars[*i]) {
            *i += 1;
        }
        let op: String = chars[start..*i].iter().collect();
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
        assert!(
            matches!(chars.get(*i), Some('"' | '\'' | '`')),
            "{text}: label {name} {op} without a quoted value"
        );
        let value = quoted(chars, i);
        pairs.push((name, op, value));
    }
}

/// A scrape: sample name -> label -> values; and the metric families (`# TYPE`).
#[derive(Debug, Default)]
struct Exported {
    samples: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    families: BTreeSet<String>,
}

impl Exported {
    fn parse(page: &str) -> Exported {
        let mut exported = Exported::default();
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let family = rest.split(' ').next().unwrap_or_default();
                exported.families.insert(family.to_string());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let chars: Vec<char> = line.chars().collect();
            let end = chars
                .iter()
                .position(|&c| c == '{' || c == ' ')
                .unwrap_or(chars.len());
            let name: String = chars[..end].iter().collect();
            let labels = exported.samples.entry(name).or_default();
            if chars.get(end) == Some(&'{') {
                let mut i = end + 1;
                for (label, _, value) in label_pairs(&chars, &mut i, line) {
                    labels.entry(label).or_default().insert(value);
                }
            }
        }
        exported
    }

    fn labels(&self) -> BTreeSet<&str> {
        self.samples
            .values()
            .flat_map(|l| l.keys().map(String::as_str))
            .chain(TARGET_LABELS)
            .collect()
    }

    /// Why `expr` reads something this page does not have, if it does.
    fn check(&self, expr: &str) -> Vec<String> {
        let mut wrong = Vec::new();
        let reads = reads(expr);
        for (metric, matchers) in &reads.selectors {
            let Some(labels) = self.samples.get(metric) else {
                wrong.push(format!("metric {metric} is not exported"));
                continue;
            };
            for (label, op, value) in matchers {
                if TARGET_LABELS.contains(&label.as_str()) {
                    continue;
                }
                let Some(values) = labels.get(label) else {
                    wrong.push(format!("{metric} has no label {label}"));
                    continue;
                };
                // A regex of plain alternatives names values, each of which must exist.
                let named: Vec<&str> = if op.contains('~') {
                    let plain = value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_|".contains(c));
                    if plain {
                        value.split('|').collect()
                    } else {
                        Vec::new()
                    }
                } else {
                    vec![value.as_str()]
                };
                for v in named {
                    if !values.contains(v) {
                        wrong.push(format!("{metric}{{{label}=\"{v}\"}} is not exported"));
                    }
                }
            }
        }
        let known = self.labels();
        for label in &reads.grouping {
            if !known.contains(label.as_str()) {
                wrong.push(format!("no exported series has the label {label}"));
            }
        }
        assert!(
            !reads.selectors.is_empty(),
            "{expr}: reads no metric at all"
        );
        wrong
    }
}

/// Labels a template names: `$labels.X` in the alerts, `{{X}}` in the legends.
fn template_labels(text: &str) -> Vec<String> {
    let word = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut labels: Vec<String> = text.split("$labels.").skip(1).map(word).collect();
    if !text.contains("$labels") {
        labels.extend(
            text.split("{{")
                .skip(1)
                .map(|s| word(s.trim_start()))
                .filter(|w| !w.is_empty()),
        );
    }
    labels
}

/// The dashboard's queries, with its variables filled in as Grafana would; and its legends.
fn dashboard() -> (Value, Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(repo(DASHBOARD)).expect("the dashboard");
    let dash: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"));
    let mut exprs = Vec::new();
    let mut legends = Vec::new();
    let mut ids = BTreeSet::new();
    let mut panels: Vec<&Value> = array(&dash["panels"]).iter().collect();
    while let Some(panel) = panels.pop() {
        // Rows hold their panels while collapsed.
        panels.extend(array(&panel["panels"]));
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(panel["id"].to_string()),
            "panel id twice: {title}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            panel["datasource"]["uid"] == "${datasource}",
            "{title}: not on the data source variable"
        );
        let targets = array(&panel["targets"]);
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: a target without expr"));
            let filled = expr.replace("$node", ".+");
            assert!(!filled.contains('$'), "{title}: unknown variable in {expr}");
            exprs.push(filled);
            legends.push(t["legendFormat"].as_str().unwrap_or_default().to_string());
        }
    }
    (dash, exprs, legends)
}

#[test]
fn the_dashboard_parses_and_every_query_passes_promtool() {
    let (dash, exprs, _) = dashboard();
    let variables = array(&dash["templating"]["list"]);
    let node = variables
        .iter()
        .find(|v| v["name"] == "node")
        .expect("a node variable");
    assert_eq!(
        node["query"]["query"], "label_values(sockmap_gc_dry_run, node)",
        "the node variable lists every scraped daemon's node"
    );
    assert!(variables.iter().any(|v| v["name"] == "datasource"));
    // promtool parses rule files, not bare queries: one recording rule per query.
    let scratch = Scratch::new("alerts-dash");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, expr) in exprs.iter().enumerate() {
        let quoted = serde_json::to_string(expr).expect("JSON string");
        rules +=
            &format!("      - record: sockmap_gc_dashboard:query_{n}\n        expr: {quoted}\n");
    }
    let path = scratch.path("dashboard-rules.yaml");
    std::fs::write(&path, rules).expect("write the rules");
    let said = promtool(&["check", "rules", path.to_str().expect("utf-8 path")]);
    assert!(
        said.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{said}"
    );
    evidence(&format!(
        "{DASHBOARD}: {} queries pass promtool",
        exprs.len()
    ));
}

/// The daemon exports its whole page from the start (every label value too), so one scrape
/// after its first sweep shows every metric and label there is.
#[test]
fn alerts_and_panels_read_only_metrics_and_labels_a_running_daemon_exports() {
    let (scratch, lab) = lab_and_scratch("alerts-scrape");
    let config = write_config(&scratch, &lab, "confirm_after = \"0s\"");
    let daemon = Daemon::start(&config);
    daemon.wait_sweeps(1.0, Duration::from_secs(30));
    let page = daemon.scrape();
    daemon.stop_promptly();
    let exported = Exported::parse(&page);
    assert!(
        exported.samples.contains_key("sockmap_gc_entries"),
        "not a sockmap-gc page:\n{page}"
    );
    let known = exported.labels();
    let mut wrong = Vec::new();
    for rule in rules() {
        let name = rule["alert"].as_str().unwrap_or_default();
        let expr = rule["expr"].as_str().unwrap_or_default();
        wrong.extend(
            exported
                .check(expr)
                .into_iter()
                .map(|w| format!("{name}: {w}")),
        );
        for text in [
            &rule["annotations"]["summary"],
            &rule["annotations"]["description"],
        ] {
            for label in template_labels(text.as_str().unwrap_or_default()) {
                if !known.contains(label.as_str()) {
                    wrong.push(format!("{name}: its annotations name the label {label}"));
                }
            }
        }
    }
    let (_, exprs, legends) = dashboard();
    let mut read = BTreeSet::new();
    for expr in &exprs {
        wrong.extend(
            exported
                .check(expr)
                .into_iter()
                .map(|w| format!("{expr}: {w}")),
        );
        read.extend(reads(expr).selectors.into_iter().map(|(m, _)| m));
    }
    for legend in &legends {
        for label in template_labels(legend) {
            if !known.contains(label.as_str()) {
                wrong.push(format!("legend {legend:?} names the label {label}"));
            }
        }
    }
    // And the other way round: a metric the daemon exports has a panel.
    for family in &exported.families {
        if !read.iter().any(|m| m.starts_with(family.as_str())) {
            wrong.push(format!("the metric {family} has no panel in {DASHBOARD}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "against the daemon's page:\n{}\n\npage:\n{page}",
        wrong.join("\n")
    );
    evidence(&format!(
        "{} alert and {} panel queries read only what the daemon exports ({} metric families)",
        rules().len(),
        exprs.len(),
        exported.families.len()
    ));
}

#[test]
fn the_query_reader_finds_what_a_query_reads() {
    let r = reads(
        "sum by (le, node) (rate(m_bucket{a=\"x\", b=~\"y|z\"}[5m])) > 0 unless ignoring (g) \
         n{c!=\"w\"} and on() time() - p offset 5m",
    );
    let names: Vec<&str> = r.selectors.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(names, ["m_bucket", "n", "p"]);
    assert_eq!(r.selectors[0].1[1], ("b".into(), "=~".into(), "y|z".into()));
    assert_eq!(r.grouping, ["g", "le", "node"].map(String::from).into());
    let page = Exported::parse(
        "# TYPE m counter\nm_total{a=\"x\",b=\"y\"} 1\nm_total{a=\"w\",b=\"z\"} 0\n",
    );
    assert!(page
        .check("m_total{a=\"x\", b=~\"y|z\", node=~\".+\"}")
        .is_empty());
    assert_eq!(page.check("m_total{a=\"v\"}").len(), 1);
    assert_eq!(page.check("m_total{c=\"x\"}").len(), 1);
    assert_eq!(page.check("rate(q_total[5m])").len(), 1);
    assert_eq!(page.check("sum by (d) (m_total)").len(), 1);
    assert_eq!(
        template_labels("on {{ with $labels.node }}{{ . }}{{ end }}"),
        ["node"]
    );
    assert_eq!(
        template_labels("{{node}} {{ verdict }}"),
        ["node", "verdict"]
    );
}
