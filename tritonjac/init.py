"""Initialisations the networks trained through their derivatives need, aware of the encoding and
skip columns of a `JacobianMLP`.

- `geometric_`: IDR / NeuS / IGR / SAL's geometric initialisation, so that the network starts as
  the SDF of a sphere of radius `radius` (gradient norm about 1: the eikonal loss starts small).
- `siren_`: SIREN's, so that sin(w0 z) stays in its well-conditioned range through the depth.

Both work on a model's current weights whatever holds them: plain layers, or layers under
`torch.nn.utils.parametrizations.weight_norm` (assigned through the parametrization, so g and v are
set consistently) or the older `torch.nn.utils.weight_norm` (weight_g and weight_v set).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["geometric_", "siren_"]


@torch.no_grad()
def geometric_(model, radius: float = 0.5, *, inside_outside: bool = False):
    """IDR/NeuS's geometric initialisation of a JacobianMLP whose output 0 is an SDF.

    Hidden layers: W ~ N(0, 2 / out_features), b = 0. The encoded band features (not the raw
    input) get zero weight in the first layer and in every skip layer, so the network starts as a
    function of the raw coordinates; other inputs (a latent code) keep their weights. The last layer:
    W ~ N(sqrt(pi / in_features), 1e-4), b = -radius, so output 0 is about |x| - radius (negated with
    inside_outside, for scenes seen from inside).

    Returns the model.
    """
    layers, spec = model.linear_layers, model._spec
    band_columns = _band_columns(model)
    for l, layer in enumerate(layers):
        W, b = _weight(layer), layer.bias
        out_features, in_features = W.shape[0], W.shape[1]
        if l == len(layers) - 1:
            mean = math.sqrt(math.pi) / math.sqrt(in_features)
            new = torch.randn_like(W) * 1e-4 + (-mean if inside_outside else mean)
            if b is not None:
                b.fill_(radius if inside_outside else -radius)
        else:
            new = torch.randn_like(W) * (math.sqrt(2.0) / math.sqrt(out_features))
            if b is not None:
                b.zero_()
            if band_columns:
                if l == 0:
                    new[:, band_columns] = 0.0
                elif l in spec.skips:
                    a0 = spec.first_input_width(model.in_features)
                    offset = 0 if spec.skip_input_first else in_features - a0
                    new[:, [offset + c for c in band_columns]] = 0.0
        _assign_weight(layer, new)
    return model


@torch.no_grad()
def siren_(model, w0: float | None = None):
    """SIREN's initialisation: the first layer U(-1/in, 1/in), the others U(+-sqrt(6/in) / w0).

    w0 is the Sine activation's (read from the model's first activation when not given). Biases are
    left as nn.Linear initialised them, as in SIREN. Returns the model.
    """
    if w0 is None:
        first = model.activations[0]
        if first.name != "sine":
            raise ValueError(f"siren_ needs w0 for a model whose activation is {first}, not sine")
        w0 = first.param
    for l, layer in enumerate(model.linear_layers):
        W = _weight(layer)
        fan_in = W.shape[1]
        bound = 1.0 / fan_in if l == 0 else math.sqrt(6.0 / fan_in) / w0
        _assign_weight(layer, torch.empty_like(W).uniform_(-bound, bound))
    return model


def _band_columns(model) -> list[int]:
    """The first layer's columns holding encoded bands (sines and cosines, not the raw input)."""
    spec = model._spec
    if spec.encoding is None:
        return []
    return [c for c, (_, _, band) in enumerate(spec.encoding.columns) if band >= 0]


def _weight(layer: nn.Module) -> torch.Tensor:
    from .module import _current_weight

    return _current_weight(layer)


def _assign_weight(layer: nn.Module, W: torch.Tensor) -> None:
    """Make layer's effective weight W, through whatever parametrizes it."""
    if nn.utils.parametrize.is_parametrized(layer, "weight"):
        layer.weight = W  # the parametrization's right_inverse sets its originals (weight_norm: g, v)
        return
    from .module import _is_weight_norm_hook

    for hook in layer._forward_pre_hooks.values():
        if _is_weight_norm_hook(hook):  # the older API: W = g * v / |v| per output row
            layer.weight_v.copy_(W)
            layer.weight_g.copy_(torch.linalg.vector_norm(W, dim=1, keepdim=True))
            return
    layer.weight.copy_(W)
