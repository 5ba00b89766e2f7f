"""`python -m tritonjac`: a self-check against torch.func, then a benchmark table against the peers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def self_check(device: str) -> bool:
    """y, J and gradients of every activation against torch.func, in float64 on `device`."""
    from .activations import ACTIVATION_NAMES
    from .benchmark import func_jacobian
    from .module import JacobianMLP

    torch.manual_seed(0)
    worst = 0.0
    for name in ACTIVATION_NAMES:
        model = JacobianMLP(4, [32, 17], 3, name, jacobian_inputs=3, dtype=torch.float64, device=device)
        if name == "sine":
            with torch.no_grad():
                for layer in model.linear_layers:
                    layer.weight.div_(30.0)
        seq = model.to_sequential()
        x = torch.randn(300, 4, dtype=torch.float64, device=device, requires_grad=True)
        y, J = model(x)
        loss = y.square().sum() + J.square().sum()
        grads = torch.autograd.grad(loss, [x, *model.parameters()])

        y_ref, J_ref = func_jacobian(seq, torch.func.jacfwd)(x)
        J_ref = J_ref[..., :3]
        ref_grads = torch.autograd.grad(
            y_ref.square().sum() + J_ref.square().sum(),
            [x, *model.parameters()],
            allow_unused=True,
            materialize_grads=True,
        )
        errors = [
            (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)
            for a, b in [(y, y_ref), (J, J_ref), *zip(grads, ref_grads)]
        ]
        worst = max(worst, *errors)
        print(f"  {name:10s} y {errors[0]:.1e}  J {errors[1]:.1e}  grads {max(errors[2:]):.1e}")
    ok = worst < 1e-10
    print(f"self-check against torch.func (float64): worst relative error {worst:.1e} -> {'OK' if ok else 'FAILED'}")
    if device.startswith("cuda"):
        ok = triton_check(device) and ok
    return ok


def triton_check(device: str) -> bool:
    """The Triton kernels in float32 ("highest": 3xTF32) against the analytic engine in float64."""
    from .activations import ACTIVATION_NAMES
    from .module import JacobianMLP
    from .precision import float32_matmul_precision

    before = float32_matmul_precision(), os.environ.get("TRITONJAC_AUTOTUNE")
    torch.set_float32_matmul_precision("highest")
    os.environ["TRITONJAC_AUTOTUNE"] = "0"  # 20 shapes: do not autotune each
    worst = 0.0
    try:
        for name in ACTIVATION_NAMES:
            for hidden in ([64, 64, 64], [300, 64]):  # whole-network kernel, per-layer kernel
                model = JacobianMLP(3, hidden, 3, name, dtype=torch.float64, device=device)
                if name == "sine":
                    with torch.no_grad():
                        for layer in model.linear_layers:
                            layer.weight.div_(30.0)
                x = torch.randn(5000, 3, dtype=torch.float64, device=device)
                with torch.no_grad():
                    y_ref, J_ref = model(x)
                    model.float().backend = "triton"
                    y, J = model(x.float())
                for a, b in ((y, y_ref), (J, J_ref)):
                    worst = max(worst, ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300)).item())
    finally:
        torch.set_float32_matmul_precision(before[0])
        if before[1] is None:
            del os.environ["TRITONJAC_AUTOTUNE"]
        else:
            os.environ["TRITONJAC_AUTOTUNE"] = before[1]
    ok = worst < 2e-5
    print(
        f"Triton kernels, float32 'highest' vs float64: worst relative error {worst:.1e} -> {'OK' if ok else 'FAILED'}"
    )
    return ok


def main(argv=None) -> int:
    from . import benchmark

    with benchmark.quiet_torch_warnings():  # torch's notices about itself, not about this job
        return _main(argv)


def _main(argv) -> int:
    from . import benchmark

    parser = argparse.ArgumentParser(prog="python -m tritonjac", description=__doc__)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if present)")
    parser.add_argument("--points", type=int, default=None, help="points N (default 65536 on CPU, 2^20 on GPU)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4, help="hidden layers")
    parser.add_argument("--activation", default="softplus(100)", help="e.g. softplus(100), tanh, relu, sine")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument(
        "--precision",
        choices=["highest", "high"],
        default=None,
        help="torch.set_float32_matmul_precision for the benchmark (default: high, i.e. TF32, on GPUs)",
    )
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per method (interleaved)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers (slow to compile)")
    parser.add_argument("--skip-check", action="store_true", help="skip the self-check")
    parser.add_argument(
        "--tuned-configs", metavar="DIR", help="write the configurations autotuning chose (GPU) to DIR/<GPU name>.json"
    )
    parser.add_argument("--json", metavar="PATH", help="write the result rows as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    args = parser.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    points = args.points or (2**20 if device.startswith("cuda") else 65536)
    print(f"tritonjac on {device}: torch {torch.__version__}, {torch.get_num_threads()} threads")

    if not args.skip_check and not self_check(device):
        return 1

    precision = args.precision or ("high" if device.startswith("cuda") else None)
    if precision:
        torch.set_float32_matmul_precision(precision)
    case = benchmark.Case(
        n_points=points, width=args.width, depth=args.depth, activation=args.activation, dtype=args.dtype, device=device
    )
    start = time.perf_counter()
    rows = benchmark.run_case(case, rounds=args.rounds, include_compile=not args.no_compile)
    print(benchmark.format_table(rows))
    print(benchmark.format_targets(rows))
    print(f"\n(benchmark took {time.perf_counter() - start:.0f} s)")
    # what cost the most to find first: a failing plot must not lose the tuned configurations
    if args.tuned_configs:
        benchmark.write_tuned_configs(args.tuned_configs, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        benchmark.plot_case(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
