"""Fused first-order backward of the whole-network forward (docs/design.md, section 3).

Given dLoss/dy and dLoss/dJ, `mlp_backward_kernel` returns dLoss/dx and per-program partial sums of
every weight and bias gradient. It saves nothing from the forward: each block of points recomputes
its forward from x, keeping each layer's stacked Z = [z; U] in a per-program workspace (a slab of
global memory that stays in L2), then walks the layers backwards with the stacked gradient
G = dLoss/d[h; T]:

    G_Z = [s'(z) g_h + s''(z) sum_j G_T,j U_j ;  s'(z) G_T]        (per point; one activation call)
    dW += G_Z^T A_prev      (one dot over the BLOCK_M * SLOTS stacked rows)
    db += sum over points of the value row of G_Z
    G   = G_Z W             (one dot)

Programs are persistent: program i handles blocks i, i + num_programs, ... and adds its blocks'
weight and bias gradients to its own fp32 slab, which it alone reads and writes; the launcher sums
the slabs in a fixed order. No atomics: the same inputs give bit-identical gradients.

Without a loss on J (HAS_GJ=False) the tangents do not influence any gradient: SLOTS is 1 and the
recomputed forward carries no tangents. Without a loss on y (HAS_GY=False), g_y is zero.

SEEDED (reverse mode's backward, docs/design.md section 9): for J with fewer rows m than columns k,
sum(dLoss/dJ * J) = sum_r (the derivative of y_r along the direction dLoss/dJ[r] in x), so the
tangents are NUM_TANGENTS = m directions per point, seeded with dLoss/dJ's rows (U_1[r] = W_1's
first SEED_INPUTS columns times dLoss/dJ[p, r]), their loss is tangent r of output r (a one-hot
G_T), and their gradient lands in W_1's columns weighted by the seeds: m + 1 rows instead of k + 1.
"""

import triton
import triton.language as tl

from .activations import (
    IDENTITY,
    activation_and_slope,
    activation_derivatives_to_third,
    activation_slope_and_curvature,
)
from .forward import (
    activate_stacked,
    dot_f32,
    first_layer,
    hessian_slot,
    hidden_layer,
    last_layer_output,
    slot_row,
    to_operand,
)


@triton.jit
def _activation_backward(G, Z, SLOTS: tl.constexpr, ACT: tl.constexpr, PARAM: tl.constexpr, THRESHOLD: tl.constexpr):
    """G_Z = dLoss/d[z; U] from G = dLoss/d[s(z); s'(z) U] and Z = [z; U], stacked on axis 1."""
    if ACT == IDENTITY:
        return G
    if SLOTS == 1:
        _, ds = activation_and_slope(Z, ACT, PARAM, THRESHOLD)
        return ds * G
    is_value = tl.arange(0, SLOTS)[None, :, None] == 0
    z = tl.sum(tl.where(is_value, Z, 0.0), axis=1)
    g_h = tl.sum(tl.where(is_value, G, 0.0), axis=1)
    curvature = tl.sum(tl.where(is_value, 0.0, G * Z), axis=1)  # sum over tangents of G_T * U
    ds, d2s = activation_slope_and_curvature(z, ACT, PARAM, THRESHOLD)
    g_z = ds * g_h + d2s * curvature
    return tl.where(is_value, g_z[:, None, :], ds[:, None, :] * G)


@triton.jit
def _laplacian_activation_backward(G, Z, o_s, NUM_TANGENTS: tl.constexpr, ACT: tl.constexpr, PARAM: tl.constexpr,
                                   THRESHOLD: tl.constexpr):  # fmt: skip
    """G_Z = dLoss/d[z; U; Q] from G = dLoss/d[h; T; S] through the forward Laplacian's activation
    (`forward.activate_laplacian`), slot 1 + NUM_TANGENTS the Laplacian row:

        g_z = s' g_h + s'' (sum_j g_T,j U_j + g_S Q) + s''' g_S sum_j U_j^2
        g_U,j = s' g_T,j + 2 s'' g_S U_j,      g_Q = s' g_S
    """
    if ACT == IDENTITY:
        return G
    is_value = o_s[None, :, None] == 0
    is_tangent = (o_s[None, :, None] >= 1) & (o_s[None, :, None] <= NUM_TANGENTS)
    z = slot_row(Z, o_s, 0)
    g_h = slot_row(G, o_s, 0)
    g_s = slot_row(G, o_s, 1 + NUM_TANGENTS)
    squares = tl.sum(tl.where(is_tangent, Z * Z, 0.0), axis=1)
    # sum_j g_T,j U_j + g_S Q: every derivative row's adjoint times its pre-activation
    curvature = tl.sum(tl.where(is_value, 0.0, G * Z), axis=1)
    ds, d2s, d3s = activation_derivatives_to_third(z, ACT, PARAM, THRESHOLD)
    g_z = ds * g_h + d2s * curvature + d3s * g_s * squares
    G_Z = ds[:, None, :] * G
    G_Z = tl.where(is_tangent, G_Z + (2.0 * d2s * g_s)[:, None, :] * Z, G_Z)
    return tl.where(is_value, g_z[:, None, :], G_Z)


@triton.jit
def _hessian_activation_backward(G, Z, o_s, NUM_TANGENTS: tl.constexpr, ACT: tl.constexpr, PARAM: tl.constexpr,
                                 THRESHOLD: tl.constexpr):  # fmt: skip
    """G_Z = dLoss/d[z; U; V] from G = dLoss/d[h; T; Q] through `forward.activate_hessian` (the
    Hessian's rows (a, b), a <= b, in `hessian_slot`'s slots):

        g_z = s' g_h + s'' (sum_j g_T,j U_j + sum_ab g_Q,ab V_ab) + s''' sum_ab g_Q,ab U_a U_b
        g_U,j = s' g_T,j + s'' sum over the rows (a, b) holding j of g_Q,ab times the other factor
        g_V,ab = s' g_Q,ab
    """
    if ACT == IDENTITY:
        return G
    is_value = o_s[None, :, None] == 0
    z = slot_row(Z, o_s, 0)
    ds, d2s, d3s = activation_derivatives_to_third(z, ACT, PARAM, THRESHOLD)
    # every derivative row's adjoint times its pre-activation
    curvature = tl.sum(tl.where(is_value, 0.0, G * Z), axis=1)
    third = tl.zeros(z.shape, tl.float32)
    G_Z = ds[:, None, :] * G
    for a in tl.static_range(NUM_TANGENTS):
        u_a = slot_row(Z, o_s, 1 + a)
        for b in tl.static_range(a, NUM_TANGENTS):
            u_b = slot_row(Z, o_s, 1 + b)
            g_q = slot_row(G, o_s, hessian_slot(a, b, NUM_TANGENTS))
            third += g_q * u_a * u_b
            curved = d2s * g_q
            G_Z = tl.where(o_s[None, :, None] == 1 + a, G_Z + (curved * u_b)[:, None, :], G_Z)
            G_Z = tl.where(o_s[None, :, None] == 1 + b, G_Z + (curved * u_a)[:, None, :], G_Z)
    g_z = ds * slot_row(G, o_s, 0) + d2s * curvature + d3s * third
    return tl.where(is_value, g_z[:, None, :], G_Z)


@triton.jit
def _seeds(gj_ptr, o_p, m_p, o_s, j, stride_gjp, stride_gjo, stride_gjk, NUM_TANGENTS: tl.constexpr):
    """dLoss/dJ[p, s - 1, j] in tangent slot s (BLOCK_M, SLOTS): the seeds' component along input j."""
    p_seed = gj_ptr + o_p[:, None] * stride_gjp + (o_s[None, :] - 1) * stride_gjo + j * stride_gjk
    m_seed = m_p[:, None] & (o_s[None, :] >= 1) & (o_s[None, :] <= NUM_TANGENTS)
    return tl.load(p_seed, mask=m_seed, other=0.0).to(tl.float32)


@triton.jit
def _add_to(p, value, mask):
    """*p += value for a program-private fp32 slab."""
    tl.store(p, tl.load(p, mask=mask, other=0.0) + value, mask=mask)


@triton.jit(do_not_specialize=["num_points", "num_hidden", "num_programs"])
def mlp_backward_kernel(
    x_ptr, w_first_ptr, bias_first_ptr, w_hidden_ptr, bias_hidden_ptr, w_last_ptr, bias_last_ptr,
    gy_ptr, gj_ptr, gx_ptr,
    gw_first_ptr, gb_first_ptr, gw_hidden_ptr, gb_hidden_ptr, gw_last_ptr, gb_last_ptr, ws_ptr,
    num_points, num_hidden, num_programs,
    stride_xp, stride_xf, stride_gyp, stride_gyf, stride_gjp, stride_gjo, stride_gjk, stride_gxp, stride_gxf,
    IN: tl.constexpr, NUM_TANGENTS: tl.constexpr, WIDTH: tl.constexpr, OUT: tl.constexpr,
    ACT: tl.constexpr, ACT_PARAM: tl.constexpr, ACT_THRESHOLD: tl.constexpr,
    LAST_ACT: tl.constexpr, LAST_PARAM: tl.constexpr, LAST_THRESHOLD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GY: tl.constexpr, HAS_GJ: tl.constexpr, NEED_X: tl.constexpr,
    PRECISION: tl.constexpr, SLOTS: tl.constexpr, WIDTH_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    SEEDED: tl.constexpr = False, SEED_INPUTS: tl.constexpr = 0, INTERPRET_BF16: tl.constexpr = False,
):  # fmt: skip
    """Gradients for the points of blocks pid, pid + num_programs, ...

    With SEEDED, gj holds dLoss/dJ (P, NUM_TANGENTS, SEED_INPUTS) as the tangents' seeds (above).

    Partial-sum slabs (fp32, one per program, zeroed by the launcher): gw_first (WIDTH, IN), gb_first
    (WIDTH), gw_hidden (num_hidden, WIDTH, WIDTH), gb_hidden (num_hidden, WIDTH), gw_last (OUT, WIDTH),
    gb_last (OUT). ws: (num_hidden + 1, BLOCK_M * SLOTS, WIDTH_PAD) fp32 per program.
    """
    tl.static_assert(SLOTS >= 1 + NUM_TANGENTS or not HAS_GJ, "SLOTS must hold the value and the tangents")
    TILE_ROWS: tl.constexpr = BLOCK_M * SLOTS
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    o_s = tl.arange(0, SLOTS)
    o_w = tl.arange(0, WIDTH_PAD)
    m_w = o_w < WIDTH
    m_ww = m_w[:, None] & m_w[None, :]
    o_r = tl.arange(0, TILE_ROWS)
    is_value = o_s[None, :, None] == 0
    is_value_2d = o_s[None, :] == 0
    operand_ty = w_hidden_ptr.dtype.element_ty

    ws = ws_ptr + pid64 * (num_hidden + 1) * TILE_ROWS * WIDTH_PAD
    p_ws_tile = o_r[:, None] * WIDTH_PAD + o_w[None, :]
    gw_first = gw_first_ptr + pid64 * WIDTH * IN
    gb_first = gb_first_ptr + pid64 * WIDTH
    gw_hidden = gw_hidden_ptr + pid64 * num_hidden * WIDTH * WIDTH
    gb_hidden = gb_hidden_ptr + pid64 * num_hidden * WIDTH
    gw_last = gw_last_ptr + pid64 * OUT * WIDTH
    gb_last = gb_last_ptr + pid64 * OUT

    num_blocks = tl.cdiv(num_points, BLOCK_M)
    first_point = pid64 * BLOCK_M  # int64: points x features may pass 2^31
    for _ in range(pid, num_blocks, num_programs):
        o_p = first_point + tl.arange(0, BLOCK_M)
        m_p = o_p < num_points
        first_point += num_programs.to(tl.int64) * BLOCK_M

        # ---- forward again, keeping each layer's Z in the workspace -----------------------------
        if SEEDED:  # U_1[r] = W_1's first SEED_INPUTS columns times the seeds dLoss/dJ[p, r]
            Z = first_layer(
                x_ptr, w_first_ptr, bias_first_ptr, o_p, m_p, stride_xp, stride_xf,
                IN, NUM_TANGENTS, WIDTH, WIDTH_PAD, 1, BLOCK_M, HAS_BIAS, False,
            )  # fmt: skip  # z alone, (BLOCK_M, 1, WIDTH_PAD)
            U = tl.zeros((BLOCK_M, SLOTS, WIDTH_PAD), tl.float32)
            for j in tl.static_range(SEED_INPUTS):
                seed = _seeds(gj_ptr, o_p, m_p, o_s, j, stride_gjp, stride_gjo, stride_gjk, NUM_TANGENTS)
                b_col = tl.load(w_first_ptr + o_w * IN + j, mask=m_w, other=0.0).to(tl.float32)
                U += seed[:, :, None] * b_col[None, None, :]
            Z = tl.where(is_value, Z, U)
        else:  # U_1 = W_1's first NUM_TANGENTS columns
            Z = first_layer(
                x_ptr, w_first_ptr, bias_first_ptr, o_p, m_p, stride_xp, stride_xf,
                IN, NUM_TANGENTS, WIDTH, WIDTH_PAD, SLOTS, BLOCK_M, HAS_BIAS, HAS_GJ,
            )  # fmt: skip
        tl.store(ws + p_ws_tile, tl.reshape(Z, (TILE_ROWS, WIDTH_PAD)))
        A = activate_stacked(Z, o_s, SLOTS, ACT, ACT_PARAM, ACT_THRESHOLD)
        for l in range(num_hidden):
            Z = hidden_layer(
                A,
                w_hidden_ptr,
                bias_hidden_ptr,
                l,
                WIDTH,
                WIDTH_PAD,
                SLOTS,
                BLOCK_M,
                HAS_BIAS,
                PRECISION,
                INTERPRET_BF16,
            )
            tl.store(ws + (l + 1) * TILE_ROWS * WIDTH_PAD + p_ws_tile, tl.reshape(Z, (TILE_ROWS, WIDTH_PAD)))
            A = activate_stacked(Z, o_s, SLOTS, ACT, ACT_PARAM, ACT_THRESHOLD)
        tl.debug_barrier()  # the workspace is read back below in other threads' layouts

        # ---- last layer: dLoss/d[y; J] -> G = dLoss/dA_{L-1}, by outer products per output ---------
        G = tl.zeros((BLOCK_M, SLOTS, WIDTH_PAD), tl.float32)
        for o in tl.static_range(OUT):
            g = tl.zeros((BLOCK_M, SLOTS), tl.float32)
            if HAS_GY:
                p_gy = gy_ptr + o_p[:, None] * stride_gyp + o * stride_gyf + o_s[None, :] * 0
                g += tl.load(p_gy, mask=m_p[:, None] & is_value_2d, other=0.0).to(tl.float32)
            if SEEDED:  # the loss on the seeded tangents: tangent r of output r (a padding point's seeds
                # are zero, so are its tangents, and it adds nothing to any gradient)
                g += tl.where(o_s[None, :] == o + 1, 1.0, 0.0)
            elif HAS_GJ:
                p_gj = gj_ptr + o_p[:, None] * stride_gjp + o * stride_gjo + (o_s[None, :] - 1) * stride_gjk
                m_gj = m_p[:, None] & (o_s[None, :] >= 1) & (o_s[None, :] <= NUM_TANGENTS)
                g += tl.load(p_gj, mask=m_gj, other=0.0).to(tl.float32)
            if LAST_ACT != IDENTITY:
                r = last_layer_output(A, w_last_ptr, bias_last_ptr, o, WIDTH, WIDTH_PAD, SLOTS, HAS_BIAS)
                g3 = _activation_backward(g[:, :, None], r[:, :, None], SLOTS, LAST_ACT, LAST_PARAM, LAST_THRESHOLD)
                g = tl.reshape(g3, (BLOCK_M, SLOTS))
            b_row = tl.load(w_last_ptr + o * WIDTH + o_w, mask=m_w, other=0.0).to(tl.float32)
            G += g[:, :, None] * b_row[None, None, :]
            _add_to(gw_last + o * WIDTH + o_w, tl.sum(tl.sum(g[:, :, None] * A, axis=1), axis=0), m_w)
            if HAS_BIAS:
                _add_to(gb_last + o + o_s * 0, tl.sum(g, axis=0), o_s == 0)

        # ---- hidden layers, last to first -------------------------------------------------------------
        for i in range(num_hidden):
            l = num_hidden - 1 - i
            Z = tl.reshape(tl.load(ws + (l + 1) * TILE_ROWS * WIDTH_PAD + p_ws_tile), (BLOCK_M, SLOTS, WIDTH_PAD))
            G_Z = _activation_backward(G, Z, SLOTS, ACT, ACT_PARAM, ACT_THRESHOLD)
            Z_prev = tl.reshape(tl.load(ws + l * TILE_ROWS * WIDTH_PAD + p_ws_tile), (BLOCK_M, SLOTS, WIDTH_PAD))
            A_prev = activate_stacked(Z_prev, o_s, SLOTS, ACT, ACT_PARAM, ACT_THRESHOLD)
            b_gz = to_operand(tl.reshape(G_Z, (TILE_ROWS, WIDTH_PAD)), operand_ty, INTERPRET_BF16)
            b_a = to_operand(tl.reshape(A_prev, (TILE_ROWS, WIDTH_PAD)), operand_ty, INTERPRET_BF16)
            d_w = dot_f32(tl.trans(b_gz), b_a, None, PRECISION, INTERPRET_BF16)  # [n, k] like W
            _add_to(gw_hidden + l * WIDTH * WIDTH + o_w[:, None] * WIDTH + o_w[None, :], d_w, m_ww)
            if HAS_BIAS:
                g_b = tl.sum(tl.sum(tl.where(is_value, G_Z, 0.0), axis=1), axis=0)
                _add_to(gb_hidden + l * WIDTH + o_w, g_b, m_w)
            p_w = w_hidden_ptr + l * WIDTH * WIDTH + o_w[:, None] * WIDTH + o_w[None, :]  # [n, k]
            b_w = tl.load(p_w, mask=m_ww, other=0.0).to(operand_ty)
            G = tl.reshape(dot_f32(b_gz, b_w, None, PRECISION, INTERPRET_BF16), (BLOCK_M, SLOTS, WIDTH_PAD))

        # ---- first layer: Z_1 = [x W^T + b; W E] ------------------------------------------------------
        Z = tl.reshape(tl.load(ws + p_ws_tile), (BLOCK_M, SLOTS, WIDTH_PAD))
        G_Z = _activation_backward(G, Z, SLOTS, ACT, ACT_PARAM, ACT_THRESHOLD)
        g_z = tl.sum(tl.where(is_value, G_Z, 0.0), axis=1)  # (BLOCK_M, WIDTH_PAD)
        for i in tl.static_range(IN):
            b_x = tl.load(x_ptr + o_p * stride_xp + i * stride_xf, mask=m_p, other=0.0).to(tl.float32)
            _add_to(gw_first + o_w * IN + i, tl.sum(g_z * b_x[:, None], axis=0), m_w)
            if NEED_X:
                b_col = tl.load(w_first_ptr + o_w * IN + i, mask=m_w, other=0.0).to(tl.float32)
                g_x = tl.sum(g_z * b_col[None, :], axis=1)
                tl.store(gx_ptr + o_p * stride_gxp + i * stride_gxf, g_x.to(gx_ptr.dtype.element_ty), mask=m_p)
        if SEEDED:  # U_1 = W_1[:, j] times the seeds: column j's gradient weighs G_U by them
            tl.debug_barrier()  # those columns were just updated above, in another layout
            for j in tl.static_range(SEED_INPUTS):
                seed = _seeds(gj_ptr, o_p, m_p, o_s, j, stride_gjp, stride_gjo, stride_gjk, NUM_TANGENTS)
                g_col = tl.sum(tl.sum(G_Z * seed[:, :, None], axis=1), axis=0)  # slot 0's seed is 0
                _add_to(gw_first + o_w * IN + j, g_col, m_w)
        elif HAS_GJ:  # the tangent rows of Z_1 are W's first NUM_TANGENTS columns: their gradient lands there
            tl.debug_barrier()  # those columns were just updated above, in another layout
            g_u = tl.sum(G_Z, axis=0)  # (SLOTS, WIDTH_PAD): slot s -> column s - 1
            m_u = (o_s[:, None] >= 1) & (o_s[:, None] <= NUM_TANGENTS) & m_w[None, :]
            _add_to(gw_first + o_w[None, :] * IN + (o_s[:, None] - 1), g_u, m_u)
        if HAS_BIAS:
            _add_to(gb_first + o_w, tl.sum(g_z, axis=0), m_w)
        tl.debug_barrier()  # the next block overwrites the workspace and the slabs


# ---- the per-layer plan ------------------------------------------------------------------------------
# The launcher recomputes a chunk of points layer by layer (`layer_forward_kernel` with STORE_Z keeps
# each layer's A = [h; T] and Z = [z; U]), then per layer, last to first:
#   layer_backward_kernel:      G_Z of layer l -> G_Z of layer l-1 (or dLoss/dx after the first)
#   layer_weight_grad_kernel:   G_Z of layer l and A of layer l-1 -> partial dW_l, db_l per split


@triton.jit(do_not_specialize=["num_points", "d_in", "d_out"])
def layer_backward_kernel(
    gz_ptr, w_ptr, z_prev_ptr, out_ptr,
    num_points, d_in, d_out,
    stride_gp, stride_gs, stride_wn, stride_wk, stride_zp, stride_zs, stride_op, stride_os, stride_of,
    LIVE_SLOTS: tl.constexpr, LAST_STEP: tl.constexpr,
    ACT: tl.constexpr, ACT_PARAM: tl.constexpr, ACT_THRESHOLD: tl.constexpr,
    PRECISION: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ADJOINTS: tl.constexpr = False, INTERPRET_BF16: tl.constexpr = False, LAPLACIAN: tl.constexpr = False,
    HESSIAN: tl.constexpr = False, NUM_TANGENTS: tl.constexpr = 0,
):  # fmt: skip
    """G = G_Z W for BLOCK_M points and BLOCK_K input features (LIVE_SLOTS live slots of SLOTS), then
    the previous layer's activation backward with its Z (ACT), written to out[p, slot, k]; with
    LAST_STEP (this is the first layer) the value row of G is dLoss/dx, written to out[p, k].

    With ADJOINTS (reverse mode's forward, kernels/reverse.py) the slots are the adjoints of J's rows,
    not [value; tangents]: each is scaled by the slope s'(z) alone (z_prev holds z once per point: the
    caller passes stride_zs = 0), and LAST_STEP writes every live slot to out[p, slot, k].

    With LAPLACIAN the live slots are [value; NUM_TANGENTS tangents; the Laplacian row], taken back
    through the forward Laplacian's activation (`_laplacian_activation_backward`); with HESSIAN
    [value; NUM_TANGENTS tangents; the Hessian's rows] (`_hessian_activation_backward`)."""
    tl.static_assert(not ((LAPLACIAN or HESSIAN) and ADJOINTS), "second-order rows are forward-mode rows")
    tl.static_assert(not LAPLACIAN or LIVE_SLOTS == 2 + NUM_TANGENTS)
    tl.static_assert(not HESSIAN or LIVE_SLOTS == 1 + NUM_TANGENTS + NUM_TANGENTS * (NUM_TANGENTS + 1) // 2)
    i_m = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1)
    o_p = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_p = o_p < num_points
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < d_in
    o_s = tl.arange(0, SLOTS)
    m_s = o_s < LIVE_SLOTS
    operand_ty = w_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M * SLOTS, BLOCK_K), tl.float32)
    for n0 in range(0, d_out, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < d_out
        p_g = gz_ptr + o_p[:, None, None] * stride_gp + o_s[None, :, None] * stride_gs + o_n[None, None, :]
        b_g = tl.load(p_g, mask=m_p[:, None, None] & m_s[None, :, None] & m_n[None, None, :], other=0.0)
        b_w = tl.load(
            w_ptr + o_n[:, None] * stride_wn + o_k[None, :] * stride_wk, mask=m_n[:, None] & m_k[None, :], other=0.0
        )
        b_g = to_operand(tl.reshape(b_g, (BLOCK_M * SLOTS, BLOCK_N)), operand_ty, INTERPRET_BF16)
        acc = dot_f32(b_g, b_w.to(operand_ty), acc, PRECISION, INTERPRET_BF16)
    G = tl.reshape(acc, (BLOCK_M, SLOTS, BLOCK_K))
    m_pk = m_p[:, None, None] & m_k[None, None, :]
    p_out = out_ptr + o_p[:, None, None] * stride_op + o_s[None, :, None] * stride_os + o_k[None, None, :] * stride_of
    if LAST_STEP:
        m_out = m_s[None, :, None] if ADJOINTS else o_s[None, :, None] == 0
        tl.store(p_out, G.to(out_ptr.dtype.element_ty), mask=m_pk & m_out)
    else:
        p_z = z_prev_ptr + o_p[:, None, None] * stride_zp + o_s[None, :, None] * stride_zs + o_k[None, None, :]
        Z = tl.load(p_z, mask=m_pk & m_s[None, :, None], other=0.0)
        if ADJOINTS:  # every slot times s'(z): no value row, no curvature term
            G_Z = _activation_backward(G, Z, 1, ACT, ACT_PARAM, ACT_THRESHOLD)
        elif LAPLACIAN:
            G_Z = _laplacian_activation_backward(G, Z, o_s, NUM_TANGENTS, ACT, ACT_PARAM, ACT_THRESHOLD)
        elif HESSIAN:
            G_Z = _hessian_activation_backward(G, Z, o_s, NUM_TANGENTS, ACT, ACT_PARAM, ACT_THRESHOLD)
        else:
            G_Z = _activation_backward(G, Z, SLOTS, ACT, ACT_PARAM, ACT_THRESHOLD)
        tl.store(p_out, G_Z, mask=m_pk & m_s[None, :, None])


@triton.jit(do_not_specialize=["num_points", "d_in", "d_out", "points_per_split"])
def layer_weight_grad_kernel(
    gz_ptr, a_ptr, gw_ptr, gb_ptr,
    num_points, d_in, d_out, points_per_split,
    stride_gp, stride_gs, stride_ap, stride_as, stride_af,
    LIVE_SLOTS_A: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET_BF16: tl.constexpr = False,
):  # fmt: skip
    """Partial dW[n, k] = sum over this split's points and the LIVE_SLOTS_A slots of G_Z[p, s, n] A[p, s, k]
    (fp32, written to gw[split, n, k]; the launcher sums the splits), and db[n] from the value row."""
    i_n = tl.program_id(0)
    i_k = tl.program_id(1)
    i_split = tl.program_id(2).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < d_out
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < d_in
    o_s = tl.arange(0, SLOTS)
    m_s = o_s < LIVE_SLOTS_A
    operand_ty = a_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_b = tl.zeros((BLOCK_N,), tl.float32)
    start = i_split * points_per_split
    stop = tl.minimum(start + points_per_split, num_points)
    for p0 in range(start, stop, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m_p = o_p < stop
        p_g = gz_ptr + o_p[:, None, None] * stride_gp + o_s[None, :, None] * stride_gs + o_n[None, None, :]
        b_g = tl.load(p_g, mask=m_p[:, None, None] & m_s[None, :, None] & m_n[None, None, :], other=0.0)
        p_a = a_ptr + o_p[:, None, None] * stride_ap + o_s[None, :, None] * stride_as + o_k[None, None, :] * stride_af
        b_a = tl.load(p_a, mask=m_p[:, None, None] & m_s[None, :, None] & m_k[None, None, :], other=0.0)
        if HAS_BIAS:
            acc_b += tl.sum(tl.sum(tl.where(o_s[None, :, None] == 0, b_g, 0.0), axis=1), axis=0)
        b_g = to_operand(tl.reshape(b_g, (BLOCK_P * SLOTS, BLOCK_N)), operand_ty, INTERPRET_BF16)
        b_a = to_operand(tl.reshape(b_a, (BLOCK_P * SLOTS, BLOCK_K)), operand_ty, INTERPRET_BF16)
        acc = dot_f32(tl.trans(b_g), b_a, acc, PRECISION, INTERPRET_BF16)
    p_w = gw_ptr + i_split * d_out * d_in + o_n[:, None] * d_in + o_k[None, :]
    tl.store(p_w, acc, mask=m_n[:, None] & m_k[None, :])
    if HAS_BIAS:
        if i_k == 0:
            tl.store(gb_ptr + i_split * d_out + o_n, acc_b, mask=m_n)
