"""The network description: what every engine, launcher and operator needs besides the tensors.

`NetworkSpec` is the bottom of the package (it imports only the activation registry): the layers'
activations and which inputs are differentiated. The tensors (weights (out, in) as in `nn.Linear`,
biases or None) travel beside it. Features that change the network's shape (skip connections,
input encodings, which outputs are differentiated) belong here, so that the engines, the kernels'
launchers and the `torch.library` operators read them from one place.

Also here: the checks every entry point runs on its inputs, with errors that name the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .activations import ACTIVATION_NAMES, Activation, as_activation

__all__ = [
    "NetworkSpec",
    "make_spec",
    "check_tensors",
    "check_backend",
    "BACKENDS",
    "SUPPORTED_DTYPES",
    "TRITON_DTYPES",
]

BACKENDS = ("auto", "torch", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # the PyTorch engine's
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class NetworkSpec:
    """One activation per Linear layer (identity where none follows it) and the tangent count k:
    J holds the derivatives with respect to the first k inputs."""

    activations: tuple[Activation, ...]
    jacobian_inputs: int

    @property
    def num_layers(self) -> int:
        return len(self.activations)

    def to_op_args(self) -> tuple[list[int], list[float], list[float], int]:
        """The spec as the `torch.library` operators' primitive arguments (custom ops take no
        strings in lists: activations travel as their registry ids)."""
        acts = self.activations
        ids = [a.kind.kernel_id for a in acts]
        return ids, [float(a.param) for a in acts], [float(a.threshold) for a in acts], self.jacobian_inputs

    @staticmethod
    def from_op_args(ids, params, thresholds, k) -> NetworkSpec:
        acts = (Activation(ACTIVATION_NAMES[i], p, t) for i, p, t in zip(ids, params, thresholds))
        return NetworkSpec(tuple(acts), k)


def make_spec(activations: Sequence, num_layers: int, in_features: int, jacobian_inputs) -> NetworkSpec:
    """Parse one activation per layer (names, modules, None) and check `jacobian_inputs`."""
    acts = tuple(as_activation(a) for a in activations)
    if len(acts) != num_layers:
        raise ValueError(f"got {len(acts)} activations for {num_layers} layers; give one per layer (None for identity)")
    k = in_features if jacobian_inputs is None else jacobian_inputs
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= in_features:
        raise ValueError(f"jacobian_inputs must be an int from 1 to in_features={in_features}, not {jacobian_inputs!r}")
    return NetworkSpec(acts, k)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, not {backend!r}")
    return backend


def check_tensors(x, weights, biases) -> None:
    """x and the parameters: types, dtypes, devices and shapes that chain from layer to layer."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, not {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; tritonjac supports float32, float64, bfloat16 and float16 inputs")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension, its last being the input features")
    if len(weights) == 0:
        raise ValueError("the MLP needs at least one layer")
    if len(biases) != len(weights):
        raise ValueError(f"got {len(biases)} biases for {len(weights)} layers; use None for a layer without bias")
    width = x.shape[-1]
    for l, (W, b) in enumerate(zip(weights, biases)):
        for name, t in (("weight", W), ("bias", b)):
            if t is None:
                continue
            if t.dtype != x.dtype:
                raise TypeError(
                    f"layer {l} {name} has dtype {t.dtype} but x has dtype {x.dtype}; "
                    "convert one of them (e.g. module.to(x.dtype))"
                )
            if t.device != x.device:
                raise RuntimeError(f"layer {l} {name} is on {t.device} but x is on {x.device}")
        if W.dim() != 2:
            raise ValueError(f"layer {l} weight must be 2-D (out, in), got shape {tuple(W.shape)}")
        if W.shape[1] != width:
            what = f"x has {width} features in its last dimension" if l == 0 else f"layer {l - 1} has {width} outputs"
            raise ValueError(f"{what} but layer {l} expects {W.shape[1]} inputs (x.shape = {tuple(x.shape)})")
        if b is not None and tuple(b.shape) != (W.shape[0],):
            raise ValueError(f"layer {l} bias has shape {tuple(b.shape)}, expected ({W.shape[0]},)")
        width = W.shape[0]
