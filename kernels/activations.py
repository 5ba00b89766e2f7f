"""s, s', s'' (and s''' for the Laplacian's backward) of every activation as @triton.jit
helpers, selected by a constexpr id.

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


# sin and cos by a three-part Cody-Waite reduction to [-pi/4, pi/4] and Cephes' single-precision
# polynomials: accurate to a few ulp for |t| < 2^16 (the encodings' arguments reach 2^9 * pi),
# and unlike tl.sin / tl.cos (libdevice) without the slow path for huge arguments, whose 32-byte
# local array counted as spills in every kernel using it (the encodings' and the sine activation's).
_TWO_OVER_PI = tl.constexpr(0.6366197723675814)
_PIO2_1 = tl.constexpr(1.5703125)  # 8 significant bits: q * _PIO2_1 is exact for |q| < 2^16
_PIO2_2 = tl.constexpr(4.837512969970703125e-4)
_PIO2_3 = tl.constexpr(7.54978995489188216e-8)


@triton.jit
def sin_cos(t):
    """(sin t, cos t) for fp32 t."""
    q = tl.floor(t * _TWO_OVER_PI + 0.5)
    r = t - q * _PIO2_1
    r = r - q * _PIO2_2
    r = r - q * _PIO2_3
    r2 = r * r
    sin_r = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
    quadrant = q.to(tl.int32) & 3
    sin_t = tl.where(quadrant == 0, sin_r, tl.where(quadrant == 1, cos_r, tl.where(quadrant == 2, -sin_r, -cos_r)))
    cos_t = tl.where(quadrant == 0, cos_r, tl.where(quadrant == 1, -sin_r, tl.where(quadrant == 2, -cos_r, sin_r)))
    return sin_t, cos_t


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
        s, _ = sin_cos(z * PARAM)
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
        s, c = sin_cos(z * PARAM)
        ds = PARAM * c
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
        s, c = sin_cos(z * PARAM)
        ds = PARAM * c
        d2s = -(PARAM * PARAM) * s
    return ds, d2s


@triton.jit
def activation_derivatives_to_third(z, ACT: tl.constexpr, PARAM: tl.constexpr, THRESHOLD: tl.constexpr):
    """(s'(z), s''(z), s'''(z)) for the second-order backward (s'' and s''' are 0 for piecewise-linear
    activations): `activation_slope_and_curvature`, then s''' from the same intermediates (the
    compiler shares the repeated transcendental work)."""
    ds, d2s = activation_slope_and_curvature(z, ACT, PARAM, THRESHOLD)
    if ACT == IDENTITY or ACT == RELU or ACT == LEAKY_RELU:
        d3s = tl.zeros(z.shape, z.dtype)
    elif ACT == SOFTPLUS:  # s'' = beta q (1 - q) with q = sigmoid(beta z): s''' = beta s'' (1 - 2q)
        q, q_neg = _sigmoid_pair(z * PARAM)
        d3s = d2s * (q_neg - q) * PARAM
    elif ACT == TANH:
        d3s = -2.0 * (ds * ds + _tanh(z) * d2s)
    elif ACT == SIGMOID:
        q, q_neg = _sigmoid_pair(z)
        d3s = d2s * (q_neg - q) - 2.0 * ds * ds
    elif ACT == SILU:  # s = z q: s''' = 3 p' + z p'' with p = q (1 - q)
        q, q_neg = _sigmoid_pair(z)
        p = q * q_neg
        dp = p * (q_neg - q)
        d3s = 3.0 * dp + z * (dp * (q_neg - q) - 2.0 * p * p)
    elif ACT == GELU:
        d3s = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI * z * (z * z - 4.0)
    elif ACT == GELU_TANH:  # s = z g / 2, g = 1 + tanh(u), u = c (z + a z^3): s''' = 3 g'' / 2 + z g''' / 2
        z2 = z * z
        t = _tanh(z * (1.0 + z2 * _GELU_TANH_A) * _GELU_TANH_C)
        sech2 = 1.0 - t * t
        du = (1.0 + z2 * (3.0 * _GELU_TANH_A)) * _GELU_TANH_C
        d2u = z * (6.0 * _GELU_TANH_A * _GELU_TANH_C)
        d3u = (6.0 * _GELU_TANH_A) * _GELU_TANH_C
        dg = sech2 * du
        inner = d2u - 2.0 * t * du * du
        d3g = -2.0 * t * dg * inner + sech2 * ((-2.0 * dg * du - 4.0 * t * d2u) * du + d3u)
        d3s = 1.5 * sech2 * inner + 0.5 * z * d3g
    else:
        tl.static_assert(ACT == SINE, "unknown activation id")
        _, c = sin_cos(z * PARAM)
        d3s = -(PARAM * PARAM * PARAM) * c
    return ds, d2s, d3s
