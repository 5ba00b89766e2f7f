"""The PyTorch engine: forward tangents and a first-order backward (docs/design.md, sections 2-3).

It runs on any device and dtype (float64 included), and is the CPU path users run; the tests use
its float64 results as one of their oracles for the Triton kernels.

Layout: a layer's input is one stacked tensor A = [h; T] of shape (1+k, P, d): row 0 the values,
rows 1..k the tangents (tangent-major). So each layer is one GEMM over (1+k)*P rows giving
Z = [z; U], and the backward needs two GEMMs per layer (weight gradient, propagation). A loss on y
alone uses row 0 only. The first layer is special: its tangent U_1 is the first k columns of W_1 for
every point (no matmul, nothing saved).

Points are processed in chunks of about 1.5 MB each, which bounds temporary memory and keeps the
temporaries in cache, reused from chunk to chunk (see `CHUNK_BYTES`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import Activation
from .grad_mode import records_autograd, refuse_double_backward
from .network import NetworkSpec

__all__ = ["mlp_jacobian", "forward_points", "backward_by_recompute"]

# Bytes of one chunk's stacked (1+k, P, width) tensor at the widest layer. On CPU, touching fresh
# memory costs about 7x the arithmetic that fills it; 1-2 MB chunks were fastest for forward and
# training on a 2-core VM, 1.5 MB by a few percent.
CHUNK_BYTES = 3 << 19  # 1.5 MB


def chunk_points(num_points: int, weights, spec: NetworkSpec, itemsize: int) -> int:
    widest = max(w.shape[0] for w in weights)
    per_point = (1 + spec.jacobian_inputs) * widest * itemsize
    return max(1, min(num_points, CHUNK_BYTES // per_point))


class _Scratch:
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


# ---- building blocks -------------------------------------------------------------------------------
def _first_tangent(weight: torch.Tensor, k: int) -> torch.Tensor:
    """U_1 = W_1 E, the first k columns of W_1, as (k, 1, d_1): it broadcasts over the points."""
    return weight[:, :k].t().contiguous().unsqueeze(1)


def _stack(h, slope, U, with_tangents: bool, scratch: _Scratch):
    """A = [h; slope * U] as one (1+k, P, d) tensor (or (1, P, d) without tangents)."""
    k = U.shape[0] if with_tangents else 0
    A = scratch.get("A", 1 + k, *h.shape)
    A[0] = h
    if with_tangents:
        if slope is None:  # identity activation
            A[1:] = U
        else:
            torch.mul(slope, U, out=A[1:])
    return A


def _activate(act: Activation, z, U, scratch: _Scratch, *, curvature: bool = False, with_tangents: bool = True):
    """The next layer's input [s(z); s'(z) U] (in scratch), plus s'(z) and s''(z) for the backward."""
    if act.is_identity:
        return _stack(z, None, U, with_tangents, scratch), None, None
    h, slope, second = act.evaluate(z, curvature=curvature)
    return _stack(h, slope, U, with_tangents, scratch), slope, second


def _rowsum_product(GT, U):
    """sum over the k tangents of GT * U, (k, P, d) x (k, P, d) -> (P, d).

    Accumulated tangent by tangent: 3x faster on CPU than (GT * U).sum(0), whose reduction over the
    outer dimension is slow.
    """
    acc = GT[0] * U[0]
    for j in range(1, GT.shape[0]):
        acc.addcmul_(GT[j], U[j])
    return acc


def _linear(A, weight, bias):
    """Z = [z; U] = W A (+ b on the value row): one GEMM over all rows of the stacked input."""
    rows, P, d_in = A.shape
    Z = torch.mm(A.view(rows * P, d_in), weight.t()).view(rows, P, weight.shape[0])
    if bias is not None:
        Z[0] += bias
    return Z


# ---- forward ---------------------------------------------------------------------------------------
def _forward_chunk(x, weights, biases, spec: NetworkSpec, saved: list | None, scratch: _Scratch):
    """The stacked [y; T_L] (1+k, P, d_L) for one chunk of points x (P, d_0).

    With `saved`, appends per layer what the backward needs: z_1 for the first layer, the stacked
    Z_l = [z_l; U_l] for the others (None for an identity last layer, whose Z is never read).
    """
    k, L = spec.jacobian_inputs, len(weights)
    A = None
    for l, (W, b, act) in enumerate(zip(weights, biases, spec.activations)):
        if l == 0:
            z, U = F.linear(x, W, b), _first_tangent(W, k)
            keep = z
        else:
            Z = _linear(A, W, b)
            z, U = Z[0], Z[1:]
            keep = Z
        if saved is not None:
            saved.append(None if (l == L - 1 and act.is_identity) else keep)
        if l == L - 1 and act.is_identity and l > 0:
            return Z  # y and T_L as they come out of the GEMM
        A, _, _ = _activate(act, z, U, scratch)
    return A


def forward_points(x2d, weights, biases, spec: NetworkSpec, saved: list | None):
    """Chunked forward over (P, d_0) points -> y (P, d_L), J (P, d_L, k)."""
    P = x2d.shape[0]
    d_out, k = weights[-1].shape[0], spec.jacobian_inputs
    y = x2d.new_empty(P, d_out)
    J = x2d.new_empty(P, d_out, k)
    step = chunk_points(P, weights, spec, x2d.element_size())
    scratch = _Scratch(x2d)
    for start in range(0, P, step):
        stop = min(P, start + step)
        chunk_saved = [] if saved is not None else None
        A = _forward_chunk(x2d[start:stop], weights, biases, spec, chunk_saved, scratch)
        y[start:stop] = A[0]
        J[start:stop] = A[1:].permute(1, 2, 0)
        if saved is not None:
            saved.append(chunk_saved)
    return y, J


# ---- backward --------------------------------------------------------------------------------------
def _backward_chunk(x, layer_saved, weights, spec: NetworkSpec, G, grad_W, grad_b, need_x: bool, scratch: _Scratch):
    """Accumulate one chunk's weight and bias gradients into grad_W / grad_b; return the grad of x.

    G is dLoss/d[y; T_L], (1+k, P, d_L), or (1, P, d_L) when there is no loss on J.
    grad_W[l] / grad_b[l] are None where that gradient is not wanted.
    """
    k, L = spec.jacobian_inputs, len(weights)
    acts = spec.activations
    tangents = G.shape[0] > 1

    def saved_zU(l):
        if l == 0:
            return layer_saved[0], _first_tangent(weights[0], k)
        Z = layer_saved[l]
        return Z[0], Z[1:]

    # s'(z_l) and s''(z_l), carried from one layer to the next so each activation is evaluated once
    slope = second = None
    if not acts[-1].is_identity:
        _, slope, second = acts[-1].evaluate(saved_zU(L - 1)[0], value=False, curvature=tangents)

    for l in range(L - 1, -1, -1):
        W = weights[l]
        # GZ = dLoss/d[z_l; U_l]
        if acts[l].is_identity:
            GZ = G
        else:  # in place: G is this function's own buffer
            curvature = _rowsum_product(G[1:], saved_zU(l)[1]) if tangents and second is not None else None
            GZ = G.mul_(slope)
            if curvature is not None:
                GZ[0].addcmul_(second, curvature)

        # this layer's input A = [h_{l-1}; T_{l-1}], rebuilt from what the forward saved
        if l > 0:
            z_prev, U_prev = saved_zU(l - 1)
            A, slope, second = _activate(
                acts[l - 1], z_prev, U_prev, scratch, curvature=tangents, with_tangents=tangents
            )

        if grad_W[l] is not None:
            if l > 0:
                grad_W[l].addmm_(GZ.flatten(0, 1).t(), A.flatten(0, 1))
            else:  # A = [x; E]: the tangent rows land in the first k columns
                grad_W[0].addmm_(GZ[0].t(), x)
                if tangents:
                    grad_W[0][:, :k] += GZ[1:].sum(1).t()
        if grad_b[l] is not None:
            grad_b[l] += GZ[0].sum(0)

        if l > 0:  # ping-pong between two buffers: GZ is read while G is written
            rows, P, d = GZ.shape
            G = scratch.get("G" if l % 2 else "G'", rows, P, W.shape[1])
            torch.mm(GZ.view(rows * P, d), W, out=G.view(rows * P, W.shape[1]))
    return GZ[0] @ weights[0] if need_x else None


def _stack_output_grads(gy, gJ, start, stop, d_out, spec: NetworkSpec, scratch: _Scratch):
    """dLoss/d[y; T_L] for points start:stop as (1+k, P, d_L), or (1, P, d_L) without a loss on J."""
    rows = 1 if gJ is None else 1 + spec.jacobian_inputs
    G = scratch.get("G_out", rows, stop - start, d_out)
    if gy is None:
        G[0] = 0
    else:
        G[0] = gy[start:stop]
    if gJ is not None:
        G[1:] = gJ[start:stop].permute(2, 0, 1)
    return G


class _AnalyticJacobian(torch.autograd.Function):
    """(y, J) with an analytic first-order backward that saves x and, per layer, z_l and U_l."""

    @staticmethod
    def forward(ctx, spec: NetworkSpec, x2d, *params):
        L = len(spec.activations)
        weights, biases = list(params[:L]), list(params[L:])
        saved = []
        y, J = forward_points(x2d, weights, biases, spec, saved)
        ctx.set_materialize_grads(False)  # a loss on y alone or J alone gives None for the other
        ctx.spec = spec
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x2d, *weights, *(t for chunk in saved for t in chunk))
        return y, J

    @staticmethod
    def backward(ctx, gy, gJ):
        refuse_double_backward()
        spec = ctx.spec
        L = len(spec.activations)
        x2d, *rest = ctx.saved_tensors
        weights, flat = rest[:L], rest[L:]
        needs = ctx.needs_input_grad  # (spec, x, W_1..W_L, b_1..b_L)
        gx, grad_W, grad_b = _backward(
            x2d,
            weights,
            spec,
            gy,
            gJ,
            needs[1],
            needs[2 : 2 + L],
            [h and n for h, n in zip(ctx.has_bias, needs[2 + L :])],
            lambda c, start, stop: flat[L * c : L * (c + 1)],
        )
        return (None, gx, *grad_W, *grad_b)


def _backward(x2d, weights, spec: NetworkSpec, gy, gJ, need_x, need_W, need_b, layer_saved):
    """Chunked backward: gradients of x, the weights and the biases (None where not needed).

    `layer_saved(c, start, stop)` gives chunk c's per-layer saved tensors (see `_forward_chunk`).
    """
    grad_W = [torch.zeros_like(W) if need else None for W, need in zip(weights, need_W)]
    grad_b = [W.new_zeros(W.shape[0]) if need else None for W, need in zip(weights, need_b)]
    gx = torch.empty_like(x2d) if need_x else None
    P, d_out = x2d.shape[0], weights[-1].shape[0]
    if P > 0:
        step = chunk_points(P, weights, spec, x2d.element_size())
        scratch = _Scratch(x2d)
        for c, start in enumerate(range(0, P, step)):
            stop = min(P, start + step)
            G = _stack_output_grads(gy, gJ, start, stop, d_out, spec, scratch)
            gx_c = _backward_chunk(
                x2d[start:stop], layer_saved(c, start, stop), weights, spec, G, grad_W, grad_b, need_x, scratch
            )
            if need_x:
                gx[start:stop] = gx_c
    return gx, grad_W, grad_b


def backward_by_recompute(x2d, weights, biases, spec: NetworkSpec, gy, gJ, need_x, need_W, need_b):
    """The analytic backward for a forward that kept nothing but its inputs (the torch.compile op):
    each chunk's forward is recomputed before its backward."""
    scratch = _Scratch(x2d)

    def recompute(c, start, stop):
        saved = []
        _forward_chunk(x2d[start:stop], weights, biases, spec, saved, scratch)
        return saved

    with torch.no_grad():
        return _backward(x2d, weights, spec, gy, gJ, need_x, need_W, need_b, recompute)


def mlp_jacobian(x2d, weights, biases, spec: NetworkSpec):
    """y (P, d_L) and J (P, d_L, k) of the MLP at the points x2d (P, d_0), differentiable.

    Inputs are assumed validated (`tritonjac.network`). Autograd is recorded only when some input
    requires a gradient; otherwise nothing is saved and memory stays at one chunk's worth.
    """
    params = [*weights, *biases]
    if not records_autograd(x2d, *params):
        with torch.no_grad():
            return forward_points(x2d, weights, biases, spec, None)
    return _AnalyticJacobian.apply(spec, x2d, *params)
