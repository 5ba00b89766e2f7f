"""Reverse-mode launchers: y and J for fewer outputs than inputs (docs/design.md, section 9).

- whole network: one launch of `mlp_reverse_kernel` (plain chains; selected inputs and outputs).
- per layer: chunks of points go up with the per-layer backward's recompute (`layer_forward_kernel`
  without tangents, storing each layer's z) and come down with `layer_backward_kernel` in its
  ADJOINTS form, m rows per point. The adjoints reaching a0 (the first layer's input, and the skip
  layers') become J: straight from the first layer's kernel when a0 is x and nothing else reads it,
  else summed over those layers and, with an encoding, taken through its derivatives
  (`torch_engine.InputMap.jacobian`).

There is no reverse-mode backward of its own: `backward.mlp_backward` recomputes from x and needs
only dLoss/dJ, whichever way J was computed (with m < k its fused kernel seeds m tangents with
dLoss/dJ's rows).
"""

from __future__ import annotations

import torch
import triton

from ..network import NetworkSpec
from ..precision import matmul_precision
from . import launch, tuning
from .backward import LayerLaunches, propagate, recompute_layers
from .forward import LayerInputs, network_constexprs, network_parameters
from .launch import (
    allocate,
    check_dtype,
    device_arch,
    device_guard,
    interpret_bf16,
    run_kernel,
    sm_count,
    traced,
)
from .plans import adjoint_slots, planned_kind

__all__ = ["reverse_forward", "reverse_constexprs"]


def reverse_forward(x2d, weights, biases, spec: NetworkSpec, band_weights=None):
    """y (P, d_L) and J (P, m, k) in reverse mode; no autograd."""
    launch.check_device(x2d)
    check_dtype(x2d.dtype)
    P, d_out = x2d.shape[0], weights[-1].shape[0]
    if P == 0:
        return allocate("y", x2d, 0, d_out), allocate("J", x2d, 0, spec.jacobian_outputs(d_out), spec.jacobian_inputs)
    precision = matmul_precision(x2d.dtype)
    with device_guard(x2d):
        if planned_kind(x2d, weights, spec, True, "reverse") == "network":
            return _run_network(x2d, weights, biases, spec, precision)
        return _run_layers(x2d, weights, biases, spec, precision, band_weights)


def reverse_constexprs(weights, spec: NetworkSpec, precision: str, m: int, biases=None) -> dict:
    """`mlp_reverse_kernel`'s constexprs for m adjoint rows (J's selected outputs)."""
    constexprs = network_constexprs(weights, biases or [None] * len(weights), spec, False, precision)
    del constexprs["JACOBIAN"], constexprs["SLOTS"]
    return constexprs | {"ADJOINTS": m, "ADJ_SLOTS": adjoint_slots(m), "OUT_START": spec.output_start}


def _run_network(x, weights, biases, spec: NetworkSpec, precision: str):
    P, d_out = x.shape[0], weights[-1].shape[0]
    m = spec.jacobian_outputs(d_out)
    y = allocate("y", x, P, d_out)
    J = allocate("J", x, P, m, spec.jacobian_inputs)
    constexprs = reverse_constexprs(weights, spec, precision, m, biases)
    width_pad = constexprs["WIDTH_PAD"]
    config = tuning.reverse_config(constexprs["ADJ_SLOTS"], width_pad, precision, device_arch(x))
    block_m = config.kwargs["BLOCK_M"]
    num_programs = tuning.fused_backward_programs(triton.cdiv(P, block_m), sm_count(x.device.index or 0))
    num_hidden = len(weights) - 2
    # each program's slopes of the way up, one (BLOCK_M, WIDTH_PAD) tile per layer below the last
    slopes = allocate("reverse-mode slopes", x, num_programs, num_hidden + 1, block_m, width_pad, dtype=torch.float32)
    args = dict(
        x_ptr=x,
        **network_parameters(weights, biases),
        y_ptr=y,
        j_ptr=J,
        ws_ptr=slopes,
        num_points=P,
        num_hidden=num_hidden,
        num_programs=num_programs,
        input_start=spec.input_start,
        stride_xp=x.stride(0),
        stride_xf=x.stride(1),
        stride_yp=y.stride(0),
        stride_yf=y.stride(1),
        stride_jp=J.stride(0),
        stride_jo=J.stride(1),
        stride_jk=J.stride(2),
        **constexprs,
        **interpret_bf16(x.dtype),
    )
    run_kernel("mlp_reverse", (num_programs,), config, args, traced(x))
    return y, J


def _run_layers(x, weights, biases, spec: NetworkSpec, precision: str, band_weights=None):
    P, L, k = x.shape[0], len(weights), spec.jacobian_inputs
    rows = spec.output_rows(weights[-1].shape[0])
    m = rows.stop - rows.start
    inputs = LayerInputs(x, spec, band_weights)
    run = LayerLaunches(device_arch(x), precision, adjoint_slots(m), interpret_bf16(x.dtype), traced(x))
    # J straight from the first layer's kernel when a0 is x and only the first layer reads it
    direct = inputs.encoded_width == 0 and not spec.skips
    widths = [W.shape[0] for W in weights]
    per_point = sum(widths) * (x.element_size() + 4) + 2 * m * max(widths) * 4
    free = torch.cuda.mem_get_info(x.device)[0] if x.device.type == "cuda" else None
    chunk = tuning.layers_backward_chunk(P, per_point, free)
    last = spec.activations[-1]
    eye = torch.eye(m, device=x.device, dtype=torch.float32)
    J = allocate("J", x, P, m, k) if direct else None
    ys, Js = [], []  # per chunk (one, mostly): y is the last layer's recomputed output
    for start in range(0, P, chunk):
        xc = x[start : start + chunk]
        C = xc.shape[0]
        As, Zs = recompute_layers(xc, weights, biases, spec, inputs, False, run)
        ys.append(As[-1][:, 0])

        # dz of the last layer: slot r is the adjoint of output o + r, s'(z) at that output alone
        if last.is_identity:
            G = eye.expand(C, m, m)  # the same for every point: point stride 0
        else:
            _, slope, _ = last.evaluate(Zs[-1][:, 0, rows], value=False)
            G = torch.diag_embed(slope.float())
        g_a0 = None
        for l in range(L - 1, -1, -1):
            W_hidden, W_input = inputs.parts(l, weights[l])
            if l == L - 1:  # the selected outputs' rows only
                W_hidden = None if W_hidden is None else W_hidden[rows]
                W_input = None if W_input is None else W_input[rows]
            if W_input is not None:
                if direct:
                    J_chunk, W_x = J[start : start + C], W_input[:, spec.input_start : spec.input_start + k]
                    propagate(G, W_x, G, J_chunk, spec.activations[0], m, True, run, adjoints=True)
                else:
                    share = G @ W_input.float()  # (C, m, len(a0))
                    g_a0 = share if g_a0 is None else g_a0.add_(share)
            if W_hidden is not None:
                out = allocate(f"adjoints of layer {l - 1}", x, C, m, W_hidden.shape[1], dtype=torch.float32)
                propagate(G, W_hidden, Zs[l - 1], out, spec.activations[l - 1], m, False, run, adjoints=True)
                G = out
        if not direct:
            if inputs.encoded_width:
                _, _, d1, _ = inputs.map.evaluate(xc.float())
                g = g_a0[:, :, inputs.map.differentiated_columns].transpose(0, 1)
                Js.append(inputs.map.jacobian(g, d1).to(x.dtype))
            else:
                Js.append(g_a0[:, :, spec.input_start : spec.input_start + k].to(x.dtype))
    y = ys[0] if len(ys) == 1 else torch.cat(ys)
    if not direct:
        J = Js[0] if len(Js) == 1 else torch.cat(Js)
    return y, J
