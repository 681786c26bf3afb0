//! The benchmark's smoke modes (`sockmap-gc-bench --smoke`: 1,000 entries, 5 pods, one run,
//! 5 s of the daemon; `--hung --smoke`: 5 s per collector) complete and their figures are sane. No timing thresholds: figures come from the benchmark
//! (docs/BENCHMARKS.md), never from timed assertions.

use std::process::Command;

use serde_json::Value;

use crate::support::{evidence, product, PEER};

const BENCH: &str = env!("CARGO_BIN_EXE_sockmap-gc-bench");

#[test]
fn smoke_mode_builds_a_full_map_measures_and_tears_down() {
    let dir = std::env::temp_dir().join(format!("smgc-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json_path = dir.join("figures.json");
    let out = Command::new(BENCH)
        .args(["--smoke", "--id", "it-bench", "--product"])
        .arg(product())
        .arg("--peer-bin")
        .arg(PEER)
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("the bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench --smoke failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    evidence(&stdout);
    let text = std::fs::read_to_string(&json_path).expect("figures written");
    let _ = std::fs::remove_dir_all(&dir);
    let figures: Value = serde_json::from_str(&text).expect("figures are JSON");
    let sizes = figures["sizes"].as_array().expect("sizes");
    assert_eq!(sizes.len(), 1);
    let size = &sizes[0];
    assert_eq!(size["entries"], 1000);
    assert_eq!(size["pods"], 5);
    let stale = size["stale"].as_u64().expect("stale");
    assert!(stale > 0 && stale < 1000, "stale {stale}");
    // The node's sockets include the lab's: every entry is backed by one.
    assert!(size["sockets"].as_u64().expect("sockets") >= 1000);
    assert!(size["namespaces"].as_u64().expect("namespaces") >= 6);
    let runs = size["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    for field in [
        "kernel_iter",
        "kernel_diag",
        "holders",
        "audit_off",
        "audit_on",
        "sweep",
        "manual_audit",
        "manual_delete",
    ] {
        let v = run[field].as_f64().unwrap_or(-1.0);
        assert!(v > 0.0 && v.is_finite(), "{field} = {v}");
    }
    let delete_phase = run["sweep_delete_phase"].as_f64().expect("delete phase");
    assert!(delete_phase <= run["sweep"].as_f64().expect("sweep"));
    // The sweep deleted exactly the planted stale entries (the bench checks the audits and
    // the manual remedy found the same number).
    assert_eq!(run["deleted"].as_u64(), Some(stale));
    for field in ["audit_off_rss_kib", "audit_on_rss_kib", "sweep_rss_kib"] {
        let kib = run[field].as_u64().expect(field);
        assert!(kib > 1024 && kib < 4 * 1024 * 1024, "{field} = {kib} KiB");
    }
    // The daemon's continuous passes on the same map, between sweeps.
    let daemon = &size["daemon"];
    assert!(daemon["passes"].as_u64().expect("passes") >= 1, "{daemon}");
    let share = daemon["cpu_share"].as_f64().expect("cpu share");
    assert!((0.0..1.0).contains(&share), "{daemon}");
    assert!(daemon["rss_kib"].as_u64().expect("rss") > 1024, "{daemon}");
    // Everything the lab made is gone.
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("smgc-it-bench-")
                })
                .count()
        })
        .unwrap_or(0);
    assert_eq!(netns, 0, "lab namespaces left behind");
    assert!(!std::path::Path::new("/sys/fs/bpf/smgc-it-bench").exists());
}

#[test]
fn hung_smoke_runs_the_three_collectors_and_the_shipped_config_deletes() {
    let dir = std::env::temp_dir().join(format!("smgc-bench-hung-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json_path = dir.join("hung.json");
    let out = Command::new(BENCH)
        .args(["--hung", "--smoke", "--id", "it-hung", "--product"])
        .arg(product())
        .arg("--peer-bin")
        .arg(PEER)
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("the bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench --hung --smoke failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    evidence(&stdout);
    let text = std::fs::read_to_string(&json_path).expect("figures written");
    let _ = std::fs::remove_dir_all(&dir);
    let figures: Value = serde_json::from_str(&text).expect("figures are JSON");
    let runs = figures["hung"]["runs"].as_array().expect("runs");
    let collectors: Vec<&str> = runs
        .iter()
        .map(|r| r["collector"].as_str().expect("collector"))
        .collect();
    assert_eq!(collectors, ["none", "full-sweeps", "shipped"]);
    for r in runs {
        assert!(r["requests"].as_u64().expect("requests") > 0, "{r}");
        assert_eq!(r["other_failures"], 0, "only hangs may fail: {r}");
    }
    assert!(runs[0]["daemon"].is_null());
    // The shipped config's continuous pass deletes stale entries within the run.
    let shipped = &runs[2];
    assert!(
        shipped["daemon"]["deleted"].as_u64().expect("deleted") >= 1,
        "{shipped}"
    );
    assert!(
        shipped["lifetime_max"]["secs"].as_f64().is_some(),
        "{shipped}"
    );
    assert!(!std::path::Path::new("/sys/fs/bpf/smgc-it-hung").exists());
}
