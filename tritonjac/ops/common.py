"""Argument conventions and autograd plumbing shared by both operator families."""

from __future__ import annotations

import torch

__all__ = [
    "bias_arguments",
    "optional_biases",
    "band_weights_argument",
    "optional_band_weights",
    "no_jacobian",
    "loss_on_jacobian",
    "setup_context",
    "saved_inputs",
]


def bias_arguments(biases, like: torch.Tensor) -> list[torch.Tensor]:
    """Biases for the ops: an empty tensor where a layer has none (a list holding None is not
    differentiable through aot_autograd)."""
    return [b if b is not None else like.new_empty(0) for b in biases]


def optional_biases(biases: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The ops' biases back as the engines take them (None for an empty tensor)."""
    return [b if b.numel() else None for b in biases]


def no_jacobian(x: torch.Tensor) -> torch.Tensor:
    """J's place in the forward ops' outputs when it is not asked for: a 1-D empty tensor (a real J
    is 3-D), whose gradient tells the backward op that there is no loss on J."""
    return x.new_empty(0)


def loss_on_jacobian(dJ: torch.Tensor) -> torch.Tensor | None:
    return dJ if dJ.dim() == 3 else None


def band_weights_argument(band_weights, like: torch.Tensor) -> torch.Tensor:
    """The encoding's window for the ops: an empty tensor when there is none."""
    return band_weights if band_weights is not None else like.new_empty(0)


def optional_band_weights(band_weights: torch.Tensor) -> torch.Tensor | None:
    return band_weights if band_weights.numel() else None


def setup_context(ctx, inputs, output):
    """Each forward op saves its inputs; the spec arguments (and the backend) travel to the backward."""
    x, weights, biases, band_weights, activation_ids, params, thresholds, structure, scalars, _jacobian, *backend = (
        inputs
    )
    ctx.save_for_backward(x, *weights, *biases, band_weights)
    ctx.spec_args = (activation_ids, params, thresholds, structure, scalars, *backend)


def saved_inputs(ctx):
    """(x, weights, biases, band_weights) as `setup_context` saved them."""
    x, *rest, band_weights = ctx.saved_tensors
    L = len(rest) // 2
    return x, list(rest[:L]), list(rest[L:]), band_weights
