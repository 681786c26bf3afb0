#!/usr/bin/env python3
"""Plots sockmap-gc-bench figures (--json output): time against map entries for sockmap-gc
(audit, sweep), the kernel's own cost and the manual remedy. Needs matplotlib.

    python3 integration/scripts/plot_bench.py FIGURES.json docs/benchmarks.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    with open(src) as f:
        data = json.load(f)
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
