"""Reverse-mode forward: y and the m rows of J for fewer outputs than inputs (docs/design.md, section 9).

For an SDF (m = 1 output, k = 3 inputs) forward tangents carry 1 + k stacked rows per layer; a
reverse sweep carries the values up (one row) and then the adjoints of the m selected outputs down
(m rows):

    z_l = W_l h_(l-1) + b_l,  h_l = s(z_l)                     (up: one row, s'(z_l) kept)
    dz_L[r] = s_L'(z_L) at output o + r,  zero elsewhere
    dz_(l-1) = s'(z_(l-1)) * (dz_l W_l)                         (down: m rows, one dot per layer)
    J[r, j] = sum_n dz_1[r, n] W_1[n, input_start + j]

`mlp_reverse_kernel` runs the whole network for a block of points. Depth is a runtime loop, so the
slopes s'(z_l) of the way up cannot stay in registers: each program keeps them in its own slab of
global memory (num_hidden + 1 tiles of (BLOCK_M, WIDTH_PAD) fp32, small enough to stay in L2), and
programs are persistent (program i takes blocks i, i + num_programs, ...) so that the slabs are
few. The adjoints are one stacked tile of shape (BLOCK_M, ADJ_SLOTS, WIDTH_PAD), slot r for output
o + r, reshaped into one `tl.dot` operand per layer as in the forward kernels. The slots are
adjoints, not tangents: every slot is scaled by the same slope, with no curvature term.

The per-layer plan (wide or unequal layers, encodings, skips) goes up with `layer_forward_kernel`
(STORE_Z) and down with `layer_backward_kernel` (ADJOINTS).
"""

import triton
import triton.language as tl

from .activations import IDENTITY, activation_and_slope
from .forward import dot_f32, first_layer, hidden_layer, last_layer_output, to_operand, to_storage


@triton.jit(do_not_specialize=["num_points", "num_hidden", "num_programs", "input_start"])
def mlp_reverse_kernel(
    x_ptr, w_first_ptr, bias_first_ptr, w_hidden_ptr, bias_hidden_ptr, w_last_ptr, bias_last_ptr, y_ptr, j_ptr,
    ws_ptr,
    num_points, num_hidden, num_programs, input_start,
    stride_xp, stride_xf, stride_yp, stride_yf, stride_jp, stride_jo, stride_jk,
    IN: tl.constexpr, NUM_TANGENTS: tl.constexpr, WIDTH: tl.constexpr, OUT: tl.constexpr,
    ACT: tl.constexpr, ACT_PARAM: tl.constexpr, ACT_THRESHOLD: tl.constexpr,
    LAST_ACT: tl.constexpr, LAST_PARAM: tl.constexpr, LAST_THRESHOLD: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    ADJOINTS: tl.constexpr, ADJ_SLOTS: tl.constexpr, OUT_START: tl.constexpr,
    WIDTH_PAD: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET_BF16: tl.constexpr = False,
):  # fmt: skip
    """y (all OUT outputs) and J (outputs OUT_START .. OUT_START + ADJOINTS, inputs input_start ..
    input_start + NUM_TANGENTS) for the points of blocks pid, pid + num_programs, ...

    Weights as `mlp_forward_kernel` takes them (contiguous, hidden layers stacked, zero biases where
    a layer has none). ws: (num_hidden + 1, BLOCK_M, WIDTH_PAD) fp32 per program: the slopes of
    layers 1 .. L-1 for the current block.
    """
    tl.static_assert(ADJ_SLOTS >= ADJOINTS, "ADJ_SLOTS must hold the adjoints")
    tl.static_assert(WIDTH_PAD >= 16, "tl.dot needs every dimension >= 16")
    pid = tl.program_id(0)
    o_a = tl.arange(0, ADJ_SLOTS)
    o_w = tl.arange(0, WIDTH_PAD)
    m_w = o_w < WIDTH
    m_ww = m_w[:, None] & m_w[None, :]
    o_m = tl.arange(0, BLOCK_M)
    operand_ty = w_hidden_ptr.dtype.element_ty
    ws = ws_ptr + pid.to(tl.int64) * (num_hidden + 1) * BLOCK_M * WIDTH_PAD
    p_ws_tile = o_m[:, None] * WIDTH_PAD + o_w[None, :]

    num_blocks = tl.cdiv(num_points, BLOCK_M)
    first_point = pid.to(tl.int64) * BLOCK_M  # int64: points x features may pass 2^31
    for _ in range(pid, num_blocks, num_programs):
        o_p = first_point + o_m
        m_p = o_p < num_points
        first_point += num_programs.to(tl.int64) * BLOCK_M

        # ---- up: the values, keeping each layer's slope -----------------------------------------------
        Z = first_layer(
            x_ptr, w_first_ptr, bias_first_ptr, o_p, m_p, stride_xp, stride_xf,
            IN, NUM_TANGENTS, WIDTH, WIDTH_PAD, 1, BLOCK_M, HAS_BIAS, False,
        )  # fmt: skip
        h, ds = activation_and_slope(tl.reshape(Z, (BLOCK_M, WIDTH_PAD)), ACT, ACT_PARAM, ACT_THRESHOLD)
        tl.store(ws + p_ws_tile, ds)
        for l in range(num_hidden):
            Z = hidden_layer(
                h[:, None, :], w_hidden_ptr, bias_hidden_ptr, l, WIDTH, WIDTH_PAD, 1, BLOCK_M, HAS_BIAS, PRECISION,
                INTERPRET_BF16,
            )  # fmt: skip
            h, ds = activation_and_slope(tl.reshape(Z, (BLOCK_M, WIDTH_PAD)), ACT, ACT_PARAM, ACT_THRESHOLD)
            tl.store(ws + (l + 1) * BLOCK_M * WIDTH_PAD + p_ws_tile, ds)

        # ---- the last layer: y, and the adjoints of the selected outputs with respect to h_(L-1) -----------
        G = tl.zeros((BLOCK_M, ADJ_SLOTS, WIDTH_PAD), tl.float32)
        for o in tl.static_range(OUT):
            r = last_layer_output(h[:, None, :], w_last_ptr, bias_last_ptr, o, WIDTH, WIDTH_PAD, 1, HAS_BIAS)
            r = tl.reshape(r, (BLOCK_M,))
            slope = tl.full((BLOCK_M,), 1.0, tl.float32)
            if LAST_ACT != IDENTITY:
                r, slope = activation_and_slope(r, LAST_ACT, LAST_PARAM, LAST_THRESHOLD)
            b_y = to_storage(r, y_ptr.dtype.element_ty, INTERPRET_BF16)
            tl.store(y_ptr + o_p * stride_yp + o * stride_yf, b_y, mask=m_p)
            if o >= OUT_START and o < OUT_START + ADJOINTS:
                b_row = tl.load(w_last_ptr + o * WIDTH + o_w, mask=m_w, other=0.0).to(tl.float32)
                dz_out = tl.where(o_a[None, :] == o - OUT_START, slope[:, None], 0.0)
                G += dz_out[:, :, None] * b_row[None, None, :]
        tl.debug_barrier()  # the slopes are read back below in other threads' layouts

        # ---- down: dz_l = s'(z_l) * dh_l, dh_(l-1) = dz_l W_l --------------------------------------------
        for i in range(num_hidden):
            l = num_hidden - 1 - i
            ds = tl.load(ws + (l + 1) * BLOCK_M * WIDTH_PAD + p_ws_tile)
            dz = tl.reshape(G * ds[:, None, :], (BLOCK_M * ADJ_SLOTS, WIDTH_PAD))
            b_dz = to_operand(dz, operand_ty, INTERPRET_BF16)
            p_w = w_hidden_ptr + l * WIDTH * WIDTH + o_w[:, None] * WIDTH + o_w[None, :]  # [n, k]
            b_w = tl.load(p_w, mask=m_ww, other=0.0).to(operand_ty)
            G = tl.reshape(dot_f32(b_dz, b_w, None, PRECISION, INTERPRET_BF16), (BLOCK_M, ADJ_SLOTS, WIDTH_PAD))

        # ---- the first layer: J[r, j] = dz_1[r] . W_1[:, input_start + j] (a reduction per input) -------------
        G = G * tl.load(ws + p_ws_tile)[:, None, :]
        m_j = m_p[:, None] & (o_a[None, :] < ADJOINTS)
        for j in tl.static_range(NUM_TANGENTS):
            b_col = tl.load(w_first_ptr + o_w * IN + input_start + j, mask=m_w, other=0.0).to(tl.float32)
            jac = tl.sum(G * b_col[None, None, :], axis=2)
            p_j = j_ptr + o_p[:, None] * stride_jp + o_a[None, :] * stride_jo + j * stride_jk
            tl.store(p_j, to_storage(jac, j_ptr.dtype.element_ty, INTERPRET_BF16), mask=m_j)
        tl.debug_barrier()  # the next block overwrites the slopes
