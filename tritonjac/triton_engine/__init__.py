"""The Triton engine: launchers for the kernels of `tritonjac.kernels`, and its eager autograd.

Files, in the order a call meets them:
    plans.py      which kernels run a call (whole network or per layer), and why
    tuning.py     every configuration choice: candidates, pruning, fixed choices, shipped tables
    registry.py   every kernel with its pointer arguments and autotune key (also read by aot.py)
    launch.py     buffers, checks, configuration resolution and the one place kernels launch
    forward.py    y and J
    reverse.py    y and J in reverse mode (fewer outputs than inputs)
    backward.py   the gradients: fused whole-network kernel or per-layer kernels
    second_order.py  the Laplacian row on the per-layer forward kernels

Importing this package imports triton; `tritonjac.functional` imports it only when the Triton
backend is asked for.
"""

from __future__ import annotations

import torch

from ..grad_mode import records_autograd, refuse_double_backward
from ..network import NetworkSpec
from . import forward, launch, second_order
from .backward import mlp_backward
from .plans import (
    Plan,
    backward_plan,
    fused_backward_available,
    per_layer_backward,
    plan_for,
    planned_kind,
    seeded_backward_available,
    unseeded_backward,
)
from .reverse import reverse_forward

__all__ = [
    "mlp_jacobian",
    "mlp_forward",
    "mlp_backward",
    "plan_for",
    "planned_kind",
    "backward_plan",
    "fused_backward_available",
    "seeded_backward_available",
    "unseeded_backward",
    "per_layer_backward",
    "Plan",
    "launch",
    "second_order",
]


def mlp_forward(x2d, weights, biases, spec: NetworkSpec, *, jacobian: bool = True, band_weights=None):
    """y (P, d_L) and J (P, m, k) (None without `jacobian`) from the kernels, no autograd: J in
    reverse mode when the spec asks for it (`NetworkSpec.uses_reverse_mode`), else in forward mode."""
    if jacobian and spec.uses_reverse_mode(weights[-1].shape[0]):
        return reverse_forward(x2d, weights, biases, spec, band_weights)
    return forward.mlp_forward(x2d, weights, biases, spec, jacobian=jacobian, band_weights=band_weights)


def mlp_jacobian(x2d, weights, biases, spec: NetworkSpec, jacobian: bool = True, band_weights=None):
    """y (P, d_L) and J (P, m, k) (None without `jacobian`) from the kernels, differentiable
    with respect to x2d, the weights and the biases when any of them requires a gradient.
    `band_weights`: the encoding's window (constants), when it has one."""
    params = [*weights, *biases]
    if not records_autograd(x2d, *params):
        return mlp_forward(x2d, weights, biases, spec, jacobian=jacobian, band_weights=band_weights)
    out = _TritonMLP.apply(spec, jacobian, band_weights, x2d, *params)
    return out if jacobian else (out, None)


class _TritonMLP(torch.autograd.Function):
    """The kernels' forward and backward for eager calls.

    Saves only x and the parameters: the backward recomputes the forward. Unlike the `torch.library`
    operators (used under torch.compile), it knows when there is no loss on J (its gradient is None,
    not a tensor of zeros), and then runs the backward without tangents.
    """

    @staticmethod
    def forward(ctx, spec: NetworkSpec, jacobian: bool, band_weights, x2d, *params):
        L = spec.num_layers
        weights, biases = list(params[:L]), list(params[L:])
        y, J = mlp_forward(x2d, weights, biases, spec, jacobian=jacobian, band_weights=band_weights)
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.band_weights = band_weights
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x2d, *weights, *(b for b in biases if b is not None))
        if J is None:
            return y
        return y, J

    @staticmethod
    def backward(ctx, gy, gJ=None):
        refuse_double_backward()
        spec = ctx.spec
        L = spec.num_layers
        x2d, *rest = ctx.saved_tensors
        weights, present = rest[:L], iter(rest[L:])
        biases = [next(present) if has else None for has in ctx.has_bias]
        needs = ctx.needs_input_grad  # (spec, jacobian, band_weights, x, W_1..W_L, b_1..b_L)
        need_W, need_b = needs[4 : 4 + L], [h and n for h, n in zip(ctx.has_bias, needs[4 + L :])]
        if gy is None and gJ is None:
            return (None,) * len(needs)
        gx, grad_W, grad_b = mlp_backward(x2d, weights, biases, spec, gy, gJ, needs[3], ctx.band_weights)
        grad_W = [g if need else None for g, need in zip(grad_W, need_W)]
        grad_b = [g if need else None for g, need in zip(grad_b, need_b)]
        return (None, None, None, gx, *grad_W, *grad_b)
