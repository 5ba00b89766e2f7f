"""The GPU check: correctness of every kernel path on a real GPU, the main benchmark, the config sweep.

Run through `perf/gpu_check.sh` (which installs the checkout first); the shell script's header says
what each mode does, how long it takes and why. This file is the driver and the steps:

    python perf/gpu_check.py --quick  --out DIR      # correctness + main case (TF32, bf16) vs the peers
    python perf/gpu_check.py --tune   --out DIR      # config sweep: widths 32..512, depths 2 and 8
    python perf/gpu_check.py --tests  --out DIR      # the GPU-only pytest tests (compile, opcheck, ...)
    python perf/gpu_check.py --dry-run [--tune] ...  # the same steps on CPU, Triton interpreter, tiny sizes

The driver runs each step as a subprocess with its own time limit (killed with its process group at
the limit) and, after every step, rewrites what a lease brings back (at most 8 files, 2 folders down):
    summary.json   every number: card, driver, versions, date, steps, correctness, rows, targets
    summary.txt    the same for reading, the most important table last (it is also printed)
    results.tgz    the work folder: one log per step, per-step JSONL, tuned configuration tables
    *.png          at most 5 plots
Steps append one JSON line per finished case to work/<step>.jsonl, so a step killed by its limit
keeps every case it finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import unittest.mock
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAX_PLOTS = 5
MAX_PRINTED_SUMMARY = 5000  # with two lines per step, the printed output stays under 6,000 characters
# A GPU call's wall-clock budget (the lease's first call must end within 4 minutes of a cold start):
# every step's limit is cut to what is left of it, counted from the shell script's start.
GPU_BUDGET_S = 235

# ---- the steps of each mode: (name, time limit in seconds on a GPU, in a dry run) ------------------------
# Ordered by what a cut-short call must keep: the budget trims the last steps first. main-tf32 also
# times the per-layer backward's step (its kernels compile in the precompile pool): 75 s.
QUICK_STEPS = (
    ("environment", 30, 60),
    ("correctness", 75, 300),
    ("main-tf32", 75, 240),
    ("profile", 25, 120),
    ("main-bf16", 35, 120),
    ("real-networks", 35, 240),
    ("main-tf32-compiled", 60, 300),
)
TUNE_STEPS = (("environment", 30, 60), ("tune", 200, 400))
TESTS_STEPS = (("environment", 30, 60), ("gpu-tests", 400, 400))
# the real networks alone: their per-layer kernels compile cold for more than --quick's 35 s (the
# first H200 run finished NeuS's forward + J there, nothing more); then the scalar fields (SDFs:
# reverse mode against autograd)
REAL_STEPS = (("environment", 30, 60), ("real-networks", 150, 240), ("scalar-fields", 50, 240))
# second derivatives (perf/second_order.py): the Laplacian in the forward pass, PyTorch engine on the GPU
SECOND_STEPS = (("environment", 30, 60), ("second-order", 150, 240))
MODES = {"quick": QUICK_STEPS, "tune": TUNE_STEPS, "tests": TESTS_STEPS, "real": REAL_STEPS, "second": SECOND_STEPS}

# A step that hangs after this many finished cases (tests only: proves that a step killed by its limit
# keeps what it finished).
STALL_AFTER = "TRITONJAC_GPU_CHECK_STALL_AFTER"


# ---- sizes: the real ones on a GPU, tiny ones in a dry run ------------------------------------------------
def sizes(dry_run: bool) -> dict:
    if dry_run:
        return dict(points=128, check_points=37, width=16, wide=160, tune_widths=(8, 16, 24, 160), rounds=2)
    return dict(points=2**20, check_points=4099, width=64, wide=512, tune_widths=(32, 128, 256, 512), rounds=5)


# ---- results written as they come --------------------------------------------------------------------------
def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    stall = int(os.environ.get(STALL_AFTER, "0") or 0)
    if stall and sum(1 for _ in open(path)) >= stall:
        time.sleep(3600)  # the test's stand-in for a step that overruns its limit


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            pass
    return out


# ---- compile budget: count the kernel variants a step launches ---------------------------------------------
class VariantCounter:
    """Records each distinct kernel specialization launched in this process (kernel, constexprs,
    launch configuration, tensor dtypes, Triton's integer specialization), and for autotuned launches
    every candidate the pruning keeps: the number of compiles a cold GPU run of the step pays."""

    def __init__(self):
        self.variants = set()

    @staticmethod
    def _spec(value):
        import torch

        if isinstance(value, torch.Tensor):
            return str(value.dtype)
        if isinstance(value, bool) or not isinstance(value, int):
            return repr(value)
        return "1" if value == 1 else ("16" if value % 16 == 0 else "i")

    def record(self, kernel_name: str, args: dict, config: tuple) -> None:
        self.variants.add((kernel_name, tuple(sorted((k, self._spec(v)) for k, v in args.items())), config))

    def install(self) -> None:
        from tritonjac.triton_engine import launch, registry

        def observe(name, args, config):
            if config is not None:
                self.record(name, {**args, **config.kwargs}, (config.num_warps, config.num_stages))
            else:  # what a GPU without a shipped table compiles
                for c in registry.candidates(name, args):
                    self.record(name, {**args, **c.kwargs}, (c.num_warps, c.num_stages))

        launch.add_launch_observer(observe)


class Precompiler:
    """Compiles the autotuner's candidates for a case in several processes at once: task i runs the
    case with candidates i, i + n, ... launched once each. Triton writes every compiled kernel to its
    on-disk cache, so the timed process that autotunes next loads them instead of compiling."""

    def __init__(self, workers: int):
        import multiprocessing as mp

        self.workers = workers
        self.pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None

    def run(self, build_and_run) -> None:
        if self.pool is None:
            return
        start = time.perf_counter()
        n = self.workers
        try:
            done = self.pool.starmap(_precompile_worker, [(build_and_run, i, n) for i in range(n)])
        except Exception as err:  # then the timed process compiles for itself: slower, still right
            print(f"  precompiling failed ({type(err).__name__}: {err}); compiling in the timed process", flush=True)
            return
        print(
            f"  precompiled {sum(done)} candidate launches in {n} processes: {time.perf_counter() - start:.1f} s",
            flush=True,
        )

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def _precompile_worker(build_and_run, index: int, workers: int) -> int:
    """Run the case with every autotuned launch replaced by launches of candidates index,
    index + workers, ... (Triton compiles each into its on-disk cache); returns how many ran."""
    from tritonjac.triton_engine import launch, registry, tuning

    launched = []

    class Slice:
        def __init__(self, kernel):
            self.kernel, self.best_config = kernel, None

        def __getitem__(self, grid):
            def run(**args):
                name = next(n for n, info in registry.KERNELS.items() if info.jit_function() is self.kernel)
                fitting = registry.candidates(name, args)
                mine = fitting[index::workers]
                for c in mine:
                    self.kernel[grid(c.kwargs)](**args, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                    launched.append(1)
                self.best_config = mine[0] if mine else fitting[0]
                if not mine:  # the launch must still produce its outputs
                    c = self.best_config
                    self.kernel[grid(c.kwargs)](**args, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)

            return run

    os.environ["TRITONJAC_AUTOTUNE"] = "1"
    assert tuning.autotuning_enabled()
    with launch.use_autotuner(lambda name, kernel: Slice(kernel)):
        build_and_run(train=index == 0)  # one worker also compiles the backward kernels
    return len(launched)


# ---- step: environment --------------------------------------------------------------------------------------
def step_environment(work: Path, dry_run: bool) -> None:
    import platform

    import torch
    import triton

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dry_run": dry_run,
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available() and not dry_run:
        props = torch.cuda.get_device_properties(0)
        info.update(
            card=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=driver_version,clocks.max.sm,power.limit,persistence_mode",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["nvidia_smi"] = smi.stdout.strip()
            info["driver"] = smi.stdout.split(",")[0].strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            info["nvidia_smi"] = f"unavailable: {err}"
    else:
        info["card"] = "CPU (Triton interpreter)"
    append_jsonl(work / "environment.jsonl", info)
    print(json.dumps(info, indent=1))


# ---- step: correctness of every kernel path -------------------------------------------------------------------
# Accepted relative error (max |err| / max |ref| against float64) for y, J and every gradient, tied to
# measurement: in TF32, bf16 and fp16 at most twice what plain PyTorch errs in that precision on the
# same inputs and parameters (measured in each case), never required below the fp32 figure; in 3xTF32
# the interpreter's fp32 figures (tests/helpers.py: "float32" for y and J, "float32-gradient").
FP32_TOLERANCE = {"y": 2e-5, "J": 2e-5, "lap": 2e-5, "H": 2e-5, "grads": 5e-5}
MEASURED = ("tf32", "bfloat16", "float16")

# x as the kernels see it: (base shape, view of the base) for N points of d_in features
LAYOUTS = {
    "contiguous": (lambda n, d: (n, d), lambda b: b),
    "transposed": (lambda n, d: (d, n), lambda b: b.t()),
    "row-step": (lambda n, d: (2 * n, d), lambda b: b[::2]),
    "column-slice": (lambda n, d: (n, d + 2), lambda b: b[:, 1:-1]),
    "broadcast-leading": (lambda n, d: (1, n, d), lambda b: b.expand(2, *b.shape[1:])),
}


def correctness_cases(dry_run: bool) -> list[dict]:
    """The fewest cases that run every kernel path: both forward plans, both backward paths with and
    without tangents, every precision, every activation (parameters away from their defaults too),
    activations on the last layer, strided and broadcast inputs, widths, in/out features, k < in,
    bias absent or mixed, y-only forward, odd point counts. Each case compiles its own variants."""
    from tritonjac.activations import ACTIVATION_NAMES  # the registry: every activation

    s = sizes(dry_run)
    w, wide, n = s["width"], s["wide"], s["check_points"]
    ww = max(2 * w, 64)  # NeuS-like: the layer before the skip is narrowed by the 39 encoded features
    net = [w] * 3
    layouts, lasts = list(LAYOUTS), [None, "tanh", "sigmoid", "softplus", "sine"]
    cases = [
        dict(
            name=f"act-{a}",
            hidden=net,
            act=a,
            act_args={"softplus": (3.0, 5.0), "leaky_relu": (0.2,), "sine": (7.0,)}.get(a, ()),
            last=lasts[i % len(lasts)],
            layout=layouts[i % len(layouts)],
            precision="tf32",
            loss="both",
        )
        for i, a in enumerate(ACTIVATION_NAMES)
    ]
    cases += [
        dict(name="softplus100-tf32x3", hidden=net, act="softplus(100)", precision="tf32x3", loss="both"),
        dict(name="softplus100-tf32x3-y", hidden=net, act="softplus(100)", precision="tf32x3", loss="y"),
        dict(name="bf16-network", hidden=net, act="softplus(100)", precision="bfloat16", loss="both"),
        dict(name="fp16-network", hidden=net, act="tanh", precision="float16", loss="both", layout="transposed"),
        dict(name="tf32-loss-on-y", hidden=net, act="silu", precision="tf32", loss="y", layout="row-step"),
        dict(name="tf32-loss-on-J", hidden=net, act="silu", precision="tf32", loss="J", mixed_bias=True),
        dict(name="tf32-no-jacobian", hidden=net, act="relu", precision="tf32", loss="y", jacobian=False),
        dict(name="tf32-width128", hidden=[2 * w] * 2, act="softplus(100)", precision="tf32", loss="both"),
        dict(name="layers-wide-tf32", hidden=[wide] * 2, act="softplus(100)", precision="tf32", loss="both"),
        dict(name="layers-wide-bf16", hidden=[wide] * 2, act="softplus(100)", precision="bfloat16", loss="both"),
        dict(
            name="layers-mixed-tf32x3",
            hidden=[w, w // 2 + 3],
            act="gelu",
            last="tanh",
            precision="tf32x3",
            loss="both",
            layout="column-slice",
            mixed_bias=True,
        ),
        dict(
            name="layers-mixed-tf32-y",
            hidden=[w, w // 2 + 3],
            act="tanh",
            precision="tf32",
            loss="y",
            layout="transposed",
        ),
        dict(name="latent-k3-of-11", hidden=net, act="softplus(100)", precision="tf32", loss="both", d_in=11, k=3),
        dict(  # reverse mode, whole network; the fused backward's one seeded tangent
            name="sdf-out1-no-bias", hidden=net, act="softplus(100)", precision="tf32", loss="both", d_out=1, bias=False
        ),
        dict(  # the same SDF's J in forward mode (the backward seeds as well)
            name="sdf-forward-mode", hidden=net, act="softplus(100)", precision="tf32", loss="both", d_out=1,
            mode="forward", points=n + 5,
        ),
        # second derivatives on the per-layer kernels, forward and backward: the Laplacian row
        # (SIREN-like, and a softplus SDF with a latent code and a skip) and the Hessian's rows
        dict(name="laplacian-sine", hidden=[w, w], act="sine", precision="tf32", loss="both", d_out=1, laplacian=True),
        dict(
            name="laplacian-skip-latent", hidden=[w, w, w], act="softplus(100)", precision="tf32", loss="both",
            d_in=5, k=3, d_out=2, skips=(2,), laplacian=True,
        ),
        dict(name="hessian-tanh", hidden=[w, w], act="tanh", precision="tf32", loss="both", d_out=2, hessian=True),
        # real networks (per-layer kernels): NeuS's SDF (PE(6), a scaled skip, a narrowed layer,
        # output 0 of many in J) and Nerfies' warp (windowed PE(8), a code after xyz, outputs 3..5)
        dict(
            name="neus-sdf-tf32", hidden=[ww, ww, ww - 39, ww], act="softplus(100)", precision="tf32", loss="both",
            d_out=ww + 1, encoding=(6, None), skips=(3,), skip_scale=2**-0.5, outputs=1,
        ),
        dict(
            name="neus-sdf-bf16", hidden=[ww, ww, ww - 39, ww], act="softplus(100)", precision="bfloat16", loss="both",
            d_out=ww + 1, encoding=(6, None), skips=(3,), skip_scale=2**-0.5, outputs=1,
        ),
        dict(
            name="nerfies-warp-tf32", hidden=[w] * 4, act="relu", precision="tf32", loss="both", d_in=11, k=3,
            d_out=6, encoding=(8, 3.5), skips=(2,), outputs=(3, 6), layout="column-slice",
        ),
        dict(
            name="deepsdf-latent-first-tf32x3", hidden=[w] * 3, act="relu", last="tanh", precision="tf32x3",
            loss="both", d_in=11, k=(8, 11), d_out=1, skips=(2,),
        ),
    ]  # fmt: skip
    for c in cases:
        c.setdefault("points", n)
        c.setdefault("layout", "contiguous")
    return cases


def make_activation(name: str, args=()):
    """An activation by name, with non-default parameters where `args` gives them."""
    from torch import nn

    import tritonjac

    if name == "softplus(100)":
        return nn.Softplus(beta=100)
    modules = {"softplus": nn.Softplus, "leaky_relu": nn.LeakyReLU, "sine": tritonjac.Sine}
    return modules[name](*args) if args else name


def run_correctness_case(case: dict, dry_run: bool) -> dict:
    """y, J and every gradient of one case against float64, within twice plain PyTorch's own error
    in the case's precision; every buffer the kernels write fenced by poisoned guard rows."""
    import copy

    import torch

    import tritonjac
    from tritonjac import triton_engine
    from tritonjac.triton_engine import guards

    device = "cpu" if dry_run else "cuda"
    torch.manual_seed(zlib.crc32(case["name"].encode()))
    guarded = guards.GuardedAllocator()  # the case runs in a process of its own
    triton_engine.launch.set_allocator(guarded)
    torch.set_float32_matmul_precision("highest" if case["precision"] == "tf32x3" else "high")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(case["precision"], torch.float32)
    act = make_activation(case["act"], case.get("act_args", ()))
    last = make_activation(case["last"]) if case.get("last") else None
    d_in, d_out = case.get("d_in", 3), case.get("d_out", 3)
    k_arg, outputs = case.get("k"), case.get("outputs")
    encoding = (
        tritonjac.PositionalEncoding(case["encoding"][0], alpha=case["encoding"][1]) if "encoding" in case else None
    )
    reference = tritonjac.JacobianMLP(
        d_in,
        case["hidden"],
        d_out,
        act,
        output_activation=last,
        bias=case.get("bias", True),
        jacobian_inputs=slice(*k_arg) if isinstance(k_arg, (tuple, list)) else k_arg,
        jacobian_outputs=slice(*outputs) if isinstance(outputs, (tuple, list)) else outputs,
        encoding=encoding,
        skips=case.get("skips", ()),
        skip_scale=case.get("skip_scale", 1.0),
        backend="torch",
        dtype=torch.float64,
    )
    if case.get("mixed_bias"):
        reference.linear_layers[1].bias = None
    if case["act"] == "sine" or case.get("last") == "sine":
        with torch.no_grad():
            for layer in reference.linear_layers:
                layer.weight.div_(30.0)
    ours = copy.deepcopy(reference).to(device=device, dtype=dtype)
    ours.backend = "triton"
    with torch.no_grad():  # the reference gets the very same (rounded) parameters and points
        for a, b in zip(reference.parameters(), ours.parameters()):
            a.copy_(b.double())
    base_shape, view = LAYOUTS[case["layout"]]
    base = torch.randn(base_shape(case["points"], d_in), dtype=torch.float64).to(dtype).double()
    jacobian = case.get("jacobian", True)
    spec64 = reference._spec
    inputs = slice(spec64.input_start, spec64.input_start + spec64.jacobian_inputs)
    rows = spec64.output_rows(d_out)
    if case.get("mode"):
        ours.mode = case["mode"]
    x_ours = view(base.to(device=device, dtype=dtype)).reshape(-1, d_in)
    laplacian, hessian = case.get("laplacian", False), case.get("hessian", False)
    call = ours.plan(x_ours, laplacian=laplacian, hessian=hessian)  # the mode and the forward's plan
    plan = (
        f"{call.mode} {call.kernels}"
        if jacobian
        else triton_engine.planned_kind(x_ours, [m.weight for m in ours.linear_layers], ours._spec, False)
    )
    kernels, seeded = triton_engine.plans.backward_plan(
        x_ours, [m.weight for m in ours.linear_layers], ours._spec, jacobian and case["loss"] != "y"
    )
    backward = kernels + (" seeded" if seeded else "")
    if laplacian or hessian:
        second = "hessian" if hessian else "laplacian"
        plan, backward = f"{second} {call.kernels}", f"layers {second}"

    def loss_of(y, J, lap=None):  # lap: the Laplacian, or H
        loss = y.new_zeros((), dtype=torch.float32)
        if lap is not None:
            loss = loss + lap.float().square().sum() + lap.float().sum()
        if case["loss"] in ("y", "both"):
            weights_y = torch.linspace(-1, 2, y.shape[-1], device=y.device)
            loss = loss + (y.float() * weights_y).sum() + 0.5 * y.float().square().sum()
        if case["loss"] in ("J", "both"):
            loss = loss + J.float().square().sum() + J[..., 0, :].float().sum()
        return loss

    def run(forward, params, on):
        """y, J and the gradients w.r.t. the base of x and params, for x = view(base) on device `on`."""
        b = base.to(device=on, dtype=params[0].dtype).requires_grad_()
        outputs = forward(view(b))
        grads = torch.autograd.grad(loss_of(*outputs), [b, *params], allow_unused=True, materialize_grads=True)
        return [*outputs, *grads]

    def ours_forward(x):
        if laplacian or hessian:
            return ours(x, laplacian=laplacian, hessian=hessian)
        return ours(x) if jacobian else (ours(x, jacobian=False), None)

    def torch_forward(model):
        """Plain PyTorch: the network's own layers (the nn.Sequential forward, or the skips and the
        encoding in plain torch ops), J by torch.func (forward-mode AD) over the points."""
        plain = model._plain_forward

        def forward(x):
            x2d = x.contiguous().reshape(-1, d_in)  # torch.func needs memory of its own
            y = plain(x2d)
            J = torch.func.vmap(torch.func.jacfwd(plain))(x2d)[..., rows, inputs] if jacobian else None
            y, J = y.reshape(*x.shape[:-1], -1), None if J is None else J.reshape(*x.shape[:-1], *J.shape[-2:])
            if not (laplacian or hessian):
                return y, J
            H = torch.func.vmap(torch.func.hessian(plain))(x2d)[..., rows, inputs, inputs]
            if hessian:
                return y, J, H.reshape(*x.shape[:-1], *H.shape[-3:])
            return y, J, H.diagonal(dim1=-2, dim2=-1).sum(-1).reshape(*x.shape[:-1], -1)

        return forward, list(model.parameters())

    def all_tf32(model):
        """Plain PyTorch with every Linear in TF32 (operands rounded to nearest, fp32 products): how a
        failure against `torch_own` reads when cuBLAS kept some of its products in fp32."""
        from tritonjac.precision import tf32_linear

        forward, params = torch_forward(model)

        def in_tf32(x):
            with unittest.mock.patch.object(torch.nn.functional, "linear", tf32_linear):
                return forward(x)

        return in_tf32, params

    got = run(ours_forward, list(ours.parameters()), device)
    want = run(*torch_forward(reference), "cpu")
    torch_own = run(*torch_forward(ours), device)  # plain PyTorch in the case's precision, on the same device
    emulated = [None] * len(got)
    if case["precision"] == "tf32":  # diagnostic only: the tolerance stays 2x torch_own's error
        torch.set_float32_matmul_precision("highest")  # fp32 products of the rounded operands
        try:
            emulated = run(*all_tf32(ours), device)
        except Exception as err:  # the diagnostic must not cost the case its verdict
            print(f"  {case['name']}: all-TF32 PyTorch failed: {type(err).__name__}: {err}", flush=True)
        finally:
            torch.set_float32_matmul_precision("high")

    def rel(a, b):
        if a is None:
            return float("inf")
        a = a.detach().cpu().double()
        if not torch.isfinite(a).all():
            return float("inf")
        return ((a - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-300)).item()

    names = ["y", "J", *(["lap"] if laplacian else []), *(["H"] if hessian else [])]
    names += [f"grad {n}" for n in ["x", *(name for name, _ in ours.named_parameters())]]
    measured = case["precision"] in MEASURED
    errors, tolerances, torch_errors, tf32_errors = {}, {}, {}, {}
    for name, g, w, t, e in zip(names, got, want, torch_own, emulated):
        if name == "J" and not jacobian:
            continue
        floor = FP32_TOLERANCE[name if name in ("y", "J", "lap", "H") else "grads"]
        errors[name], torch_errors[name] = rel(g, w), rel(t, w)
        if e is not None:
            tf32_errors[name] = rel(e, w)
        tolerances[name] = max(2 * torch_errors[name], floor) if measured else floor
    failures = [n for n in errors if errors[n] is None or not errors[n] <= tolerances[n]]

    def why(n):
        all_tf32_error = f"; all-TF32 torch {tf32_errors[n]:.2e}" if n in tf32_errors else ""
        return f"{n}: {errors[n]:.2e} > {tolerances[n]:.2e} (torch {torch_errors[n]:.2e}{all_tf32_error})"

    problems = guarded.problems()
    return {
        **case,
        "plan": plan,
        "backward": backward,
        "errors": {
            "y": errors["y"],
            "J": errors.get("J"),
            **({"lap": errors["lap"]} if laplacian else {}),
            **({"H": errors["H"]} if hessian else {}),
            "grads": max(v for n, v in errors.items() if "grad" in n),
        },
        "worst_ratio": max(errors[n] / tolerances[n] for n in errors),
        "failures": [why(n) for n in failures],
        "torch_errors": torch_errors,
        "all_tf32_torch_errors": tf32_errors,
        "tolerances": tolerances,
        "guards": problems,
        "ok": not failures and not problems,
    }


def step_correctness(work: Path, dry_run: bool) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    cases = correctness_cases(dry_run)
    workers = max(1, min(len(cases), (os.cpu_count() or 2) - 2 if not dry_run else 2))
    print(f"{len(cases)} cases in {workers} processes (each compiles its own kernel variants)", flush=True)
    out = work / "correctness.jsonl"
    with ProcessPoolExecutor(
        workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(dry_run,)
    ) as pool:
        futures = {pool.submit(_correctness_worker, c, dry_run): c for c in cases}
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as err:  # a crash in one case is a failed case, not a failed step
                result = {**futures[future], "ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            append_jsonl(out, result)
            print(
                f"  {'ok  ' if result['ok'] else 'FAIL'} {result['name']}: {result.get('errors', result.get('error'))}",
                flush=True,
            )


def _worker_init(dry_run: bool) -> None:
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TRITONJAC_AUTOTUNE", "0")  # correctness, not speed: no timing runs
    counter = VariantCounter()
    counter.install()
    global _COUNTER
    _COUNTER = counter


_COUNTER = None


def _correctness_worker(case: dict, dry_run: bool) -> dict:
    before = set(_COUNTER.variants)
    result = run_correctness_case(case, dry_run)
    result["new_variants"] = sorted(repr(v) for v in _COUNTER.variants - before)
    return result


# ---- benchmark steps ----------------------------------------------------------------------------------------------
def _case(dry_run, **kw):
    from tritonjac import benchmark

    s = sizes(dry_run)
    kw.setdefault("n_points", s["points"])
    kw.setdefault("width", s["width"])
    return benchmark.Case(device="cpu" if dry_run else "cuda", **kw)


def _run_benchmark(
    work: Path,
    step: str,
    dry_run: bool,
    cases: list,
    *,
    include_compile: bool,
    methods=None,
    tuned_dir: Path | None = None,
    precompile: bool = True,
) -> None:
    """Run each (label, case, float32 matmul precision) case, precompiling its autotune candidates
    in parallel first; append its rows and write the tuned configurations after each case."""
    import torch

    from tritonjac import benchmark

    counter = VariantCounter()
    counter.install()
    s = sizes(dry_run)
    # in a dry run two processes prove the mechanics (the interpreter compiles nothing)
    workers = 2 if dry_run else max(1, min(12, (os.cpu_count() or 2) - 2))
    precompiler = Precompiler(workers if precompile else 1)
    for label, case, precision in cases:
        start = time.perf_counter()
        torch.set_float32_matmul_precision(precision)
        precompiler.run(_Prewarm(case, precision))
        rows = benchmark.run_case(
            case, rounds=s["rounds"], include_compile=include_compile, methods=methods, max_seconds=10.0
        )
        print(benchmark.format_table(rows), flush=True)
        if tuned_dir is not None:
            benchmark.write_tuned_configs(str(tuned_dir), case.device)
        append_jsonl(
            work / f"{step}.jsonl",
            {"label": label, "rows": rows, "seconds": time.perf_counter() - start, "variants": len(counter.variants)},
        )
    precompiler.close()


class _Prewarm:
    """Picklable: builds the case's model at a small point count and runs forward (and backward)."""

    def __init__(self, case, precision: str):
        self.case, self.precision = case, precision

    def __call__(self, train: bool):
        import dataclasses

        import torch

        from tritonjac import benchmark

        torch.set_float32_matmul_precision(self.precision)
        # the compiled kernels do not depend on the point count (not specialized on it)
        model, _, x = benchmark.build(dataclasses.replace(self.case, n_points=min(8192, self.case.n_points)))
        if train:
            y, J = model(x)
            benchmark._loss(y, J).backward()
            benchmark.per_layer(lambda: benchmark._loss(*model(x)).backward())()  # the other plan's kernels
        else:
            with torch.no_grad():
                model(x)
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def step_main(work: Path, dry_run: bool, step: str) -> None:
    """The benchmark steps. Every one writes the tuned configurations after each of its cases."""
    configs = work / "configs"
    main, bf16 = _case(dry_run), _case(dry_run, dtype="bfloat16")
    if step == "main-tf32":  # ours against the eager peers
        _run_benchmark(work, step, dry_run, [("main TF32", main, "high")], include_compile=False, tuned_dir=configs)
    elif step == "main-tf32-compiled":  # the torch.compile peers (minutes of compiling), ours timed beside them
        _run_benchmark(
            work,
            step,
            dry_run,
            [("main TF32, compiled peers", main, "high")],
            include_compile=True,
            methods=["tritonjac (triton)", "torch.compile"],
            tuned_dir=configs,
            precompile=False,
        )
    elif step == "main-bf16":
        _run_benchmark(work, step, dry_run, [("main bf16", bf16, "high")], include_compile=False, tuned_dir=configs)
    elif step == "tune":
        # the whole-network cases first; the per-layer backward cases last (3xTF32 and widths above
        # 128: their backward kernels compile in one process, about 30 s each cold)
        s = sizes(dry_run)
        narrow, wide = [w for w in s["tune_widths"] if w <= 128], [w for w in s["tune_widths"] if w > 128]
        cases = [("main TF32", main, "high"), ("main bf16", bf16, "high")]
        cases += [(f"depth {d}", _case(dry_run, depth=d), "high") for d in (2, 8)]
        cases += [(f"width {w}", _case(dry_run, width=w), "high") for w in narrow]
        cases += [("main 3xTF32", main, "highest")]
        cases += [(f"width {w}", _case(dry_run, width=w), "high") for w in wide]
        _run_benchmark(
            work,
            step,
            dry_run,
            cases,
            include_compile=False,
            tuned_dir=configs,
            methods=["tritonjac (triton)", "nn.Sequential forward"],
        )


def step_real_networks(work: Path, dry_run: bool) -> None:
    """NeuS's SDF network and Nerfies' warp field (perf/real_networks.py) in TF32: forward + J and a
    training step against plain autograd, at their sizes (N = 65,536 and 2^18; a dry run: narrow
    and 1/1024 of the points)."""
    import importlib.util

    import torch

    # fixed configurations: autotuning every layer shape of both networks cold would not fit the step
    os.environ["TRITONJAC_AUTOTUNE"] = "0"
    spec = importlib.util.spec_from_file_location("real_networks", HERE / "real_networks.py")
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    torch.set_float32_matmul_precision("high")
    device = "cpu" if dry_run else "cuda"
    # Nerfies first: the warp field is the network whose 3x target this step checks first (NeuS's SDF,
    # a scalar field, has its own issue); cold compiles left the first H200 run time for NeuS alone
    networks = sorted(real.NETWORKS.items(), key=lambda item: not item[0].startswith("Nerfies"))
    for name, build in networks:
        start = time.perf_counter()
        rows = real.run(
            name, build, device, torch.float32, 2**-10 if dry_run else 1.0, sizes(dry_run)["rounds"], False, 8.0,
            small=dry_run,
        )  # fmt: skip
        print(real.format_rows(rows), flush=True)
        append_jsonl(
            work / "real-networks.jsonl", {"label": name, "rows": rows, "seconds": time.perf_counter() - start}
        )


def step_scalar_fields(work: Path, dry_run: bool) -> None:
    """SDFs trained through their gradient (perf/scalar_fields.py) in TF32: the NeuS network and
    3 -> 4x64 -> 1 at N = 2^20, y + gradient and an eikonal step, tritonjac in both modes against
    autograd, with peak memory (a dry run: 1/1024 of the points, on CPU)."""
    import importlib.util

    import torch

    os.environ["TRITONJAC_AUTOTUNE"] = "0"
    sys.path.insert(0, str(HERE))  # scalar_fields imports real_networks
    spec = importlib.util.spec_from_file_location("scalar_fields", HERE / "scalar_fields.py")
    fields = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fields)
    torch.set_float32_matmul_precision("high")
    device = "cpu" if dry_run else "cuda"
    # the 64-wide SDF first: its 5x target is the hardest, and its whole-network reverse kernel and
    # seeded fused backward have never run on a GPU (NeuS runs per layer)
    cases = sorted(fields.CASES["cuda"].items(), key=lambda item: not item[0].startswith("SDF"))
    for name, build in cases:
        start = time.perf_counter()
        scale = 2**-10 if dry_run else 1.0
        rows = fields.run(name, build, device, torch.float32, scale, sizes(dry_run)["rounds"], False, 8.0)
        print(fields.format_rows(rows), flush=True)
        append_jsonl(
            work / "scalar-fields.jsonl", {"label": name, "rows": rows, "seconds": time.perf_counter() - start}
        )


def step_second_order(work: Path, dry_run: bool) -> None:
    """The Laplacian in the forward pass (perf/second_order.py) in TF32: SIREN's network at N = 2^18
    and a 64-wide softplus MLP at N = 2^20, y + J + Laplacian and a Poisson step, against nested
    autograd and torch.func's vmap(hessian), with peak memory (a dry run: 1/1024 of the points)."""
    import importlib.util

    import torch

    sys.path.insert(0, str(HERE))  # second_order imports real_networks and scalar_fields
    spec = importlib.util.spec_from_file_location("second_order", HERE / "second_order.py")
    second = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(second)
    torch.set_float32_matmul_precision("high")
    device = "cpu" if dry_run else "cuda"
    for name, build in second.CASES["cuda"].items():
        start = time.perf_counter()
        scale = 2**-10 if dry_run else 1.0
        rows = second.run(name, build, device, torch.float32, scale, sizes(dry_run)["rounds"], 8.0)
        print(second.format_rows(rows), flush=True)
        append_jsonl(work / "second-order.jsonl", {"label": name, "rows": rows, "seconds": time.perf_counter() - start})


def step_profile(work: Path, dry_run: bool) -> None:
    """Where our main-case time goes (TF32): device time per kernel under torch.profiler, per call of
    forward + J and of a training step, after warm-up runs that autotune (main-tf32 left the kernels
    compiled in Triton's cache)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tritonjac import benchmark

    torch.set_float32_matmul_precision("high")
    model, _, x = benchmark.build(_case(dry_run))
    cuda = not dry_run

    def forward():
        with torch.no_grad():
            model(x)

    def train_step():
        y, J = model(x)
        benchmark._loss(y, J).backward()

    reps = 5
    for mode, fn in (("forward_jacobian", forward), ("train_step", train_step)):
        for _ in range(2):
            fn()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / reps  # against device time: launch or host bound?
        activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            for _ in range(reps):
                fn()
            if cuda:
                torch.cuda.synchronize()
        rows = []
        for event in prof.key_averages():
            if cuda:
                us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
            else:
                us = event.self_cpu_time_total
            if us > 0:
                rows.append({"kernel": event.key[:90], "calls": event.count / reps, "ms": us / 1e3 / reps})
        rows.sort(key=lambda r: -r["ms"])
        total = sum(r["ms"] for r in rows)
        print(f"{mode}: {total:.3f} ms of device time per call, {wall_ms:.3f} ms wall", flush=True)
        for r in rows[:12]:
            print(f"  {r['ms']:8.3f} ms {r['ms'] / total:6.1%} {r['calls']:6.1f} calls  {r['kernel']}", flush=True)
        append_jsonl(work / "profile.jsonl", {"mode": mode, "total_ms": total, "wall_ms": wall_ms, "rows": rows[:25]})


# The tests that run compiled kernels on a GPU (the CPU-side compile workers excepted); about 210
# kernel variants, compiled by pytest-xdist's processes in parallel.
GPU_TESTS = [
    "tests/test_triton_gpu.py",
    "tests/test_compile.py",
    "tests/test_triton_forward.py",
    "tests/test_triton_backward.py",
    "-k",
    "not sees_the_kernels and not for_sm90",
]


def step_gpu_tests(work: Path, dry_run: bool) -> None:
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS]
    if dry_run:  # the interpreter: a slice is enough to prove the step
        args[-1] += " and (depths or point_counts)"
    else:
        args[3:3] = ["-n", str(max(1, min(14, (os.cpu_count() or 2) - 2)))]  # pytest-xdist
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    append_jsonl(work / "gpu-tests.jsonl", {"returncode": proc.returncode, "last_line": last})
    if proc.returncode:
        raise SystemExit(proc.returncode)  # the step fails with the tests


STEP_FUNCTIONS = {
    "environment": step_environment,
    "correctness": step_correctness,
    "main-tf32": lambda work, dry: step_main(work, dry, "main-tf32"),
    "profile": step_profile,
    "real-networks": step_real_networks,
    "scalar-fields": step_scalar_fields,
    "second-order": step_second_order,
    "main-tf32-compiled": lambda work, dry: step_main(work, dry, "main-tf32-compiled"),
    "main-bf16": lambda work, dry: step_main(work, dry, "main-bf16"),
    "tune": lambda work, dry: step_main(work, dry, "tune"),
    "gpu-tests": step_gpu_tests,
}


# ---- the driver ---------------------------------------------------------------------------------------------------
def run_step(name: str, limit: float, work: Path, dry_run: bool) -> dict:
    """Run one step in its own process group; kill the group at the limit."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--work", str(work)]
    cmd += ["--dry-run"] if dry_run else []
    start = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else f"failed (exit code {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out at {limit:.0f} s"
    return {"status": status, "seconds": round(time.perf_counter() - start, 1), "limit_s": limit}


def collect(work: Path, mode: str, steps: dict) -> dict:
    """Everything the work folder holds, as one summary."""
    from tritonjac import benchmark

    env = (read_jsonl(work / "environment.jsonl") or [{}])[-1]
    summary = {"mode": mode, "environment": env, "steps": steps}
    checks = read_jsonl(work / "correctness.jsonl")
    if checks:
        summary["correctness"] = checks
    summary["gpu_tests"] = read_jsonl(work / "gpu-tests.jsonl")
    runs = {}
    for step in ("main-tf32", "main-tf32-compiled", "main-bf16", "tune"):
        for record in read_jsonl(work / f"{step}.jsonl"):
            runs[record["label"]] = record
            steps.setdefault(step, {})["variants"] = record.get("variants")
    summary["runs"] = runs
    summary["real_networks"] = read_jsonl(work / "real-networks.jsonl")
    summary["scalar_fields"] = read_jsonl(work / "scalar-fields.jsonl")
    summary["second_order"] = read_jsonl(work / "second-order.jsonl")
    summary["profile"] = read_jsonl(work / "profile.jsonl")
    targets = []
    for label, record in runs.items():
        if not label.startswith("main"):
            continue
        for text, value, sense, target, met in benchmark.check_targets(record["rows"]):
            if value is None:
                continue
            if "compiled peers" in label and "torch.compile" not in text:
                continue  # that run times ours beside the compiled peers only
            if label == "main bf16" and "matmul" not in text:
                continue  # in bf16 the target is the fraction of the bf16 matmul rate
            targets.append(
                {"run": label, "target": text, "value": value, "sense": sense, "required": target, "met": met}
            )
    for record in summary["real_networks"]:  # the target: 3x faster than plain autograd
        for row in record["rows"]:
            if row["method"] == "autograd.grad per output" and row.get("relative_to_tritonjac"):
                ratio = row["relative_to_tritonjac"]
                targets.append(
                    {
                        "run": record["label"].split(" (")[0],
                        "target": f"{row['mode']}: autograd time / ours",
                        "value": ratio,
                        "sense": ">=",
                        "required": 3.0,
                        "met": ratio >= 3.0,
                    }
                )
    for record in summary["scalar_fields"]:  # 2x faster than autograd at width 256, 5x at 64; a third of its memory
        required = 5.0 if "4x64" in record["label"] else 2.0
        for row in record["rows"]:
            if row["method"] != "autograd":
                continue
            run = record["label"].split(" (")[0].split(",")[0]
            for what, value, sense, bound in (
                ("autograd time / ours", row.get("relative_to_tritonjac"), ">=", required),
                ("autograd peak memory / ours", row.get("memory_relative_to_tritonjac"), ">=", 3.0),
            ):
                if value:
                    met = value >= bound
                    targets.append(
                        {"run": run, "target": f"{row['mode']}: {what}", "value": value, "sense": sense,
                         "required": bound, "met": met}
                    )  # fmt: skip
    for record in summary["second_order"]:  # 5x faster than nested autograd, 3x than vmap(hessian)
        for row in record["rows"]:
            required = {"nested autograd": 5.0, "torch.func vmap(hessian), trace": 3.0}.get(row["method"])
            value = row.get("relative_to_tritonjac")
            if required and value:
                targets.append(
                    {"run": record["label"].split(",")[0], "target": f"{row['mode']}: {row['method']} time / ours",
                     "value": value, "sense": ">=", "required": required, "met": value >= required}
                )  # fmt: skip
    summary["targets"] = targets
    tables = {}
    for path in sorted((work / "configs").glob("*.json")) if (work / "configs").exists() else []:
        tables[path.name] = json.loads(path.read_text())
    summary["tuned_configs"] = tables
    for name, info in steps.items():
        cases = len(read_jsonl(work / f"{name}.jsonl"))
        info["cases_done"] = cases
        if name == "correctness" and checks:
            info["variants"] = len({v for c in checks for v in c.get("new_variants", [])})
    return summary


def format_summary(summary: dict) -> str:
    """Text summary; the main TF32 table and the targets come last (what a cut-off output keeps)."""
    from tritonjac import benchmark

    env = summary["environment"]
    lines = [
        f"tritonjac GPU check ({summary['mode']}{', dry run' if env.get('dry_run') else ''}) on "
        f"{env.get('card', '?')} (sm {env.get('capability', '-')}, driver {env.get('driver', '-')}), "
        f"torch {env.get('torch')}, triton {env.get('triton')}, {env.get('date')}"
    ]
    lines.append("\nsteps:")
    for name, info in summary["steps"].items():
        extra = f", {info['variants']} kernel variants" if info.get("variants") is not None else ""
        lines.append(
            f"  {name:20s} {info.get('status', '?'):28s} {info.get('seconds', 0):6.1f} s "
            f"(limit {info.get('limit_s', 0):.0f}), {info.get('cases_done', 0)} cases{extra}"
        )
    for record in summary.get("gpu_tests", []):
        lines.append(f"\nGPU tests: {record['last_line']} (exit code {record['returncode']})")
    checks = summary.get("correctness", [])
    if checks:
        bad = [c for c in checks if not c["ok"]]
        lines.append(
            f"\ncorrectness: {len(checks) - len(bad)} of {len(checks)} cases within tolerance "
            "(y, J, gradients vs float64, at most 2x plain PyTorch's error in TF32/bf16/fp16; "
            "every kernel buffer fenced by guard rows)"
        )
        by_precision = {}
        for c in checks:
            if "errors" in c:
                worst = max(v for v in c["errors"].values() if v is not None)
                by_precision[c["precision"]] = max(by_precision.get(c["precision"], 0.0), worst)
        lines.append(
            "  worst error per precision: " + ", ".join(f"{p} {e:.1e}" for p, e in sorted(by_precision.items()))
        )
        ratios = [c["worst_ratio"] for c in checks if "worst_ratio" in c]
        if ratios:
            lines.append(f"  largest error / tolerance: {max(ratios):.2f}")
        paths = sorted({(c.get("plan"), c.get("backward")) for c in checks if "plan" in c})
        lines.append("  paths run (forward plan, backward): " + ", ".join(f"{p}/{b}" for p, b in paths))
        for c in bad:
            why = c.get("failures", []) + c.get("guards", []) or [c.get("error")]
            lines.append(f"  FAILED {c['name']}: {'; '.join(map(str, why))}")
    runs = summary.get("runs", {})
    tune = [r for label, r in runs.items() if not label.startswith("main")] + (
        [runs[label] for label in runs if label.startswith("main") and summary["mode"] == "tune"]
    )
    if tune:
        lines.append("\nconfig sweep (tritonjac triton, median ms and fraction of the measured matmul peak):")
        for record in tune:
            for row in record["rows"]:
                if row["method"] == "tritonjac (triton)" and row.get("median_ms"):
                    frac = row.get("fraction_of_matmul_peak")
                    lines.append(
                        f"  {record['label']:12s} {row['mode']:17s} {row['median_ms']:9.3f} ms "
                        f"{row['points_per_s'] / 1e6:9.1f} Mpoints/s" + (f" {frac:6.1%}" if frac else "")
                    )
    for record in summary.get("profile", []):
        lines.append(
            f"\n== profile, main TF32, {record['mode']}: {record['total_ms']:.3f} ms of device time per call, "
            f"{record.get('wall_ms', 0):.3f} ms wall"
        )
        for row in record["rows"][:6]:
            share = row["ms"] / record["total_ms"] if record["total_ms"] else 0.0
            lines.append(f"  {row['ms']:8.3f} ms {share:6.1%} {row['calls']:5.1f}x  {row['kernel'][:70]}")
    for record in summary.get("real_networks", []) + summary.get("scalar_fields", []) + summary.get("second_order", []):
        plan = record["rows"][0].get("plan") if record["rows"] else None  # the scalar fields' plan
        lines.append(f"\n== {record['label']}" + (f" ({plan})" if plan else ""))
        for row in record["rows"]:
            if row.get("median_ms") is None:
                lines.append(f"  {row['mode']:17s} {row['method']:40s} {row['status']}")
            else:
                memory = row.get("peak_mem_mb")
                lines.append(
                    f"  {row['mode']:17s} {row['method']:40s} {row['median_ms']:9.3f} ms "
                    f"x{row['relative_to_tritonjac']:.2f}" + (f" {memory:8.1f} MB" if memory is not None else "")
                )
    for label in sorted(runs, key=lambda l: (l != "main bf16", l != "main TF32, compiled peers", l)):
        if label.startswith("main") and summary["mode"] == "quick":
            lines.append(f"\n== {label}")
            lines.append(benchmark.format_table(runs[label]["rows"]).strip("\n"))
    if summary["tuned_configs"]:
        count = sum(len(e) for t in summary["tuned_configs"].values() for e in t.values())
        lines.append(f"\ntuned configurations: {count} entries in {', '.join(summary['tuned_configs'])} (results.tgz)")
    if summary["targets"]:
        lines.append("\ntargets (value vs required, per run):")
        for t in summary["targets"]:
            verdict = "met" if t["met"] else "MISSED"
            lines.append(f"  [{t['run']}] {t['target']}: {t['value']:.2f} ({t['sense']} {t['required']}) {verdict}")
    return "\n".join(lines) + "\n"


def package(out: Path, work: Path, summary: dict) -> None:
    """Rewrite the files a lease brings back: summary.json, summary.txt, results.tgz, <= 5 plots."""
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.txt").write_text(format_summary(summary))
    plots = []
    try:
        plots = make_plots(summary, work)
    except Exception as err:  # plots are the least important output
        (work / "plots.log").write_text(f"{type(err).__name__}: {err}\n")
    for old in out.glob("*.png"):
        old.unlink()
    for path in plots[:MAX_PLOTS]:
        shutil.copy(path, out / path.name)
    tmp = out / "results.tgz.part"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(work, arcname="results")
    tmp.replace(out / "results.tgz")


def make_plots(summary: dict, work: Path) -> list[Path]:
    from tritonjac import benchmark

    plots = []
    for label, record in summary.get("runs", {}).items():
        if label in ("main TF32", "main bf16"):
            path = work / f"{label.replace(' ', '-').lower()}.png"
            if not path.exists():
                benchmark.plot_case(record["rows"], str(path))
            plots.append(path)
    sweep = [r for label, r in summary.get("runs", {}).items() if label.startswith(("width", "depth"))]
    if sweep:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        for mode in benchmark.MODES:
            pts = [
                (r["label"], row["points_per_s"] / 1e6)
                for r in sweep
                for row in r["rows"]
                if row["method"] == "tritonjac (triton)" and row["mode"] == mode and row.get("median_ms")
            ]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=mode.replace("_", " "))
        ax.set_ylabel("Mpoints/s")
        ax.set_title(f"tritonjac config sweep on {summary['environment'].get('card')}")
        ax.legend()
        fig.tight_layout()
        path = work / "sweep.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots.append(path)
    return plots


def finish(out: Path, work: Path, mode: str, steps: dict, start: float) -> None:
    summary = collect(work, mode, steps)
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    package(out, work, summary)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="correctness + main case (default)")
    group.add_argument("--tune", action="store_true", help="the config sweep")
    group.add_argument("--tests", action="store_true", help="the GPU-only pytest tests")
    group.add_argument("--real", action="store_true", help="the real networks (NeuS, Nerfies) alone")
    group.add_argument("--second", action="store_true", help="second derivatives (Laplacians) alone")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="where the files to bring back go ($OUT)")
    p.add_argument("--skip", nargs="*", default=[], help="steps to leave out")
    p.add_argument("--limit", action="append", default=[], metavar="STEP=SECONDS", help="override a step's limit")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole call (default {GPU_BUDGET_S} on a GPU, none in a dry run)",
    )
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.step:  # a step, in its own process
        if args.dry_run:
            os.environ["TRITON_INTERPRET"] = "1"
        from tritonjac import benchmark

        with benchmark.quiet_torch_warnings():
            STEP_FUNCTIONS[args.step](Path(args.work), args.dry_run)
        return 0

    mode = (
        "tune"
        if args.tune
        else "tests"
        if args.tests
        else "real"
        if args.real
        else "second"
        if args.second
        else "quick"
    )
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    limits = dict(item.split("=") for item in args.limit)
    budget = args.budget if args.budget is not None else (None if args.dry_run or mode == "tests" else GPU_BUDGET_S)
    started = float(os.environ.get("GPU_CHECK_STARTED", time.time()))  # the shell script's start (install)
    start = time.perf_counter()
    steps = {}
    for name, gpu_limit, dry_limit in MODES[mode]:
        if name in args.skip:
            continue
        limit = float(limits.get(name, dry_limit if args.dry_run else gpu_limit))
        if budget is not None:
            left = budget - (time.time() - started) - 5  # 5 s to package
            if left < 10:
                steps[name] = {"status": "skipped: out of the call's budget", "seconds": 0, "limit_s": 0}
                continue
            limit = min(limit, left)
        print(f"[{time.perf_counter() - start:5.0f} s] {name} (limit {limit:.0f} s)", flush=True)
        steps[name] = run_step(name, limit, work, args.dry_run)
        print(f"[{time.perf_counter() - start:5.0f} s] {name}: {steps[name]['status']}", flush=True)
        finish(out, work, mode, steps, start)
    finish(out, work, mode, steps, start)
    shutil.rmtree(work)  # it travels inside results.tgz
    text = (out / "summary.txt").read_text()
    print("\n" + (text if len(text) <= MAX_PRINTED_SUMMARY else "...\n" + text[-MAX_PRINTED_SUMMARY:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
