"""Benchmarks of second derivatives: the Laplacian in the forward pass against nested autograd.

    python perf/second_order.py                         # the cases for this device
    python perf/second_order.py --points-scale 0.25     # fewer points (a slow machine)
    python perf/second_order.py --rounds 7 --out perf/results/second-order-cpu.json

Cases (float32):
- CPU: SIREN's network, 3 -> 3 x 256 sine(30) -> 1, N = 8,192.
- GPU: the same at N = 2^18, and 3 -> 4 x 64 Softplus(100) -> 1 at N = 2^20.

Modes: "y, J and Laplacian" (nothing recorded) and "Poisson step" (loss mean((lap - f)^2) with a
fixed f, backward to every parameter). Methods: tritonjac (`model(x, laplacian=True)`: one forward
pass carrying 1 + 3 + 1 stacked rows; on a GPU the per-layer Triton kernels, and the same on the
PyTorch engine as a row of its own), nested autograd (the gradient with create_graph, then one
backward per coordinate, create_graph again to train: a third-order backward), torch.func
`vmap(hessian)` (its trace; not timed for the step), and on CPU the "limit" row: the forward's
matmuls over 5 stacked rows per point (a step adds the weight-gradient and propagation matmuls over
them) on random operands. Each row has its median time, the time relative to tritonjac's, and the
peak memory (also relative to tritonjac's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
from torch import nn

from tritonjac import JacobianMLP, Sine, benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_networks import matmuls_alone  # noqa: E402
from scalar_fields import format_rows, timed_rows  # noqa: E402

LIMIT = "limit: the matmuls alone (5 rows)"
OURS = "tritonjac (laplacian=True)"


def mlp(width: int, depth: int, activation, n: int, siren: bool):
    def build(device, dtype):
        model = JacobianMLP(3, [width] * depth, 1, activation, device=device, dtype=dtype)
        if siren:  # SIREN's initialisation: U(-1/in, 1/in) first, U(-sqrt(6/in)/30, ...) after
            with torch.no_grad():
                for l, layer in enumerate(model.linear_layers):
                    bound = 1 / layer.in_features if l == 0 else (6 / layer.in_features) ** 0.5 / 30
                    layer.weight.uniform_(-bound, bound)
        return model, n

    return build


CASES = {
    "cpu": {"SIREN 3 -> 3x256 -> 1, sine(30)": mlp(256, 3, Sine(30.0), 8192, True)},
    "cuda": {
        "SIREN 3 -> 3x256 -> 1, sine(30)": mlp(256, 3, Sine(30.0), 2**18, True),
        "3 -> 4x64 -> 1, softplus(100)": mlp(64, 4, nn.Softplus(beta=100), 2**20, False),
    },
}


def nested_laplacian(forward, x, create_graph: bool):
    """y and the Laplacian of output 0 by nested autograd: the gradient, then a backward per coordinate."""
    x = x.detach().requires_grad_()
    y = forward(x)
    (grad,) = torch.autograd.grad(y[..., 0].sum(), x, create_graph=True)
    lap = 0
    for j in range(x.shape[-1]):
        (row,) = torch.autograd.grad(grad[..., j].sum(), x, create_graph=create_graph, retain_graph=True)
        lap = lap + row[..., j]
    return y, lap


def func_laplacian(forward, x):
    H = torch.func.vmap(torch.func.hessian(lambda p: forward(p.unsqueeze(0))[0, 0]))(x)
    return H.diagonal(dim1=-2, dim2=-1).sum(-1)


def stacked_matmul_shapes(model, n: int, train: bool, rows: int = 5) -> list[tuple[int, int, int]]:
    """(M, K, N) of the forward's matmuls over `rows` stacked rows per point (the first layer's
    input rows included), and for a step the weight gradients and the propagation over them."""
    shapes = []
    for l, W in enumerate(model._weights()):
        d_out, d_in = W.shape
        shapes.append((rows * n, d_in, d_out))
        if train:
            shapes.append((d_out, rows * n, d_in))
            if l > 0:
                shapes.append((rows * n, d_out, d_in))
    return shapes


def methods(model, x):
    params = list(model.parameters())
    forward = model._plain_forward
    target = torch.sin(x).sum(-1)  # a fixed right-hand side for the Poisson residual

    def step(fn):
        def run():
            for p in params:
                p.grad = None
            lap = fn()
            ((lap - target) ** 2).mean().backward()

        return run

    def ours():
        return model(x, laplacian=True)[2][..., 0]

    def ours_no_grad():
        with torch.no_grad():
            return model(x, laplacian=True)

    table = {
        OURS: (ours_no_grad, step(ours)),
        "nested autograd": (
            lambda: nested_laplacian(forward, x, False),
            step(lambda: nested_laplacian(forward, x, True)[1]),
        ),
        "torch.func vmap(hessian), trace": (
            lambda: func_laplacian(forward, x),
            step(lambda: func_laplacian(forward, x)),
        ),
    }
    if x.device.type == "cuda":  # the same on the PyTorch engine: what the kernels' forward saves

        def on_engine(fn):
            def run():
                backend, model.backend = model.backend, "torch"
                try:
                    return fn()
                finally:
                    model.backend = backend

            return run

        table["tritonjac (PyTorch engine)"] = (on_engine(ours_no_grad), on_engine(step(ours)))
    if x.device.type == "cpu":
        n = x.shape[0]
        table[LIMIT] = (
            matmuls_alone(stacked_matmul_shapes(model, n, False), x.device, x.dtype),
            matmuls_alone(stacked_matmul_shapes(model, n, True), x.device, x.dtype),
        )
    return table


def run(name, build, device, dtype, scale, rounds, max_seconds):
    torch.manual_seed(0)
    model, n = build(device, dtype)
    n = max(1, int(n * scale))
    x = torch.rand(n, 3, device=device, dtype=dtype) * 2 - 1
    table = methods(model, x)
    # ours against nested autograd's Laplacian (max |difference| / max |autograd's|), one call each
    with torch.no_grad():
        ours = model(x, laplacian=True)[2][..., 0].double()
    reference = nested_laplacian(model._plain_forward, x, False)[1].detach().double()
    agreement = ((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()
    print(f"{name}: {model.plan(x, laplacian=True)}; Laplacian vs nested autograd: {agreement:.2e}", flush=True)
    plan = str(model.plan(x, laplacian=True))
    modes = ("y, J and Laplacian", "Poisson step")
    fields = dict(case=name, n_points=n, plan=plan, laplacian_vs_autograd=agreement)
    return timed_rows(table, modes, OURS, LIMIT, device, rounds, max_seconds, **fields)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--points-scale", type=float, default=1.0, help="multiply each case's N")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")
    cases = CASES["cuda" if args.device.startswith("cuda") else "cpu"]
    rows = []
    with benchmark.quiet_torch_warnings():
        for name, build in cases.items():
            rows += run(name, build, args.device, torch.float32, args.points_scale, args.rounds, args.max_seconds)
    print(format_rows(rows))
    if args.out:
        env = benchmark.environment(args.device)
        env["date"] = datetime.date.today().isoformat()
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
