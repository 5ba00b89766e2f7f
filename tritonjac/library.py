"""The op as `torch.library` custom ops, so that `torch.compile(fullgraph=True)` can trace models
containing a JacobianMLP, forward and training step alike.

    tritonjac::mlp_jacobian            (x, weights, biases, activations...) -> (y, J)
    tritonjac::mlp_jacobian_backward   (x, weights, biases, dy, dJ, ...) -> (dx, dweights, dbiases)

Biases travel as a list of tensors (an empty tensor for a layer without bias; a list holding None
is not differentiable through aot_autograd). Each op has a fake (meta) implementation for tracing; the forward's autograd formula calls the
backward op, which recomputes the forward (nothing but the inputs is saved). Both dispatch to the
analytic PyTorch engine or the Triton kernels by the `backend` argument, resolved before the op is
entered (the compiler never sees a device-dependent choice). Eager calls do not go through these
ops: they use the autograd.Functions of `functional.py`, which keep intermediate state where that
is faster.

The Triton kernels are opaque to the compiler here (`custom_op`, not `triton_op`): their
launchers choose plans and configurations at run time. tritonjac's ops are the place to look if
a future version lets inductor see them.
"""

from __future__ import annotations

import torch

from .activations import ACTIVATION_NAMES, Activation
from .reference import MLPSpec, _forward, backward_by_recompute

__all__ = ["mlp_jacobian_op", "mlp_jacobian_backward_op", "spec_arguments", "bias_arguments"]


def bias_arguments(biases, like: torch.Tensor) -> list[torch.Tensor]:
    """Biases for the ops: an empty tensor where a layer has none."""
    return [b if b is not None else like.new_empty(0) for b in biases]


def _biases(biases: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return [b if b.numel() else None for b in biases]


def spec_arguments(spec: MLPSpec) -> tuple[list[int], list[float], list[float], int]:
    """An MLPSpec as the op's primitive arguments (activations by their index in ACTIVATION_NAMES:
    custom ops take no list of strings)."""
    acts = spec.activations
    ids = [ACTIVATION_NAMES.index(a.name) for a in acts]
    return ids, [float(a.param) for a in acts], [float(a.threshold) for a in acts], spec.jacobian_inputs


def _spec(ids, params, thresholds, k) -> MLPSpec:
    acts = (Activation(ACTIVATION_NAMES[i], p, t) for i, p, t in zip(ids, params, thresholds))
    return MLPSpec(tuple(acts), k)


@torch.library.custom_op("tritonjac::mlp_jacobian", mutates_args=())
def mlp_jacobian_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    activation_ids: list[int],
    params: list[float],
    thresholds: list[float],
    k: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _spec(activation_ids, params, thresholds, k)
    biases = _biases(biases)
    with torch.no_grad():
        if backend == "triton":
            from . import triton_ops

            return triton_ops.mlp_forward(x, weights, biases, spec)
        return _forward(x, weights, biases, spec, None)


@mlp_jacobian_op.register_fake
def _(x, weights, biases, activation_ids, params, thresholds, k, backend):
    d_out = weights[-1].shape[0]
    return x.new_empty(x.shape[0], d_out), x.new_empty(x.shape[0], d_out, k)


@torch.library.custom_op("tritonjac::mlp_jacobian_backward", mutates_args=())
def mlp_jacobian_backward_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    dy: torch.Tensor,
    dJ: torch.Tensor,
    activation_ids: list[int],
    params: list[float],
    thresholds: list[float],
    k: int,
    backend: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    spec = _spec(activation_ids, params, thresholds, k)
    L = len(weights)
    biases = _biases(biases)
    has_bias = [b is not None for b in biases]
    if backend == "triton":
        from . import triton_ops

        fused = triton_ops.fused_backward_available(x, weights, spec, True)
        run = triton_ops.mlp_backward if fused else triton_ops.layers_backward
        dx, dW, db = run(x, weights, biases, spec, dy, dJ, True)
    else:
        dx, dW, db = backward_by_recompute(x, weights, biases, spec, dy, dJ, True, [True] * L, has_bias)
    return dx, list(dW), bias_arguments(db, x)  # an empty gradient for an empty bias


@mlp_jacobian_backward_op.register_fake
def _(x, weights, biases, dy, dJ, activation_ids, params, thresholds, k, backend):
    return torch.empty_like(x), [torch.empty_like(W) for W in weights], [torch.empty_like(b) for b in biases]


def _setup_context(ctx, inputs, output):
    x, weights, biases, activation_ids, params, thresholds, k, backend = inputs
    ctx.save_for_backward(x, *weights, *biases)
    ctx.spec_args = (activation_ids, params, thresholds, k, backend)


def _backward(ctx, dy, dJ):
    x, *rest = ctx.saved_tensors
    L = len(rest) // 2
    weights, biases = list(rest[:L]), list(rest[L:])
    dx, dW, db = mlp_jacobian_backward_op(x, weights, biases, dy, dJ, *ctx.spec_args)
    return dx, dW, db, None, None, None, None, None


mlp_jacobian_op.register_autograd(_backward, setup_context=_setup_context)
