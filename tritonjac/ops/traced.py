"""`tritonjac::triton_mlp_jacobian` and its backward: `triton_op`s the compiler traces into (see
__init__). Importing this module defines them; it imports triton and inductor."""

from __future__ import annotations

import torch

from .. import triton_engine
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

__all__ = ["triton_mlp_jacobian_op", "triton_mlp_jacobian_backward_op"]


@torch.library.triton_op("tritonjac::triton_mlp_jacobian", mutates_args=())
def triton_mlp_jacobian_op(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    # the body is traced (fake tensors) and becomes the kernel launches in the compiled graph
    spec = NetworkSpec.from_op_args(activation_ids, params, thresholds, structure, scalars)
    bands = optional_band_weights(band_weights)
    y, J = triton_engine.mlp_forward(x, weights, optional_biases(biases), spec, jacobian=jacobian, band_weights=bands)
    return y, J if jacobian else no_jacobian(x)


@torch.library.triton_op("tritonjac::triton_mlp_jacobian_backward", mutates_args=())
def triton_mlp_jacobian_backward_op(
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
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    spec = NetworkSpec.from_op_args(activation_ids, params, thresholds, structure, scalars)
    bands = optional_band_weights(band_weights)
    dx, dW, db = triton_engine.mlp_backward(
        x, weights, optional_biases(biases), spec, dy, loss_on_jacobian(dJ), True, bands
    )
    return dx, list(dW), bias_arguments(db, x)  # an empty gradient for an empty bias


def _backward(ctx, dy, dJ):
    dx, dW, db = triton_mlp_jacobian_backward_op(*saved_inputs(ctx), dy, dJ, *ctx.spec_args)
    return dx, dW, db, None, None, None, None, None, None, None


triton_mlp_jacobian_op.register_autograd(_backward, setup_context=setup_context)
