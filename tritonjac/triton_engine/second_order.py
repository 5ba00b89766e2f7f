"""The forward Laplacian on the per-layer kernels: `layer_forward_kernel` with LAPLACIAN, which
carries one more stacked row after the k tangents (docs/design.md, section 11).

Coverage: the Laplacian (not the Hessian, whose k (k + 1) / 2 rows make 16 slots for k = 3, a
tile that spills), encodings (their second derivatives in the kernels' `encoded_input`), skips,
latent codes, selected inputs and outputs.
The backward runs on the per-layer kernels as well (`backward.layers_backward` with gS): it
recomputes the forward with the Laplacian row, keeping each layer's [z; U; Q], and takes the
adjoints back through the activation's first three derivatives (kernels/backward.py,
`_laplacian_activation_backward`).
"""

from __future__ import annotations

import torch

from ..grad_mode import records_autograd, refuse_double_backward
from ..network import NetworkSpec
from ..precision import matmul_precision
from ..torch_engine.common import saved_call
from .backward import mlp_backward
from .forward import LayerInputs, _launch_layer
from .launch import allocate, device_guard

__all__ = ["second_order_unsupported", "mlp_laplacian"]


def second_order_unsupported(spec: NetworkSpec, hessian: bool) -> str | None:
    """Why the kernels cannot run this call with second derivatives, or None when they can."""
    if hessian:
        return "the kernels carry the Laplacian row, not the Hessian's"
    return None


def laplacian_forward(x2d, weights, biases, spec: NetworkSpec, band_weights=None):
    """y (P, d_L), J (P, m, k) and the Laplacian row S (P, m, 1), nothing recorded."""
    P, k, L = x2d.shape[0], spec.jacobian_inputs, len(weights)
    precision = matmul_precision(x2d.dtype)
    inputs = LayerInputs(x2d, spec, band_weights)
    a, a_strides = None, (0, 0, 0)
    for l, (W, b, act) in enumerate(zip(weights, biases, spec.activations)):
        d_out = W.shape[0]
        W_hidden, W_input = inputs.parts(l, W)
        if l == L - 1:  # y, and J's k columns with the Laplacian after them: (P, d_out, k + 1)
            y = allocate("y", x2d, P, d_out)
            out = allocate("J and the Laplacian", x2d, P, d_out, k + 1)
            h_out = (y, y.stride(0), y.stride(1))
            t_out = (out, out.stride(0), out.stride(2), out.stride(1))
        else:  # [h; T; L] as (P, 1 + k + 1, d_out)
            buf = allocate(f"[h; T; L] of layer {l}", x2d, P, k + 2, d_out)
            h_out = (buf, buf.stride(0), buf.stride(2))
            t_out = (buf[:, 1:], buf.stride(0), buf.stride(1), buf.stride(2))
        _launch_layer(x2d, inputs, (a, a_strides), (W_hidden, W_input, b), act, h_out, t_out, True, precision, True)
        if l < L - 1:
            a, a_strides = buf, (buf.stride(0), buf.stride(1), buf.stride(2))
    rows = spec.output_rows(weights[-1].shape[0])
    return y, out[:, rows, :k].contiguous(), out[:, rows, k:].contiguous()


class _LaplacianOnKernels(torch.autograd.Function):
    """(y, J, S) from the kernels, and their backward on the kernels (saves the inputs alone)."""

    @staticmethod
    def forward(ctx, spec, band_weights, x2d, *params):
        L = len(spec.activations)
        weights, biases = list(params[:L]), list(params[L:])
        with device_guard(x2d):
            y, J, S = laplacian_forward(x2d, weights, biases, spec, band_weights)
        ctx.spec, ctx.band_weights = spec, band_weights
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
        # without a loss on the Laplacian, the first-order backward (its fused kernel where it fits)
        gx, grad_W, grad_b = mlp_backward(x2d, weights, biases, ctx.spec, gy, gJ, need_x, ctx.band_weights, gS)
        grad_W = [g if need else None for g, need in zip(grad_W, need_W)]
        grad_b = [g if need else None for g, need in zip(grad_b, need_b)]
        return (None, None, gx, *grad_W, *grad_b)


def mlp_laplacian(x2d, weights, biases, spec: NetworkSpec, band_weights=None):
    """y (P, d_L), J (P, m, k) and the Laplacian row (P, m, 1) on the kernels, differentiable to
    first order (see the module's docstring); `band_weights`: the encoding's window, if any."""
    params = [*weights, *[b for b in biases if b is not None]]
    if records_autograd(x2d, *params):
        return _LaplacianOnKernels.apply(spec, band_weights, x2d, *weights, *biases)
    with torch.no_grad(), device_guard(x2d):
        return laplacian_forward(x2d, weights, biases, spec, band_weights)
