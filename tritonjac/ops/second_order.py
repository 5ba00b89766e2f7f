"""`tritonjac::mlp_second_order` and its backward: `custom_op`s (opaque to the compiler) for calls
with second derivatives, which run on the per-layer Triton kernels (`on_kernels`, the engine the
eager call would take) or on the PyTorch engine. The forward returns the second-order rows
S (P, m, q) raw; `tritonjac.functional` assembles H and the Laplacian from them."""

from __future__ import annotations

import torch

from .. import torch_engine
from ..network import NetworkSpec
from .common import bias_arguments, optional_band_weights, optional_biases, saved_inputs

__all__ = ["mlp_second_order_op", "mlp_second_order_backward_op"]


@torch.library.custom_op("tritonjac::mlp_second_order", mutates_args=())
def mlp_second_order_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    band_weights: torch.Tensor,
    activation_ids: list[int],
    params: list[float],
    thresholds: list[float],
    structure: list[int],
    scalars: list[float],
    hessian: bool,
    laplacian: bool,
    on_kernels: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = NetworkSpec.from_op_args(activation_ids, params, thresholds, structure, scalars)
    order = torch_engine.second_order.SecondOrder(spec.jacobian_inputs, hessian, laplacian)
    biases, band_weights = optional_biases(biases), optional_band_weights(band_weights)
    with torch.no_grad():
        if on_kernels:
            from ..triton_engine import second_order

            return second_order.mlp_second_order(x, weights, biases, spec, order, band_weights)
        return torch_engine.second_order.forward_points(x, weights, biases, spec, order, None, band_weights)


@mlp_second_order_op.register_fake
def _(x, weights, biases, band_weights, activation_ids, params, thresholds, structure, scalars, hessian, laplacian, *_):
    spec = NetworkSpec.from_op_args(activation_ids, params, thresholds, structure, scalars)
    order = torch_engine.second_order.SecondOrder(spec.jacobian_inputs, hessian, laplacian)
    m = spec.jacobian_outputs(weights[-1].shape[0])
    P = x.shape[0]
    return x.new_empty(P, weights[-1].shape[0]), x.new_empty(P, m, order.k), x.new_empty(P, m, order.num_rows)


@torch.library.custom_op("tritonjac::mlp_second_order_backward", mutates_args=())
def mlp_second_order_backward_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    band_weights: torch.Tensor,
    dy: torch.Tensor,
    dJ: torch.Tensor,
    dS: torch.Tensor,
    activation_ids: list[int],
    params: list[float],
    thresholds: list[float],
    structure: list[int],
    scalars: list[float],
    hessian: bool,
    laplacian: bool,
    on_kernels: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    spec = NetworkSpec.from_op_args(activation_ids, params, thresholds, structure, scalars)
    order = torch_engine.second_order.SecondOrder(spec.jacobian_inputs, hessian, laplacian)
    biases, band_weights = optional_biases(biases), optional_band_weights(band_weights)
    L = len(weights)
    has_bias = [b is not None for b in biases]
    if on_kernels:
        from ..triton_engine import backward, launch

        with launch.device_guard(x):
            dx, dW, db = backward.mlp_backward(x, weights, biases, spec, dy, dJ, True, band_weights, dS, hessian)
    else:
        dx, dW, db = torch_engine.second_order.backward_by_recompute(
            x, weights, biases, spec, order, dy, dJ, dS, True, [True] * L, has_bias, band_weights
        )
    return dx, list(dW), bias_arguments(db, x)  # an empty gradient for an empty bias


@mlp_second_order_backward_op.register_fake
def _(x, weights, biases, band_weights, dy, dJ, dS, *spec_args):
    return torch.empty_like(x), [torch.empty_like(W) for W in weights], [torch.empty_like(b) for b in biases]


def _setup_context(ctx, inputs, output):
    x, weights, biases, band_weights, *spec_args = inputs
    ctx.save_for_backward(x, *weights, *biases, band_weights)
    ctx.spec_args = tuple(spec_args)


def _backward(ctx, dy, dJ, dS):
    dx, dW, db = mlp_second_order_backward_op(*saved_inputs(ctx), dy, dJ, dS, *ctx.spec_args)
    return dx, dW, db, None, None, None, None, None, None, None, None, None


mlp_second_order_op.register_autograd(_backward, setup_context=_setup_context)
