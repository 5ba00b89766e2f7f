"""`tritonjac::mlp_jacobian` and its backward: `custom_op`s, opaque to the compiler (see __init__)."""

from __future__ import annotations

import torch

from .. import torch_engine
from ..network import NetworkSpec
from .common import (
    bias_arguments,
    loss_on_jacobian,
    no_jacobian,
    optional_band_weights,
    optional_biases,
    saved_inputs,
    setup_context,
)

__all__ = ["mlp_jacobian_op", "mlp_jacobian_backward_op"]


@torch.library.custom_op("tritonjac::mlp_jacobian", mutates_args=())
def mlp_jacobian_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    band_weights: torch.Tensor,
    activation_ids: list[int],
    params: list[float],
    thresholds: list[float],
    structure: list[int],
    scalars: list[float],
    jacobian: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = NetworkSpec.from_op_args(activation_ids, params, thresholds, structure, scalars)
    biases = optional_biases(biases)
    with torch.no_grad():
        if backend == "triton":
            from .. import triton_engine

            y, J = triton_engine.mlp_forward(
                x, weights, biases, spec, jacobian=jacobian, band_weights=optional_band_weights(band_weights)
            )
        else:  # the module never asks the PyTorch engine for y alone (it runs its plain forward)
            y, J = torch_engine.forward_points(x, weights, biases, spec, optional_band_weights(band_weights))
    return y, J if jacobian else no_jacobian(x)


@mlp_jacobian_op.register_fake
def _(x, weights, biases, band_weights, activation_ids, params, thresholds, structure, scalars, jacobian, backend):
    spec = NetworkSpec.from_op_args(activation_ids, params, thresholds, structure, scalars)
    d_out = weights[-1].shape[0]
    J = x.new_empty(x.shape[0], spec.jacobian_outputs(d_out), spec.jacobian_inputs) if jacobian else no_jacobian(x)
    return x.new_empty(x.shape[0], d_out), J


@torch.library.custom_op("tritonjac::mlp_jacobian_backward", mutates_args=())
def mlp_jacobian_backward_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    band_weights: torch.Tensor,
    dy: torch.Tensor,
    dJ: torch.Tensor,
    activation_ids: list[int],
    params: list[float],
    thresholds: list[float],
    structure: list[int],
    scalars: list[float],
    backend: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    spec = NetworkSpec.from_op_args(activation_ids, params, thresholds, structure, scalars)
    L = len(weights)
    biases = optional_biases(biases)
    gJ = loss_on_jacobian(dJ)
    if backend == "triton":
        from .. import triton_engine

        dx, dW, db = triton_engine.mlp_backward(
            x, weights, biases, spec, dy, gJ, True, optional_band_weights(band_weights)
        )
    else:
        has_bias = [b is not None for b in biases]
        dx, dW, db = torch_engine.backward_by_recompute(
            x, weights, biases, spec, dy, gJ, True, [True] * L, has_bias, optional_band_weights(band_weights)
        )
    return dx, list(dW), bias_arguments(db, x)  # an empty gradient for an empty bias


@mlp_jacobian_backward_op.register_fake
def _(x, weights, biases, band_weights, dy, dJ, activation_ids, params, thresholds, structure, scalars, backend):
    return torch.empty_like(x), [torch.empty_like(W) for W in weights], [torch.empty_like(b) for b in biases]


def _backward(ctx, dy, dJ):
    dx, dW, db = mlp_jacobian_backward_op(*saved_inputs(ctx), dy, dJ, *ctx.spec_args)
    return dx, dW, db, None, None, None, None, None, None, None, None


mlp_jacobian_op.register_autograd(_backward, setup_context=setup_context)
