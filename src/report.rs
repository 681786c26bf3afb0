//! Renders an observation for people (a table that pastes into a ticket) and for scripts (JSON).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;

use serde::Serialize;

use crate::guard::Guard;
use crate::holder::{
    summarize, Classified, Diagnosis, Holder, HolderClass, HolderProcess, HolderSummary, ScanInfo,
    ScanMethod, StaleHolders, UnknownHolder,
};
use crate::key::RawKey;
use crate::observation::{Filter, Judged, Observation};
use crate::socket::TcpState;
use crate::sweep::{Interrupted, SweepReport};
use crate::verdict::Verdict;

/// Where the map came from, as the report names it.
#[derive(Debug, Clone, Serialize)]
pub struct MapSource {
    pub path: String,
    pub id: u32,
    #[serde(rename = "type")]
    pub map_type: String,
    pub max_entries: u32,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub entries: usize,
    pub live: usize,
    pub stale: usize,
    pub unknown: usize,
    /// Stale entries by the held socket's remote IP (the key's A address), as the incident
    /// report grepped the map by node IP.
    pub stale_by_remote_ip: BTreeMap<String, usize>,
}

impl Summary {
    pub fn of<'a>(entries: impl IntoIterator<Item = &'a Judged>) -> Summary {
        let mut s = Summary::default();
        for e in entries {
            s.entries += 1;
            match &e.verdict {
                Verdict::Live(_) => s.live += 1,
                Verdict::Unknown(_) => s.unknown += 1,
                Verdict::Stale(_) => {
                    s.stale += 1;
                    let ip = e
                        .key()
                        .as_ref()
                        .map(|k| k.remote.ip().to_string())
                        .unwrap_or_else(|_| "?".to_string());
                    *s.stale_by_remote_ip.entry(ip).or_default() += 1;
                }
            }
        }
        s
    }
}

#[derive(Debug, Serialize)]
pub struct JsonEntry {
    /// The raw 44 bytes as 88 lowercase hex characters.
    pub key: String,
    pub family: Option<String>,
    pub local: Option<String>,
    pub remote: Option<String>,
    pub verdict: &'static str,
    pub reason: String,
    pub reason_code: &'static str,
    /// The socket the entry holds, when identity is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<JsonSocket>,
    /// Who keeps the socket of a stale entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<JsonHolder>,
}

/// A stale entry's holder class, why, and the processes holding its socket.
#[derive(Debug, Serialize)]
pub struct JsonHolder {
    pub class: HolderClass,
    /// Why the holder is not known, for `holder-unknown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<UnknownHolder>,
    /// The fact and the fix.
    pub reason: String,
    pub holders: Vec<Holder>,
}

impl JsonHolder {
    pub fn of(d: &Diagnosis) -> JsonHolder {
        JsonHolder {
            class: d.class(),
            unknown: d.classified.unknown,
            reason: d.classified.reason(),
            holders: d.holders.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct JsonSocket {
    pub cookie: u64,
    /// The held socket's own ends.
    pub local: String,
    pub remote: String,
    pub state: TcpState,
    pub netns_inode: u64,
    /// The inode of the file that refers to the socket (`ls -l /proc/PID/fd` shows
    /// `socket:[INODE]`); 0 when none does.
    pub inode: u64,
    /// `SOCK_DEAD`: its application closed it.
    pub orphaned: bool,
    /// Its pending error (`sk_err`), e.g. `ECONNRESET`, unless none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl JsonEntry {
    /// `e` with its holder diagnosis, when it has one (stale entries, after the holder pass).
    pub fn of(e: &Judged, holder: Option<&Diagnosis>) -> JsonEntry {
        let key = e.key().ok();
        JsonEntry {
            key: e.raw.to_hex(),
            family: key.map(|k| k.family.to_string()),
            local: key.map(|k| k.local.to_string()),
            remote: key.map(|k| k.remote.to_string()),
            verdict: e.verdict.label(),
            reason: e.verdict.to_string(),
            reason_code: e.verdict.reason_code(),
            socket: e.held.map(|h| JsonSocket {
                cookie: h.cookie,
                local: h.local.to_string(),
                remote: h.remote.to_string(),
                state: h.state,
                netns_inode: h.netns_inode,
                inode: h.inode,
                orphaned: h.orphaned,
                error: (h.error != 0).then(|| errno_name(h.error)),
            }),
            holder: holder.map(JsonHolder::of),
        }
    }
}

/// `ECONNRESET` for 104: the kernel's name of an errno.
fn errno_name(errno: i32) -> String {
    format!("{:?}", nix::errno::Errno::from_raw(errno))
}

#[derive(Debug, Serialize)]
pub struct JsonInventory {
    /// Whether the socket behind each entry was read (the sockmap iterator).
    pub identity: bool,
    pub namespaces_read: usize,
    pub namespaces_vanished: usize,
    pub procfs_tables: usize,
    pub sockets: usize,
    /// With identity: the tuples looked up exactly instead of dumping every namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub looked_up: Option<usize>,
    pub complete: bool,
    pub unreadable: Vec<JsonUnreadable>,
}

#[derive(Debug, Serialize)]
pub struct JsonUnreadable {
    pub namespace: String,
    pub error: String,
}

impl JsonInventory {
    pub fn of(o: &Observation) -> JsonInventory {
        JsonInventory {
            identity: o.identity,
            namespaces_read: o.namespaces_read,
            namespaces_vanished: o.namespaces_vanished,
            procfs_tables: o.procfs_tables,
            sockets: o.sockets,
            looked_up: o.lookups.map(|l| l.asked),
            complete: o.is_complete(),
            unreadable: o
                .unreadable
                .iter()
                .map(|u| JsonUnreadable {
                    namespace: u.what.clone(),
                    error: u.error.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AuditJson<'a> {
    pub map: MapSource,
    pub inventory: JsonInventory,
    pub entries: JsonEntries<'a>,
    pub summary: Summary,
    /// The selected stale entries counted by holder, once the holder pass ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_by_holder: Option<JsonStaleByHolder>,
}

/// "Stale by holder" for scripts.
#[derive(Debug, Serialize)]
pub struct JsonStaleByHolder {
    /// Stale entries per holder class.
    pub by_class: BTreeMap<&'static str, usize>,
    pub top_processes: Vec<JsonHolderCount>,
    pub top_pods: Vec<JsonPodCount>,
    /// How the holders were searched; absent when no stale socket had a file to look for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<JsonHolderSearch>,
}

#[derive(Debug, Serialize)]
pub struct JsonHolderCount {
    #[serde(flatten)]
    pub process: HolderProcess,
    pub entries: usize,
}

#[derive(Debug, Serialize)]
pub struct JsonPodCount {
    pub pod_uid: String,
    pub entries: usize,
}

#[derive(Debug, Serialize)]
pub struct JsonHolderSearch {
    pub method: ScanMethod,
    /// Whether every process was looked at.
    pub complete: bool,
    pub notes: Vec<String>,
    pub ms: u128,
}

impl JsonStaleByHolder {
    pub fn of(s: HolderSummary, search: Option<&ScanInfo>) -> JsonStaleByHolder {
        JsonStaleByHolder {
            by_class: s.by_class.iter().map(|(c, n)| (c.as_str(), *n)).collect(),
            top_processes: s
                .top_processes
                .into_iter()
                .map(|(process, entries)| JsonHolderCount { process, entries })
                .collect(),
            top_pods: s
                .top_pods
                .into_iter()
                .map(|(pod_uid, entries)| JsonPodCount { pod_uid, entries })
                .collect(),
            search: search.map(|i| JsonHolderSearch {
                method: i.method,
                complete: i.complete,
                notes: i.notes.clone(),
                ms: i.took.as_millis(),
            }),
        }
    }
}

/// How many processes and pods "stale by holder" names.
pub const TOP_HOLDERS: usize = 5;

/// The selected entries' "stale by holder", once the holder pass ran.
pub fn stale_by_holder(o: &Observation, entries: &[&Judged]) -> Option<HolderSummary> {
    let holders = o.holders.as_ref()?;
    let diagnoses = entries.iter().filter_map(|e| holders.of(&e.raw));
    Some(summarize(diagnoses, TOP_HOLDERS))
}

/// The selected entries, each turned into a [`JsonEntry`] only as it is written: a full
/// map's entries as JSON values would take several times the memory of the entries.
#[derive(Debug)]
pub struct JsonEntries<'a>(Vec<&'a Judged>, Option<&'a StaleHolders>);

impl JsonEntries<'_> {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for JsonEntries<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            self.0
                .iter()
                .map(|e| JsonEntry::of(e, self.1.and_then(|h| h.of(&e.raw)))),
        )
    }
}

/// The entries an operator asked about, in a stable order: stale first, then by key.
pub fn selected<'a>(o: &'a Observation, filter: &Filter) -> Vec<&'a Judged> {
    let mut v: Vec<&Judged> = o.entries.iter().filter(|e| filter.selects(e)).collect();
    // Keys are unique, so an unstable sort gives the same order, without copying keys.
    v.sort_unstable_by(|a, b| {
        verdict_rank(&a.verdict)
            .cmp(&verdict_rank(&b.verdict))
            .then_with(|| a.raw.cmp(&b.raw))
    });
    v
}

fn verdict_rank(v: &Verdict) -> u8 {
    match v {
        Verdict::Stale(_) => 0,
        Verdict::Unknown(_) => 1,
        Verdict::Live(_) => 2,
    }
}

pub fn audit_json<'a>(source: &MapSource, o: &'a Observation, filter: &Filter) -> AuditJson<'a> {
    let entries = selected(o, filter);
    let search = o.holders.as_ref().and_then(|h| h.scan.as_ref());
    AuditJson {
        map: source.clone(),
        inventory: JsonInventory::of(o),
        summary: Summary::of(entries.iter().copied()),
        stale_by_holder: stale_by_holder(o, &entries).map(|s| JsonStaleByHolder::of(s, search)),
        entries: JsonEntries(entries, o.holders.as_ref()),
    }
}

/// The map and inventory header lines shared by audit and sweep.
pub fn header(source: &MapSource, o: &Observation) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "map        {} (id {}, {}, {} of {} entries)",
        source.path,
        source.id,
        source.map_type,
        o.entries.len(),
        source.max_entries
    );
    let mut extra = String::new();
    if o.procfs_tables > 0 {
        let _ = write!(
            extra,
            ", {} more TCP tables read from /proc/PID/net (namespace file denied)",
            o.procfs_tables
        );
    }
    if o.namespaces_vanished > 0 {
        let _ = write!(
            extra,
            ", {} vanished during the walk",
            o.namespaces_vanished
        );
    }
    match o.lookups {
        Some(l) => {
            if l.unreached_namespaces > 0 {
                let _ = write!(
                    extra,
                    ", {} held sockets' namespaces not reachable by any path",
                    l.unreached_namespaces
                );
            }
            let _ = writeln!(
                out,
                "inventory  {} connection tuples looked up in {} network namespaces, {} sockets found{extra} ({} ms)",
                l.asked,
                o.namespaces_read,
                o.sockets,
                o.took.as_millis()
            );
        }
        None => {
            let _ = writeln!(
                out,
                "inventory  {} sockets in {} network namespaces{extra} ({} ms)",
                o.sockets,
                o.namespaces_read,
                o.took.as_millis()
            );
        }
    }
    let _ = writeln!(
        out,
        "identity   {}",
        if o.identity {
            "on: the socket behind each entry was read (BPF sockmap iterator)"
        } else {
            "off: tuple evidence only (see --identity)"
        }
    );
    if let Some(scan) = o.holders.as_ref().and_then(|h| h.scan.as_ref()) {
        let how = match scan.method {
            ScanMethod::Iterator => "the BPF task_file iterator",
            ScanMethod::Procfs => "/proc/PID/fd",
        };
        let _ = writeln!(
            out,
            "holders    stale sockets' holders searched through {how}{} ({} ms){}",
            if scan.complete { "" } else { ", INCOMPLETE" },
            scan.took.as_millis(),
            scan.notes
                .iter()
                .map(|n| format!("\n           {n}"))
                .collect::<String>()
        );
    }
    if !o.is_complete() {
        let _ = writeln!(
            out,
            "INCOMPLETE {} namespace(s) could not be read; entries without a found socket are 'unknown', not 'stale':",
            o.unreadable.len()
        );
        for u in &o.unreadable {
            let _ = writeln!(out, "           {}: {}", u.what, u.error);
        }
    }
    out
}

/// The table for people.
/// Writes the audit table: header, one line per selected entry, summary, the stale keys.
/// Written as it goes, not built first: a full map makes a table of several megabytes.
pub fn write_audit_table(
    out: &mut dyn io::Write,
    source: &MapSource,
    o: &Observation,
    filter: &Filter,
) -> io::Result<()> {
    let entries = selected(o, filter);
    out.write_all(header(source, o).as_bytes())?;
    if !filter.is_empty() {
        writeln!(
            out,
            "filter     local {} remote {}",
            ip_or_any(filter.local),
            ip_or_any(filter.remote)
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<8} {:<6} {:<45} {:<45} {:<HOLDER_WIDTH$} REASON",
        "VERDICT", "FAMILY", "LOCAL (held socket)", "REMOTE", "HOLDER"
    )?;
    for e in &entries {
        // Written through the formatter, with no String per field: a full map is 65,535 rows
        // (only a stale entry's holder is a String: they are few).
        let holder = o.holders.as_ref().and_then(|h| h.of(&e.raw));
        let holder = holder.map_or_else(|| "-".to_string(), Diagnosis::column);
        match e.key() {
            Ok(k) => writeln!(
                out,
                "{:<8} {:<6} {:<45} {:<45} {:<HOLDER_WIDTH$} {}",
                e.verdict.label(),
                k.family,
                k.local,
                k.remote,
                holder,
                e.verdict
            )?,
            Err(_) => writeln!(
                out,
                "{:<8} {:<6} {:<45} {:<45} {:<HOLDER_WIDTH$} {}",
                e.verdict.label(),
                "?",
                "-",
                "-",
                holder,
                e.verdict
            )?,
        }
    }
    let summary = Summary::of(entries.iter().copied());
    writeln!(out)?;
    out.write_all(summary_lines(&summary).as_bytes())?;
    if let Some(by_holder) = stale_by_holder(o, &entries) {
        out.write_all(holder_lines(&by_holder).as_bytes())?;
        writeln!(out, "why, and what to do:")?;
        for c in holder_reasons(o, &entries) {
            writeln!(out, "  {}", c.reason())?;
        }
    }
    let mut stale = entries.iter().filter(|e| e.verdict.is_stale()).peekable();
    if stale.peek().is_some() {
        writeln!(
            out,
            "\nstale keys (as bpftool takes them; `sockmap-gc sweep` deletes them with guards):"
        )?;
        for e in stale {
            writeln!(out, "  {}", e.raw.to_bpftool_hex())?;
        }
    }
    Ok(())
}

/// The holder column's width: `pid 4242 nginx, pod 7c1e3f4a… ctr 0123456789ab…` fits.
const HOLDER_WIDTH: usize = 56;

/// "Stale by holder": counts per class, the top processes and pods.
pub fn holder_lines(s: &HolderSummary) -> String {
    let mut out = String::from("stale by holder:\n");
    for (class, n) in &s.by_class {
        let _ = writeln!(out, "  {:<40} {n}", class.as_str());
    }
    if !s.top_processes.is_empty() {
        out.push_str("  top processes:\n");
        for (p, n) in &s.top_processes {
            let _ = writeln!(out, "    {:<78} {n}", p.to_string());
        }
    }
    if !s.top_pods.is_empty() {
        out.push_str("  top pods:\n");
        for (uid, n) in &s.top_pods {
            let _ = writeln!(out, "    pod {uid:<74} {n}");
        }
    }
    out
}

/// The holder classes of the selected stale entries, each once: their facts and fixes.
pub fn holder_reasons(o: &Observation, entries: &[&Judged]) -> Vec<Classified> {
    let Some(holders) = o.holders.as_ref() else {
        return Vec::new();
    };
    let present: HashSet<Classified> = entries
        .iter()
        .filter_map(|e| holders.of(&e.raw))
        .map(|d| d.classified)
        .collect();
    let mut out: Vec<Classified> = present.into_iter().collect();
    out.sort_by_key(|c| {
        (
            HolderClass::ALL.iter().position(|k| *k == c.class),
            c.unknown
                .and_then(|u| UnknownHolder::ALL.iter().position(|k| *k == u)),
        )
    });
    out
}

pub fn summary_lines(s: &Summary) -> String {
    let mut out = format!(
        "summary    {} entries: {} live, {} stale, {} unknown\n",
        s.entries, s.live, s.stale, s.unknown
    );
    if !s.stale_by_remote_ip.is_empty() {
        let mut by: Vec<(&String, &usize)> = s.stale_by_remote_ip.iter().collect();
        by.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        out.push_str("stale by remote IP:\n");
        for (ip, n) in by {
            let _ = writeln!(out, "  {ip:<40} {n}");
        }
    }
    out
}

fn ip_or_any(ip: Option<IpAddr>) -> String {
    ip.map_or_else(|| "any".to_string(), |ip| ip.to_string())
}

/// One guard's line in a sweep's summary.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GuardOutcome {
    pub guard: Guard,
    pub acted: bool,
    pub detail: String,
}

/// What each guard did in this sweep; every guard is listed, acted or not.
pub fn guard_outcomes(r: &SweepReport) -> Vec<GuardOutcome> {
    let mut v = vec![GuardOutcome {
        guard: Guard::DryRun,
        acted: r.dry_run,
        detail: if r.dry_run {
            format!(
                "nothing deleted; {} entries would be (run with --execute to delete)",
                r.plan.delete.len()
            )
        } else {
            "off (--execute)".to_string()
        },
    }];
    v.push(GuardOutcome {
        guard: Guard::Confirmation,
        acted: r.plan.unconfirmed > 0,
        detail: format!(
            "{} stale entries were not yet stale in the first observation {} ms earlier; left for the next sweep",
            r.plan.unconfirmed,
            r.apart.as_millis()
        ),
    });
    v.push(GuardOutcome {
        guard: Guard::MaxDeletes,
        acted: r.plan.over_cap > 0,
        detail: format!(
            "{} confirmed stale entries over the cap; left for the next sweep",
            r.plan.over_cap
        ),
    });
    v.push(GuardOutcome {
        guard: Guard::RateLimit,
        acted: r.rate_limit.is_some() && !r.deleted.is_empty(),
        detail: match r.rate_limit {
            Some(rate) => format!(
                "{rate} deletions/s: {} deletions in {:.3} s",
                r.deleted.len() + r.already_gone.len(),
                r.delete_phase.as_secs_f64()
            ),
            None => "off".to_string(),
        },
    });
    v.push(GuardOutcome {
        guard: Guard::Recheck,
        acted: !r.spared.is_empty(),
        detail: format!(
            "{} entries spared: the re-check just before the delete found a live owner",
            r.spared.len()
        ),
    });
    let (acted, detail) = match (&r.plan.hold, &r.interrupted) {
        (Some(hold), _) => (true, format!("{}: {hold}", hold.guard())),
        (None, Some(Interrupted::RecheckIncomplete { unreadable })) => (
            true,
            format!(
                "the re-check inventory could not read {unreadable} namespace(s): stopped deleting"
            ),
        ),
        _ => (
            false,
            "evidence complete, same map, inventory steady".to_string(),
        ),
    };
    v.push(GuardOutcome {
        guard: Guard::FailClosed,
        acted,
        detail,
    });
    v
}

#[derive(Debug, Serialize)]
pub struct SweepSummary {
    pub seen: usize,
    pub stale: usize,
    pub confirmed: usize,
    pub deleted: usize,
    pub already_gone: usize,
    pub spared: usize,
    pub failed: usize,
    pub unconfirmed: usize,
    pub over_cap: usize,
    pub left_behind: usize,
    pub rate_limit: Option<u32>,
    pub delete_phase_seconds: f64,
    pub took_seconds: f64,
    pub interrupted: Option<Interrupted>,
}

#[derive(Debug, Serialize)]
pub struct SweepJson {
    pub map: MapSource,
    pub dry_run: bool,
    pub inventory: JsonInventory,
    pub summary: SweepSummary,
    pub guards: Vec<GuardOutcome>,
    /// Keys deleted, as 88 hex characters.
    pub deleted: Vec<String>,
    /// Keys the guards allowed: deleted unless it was a dry run.
    pub planned: Vec<JsonEntry>,
}

pub fn sweep_summary(r: &SweepReport) -> SweepSummary {
    SweepSummary {
        seen: r.second.entries.len(),
        stale: r.plan.stale,
        confirmed: r.plan.delete.len() + r.plan.over_cap,
        deleted: r.deleted.len(),
        already_gone: r.already_gone.len(),
        spared: r.spared.len(),
        failed: r.failed.len(),
        unconfirmed: r.plan.unconfirmed,
        over_cap: r.plan.over_cap,
        left_behind: r.left_behind(),
        rate_limit: r.rate_limit.map(|n| n.get()),
        delete_phase_seconds: r.delete_phase.as_secs_f64(),
        took_seconds: r.took.as_secs_f64(),
        interrupted: r.interrupted.clone(),
    }
}

fn planned_entries(r: &SweepReport) -> Vec<JsonEntry> {
    let planned: HashSet<&RawKey> = r.plan.delete.iter().collect();
    let by_key: HashMap<RawKey, &Judged> = r
        .second
        .entries
        .iter()
        .filter(|e| planned.contains(&e.raw))
        .map(|e| (e.raw, e))
        .collect();
    r.plan
        .delete
        .iter()
        .filter_map(|k| {
            by_key.get(k).map(|e| {
                let holder = r.second.holders.as_ref().and_then(|h| h.of(k));
                JsonEntry::of(e, holder)
            })
        })
        .collect()
}

pub fn sweep_json(source: &MapSource, r: &SweepReport) -> SweepJson {
    SweepJson {
        map: source.clone(),
        dry_run: r.dry_run,
        inventory: JsonInventory::of(&r.second),
        summary: sweep_summary(r),
        guards: guard_outcomes(r),
        deleted: r.deleted.iter().map(RawKey::to_hex).collect(),
        planned: planned_entries(r),
    }
}

pub fn sweep_text(source: &MapSource, r: &SweepReport) -> String {
    let mut out = header(source, &r.second);
    let planned = planned_entries(r);
    out.push('\n');
    if r.dry_run {
        let _ = writeln!(
            out,
            "DRY RUN: would delete {} entries (run with --execute to delete):",
            planned.len()
        );
    } else {
        let _ = writeln!(out, "planned deletions ({}):", planned.len());
    }
    for e in &planned {
        let _ = writeln!(
            out,
            "  {:<6} {:<45} {:<45} {}",
            e.family.as_deref().unwrap_or("?"),
            e.local.as_deref().unwrap_or("-"),
            e.remote.as_deref().unwrap_or("-"),
            e.reason
        );
    }
    let s = sweep_summary(r);
    out.push('\n');
    let _ = writeln!(
        out,
        "summary    seen {}, stale {}, confirmed {}, deleted {}, already gone {}, spared {}, failed {}, left behind {}",
        s.seen, s.stale, s.confirmed, s.deleted, s.already_gone, s.spared, s.failed, s.left_behind
    );
    let _ = writeln!(
        out,
        "time       {:.3} s in all, delete phase {:.3} s",
        s.took_seconds, s.delete_phase_seconds
    );
    if let Some(Interrupted::Signal) = &r.interrupted {
        let _ = writeln!(out, "STOPPED    by a signal between two deletes");
    }
    for g in guard_outcomes(r).iter().filter(|g| g.acted) {
        let _ = writeln!(out, "guard      {}: {}", g.guard, g.detail);
    }
    for (key, error) in &r.failed {
        let _ = writeln!(out, "FAILED     {}: {error}", key.to_hex());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{KeyError, RawKey, SockKey};
    use crate::verdict::{LiveReason, StaleReason, UnknownReason};
    use std::time::Duration;

    fn judged(local: &str, remote: &str, verdict: Verdict) -> Judged {
        let key = SockKey::for_socket(local.parse().expect("a"), remote.parse().expect("a"))
            .expect("family");
        Judged {
            raw: key.encode(),
            held: None,
            verdict,
        }
    }

    fn observation() -> Observation {
        Observation {
            map_id: 7,
            identity: false,
            entries: vec![
                judged(
                    "10.0.1.2:8080",
                    "10.0.1.1:40000",
                    Verdict::Stale(StaleReason::NoSocket { namespaces: 2 }),
                ),
                judged(
                    "10.0.2.2:8080",
                    "10.0.1.1:40001",
                    Verdict::Stale(StaleReason::OnlyTimeWait),
                ),
                judged(
                    "10.0.1.1:40002",
                    "10.0.1.2:8080",
                    Verdict::Live(LiveReason::TupleOwned),
                ),
                judged(
                    "[fd00::2]:80",
                    "[fd00::1]:5000",
                    Verdict::Stale(StaleReason::NoSocket { namespaces: 2 }),
                ),
                Judged {
                    raw: RawKey([0; 44]),
                    held: None,
                    verdict: Verdict::Unknown(UnknownReason::Undecodable(KeyError::Family(0))),
                },
            ],
            namespaces_read: 2,
            namespaces_vanished: 0,
            procfs_tables: 0,
            unreadable: vec![],
            sockets: 10,
            lookups: None,
            per_netns: Default::default(),
            took: Duration::from_millis(3),
            holders: None,
        }
    }

    fn source() -> MapSource {
        MapSource {
            path: "/sys/fs/bpf/x".into(),
            id: 7,
            map_type: "sockhash".into(),
            max_entries: 65535,
        }
    }

    #[test]
    fn summary_counts_and_groups_by_remote_ip() {
        let o = observation();
        let s = Summary::of(&o.entries);
        assert_eq!((s.entries, s.live, s.stale, s.unknown), (5, 1, 3, 1));
        assert_eq!(s.stale_by_remote_ip.get("10.0.1.1"), Some(&2));
        assert_eq!(s.stale_by_remote_ip.get("fd00::1"), Some(&1));
    }

    #[test]
    fn json_follows_the_contract() {
        let o = observation();
        let v = serde_json::to_value(audit_json(&source(), &o, &Filter::default()))
            .expect("serialises");
        let entries = v["entries"].as_array().expect("entries");
        assert_eq!(entries.len(), 5);
        for e in entries {
            let key = e["key"].as_str().expect("key");
            assert_eq!(key.len(), 88);
            assert!(key
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
            assert!(["live", "stale", "unknown"].contains(&e["verdict"].as_str().expect("v")));
            assert!(e["reason"].is_string());
        }
        assert_eq!(entries[0]["verdict"], "stale");
        let v6 = entries
            .iter()
            .find(|e| e["family"] == "ipv6")
            .expect("ipv6 entry");
        assert_eq!(v6["local"], "[fd00::2]:80");
        assert_eq!(v["summary"]["stale"], 3);
        assert_eq!(v["summary"]["entries"], 5);
        assert_eq!(v["inventory"]["complete"], true);
        let bad = entries
            .iter()
            .find(|e| e["verdict"] == "unknown")
            .expect("bad");
        assert!(bad["local"].is_null());
    }

    #[test]
    fn filter_narrows_entries_and_summary() {
        let o = observation();
        let filter = Filter {
            local: Some("10.0.2.2".parse().expect("ip")),
            remote: None,
        };
        let j = audit_json(&source(), &o, &filter);
        assert_eq!(j.entries.len(), 1);
        assert_eq!(j.summary.stale, 1);
    }

    /// The observation with its three stale entries diagnosed: two kept by one process in
    /// a pod, one in an accept queue.
    fn diagnosed() -> Observation {
        use crate::holder::{kubepods, PodCgroup, StaleHolders};
        let mut o = observation();
        let nginx = Holder {
            pid: 4242,
            fd: 7,
            comm: "nginx".into(),
            cgroup: Some("/kubepods/pod7c1e3f4a-1b2c-4d5e-8f90-a1b2c3d4e5f6/c0ffee".into()),
            pod: Some(PodCgroup {
                pod_uid: "7c1e3f4a-1b2c-4d5e-8f90-a1b2c3d4e5f6".into(),
                qos: kubepods::QosClass::Guaranteed,
                container: None,
            }),
        };
        let kept = |holders| Diagnosis {
            classified: Classified {
                class: HolderClass::AppKeepsFd,
                unknown: None,
            },
            holders,
        };
        let stale: Vec<RawKey> = o
            .entries
            .iter()
            .filter(|e| e.verdict.is_stale())
            .map(|e| e.raw)
            .collect();
        let by_key = [
            (stale[0], kept(vec![nginx.clone()])),
            (stale[1], kept(vec![nginx])),
            (
                stale[2],
                Diagnosis {
                    classified: Classified {
                        class: HolderClass::AcceptQueue,
                        unknown: None,
                    },
                    holders: vec![],
                },
            ),
        ]
        .into_iter()
        .collect();
        o.holders = Some(StaleHolders {
            by_key,
            scan: Some(ScanInfo {
                method: ScanMethod::Iterator,
                complete: true,
                notes: vec![],
                took: Duration::from_millis(4),
            }),
        });
        o
    }

    #[test]
    fn the_table_names_holders_and_counts_them() {
        let t = table(&diagnosed());
        assert!(t.contains("HOLDER"), "{t}");
        assert!(
            t.contains("holders    stale sockets' holders searched through the BPF task_file iterator (4 ms)"),
            "{t}"
        );
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("stale    ")).collect();
        assert_eq!(rows.len(), 3, "{t}");
        assert_eq!(
            rows.iter()
                .filter(|r| r.contains("pid 4242 nginx, pod 7c1e3f4a…"))
                .count(),
            2,
            "{t}"
        );
        assert_eq!(
            rows.iter().filter(|r| r.contains("accept-queue")).count(),
            1
        );
        let summary = t.split("stale by holder:\n").nth(1).expect("the summary");
        assert!(summary.starts_with("  app-keeps-fd"), "{summary}");
        assert!(summary.contains("pid 4242 nginx (pod 7c1e3f4a-1b2c-4d5e-8f90-a1b2c3d4e5f6)"));
        assert!(summary.contains("pod 7c1e3f4a-1b2c-4d5e-8f90-a1b2c3d4e5f6"));
        assert!(
            t.contains("accept-queue: no file refers to the socket"),
            "{t}"
        );
        assert!(!table(&observation()).contains("stale by holder"));
    }

    #[test]
    fn json_has_a_holder_on_each_stale_entry_and_the_summary() {
        let o = diagnosed();
        let v = serde_json::to_value(audit_json(&source(), &o, &Filter::default()))
            .expect("serialises");
        for e in v["entries"].as_array().expect("entries") {
            assert_eq!(e["holder"].is_object(), e["verdict"] == "stale", "{e}");
        }
        let kept = v["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .find(|e| e["holder"]["class"] == "app-keeps-fd")
            .expect("an app-keeps-fd entry");
        let h = &kept["holder"]["holders"][0];
        assert_eq!(
            (h["pid"].as_u64(), h["comm"].as_str()),
            (Some(4242), Some("nginx"))
        );
        assert_eq!(h["pod"]["pod_uid"], "7c1e3f4a-1b2c-4d5e-8f90-a1b2c3d4e5f6");
        assert!(kept["holder"]["reason"]
            .as_str()
            .expect("reason")
            .starts_with("app-keeps-fd: "));
        let by = &v["stale_by_holder"];
        assert_eq!(by["by_class"]["app-keeps-fd"], 2);
        assert_eq!(by["by_class"]["accept-queue"], 1);
        assert_eq!(by["top_processes"][0]["pid"], 4242);
        assert_eq!(by["top_processes"][0]["entries"], 2);
        assert_eq!(by["top_pods"][0]["entries"], 2);
        assert_eq!(by["search"]["method"], "iterator");
        let plain = serde_json::to_value(audit_json(&source(), &observation(), &Filter::default()))
            .expect("serialises");
        assert!(plain.get("stale_by_holder").is_none());
    }

    fn table(o: &Observation) -> String {
        let mut out = Vec::new();
        write_audit_table(&mut out, &source(), o, &Filter::default()).expect("writes");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn table_lists_every_entry_and_the_stale_keys() {
        let o = observation();
        let t = table(&o);
        assert!(t.contains("10.0.1.2:8080"));
        assert!(t.contains("summary    5 entries: 1 live, 3 stale, 1 unknown"));
        assert!(t.contains(&o.entries[0].raw.to_bpftool_hex()));
        assert!(!t.contains("INCOMPLETE"));
    }

    #[test]
    fn incomplete_inventory_is_shouted() {
        let mut o = observation();
        o.unreadable.push(crate::observation::Unreadable {
            what: "pid 42".into(),
            error: "permission denied".into(),
        });
        let t = table(&o);
        assert!(t.contains("INCOMPLETE 1 namespace(s)"));
        assert!(t.contains("pid 42: permission denied"));
    }
}
