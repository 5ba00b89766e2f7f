"""Activations: their names, their torch modules, and s, s', s'' in PyTorch (DESIGN.md section 2).

An `Activation` is a small frozen value: the canonical name plus the one parameter some activations
carry (softplus beta, leaky_relu slope, sine w0). The engines dispatch on it; the modules users pass
(`nn.Softplus(beta=100)`, `tritonjac.Sine(30.0)`, ...) are parsed into it by `as_activation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Activation", "Sine", "as_activation", "ACTIVATION_NAMES"]


class Sine(nn.Module):
    """sin(w0 * z), the SIREN activation (w0 = 30 in the SIREN paper)."""

    def __init__(self, w0: float = 30.0):
        super().__init__()
        self.w0 = float(w0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w0 * z)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"


# name -> default parameter (None: the activation has no parameter)
_DEFAULT_PARAM = {
    "identity": None,
    "relu": None,
    "leaky_relu": 0.01,  # nn.LeakyReLU's default negative_slope
    "softplus": 1.0,  # nn.Softplus's default beta
    "tanh": None,
    "sigmoid": None,
    "silu": None,
    "gelu": None,
    "gelu_tanh": None,
    "sine": 30.0,
}
ACTIVATION_NAMES = tuple(_DEFAULT_PARAM)
_PIECEWISE_LINEAR = frozenset({"identity", "relu", "leaky_relu"})  # s'' == 0 almost everywhere

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = math.sqrt(2.0 / math.pi)
_GELU_TANH_A = 0.044715


@dataclass(frozen=True)
class Activation:
    """One activation function with its parameter.

    `param` is softplus's beta, leaky_relu's negative slope or sine's w0 (0.0 for the others);
    `threshold` is softplus's: where beta * z > threshold it is the identity, as in `nn.Softplus`.
    """

    name: str
    param: float = 0.0
    threshold: float = 20.0

    def __post_init__(self):
        if self.name not in _DEFAULT_PARAM:
            raise ValueError(f"unknown activation {self.name!r}; supported: {', '.join(ACTIVATION_NAMES)}")

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    @property
    def has_curvature(self) -> bool:
        """False where s'' is zero everywhere it is defined (identity, relu, leaky_relu)."""
        return self.name not in _PIECEWISE_LINEAR

    # ---- PyTorch formulas -------------------------------------------------------------------
    def value(self, z: torch.Tensor) -> torch.Tensor:
        """s(z)."""
        return _VALUE[self.name](self, z)

    def evaluate(self, z: torch.Tensor, *, value: bool = True, curvature: bool = False):
        """(s, s', s'') at z, with None in place of s (value=False) or s'' (curvature=False).

        s'' is also None for piecewise-linear activations, whose s'' is zero.
        """
        s = self.value(z) if value else None
        slope, second = _DERIVATIVES[self.name](self, z, curvature and self.has_curvature)
        return s, slope, second

    def to_module(self) -> nn.Module:
        """The torch module computing this activation (used to build and to export nn.Sequential)."""
        name, p = self.name, self.param
        if name == "softplus":
            return nn.Softplus(beta=p, threshold=self.threshold)
        if name == "leaky_relu":
            return nn.LeakyReLU(p)
        if name == "sine":
            return Sine(p)
        if name == "gelu_tanh":
            return nn.GELU(approximate="tanh")
        return {
            "identity": nn.Identity,
            "relu": nn.ReLU,
            "tanh": nn.Tanh,
            "sigmoid": nn.Sigmoid,
            "silu": nn.SiLU,
            "gelu": nn.GELU,
        }[name]()

    def __str__(self) -> str:
        if _DEFAULT_PARAM[self.name] is None:
            return self.name
        extra = f", threshold={self.threshold:g}" if self.name == "softplus" else ""
        return f"{self.name}({self.param:g}{extra})"


def as_activation(spec) -> Activation:
    """Parse a name, a torch activation module, `tritonjac.Sine`, an `Activation` or None (identity)."""
    if spec is None:
        return Activation("identity")
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        name = spec.lower()
        if name not in _DEFAULT_PARAM:
            raise ValueError(f"unknown activation {spec!r}; supported: {', '.join(ACTIVATION_NAMES)}")
        default = _DEFAULT_PARAM[name]
        return Activation(name, 0.0 if default is None else default)
    if isinstance(spec, nn.Module):
        parsed = _from_module(spec)
        if parsed is not None:
            return parsed
        raise ValueError(
            f"unsupported activation module {type(spec).__name__}; supported: nn.ReLU, nn.LeakyReLU, "
            "nn.Softplus, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Identity, tritonjac.Sine"
        )
    raise TypeError(f"activation must be a name, an nn.Module or None, not {type(spec).__name__}")


def _from_module(m: nn.Module) -> Activation | None:
    # Exact types only: a subclass may override forward, and we would silently compute something else.
    t = type(m)
    if t is nn.Identity:
        return Activation("identity")
    if t is nn.ReLU:
        return Activation("relu")
    if t is nn.LeakyReLU:
        return Activation("leaky_relu", float(m.negative_slope))
    if t is nn.Softplus:
        return Activation("softplus", float(m.beta), float(m.threshold))
    if t is nn.Tanh:
        return Activation("tanh")
    if t is nn.Sigmoid:
        return Activation("sigmoid")
    if t is nn.SiLU:
        return Activation("silu")
    if t is nn.GELU:
        return Activation("gelu_tanh" if m.approximate == "tanh" else "gelu")
    if t is Sine:
        return Activation("sine", m.w0)
    return None


# ---- s(z) ----------------------------------------------------------------------------------------
_VALUE = {
    "identity": lambda a, z: z,
    "relu": lambda a, z: torch.relu(z),
    "leaky_relu": lambda a, z: F.leaky_relu(z, a.param),
    "softplus": lambda a, z: F.softplus(z, a.param, a.threshold),
    "tanh": lambda a, z: torch.tanh(z),
    "sigmoid": lambda a, z: torch.sigmoid(z),
    "silu": lambda a, z: F.silu(z),
    "gelu": lambda a, z: F.gelu(z),
    "gelu_tanh": lambda a, z: F.gelu(z, approximate="tanh"),
    "sine": lambda a, z: torch.sin(a.param * z),
}


# ---- (s'(z), s''(z) or None) -----------------------------------------------------------------------
# Each returns s'' only when asked (it is needed in the backward pass alone). Formulas are chosen to
# stay accurate in the tails: 1 - sigmoid(u) is written sigmoid(-u), never as a difference.
def _identity(a, z, curvature):
    return torch.ones_like(z), None


def _relu(a, z, curvature):
    return (z > 0).to(z.dtype), None


def _leaky_relu(a, z, curvature):
    # torch's convention at 0 (and ours): the slope of the negative side
    return torch.full_like(z, a.param).masked_fill_(z > 0, 1.0), None


def _softplus(a, z, curvature):
    # torch's own derivative kernel: sigmoid(beta z), exactly 1 past the threshold, in one pass
    # (3x faster on CPU than sigmoid + compare + masked_fill)
    slope = torch.ops.aten.softplus_backward(z.new_ones(()), z, a.param, a.threshold)
    if not curvature:
        return slope, None
    # beta s' (1 - s'), torch's own double-backward formula: exactly 0 where s' is exactly 1
    return slope, torch.addcmul(slope, slope, slope, value=-1.0).mul_(a.param)


def _tanh(a, z, curvature):
    t = torch.tanh(z)
    slope = 1.0 - t * t
    return slope, (-2.0 * t * slope if curvature else None)


def _sigmoid(a, z, curvature):
    q = torch.sigmoid(z)
    slope = q * torch.sigmoid(-z)
    return slope, (slope * (1.0 - 2.0 * q) if curvature else None)


def _silu(a, z, curvature):
    q = torch.sigmoid(z)
    one_minus_q = torch.sigmoid(-z)
    slope = q * (1.0 + z * one_minus_q)
    if not curvature:
        return slope, None
    return slope, q * one_minus_q * (2.0 + z * (one_minus_q - q))


def _gelu(a, z, curvature):
    cdf = 0.5 * (1.0 + torch.erf(z * _SQRT_HALF))
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    slope = cdf + z * pdf
    return slope, (pdf * (2.0 - z * z) if curvature else None)


def _gelu_tanh(a, z, curvature):
    # s = 0.5 z (1 + tanh(u)), u = c (z + A z^3)
    z2 = z * z
    t = torch.tanh(_GELU_TANH_C * z * (1.0 + _GELU_TANH_A * z2))
    sech2 = 1.0 - t * t
    du = _GELU_TANH_C * (1.0 + 3.0 * _GELU_TANH_A * z2)
    slope = 0.5 * (1.0 + t) + 0.5 * z * sech2 * du
    if not curvature:
        return slope, None
    d2u = _GELU_TANH_C * 6.0 * _GELU_TANH_A * z
    return slope, sech2 * (du + 0.5 * z * (d2u - 2.0 * t * du * du))


def _sine(a, z, curvature):
    wz = a.param * z
    slope = a.param * torch.cos(wz)
    return slope, (-(a.param**2) * torch.sin(wz) if curvature else None)


_DERIVATIVES = {
    "identity": _identity,
    "relu": _relu,
    "leaky_relu": _leaky_relu,
    "softplus": _softplus,
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "silu": _silu,
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "sine": _sine,
}
