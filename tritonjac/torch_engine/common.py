"""What both modes of the PyTorch engine share: chunks of points, scratch buffers, the layers of
one call with their weights split by input, and the input a0 with its sparse tangent."""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass

import torch

from ..activations import Activation
from ..encoding import COS, SIN
from ..network import NetworkSpec

__all__ = [
    "CHUNK_BYTES",
    "REVERSE_CHUNK_BYTES",
    "GPU_CHUNK_BYTES",
    "chunk_points",
    "Scratch",
    "InputMap",
    "Layer",
    "Network",
    "flush_denormals",
    "flush_softplus",
    "activation_into",
]

# Bytes of one chunk's stacked rows at the widest layer, on CPU: (1 + k, P, width) in forward mode,
# (1 + m, P, width) in reverse mode. Larger chunks mean fewer ops (each costs microseconds of Python),
# smaller ones stay in cache. Forward mode, with every per-chunk temporary in scratch buffers (2-core
# VM, torch 2.13): 3 MB against 1.5 took forward + J from 91-97 to 75-79 ms and the training step
# from 346-356 to 275-318 ms (3 -> 4x64 -> 3), no slower at width 128 or 256. Reverse mode stays at
# 1.5 MB: its eikonal step's peak memory grew with the chunk (361 MB at 1.5 MB, 441-456 at 3, 661 at
# 6; autograd's: 809-1013 MB), for 0-10% of time.
CHUNK_BYTES = 3 << 20  # forward mode: 3 MB
REVERSE_CHUNK_BYTES = 3 << 19  # reverse mode: 1.5 MB
# On a GPU every chunk costs ~20 kernel launches: CPU-sized chunks made this engine 145x slower than
# the three-grad trick on an H200 at 2^20 points (683 chunks). A GPU has no cache worth fitting.
GPU_CHUNK_BYTES = 256 << 20


def chunk_points(num_points: int, weights, spec: NetworkSpec, x: torch.Tensor) -> int:
    """Points per chunk: the stacked rows of one point (1 + k in forward mode, 1 + m in reverse
    mode) at the widest layer, CHUNK_BYTES (REVERSE_CHUNK_BYTES) in all."""
    widest = max(w.shape[0] for w in weights)
    d_out = weights[-1].shape[0]
    reverse = spec.uses_reverse_mode(d_out)
    rows = 1 + (spec.jacobian_outputs(d_out) if reverse else spec.jacobian_inputs)
    per_point = rows * widest * x.element_size()
    if x.device.type != "cpu":
        chunk_bytes = GPU_CHUNK_BYTES
    else:
        chunk_bytes = REVERSE_CHUNK_BYTES if reverse else CHUNK_BYTES
    return max(1, min(num_points, chunk_bytes // per_point))


# Chunks run on worker threads of one intra-op thread each (at most this many; beyond it the
# threads would queue for the GIL between ops), each with its own chunks and scratch. With one
# OpenMP team per op instead, every op of every chunk ends in a barrier: with one busy process
# beside it on 2 cores, a descheduled thread stalled each of them and forward + J took 22x its
# quiet time (3.8 s against 0.18 s); on workers 1.6x (0.26 s).
MAX_CHUNK_WORKERS = 8


def run_chunks(num_points: int, step: int, like: torch.Tensor, work) -> int:
    """Call work(start, stop, worker, scratch) for every chunk [start, stop) of `step` points.

    On CPU with several intra-op threads, the chunks go to workers (the calling thread is worker 0)
    in a fixed round-robin (worker w takes chunks w, w + W, ...), each worker with its own `Scratch`
    and torch's intra-op threads divided among them; elsewhere they run in order on the calling
    thread. On CPU every worker flushes denormals while it works (`denormals_flushed`). Workers
    record no autograd and keep the caller's inference mode. Returns the number of workers (what
    `work` may have indexed by `worker`)."""
    starts = range(0, num_points, step)
    threads = torch.get_num_threads()
    on_cpu = like.device.type == "cpu"
    workers = min(len(starts), threads, MAX_CHUNK_WORKERS) if on_cpu else 1
    if workers <= 1:
        with denormals_flushed() if on_cpu else contextlib.nullcontext():
            scratch = Scratch(like)
            for start in starts:
                work(start, min(num_points, start + step), 0, scratch)
        return 1
    inference = torch.is_inference_mode_enabled()
    errors = []

    def run(worker: int):
        torch.set_num_threads(max(1, threads // workers))  # this thread's OpenMP team, and the global default
        try:
            with torch.inference_mode(inference), torch.no_grad(), denormals_flushed():
                scratch = Scratch(like)
                for start in starts[worker::workers]:
                    work(start, min(num_points, start + step), worker, scratch)
        except BaseException as error:  # re-raised on the calling thread
            errors.append(error)
        finally:
            torch.set_num_threads(threads)

    pool = [threading.Thread(target=run, args=(w,), name=f"tritonjac-chunks-{w}") for w in range(1, workers)]
    for thread in pool:
        thread.start()
    run(0)
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    return workers


def flushing_denormals() -> bool:
    """Whether this thread's CPU arithmetic flushes denormals to zero (torch has no getter for
    `torch.set_flush_denormal`): a denormal float32 times one is zero exactly when it does."""
    return torch.tensor(2.0**-140, dtype=torch.float32).mul(1.0).item() == 0.0


@contextlib.contextmanager
def denormals_flushed():
    """Flush denormals to zero on this thread (`torch.set_flush_denormal`: the CPU's FTZ and DAZ
    modes) for the block, then restore the thread's mode.

    Softplus with a large beta makes denormals wherever beta * z < -87 (float32), and every
    arithmetic instruction that meets one takes a microcode assist: with 100 * z of order 100,
    torch's softplus kernel ran 8.7x slower and its derivative 9x (3.3 ms against 0.38 ms for
    3,000 x 64 values on this VM). The mode is per thread: set here on the workers, each of which
    runs its ops on one intra-op thread up to MAX_CHUNK_WORKERS workers; with more threads than
    that, the OpenMP threads beside each worker keep their own mode, and `flush_denormals` still
    zeroes what softplus makes. Values below the smallest normal number (1e-38 in float32, 1e-308
    in float64) become zero, as on a GPU in flush-to-zero mode."""
    was_flushing = flushing_denormals()
    flushes = was_flushing or torch.set_flush_denormal(True)  # False where the CPU has no such mode
    outer = getattr(_thread_flush, "on", False)
    _thread_flush.on = flushes
    try:
        yield
    finally:
        _thread_flush.on = outer
        if not was_flushing:
            torch.set_flush_denormal(False)


# Whether this thread is inside `denormals_flushed` with the CPU's mode set
_thread_flush = threading.local()


def _flushed_in_hardware() -> bool:
    """True on a thread inside `denormals_flushed` that runs its ops alone (one intra-op thread):
    then no denormal reaches or leaves its arithmetic, and `flush_denormals` has nothing to do."""
    return getattr(_thread_flush, "on", False) and torch.get_num_threads() == 1


def chunked_gradients(x2d, weights, spec: NetworkSpec, need_x, need_W, need_b, chunk_backward, step=None):
    """The chunked backward both modes share: gradients of x, the weights and the biases (None where
    not needed). `chunk_backward(c, start, stop, grad_W, grad_b, scratch)` adds chunk c's weight and
    bias gradients into the lists it is given (one pair per worker, summed in worker order at the
    end: deterministic) and returns the chunk's gradient of x (None without need_x). `step`: the
    points per chunk, when the forward's chunks were not `chunk_points`'s."""
    P = x2d.shape[0]

    def zeros():
        return (
            [torch.zeros_like(W) if need else None for W, need in zip(weights, need_W)],
            [W.new_zeros(W.shape[0]) if need else None for W, need in zip(weights, need_b)],
        )

    per_worker = {}
    gx = torch.empty_like(x2d) if need_x else None
    if step is None:
        step = chunk_points(P, weights, spec, x2d) if P else 1

    def work(start, stop, worker, scratch):
        if worker not in per_worker:
            per_worker[worker] = zeros()
        grad_W, grad_b = per_worker[worker]
        gx_c = chunk_backward(start // step, start, stop, grad_W, grad_b, scratch)
        if need_x:
            gx[start:stop] = gx_c

    if P > 0:
        run_chunks(P, step, x2d, work)
    grad_W, grad_b = per_worker.get(0) or zeros()
    for worker in sorted(per_worker)[1:]:
        for total, part in zip(grad_W + grad_b, per_worker[worker][0] + per_worker[worker][1]):
            if total is not None:
                total += part
    for l in spec.skips:  # the engine used scale * W: d/dW = scale * d/d(scale * W)
        if grad_W[l] is not None:
            grad_W[l] *= spec.skip_scale
    return gx, grad_W, grad_b


def saved_call(ctx):
    """What an engine's autograd.Function saved (x2d, the weights, then its own tensors, with ctx.spec,
    ctx.band_weights and ctx.has_bias set) as its backward needs it: (x2d, weights, the rest, the
    layers as a `Network`, need_x, need_W, need_b). needs_input_grad is (spec, band_weights, x,
    W_1..W_L, b_1..b_L)."""
    L = ctx.spec.num_layers
    x2d, *rest = ctx.saved_tensors
    weights, own = rest[:L], rest[L:]
    needs = ctx.needs_input_grad
    net = Network(x2d, weights, [None] * L, ctx.spec, ctx.band_weights)  # biases: only the forward adds them
    need_b = [h and n for h, n in zip(ctx.has_bias, needs[3 + L :])]
    return x2d, weights, own, net, needs[2], needs[3 : 3 + L], need_b


class Scratch:
    """Per-call scratch tensors that every chunk reuses.

    Fresh multi-MB allocations are the slowest thing on CPU here: glibc serves them with new
    mappings (same-size blocks are unmapped again on free), and touching the new pages costs more
    than the arithmetic that fills them. One buffer per role, grown to the largest request.
    """

    def __init__(self, like: torch.Tensor):
        self.like = like
        self.buffers = {}

    def get(self, role: str, *shape: int) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = self.buffers.get(role)
        if buf is None or buf.numel() < n:
            buf = self.buffers[role] = self.like.new_empty(n)
        return buf[:n].view(shape)


# ---- the input a0 and its tangent ------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _encoding_tables(columns: tuple, frequencies: tuple, device: torch.device, dtype: torch.dtype):
    """An encoding's per-column tables on a device, made once: built from Python lists, each would
    be a host-to-device copy per call on a GPU (and a sync). (coordinate, function, frequency,
    band, perm): perm is the coordinate-major order, stable within a coordinate. Never inference
    tensors, even when first asked for under `torch.inference_mode()`: autograd may save them later."""
    order = sorted(range(len(columns)), key=lambda c: columns[c][0])
    with torch.inference_mode(False):
        return (
            torch.tensor([j for j, _, _ in columns], device=device),
            torch.tensor([f for _, f, _ in columns], device=device),
            torch.tensor(frequencies, dtype=dtype, device=device),
            torch.tensor([i for _, _, i in columns], device=device),
            torch.tensor(order, device=device),
        )


class InputMap:
    """a0 = x, or cat([encoding(x[:, :k]), x[:, k:]]), and the non-zeros of its tangent.

    Without an encoding, a0's tangent is the unit vectors of the columns input_start..+k, so a
    layer's tangent term is those columns of its weight (`tangent_weight`, (k, 1, d): broadcast
    over the points). With one, encoded feature c is w_c f_c(freq_c x_j) for one coordinate j;
    grouped by coordinate (`perm`: coordinate-major order, n features each) its non-zero
    derivatives are D (k, P, n), and the tangent term is the batched product D @ W[:, perm]^T.
    """

    def __init__(self, spec: NetworkSpec, band_weights: torch.Tensor | None, like: torch.Tensor):
        self.k, self.start, self.encoding = spec.jacobian_inputs, spec.input_start, spec.encoding
        enc = self.encoding
        if enc is None:
            return
        columns = enc.columns
        frequencies = tuple(enc.frequency(i) for _, _, i in columns)
        make = _encoding_tables if not torch.compiler.is_compiling() else _encoding_tables.__wrapped__
        tables = make(tuple(columns), frequencies, like.device, like.dtype)
        self.coordinate, self.function, self.frequency, band, self.perm = tables  # function: encoding order
        self.is_sin, self.is_cos = self.function == SIN, self.function == COS
        weight = torch.ones_like(self.frequency)
        if band_weights is not None:
            windowed = band >= 0
            weight[windowed] = band_weights.to(like.dtype)[band[windowed]]
        self.weight = weight
        self.n = len(columns) // self.k

    @property
    def width(self) -> int:
        return 0 if self.encoding is None else self.encoding.width

    def tangent_weight(self, W_a: torch.Tensor) -> torch.Tensor:
        """The factor of a layer's tangent term taken from its a0 columns W_a (d, len(a0)):
        (k, 1, d) columns without an encoding, (k, n, d) per-coordinate blocks with one."""
        if self.encoding is None:
            return W_a[:, self.start : self.start + self.k].t().contiguous().unsqueeze(1)
        d = W_a.shape[0]
        return W_a[:, self.perm].view(d, self.k, self.n).permute(1, 2, 0).contiguous()

    def evaluate(self, x: torch.Tensor, second: bool = False):
        """(a0, D, d1, d2) for points x (P, d_in): D (k, P, n) the tangent's non-zeros (None without
        an encoding); d1, d2 (P, len(encoding)) the first and (if asked) second derivatives."""
        if self.encoding is None:
            return x, None, None, None
        t = x[:, self.coordinate] * self.frequency
        s, c = torch.sin(t), torch.cos(t)
        a0 = torch.where(self.is_sin, s, torch.where(self.is_cos, c, t)) * self.weight
        if x.shape[1] > self.k:  # the inputs after the encoded ones (a latent code) pass through
            a0 = torch.cat([a0, x[:, self.k :]], 1)
        scale = self.weight * self.frequency
        d1 = torch.where(self.is_sin, c, torch.where(self.is_cos, -s, 1.0)) * scale
        d2 = (
            torch.where(self.is_sin, -s, torch.where(self.is_cos, -c, 0.0)) * (scale * self.frequency)
            if second
            else None
        )
        D = d1[:, self.perm].view(-1, self.k, self.n).transpose(0, 1).contiguous()
        return a0, D, d1, d2

    def columns_of(self, j: int) -> torch.Tensor:
        """The encoded features of coordinate j (indices into the encoding's columns)."""
        return self.perm[j * self.n : (j + 1) * self.n]

    def third_derivative(self, x: torch.Tensor) -> torch.Tensor:
        """The encoded features' third derivatives along their own coordinate, (P, len(encoding))
        (the second-order backward's; `evaluate` gives the first and second)."""
        t = x[:, self.coordinate] * self.frequency
        cube = self.weight * self.frequency**3
        return torch.where(self.is_sin, -torch.cos(t), torch.where(self.is_cos, torch.sin(t), 0.0)) * cube

    def tangent(self, D, tangent_weight):
        """a0's tangent times a layer's a0 columns: (k, 1, d) (broadcast) or (k, P, d)."""
        return tangent_weight if D is None else torch.bmm(D, tangent_weight)

    def add_weight_grad(self, grad_W_a, gU, D):
        """grad of the a0 columns W_a (d, len(a0)) from dLoss/dU, (k, P, d), through the tangent term."""
        if D is None:
            grad_W_a[:, self.start : self.start + self.k] += gU.sum(1).t()
        else:
            blocks = torch.bmm(gU.transpose(1, 2), D)  # (k, d, n)
            grad_W_a.index_add_(1, self.perm, blocks.permute(1, 0, 2).reshape(gU.shape[2], -1))

    def tangent_grad(self, gU, tangent_weight):
        """dLoss/dD (k, P, n) from dLoss/dU through the tangent term (encodings only)."""
        return torch.bmm(gU, tangent_weight.transpose(1, 2))

    # ---- reverse mode: J's rows from a0's adjoints, and tangents seeded by directions -------------
    @property
    def differentiated_columns(self) -> slice:
        """a0's columns whose adjoints make J: x's differentiated inputs, or the encoded features."""
        return slice(self.start, self.start + self.k) if self.encoding is None else slice(0, self.width)

    def jacobian(self, g, d1):
        """J (P, m, k) from the adjoints g (m, P, len(differentiated_columns)) of a0's columns."""
        if self.encoding is None:
            return g.transpose(0, 1)
        J = g.new_zeros(g.shape[0], g.shape[1], self.k)
        J.index_add_(2, self.coordinate, g * d1)
        return J.transpose(0, 1)

    def seed_tangent(self, V, d1):
        """a0's tangent (m, P, len(differentiated_columns)) along the directions V (m, P, k) in x."""
        return V if self.encoding is None else V[:, :, self.coordinate] * d1

    def add_seed_input_grad(self, g_x, g, V, d2) -> None:
        """Into g_x, the gradient of sum_r g[r] . seed_tangent(V)[r] through the encoding's
        derivatives' dependence on x (nothing without an encoding: a0's tangent is then constant)."""
        if self.encoding is not None:
            g_x[:, : self.k].index_add_(1, self.coordinate, (g * V[:, :, self.coordinate]).sum(0) * d2)

    def input_grad(self, x, g_a0, g_D, d1, d2):
        """dLoss/dx (P, d_in) from dLoss/da0 and dLoss/dD (None where there is none)."""
        if self.encoding is None:
            return g_a0  # a0 is x; its tangent does not depend on x
        C = self.width
        g_x = torch.zeros_like(x)
        g_x[:, self.k :] = g_a0[:, C:]
        g_x[:, : self.k].index_add_(1, self.coordinate, g_a0[:, :C] * d1)
        if g_D is not None:
            d2 = d2[:, self.perm].view(-1, self.k, self.n)
            g_x[:, : self.k] += (g_D.transpose(0, 1) * d2).sum(-1)
        return g_x


@dataclass
class Layer:
    """One Linear layer as the engine computes it: its weight split into the columns that multiply
    the previous layer's output (`hidden`, None for the first layer) and a0's (`inputs`, None for
    layers without a skip), the skip scale folded in; `rows`: the outputs with tangents when the
    last layer computes fewer than all (else None)."""

    hidden: torch.Tensor | None
    inputs: torch.Tensor | None
    bias: torch.Tensor | None
    act: Activation
    rows: slice | None
    scale: float
    hidden_cols: slice | None
    input_cols: slice | None
    tangent_weight: torch.Tensor | None  # InputMap.tangent_weight of inputs[rows]

    @property
    def width(self) -> int:
        """The layer's output features."""
        return (self.hidden if self.hidden is not None else self.inputs).shape[0]


class Network:
    """The layers of one call, and its input map."""

    def __init__(self, x2d, weights, biases, spec: NetworkSpec, band_weights):
        self.spec = spec
        self.input_map = InputMap(spec, band_weights, x2d)
        L = len(weights)
        rows = spec.output_rows(weights[-1].shape[0])
        self.rows = rows  # the outputs J holds
        self.selected = rows if rows != slice(0, weights[-1].shape[0]) else None
        self.layers = []
        for l, (W, b, act) in enumerate(zip(weights, biases, spec.activations)):
            scale = spec.layer_scale(l)
            Ws = W * scale if scale != 1.0 else W
            hidden_cols, input_cols = spec.layer_columns(l, W.shape[1], x2d.shape[1])
            layer_rows = self.selected if l == L - 1 else None
            inputs = Ws[:, input_cols] if input_cols is not None else None
            tangent_weight = None
            if inputs is not None:
                tangent_weight = self.input_map.tangent_weight(inputs if layer_rows is None else inputs[layer_rows])
            self.layers.append(
                Layer(
                    Ws[:, hidden_cols] if hidden_cols is not None else None,
                    inputs,
                    b,
                    act,
                    layer_rows,
                    scale,
                    hidden_cols,
                    input_cols,
                    tangent_weight,
                )
            )


def evaluate_activation(act: Activation, z, *, value: bool = True, curvature: bool = False):
    """(s(z), s'(z), s''(z)) as `Activation.evaluate` gives them, with (z, None, None) for the
    identity, and softplus's denormals flushed on CPU (`flush_softplus`)."""
    if act.is_identity:
        return z, None, None
    h, slope, second = act.evaluate(z, value=value, curvature=curvature)
    flush_softplus(act, z, h, slope, second)
    return h, slope, second


def activation_into(act: Activation, z, value, slope=None, second=None) -> bool:
    """`Activation.into` (s, s' and s'' written into the given tensors; False where the activation
    has no such form), flushed as in `evaluate_activation`."""
    if not act.into(z, value, slope, second):
        return False
    flush_softplus(act, z, value, slope, second)
    return True


def activation_value(act: Activation, z):
    """s(z) alone, flushed as in `evaluate_activation`."""
    h = act.value(z)
    flush_softplus(act, z, h)
    return h


def flush_softplus(act: Activation, z, *tensors) -> None:
    """`flush_denormals` on what softplus gave for z on CPU (the only activation that makes them)."""
    if act.name == "softplus" and z.device.type == "cpu":
        flush_denormals(*tensors)


def flush_denormals(*tensors) -> None:
    """Set values too small for CPU arithmetic to zero, in place: denormals, and values whose
    products would be denormal (what a CPU in flush-to-zero mode would compute, and a little more).

    Softplus with a large beta (100 in IDR, NeuS, IGR) gives denormal values, slopes and curvatures
    wherever beta * z < -87 (float32): half the points of a fresh network. Every CPU GEMM they
    enter then runs several times slower; flushed, the training step of NeuS's network on CPU
    took 0.64x the time. Flushing only denormals is not enough: a slope of 1e-35 times a tangent
    of 1e-5 is denormal again, and such products in the GEMMs still made the reverse mode's
    eikonal step 1.9x slower. So values below the dtype's smallest normal number times 2^26
    (about 1e-30 in float32) are flushed: their products with anything above 2^-26 stay normal.
    float16, whose range is too short for the margin, is flushed at its smallest normal.
    The tensors are non-negative (softplus, its slope and curvature): one `threshold_` pass each.
    Skipped where the CPU flushes in hardware (`_flushed_in_hardware`): it also zeroes those
    products, at no cost (the passes took 4-6% of forward + J and of the training step).
    """
    if _flushed_in_hardware():
        return
    for t in tensors:
        if t is not None:
            tiny = torch.finfo(t.dtype).tiny
            torch.threshold_(t, tiny if t.dtype == torch.float16 else tiny * 2.0**26, 0.0)
