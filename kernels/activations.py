"""s, s' and s'' of every activation as @triton.jit helpers, selected by a constexpr id.

The ids come from the activation registry (`tritonjac/activations.py`, `KERNEL_IDS`). Each helper takes the
activation's parameter (softplus beta, leaky_relu slope, sine w0) and softplus's threshold as
constexprs, so an unused branch compiles away and the parameter folds into the arithmetic.

Special-function work is the second roof of these kernels after the tensor cores: every formula
below uses one exp (or one sin/cos pair) for s and s' together.
"""

import triton
import triton.language as tl

from ..activations import KERNEL_IDS

IDENTITY = tl.constexpr(KERNEL_IDS["identity"])
RELU = tl.constexpr(KERNEL_IDS["relu"])
LEAKY_RELU = tl.constexpr(KERNEL_IDS["leaky_relu"])
SOFTPLUS = tl.constexpr(KERNEL_IDS["softplus"])
TANH = tl.constexpr(KERNEL_IDS["tanh"])
SIGMOID = tl.constexpr(KERNEL_IDS["sigmoid"])
SILU = tl.constexpr(KERNEL_IDS["silu"])
GELU = tl.constexpr(KERNEL_IDS["gelu"])
GELU_TANH = tl.constexpr(KERNEL_IDS["gelu_tanh"])
SINE = tl.constexpr(KERNEL_IDS["sine"])

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_GELU_TANH_C = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_GELU_TANH_A = tl.constexpr(0.044715)
# Products with these constants put the tensor first: the interpreter turns constexpr * tensor into
# a constexpr that later calls cannot take.


@triton.jit
def _sigmoid_pair(u):
    """(sigmoid(u), sigmoid(-u)) from one exp, without cancellation in either tail."""
    e = tl.exp(-tl.abs(u))
    r = 1.0 / (1.0 + e)
    pos = u >= 0
    return tl.where(pos, r, e * r), tl.where(pos, e * r, r)


@triton.jit
def _tanh(u):
    """tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|)."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def activation_value(z, ACT: tl.constexpr, PARAM: tl.constexpr, THRESHOLD: tl.constexpr):
    """s(z), for the forward pass without tangents."""
    if ACT == IDENTITY:
        s = z
    elif ACT == RELU:
        s = tl.maximum(z, 0.0)
    elif ACT == LEAKY_RELU:
        s = tl.where(z > 0, z, z * PARAM)
    elif ACT == SOFTPLUS:
        u = z * PARAM
        s = tl.where(u > THRESHOLD, z, (tl.maximum(u, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(u)))) / PARAM)
    elif ACT == TANH:
        s = _tanh(z)
    elif ACT == SIGMOID:
        s, _ = _sigmoid_pair(z)
    elif ACT == SILU:
        q, _ = _sigmoid_pair(z)
        s = z * q
    elif ACT == GELU:
        s = 0.5 * z * (1.0 + tl.erf(z * _SQRT_HALF))
    elif ACT == GELU_TANH:
        s = 0.5 * z * (1.0 + _tanh(z * (1.0 + z * z * _GELU_TANH_A) * _GELU_TANH_C))
    else:
        tl.static_assert(ACT == SINE, "unknown activation id")
        s = tl.sin(z * PARAM)
    return s


@triton.jit
def activation_and_slope(z, ACT: tl.constexpr, PARAM: tl.constexpr, THRESHOLD: tl.constexpr):
    """(s(z), s'(z)), sharing their transcendental work."""
    if ACT == IDENTITY:
        s = z
        ds = tl.full(z.shape, 1.0, z.dtype)
    elif ACT == RELU:
        s = tl.maximum(z, 0.0)
        ds = tl.where(z > 0, 1.0, 0.0)
    elif ACT == LEAKY_RELU:
        # torch's convention at 0: the slope of the negative side
        s = tl.where(z > 0, z, z * PARAM)
        ds = tl.where(z > 0, 1.0, PARAM)
    elif ACT == SOFTPLUS:
        # log1p(exp(u)) / beta = (max(u, 0) + log(1 + e)) / beta with e = exp(-|u|);
        # s' = sigmoid(u); past beta z > threshold nn.Softplus is the identity (s' exactly 1)
        u = z * PARAM
        e = tl.exp(-tl.abs(u))
        r = 1.0 / (1.0 + e)
        linear = u > THRESHOLD
        s = tl.where(linear, z, (tl.maximum(u, 0.0) + tl.log(1.0 + e)) / PARAM)
        ds = tl.where(linear, 1.0, tl.where(u >= 0, r, e * r))
    elif ACT == TANH:
        s = _tanh(z)
        ds = 1.0 - s * s
    elif ACT == SIGMOID:
        s, q_neg = _sigmoid_pair(z)
        ds = s * q_neg
    elif ACT == SILU:
        q, q_neg = _sigmoid_pair(z)
        s = z * q
        ds = q * (1.0 + z * q_neg)
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * _SQRT_HALF))
        s = z * cdf
        ds = cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == GELU_TANH:
        z2 = z * z
        t = _tanh(z * (1.0 + z2 * _GELU_TANH_A) * _GELU_TANH_C)
        s = 0.5 * z * (1.0 + t)
        ds = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * ((1.0 + z2 * (3.0 * _GELU_TANH_A)) * _GELU_TANH_C)
    else:
        tl.static_assert(ACT == SINE, "unknown activation id")
        wz = z * PARAM
        s = tl.sin(wz)
        ds = PARAM * tl.cos(wz)
    return s, ds


@triton.jit
def activation_slope_and_curvature(z, ACT: tl.constexpr, PARAM: tl.constexpr, THRESHOLD: tl.constexpr):
    """(s'(z), s''(z)) for the backward pass (s'' is 0 for piecewise-linear activations)."""
    if ACT == IDENTITY:
        ds = tl.full(z.shape, 1.0, z.dtype)
        d2s = tl.zeros(z.shape, z.dtype)
    elif ACT == RELU:
        ds = tl.where(z > 0, 1.0, 0.0)
        d2s = tl.zeros(z.shape, z.dtype)
    elif ACT == LEAKY_RELU:
        ds = tl.where(z > 0, 1.0, PARAM)
        d2s = tl.zeros(z.shape, z.dtype)
    elif ACT == SOFTPLUS:
        u = z * PARAM
        q, q_neg = _sigmoid_pair(u)
        linear = u > THRESHOLD
        ds = tl.where(linear, 1.0, q)
        d2s = tl.where(linear, 0.0, PARAM * q * q_neg)
    elif ACT == TANH:
        t = _tanh(z)
        ds = 1.0 - t * t
        d2s = -2.0 * t * ds
    elif ACT == SIGMOID:
        q, q_neg = _sigmoid_pair(z)
        ds = q * q_neg
        d2s = ds * (1.0 - 2.0 * q)
    elif ACT == SILU:
        q, q_neg = _sigmoid_pair(z)
        ds = q * (1.0 + z * q_neg)
        d2s = q * q_neg * (2.0 + z * (q_neg - q))
    elif ACT == GELU:
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        ds = 0.5 * (1.0 + tl.erf(z * _SQRT_HALF)) + z * pdf
        d2s = pdf * (2.0 - z * z)
    elif ACT == GELU_TANH:
        z2 = z * z
        t = _tanh(z * (1.0 + z2 * _GELU_TANH_A) * _GELU_TANH_C)
        sech2 = 1.0 - t * t
        du = (1.0 + z2 * (3.0 * _GELU_TANH_A)) * _GELU_TANH_C
        ds = 0.5 * (1.0 + t) + 0.5 * z * sech2 * du
        d2s = sech2 * (du + 0.5 * z * (z * (6.0 * _GELU_TANH_A * _GELU_TANH_C) - 2.0 * t * du * du))
    else:
        tl.static_assert(ACT == SINE, "unknown activation id")
        wz = z * PARAM
        ds = PARAM * tl.cos(wz)
        d2s = -(PARAM * PARAM) * tl.sin(wz)
    return ds, d2s
