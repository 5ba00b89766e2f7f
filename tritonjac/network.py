"""The network description: what every engine, launcher and operator needs besides the tensors.

`NetworkSpec` is the bottom of the package (it imports only the activation registry): the layers'
activations and which inputs are differentiated. The tensors (weights (out, in) as in `nn.Linear`,
biases or None) travel beside it. Features that change the network's shape (skip connections,
input encodings, which outputs are differentiated) belong here, so that the engines, the kernels'
launchers and the `torch.library` operators read them from one place.

Also here: the checks every entry point runs on its inputs, with errors that name the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .activations import ACTIVATION_NAMES, Activation, as_activation
from .encoding import ORDERS, EncodingSpec

__all__ = [
    "NetworkSpec",
    "make_spec",
    "check_tensors",
    "check_input",
    "check_backend",
    "check_mode",
    "BACKENDS",
    "SUPPORTED_DTYPES",
    "TRITON_DTYPES",
    "MODES",
]

BACKENDS = ("auto", "torch", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # the PyTorch engine's
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("auto", "forward", "reverse")  # how J is computed: see NetworkSpec.mode


@dataclass(frozen=True)
class NetworkSpec:
    """The network's structure besides its tensors.

    - activations: one per Linear layer (identity where none follows it).
    - jacobian_inputs (k) and input_start: J differentiates with respect to
      x[..., input_start : input_start + k].
    - output_start, output_stop: J holds the outputs y[..., output_start:output_stop] (None: to
      the last), and nothing is computed for the tangents of the others.
    - encoding: the first k inputs are encoded (then input_start is 0); the first layer's input is
      a0 = cat([encoding(x[..., :k]), x[..., k:]]), or x itself without an encoding.
    - skips: layers whose input is cat([h, a0]) * skip_scale (cat([a0, h]) with skip_input_first),
      h being the previous layer's activated output.
    - mode: "forward" (k tangents carried up with the values), "reverse" (m adjoints carried
      down after them) or "auto" (chosen per call, `tritonjac.functional.choose_mode`).
    """

    activations: tuple[Activation, ...]
    jacobian_inputs: int
    input_start: int = 0
    output_start: int = 0
    output_stop: int | None = None
    encoding: EncodingSpec | None = None
    skips: tuple[int, ...] = ()
    skip_scale: float = 1.0
    skip_input_first: bool = False
    mode: str = "auto"

    @property
    def num_layers(self) -> int:
        return len(self.activations)

    @property
    def is_plain(self) -> bool:
        """A chain of layers differentiated with respect to its first k inputs, every output in J:
        what the Triton kernels compute today."""
        return (
            self.input_start == 0
            and self.output_start == 0
            and self.output_stop is None
            and self.encoding is None
            and not self.skips
        )

    def output_rows(self, out_features: int) -> slice:
        """The outputs J holds, as a slice of y's features."""
        return slice(self.output_start, out_features if self.output_stop is None else self.output_stop)

    def jacobian_outputs(self, out_features: int) -> int:
        rows = self.output_rows(out_features)
        return rows.stop - rows.start

    def uses_reverse_mode(self, out_features: int) -> bool:
        """Whether the PyTorch engine computes J in reverse mode: asked for, or under "auto" with
        fewer selected outputs than differentiated inputs (1 + m stacked rows per point and layer
        instead of forward mode's 1 + k)."""
        if self.mode == "auto":
            return self.jacobian_outputs(out_features) < self.jacobian_inputs
        return self.mode == "reverse"

    def first_input_width(self, in_features: int) -> int:
        """Features of a0, the first layer's (and every skip layer's) input from x."""
        if self.encoding is None:
            return in_features
        return self.encoding.width + in_features - self.jacobian_inputs

    def layer_columns(self, l: int, d_in: int, in_features: int) -> tuple[slice | None, slice | None]:
        """Layer l's weight columns that multiply the previous layer's output and those that
        multiply a0 (None where the layer has no such part); d_in is the layer's input width."""
        a0 = self.first_input_width(in_features)
        if l == 0:
            return None, slice(0, d_in)
        if l not in self.skips:
            return slice(0, d_in), None
        if self.skip_input_first:
            return slice(a0, d_in), slice(0, a0)
        return slice(0, d_in - a0), slice(d_in - a0, d_in)

    def layer_scale(self, l: int) -> float:
        return self.skip_scale if l in self.skips else 1.0

    def to_op_args(self) -> tuple[list[int], list[float], list[float], list[int], list[float]]:
        """The spec as the `torch.library` operators' primitive arguments (custom ops take no
        strings or objects: activations travel as their registry ids, the rest as ints and floats)."""
        acts = self.activations
        ids = [a.kind.kernel_id for a in acts]
        encoding = [1, *self.encoding.to_op_args()] if self.encoding is not None else [0]
        structure = [
            self.jacobian_inputs,
            self.input_start,
            self.output_start,
            -1 if self.output_stop is None else self.output_stop,
            int(self.skip_input_first),
            MODES.index(self.mode),
            len(self.skips),
            *self.skips,
            *encoding,
        ]
        scalars = [self.skip_scale, self.encoding.frequency_scale if self.encoding is not None else 1.0]
        return ids, [float(a.param) for a in acts], [float(a.threshold) for a in acts], structure, scalars

    @staticmethod
    def from_op_args(ids, params, thresholds, structure, scalars) -> NetworkSpec:
        acts = tuple(Activation(ACTIVATION_NAMES[i], p, t) for i, p, t in zip(ids, params, thresholds))
        k, input_start, output_start, output_stop, skip_first, mode, num_skips, *rest = structure
        skips, (has_encoding, *encoding) = tuple(rest[:num_skips]), rest[num_skips:]
        if has_encoding:
            coordinates, frequencies, include_input, order, windowed = encoding
            enc = EncodingSpec(coordinates, frequencies, bool(include_input), ORDERS[order], scalars[1], bool(windowed))
        else:
            enc = None
        stop = None if output_stop < 0 else output_stop
        return NetworkSpec(
            acts, k, input_start, output_start, stop, enc, skips, scalars[0], bool(skip_first), MODES[mode]
        )


def make_spec(
    activations: Sequence,
    num_layers: int,
    in_features: int,
    jacobian_inputs=None,
    *,
    out_features: int | None = None,
    jacobian_outputs=None,
    encoding=None,
    skips: Sequence[int] = (),
    skip_scale: float = 1.0,
    skip_input_first: bool = False,
    mode: str = "auto",
) -> NetworkSpec:
    """Parse one activation per layer (names, modules, None) and check the rest of the structure.

    jacobian_inputs / jacobian_outputs: None (all), an int n (the first n) or a slice of
    contiguous indices (step 1; negative indices count from the end). With an encoding (an
    `EncodingSpec` or a `PositionalEncoding`), the differentiated inputs must be the first k (they
    are the encoded ones). mode: one of MODES.
    """
    acts = tuple(as_activation(a) for a in activations)
    if len(acts) != num_layers:
        raise ValueError(f"got {len(acts)} activations for {num_layers} layers; give one per layer (None for identity)")
    start, stop = _index_range("jacobian_inputs", jacobian_inputs, in_features, "in_features")
    output_start, output_stop = 0, None
    if jacobian_outputs is not None:
        if out_features is None:
            raise ValueError("jacobian_outputs needs the output width")
        output_start, output_stop = _index_range("jacobian_outputs", jacobian_outputs, out_features, "out_features")
        if (output_start, output_stop) == (0, out_features):
            output_stop = None
    if encoding is not None and not isinstance(encoding, EncodingSpec):
        if not hasattr(encoding, "spec"):
            raise TypeError(f"encoding must be a tritonjac.PositionalEncoding, not {type(encoding).__name__}")
        encoding = encoding.spec(stop - start)
    if encoding is not None and start != 0:
        raise ValueError(
            f"with an encoding the differentiated inputs must be the first ones (they are what is encoded), "
            f"not jacobian_inputs={jacobian_inputs!r}; put the encoded inputs first in x"
        )
    if encoding is not None and encoding.coordinates != stop - start:
        raise ValueError(
            f"the encoding encodes {encoding.coordinates} inputs but jacobian_inputs selects {stop - start}"
        )
    skips = tuple(skips)
    for s in skips:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < num_layers:
            raise ValueError(
                f"skips must be indices of Linear layers from 1 to {num_layers - 1} (layer 0 already "
                f"takes the input), not {s!r}"
            )
    if len(set(skips)) != len(skips):
        raise ValueError(f"skips has repeated layers: {skips}")
    check_mode(mode)
    scale = float(skip_scale)
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"skip_scale must be finite and non-zero, not {skip_scale!r}")
    return NetworkSpec(
        acts,
        stop - start,
        start,
        output_start,
        output_stop,
        encoding,
        tuple(sorted(skips)),
        scale,
        bool(skip_input_first),
        mode,
    )


def _index_range(name: str, selection, size: int, size_name: str) -> tuple[int, int]:
    """(start, stop) of None (all), an int n (the first n) or a slice with step 1, within range(size)."""
    if selection is None:
        return 0, size
    if isinstance(selection, slice):
        start, stop, step = selection.indices(size)
        if step != 1 or stop <= start:
            raise ValueError(
                f"{name} must select at least one index, contiguously (step 1), not {selection!r} of {size}"
            )
        return start, stop
    if isinstance(selection, bool) or not isinstance(selection, int) or not 1 <= selection <= size:
        raise ValueError(f"{name} must be None, an int from 1 to {size_name}={size} or a slice, not {selection!r}")
    return 0, selection


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, not {mode!r}")
    return mode


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, not {backend!r}")
    return backend


def check_input(x, weights) -> None:
    """x's type, dtype and rank, and that there is a layer: what parsing the spec relies on."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, not {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; tritonjac supports float32, float64, bfloat16 and float16 inputs")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension, its last being the input features")
    if len(weights) == 0:
        raise ValueError("the MLP needs at least one layer")


def check_tensors(x, weights, biases, spec: NetworkSpec | None = None) -> None:
    """x and the parameters: types, dtypes, devices and shapes that chain from layer to layer
    (through the encoding and the skip connections when spec has them)."""
    check_input(x, weights)
    if len(biases) != len(weights):
        raise ValueError(f"got {len(biases)} biases for {len(weights)} layers; use None for a layer without bias")
    a0 = x.shape[-1] if spec is None else spec.first_input_width(x.shape[-1])
    skips = () if spec is None else spec.skips
    width = a0
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
        expected = width + a0 if l in skips else width
        if W.shape[1] != expected:
            if l == 0:
                what = f"x has {x.shape[-1]} features in its last dimension"
                if spec is not None and spec.encoding is not None:
                    what += f", {a0} after the encoding"
            elif l in skips:
                what = f"layer {l} skips: layer {l - 1}'s {width} outputs and {a0} input features make {expected}"
            else:
                what = f"layer {l - 1} has {width} outputs"
            raise ValueError(f"{what} but layer {l} expects {W.shape[1]} inputs (x.shape = {tuple(x.shape)})")
        if b is not None and tuple(b.shape) != (W.shape[0],):
            raise ValueError(f"layer {l} bias has shape {tuple(b.shape)}, expected ({W.shape[0]},)")
        width = W.shape[0]
