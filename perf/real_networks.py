"""Benchmarks of the networks users train through their derivatives: NeuS's SDF and Nerfies' warp field.

    python perf/real_networks.py                       # both networks at the issue's sizes
    python perf/real_networks.py --points-scale 0.125  # fewer points (a slow CPU)
    python perf/real_networks.py --no-compile --rounds 3 --out perf/results/real-cpu.json

- NeuS: 3 -> PE(6) -> 8 x 256 Softplus(100), skip into layer 4 (scaled 1/sqrt(2)) -> 257 outputs,
  the gradient of output 0 (the SDF), N = 65,536. Loss: eikonal on the gradient plus y[..., 0]^2.
- Nerfies: xyz -> windowed PE(8), then an 8-d code -> 6 x 128 ReLU, skip into layer 4 -> 6 outputs,
  J (6 x 3) with respect to xyz, N = 2^18. Loss: J^2 plus y^2.

Each in tritonjac (the engine `backend="auto"` picks) against the same network in plain PyTorch:
autograd with one reverse pass per differentiated output (create_graph=True for the training
step), torch.compile of the network under it, and torch.compile of vmap(jacfwd) of it. Modes:
forward + J, and a training step (loss on y and J, backward to every parameter). The "limit" row
on CPU is the time of tritonjac's matmuls alone (forward and tangents, plus the weight-gradient
and propagation matmuls for a step) on random operands of the same shapes. Prints a table per
network and mode, with each method's time relative to tritonjac's; --out writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from tritonjac import JacobianMLP, PositionalEncoding, benchmark

LIMIT = "limit: the matmuls alone"


def neus(device, dtype, width=256):
    model = JacobianMLP(
        3, [width] * 3 + [width - 39] + [width] * 4, width + 1, torch.nn.Softplus(beta=100),
        encoding=PositionalEncoding(6), skips=(4,), skip_scale=2**-0.5, jacobian_outputs=1,
        device=device, dtype=dtype,
    )  # fmt: skip
    return model, 65536


def nerfies(device, dtype, width=128):
    model = JacobianMLP(
        3 + 8, [width] * 6, 6, "relu", jacobian_inputs=3, encoding=PositionalEncoding(8, alpha=6.0),
        skips=(4,), device=device, dtype=dtype,
    )  # fmt: skip
    return model, 2**18


SMALL_WIDTHS = {"neus": 48, "nerfies": 16}  # the same structures, narrow: dry runs in the interpreter


NETWORKS = {"NeuS SDF (PE6, 8x256, skip 4, 257 out, grad of out 0)": neus,
            "Nerfies warp (PE8 + code, 6x128, skip 4, 6 out, J w.r.t. xyz)": nerfies}  # fmt: skip


def plain_forward(model):
    """The network in plain PyTorch (the same layers): what a user writes without tritonjac. Not
    `model(x, jacobian=False)`: on a GPU that runs our kernels' forward, which autograd cannot
    differentiate twice (the first H200 run's peer failed so)."""
    return model._plain_forward


def autograd_jacobian(forward, model, x, create_graph):
    """y and J (m, k) by one reverse pass per selected output, as users write it."""
    x = x.detach().requires_grad_()
    y = forward(x)
    spec = model._spec
    rows = range(*spec.output_rows(y.shape[-1]).indices(y.shape[-1]))
    inputs = slice(spec.input_start, spec.input_start + spec.jacobian_inputs)
    ones = torch.ones_like(y[..., 0])
    grads = [torch.autograd.grad(y[..., o], x, ones, create_graph=create_graph, retain_graph=True)[0] for o in rows]
    return y, torch.stack([g[..., inputs] for g in grads], -2)


def func_jacobian(forward, model):
    """x -> (y, J (m, k)) by torch.func: forward-mode AD of the per-point network, vmapped."""
    spec = model._spec
    inputs = slice(spec.input_start, spec.input_start + spec.jacobian_inputs)

    def per_point(p):
        y = forward(p)
        return y, y

    batched = torch.func.vmap(torch.func.jacfwd(per_point, has_aux=True))

    def run(x):
        J, y = batched(x)
        rows = spec.output_rows(y.shape[-1])
        return y, J[..., rows, inputs]

    return run


def loss(y, J):
    return y.square().mean() + J.square().mean()


def matmul_shapes(model, n: int, train: bool) -> list[tuple[int, int, int]]:
    """(M, K, N) of every matmul tritonjac runs for n points: the values, the tangents (the encoded
    input's as its per-coordinate blocks), and for a step the weight gradients and propagations."""
    spec = model._spec
    k = spec.jacobian_inputs
    a0 = spec.first_input_width(model.in_features)
    per_coordinate = spec.encoding.width // k if spec.encoding is not None else 0
    shapes = []
    weights = model._weights()
    for l, W in enumerate(weights):
        d_out, d_in = W.shape
        rows = spec.jacobian_outputs(d_out) if l == len(weights) - 1 else d_out
        products = [(n, d_in, d_out)]  # values
        if l > 0:
            products.append((k * n, d_in - (a0 if l in spec.skips else 0), rows))  # tangents of h
        if (l == 0 or l in spec.skips) and per_coordinate:
            products.append((k * n, per_coordinate, rows))  # the encoding's tangent blocks
        shapes += products
        if train:
            shapes += [(N, M, K) for M, K, N in products]  # weight gradient
            shapes += [(M, N, K) for M, K, N in products if l > 0]  # propagation
    return shapes


def matmuls_alone(shapes, device, dtype):
    operands = [
        (torch.randn(M, K, device=device, dtype=dtype), torch.randn(K, N, device=device, dtype=dtype))
        for M, K, N in shapes
    ]
    outs = [torch.empty(a.shape[0], b.shape[1], device=device, dtype=dtype) for a, b in operands]

    def run():
        for (a, b), out in zip(operands, outs):
            torch.mm(a, b, out=out)

    return run


def training_step(fn, params, loss_of):
    """A timed training step: gradients cleared, (y, J) = fn(), loss_of(y, J) backward."""

    def run():
        for p in params:
            p.grad = None
        y, J = fn()
        loss_of(y, J).backward()

    return run


def no_grad(fn):
    """fn under torch.no_grad(): forward + J as an inference would run it."""

    def run():
        with torch.no_grad():
            return fn()

    return run


def methods(model, x, include_compile: bool):
    params = list(model.parameters())
    forward = plain_forward(model)

    def step(fn):
        return training_step(fn, params, loss)

    table = {
        "tritonjac": (no_grad(lambda: model(x)), step(lambda: model(x))),
        "plain forward (no J)": (no_grad(lambda: forward(x)), None),
        "autograd.grad per output": (
            lambda: autograd_jacobian(forward, model, x, False),
            step(lambda: autograd_jacobian(forward, model, x, True)),
        ),
    }
    if include_compile:
        compiled = torch.compile(forward)
        table["torch.compile(network) + autograd.grad"] = (
            lambda: autograd_jacobian(compiled, model, x, False),
            step(lambda: autograd_jacobian(compiled, model, x, True)),
        )
        compiled_jacfwd = torch.compile(func_jacobian(forward, model))
        table["torch.compile(vmap(jacfwd))"] = (no_grad(lambda: compiled_jacfwd(x)), step(lambda: compiled_jacfwd(x)))
    if x.device.type == "cpu":
        n = x.shape[0]
        table[LIMIT] = (
            matmuls_alone(matmul_shapes(model, n, False), x.device, x.dtype),
            matmuls_alone(matmul_shapes(model, n, True), x.device, x.dtype),
        )
    return table


def run(name, build, device, dtype, scale, rounds, include_compile, max_seconds, small=False):
    """The rows of one network: both modes, every method, times relative to tritonjac's."""
    torch.manual_seed(0)
    model, n = build(device, dtype, SMALL_WIDTHS[build.__name__]) if small else build(device, dtype)
    n = max(1, int(n * scale))
    x = torch.rand(n, model.in_features, device=device, dtype=dtype)
    table = methods(model, x, include_compile)
    rows = []
    for mode, index in (("forward_jacobian", 0), ("train_step", 1)):
        fns = {m: fns[index] for m, fns in table.items() if fns[index] is not None}
        results = benchmark.time_interleaved(fns, device, rounds, max_seconds=max_seconds, label=f"{mode} ")
        ours = median_of(results["tritonjac"].times_ms)
        for method, r in results.items():
            median = median_of(r.times_ms)
            rows.append(
                dict(
                    network=name,
                    mode=mode,
                    n_points=n,
                    method=method,
                    median_ms=median,
                    times_ms=r.times_ms,
                    relative_to_tritonjac=(median / ours) if median and ours else None,
                    status=r.status,
                )
            )
    return rows


def median_of(times):
    return sorted(times)[len(times) // 2] if times else None


def format_rows(rows) -> str:
    lines = []
    for (network, mode), group in _grouped(rows):
        lines.append(f"\n{network} — {mode}, N = {group[0]['n_points']}")
        lines.append(f"  {'method':<42} {'median ms':>11} {'x tritonjac':>12}")
        for r in group:
            if r["median_ms"] is None:
                lines.append(f"  {r['method']:<42} {r['status']}")
            else:
                lines.append(f"  {r['method']:<42} {r['median_ms']:>11.1f} {r['relative_to_tritonjac']:>12.2f}")
    return "\n".join(lines)


def _grouped(rows):
    keys = []
    for r in rows:
        key = (r["network"], r["mode"])
        if key not in keys:
            keys.append(key)
    return [(key, [r for r in rows if (r["network"], r["mode"]) == key]) for key in keys]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--points-scale", type=float, default=1.0, help="multiply each network's N")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--networks", nargs="+", choices=["neus", "nerfies"], default=["neus", "nerfies"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")
    dtype = getattr(torch, args.dtype)
    rows = []
    chosen = [name for name, build in NETWORKS.items() if build.__name__ in args.networks]
    with benchmark.quiet_torch_warnings():
        for name in chosen:
            rows += run(
                name, NETWORKS[name], args.device, dtype, args.points_scale, args.rounds, not args.no_compile,
                args.max_seconds,
            )  # fmt: skip
    print(format_rows(rows))
    if args.out:
        env = benchmark.environment(args.device)
        meta = dict(date=datetime.date.today().isoformat(), argv=sys.argv[1:], environment=env)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
