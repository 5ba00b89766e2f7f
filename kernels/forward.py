"""Fused forward kernels: outputs and Jacobians of a point-wise MLP (docs/design.md, section 2).

Both kernels keep a layer's input as one stacked tile (the contract in kernels/__init__.py): slot 0
the values h, slots 1..NUM_TANGENTS the tangents T, padding slots zero. Reshaped to
(BLOCK_M * SLOTS, width) it is the left operand of one `tl.dot` per layer (4 x BLOCK_M rows for
three tangents, no padding), which gives Z = [z; U] at once; then

    h = s(z),  T = s'(z) * U            (slot 0 of Z is z; the activation is evaluated once per point)

- `mlp_forward_kernel` runs the whole network for a block of points: nothing but x, y and J touches
  global memory. The first layer (in_features <= 16) is a loop of outer-product FMAs and its tangent
  is W_1's first NUM_TANGENTS columns (no matmul); the last layer (out_features <= 16) is one
  reduction over the width per output, so tiny dimensions never become 16-wide matmuls.
- `layer_forward_kernel` runs one layer, for layers too wide or too unequal for the first kernel:
  it reads [h; T] and writes the next [h; T].

With JACOBIAN=False, SLOTS is 1 and the same code is a plain fused MLP forward.
"""

import os

import triton
import triton.language as tl

from .activations import IDENTITY, activation_and_slope, activation_slope_and_curvature, activation_value, sin_cos


# INTERPRET_BF16 is for Triton's CPU interpreter only (the tests' bf16 runs), which gets bf16 wrong
# twice (triton 3.6 and 3.9): its bf16 dot returns garbage and its fp32 -> bf16 conversion truncates
# instead of rounding to nearest even. With the flag, bf16 values are rounded here as a GPU's
# cvt.rn.bf16.f32 does and kept in fp32, and the dot runs on them in fp32: exactly the products
# and fp32 accumulation of the GPU's bf16 dot.
@triton.jit
def round_to_bf16(x):
    """x rounded to the nearest bfloat16 (ties to even), as fp32."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_operand(a, operand_ty: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    if INTERPRET_BF16:
        return round_to_bf16(a)
    return a.to(operand_ty)


@triton.jit
def to_storage(v, storage_ty: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    if INTERPRET_BF16:
        return round_to_bf16(v).to(storage_ty)
    return v.to(storage_ty)


# Triton's TF32 dot hands fp32 operands to the tensor cores as they are, and the tensor cores drop
# the low 13 mantissa bits: truncation, a bias towards zero that adds up over long sums. On an H200
# (first GPU run, perf/results/nvidia-h200-2026-11-27-quick) our TF32 errors were 2-12x torch's own
# (cuBLAS rounds), worst in weight gradients, which sum over every point. Rounding each operand to
# nearest first (cvt.rna, one instruction) makes the truncation exact. The interpreter computes TF32
# dots in exact fp32 and skips the rounding, unless a test sets ROUND_TF32_OPERANDS to emulate the
# GPU's TF32 (tests/test_tf32_emulation.py): then the same rounding is done with integer arithmetic.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ROUND_TF32_OPERANDS = tl.constexpr(not _INTERPRETING)
_ROUND_BY_PTX = tl.constexpr(not _INTERPRETING)


@triton.jit
def round_to_tf32(x):
    """fp32 x rounded to the nearest TF32 value (10 mantissa bits, ties away from zero), as fp32."""
    if _ROUND_BY_PTX:
        return tl.inline_asm_elementwise(
            "cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    # add half a TF32 ulp to the magnitude bits and drop the 13 low ones; NaN stays NaN
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def dot_f32(a, w, acc, PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """a @ w (+ acc) with fp32 accumulation (operands already in the operand dtype)."""
    if INTERPRET_BF16:
        return tl.dot(a, w.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
    if PRECISION == "tf32":
        if ROUND_TF32_OPERANDS:
            if a.dtype == tl.float32:
                a = round_to_tf32(a)
            if w.dtype == tl.float32:
                w = round_to_tf32(w)
    return tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def activate_stacked(Z, o_slot, SLOTS: tl.constexpr, ACT: tl.constexpr, PARAM: tl.constexpr, THRESHOLD: tl.constexpr):
    """[s(z); s'(z) U] from Z = [z; U], stacked on axis 1 of a 3-D tile."""
    if ACT == IDENTITY:
        return Z
    if SLOTS == 1:
        return activation_value(Z, ACT, PARAM, THRESHOLD)
    is_value = o_slot[None, :, None] == 0
    z = tl.sum(tl.where(is_value, Z, 0.0), axis=1)
    s, ds = activation_and_slope(z, ACT, PARAM, THRESHOLD)
    return tl.where(is_value, s[:, None, :], ds[:, None, :] * Z)


@triton.jit
def activate_laplacian(Z, o_slot, NUM_TANGENTS: tl.constexpr, ACT: tl.constexpr, PARAM: tl.constexpr,
                       THRESHOLD: tl.constexpr):  # fmt: skip
    """[s(z); s'(z) U; s'(z) L + s''(z) sum_j U_j^2] from Z = [z; U; L] stacked on axis 1 (the
    forward Laplacian: slot 1 + NUM_TANGENTS carries the Laplacian row; later slots are padding)."""
    if ACT == IDENTITY:
        return Z
    is_value = o_slot[None, :, None] == 0
    z = tl.sum(tl.where(is_value, Z, 0.0), axis=1)
    s, ds = activation_and_slope(z, ACT, PARAM, THRESHOLD)
    _, d2s = activation_slope_and_curvature(z, ACT, PARAM, THRESHOLD)
    is_tangent = (o_slot[None, :, None] >= 1) & (o_slot[None, :, None] <= NUM_TANGENTS)
    squares = tl.sum(tl.where(is_tangent, Z * Z, 0.0), axis=1)
    out = tl.where(is_value, s[:, None, :], ds[:, None, :] * Z)
    return tl.where(o_slot[None, :, None] == 1 + NUM_TANGENTS, out + (d2s * squares)[:, None, :], out)


@triton.jit
def hessian_slot(a, b, NUM_TANGENTS: tl.constexpr):
    """The slot of the Hessian row (a, b), a <= b: after the value and the tangents, the upper
    triangle row by row ((0, 0), (0, 1), .., (1, 1), ..), as `SecondOrder.pairs` orders it."""
    return 1 + NUM_TANGENTS + a * NUM_TANGENTS - (a * (a - 1)) // 2 + (b - a)


@triton.jit
def slot_row(Z, o_slot, slot):
    """Row `slot` of a stacked tile (BLOCK_M, SLOTS, width), as (BLOCK_M, width)."""
    return tl.sum(tl.where(o_slot[None, :, None] == slot, Z, 0.0), axis=1)


@triton.jit
def activate_hessian(Z, o_slot, NUM_TANGENTS: tl.constexpr, ACT: tl.constexpr, PARAM: tl.constexpr,
                     THRESHOLD: tl.constexpr):  # fmt: skip
    """[s(z); s'(z) U; s'(z) V_ab + s''(z) U_a U_b] from Z = [z; U; V] stacked on axis 1: the
    Hessian's rows (a, b), a <= b, in the slots `hessian_slot` gives; later slots are padding."""
    if ACT == IDENTITY:
        return Z
    z = slot_row(Z, o_slot, 0)
    s, ds = activation_and_slope(z, ACT, PARAM, THRESHOLD)
    _, d2s = activation_slope_and_curvature(z, ACT, PARAM, THRESHOLD)
    out = tl.where(o_slot[None, :, None] == 0, s[:, None, :], ds[:, None, :] * Z)
    for a in tl.static_range(NUM_TANGENTS):
        curved_a = d2s * slot_row(Z, o_slot, 1 + a)
        for b in tl.static_range(a, NUM_TANGENTS):
            quadratic = curved_a * slot_row(Z, o_slot, 1 + b)
            slot = hessian_slot(a, b, NUM_TANGENTS)
            out = tl.where(o_slot[None, :, None] == slot, out + quadratic[:, None, :], out)
    return out


@triton.jit
def first_layer(
    x_ptr,
    w_ptr,
    bias_ptr,
    o_p,
    m_p,
    stride_xp,
    stride_xf,
    IN: tl.constexpr,
    NUM_TANGENTS: tl.constexpr,
    WIDTH: tl.constexpr,
    WIDTH_PAD: tl.constexpr,
    SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    JACOBIAN: tl.constexpr,
):
    """Z_1 = [x W^T + b; U_1] for the points o_p, (BLOCK_M, SLOTS, WIDTH_PAD).

    z is IN outer products (no matmul for 1..16 inputs); U_1 is W's first NUM_TANGENTS columns, the same for
    every point (slot s holds column s - 1).
    """
    o_w = tl.arange(0, WIDTH_PAD)
    m_w = o_w < WIDTH
    z = tl.zeros((BLOCK_M, WIDTH_PAD), tl.float32)
    for i in tl.static_range(IN):
        b_x = tl.load(x_ptr + o_p * stride_xp + i * stride_xf, mask=m_p, other=0.0).to(tl.float32)
        b_col = tl.load(w_ptr + o_w * IN + i, mask=m_w, other=0.0).to(tl.float32)
        z += b_x[:, None] * b_col[None, :]
    if HAS_BIAS:
        z += tl.load(bias_ptr + o_w, mask=m_w, other=0.0).to(tl.float32)[None, :]
    if not JACOBIAN:
        return z[:, None, :]
    o_s = tl.arange(0, SLOTS)
    m_u = (o_s[:, None] >= 1) & (o_s[:, None] <= NUM_TANGENTS) & m_w[None, :]
    b_u = tl.load(w_ptr + o_w[None, :] * IN + (o_s[:, None] - 1), mask=m_u, other=0.0).to(tl.float32)
    return tl.where(o_s[None, :, None] == 0, z[:, None, :], b_u[None, :, :])


@triton.jit
def hidden_layer(
    A,
    w_ptr,
    bias_ptr,
    l,
    WIDTH: tl.constexpr,
    WIDTH_PAD: tl.constexpr,
    SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    acc=None,
):
    """Z = [h W_l^T + b_l; T W_l^T] (+ acc, (BLOCK_M * SLOTS, WIDTH_PAD) fp32, if given: the dot's
    initial accumulator) from A = [h; T]: one dot over the BLOCK_M * SLOTS stacked rows.

    w_ptr / bias_ptr hold the hidden layers contiguously, (num_hidden, WIDTH, WIDTH) / (num_hidden, WIDTH).
    """
    o_w = tl.arange(0, WIDTH_PAD)
    m_w = o_w < WIDTH
    operand_ty = w_ptr.dtype.element_ty
    # b_wt[k, n] = W_l[n, k]
    p_w = w_ptr + l * WIDTH * WIDTH + o_w[None, :] * WIDTH + o_w[:, None]
    b_wt = tl.load(p_w, mask=m_w[:, None] & m_w[None, :], other=0.0)
    b_a = to_operand(tl.reshape(A, (BLOCK_M * SLOTS, WIDTH_PAD)), operand_ty, INTERPRET_BF16)
    Z = tl.reshape(dot_f32(b_a, b_wt.to(operand_ty), acc, PRECISION, INTERPRET_BF16), (BLOCK_M, SLOTS, WIDTH_PAD))
    if HAS_BIAS:
        bias_row = tl.load(bias_ptr + l * WIDTH + o_w, mask=m_w, other=0.0).to(tl.float32)
        Z += tl.where(tl.arange(0, SLOTS)[None, :, None] == 0, bias_row[None, None, :], 0.0)
    return Z


@triton.jit
def last_layer_output(
    A, w_ptr, bias_ptr, o, WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """[z; U] of output o, (BLOCK_M, SLOTS): one reduction of A over the width (no 16-wide matmul)."""
    o_w = tl.arange(0, WIDTH_PAD)
    b_row = tl.load(w_ptr + o * WIDTH + o_w, mask=o_w < WIDTH, other=0.0).to(tl.float32)
    r = tl.sum(A * b_row[None, None, :], axis=2)
    if HAS_BIAS:
        r += tl.where(tl.arange(0, SLOTS)[None, :] == 0, tl.load(bias_ptr + o).to(tl.float32), 0.0)
    return r


@triton.jit
def network_input(
    Z, x_ptr, w_plain_ptr, w_enc_ptr, enc_func_ptr, enc_freq_ptr, enc_weight_ptr, o_p, m_p, o_s,
    x_col0, input_start, enc_per_coord, stride_xp, stride_xf,
    IN_PLAIN: tl.constexpr, NUM_TANGENTS: tl.constexpr, WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr,
    SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, ENCODED: tl.constexpr, JACOBIAN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_E: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """Z (BLOCK_M, SLOTS, WIDTH_PAD) plus a0's share of [z; U] for a layer reading the network's input
    (the first layer, a skip layer), from x: IN_PLAIN columns of x from x_col0 as outer products with
    w_plain (WIDTH, IN_PLAIN), their tangents the columns for x's inputs input_start.. (none with
    ENCODED: those columns are a latent code), and with ENCODED the encoded features of x's first
    NUM_TANGENTS columns times w_enc (WIDTH, len(encoding)), coordinate-major (`encoded_input`)."""
    o_w = tl.arange(0, WIDTH_PAD)
    m_w = o_w < WIDTH
    z = tl.zeros((BLOCK_M, WIDTH_PAD), tl.float32)
    u = tl.zeros((SLOTS, WIDTH_PAD), tl.float32)
    for i in tl.static_range(IN_PLAIN):
        b_x = tl.load(x_ptr + o_p * stride_xp + (x_col0 + i) * stride_xf, mask=m_p, other=0.0).to(tl.float32)
        b_col = tl.load(w_plain_ptr + o_w * IN_PLAIN + i, mask=m_w, other=0.0).to(tl.float32)
        z += b_x[:, None] * b_col[None, :]
        if JACOBIAN and not ENCODED:
            u += tl.where(input_start + o_s[:, None] - 1 == x_col0 + i, b_col[None, :], 0.0)
    Z += tl.where(o_s[None, :, None] == 0, z[:, None, :], u[None, :, :])
    if ENCODED:
        Z = encoded_input(
            Z, x_ptr, w_enc_ptr, enc_func_ptr, enc_freq_ptr, enc_weight_ptr, x_ptr, o_p, m_p, o_w, m_w, o_s,
            enc_per_coord, stride_xp, stride_xf, enc_per_coord * NUM_TANGENTS, 0, 0, 0,
            NUM_TANGENTS, NUM_TANGENTS, SLOTS, JACOBIAN, False, PRECISION, BLOCK_M, WIDTH_PAD, BLOCK_E,
            INTERPRET_BF16, False,
        )  # fmt: skip
    return Z


@triton.jit(
    do_not_specialize=[
        "num_points",
        "num_hidden",
        "points_bucket",
        "x_col0",
        "input_start",
        "enc_per_coord",
        "skip_hidden",
    ]
)
def mlp_forward_kernel(
    x_ptr, w_first_ptr, bias_first_ptr, w_hidden_ptr, bias_hidden_ptr, w_last_ptr, bias_last_ptr, y_ptr, j_ptr,
    w_first_enc_ptr, share_ptr, enc_func_ptr, enc_freq_ptr, enc_weight_ptr,
    num_points, num_hidden, points_bucket, x_col0, input_start, enc_per_coord, skip_hidden,
    stride_xp, stride_xf, stride_yp, stride_yf, stride_jp, stride_jo, stride_jk, stride_sp, stride_ss,
    IN: tl.constexpr, NUM_TANGENTS: tl.constexpr, WIDTH: tl.constexpr, OUT: tl.constexpr,
    ACT: tl.constexpr, ACT_PARAM: tl.constexpr, ACT_THRESHOLD: tl.constexpr,
    LAST_ACT: tl.constexpr, LAST_PARAM: tl.constexpr, LAST_THRESHOLD: tl.constexpr,
    HAS_BIAS: tl.constexpr, JACOBIAN: tl.constexpr, PRECISION: tl.constexpr,
    SLOTS: tl.constexpr, WIDTH_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    PLAIN_INPUT: tl.constexpr = True, ENCODED: tl.constexpr = False, HAS_SKIP: tl.constexpr = False,
    OUT_START: tl.constexpr = 0, OUT_STOP: tl.constexpr = -1, BLOCK_E: tl.constexpr = 16,
    LIVE_SLOTS: tl.constexpr = 1, INTERPRET_BF16: tl.constexpr = False,
):  # fmt: skip
    """y (and J) for BLOCK_M points through every layer.

    Weights are contiguous: w_first (WIDTH, IN), w_hidden (num_hidden, WIDTH, WIDTH), w_last
    (OUT, WIDTH); biases likewise (zeros where a layer has none). Layers 1..L-1 use ACT, layer L
    uses LAST_ACT. points_bucket only keys the autotuner.

    PLAIN_INPUT: the first layer reads x's IN columns, J differentiates the first NUM_TANGENTS.
    Otherwise (real networks, docs/design.md section 8) the first layer reads a0 through
    `network_input`: IN columns of x from x_col0 (w_first) and with ENCODED the encoding of x's
    first NUM_TANGENTS columns (w_first_enc); with HAS_SKIP, hidden layer skip_hidden adds a0's share
    of its [z; U], held in share[p, slot, n] (LIVE_SLOTS slots; computed by the per-layer kernel on
    the skip layer's a0 columns, the skip scale in them and in that hidden layer's weights). J holds
    the outputs OUT_START..OUT_STOP (-1: all).
    """
    tl.static_assert(SLOTS >= 1 + NUM_TANGENTS or not JACOBIAN, "SLOTS must hold the value and the tangents")
    tl.static_assert(WIDTH_PAD >= 16, "tl.dot needs every dimension >= 16")
    i_m = tl.program_id(0).to(tl.int64)
    o_p = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_p = o_p < num_points
    o_s = tl.arange(0, SLOTS)
    o_w = tl.arange(0, WIDTH_PAD)
    if PLAIN_INPUT:
        Z = first_layer(
            x_ptr, w_first_ptr, bias_first_ptr, o_p, m_p, stride_xp, stride_xf,
            IN, NUM_TANGENTS, WIDTH, WIDTH_PAD, SLOTS, BLOCK_M, HAS_BIAS, JACOBIAN,
        )  # fmt: skip
    else:
        Z = network_input(
            tl.zeros((BLOCK_M, SLOTS, WIDTH_PAD), tl.float32), x_ptr, w_first_ptr, w_first_enc_ptr,
            enc_func_ptr, enc_freq_ptr, enc_weight_ptr, o_p, m_p, o_s, x_col0, input_start, enc_per_coord,
            stride_xp, stride_xf, IN, NUM_TANGENTS, WIDTH, WIDTH_PAD, SLOTS, BLOCK_M, ENCODED, JACOBIAN,
            PRECISION, BLOCK_E, INTERPRET_BF16,
        )  # fmt: skip
        if HAS_BIAS:
            bias_row = tl.load(bias_first_ptr + o_w, mask=o_w < WIDTH, other=0.0).to(tl.float32)
            Z += tl.where(o_s[None, :, None] == 0, bias_row[None, None, :], 0.0)
    A = activate_stacked(Z, o_s, SLOTS, ACT, ACT_PARAM, ACT_THRESHOLD)
    for l in range(num_hidden):
        if HAS_SKIP:  # a0's share of the skip layer's [z; U], held and loaded at that layer only, as the
            # dot's initial accumulator: computed here from x, or added as a tile of its own, it spilled on sm_90
            p_share = share_ptr + o_p[:, None, None] * stride_sp + o_s[None, :, None] * stride_ss + o_w[None, None, :]
            m_share = m_p[:, None, None] & (o_s[None, :, None] < LIVE_SLOTS) & (o_w[None, None, :] < WIDTH)
            at_skip = (o_s[None, :, None] * 0 + l) == skip_hidden  # a tensor (the interpreter's l is an int)
            share = tl.load(p_share, mask=m_share & at_skip, other=0.0).to(tl.float32)
            Z = hidden_layer(
                A, w_hidden_ptr, bias_hidden_ptr, l, WIDTH, WIDTH_PAD, SLOTS, BLOCK_M, HAS_BIAS, PRECISION,
                INTERPRET_BF16, tl.reshape(share, (BLOCK_M * SLOTS, WIDTH_PAD)),
            )  # fmt: skip
        else:
            Z = hidden_layer(
                A, w_hidden_ptr, bias_hidden_ptr, l, WIDTH, WIDTH_PAD, SLOTS, BLOCK_M, HAS_BIAS, PRECISION,
                INTERPRET_BF16,
            )  # fmt: skip
        A = activate_stacked(Z, o_s, SLOTS, ACT, ACT_PARAM, ACT_THRESHOLD)

    is_value = o_s[None, :] == 0
    for o in tl.static_range(OUT):
        r = last_layer_output(A, w_last_ptr, bias_last_ptr, o, WIDTH, WIDTH_PAD, SLOTS, HAS_BIAS)
        if LAST_ACT != IDENTITY:
            if JACOBIAN:
                z_o = tl.sum(tl.where(is_value, r, 0.0), axis=1)
                s, ds = activation_and_slope(z_o, LAST_ACT, LAST_PARAM, LAST_THRESHOLD)
                r = tl.where(is_value, s[:, None], ds[:, None] * r)
            else:
                r = activation_value(r, LAST_ACT, LAST_PARAM, LAST_THRESHOLD)
        p_y = y_ptr + o_p[:, None] * stride_yp + o * stride_yf + o_s[None, :] * 0
        tl.store(p_y, to_storage(r, y_ptr.dtype.element_ty, INTERPRET_BF16), mask=m_p[:, None] & is_value)
        if JACOBIAN and o >= OUT_START and (OUT_STOP < 0 or o < OUT_STOP):
            p_j = j_ptr + o_p[:, None] * stride_jp + (o - OUT_START) * stride_jo + (o_s[None, :] - 1) * stride_jk
            m_j = m_p[:, None] & (o_s[None, :] >= 1) & (o_s[None, :] <= NUM_TANGENTS)
            tl.store(p_j, to_storage(r, j_ptr.dtype.element_ty, INTERPRET_BF16), mask=m_j)


@triton.jit
def encoded_input(
    acc3, x_ptr, w_enc_ptr, enc_func_ptr, enc_freq_ptr, enc_weight_ptr, gj_ptr, o_p, m_p, o_n, m_n, o_s,
    enc_per_coord, stride_xp, stride_xf, stride_wen, stride_gjp, stride_gjo, stride_gjk,
    COORDINATES: tl.constexpr, NUM_TANGENTS: tl.constexpr, SLOTS: tl.constexpr, JACOBIAN: tl.constexpr,
    SEEDED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, INTERPRET_BF16: tl.constexpr, LAPLACIAN: tl.constexpr, HESSIAN: tl.constexpr = False,
):  # fmt: skip
    """acc3 (BLOCK_M, SLOTS, BLOCK_N) plus the encoded features' share of [z; U], computed from x.

    The encoded features come grouped by coordinate (tritonjac/encoding.py: w f(c x_j), f the
    identity, sin or cos), enc_per_coord per coordinate (of COORDINATES), with w_enc's columns in
    the same order. Coordinate j's features depend on x_j alone, so their tangent is one non-zero
    per feature: the values take one dot per coordinate over its features, and tangent slot j + 1
    another over their derivatives; no product with the zeros of the other coordinates. With
    SEEDED (reverse mode's backward) tangent slot r + 1 is the direction gj[p, r] in x instead, and
    gets the derivatives' dot of coordinate j times gj[p, r, j]. With LAPLACIAN, slot
    1 + NUM_TANGENTS gets each coordinate's second derivatives' dot (the encoding's Laplacian); with
    HESSIAN, coordinate j's goes to its diagonal row (j, j) (the others are zero: one coordinate each).
    """
    operand_ty = w_enc_ptr.dtype.element_ty
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < enc_per_coord
    for j in tl.static_range(COORDINATES):
        col = j * enc_per_coord + o_e
        function = tl.load(enc_func_ptr + col, mask=m_e, other=0)
        frequency = tl.load(enc_freq_ptr + col, mask=m_e, other=0.0)
        weight = tl.load(enc_weight_ptr + col, mask=m_e, other=0.0)
        b_x = tl.load(x_ptr + o_p * stride_xp + j * stride_xf, mask=m_p, other=0.0).to(tl.float32)
        t = b_x[:, None] * frequency[None, :]
        sin_t, cos_t = sin_cos(t)
        is_sin, is_cos = function[None, :] == 1, function[None, :] == 2  # encoding.SIN, encoding.COS
        value = tl.where(is_sin, sin_t, tl.where(is_cos, cos_t, t)) * weight[None, :]
        b_w = tl.load(
            w_enc_ptr + o_n[None, :] * stride_wen + col[:, None], mask=m_e[:, None] & m_n[None, :], other=0.0
        ).to(operand_ty)
        v = dot_f32(to_operand(value, operand_ty, INTERPRET_BF16), b_w, None, PRECISION, INTERPRET_BF16)
        acc3 += tl.where(o_s[None, :, None] == 0, v[:, None, :], 0.0)
        if JACOBIAN:
            slope = tl.where(is_sin, cos_t, tl.where(is_cos, -sin_t, 1.0)) * (weight * frequency)[None, :]
            u = dot_f32(to_operand(slope, operand_ty, INTERPRET_BF16), b_w, None, PRECISION, INTERPRET_BF16)
            if SEEDED:
                p_seed = gj_ptr + o_p[:, None] * stride_gjp + (o_s[None, :] - 1) * stride_gjo + j * stride_gjk
                m_seed = m_p[:, None] & (o_s[None, :] >= 1) & (o_s[None, :] <= NUM_TANGENTS)
                seed = tl.load(p_seed, mask=m_seed, other=0.0).to(tl.float32)
                acc3 += seed[:, :, None] * u[:, None, :]
            else:
                acc3 += tl.where(o_s[None, :, None] == j + 1, u[:, None, :], 0.0)
        if LAPLACIAN or HESSIAN:
            curvature = (
                tl.where(is_sin, -sin_t, tl.where(is_cos, -cos_t, 0.0)) * (weight * frequency * frequency)[None, :]
            )
            c = dot_f32(to_operand(curvature, operand_ty, INTERPRET_BF16), b_w, None, PRECISION, INTERPRET_BF16)
            row = hessian_slot(j, j, NUM_TANGENTS) if HESSIAN else 1 + NUM_TANGENTS
            acc3 += tl.where(o_s[None, :, None] == row, c[:, None, :], 0.0)
    return acc3


@triton.jit(
    do_not_specialize=[
        "num_points",
        "d_in",
        "d_out",
        "points_bucket",
        "d_plain",
        "x_col0",
        "input_start",
        "enc_per_coord",
    ]
)
def layer_forward_kernel(
    a_ptr, w_ptr, bias_ptr, h_ptr, t_ptr, z_ptr,
    x_ptr, w_in_ptr, w_enc_ptr, enc_func_ptr, enc_freq_ptr, enc_weight_ptr, gj_ptr,
    num_points, d_in, d_out, points_bucket, d_plain, x_col0, input_start, enc_per_coord,
    stride_ap, stride_as, stride_af, stride_wn, stride_wk,
    stride_hp, stride_hf, stride_tp, stride_ts, stride_tf, stride_zp, stride_zs,
    stride_xp, stride_xf, stride_win, stride_wik, stride_wen, stride_gjp, stride_gjo, stride_gjk,
    NUM_TANGENTS: tl.constexpr, HAS_HIDDEN: tl.constexpr, HAS_INPUT: tl.constexpr, ENCODED: tl.constexpr,
    ACT: tl.constexpr, ACT_PARAM: tl.constexpr, ACT_THRESHOLD: tl.constexpr,
    HAS_BIAS: tl.constexpr, JACOBIAN: tl.constexpr, PRECISION: tl.constexpr,
    SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr = 16, STORE_Z: tl.constexpr = False,
    SEEDED: tl.constexpr = False, SEED_INPUTS: tl.constexpr = 0, INTERPRET_BF16: tl.constexpr = False,
    LAPLACIAN: tl.constexpr = False, HESSIAN: tl.constexpr = False,
):  # fmt: skip
    """One layer for BLOCK_M points and BLOCK_N output features: [a] -> [s(z); s'(z) U].

    Its input has up to two parts, each with its own columns of W:
    - HAS_HIDDEN: the previous layer's [h; T], read at a[p, slot, f] (slot stride stride_as), d_in
      features, times w (w_ptr).
    - HAS_INPUT: the network's input a0 (the first layer, and skip layers): d_plain columns of x
      from x_col0 times w_in, whose tangents are unit vectors for x's columns input_start.. (none
      with ENCODED: those columns then follow the encoding, a latent code); and with ENCODED the
      encoded features of x's first NUM_TANGENTS columns times w_enc (`encoded_input`).
    z = both parts + bias (a skip's scale is in the weights). Values are written to h[p, n], tangent slot
    s to t[p, s - 1, n] (strides given), so the last layer writes y and J. With STORE_Z (the
    backward's recompute) the stacked pre-activation Z is also written, in fp32, to z[p, slot, n].
    With SEEDED (reverse mode's backward) a0's tangents are NUM_TANGENTS directions per point in x's
    SEED_INPUTS differentiated inputs, gj[p, r, j] (dLoss/dJ's rows), not unit vectors.
    With LAPLACIAN, slot 1 + NUM_TANGENTS carries the Laplacian row as well (`activate_laplacian`;
    a0's is zero for x's columns, the encoding's second derivatives for encoded ones), stored with
    the tangents. With HESSIAN, the k (k + 1) / 2 Hessian rows follow the tangents instead
    (`activate_hessian`; a0's are zero for x's columns, the encoding's second derivatives on the
    diagonal rows for encoded ones).
    """
    SECOND_ROWS: tl.constexpr = NUM_TANGENTS * (NUM_TANGENTS + 1) // 2 if HESSIAN else LAPLACIAN
    LIVE: tl.constexpr = 1 + NUM_TANGENTS + SECOND_ROWS if JACOBIAN else 1
    tl.static_assert(SLOTS >= LIVE, "SLOTS must hold every row")
    tl.static_assert(not ((LAPLACIAN or HESSIAN) and SEEDED), "second derivatives need the k unit tangents")
    tl.static_assert(not (LAPLACIAN and HESSIAN), "the Hessian's rows or the Laplacian's, not both")
    i_m = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    o_p = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_p = o_p < num_points
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < d_out
    o_s = tl.arange(0, SLOTS)
    m_s = o_s < LIVE
    operand_ty = w_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M * SLOTS, BLOCK_N), tl.float32)
    if HAS_HIDDEN:
        for k0 in range(0, d_in, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < d_in
            p_a = (
                a_ptr + o_p[:, None, None] * stride_ap + o_s[None, :, None] * stride_as + o_k[None, None, :] * stride_af
            )
            b_a = tl.load(p_a, mask=m_p[:, None, None] & m_s[None, :, None] & m_k[None, None, :], other=0.0)
            b_wt = tl.load(
                w_ptr + o_n[None, :] * stride_wn + o_k[:, None] * stride_wk, mask=m_k[:, None] & m_n[None, :], other=0.0
            )
            b_a = to_operand(tl.reshape(b_a, (BLOCK_M * SLOTS, BLOCK_K)), operand_ty, INTERPRET_BF16)
            acc = dot_f32(b_a, b_wt.to(operand_ty), acc, PRECISION, INTERPRET_BF16)
    if HAS_INPUT:
        for k0 in range(0, d_plain, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < d_plain
            column = x_col0 + o_k
            b_x = tl.load(
                x_ptr + o_p[:, None] * stride_xp + column[None, :] * stride_xf,
                mask=m_p[:, None] & m_k[None, :],
                other=0.0,
            )
            if ENCODED:  # the columns after the encoded ones are not differentiated
                tangent = tl.zeros((1, SLOTS, BLOCK_K), tl.float32)
            elif SEEDED:  # tangent r: gj[p, r, column - input_start] on the differentiated columns
                seed_col = column[None, None, :] - input_start
                p_seed = (
                    gj_ptr
                    + o_p[:, None, None] * stride_gjp
                    + (o_s[None, :, None] - 1) * stride_gjo
                    + seed_col * stride_gjk
                )
                m_seed = (o_s[None, :, None] >= 1) & (o_s[None, :, None] <= NUM_TANGENTS) & m_p[:, None, None]
                m_seed = m_seed & (seed_col >= 0) & (seed_col < SEED_INPUTS)
                tangent = tl.load(p_seed, mask=m_seed, other=0.0).to(tl.float32)
            else:  # unit vectors for x's differentiated columns (the Laplacian and padding slots: zero)
                unit = (column[None, None, :] == input_start + o_s[None, :, None] - 1) & (
                    o_s[None, :, None] <= NUM_TANGENTS
                )
                tangent = tl.where(unit, 1.0, 0.0)
            b_a = tl.where(o_s[None, :, None] == 0, b_x.to(tl.float32)[:, None, :], tangent)
            b_wt = tl.load(
                w_in_ptr + o_n[None, :] * stride_win + o_k[:, None] * stride_wik,
                mask=m_k[:, None] & m_n[None, :],
                other=0.0,
            )
            b_a = to_operand(tl.reshape(b_a, (BLOCK_M * SLOTS, BLOCK_K)), operand_ty, INTERPRET_BF16)
            acc = dot_f32(b_a, b_wt.to(operand_ty), acc, PRECISION, INTERPRET_BF16)

    Z = tl.reshape(acc, (BLOCK_M, SLOTS, BLOCK_N))
    if HAS_INPUT and ENCODED:
        Z = encoded_input(
            Z, x_ptr, w_enc_ptr, enc_func_ptr, enc_freq_ptr, enc_weight_ptr, gj_ptr, o_p, m_p, o_n, m_n, o_s,
            enc_per_coord, stride_xp, stride_xf, stride_wen, stride_gjp, stride_gjo, stride_gjk,
            SEED_INPUTS if SEEDED else NUM_TANGENTS, NUM_TANGENTS, SLOTS, JACOBIAN, SEEDED, PRECISION,
            BLOCK_M, BLOCK_N, BLOCK_E, INTERPRET_BF16, LAPLACIAN, HESSIAN,
        )  # fmt: skip
    if HAS_BIAS:
        bias_row = tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
        Z += tl.where(o_s[None, :, None] == 0, bias_row[None, None, :], 0.0)
    m_pn = m_p[:, None, None] & m_n[None, None, :]
    if STORE_Z:
        p_z = z_ptr + o_p[:, None, None] * stride_zp + o_s[None, :, None] * stride_zs + o_n[None, None, :]
        tl.store(p_z, Z, mask=m_pn & m_s[None, :, None])
    if LAPLACIAN:
        A = activate_laplacian(Z, o_s, NUM_TANGENTS, ACT, ACT_PARAM, ACT_THRESHOLD)
    elif HESSIAN:
        A = activate_hessian(Z, o_s, NUM_TANGENTS, ACT, ACT_PARAM, ACT_THRESHOLD)
    else:
        A = activate_stacked(Z, o_s, SLOTS, ACT, ACT_PARAM, ACT_THRESHOLD)

    p_h = h_ptr + o_p[:, None, None] * stride_hp + o_n[None, None, :] * stride_hf + o_s[None, :, None] * 0
    tl.store(p_h, to_storage(A, h_ptr.dtype.element_ty, INTERPRET_BF16), mask=m_pn & (o_s[None, :, None] == 0))
    if JACOBIAN:
        p_t = (
            t_ptr
            + o_p[:, None, None] * stride_tp
            + (o_s[None, :, None] - 1) * stride_ts
            + o_n[None, None, :] * stride_tf
        )
        m_t = m_pn & (o_s[None, :, None] >= 1) & m_s[None, :, None]
        tl.store(p_t, to_storage(A, t_ptr.dtype.element_ty, INTERPRET_BF16), mask=m_t)
