//! The audit as a text table for people: header, one line per entry, summary, the stale keys.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;

use super::{
    holder_lines, holder_reasons, select, warm, write_rows, MapSource, Row, Selection, Summary,
    ROWS_PER_CHUNK,
};
use crate::holder::ScanMethod;
use crate::observation::{Filter, Observation};

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
pub fn write_audit_table<W: io::Write + ?Sized>(
    out: &mut W,
    source: &MapSource,
    o: &Observation,
    filter: &Filter,
) -> io::Result<()> {
    let Selection {
        rows,
        summary,
        by_holder,
    } = select(o, filter);
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
    write_rows(out, &rows, ROWS_PER_CHUNK, |out, _, rows| {
        warm(rows);
        for row in rows {
            write_row(out, row)?;
        }
        Ok(())
    })?;
    writeln!(out)?;
    out.write_all(summary_lines(&summary).as_bytes())?;
    if let Some(by_holder) = by_holder {
        out.write_all(holder_lines(&by_holder).as_bytes())?;
        writeln!(out, "why, and what to do:")?;
        for c in holder_reasons(&rows) {
            writeln!(out, "  {}", c.reason())?;
        }
    }
    let mut stale = rows
        .iter()
        .map(|r| r.entry)
        .filter(|e| e.verdict.is_stale())
        .peekable();
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

/// One row of the table. Written through the formatter, with no String per field: a full
/// map is 65,535 rows (only a stale entry's holder is a String: they are few).
fn write_row<W: io::Write + ?Sized>(out: &mut W, row: &Row) -> io::Result<()> {
    let e = row.entry;
    let holder = row
        .holder
        .map_or(Cow::Borrowed("-"), |d| Cow::Owned(d.column()));
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
        ),
        Err(_) => writeln!(
            out,
            "{:<8} {:<6} {:<45} {:<45} {:<HOLDER_WIDTH$} {}",
            e.verdict.label(),
            "?",
            "-",
            "-",
            holder,
            e.verdict
        ),
    }
}

/// The holder column's width: `pid 4242 nginx, pod 7c1e3f4a… ctr 0123456789ab…` fits.
const HOLDER_WIDTH: usize = 56;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixtures::{diagnosed, observation, source};

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
