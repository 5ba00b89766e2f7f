"""Positional encodings of the differentiated inputs: NeRF's sines and cosines, with a window.

`PositionalEncoding` is what users pass to `JacobianMLP(encoding=...)`; `EncodingSpec` is its
frozen description, which the engines read (it is part of `NetworkSpec`).

Every encoded feature (a column of the first layer's input) is `w * f(c * x_j)`: one coordinate j
of the k encoded inputs, one function f (identity, sin or cos), one frequency c and a weight w
(the coarse-to-fine window of its band, 1 without a window or for the raw input). So its
derivative is non-zero for coordinate j alone: the encoding's tangent has one non-zero per
feature, and the engines multiply only those (docs/design.md, section 8). The column tables
(`columns`) describe any order; two orders are built in:

    "nerf"        [x, sin(c_0 x), cos(c_0 x), sin(c_1 x), cos(c_1 x), ...], each block k wide
                  (NeRF, IDR, NeuS, VolSDF, Nerfies, D-NeRF)
    "nerfstudio"  [sin(c_i x_j) for j, for i], then the cosines alike, then x (nerfstudio and
                  sdfstudio: coordinate-major sines, then cosines, the raw input last)

with c_i = frequency_scale * 2**i (NeRF: 1; nerfstudio: 2*pi; SIREN's baseline: pi).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

__all__ = ["PositionalEncoding", "EncodingSpec", "IDENTITY", "SIN", "COS", "ORDERS"]

IDENTITY, SIN, COS = 0, 1, 2  # the column functions (the kernels read the same ids)
ORDERS = ("nerf", "nerfstudio")


@dataclass(frozen=True)
class EncodingSpec:
    """The encoding's structure: what the engines need besides the window's current weights."""

    coordinates: int  # k, the encoded (and differentiated) inputs
    num_frequencies: int
    include_input: bool = True
    order: str = "nerf"
    frequency_scale: float = 1.0
    windowed: bool = False  # the band weights come as a tensor with each call (alpha is annealed)

    @property
    def width(self) -> int:
        """Encoded features: k raw inputs (if included) plus k sines and k cosines per band."""
        return self.coordinates * (int(self.include_input) + 2 * self.num_frequencies)

    @cached_property
    def columns(self) -> tuple[tuple[int, int, int], ...]:
        """(coordinate j, function, band i or -1 for the raw input) of every encoded feature, in order."""
        k, L = self.coordinates, self.num_frequencies
        raw = [(j, IDENTITY, -1) for j in range(k)] if self.include_input else []
        if self.order == "nerf":
            bands = [(j, f, i) for i in range(L) for f in (SIN, COS) for j in range(k)]
            return tuple(raw + bands)
        sines = [(j, SIN, i) for j in range(k) for i in range(L)]
        cosines = [(j, COS, i) for j in range(k) for i in range(L)]
        return tuple(sines + cosines + raw)

    def frequency(self, band: int) -> float:
        return 1.0 if band < 0 else self.frequency_scale * 2.0**band

    def to_op_args(self) -> list:
        return [
            self.coordinates,
            self.num_frequencies,
            int(self.include_input),
            ORDERS.index(self.order),
            int(self.windowed),
        ]


class PositionalEncoding(nn.Module):
    """NeRF's positional encoding of the k differentiated inputs, as the first layer sees them.

    Args:
        num_frequencies: L, the bands sin(c_i x), cos(c_i x) for i = 0..L-1.
        include_input: whether the raw input comes first (NeRF and its descendants: yes).
        order: "nerf" (default) or "nerfstudio" (see the module's docstring).
        frequency_scale: c_i = frequency_scale * 2**i (1 for NeRF, 2*pi for nerfstudio, pi for
            SIREN's baseline).
        alpha: the coarse-to-fine window (Nerfies): band i is scaled by
            (1 - cos(pi * clamp(alpha - i, 0, 1))) / 2, the raw input never. None: no window.
            Set it during training (`encoding.alpha = ...`); it is not a parameter.

    As a module, `encoding(x)` returns the features (..., width) for x (..., k): the plain PyTorch
    computation, for inspection and for networks that use it outside a JacobianMLP.

    Example:
        >>> pe = PositionalEncoding(6)          # NeuS, IDR: 3 -> 39 features
        >>> model = JacobianMLP(3, [256] * 8, 257, nn.Softplus(beta=100), encoding=pe,
        ...                     skips=(4,), skip_scale=0.5**0.5, jacobian_outputs=1)
    """

    def __init__(
        self,
        num_frequencies: int,
        include_input: bool = True,
        *,
        order: str = "nerf",
        frequency_scale: float = 1.0,
        alpha: float | None = None,
    ):
        super().__init__()
        if isinstance(num_frequencies, bool) or not isinstance(num_frequencies, int) or num_frequencies < 0:
            raise ValueError(f"num_frequencies must be an int >= 0, not {num_frequencies!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}, not {order!r}")
        if num_frequencies == 0 and not include_input:
            raise ValueError("an encoding with no frequencies and without its input has no features")
        self.num_frequencies = num_frequencies
        self.include_input = bool(include_input)
        self.order = order
        self.frequency_scale = float(frequency_scale)
        # alpha lives in a tensor (not saved in state_dicts): changing it each step under
        # torch.compile reads a new value instead of recompiling for a new constant
        self.register_buffer("_alpha", torch.zeros((), dtype=torch.float64), persistent=False)
        self.windowed = False
        self.alpha = alpha

    @property
    def alpha(self) -> float | None:
        """The window's alpha (None: no window)."""
        return float(self._alpha) if self.windowed else None

    @alpha.setter
    def alpha(self, value: float | None):
        self.windowed = value is not None
        if value is not None:
            with torch.no_grad():
                self._alpha.fill_(float(value))

    def spec(self, coordinates: int) -> EncodingSpec:
        """The structure for k = coordinates encoded inputs."""
        return EncodingSpec(
            coordinates,
            self.num_frequencies,
            self.include_input,
            self.order,
            self.frequency_scale,
            self.windowed,
        )

    def band_weights(self, like: torch.Tensor) -> torch.Tensor | None:
        """The window's weight per band at the current alpha (None without a window), in like's
        dtype and on its device: (1 - cos(pi * clamp(alpha - i, 0, 1))) / 2 for band i."""
        if not self.windowed:
            return None
        bands = torch.arange(self.num_frequencies, device=like.device, dtype=torch.float64)
        ramp = (self._alpha.to(like.device) - bands).clamp(0.0, 1.0)
        return ((1.0 - torch.cos(math.pi * ramp)) / 2.0).to(like.dtype)

    def width(self, coordinates: int) -> int:
        return self.spec(coordinates).width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec(x.shape[-1])
        weights = self.band_weights(x)
        features = []
        for j, function, band in spec.columns:
            # x[..., j : j + 1], not x[..., j]: under torch.func.vmap a 0-d slice times a Python
            # float promotes to float64
            t = x[..., j : j + 1] * spec.frequency(band)
            value = t if function == IDENTITY else torch.sin(t) if function == SIN else torch.cos(t)
            features.append(value if band < 0 or weights is None else value * weights[band])
        return torch.cat(features, -1)

    def extra_repr(self) -> str:
        extras = [str(self.num_frequencies), f"include_input={self.include_input}"]
        if self.order != "nerf":
            extras.append(f"order={self.order!r}")
        if self.frequency_scale != 1.0:
            extras.append(f"frequency_scale={self.frequency_scale}")
        if self.windowed:
            extras.append(f"alpha={self.alpha:g}")
        return ", ".join(extras)
