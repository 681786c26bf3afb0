//! "Stale by holder": the selected stale entries counted by holder class, process and pod.

use std::collections::HashSet;
use std::fmt::Write as _;

use super::Row;
use crate::holder::{summarize, Classified, HolderClass, HolderSummary, UnknownHolder};
use crate::observation::{Filter, Observation};

/// How many processes and pods "stale by holder" names.
pub const TOP_HOLDERS: usize = 5;

/// The selected stale entries' "stale by holder", once the holder pass ran.
pub fn stale_by_holder(o: &Observation, filter: &Filter) -> Option<HolderSummary> {
    let selected = o
        .holders
        .as_ref()?
        .diagnosed
        .iter()
        .filter(|&&(at, _)| o.entries.get(at).is_some_and(|e| filter.selects(e)))
        .map(|(_, d)| d);
    Some(summarize(selected, TOP_HOLDERS))
}

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

/// The holder classes of the selected stale rows, each once: their facts and fixes.
pub fn holder_reasons(rows: &[Row]) -> Vec<Classified> {
    let present: HashSet<Classified> = rows
        .iter()
        .filter_map(|r| r.holder)
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
