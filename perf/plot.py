"""Plots from benchmark JSON files (perf/bench.py or `python -m tritonjac --json`).

    python perf/plot.py perf/results/cpu-2026-11-26.json [--out-dir perf/results]

Writes, per (mode, width, depth): time vs points per method (log-log), and for every case one bar
chart of time and memory (`tritonjac.benchmark.plot_case`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tritonjac.benchmark import plot_case  # noqa: E402


def time_vs_points(rows, path, title):
    by_method = defaultdict(list)
    for r in rows:
        if r.get("median_ms"):
            by_method[r["method"]].append((r["n_points"], r["median_ms"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, pts in sorted(by_method.items()):
        pts.sort()
        style = dict(lw=3, color="black") if method.startswith("tritonjac") else dict(lw=1.2)
        if "no J" in method:
            style = dict(lw=1.2, ls="--", color="gray")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("points N")
    ax.set_ylabel("median time (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    for path in args.results:
        with open(path) as f:
            rows = json.load(f)
        out_dir = args.out_dir or os.path.dirname(os.path.abspath(path))
        stem = os.path.splitext(os.path.basename(path))[0]
        groups = defaultdict(list)
        for r in rows:
            groups[(r["mode"], r["width"], r["depth"])].append(r)
        for (mode, width, depth), sub in groups.items():
            r0 = sub[0]
            title = (
                f"{mode.replace('_', ' ')}: {r0['in_features']} -> {depth}x{width} -> {r0['out_features']}, "
                f"{r0['activation']}, {r0['dtype']}\n{r0['device_name']}, torch {r0['torch']}"
            )
            out = os.path.join(out_dir, f"{stem}-{mode}-w{width}-d{depth}.png")
            time_vs_points(sub, out, title)
            print("wrote", out)
        cases = defaultdict(list)
        for r in rows:
            cases[(r["n_points"], r["width"], r["depth"])].append(r)
        for (n, width, depth), sub in cases.items():
            out = os.path.join(out_dir, f"{stem}-bars-n{n}-w{width}-d{depth}.png")
            plot_case(sub, out)
            print("wrote", out)


if __name__ == "__main__":
    main()
