"""Second derivatives on the per-layer kernels: `layer_forward_kernel` with LAPLACIAN (one more
stacked row after the k tangents) or HESSIAN (the k (k + 1) / 2 rows of H's upper triangle after
them), docs/design.md section 11.

Coverage: the Laplacian and the Hessian for k <= 4 differentiated inputs (16 slots per point: more
would not fit a tile), encodings (their second derivatives in the kernels' `encoded_input`), skips,
latent codes, selected inputs and outputs. With both asked, the Hessian's rows are carried and the
Laplacian is the sum of their diagonal.
The backward runs on the per-layer kernels as well (`backward.layers_backward` with gS): it
recomputes the forward with the same rows, keeping each layer's [z; U; V], and takes the adjoints
back through the activation's first three derivatives (kernels/backward.py,
`_laplacian_activation_backward`, `_hessian_activation_backward`).
"""

from __future__ import annotations

import torch

from ..grad_mode import records_autograd, refuse_double_backward
from ..network import NetworkSpec
from ..precision import matmul_precision
from ..torch_engine.common import saved_call
from ..torch_engine.second_order import SecondOrder
from .backward import mlp_backward
from .forward import LayerInputs, _launch_layer
from .launch import allocate, device_guard

__all__ = ["second_order_unsupported", "mlp_second_order", "MAX_HESSIAN_INPUTS"]

# 1 + k + k (k + 1) / 2 rows fit 16 slots up to k = 4 (k = 5: 21 rows, 32 slots)
MAX_HESSIAN_INPUTS = 4


def second_order_unsupported(spec: NetworkSpec, hessian: bool) -> str | None:
    """Why the kernels cannot run this call with second derivatives, or None when they can."""
    k = spec.jacobian_inputs
    if hessian and k > MAX_HESSIAN_INPUTS:
        return (
            f"the Hessian of {k} inputs carries 1 + {k} + {k * (k + 1) // 2} rows per point, more than the "
            f"kernels' 16 slots (at most {MAX_HESSIAN_INPUTS} inputs)"
        )
    return None


def second_order_forward(x2d, weights, biases, spec: NetworkSpec, order: SecondOrder, band_weights=None):
    """y (P, d_L), J (P, m, k) and the second-order rows S (P, m, q), nothing recorded."""
    P, k, L = x2d.shape[0], spec.jacobian_inputs, len(weights)
    q = order.num_rows
    second = "hessian" if order.hessian else "laplacian"
    precision = matmul_precision(x2d.dtype)
    inputs = LayerInputs(x2d, spec, band_weights)
    a, a_strides = None, (0, 0, 0)
    for l, (W, b, act) in enumerate(zip(weights, biases, spec.activations)):
        d_out = W.shape[0]
        W_hidden, W_input = inputs.parts(l, W)
        if l == L - 1:  # y, and J's k columns with the second-order rows after them: (P, d_out, k + q)
            y = allocate("y", x2d, P, d_out)
            out = allocate(f"J and the {second} rows", x2d, P, d_out, k + q)
            h_out = (y, y.stride(0), y.stride(1))
            t_out = (out, out.stride(0), out.stride(2), out.stride(1))
        else:  # [h; T; Q] as (P, 1 + k + q, d_out)
            buf = allocate(f"[h; T; Q] of layer {l}", x2d, P, 1 + k + q, d_out)
            h_out = (buf, buf.stride(0), buf.stride(2))
            t_out = (buf[:, 1:], buf.stride(0), buf.stride(1), buf.stride(2))
        parts = (W_hidden, W_input, b)
        _launch_layer(x2d, inputs, (a, a_strides), parts, act, h_out, t_out, True, precision, second)
        if l < L - 1:
            a, a_strides = buf, (buf.stride(0), buf.stride(1), buf.stride(2))
    rows = spec.output_rows(weights[-1].shape[0])
    return y, out[:, rows, :k].contiguous(), out[:, rows, k:].contiguous()


class _SecondOrderOnKernels(torch.autograd.Function):
    """(y, J, S) from the kernels, and their backward on the kernels (saves the inputs alone)."""

    @staticmethod
    def forward(ctx, request, band_weights, x2d, *params):
        spec, order = request
        L = len(spec.activations)
        weights, biases = list(params[:L]), list(params[L:])
        with device_guard(x2d):
            y, J, S = second_order_forward(x2d, weights, biases, spec, order, band_weights)
        ctx.spec, ctx.order, ctx.band_weights = spec, order, band_weights
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x2d, *weights, *(b for b in biases if b is not None))
        ctx.set_materialize_grads(False)
        return y, J, S

    @staticmethod
    def backward(ctx, gy, gJ, gS):
        refuse_double_backward()
        x2d, weights, saved_biases, _, need_x, need_W, need_b = saved_call(ctx)
        given = iter(saved_biases)
        biases = [next(given) if has else None for has in ctx.has_bias]
        if gy is None and gJ is None and gS is None:
            return (None,) * len(ctx.needs_input_grad)
        # without a loss on the second-order rows, the first-order backward (fused where it fits)
        gx, grad_W, grad_b = mlp_backward(
            x2d, weights, biases, ctx.spec, gy, gJ, need_x, ctx.band_weights, gS, ctx.order.hessian
        )
        grad_W = [g if need else None for g, need in zip(grad_W, need_W)]
        grad_b = [g if need else None for g, need in zip(grad_b, need_b)]
        return (None, None, gx, *grad_W, *grad_b)


def mlp_second_order(x2d, weights, biases, spec: NetworkSpec, order: SecondOrder, band_weights=None):
    """y (P, d_L), J (P, m, k) and the second-order rows (P, m, q: the Hessian's upper triangle, or
    the Laplacian) on the kernels, differentiable to first order (see the module's docstring);
    `band_weights`: the encoding's window, if any."""
    params = [*weights, *[b for b in biases if b is not None]]
    if records_autograd(x2d, *params):
        return _SecondOrderOnKernels.apply((spec, order), band_weights, x2d, *weights, *biases)
    with torch.no_grad(), device_guard(x2d):
        return second_order_forward(x2d, weights, biases, spec, order, band_weights)
