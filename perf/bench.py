"""Benchmark grid: tritonjac against its peers over point counts, widths and depths.

    python perf/bench.py                      # the default grid on the default device
    python perf/bench.py --quick              # a small grid (a minute on a 2-core CPU)
    python perf/bench.py --points 1024 65536 --widths 64 --depths 4 --out perf/results/cpu.json

Writes one JSON (list of rows, schema `tritonjac.benchmark.ROW_FIELDS`) and a CSV beside it, then
prints each case's table. Plots: `python perf/plot.py RESULTS.json`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys

import torch

from tritonjac import benchmark


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--points", type=int, nargs="+", default=None)
    p.add_argument("--widths", type=int, nargs="+", default=[64])
    p.add_argument("--depths", type=int, nargs="+", default=[4])
    p.add_argument("--activation", default="softplus(100)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="N in {1024, 16384}, no torch.compile, 5 rounds")
    p.add_argument("--max-seconds", type=float, default=60.0, help="per case and mode, after 3 rounds")
    p.add_argument(
        "--tuned-configs", metavar="DIR", help="write the configurations autotuning chose (GPU) to DIR/<GPU name>.json"
    )
    p.add_argument(
        "--precision",
        choices=["highest", "high"],
        default=None,
        help="torch.set_float32_matmul_precision (default: high, i.e. TF32, on GPUs)",
    )
    p.add_argument("--out", default=None, help="JSON path (default perf/results/<device>-<date>.json)")
    args = p.parse_args(argv)

    gpu = args.device.startswith("cuda")
    precision = args.precision or ("high" if gpu else None)
    if precision:
        torch.set_float32_matmul_precision(precision)
    if args.quick:
        points, args.no_compile, args.rounds = [1024, 16384], True, 5
    else:
        points = args.points or ([2**p for p in (10, 14, 16, 18, 20, 22)] if gpu else [1024, 8192, 65536, 262144])
    rows = []
    for depth in args.depths:
        for width in args.widths:
            for n in points:
                case = benchmark.Case(
                    n_points=n,
                    width=width,
                    depth=depth,
                    activation=args.activation,
                    dtype=args.dtype,
                    device=args.device,
                )
                case_rows = benchmark.run_case(
                    case, rounds=args.rounds, include_compile=not args.no_compile, max_seconds=args.max_seconds
                )
                print(benchmark.format_table(case_rows), flush=True)
                rows += case_rows
                if args.tuned_configs:  # after every case: a later case that fails or times out loses nothing
                    benchmark.write_tuned_configs(args.tuned_configs, args.device)
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"{'gpu' if gpu else 'cpu'}-{datetime.date.today().isoformat()}.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.splitext(out)[0] + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=benchmark.ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out} and its .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
