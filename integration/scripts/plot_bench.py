#!/usr/bin/env python3
"""Plots sockmap-gc-bench figures (--json output). Needs matplotlib.

The full-map figures: time against map entries for sockmap-gc (audit, sweep), the kernel's own
cost and the manual remedy. The hung-request figures (--hung): requests hung per collector, and
the distribution of the stale entries' lifetimes.

    python3 integration/scripts/plot_bench.py FIGURES.json docs/benchmarks.png
    python3 integration/scripts/plot_bench.py HUNG.json docs/hung-requests.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


LABELS = {
    "none": "(a) no collector",
    "full-sweeps": "(b) full sweeps only",
    "shipped": "(c) shipped config",
}


def hung(data, dst):
    h = data["hung"]
    runs = h["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = [LABELS.get(r["collector"], r["collector"]) for r in runs]
    hung_counts = [r["hung"] for r in runs]
    bars = left.bar(names, [max(n, 0.5) for n in hung_counts], color=["tab:red", "tab:orange", "tab:blue"])
    for b, n, r in zip(bars, hung_counts, runs):
        left.annotate(f"{n} of {r['requests']}", (b.get_x() + b.get_width() / 2, b.get_height()),
                      ha="center", va="bottom", fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("requests hung (no reply within %.0f s)" % h["timeout_seconds"])
    left.set_title("hung requests, %d s per collector" % h["seconds"], fontsize=9)
    for r in runs:
        ended = sorted(r["lifetimes_ended"])
        if not ended:
            continue
        y = [(i + 1) / len(ended) for i in range(len(ended))]
        right.step(ended, y, where="post", label="%s (%d deleted, %d left)" % (
            LABELS.get(r["collector"], r["collector"]), len(ended), r["left_at_end"]))
    right.set_xscale("log")
    right.set_xlabel("stale-entry lifetime, seconds (entries deleted during the run)")
    right.set_ylabel("share of those entries")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    right.set_title("stale-entry lifetime (without a collector none is deleted)", fontsize=9)
    fig.suptitle("%d requests/s from %d ports (each back every %.0f s), %.0f%% reset; %s" % (
        h["rate"], h["ports"], h["reuse_seconds"], h["reset_share"] * 100, data.get("machine", "")), fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


def main(src, dst):
    with open(src) as f:
        data = json.load(f)
    if "hung" in data:
        return hung(data, dst)
    sizes = sorted(data["sizes"], key=lambda s: s["entries"])
    x = [s["entries"] for s in sizes]
    med = [s["median"] for s in sizes]

    def series(key):
        return [m[key] for m in med]

    manual_total = [
        (m["manual_audit"] or 0) + (m["manual_delete"] or 0) for m in med
    ]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(x, manual_total, "o-", color="tab:red", label="manual remedy: bpftool dump + ss per netns + bpftool delete per stale key")
    ax.plot(x, series("manual_audit"), "o--", color="tab:red", alpha=0.6, label="manual remedy: finding the stale keys only")
    ax.plot(x, series("sweep"), "s-", color="tab:blue", label="sockmap-gc sweep --execute (no rate limit)")
    ax.plot(x, series("audit_on"), "s--", color="tab:blue", alpha=0.6, label="sockmap-gc audit (identity on)")
    ax.plot(x, series("kernel"), "^:", color="tab:gray", label="kernel's own cost (iterator + sock_diag per netns)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("map entries (sockets: ~1.5 per entry; 100 pod namespaces)")
    ax.set_ylabel("seconds (median)")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{n:,}" for n in x])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("sockmap-gc vs the manual remedy, " + data.get("machine", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
