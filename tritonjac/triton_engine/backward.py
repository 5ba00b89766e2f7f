"""Backward launchers: dLoss/dx and every weight and bias gradient from dLoss/dy and dLoss/dJ.

`mlp_backward` picks the fused whole-network kernel where it fits (`plans.backward_plan`),
else the per-layer kernels. Both recompute the forward from x (nothing per layer is saved) and sum
their fp32 partial gradients in a fixed order: the same inputs give bit-identical gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .. import torch_engine
from ..network import NetworkSpec
from ..precision import layer_precision, matmul_precision
from ..torch_engine.second_order import SecondOrder
from . import launch, tuning
from .forward import (
    NO_SECOND_ORDER,
    LayerInputs,
    layer_args,
    layer_constexprs,
    layer_launches,
    network_constexprs,
    network_parameters,
    part_features,
)
from .launch import (
    activation_constexprs,
    allocate,
    device_arch,
    device_guard,
    interpret_bf16,
    run_kernel,
    sm_count,
    traced,
)
from .plans import backward_plan, second_order_constexprs, second_order_rows, seeds_tangents, slots

__all__ = ["mlp_backward", "fused_mlp_backward", "layers_backward", "LayerLaunches", "recompute_layers", "propagate"]


def mlp_backward(
    x2d, weights, biases, spec: NetworkSpec, gy, gJ, need_x: bool, band_weights=None, gS=None, hessian=False
):
    """dLoss/dx (None unless `need_x`), the weight gradients and the bias gradients (None where a
    layer has no bias), in the parameters' dtypes. gy (P, d_L) or gJ (P, m, k) may be None.
    Whichever mode computed J: with a loss on J of fewer rows than columns both plans seed m tangents
    with its rows, else they carry J's k columns (`plans.backward_plan`). gS (P, m, q): a loss on
    the second-order rows (the Laplacian, or with `hessian` H's upper triangle; `second_order.py`),
    taken back by the per-layer kernels."""
    if gS is not None:
        return layers_backward(x2d, weights, biases, spec, gy, gJ, need_x, band_weights, gS, hessian)
    kernels, seeded = backward_plan(x2d, weights, spec, gJ is not None)
    if kernels == "fused":
        return fused_mlp_backward(x2d, weights, biases, spec, gy, gJ, need_x, seeded=seeded)
    return layers_backward(x2d, weights, biases, spec, gy, gJ, need_x, band_weights)


def _fp32_sums_to(params, sums):
    return [None if p is None else g.to(p.dtype) for g, p in zip(sums, params)]


# ---- the fused backward of the whole-network plan --------------------------------------------------
def fused_mlp_backward(x2d, weights, biases, spec: NetworkSpec, gy, gJ, need_x: bool, seeded: bool = False):
    """`mlp_backward` by the fused kernel (the caller checked `plans.backward_plan`); `seeded`: m
    tangents seeded with gJ's rows."""
    launch.check_device(x2d)
    P, d_in = x2d.shape
    L, width, d_out = len(weights), weights[0].shape[0], weights[-1].shape[0]
    num_hidden = L - 2
    has_gj = gJ is not None
    precision = matmul_precision(x2d.dtype)
    constexprs = network_constexprs(weights, biases, spec, has_gj, precision)
    if seeded:  # the tangents are J's rows (d_out of them: a plain chain's J holds every output)
        constexprs |= {"NUM_TANGENTS": d_out, "SLOTS": slots(d_out, True)}
    config = tuning.fused_backward_config(constexprs["SLOTS"], constexprs["WIDTH_PAD"], precision, device_arch(x2d))
    if config is None:
        raise ValueError("no fused-backward configuration fits these shapes (see plans.backward_plan)")
    block_m = config.kwargs["BLOCK_M"]
    num_programs = tuning.fused_backward_programs(triton.cdiv(P, block_m), sm_count(x2d.device.index or 0))
    shapes = dict(
        gw_first_ptr=(width, d_in),
        gb_first_ptr=(width,),
        gw_hidden_ptr=(max(num_hidden, 1), width, width),
        gb_hidden_ptr=(max(num_hidden, 1), width),
        gw_last_ptr=(d_out, width),
        gb_last_ptr=(d_out,),
    )
    # one fp32 partial-sum slab per program, which the kernel adds into
    slabs = {
        name: allocate(f"fused {name[:-4]} slabs", x2d, num_programs, *shape, dtype=torch.float32, zeroed=True)
        for name, shape in shapes.items()
    }
    tile_rows = block_m * constexprs["SLOTS"]
    ws_shape = (num_hidden + 1, tile_rows, constexprs["WIDTH_PAD"])
    # no points, no launch: a workspace would never be written (the guard rows report that)
    workspace = allocate("fused workspace", x2d, num_programs, *ws_shape, dtype=torch.float32) if P else None
    gx = allocate("dLoss/dx", x2d, P, d_in) if need_x else None
    gx_arg = gx if gx is not None else x2d
    gy_arg = gy if gy is not None else x2d
    gj_arg = gJ if gJ is not None else x2d.view(P, 1, d_in)
    args = dict(
        x_ptr=x2d,
        **network_parameters(weights, biases),
        gy_ptr=gy_arg,
        gj_ptr=gj_arg,
        gx_ptr=gx_arg,
        **slabs,
        ws_ptr=workspace,
        num_points=P,
        num_hidden=num_hidden,
        num_programs=num_programs,
        stride_xp=x2d.stride(0),
        stride_xf=x2d.stride(1),
        stride_gyp=gy_arg.stride(0),
        stride_gyf=gy_arg.stride(1),
        stride_gjp=gj_arg.stride(0),
        stride_gjo=gj_arg.stride(1),
        stride_gjk=gj_arg.stride(2),
        stride_gxp=gx_arg.stride(0),
        stride_gxf=gx_arg.stride(1),
        **{k: v for k, v in constexprs.items() if k != "JACOBIAN"},
        HAS_GY=gy is not None,
        HAS_GJ=has_gj,
        NEED_X=need_x,
        SEEDED=seeded,
        SEED_INPUTS=spec.jacobian_inputs if seeded else 0,
        **interpret_bf16(x2d.dtype),
    )
    if P > 0:
        with device_guard(x2d):
            run_kernel("mlp_backward", (num_programs,), config, args, traced(x2d))
    sums = {name: t.sum(0) for name, t in slabs.items()}  # one fixed-order sum: deterministic
    grad_W = [sums["gw_first_ptr"], *sums["gw_hidden_ptr"][:num_hidden], sums["gw_last_ptr"]]
    grad_b = [sums["gb_first_ptr"], *sums["gb_hidden_ptr"][:num_hidden], sums["gb_last_ptr"]]
    return gx, _fp32_sums_to(weights, grad_W), _fp32_sums_to(biases, grad_b)


# ---- the per-layer backward ------------------------------------------------------------------------
def layers_backward(
    x2d, weights, biases, spec: NetworkSpec, gy, gJ, need_x: bool, band_weights=None, gS=None, hessian=False
):
    """`mlp_backward` by the per-layer kernels (any widths, depths, activations, skips and
    encodings): recompute a chunk's forward layer by layer keeping [h; T] and [z; U], then two
    kernels per layer (kernels/backward.py) for the part of its weight that multiplies the previous
    layer's output. The part that multiplies a0 (the first layer's, and a skip layer's) is x's
    columns through the same weight-gradient kernel, or with an encoding a few small matmuls on its
    features (`torch_engine.InputMap`), which also carries dLoss/da0 back to x. The tangents are J's
    k columns, or with m < k m directions seeded with dLoss/dJ's rows (docs/design.md section 9).
    With gS (a loss on the second-order rows, (P, m, q)) the rows are [h; T; Q]: the k unit tangents
    and the Laplacian row, or with `hessian` H's k (k + 1) / 2 rows, after them, whose adjoints go
    back through the third derivative (docs/design.md section 11)."""
    launch.check_device(x2d)
    P = x2d.shape[0]
    L, k = len(weights), spec.jacobian_inputs
    second = ("hessian" if hessian else "laplacian") if gS is not None else ""
    jacobian = gJ is not None or bool(second)  # the tangent rows are carried
    d_out_last = weights[-1].shape[0]
    selected = spec.output_rows(d_out_last)
    # with m < k the tangents are J's m rows seeded with dLoss/dJ's rows, else J's k columns
    seeded = gJ is not None and not second and seeds_tangents(spec, d_out_last)
    tangents = selected.stop - selected.start if seeded else k
    derivative_rows = tangents + (second_order_rows(second, k) if second else 0)  # tangents, then second order
    rows, num_slots = (1 + derivative_rows, slots(derivative_rows, True)) if jacobian else (1, 1)
    precision = matmul_precision(x2d.dtype)
    f32 = dict(device=x2d.device, dtype=torch.float32)
    grad_W = [torch.zeros(W.shape, **f32) for W in weights]
    grad_b = [None if b is None else torch.zeros(b.shape, **f32) for b in biases]
    gx = allocate("dLoss/dx", x2d, *x2d.shape) if need_x else None
    arch = device_arch(x2d)
    widths = [W.shape[0] for W in weights]
    per_point = rows * sum(widths) * (x2d.element_size() + 4) + 2 * rows * max(W.shape[1] for W in weights) * 4
    free = torch.cuda.mem_get_info(x2d.device)[0] if x2d.device.type == "cuda" else None
    chunk = tuning.layers_backward_chunk(P, per_point, free)
    is_traced = traced(x2d)
    bf16 = interpret_bf16(x2d.dtype)
    inputs = LayerInputs(x2d, spec, band_weights)
    run = LayerLaunches(arch, precision, num_slots, bf16, is_traced, second, k if second else 0)
    encoded = inputs.encoded_width > 0
    # x's gradient straight from the first layer's propagation kernel when a0 is x and nothing
    # else reads it; otherwise dLoss/da0 is summed over the layers that read a0, then taken to x
    direct_gx = not encoded and not spec.skips

    with device_guard(x2d):
        for start in range(0, P, chunk):
            xc = x2d[start : start + chunk]
            C = xc.shape[0]
            gJc = gJ[start : start + chunk] if gJ is not None else None
            seeds = gJc if seeded else None
            As, Zs = recompute_layers(xc, weights, biases, spec, inputs, jacobian, run, seeds)

            # dLoss/d[z; U] of the last layer, from dLoss/d[y; J]
            G = torch.zeros(C, rows, d_out_last, **f32)
            if gy is not None:
                G[:, 0] = gy[start : start + chunk]
            if seeded:  # the loss on the seeded tangents: tangent r of selected output r
                r = torch.arange(tangents, device=x2d.device)
                G[:, 1 + r, selected.start + r] = 1.0
            elif gJc is not None:
                G[:, 1 : 1 + k, selected] = gJc.transpose(1, 2)
            if second:
                G[:, 1 + k :, selected] = gS[start : start + chunk].transpose(1, 2)
            G = _last_activation_backward(spec.activations[-1], G, Zs[-1], jacobian, second, k)

            a0 = D = d1 = d2 = V = seed_a0 = None
            if encoded:  # the features and their derivatives, in fp32 as the kernels compute them
                a0, D, d1, d2 = inputs.map.evaluate(xc.float(), second=(need_x and jacobian) or bool(second))
            # the encoded features' second-order rows: coordinate j's f'' in row curvature_rows[j]
            curvature_rows = _curvature_rows(second, k) if encoded and second else []
            if seeded:  # the seeds as directions (tangents, C, k), and a0's tangents along them
                V = gJc.float().transpose(0, 1)
                seed_a0 = inputs.map.seed_tangent(V, d1) if encoded else None
            g_a0 = g_D = g_T = g_curved = None
            for l in range(L - 1, -1, -1):
                W, scale = weights[l], spec.layer_scale(l)
                W_hidden, W_input = inputs.parts(l, W)
                hidden_cols, input_cols = spec.layer_columns(l, W.shape[1], x2d.shape[1])
                # the part of W that multiplies the previous layer's [h; T]: weight gradient, then propagation
                if W_hidden is not None:
                    gw = _weight_grad(G, As[l - 1], rows, biases[l] is not None, l, x2d, run)
                    grad_W[l][:, hidden_cols] += gw[0] if scale == 1.0 else scale * gw[0]
                    if gw[1] is not None:
                        grad_b[l] += gw[1]
                # the part that multiplies a0
                if W_input is not None:
                    if encoded:
                        g_values = G[:, 0]
                        grad_W[l][:, input_cols].addmm_(g_values.t(), a0, alpha=scale)
                        if seeded:  # the encoded features' tangents along the seeds, (tangents, C, features)
                            gU = G[:, 1:].transpose(0, 1)
                            width = inputs.encoded_width
                            g_seeded = torch.einsum("rpn,rpf->nf", gU, seed_a0)
                            grad_W[l][:, input_cols][:, :width].add_(g_seeded, alpha=scale)
                        elif jacobian:
                            gU = G[:, 1 : 1 + k].transpose(0, 1)
                            g_input = grad_W[l][:, input_cols]
                            partial = torch.zeros_like(g_input)
                            inputs.map.add_weight_grad(partial, gU, D)
                            for j, row in enumerate(curvature_rows):  # a0's second-order rows: f''
                                cols = inputs.map.columns_of(j)
                                partial[:, cols] += G[:, row].t() @ d2[:, cols]
                            g_input.add_(partial, alpha=scale)
                        if biases[l] is not None and W_hidden is None:
                            grad_b[l] += G[:, 0].sum(0)
                    else:  # a0 = x: the weight-gradient kernel on x (value rows), the tangent rows here
                        gw = _weight_grad(G, xc, 1, biases[l] is not None and W_hidden is None, l, x2d, run)
                        grad_W[l][:, input_cols] += gw[0] if scale == 1.0 else scale * gw[0]
                        if gw[1] is not None:
                            grad_b[l] += gw[1]
                        first = input_cols.start + spec.input_start
                        if seeded:  # the tangents along the seeds: dLoss/dJ's rows in x's columns
                            g_seeded = torch.einsum("prn,rpj->nj", G[:, 1:], V)
                            grad_W[l][:, first : first + k] += scale * g_seeded
                        elif jacobian:  # unit vectors (a0's Laplacian row is zero)
                            grad_W[l][:, first : first + k] += scale * G[:, 1 : 1 + k].sum(0).t()
                # propagate: to the previous layer's dLoss/d[z; U], and a0's share
                if W_hidden is not None:
                    d_prev = W_hidden.shape[1]
                    out = allocate(f"dLoss/d[z; U] of layer {l - 1}", x2d, C, rows, d_prev, dtype=torch.float32)
                    propagate(G, W_hidden, Zs[l - 1], out, spec.activations[l - 1], rows, False, run)
                if W_input is not None and need_x:
                    if direct_gx:
                        propagate(G, W_input, G, gx[start : start + chunk], spec.activations[0], rows, True, run)
                    else:
                        Wi = W_input.float()
                        g = G[:, 0] @ Wi
                        g_a0 = g if g_a0 is None else g_a0.add_(g)
                        if encoded and seeded:  # dLoss/d(the encoded features' seeded tangents)
                            g = G[:, 1:].transpose(0, 1) @ Wi[:, : inputs.encoded_width]
                            g_T = g if g_T is None else g_T.add_(g)
                        elif encoded and jacobian:
                            g = inputs.map.tangent_grad(G[:, 1 : 1 + k].transpose(0, 1), inputs.map.tangent_weight(Wi))
                            g_D = g if g_D is None else g_D.add_(g)
                            if curvature_rows:  # dLoss/d(the encoded features' second-order rows)
                                g_curved = torch.zeros_like(d2) if g_curved is None else g_curved
                                for j, row in enumerate(curvature_rows):
                                    cols = inputs.map.columns_of(j)
                                    g_curved[:, cols] += G[:, row] @ Wi[:, cols]
                if W_hidden is not None:
                    G = out
            if need_x and not direct_gx:
                if encoded:
                    g_x = inputs.map.input_grad(xc.float(), g_a0, g_D, d1, d2)
                    if g_T is not None:  # the seeded tangents depend on x through the encoding's derivatives
                        inputs.map.add_seed_input_grad(g_x, g_T, V, d2)
                    if g_curved is not None:  # the second-order rows (f'') depend on x through f'''
                        d3 = inputs.map.third_derivative(xc.float())
                        g_x[:, :k].index_add_(1, inputs.map.coordinate, g_curved * d3)
                    gx[start : start + chunk] = g_x
                else:
                    gx[start : start + chunk] = g_a0
    return gx, _fp32_sums_to(weights, grad_W), _fp32_sums_to(biases, grad_b)


@dataclass(frozen=True)
class LayerLaunches:
    """What every per-layer launch of one call shares (the backward's, and reverse mode's forward)."""

    arch: int
    precision: str
    num_slots: int  # stacked rows per point in the propagation (adjoint rows in reverse mode)
    bf16: dict  # interpret_bf16's argument
    is_traced: bool
    second: str = ""  # "laplacian" or "hessian": the rows' second-order rows (`layers_backward` with gS)
    num_tangents: int = 0  # k with `second` (the propagation kernel's NUM_TANGENTS), else 0


def recompute_layers(xc, weights, biases, spec, inputs, jacobian, run: LayerLaunches, seeds=None):
    """The forward of a chunk again, keeping A_l = [h; T] (compute dtype) and Z_l = [z; U] (fp32).
    The tangents are J's k columns, or with `seeds` (C, m, k) m directions in x (dLoss/dJ's rows);
    with `run.second` the second-order rows follow them."""
    num_tangents = spec.jacobian_inputs if seeds is None else seeds.shape[1]
    second_rows = second_order_rows(run.second, num_tangents) if run.second else 0
    rows = 1 + num_tangents + second_rows if jacobian else 1
    C = xc.shape[0]
    As, Zs = [], []
    a, a_strides = None, (0, 0, 0)
    for l, (W, b, act) in enumerate(zip(weights, biases, spec.activations)):
        d_out = W.shape[0]
        W_hidden, W_input = inputs.parts(l, W)
        launches = layer_launches(l, spec, jacobian, d_out)
        partial = len(launches) > 1  # J holds some outputs: the others' tangent rows stay zero
        A = allocate(f"recomputed [h; T] of layer {l}", xc, C, rows, d_out, zeroed=partial)
        Z = allocate(f"recomputed [z; U] of layer {l}", xc, C, rows, d_out, dtype=torch.float32, zeroed=partial)
        for out_rows, tangents in launches:
            Av, Zv = A[:, :, out_rows], Z[:, :, out_rows]
            Wh = None if W_hidden is None else W_hidden[out_rows]
            Wi = None if W_input is None else W_input[out_rows]
            bias = None if b is None else b[out_rows]
            args = layer_args(
                a,
                a_strides,
                Wh,
                bias,
                C,
                Av.shape[2],
                (Av, A.stride(0), A.stride(2)),
                (Av[:, 1:] if tangents else Av, A.stride(0), A.stride(1), A.stride(2)),
                (Zv, Z.stride(0), Z.stride(1)),
            )
            precision = layer_precision(run.precision, *part_features(Wh, Wi))
            constexprs = layer_constexprs(
                act,
                num_tangents,
                Wh is not None,
                Wi is not None,
                inputs.encoded_width > 0,
                b is not None,
                tangents,
                precision,
            )
            if run.second:  # in the configuration's key only then, as in the forward
                constexprs |= second_order_constexprs(run.second, num_tangents)
            args |= inputs.args(xc, Wi, seeds) | constexprs
            cfg = tuning.recompute_config(constexprs, run.arch)
            grid = (triton.cdiv(C, cfg.kwargs["BLOCK_M"]), triton.cdiv(Av.shape[2], cfg.kwargs["BLOCK_N"]))
            recompute = NO_SECOND_ORDER | args | {"STORE_Z": True, **run.bf16}
            run_kernel("layer_forward", grid, cfg, recompute, run.is_traced)
        As.append(A)
        Zs.append(Z)
        a, a_strides = A, (A.stride(0), A.stride(1), A.stride(2))
    return As, Zs


def _weight_grad(G, A_prev, live_a, has_bias, l, like, run: LayerLaunches):
    """(G_Z^T A_prev summed over the points and live slots, the bias gradient or None): fp32 partial
    sums over splits of the points, summed in a fixed order. A_prev: (P, slots, d_in), or x (P, d_in)."""
    C, d_out, d_in = G.shape[0], G.shape[2], A_prev.shape[-1]
    if A_prev.dim() == 3:
        a_st = (A_prev.stride(0), A_prev.stride(1), A_prev.stride(2))
    else:
        a_st = (A_prev.stride(0), 0, A_prev.stride(1))
    slots_a = run.num_slots if live_a > 1 else 1
    precision = layer_precision(run.precision, d_in, d_out)
    _, wgrad_cfg = tuning.layer_backward_configs(run.arch, precision, run.num_slots, slots_a)
    splits, per_split = tuning.weight_grad_splits(C, wgrad_cfg.kwargs["BLOCK_P"])
    gw_part = allocate(f"weight-gradient splits of layer {l}", like, splits, d_out, d_in, dtype=torch.float32)
    gb_part = (
        allocate(f"bias-gradient splits of layer {l}", like, splits, d_out, dtype=torch.float32)
        if has_bias
        else gw_part  # not written without a bias
    )
    grid = (triton.cdiv(d_out, wgrad_cfg.kwargs["BLOCK_N"]), triton.cdiv(d_in, wgrad_cfg.kwargs["BLOCK_K"]), splits)
    run_kernel(
        "layer_weight_grad",
        grid,
        wgrad_cfg,
        dict(
            gz_ptr=G,
            a_ptr=A_prev,
            gw_ptr=gw_part,
            gb_ptr=gb_part,
            num_points=C,
            d_in=d_in,
            d_out=d_out,
            points_per_split=per_split,
            stride_gp=G.stride(0),
            stride_gs=G.stride(1),
            stride_ap=a_st[0],
            stride_as=a_st[1],
            stride_af=a_st[2],
            LIVE_SLOTS_A=live_a,
            HAS_BIAS=has_bias,
            PRECISION=precision,
            SLOTS=slots_a,
            **run.bf16,
        ),
        run.is_traced,
    )
    return gw_part.sum(0), (gb_part.sum(0) if has_bias else None)


def propagate(G, W, z_prev, out, prev_act, rows, last_step, run: LayerLaunches, adjoints: bool = False):
    """out = G_Z W, then the previous layer's activation backward with its Z (or, with last_step,
    the value row alone: dLoss/dx of a first layer whose input is x). With `adjoints` (reverse
    mode's forward) the rows are J's adjoints: each times s'(z), z_prev holding z alone, and
    last_step writes every row."""
    C, d_out, d_in = G.shape[0], W.shape[0], W.shape[1]
    precision = layer_precision(run.precision, d_in, d_out)
    cfg, _ = tuning.layer_backward_configs(run.arch, precision, run.num_slots)
    grid = (triton.cdiv(C, cfg.kwargs["BLOCK_M"]), triton.cdiv(d_in, cfg.kwargs["BLOCK_K"]))
    run_kernel(
        "layer_backward",
        grid,
        cfg,
        dict(
            gz_ptr=G,
            w_ptr=W,
            z_prev_ptr=z_prev,
            out_ptr=out,
            num_points=C,
            d_in=d_in,
            d_out=d_out,
            stride_gp=G.stride(0),
            stride_gs=G.stride(1),
            stride_wn=W.stride(0),
            stride_wk=W.stride(1),
            stride_zp=z_prev.stride(0),
            stride_zs=0 if adjoints else z_prev.stride(1),
            stride_op=out.stride(0),
            stride_os=0 if last_step and not adjoints else out.stride(1),
            stride_of=out.stride(-1),
            LIVE_SLOTS=rows,
            LAST_STEP=last_step,
            **activation_constexprs(prev_act, "ACT"),
            PRECISION=precision,
            SLOTS=run.num_slots,
            ADJOINTS=adjoints,
            LAPLACIAN=run.second == "laplacian" and not adjoints,
            HESSIAN=run.second == "hessian" and not adjoints,
            NUM_TANGENTS=run.num_tangents,
            **run.bf16,
        ),
        run.is_traced,
    )


def _curvature_rows(second: str, k: int) -> list[int]:
    """The row of [h; T; Q] holding each coordinate j's d2/dx_j^2: the Laplacian's one row for all,
    or the Hessian's diagonal row (j, j)."""
    if second == "hessian":
        return [1 + k + r for r in SecondOrder(k, True, False).diagonal_rows()]
    return [1 + k] * k


def _last_activation_backward(act, G, Z, jacobian: bool, second: str = "", k: int = 0):
    """dLoss/d[z; U] from dLoss/d[s(z); s'(z) U] for the last layer (usually the identity), with the
    registry's PyTorch formulas (the PyTorch engine's with `second` rows after k tangents)."""
    if act.is_identity:
        return G
    if second:
        order = SecondOrder(k, second == "hessian", second == "laplacian")
        derivatives = torch_engine.second_order.activation_derivatives(act, Z[:, 0])
        D, GD = Z[:, 1:].transpose(0, 1), G[:, 1:].transpose(0, 1)
        stacked, _, _ = torch_engine.second_order.through_activation(derivatives, D, G[:, 0], GD, slice(None), order)
        return stacked.transpose(0, 1)
    _, slope, second = act.evaluate(Z[:, 0], value=False, curvature=jacobian)
    g_z = slope * G[:, 0]
    if jacobian and second is not None:
        g_z += second * (G[:, 1:] * Z[:, 1:]).sum(1)
    G[:, 1:] *= slope[:, None]
    G[:, 0] = g_z
    return G
