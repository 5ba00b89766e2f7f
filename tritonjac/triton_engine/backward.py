"""Backward launchers: dLoss/dx and every weight and bias gradient from dLoss/dy and dLoss/dJ.

`mlp_backward` picks the fused whole-network kernel where it fits (`fused_backward_available`),
else the per-layer kernels. Both recompute the forward from x (nothing per layer is saved) and sum
their fp32 partial gradients in a fixed order: the same inputs give bit-identical gradients.
"""

from __future__ import annotations

import torch
import triton

from ..network import NetworkSpec
from ..precision import matmul_precision
from . import launch, tuning
from .forward import layer_args, layer_constexprs, network_constexprs, network_parameters
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
from .plans import fused_backward_available, slots

__all__ = ["mlp_backward", "fused_mlp_backward", "layers_backward"]


def mlp_backward(x2d, weights, biases, spec: NetworkSpec, gy, gJ, need_x: bool):
    """dLoss/dx (None unless `need_x`), the weight gradients and the bias gradients (None where a
    layer has no bias), in the parameters' dtypes. gy (P, d_L) or gJ (P, d_L, k) may be None."""
    fused = fused_backward_available(x2d, weights, spec, gJ is not None)
    run = fused_mlp_backward if fused else layers_backward
    return run(x2d, weights, biases, spec, gy, gJ, need_x)


def _fp32_sums_to(params, sums):
    return [None if p is None else g.to(p.dtype) for g, p in zip(sums, params)]


# ---- the fused backward of the whole-network plan --------------------------------------------------
def fused_mlp_backward(x2d, weights, biases, spec: NetworkSpec, gy, gJ, need_x: bool):
    """`mlp_backward` by the fused kernel (the caller checked `fused_backward_available`)."""
    launch.check_device(x2d)
    P, d_in = x2d.shape
    L, width, d_out = len(weights), weights[0].shape[0], weights[-1].shape[0]
    num_hidden = L - 2
    has_gj = gJ is not None
    precision = matmul_precision(x2d.dtype)
    constexprs = network_constexprs(weights, biases, spec, has_gj, precision)
    config = tuning.fused_backward_config(constexprs["SLOTS"], constexprs["WIDTH_PAD"], precision, device_arch(x2d))
    if config is None:
        raise ValueError("no fused-backward configuration fits these shapes (see fused_backward_available)")
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
    workspace = allocate("fused workspace", x2d, num_programs, *ws_shape, dtype=torch.float32)
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
def layers_backward(x2d, weights, biases, spec: NetworkSpec, gy, gJ, need_x: bool):
    """`mlp_backward` by the per-layer kernels (any widths, depths, activations): recompute a chunk's
    forward layer by layer keeping [h; T] and [z; U], then two kernels per layer (kernels/backward.py)."""
    launch.check_device(x2d)
    P = x2d.shape[0]
    L, k = len(weights), spec.jacobian_inputs
    jacobian = gJ is not None
    rows, num_slots = (1 + k, slots(k, True)) if jacobian else (1, 1)
    precision = matmul_precision(x2d.dtype)
    f32 = dict(device=x2d.device, dtype=torch.float32)
    grad_W = [torch.zeros(W.shape, **f32) for W in weights]
    grad_b = [None if b is None else torch.zeros(b.shape, **f32) for b in biases]
    gx = allocate("dLoss/dx", x2d, *x2d.shape) if need_x else None
    arch = device_arch(x2d)
    fwd_cfg = tuning.recompute_config(num_slots, arch)
    widths = [W.shape[0] for W in weights]
    per_point = rows * sum(widths) * (x2d.element_size() + 4) + 2 * rows * max(W.shape[1] for W in weights) * 4
    free = torch.cuda.mem_get_info(x2d.device)[0] if x2d.device.type == "cuda" else None
    chunk = tuning.layers_backward_chunk(P, per_point, free)
    is_traced = traced(x2d)
    bf16 = interpret_bf16(x2d.dtype)

    with device_guard(x2d):
        for start in range(0, P, chunk):
            xc = x2d[start : start + chunk]
            C = xc.shape[0]
            # forward again, keeping A_l = [h; T] (compute dtype) and Z_l = [z; U] (fp32)
            As, Zs = [], []
            a, a_strides = xc, (xc.stride(0), 0, xc.stride(1))
            for l, (W, b, act) in enumerate(zip(weights, biases, spec.activations)):
                d_out, d_in = W.shape
                A = allocate(f"recomputed [h; T] of layer {l}", x2d, C, rows, d_out)
                Z = allocate(f"recomputed [z; U] of layer {l}", x2d, C, rows, d_out, dtype=torch.float32)
                args = layer_args(
                    a,
                    a_strides,
                    W,
                    b,
                    C,
                    (A, A.stride(0), A.stride(2)),
                    (A[:, 1:] if jacobian else A, A.stride(0), A.stride(1), A.stride(2)),
                    (Z, Z.stride(0), Z.stride(1)),
                )
                args |= layer_constexprs(act, k, l == 0, b is not None, jacobian, precision)
                grid = (triton.cdiv(C, fwd_cfg.kwargs["BLOCK_M"]), triton.cdiv(d_out, fwd_cfg.kwargs["BLOCK_N"]))
                run_kernel("layer_forward", grid, fwd_cfg, args | {"STORE_Z": True, **bf16}, is_traced)
                As.append(A)
                Zs.append(Z)
                a, a_strides = A, (A.stride(0), A.stride(1), A.stride(2))

            # dLoss/d[z; U] of the last layer, from dLoss/d[y; J]
            G = torch.zeros(C, rows, weights[-1].shape[0], **f32)
            if gy is not None:
                G[:, 0] = gy[start : start + chunk]
            if jacobian:
                G[:, 1:] = gJ[start : start + chunk].transpose(1, 2)
            G = _last_activation_backward(spec.activations[-1], G, Zs[-1], jacobian)

            for l in range(L - 1, -1, -1):
                W = weights[l]
                d_out, d_in = W.shape
                # weight and bias gradients: G_Z^T A_{l-1}, split over the points, summed in order
                if l > 0:
                    A_prev, live_a = As[l - 1], rows
                    a_st = (A_prev.stride(0), A_prev.stride(1), A_prev.stride(2))
                else:  # A_0 = [x; E]: the x row here, the identity rows below
                    A_prev, live_a, a_st = xc, 1, (xc.stride(0), 0, xc.stride(1))
                slots_a = num_slots if live_a > 1 else 1
                propagate_cfg, wgrad_cfg = tuning.layer_backward_configs(arch, precision, num_slots, slots_a)
                splits, per_split = tuning.weight_grad_splits(C, wgrad_cfg.kwargs["BLOCK_P"])
                gw_part = allocate(f"weight-gradient splits of layer {l}", x2d, splits, *W.shape, dtype=torch.float32)
                gb_part = (
                    allocate(f"bias-gradient splits of layer {l}", x2d, splits, d_out, dtype=torch.float32)
                    if biases[l] is not None
                    else gw_part  # not written without a bias
                )
                grid = (
                    triton.cdiv(d_out, wgrad_cfg.kwargs["BLOCK_N"]),
                    triton.cdiv(d_in, wgrad_cfg.kwargs["BLOCK_K"]),
                    splits,
                )
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
                        HAS_BIAS=biases[l] is not None,
                        PRECISION=precision,
                        SLOTS=slots_a,
                        **bf16,
                    ),
                    is_traced,
                )
                grad_W[l] += gw_part.sum(0)
                if biases[l] is not None:
                    grad_b[l] += gb_part.sum(0)
                if l == 0 and jacobian:
                    grad_W[0][:, :k] += G[:, 1:].sum(0).t()
                # propagate: G_Z of the previous layer, or dLoss/dx after the first
                if l == 0 and not need_x:
                    break
                out = (
                    gx[start : start + chunk]
                    if l == 0
                    else allocate(f"dLoss/d[z; U] of layer {l - 1}", x2d, C, rows, d_in, dtype=torch.float32)
                )
                prev_act = spec.activations[l - 1] if l > 0 else spec.activations[0]
                z_prev = Zs[l - 1] if l > 0 else G
                grid = (
                    triton.cdiv(C, propagate_cfg.kwargs["BLOCK_M"]),
                    triton.cdiv(d_in, propagate_cfg.kwargs["BLOCK_K"]),
                )
                run_kernel(
                    "layer_backward",
                    grid,
                    propagate_cfg,
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
                        stride_zs=z_prev.stride(1),
                        stride_op=out.stride(0),
                        stride_os=out.stride(1) if l > 0 else 0,
                        stride_of=out.stride(-1),
                        LIVE_SLOTS=rows,
                        LAST_STEP=l == 0,
                        **activation_constexprs(prev_act, "ACT"),
                        PRECISION=precision,
                        SLOTS=num_slots,
                        **bf16,
                    ),
                    is_traced,
                )
                G = out
    return gx, _fp32_sums_to(weights, grad_W), _fp32_sums_to(biases, grad_b)


def _last_activation_backward(act, G, Z, jacobian: bool):
    """dLoss/d[z; U] from dLoss/d[s(z); s'(z) U] for the last layer (usually the identity), with the
    registry's PyTorch formulas."""
    if act.is_identity:
        return G
    _, slope, second = act.evaluate(Z[:, 0], value=False, curvature=jacobian)
    g_z = slope * G[:, 0]
    if jacobian and second is not None:
        g_z += second * (G[:, 1:] * Z[:, 1:]).sum(1)
    G[:, 1:] *= slope[:, None]
    G[:, 0] = g_z
    return G
