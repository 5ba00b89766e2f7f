"""Side-by-side timing of tritonjac against its peers (docs/design.md, section 7).

One case = one MLP shape, one point count, one dtype, one device. Every method of a mode is timed in
interleaved rounds (A B C A B C ...), so that a noisy machine slows all of them alike, and the
median, 20th and 80th percentiles are kept. Peak memory is measured per method after timing:
`torch.cuda.max_memory_allocated` on a GPU; on CPU the growth of the resident set during one call
(Linux: VmHWM reset through /proc/self/clear_refs after malloc_trim).

Rows share one schema (`ROW_FIELDS`) for JSON/CSV, so plots and tables read the same files.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .activations import as_activation
from .module import JacobianMLP
from .precision import float32_matmul_precision

MODES = ("forward_jacobian", "train_step")
ROW_FIELDS = (
    "date",
    "device",
    "device_name",
    "torch",
    "triton",
    "threads",
    "mode",
    "method",
    "n_points",
    "in_features",
    "width",
    "depth",
    "out_features",
    "activation",
    "dtype",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "points_per_s",
    "useful_gflops",
    "peak_mem_mb",
    "speedup_vs_method",
    "status",
    "matmul_precision",
    "matmul_peak_tflops",
    "fraction_of_matmul_peak",
)


@dataclass(frozen=True)
class Case:
    n_points: int = 65536
    in_features: int = 3
    width: int = 64
    depth: int = 4  # hidden layers
    out_features: int = 3
    activation: str = "softplus(100)"
    dtype: str = "float32"
    device: str = "cpu"

    def activation_module(self) -> nn.Module:
        name, _, arg = self.activation.partition("(")
        if name == "softplus":
            return nn.Softplus(beta=float(arg.rstrip(")") or 1.0))
        return as_activation(name).to_module()

    def useful_flops(self, mode: str) -> float:
        """Matmul flops of forward + tangents (docs/design.md, section 2); x3 for a training step."""
        widths = [self.in_features] + [self.width] * self.depth + [self.out_features]
        k = self.in_features
        forward = sum(2 * a * b for a, b in zip(widths, widths[1:]))
        tangents = sum(2 * k * a * b for a, b in zip(widths[1:], widths[2:]))
        total = (forward + tangents) * self.n_points
        return total * (3 if mode == "train_step" else 1)


def build(case: Case, seed: int = 0):
    """The JacobianMLP, the equivalent nn.Sequential (same parameters) and the input points."""
    torch.manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    model = JacobianMLP(
        case.in_features,
        [case.width] * case.depth,
        case.out_features,
        case.activation_module(),
        device=case.device,
        dtype=dtype,
    )
    x = torch.randn(case.n_points, case.in_features, device=case.device, dtype=dtype)
    return model, model.to_sequential(), x


def _loss(y, J):
    # a loss on y and on J, as in training with a Jacobian regulariser
    return y.square().mean() + J.square().mean()


# ---- the peers ---------------------------------------------------------------------------------------
def _three_grads(seq, x, create_graph):
    """The seed's trick: one reverse pass per output component."""
    x = x.detach().requires_grad_()
    y = seq(x)
    ones = torch.ones_like(y[..., 0])
    rows = [
        torch.autograd.grad(y[..., i], x, ones, create_graph=create_graph, retain_graph=True)[0]
        for i in range(y.shape[-1])
    ]
    return y, torch.stack(rows, dim=-2)


def _batched_grads(seq, x, create_graph):
    """The same trick with all reverse passes batched by autograd (is_grads_batched)."""
    x = x.detach().requires_grad_()
    y = seq(x)
    d = y.shape[-1]
    eye = torch.eye(d, dtype=y.dtype, device=y.device).unsqueeze(1).expand(d, *y.shape)
    J = torch.autograd.grad(y, x, eye, create_graph=create_graph, is_grads_batched=True)[0]
    return y, J.movedim(0, -2)


def func_jacobian(seq, transform):
    """x -> (y, J) of a per-point module through torch.func.vmap(transform(...)) (jacfwd or jacrev)."""

    def f(p):
        y = seq(p)
        return y, y

    per_point = torch.func.vmap(transform(f, has_aux=True))

    def run(x):
        J, y = per_point(x)
        return y, J

    return run


def _dense_jacobian(seq, x):
    """torch.autograd.functional.jacobian: the (N, d, N, d) tensor, then its diagonal blocks."""
    J = torch.autograd.functional.jacobian(seq, x, vectorize=True)
    idx = torch.arange(x.shape[0], device=x.device)
    return seq(x), J[idx, :, idx, :]


# The physical limit each table is read against, shown as a row of its own: on CPU the time of the
# method's unavoidable matmuls alone (forward and tangents stacked, (1 + k) rows per point; a training
# step adds the weight-gradient and propagation matmuls), on GPU the measured matmul peak's floor.
CPU_LIMIT = "limit: the matmuls alone"
GPU_LIMIT = "limit: roofline at measured matmul peak"


def _matmuls_alone(case: Case, model, x, train: bool):
    """A callable running just the matmuls of forward + tangents (and their backward for a training
    step) on preallocated random operands of the right shapes: the GEMM floor of every method."""
    k = case.in_features
    n = case.n_points
    buffers = {}

    def buffer(*shape):
        if shape not in buffers:
            buffers[shape] = torch.randn(*shape, device=x.device, dtype=x.dtype)
        return buffers[shape]

    gemms = []  # (a, b, out): out = a @ b
    for l, layer in enumerate(model.linear_layers):
        W = layer.weight.detach()
        d_out, d_in = W.shape
        rows = n if l == 0 else (1 + k) * n  # U_1 is W_1's columns: no tangent matmul in layer 1
        A, Z = buffer(rows, d_in), buffer(rows, d_out)
        gemms.append((A, W.t(), Z))
        if train:
            gemms.append((Z.t(), A, buffer(d_out, d_in)))  # weight gradient
            if l > 0:
                gemms.append((Z, W, A))  # propagation to the previous layer

    def run():
        for a, b, out in gemms:
            torch.mm(a, b, out=out)
        return None, None

    return run


PER_LAYER_BACKWARD = "tritonjac (triton, per-layer backward)"


def per_layer(step):
    """A training step whose backward runs per layer, whatever the plan would pick."""
    from .triton_engine import per_layer_backward

    def run():
        with per_layer_backward():
            step()

    return run


def method_table(case: Case, model, seq, x, *, include_compile: bool = True):
    """name -> (forward_jacobian callable or None, train_step callable or None).

    Every callable takes no argument; forward ones return (y, J), train ones run one step.
    """
    params = list(model.parameters())
    jacfwd = func_jacobian(seq, torch.func.jacfwd)
    jacrev = func_jacobian(seq, torch.func.jacrev)

    def train(fn):
        def step():
            for p in params:
                p.grad = None
            y, J = fn()
            _loss(y, J).backward()

        return step

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    table = {}
    if x.device.type == "cuda" or (_interpreting() and x.dtype != torch.float64):
        # both engines, the Triton kernels first ("ours" in the ratios)
        triton_model = model if x.device.type == "cuda" else JacobianMLP.from_module(seq, backend="triton")
        torch_model = JacobianMLP.from_module(seq, backend="torch")
        table["tritonjac (triton)"] = (no_grad(lambda: triton_model(x)), train(lambda: triton_model(x)))
        # the other backward plan of the same network: which one a GPU should take is measured here
        table[PER_LAYER_BACKWARD] = (None, per_layer(train(lambda: triton_model(x))))
        if x.dtype in (torch.float32, torch.float64) or x.device.type == "cpu":
            table["tritonjac (torch)"] = (no_grad(lambda: torch_model(x)), train(lambda: torch_model(x)))
    else:
        table["tritonjac (torch)"] = (no_grad(lambda: model(x)), train(lambda: model(x)))
    table |= {
        "nn.Sequential forward (no J)": (no_grad(lambda: (seq(x), None)), None),
        "3x autograd.grad (seed)": (lambda: _three_grads(seq, x, False), train(lambda: _three_grads(seq, x, True))),
        "autograd.grad is_grads_batched": (
            lambda: _batched_grads(seq, x, False),
            train(lambda: _batched_grads(seq, x, True)),
        ),
        "vmap(jacfwd)": (no_grad(lambda: jacfwd(x)), train(lambda: jacfwd(x))),
        "vmap(jacrev)": (no_grad(lambda: jacrev(x)), train(lambda: jacrev(x))),
    }
    if x.device.type == "cpu":
        table[CPU_LIMIT] = (_matmuls_alone(case, model, x, False), _matmuls_alone(case, model, x, True))
    if case.n_points <= 1024:
        table["autograd.functional.jacobian"] = (lambda: _dense_jacobian(seq, x), None)
    if include_compile:
        compiled_jacfwd = torch.compile(jacfwd)
        compiled_seq = torch.compile(seq)
        table["torch.compile(vmap(jacfwd))"] = (no_grad(lambda: compiled_jacfwd(x)), train(lambda: compiled_jacfwd(x)))
        table["torch.compile(seq) + 3x grad"] = (
            lambda: _three_grads(compiled_seq, x, False),
            train(lambda: _three_grads(compiled_seq, x, True)),
        )
    return table


def _interpreting() -> bool:
    """Triton's CPU interpreter is on (then the Triton engine runs on CPU tensors: the GPU check's dry run)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---- measuring -----------------------------------------------------------------------------------------
def _elapsed_ms(fn, device, reps: int = 1) -> float:
    """Time per call of fn over `reps` back-to-back calls (CUDA events on GPUs, wall clock on CPU).
    On a GPU everything names the case's device: the current device may be another one."""
    if device.startswith("cuda"):
        dev = torch.device(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(dev)
        torch.cuda.synchronize(dev)
        start.record(stream)
        for _ in range(reps):
            fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / reps
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) * 1e3 / reps


# On GPUs one call can take well under a millisecond: repeat it until a measurement lasts this long,
# so launch gaps and timer resolution do not dominate.
GPU_MEASUREMENT_MS = 5.0


def matmul_peak_tflops(device: str, dtype: torch.dtype, size: int = 8192) -> float:
    """Measured dense matmul rate (TFLOP/s) of a size^3 matmul in this dtype and fp32 matmul setting."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    ms = min(_elapsed_ms(lambda: a @ b, device, reps=10) for _ in range(5))
    return 2 * size**3 / ms / 1e9


def _libc():
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6")
    return None


def _proc_status_bytes(key: str) -> int | None:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    return None


def peak_memory_mb(fn, device: str) -> float | None:
    """Extra memory held at the peak of one call of fn, beyond what existed before it."""
    gc.collect()
    if device.startswith("cuda"):
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    libc = _libc()
    if libc is None or _proc_status_bytes("VmHWM:") is None:
        return None
    libc.malloc_trim(0)  # give freed heap back, so the resident set is live memory only
    before = _proc_status_bytes("VmRSS:")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark VmHWM to the current resident set
    except OSError:
        return None
    fn()
    return (_proc_status_bytes("VmHWM:") - before) / 2**20


@dataclass
class Result:
    method: str
    times_ms: list = field(default_factory=list)
    peak_mem_mb: float | None = None
    status: str = "ok"


def progress(message: str) -> None:
    """One line per method on stderr while the benchmark runs (warm-ups can compile for minutes)."""
    print(message, file=sys.stderr, flush=True)


def time_interleaved(
    methods: dict, device: str, rounds: int, warmup: int = 2, max_seconds: float = 60.0, label: str = ""
):
    """Time each callable in interleaved rounds; a method that raises is kept with its error."""
    results = {name: Result(name) for name in methods}
    live = dict(methods)
    for name, fn in list(live.items()):
        progress(f"  {label}{name}: warming up")
        try:
            for _ in range(warmup):
                fn()
        except Exception as e:  # a peer that cannot run this case (e.g. compile refuses it)
            results[name].status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            del live[name]
    reps = {name: 1 for name in live}
    if device.startswith("cuda"):
        for name, fn in live.items():
            once = _elapsed_ms(fn, device)
            reps[name] = max(1, min(1000, int(GPU_MEASUREMENT_MS / max(once, 1e-3))))
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in live.items():
            results[name].times_ms.append(_elapsed_ms(fn, device, reps[name]))
        if r >= 2 and time.perf_counter() - start > max_seconds:
            break
    for name, fn in live.items():
        results[name].peak_mem_mb = peak_memory_mb(fn, device)
    return results


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "threads": torch.get_num_threads(),
    }


def run_case(
    case: Case,
    *,
    modes=MODES,
    rounds: int = 7,
    include_compile: bool = True,
    methods: list[str] | None = None,
    max_seconds: float = 60.0,
) -> list[dict]:
    """Benchmark every method on one case; one row per (mode, method)."""
    with quiet_torch_warnings():
        return _run_case(case, modes, rounds, include_compile, methods, max_seconds)


@contextlib.contextmanager
def quiet_torch_warnings():
    """torch's own deprecation notices (torch.jit.script inside torch.func, inductor internals) and
    its 'no CUDA runtime' log line are about torch, not about the benchmark: keep them out."""
    cpp_extension = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension.level
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=r"torch(\.|$)")
        cpp_extension.setLevel(logging.ERROR)
        try:
            yield
        finally:
            cpp_extension.setLevel(level)


def _run_case(case, modes, rounds, include_compile, methods, max_seconds):
    model, seq, x = build(case)
    table = method_table(case, model, seq, x, include_compile=include_compile)
    if methods is not None:
        table = {k: v for k, v in table.items() if any(m in k for m in methods)}
    env = environment(case.device)
    if case.device.startswith("cuda"):
        env["matmul_precision"] = float32_matmul_precision() if case.dtype == "float32" else case.dtype
        env["matmul_peak_tflops"] = matmul_peak_tflops(case.device, getattr(torch, case.dtype))
    rows = []
    for mode in modes:
        column = 0 if mode == "forward_jacobian" else 1
        fns = {name: pair[column] for name, pair in table.items() if pair[column] is not None}
        results = time_interleaved(fns, case.device, rounds, max_seconds=max_seconds, label=f"{mode} | ")
        flops = case.useful_flops(mode)
        if env.get("matmul_peak_tflops"):
            floor_ms = flops / (env["matmul_peak_tflops"] * 1e12) * 1e3
            results[GPU_LIMIT] = Result(GPU_LIMIT, [floor_ms], status="computed from the measured matmul peak")
        for res in results.values():
            row = {
                **env,
                **{k: v for k, v in asdict(case).items() if k != "device"},
                "mode": mode,
                "method": res.method,
                "status": res.status,
                "peak_mem_mb": res.peak_mem_mb,
            }
            if res.times_ms:
                med = statistics.median(res.times_ms)
                q = statistics.quantiles(res.times_ms, n=10, method="inclusive") if len(res.times_ms) > 1 else [med] * 9
                row.update(
                    median_ms=med,
                    p20_ms=q[1],
                    p80_ms=q[7],
                    points_per_s=case.n_points / med * 1e3,
                    useful_gflops=flops / med / 1e6,
                )
                if env.get("matmul_peak_tflops"):
                    row["fraction_of_matmul_peak"] = row["useful_gflops"] / 1e3 / env["matmul_peak_tflops"]
            rows.append(row)
        _add_speedups(rows)
    return rows


def _add_speedups(rows):
    """speedup_vs_method: for tritonjac rows, the ratio of each other method's median to ours."""
    for row in rows:
        if row["method"].startswith("tritonjac") and row.get("median_ms"):
            row["speedup_vs_method"] = {
                other["method"]: other["median_ms"] / row["median_ms"]
                for other in rows
                if other["mode"] == row["mode"] and other is not row and other.get("median_ms")
            }


def format_table(rows: list[dict]) -> str:
    """A plain-text table per mode: median time, points/s, peak memory, ratio to tritonjac."""
    out = []
    for mode in MODES:
        sub = [r for r in rows if r["mode"] == mode]
        if not sub:
            continue
        ours = next((r for r in sub if r["method"].startswith("tritonjac") and r.get("median_ms")), None)
        r0 = sub[0]
        out.append(
            f"\n{mode}: N={r0['n_points']}, {r0['in_features']} -> {r0['depth']}x{r0['width']} -> "
            f"{r0['out_features']}, {r0['activation']}, {r0['dtype']}, {r0['device_name']} "
            f"({r0['threads']} threads)"
        )
        peak = r0.get("matmul_peak_tflops")
        if peak:
            out.append(f"  measured dense matmul peak ({r0.get('matmul_precision')}): {peak:.0f} TFLOP/s")
        out.append(
            f"  {'method':34s} {'median ms':>10s} {'p20-p80':>15s} {'Mpoints/s':>10s} "
            f"{'peak MB':>8s} {'x tritonjac':>11s} {'TFLOP/s':>8s} {'of peak':>7s}"
        )
        for r in sorted(sub, key=lambda r: r.get("median_ms") or math.inf):
            if not r.get("median_ms"):
                out.append(f"  {r['method']:34s} {r['status']}")
                continue
            mem = f"{r['peak_mem_mb']:8.1f}" if r.get("peak_mem_mb") is not None else f"{'-':>8s}"
            ratio = f"{r['median_ms'] / ours['median_ms']:10.2f}x" if ours else ""
            spread = f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}"
            frac = r.get("fraction_of_matmul_peak")
            rate = f" {r['useful_gflops'] / 1e3:8.2f} {frac:7.1%}" if frac is not None else ""
            out.append(
                f"  {r['method']:34s} {r['median_ms']:10.3f} {spread:>15s} "
                f"{r['points_per_s'] / 1e6:10.2f} {mem} {ratio}{rate}"
            )
    return "\n".join(out)


def write_tuned_configs(directory: str, device: str) -> None:
    """Write what autotuning chose in this process on `device` to directory/<GPU name>.json."""
    from .triton_engine import tuning  # imports triton: only when asked

    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    path = tuning.write_tuned_table(directory, name)
    print(f"wrote {path}" if path else "no configuration was autotuned")


# ---- targets and plots ---------------------------------------------------------------------------------
# The CPU product's targets (forward+J and training step against the peers, measured in one run).
CPU_TARGETS = (
    (
        "forward_jacobian",
        "nn.Sequential forward (no J)",
        "at most",
        3.2,
        "forward+J time / plain nn.Sequential forward time",
    ),
    ("forward_jacobian", "fastest peer", "at least", 1.2, "fastest peer time / forward+J time"),
    ("train_step", "3x autograd.grad (seed)", "at least", 2.0, "three-grad (create_graph) step time / our step time"),
    ("train_step", "3x autograd.grad (seed) memory", "at most", 0.5, "our peak memory / three-grad peak memory"),
)

# The Triton forward's targets on an H100/H200 (N = 2^20, 3 -> 4x64 -> 3, Softplus(100), one run).
GPU_TARGETS = (
    ("forward_jacobian", "vmap(jacfwd)", "at least", 20.0, "vmap(jacfwd) eager time / forward+J time"),
    ("forward_jacobian", "3x autograd.grad (seed)", "at least", 10.0, "three-grad time / forward+J time"),
    ("forward_jacobian", "best compiled peer", "at least", 5.0, "best torch.compile peer time / forward+J time"),
    (
        "forward_jacobian",
        "nn.Sequential forward (no J)",
        "at most",
        1.0,
        "forward+J time / plain nn.Sequential forward time",
    ),
    (
        "forward_jacobian",
        "matmul peak",
        "at least",
        None,
        "useful TFLOP/s / measured dense matmul TFLOP/s (target 0.5 in TF32, 0.4 in bf16)",
    ),
    ("train_step", "3x autograd.grad (seed)", "at least", 10.0, "three-grad (create_graph) step time / our step time"),
    ("train_step", "vmap(jacfwd)", "at least", 5.0, "vmap(jacfwd) + backward step time / our step time"),
    ("train_step", "3x autograd.grad (seed) memory", "at most", 0.2, "our peak memory / three-grad peak memory"),
    ("train_step", "our forward+J", "at most", 3.5, "our step time / our forward+J time"),
)

PEERS_EXCLUDED_FROM_FASTEST = ("tritonjac", "nn.Sequential forward", "limit:")


def _target_value(against: str, sense: str, ours: dict, sub: dict, rows: list[dict]) -> float | None:
    """The measured ratio for one target (None when a method it needs did not run)."""
    if against == "our forward+J":
        forward = next(
            (
                r
                for r in rows
                if r["mode"] == "forward_jacobian" and r["method"] == ours["method"] and r.get("median_ms")
            ),
            None,
        )
        return ours["median_ms"] / forward["median_ms"] if forward else None
    if against in ("fastest peer", "best compiled peer"):
        peers = [
            r["median_ms"]
            for m, r in sub.items()
            if not m.startswith(PEERS_EXCLUDED_FROM_FASTEST)
            and (against == "fastest peer" or m.startswith("torch.compile"))
        ]
        return min(peers) / ours["median_ms"] if peers else None
    if against == "matmul peak":
        return ours.get("fraction_of_matmul_peak")
    if against.endswith(" memory"):
        other = sub.get(against[: -len(" memory")])
        if other and other.get("peak_mem_mb") and ours.get("peak_mem_mb") is not None:
            return ours["peak_mem_mb"] / other["peak_mem_mb"]
        return None
    if against in sub:
        ratio = ours["median_ms"] / sub[against]["median_ms"]
        return ratio if sense == "at most" else 1.0 / ratio
    return None


def check_targets(rows: list[dict]) -> list[tuple[str, float | None, str, float, bool | None]]:
    """(description, measured, 'at most'/'at least', target, met) for each target of the rows' device."""
    gpu = bool(rows) and rows[0]["device"].startswith("cuda")
    out = []
    for mode, against, sense, target, text in GPU_TARGETS if gpu else CPU_TARGETS:
        sub = {r["method"]: r for r in rows if r["mode"] == mode and r.get("median_ms")}
        ours = next((r for m, r in sub.items() if m.startswith("tritonjac")), None)
        if target is None:  # the matmul-peak fraction depends on the precision
            target = 0.4 if rows[0]["dtype"] in ("bfloat16", "float16") else 0.5
        value = None if ours is None else _target_value(against, sense, ours, sub, rows)
        met = None if value is None else (value <= target if sense == "at most" else value >= target)
        out.append((text, value, sense, target, met))
    return out


def format_targets(rows: list[dict]) -> str:
    lines = ["\ntargets:"]
    for text, value, sense, target, met in check_targets(rows):
        shown = "n/a" if value is None else f"{value:.2f}"
        verdict = "not measured" if met is None else ("met" if met else "MISSED")
        lines.append(f"  {text}: {shown} ({sense} {target}) {verdict}")
    return "\n".join(lines)


def plot_case(rows: list[dict], path: str):
    """Bar charts of median time (with p20-p80) and peak memory per method, one row per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m and r.get("median_ms") for r in rows)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(13, 3.2 * len(modes)), squeeze=False)
    for (ax_t, ax_m), mode in zip(axes, modes):
        sub = sorted((r for r in rows if r["mode"] == mode and r.get("median_ms")), key=lambda r: r["median_ms"])
        names = [r["method"] for r in sub]
        colors = [
            "tab:orange"
            if n.startswith("tritonjac")
            else "tab:gray"
            if "no J" in n
            else "tab:green"
            if n.startswith("limit:")
            else "tab:blue"
            for n in names
        ]
        med = [r["median_ms"] for r in sub]
        err = [[r["median_ms"] - r["p20_ms"] for r in sub], [r["p80_ms"] - r["median_ms"] for r in sub]]
        ax_t.barh(names, med, xerr=err, color=colors)
        ax_t.invert_yaxis()
        ax_t.set_xlabel("median time (ms), bars p20-p80")
        ax_t.set_title(mode.replace("_", " "))
        mem = [r.get("peak_mem_mb") or 0.0 for r in sub]
        ax_m.barh(names, mem, color=colors)
        ax_m.invert_yaxis()
        ax_m.set_xlabel("peak extra memory (MB)")
        ax_m.set_yticklabels([])
    r0 = rows[0]
    fig.suptitle(
        f"N={r0['n_points']}, {r0['in_features']} -> {r0['depth']}x{r0['width']} -> {r0['out_features']}, "
        f"{r0['activation']}, {r0['dtype']} on {r0['device_name']} ({r0['threads']} threads), "
        f"torch {r0['torch']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
