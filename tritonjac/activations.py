"""The activation registry: one record per activation, everything else derived from it.

A record (`ActivationKind`) says what an activation is called, its parameter and default, which
torch modules it accepts and how to build one, s, s' and s'' in PyTorch, whether it is piecewise
linear (s'' = 0), and the integer that selects it in the Triton kernels (`kernels/activations.py`
reads `KERNEL_IDS`). The names, the supported-module lists in error messages, the kernels' ids and
the op arguments all come from `REGISTRY`.

Adding an activation: one `_register(...)` call below, plus its branch in the three kernel helpers
of `kernels/activations.py` (the tests run every registered activation through both engines).

An `Activation` is the small frozen value the engines dispatch on: a registered name plus the one
parameter some activations carry (softplus beta, leaky_relu slope, sine w0) and softplus's
threshold. `as_activation` parses what users pass (names, modules, None) into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Activation", "ActivationKind", "Sine", "as_activation", "REGISTRY", "ACTIVATION_NAMES", "KERNEL_IDS"]


class Sine(nn.Module):
    """sin(w0 * z), the SIREN activation (w0 = 30 in the SIREN paper)."""

    def __init__(self, w0: float = 30.0):
        super().__init__()
        self.w0 = float(w0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w0 * z)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"


# (s'(z), s''(z) or None) from (activation, z, whether s'' is wanted)
Derivatives = Callable[["Activation", torch.Tensor, bool], "tuple[torch.Tensor, torch.Tensor | None]"]
# (s(z), s'(z), s''(z), s'''(z)) from (activation, z): what the backward of second derivatives needs
ThirdDerivatives = Callable[["Activation", torch.Tensor], "tuple[torch.Tensor, ...]"]


@dataclass(frozen=True)
class ActivationKind:
    """Everything tritonjac knows about one activation function."""

    name: str
    kernel_id: int  # the kernels' constexpr selector (its position in the registry)
    value: Callable[["Activation", torch.Tensor], torch.Tensor]  # s(z)
    derivatives: Derivatives  # (s', s'' if asked); s'' only in the backward pass
    third_derivatives: ThirdDerivatives | None  # (s, s', s'', s'''); None when piecewise linear
    to_module: Callable[["Activation"], nn.Module]
    modules: tuple[type, ...] = ()  # exact torch module types parsed into this kind
    from_module: Callable[[nn.Module], "Activation"] | None = None
    default_param: float | None = None  # None: the activation has no parameter
    piecewise_linear: bool = False  # s'' is zero wherever it is defined
    # (s, s', s'' if asked) in one go, sharing work (sin and cos of one product), or None
    joint: Callable[["Activation", torch.Tensor, bool], tuple] | None = None
    # writes s(z), s'(z) and, given a third tensor, s''(z) into given tensors without allocating,
    # or None (`Activation.into`)
    into: Callable[..., None] | None = None


REGISTRY: dict[str, ActivationKind] = {}


def _register(
    name,
    value,
    derivatives,
    to_module,
    *,
    third=None,
    modules=(),
    from_module=None,
    default_param=None,
    piecewise_linear=False,
    joint=None,
    into=None,
) -> None:
    if (third is None) != piecewise_linear:
        raise ValueError(f"activation {name!r}: give s''' (third=) exactly when it is not piecewise linear")
    REGISTRY[name] = ActivationKind(
        name,
        len(REGISTRY),
        value,
        derivatives,
        third,
        to_module,
        tuple(modules),
        from_module,
        default_param,
        piecewise_linear,
        joint,
        into,
    )


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
        if self.name not in REGISTRY:
            raise ValueError(f"unknown activation {self.name!r}; supported: {', '.join(REGISTRY)}")

    @property
    def kind(self) -> ActivationKind:
        return REGISTRY[self.name]

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    @property
    def has_curvature(self) -> bool:
        """False where s'' is zero everywhere it is defined (identity, relu, leaky_relu)."""
        return not self.kind.piecewise_linear

    def value(self, z: torch.Tensor) -> torch.Tensor:
        """s(z)."""
        return self.kind.value(self, z)

    def evaluate(self, z: torch.Tensor, *, value: bool = True, curvature: bool = False):
        """(s, s', s'') at z, with None in place of s (value=False) or s'' (curvature=False).

        s'' is also None for piecewise-linear activations, whose s'' is zero.
        """
        curvature = curvature and self.has_curvature
        if value and self.kind.joint is not None:
            return self.kind.joint(self, z, curvature)
        s = self.value(z) if value else None
        slope, second = self.kind.derivatives(self, z, curvature)
        return s, slope, second

    def into(self, z: torch.Tensor, value: torch.Tensor, slope=None, second=None) -> bool:
        """Write s(z) into `value` and, if given, s'(z) into `slope` and s''(z) into `second` (each
        of z's shape, none overlapping z or another; `second` is left alone where s'' is zero).

        Returns False, writing nothing, for activations whose record has no allocation-free form.
        The CPU engine's forward uses it for its per-chunk buffers: fresh tensors per chunk cost more
        than the arithmetic there (glibc maps and unmaps them; docs/design.md, section 10)."""
        if self.kind.into is None:
            return False
        self.kind.into(self, z, value, slope, second if self.has_curvature else None)
        return True

    def evaluate_third(self, z: torch.Tensor):
        """(s, s', s'', s''') at z, with None for the last two where they are zero (piecewise linear)."""
        third = self.kind.third_derivatives
        if third is None:
            return self.value(z), self.kind.derivatives(self, z, False)[0], None, None
        return third(self, z)

    def to_module(self) -> nn.Module:
        """The torch module computing this activation (used to build and to export nn.Sequential)."""
        return self.kind.to_module(self)

    def __str__(self) -> str:
        if self.kind.default_param is None:
            return self.name
        extra = f", threshold={self.threshold:g}" if self.name == "softplus" else ""
        return f"{self.name}({self.param:g}{extra})"


def supported_modules() -> str:
    """The torch module types `as_activation` accepts, for error messages."""
    names = [t.__name__ if t is not Sine else "tritonjac.Sine" for kind in REGISTRY.values() for t in kind.modules]
    return ", ".join(n if n.startswith("tritonjac") else f"nn.{n}" for n in names)


def as_activation(spec) -> Activation:
    """Parse a name, a torch activation module, `tritonjac.Sine`, an `Activation` or None (identity)."""
    if spec is None:
        return Activation("identity")
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        kind = REGISTRY.get(spec.lower())
        if kind is None:
            raise ValueError(f"unknown activation {spec!r}; supported: {', '.join(REGISTRY)}")
        return Activation(kind.name, 0.0 if kind.default_param is None else kind.default_param)
    if isinstance(spec, nn.Module):
        # exact types only: a subclass may override forward, and we would silently compute something else
        for kind in REGISTRY.values():
            if type(spec) in kind.modules:
                return kind.from_module(spec) if kind.from_module else Activation(kind.name)
        raise ValueError(f"unsupported activation module {type(spec).__name__}; supported: {supported_modules()}")
    raise TypeError(f"activation must be a name, an nn.Module or None, not {type(spec).__name__}")


# ---- the activations -------------------------------------------------------------------------------
# Derivative formulas return s'' only when asked, and stay accurate in the tails: 1 - sigmoid(u) is
# written sigmoid(-u), never as a difference.
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = math.sqrt(2.0 / math.pi)
_GELU_TANH_A = 0.044715


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


def _softplus_into(a, z, value, slope, second):
    torch.ops.aten.softplus.out(z, a.param, a.threshold, out=value)
    if slope is None:
        return
    torch.ops.aten.softplus_backward.grad_input(_ONE[z.dtype, z.device], z, a.param, a.threshold, grad_input=slope)
    if second is not None:  # as in _softplus
        torch.addcmul(slope, slope, slope, value=-1.0, out=second).mul_(a.param)


class _Ones(dict):
    """A scalar one per (dtype, device), made once: softplus_backward's grad_output. Never an
    inference tensor, even when first asked for under `torch.inference_mode()`."""

    def __missing__(self, key):
        with torch.inference_mode(False):
            one = self[key] = torch.ones((), dtype=key[0], device=key[1])
        return one


_ONE = _Ones()


def _relu_into(a, z, value, slope, second):
    torch.clamp_min(z, 0.0, out=value)
    if slope is not None:
        torch.gt(z, 0.0, out=slope)


def _tanh_into(a, z, value, slope, second):
    torch.tanh(z, out=value)
    if slope is None:
        return
    torch.mul(value, value, out=slope).neg_().add_(1.0)
    if second is not None:  # -2 t s', as in _tanh
        torch.mul(value, slope, out=second).mul_(-2.0)


def _sine_into(a, z, value, slope, second):
    if slope is None:
        torch.mul(z, a.param, out=value).sin_()
        return
    wz = torch.mul(z, a.param, out=slope)
    torch.sin(wz, out=value)
    wz.cos_().mul_(a.param)
    if second is not None:
        torch.mul(value, -(a.param**2), out=second)


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


def _tanh_joint(a, z, curvature):
    t = torch.tanh(z)
    slope = 1.0 - t * t
    return t, slope, (-2.0 * t * slope if curvature else None)


def _sine_joint(a, z, curvature):
    wz = z * a.param
    s = torch.sin(wz)
    slope = torch.cos(wz, out=wz).mul_(a.param)
    return s, slope, (s * -(a.param**2) if curvature else None)


def _sine(a, z, curvature):
    wz = a.param * z
    slope = a.param * torch.cos(wz)
    return slope, (-(a.param**2) * torch.sin(wz) if curvature else None)


# ---- (s, s', s'', s''') for the backward of second derivatives ------------------------------------------
def _softplus_third(a, z):
    slope, second = _softplus(a, z, True)  # s'' = beta s' (1 - s'), so s''' = beta s'' (1 - 2 s')
    return F.softplus(z, a.param, a.threshold), slope, second, second * (1.0 - 2.0 * slope) * a.param


def _tanh_third(a, z):
    t = torch.tanh(z)
    slope = 1.0 - t * t
    second = -2.0 * t * slope
    return t, slope, second, -2.0 * (slope * slope + t * second)


def _sigmoid_third(a, z):
    q = torch.sigmoid(z)
    slope = q * torch.sigmoid(-z)
    second = slope * (1.0 - 2.0 * q)
    return q, slope, second, second * (1.0 - 2.0 * q) - 2.0 * slope * slope


def _silu_third(a, z):
    # s = z q with q = sigmoid(z); p = q' = q (1 - q), p' = p (1 - 2q), p'' = p' (1 - 2q) - 2 p^2
    q, one_minus_q = torch.sigmoid(z), torch.sigmoid(-z)
    p = q * one_minus_q
    dp = p * (one_minus_q - q)
    d2p = dp * (one_minus_q - q) - 2.0 * p * p
    return z * q, q + z * p, 2.0 * p + z * dp, 3.0 * dp + z * d2p


def _gelu_third(a, z):
    slope, second = _gelu(a, z, True)
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return F.gelu(z), slope, second, pdf * z * (z * z - 4.0)


def _gelu_tanh_third(a, z):
    # s = z g / 2 with g = 1 + tanh(u), u = c (z + A z^3):
    # s' = g/2 + z g'/2, s'' = g' + z g''/2, s''' = 3 g''/2 + z g'''/2
    z2 = z * z
    t = torch.tanh(_GELU_TANH_C * z * (1.0 + _GELU_TANH_A * z2))
    sech2 = 1.0 - t * t
    du = _GELU_TANH_C * (1.0 + 3.0 * _GELU_TANH_A * z2)
    d2u = _GELU_TANH_C * 6.0 * _GELU_TANH_A * z
    d3u = _GELU_TANH_C * 6.0 * _GELU_TANH_A
    dg = sech2 * du  # g' = tanh(u)'
    d2g = sech2 * (d2u - 2.0 * t * du * du)
    # g''' = sech2' (u'' - 2 t u'^2) + sech2 (u''' - 2 t' u'^2 - 4 t u' u''), sech2' = -2 t g', t' = g'
    d3g = -2.0 * t * dg * (d2u - 2.0 * t * du * du) + sech2 * (d3u - 2.0 * dg * du * du - 4.0 * t * du * d2u)
    slope, second, third = 0.5 * (1.0 + t) + 0.5 * z * dg, dg + 0.5 * z * d2g, 1.5 * d2g + 0.5 * z * d3g
    return 0.5 * z * (1.0 + t), slope, second, third


def _sine_third(a, z):
    w = a.param
    wz = z * w
    s, c = torch.sin(wz), torch.cos(wz)
    return s, c * w, s * -(w**2), c * -(w**3)


# The order fixes the kernels' ids: append new activations at the end.
_register("identity", lambda a, z: z, _identity, lambda a: nn.Identity(), modules=[nn.Identity], piecewise_linear=True)
_register(
    "relu",
    lambda a, z: torch.relu(z),
    _relu,
    lambda a: nn.ReLU(),
    modules=[nn.ReLU],
    piecewise_linear=True,
    into=_relu_into,
)
_register(
    "leaky_relu",
    lambda a, z: F.leaky_relu(z, a.param),
    _leaky_relu,
    lambda a: nn.LeakyReLU(a.param),
    modules=[nn.LeakyReLU],
    from_module=lambda m: Activation("leaky_relu", float(m.negative_slope)),
    default_param=0.01,
    piecewise_linear=True,  # nn.LeakyReLU's default negative_slope
)
_register(
    "softplus",
    lambda a, z: F.softplus(z, a.param, a.threshold),
    _softplus,
    lambda a: nn.Softplus(beta=a.param, threshold=a.threshold),
    third=_softplus_third,
    into=_softplus_into,
    modules=[nn.Softplus],
    from_module=lambda m: Activation("softplus", float(m.beta), float(m.threshold)),
    default_param=1.0,  # nn.Softplus's default beta
)
_register(
    "tanh",
    lambda a, z: torch.tanh(z),
    _tanh,
    lambda a: nn.Tanh(),
    third=_tanh_third,
    modules=[nn.Tanh],
    joint=_tanh_joint,
    into=_tanh_into,
)
_register(
    "sigmoid",
    lambda a, z: torch.sigmoid(z),
    _sigmoid,
    lambda a: nn.Sigmoid(),
    third=_sigmoid_third,
    modules=[nn.Sigmoid],
)
_register("silu", lambda a, z: F.silu(z), _silu, lambda a: nn.SiLU(), third=_silu_third, modules=[nn.SiLU])
_register(
    "gelu",
    lambda a, z: F.gelu(z),
    _gelu,
    lambda a: nn.GELU(),
    third=_gelu_third,
    modules=[nn.GELU],
    from_module=lambda m: Activation("gelu_tanh" if m.approximate == "tanh" else "gelu"),
)
_register(
    "gelu_tanh",
    lambda a, z: F.gelu(z, approximate="tanh"),
    _gelu_tanh,
    lambda a: nn.GELU(approximate="tanh"),
    third=_gelu_tanh_third,
)
_register(
    "sine",
    lambda a, z: torch.sin(a.param * z),
    _sine,
    lambda a: Sine(a.param),
    third=_sine_third,
    joint=_sine_joint,
    into=_sine_into,
    modules=[Sine],
    from_module=lambda m: Activation("sine", m.w0),
    default_param=30.0,
)

ACTIVATION_NAMES = tuple(REGISTRY)
KERNEL_IDS = {name: kind.kernel_id for name, kind in REGISTRY.items()}
