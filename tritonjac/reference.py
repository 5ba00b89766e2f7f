"""The analytic PyTorch engine: forward tangents and a first-order backward (DESIGN.md section 2).

This is the CPU path users run and the oracle the Triton kernels are tested against.

Layout: per layer, the value is `h` (P, d) and the tangents are `T` (k, P, d): tangent-major, so the
tangent propagation U = W T is one GEMM over k*P rows. The first layer's tangent U_1 is the first k
columns of W_1 for every point, an expanded view (no matmul, no memory).

Points are processed in chunks of a few MB each. Besides bounding temporary memory for huge inputs,
this keeps every temporary below glibc's mmap threshold, so the allocator reuses freed memory instead
of taking fresh zeroed pages from the kernel (measured: a 48 MB temporary costs ~15 ms of page faults
on the 2-core CI machine, more than the GEMM that fills it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .activations import Activation

__all__ = ["MLPSpec", "mlp_jacobian_reference"]

# Bytes of one chunk's tangent tensor (k, P, width); see the module docstring.
CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class MLPSpec:
    """What the engines need besides tensors: one activation per layer and the tangent count k."""

    activations: tuple[Activation, ...]
    jacobian_inputs: int


def chunk_points(num_points: int, weights, spec: MLPSpec, itemsize: int) -> int:
    widest = max(w.shape[0] for w in weights)
    per_point = (1 + spec.jacobian_inputs) * widest * itemsize
    return max(1, min(num_points, CHUNK_BYTES // per_point))


# ---- forward ---------------------------------------------------------------------------------------
def _first_tangent(weight: torch.Tensor, k: int, num_points: int) -> torch.Tensor:
    """U_1 = W_1 E: the first k columns of W_1, identical for every point, as a (k, P, d1) view."""
    return weight[:, :k].t().unsqueeze(1).expand(k, num_points, weight.shape[0])


def _propagate(T: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """U = W T for all k tangents at once: (k, P, d_in) -> (k, P, d_out), one GEMM."""
    k, P, d_in = T.shape
    return torch.mm(T.reshape(k * P, d_in), weight.t()).view(k, P, weight.shape[0])


def _forward_chunk(x, weights, biases, spec: MLPSpec, saved: list | None):
    """y (P, d_L) and T_L (k, P, d_L) for one chunk of points x (P, d_0).

    With `saved`, appends what the backward needs per layer: (z_l, U_l), U_l None where unneeded.
    """
    k, L, P = spec.jacobian_inputs, len(weights), x.shape[0]
    h, T = x, None
    for l, (W, b, act) in enumerate(zip(weights, biases, spec.activations)):
        z = F.linear(h, W, b)
        U = _first_tangent(W, k, P) if T is None else _propagate(T, W)
        if saved is not None:
            last = l == L - 1
            keep_z = not (last and act.is_identity)
            # U_l rebuilds T_l for the next layer's weight gradient, and feeds s'' at this one;
            # U_1 is a view of W_1, recomputed for free.
            keep_U = l > 0 and not (last and not act.has_curvature)
            saved.append((z if keep_z else None, U if keep_U else None))
        if act.is_identity:
            h, T = z, U
        else:
            h, slope, _ = act.evaluate(z)
            T = slope * U
    return h, T


def _to_jacobian(T: torch.Tensor) -> torch.Tensor:
    """(k, P, d_L) tangents -> (P, d_L, k) Jacobian, J[p, i, j] = d y_i / d x_j."""
    return T.permute(1, 2, 0).contiguous()


def _forward(x2d, weights, biases, spec: MLPSpec, saved: list | None):
    """Chunked forward over (P, d_0) points -> y (P, d_L), J (P, d_L, k)."""
    P = x2d.shape[0]
    d_out, k = weights[-1].shape[0], spec.jacobian_inputs
    y = x2d.new_empty(P, d_out)
    J = x2d.new_empty(P, d_out, k)
    step = chunk_points(P, weights, spec, x2d.element_size())
    for start in range(0, P, step):
        stop = min(P, start + step)
        chunk_saved = [] if saved is not None else None
        y_c, T_c = _forward_chunk(x2d[start:stop], weights, biases, spec, chunk_saved)
        y[start:stop] = y_c
        J[start:stop] = T_c.permute(1, 2, 0)
        if saved is not None:
            saved.append(chunk_saved)
    return y, J


# ---- backward --------------------------------------------------------------------------------------
def _backward_chunk(x, layer_saved, weights, spec: MLPSpec, gy, GT, grad_W, grad_b, need_x: bool):
    """Accumulate weight and bias gradients of one chunk into grad_W / grad_b; return the grad of x.

    gy (P, d_L) and GT (k, P, d_L) are dLoss/dy and dLoss/dT_L; either may be None (no such loss).
    grad_W[l] / grad_b[l] are None where that gradient is not wanted.
    """
    k, L, P = spec.jacobian_inputs, len(weights), x.shape[0]
    acts = spec.activations
    gh = gy

    def tangent_input(l):  # U_l, with U_1 recomputed from W_1
        return _first_tangent(weights[0], k, P) if l == 0 else layer_saved[l][1]

    # s'(z_l) and s''(z_l) of the current layer, carried from one iteration to the next so that
    # each activation is evaluated once.
    slope = second = None
    if not acts[-1].is_identity:
        _, slope, second = acts[-1].evaluate(layer_saved[-1][0], value=False, curvature=GT is not None)

    for l in range(L - 1, -1, -1):
        act, W = acts[l], weights[l]
        # dLoss/dz_l and dLoss/dU_l
        if act.is_identity:
            gz, GU = gh, GT
        else:
            gz = slope * gh if gh is not None else None
            GU = slope * GT if GT is not None else None
            if GT is not None and second is not None:
                curvature = second * (GT * tangent_input(l)).sum(0)
                gz = curvature if gz is None else gz + curvature

        # this layer's inputs h_{l-1}, T_{l-1}, rebuilt from the saved z_{l-1}, U_{l-1}
        if l == 0:
            h_prev, T_prev = x, None
        else:
            prev = acts[l - 1]
            z_prev = layer_saved[l - 1][0]
            if prev.is_identity:
                h_prev, slope, second = z_prev, None, None
                T_prev = tangent_input(l - 1) if GU is not None else None
            else:
                h_prev, slope, second = prev.evaluate(z_prev, curvature=GT is not None)
                T_prev = slope * tangent_input(l - 1) if GU is not None else None

        # weight and bias gradients: gz h^T + GU T^T summed over points
        if grad_W[l] is not None:
            if gz is not None:
                grad_W[l].addmm_(gz.t(), h_prev)
            if GU is not None:
                if T_prev is None:  # T_0 = E: GU T_0^T lands in the first k columns
                    grad_W[l][:, :k] += GU.sum(1).t()
                else:
                    d_prev = T_prev.shape[-1]
                    grad_W[l].addmm_(GU.reshape(-1, W.shape[0]).t(), T_prev.reshape(-1, d_prev))
        if grad_b[l] is not None and gz is not None:
            grad_b[l] += gz.sum(0)

        # to the layer below
        if l > 0:
            gh = gz @ W if gz is not None else None
            GT = _propagate(GU, W.t()) if GU is not None else None
        else:
            if not need_x:
                return None
            gx = gz @ W if gz is not None else x.new_zeros(x.shape)
            return gx


class _AnalyticJacobian(torch.autograd.Function):
    """(y, J) with an analytic first-order backward that saves x and, per layer, z_l and U_l."""

    @staticmethod
    def forward(ctx, spec: MLPSpec, x2d, *params):
        L = len(spec.activations)
        weights, biases = list(params[:L]), list(params[L:])
        saved = []
        y, J = _forward(x2d, weights, biases, spec, saved)
        ctx.set_materialize_grads(False)  # a loss on y alone or J alone gives None for the other
        ctx.spec = spec
        ctx.num_chunks = len(saved)
        flat = [t for chunk in saved for pair in chunk for t in pair]
        ctx.save_for_backward(x2d, *weights, *flat)
        ctx.has_bias = [b is not None for b in biases]
        return y, J

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gJ):
        spec = ctx.spec
        L = len(spec.activations)
        x2d, *rest = ctx.saved_tensors
        weights, flat = rest[:L], rest[L:]
        needs = ctx.needs_input_grad  # (spec, x, W_1..W_L, b_1..b_L)
        need_x = needs[1]
        grad_W = [torch.zeros_like(W) if needs[2 + l] else None for l, W in enumerate(weights)]
        grad_b = [
            W.new_zeros(W.shape[0]) if ctx.has_bias[l] and needs[2 + L + l] else None
            for l, W in enumerate(weights)
        ]
        gx = torch.empty_like(x2d) if need_x else None
        P = x2d.shape[0]
        if P > 0:
            step = chunk_points(P, weights, spec, x2d.element_size())
            for c, start in enumerate(range(0, P, step)):
                stop = min(P, start + step)
                pairs = flat[2 * L * c : 2 * L * (c + 1)]
                layer_saved = [(pairs[2 * l], pairs[2 * l + 1]) for l in range(L)]
                gy_c = gy[start:stop] if gy is not None else None
                GT_c = gJ[start:stop].permute(2, 0, 1) if gJ is not None else None
                gx_c = _backward_chunk(
                    x2d[start:stop], layer_saved, weights, spec, gy_c, GT_c, grad_W, grad_b, need_x
                )
                if need_x:
                    gx[start:stop] = gx_c
        return (None, gx, *grad_W, *grad_b)


def mlp_jacobian_reference(x2d, weights, biases, spec: MLPSpec):
    """y (P, d_L) and J (P, d_L, k) of the MLP at the points x2d (P, d_0), differentiable.

    Inputs are assumed validated (see `tritonjac.functional`). Autograd is recorded only when some
    input requires a gradient; otherwise nothing is saved and memory stays at one chunk's worth.
    """
    params = [*weights, *biases]
    tracked = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x2d, *params)
    )
    if not tracked:
        with torch.no_grad():
            return _forward(x2d, weights, biases, spec, None)
    return _AnalyticJacobian.apply(spec, x2d, *params)
