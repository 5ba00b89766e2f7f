"""Benchmarks of scalar fields (SDFs) trained through their gradient: reverse mode against autograd.

    python perf/scalar_fields.py                        # the cases for this device
    python perf/scalar_fields.py --points-scale 0.25    # fewer points (a slow machine)
    python perf/scalar_fields.py --rounds 7 --out perf/results/scalar-fields-cpu.json

Cases (float32):
- CPU: 3 -> 8 x 256 Softplus(100) -> 1, N = 16,384 (the issue's case, as a user converts an
  nn.Sequential with `from_module`).
- GPU: the NeuS network (3 -> PE(6) -> 8 x 256, skip into layer 4, 257 outputs, the gradient of
  output 0, N = 65,536), and 3 -> 4 x 64 Softplus(100) -> 1 at N = 2^20.

Modes: "y and gradient" (the SDF and its gradient, nothing recorded: autograd.grad without a graph)
and "eikonal step" (loss (|grad| - 1)^2 + |y|, backward to every parameter; autograd with
create_graph=True). Methods: tritonjac as it chooses ("auto": reverse mode for one output, on the
PyTorch engine on CPU and on the Triton kernels on a GPU), tritonjac in forward mode, on the
kernels the step with the backward carrying J's columns instead of one seeded tangent, plain
autograd, torch.compile of the network under autograd (--compile),
and on CPU the "limit" row: reverse mode's matmuls alone on random operands. Each row has its median
time, the time relative to tritonjac's, and the peak memory (also relative to tritonjac's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
from torch import nn

from tritonjac import JacobianMLP, benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_networks import matmuls_alone, median_of, neus, no_grad, training_step  # noqa: E402

LIMIT = "limit: reverse mode's matmuls alone"
OURS = "tritonjac (auto)"
COLUMNS = "tritonjac (auto), backward carrying J's 3 columns"


def sdf(width: int, depth: int, n: int):
    def build(device, dtype):
        layers = [nn.Linear(3, width), nn.Softplus(beta=100)]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Softplus(beta=100)]
        seq = nn.Sequential(*layers, nn.Linear(width, 1)).to(device=device, dtype=dtype)
        return JacobianMLP.from_module(seq), n

    return build


CASES = {
    "cpu": {"SDF 3 -> 8x256 -> 1, softplus(100)": sdf(256, 8, 16384)},
    "cuda": {
        "NeuS SDF (PE6, 8x256, skip 4, 257 out, grad of out 0)": neus,
        "SDF 3 -> 4x64 -> 1, softplus(100)": sdf(64, 4, 2**20),
    },
}


def eikonal(y, grad):
    """The SDF's training loss on its value and gradient (grad: (..., k))."""
    return ((grad.norm(dim=-1) - 1.0) ** 2).mean() + y[..., 0].abs().mean()


def autograd_gradient(forward, model, x, create_graph: bool):
    """y and the gradient of output 0 with respect to the differentiated inputs, by one reverse pass."""
    x = x.detach().requires_grad_()
    y = forward(x)
    (grad,) = torch.autograd.grad(y[..., 0], x, torch.ones_like(y[..., 0]), create_graph=create_graph)
    spec = model._spec
    return y, grad[..., spec.input_start : spec.input_start + spec.jacobian_inputs]


def reverse_matmul_shapes(model, n: int, train: bool) -> list[tuple[int, int, int]]:
    """(M, K, N) of reverse mode's matmuls for n points and one output: the values up and the
    adjoints down, and for a step the tangents up, the weight gradients over the 2 stacked rows and
    the value adjoint down (docs/design.md, section 9). Elementwise work is not counted."""
    weights = model._weights()
    last = len(weights) - 1
    shapes = []
    for l, W in enumerate(weights):
        d_out, d_in = W.shape
        shapes.append((n, d_in, d_out))  # values
        if l < last:
            shapes.append((n, d_out, d_in))  # the adjoint of output 0
            if train:
                shapes.append((n, d_in, d_out))  # the tangent along dLoss/dJ
                shapes.append((d_out, 2 * n, d_in))  # the weight gradient over [g_z; dz]
        elif train:
            shapes.append((d_out, n, d_in))  # the last layer's weight gradient (values)
        if train and l > 0:
            shapes.append((n, d_out, d_in))  # the value adjoint down
    return shapes


def methods(model, x, include_compile: bool):
    params = list(model.parameters())
    forward = model._plain_forward

    def step(fn):
        return training_step(fn, params, eikonal)

    def ours(mode):
        def run():
            model.mode = mode
            y, J = model(x)
            return y, J[..., 0, :]

        return run

    model.mode = "auto"
    other = "forward" if model.plan(x).mode == "reverse" else "reverse"
    table = {
        OURS: (no_grad(ours("auto")), step(ours("auto"))),
        f"tritonjac (mode={other!r})": (no_grad(ours(other)), step(ours(other))),
        "autograd": (
            lambda: autograd_gradient(forward, model, x, False),
            step(lambda: autograd_gradient(forward, model, x, True)),
        ),
    }
    if model.plan(x).engine == "triton":  # what seeding the backward's tangents with dLoss/dJ saves
        from tritonjac import triton_engine

        auto_step = step(ours("auto"))

        def columns_step():
            with triton_engine.unseeded_backward():
                auto_step()

        table[COLUMNS] = (None, columns_step)
    if include_compile:
        compiled = torch.compile(forward)
        table["torch.compile(network) + autograd"] = (
            lambda: autograd_gradient(compiled, model, x, False),
            step(lambda: autograd_gradient(compiled, model, x, True)),
        )
    if x.device.type == "cpu":
        n = x.shape[0]
        table[LIMIT] = (
            matmuls_alone(reverse_matmul_shapes(model, n, False), x.device, x.dtype),
            matmuls_alone(reverse_matmul_shapes(model, n, True), x.device, x.dtype),
        )
    return table


def run(name, build, device, dtype, scale, rounds, include_compile, max_seconds):
    """The rows of one case: both modes, every method, times and memory relative to tritonjac's."""
    torch.manual_seed(0)
    model, n = build(device, dtype)
    n = max(1, int(n * scale))
    x = torch.rand(n, model.in_features, device=device, dtype=dtype) * 2 - 1
    table = methods(model, x, include_compile)
    modes = ("y and gradient", "eikonal step")
    fields = dict(case=name, n_points=n, plan=str(model.plan(x)))
    return timed_rows(table, modes, OURS, LIMIT, device, rounds, max_seconds, **fields)


def timed_rows(table, modes, ours, limit, device, rounds, max_seconds, **fields) -> list[dict]:
    """Time `table` (method -> one callable or None per mode) in interleaved rounds, mode by mode:
    one row per method and mode with its median, times and peak memory relative to `ours`'s (none
    for the `limit` row), and `fields` in every row."""
    rows = []
    for index, mode in enumerate(modes):
        fns = {m: fns[index] for m, fns in table.items() if fns[index] is not None}
        results = benchmark.time_interleaved(fns, device, rounds, max_seconds=max_seconds, label=f"{mode}: ")
        ours_ms = median_of(results[ours].times_ms)
        ours_mb = results[ours].peak_mem_mb
        for method, r in results.items():
            median = median_of(r.times_ms)
            memory = r.peak_mem_mb if method != limit else None
            rows.append(
                dict(
                    **fields,
                    mode=mode,
                    method=method,
                    median_ms=median,
                    times_ms=r.times_ms,
                    relative_to_tritonjac=(median / ours_ms) if median and ours_ms else None,
                    peak_mem_mb=memory,
                    memory_relative_to_tritonjac=(memory / ours_mb) if memory and ours_mb else None,
                    status=r.status,
                )
            )
    return rows


def format_rows(rows) -> str:
    lines = []
    keys = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
    for case, mode in keys:
        group = [r for r in rows if (r["case"], r["mode"]) == (case, mode)]
        lines.append(f"\n{case}: {mode}, N = {group[0]['n_points']} ({group[0]['plan']})")
        lines.append(f"  {'method':<40} {'median ms':>10} {'x ours':>8} {'peak MB':>9} {'x ours':>8}")
        for r in group:
            if r["median_ms"] is None:
                lines.append(f"  {r['method']:<40} {r['status']}")
                continue
            memory = f"{r['peak_mem_mb']:>9.1f}" if r["peak_mem_mb"] is not None else f"{'-':>9}"
            mem_rel = r["memory_relative_to_tritonjac"]
            mem_rel = f"{mem_rel:>8.2f}" if mem_rel is not None else f"{'-':>8}"
            lines.append(
                f"  {r['method']:<40} {r['median_ms']:>10.1f} {r['relative_to_tritonjac']:>8.2f} {memory} {mem_rel}"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--points-scale", type=float, default=1.0, help="multiply each case's N")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the network")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")
    cases = CASES["cuda" if args.device.startswith("cuda") else "cpu"]
    rows = []
    with benchmark.quiet_torch_warnings():
        for name, build in cases.items():
            rows += run(
                name, build, args.device, torch.float32, args.points_scale, args.rounds, args.compile,
                args.max_seconds,
            )  # fmt: skip
    print(format_rows(rows))
    if args.out:
        env = benchmark.environment(args.device)
        env["date"] = datetime.date.today().isoformat()
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
