"""Forward launchers: y and J (or y alone) from the forward kernels, without autograd."""

from __future__ import annotations

import torch
import triton

from ..network import NetworkSpec
from ..precision import matmul_precision
from . import launch, tuning
from .launch import (
    activation_constexprs,
    allocate,
    check_dtype,
    device_guard,
    interpret_bf16,
    launch_autotuned,
    traced,
    tuning_key,
)
from .plans import pad_width, planned_kind, slots

__all__ = ["mlp_forward", "network_constexprs", "layer_constexprs", "network_parameters", "layer_args"]


def mlp_forward(x2d: torch.Tensor, weights, biases, spec: NetworkSpec, *, jacobian: bool = True):
    """y (P, d_L) and J (P, d_L, k) (None without `jacobian`) from the forward kernels; no autograd."""
    launch.check_device(x2d)
    check_dtype(x2d.dtype)
    P = x2d.shape[0]
    d_out, k = weights[-1].shape[0], spec.jacobian_inputs
    y = allocate("y", x2d, P, d_out)
    J = allocate("J", x2d, P, d_out, k) if jacobian else None
    if P == 0:
        return y, J
    precision = matmul_precision(x2d.dtype)
    with device_guard(x2d):
        if planned_kind(x2d, weights, spec, jacobian) == "network":
            _run_network(x2d, weights, biases, spec, y, J, jacobian, precision)
        else:
            _run_layers(x2d, weights, biases, spec, y, J, jacobian, precision)
    return y, J


# ---- the whole-network plan ------------------------------------------------------------------------
def network_constexprs(weights, biases, spec: NetworkSpec, jacobian: bool, precision: str) -> dict:
    """The whole-network kernels' shape, activation and precision constexprs."""
    width = weights[0].shape[0]
    last = activation_constexprs(spec.activations[-1], "LAST")
    return {
        "IN": weights[0].shape[1],
        "NUM_TANGENTS": spec.jacobian_inputs,
        "WIDTH": width,
        "OUT": weights[-1].shape[0],
        **activation_constexprs(spec.activations[0], "ACT"),
        "LAST_ACT": last["LAST"],
        "LAST_PARAM": last["LAST_PARAM"],
        "LAST_THRESHOLD": last["LAST_THRESHOLD"],
        "HAS_BIAS": any(b is not None for b in biases),
        "JACOBIAN": jacobian,
        "PRECISION": precision,
        "SLOTS": slots(spec.jacobian_inputs, jacobian),
        "WIDTH_PAD": pad_width(width),
    }


def network_parameters(weights, biases) -> dict:
    """The whole-network kernels' parameter arguments: contiguous, hidden layers stacked, zero biases."""
    width = weights[0].shape[0]
    W0 = weights[0]

    def bias_or_zeros(b, n):
        return b.contiguous() if b is not None else W0.new_zeros(n)

    hidden_w = weights[1:-1]
    return dict(
        w_first_ptr=W0.contiguous(),
        bias_first_ptr=bias_or_zeros(biases[0], width),
        w_hidden_ptr=torch.stack(hidden_w).contiguous() if hidden_w else W0.new_empty(1, width, width),
        bias_hidden_ptr=torch.stack([bias_or_zeros(b, width) for b in biases[1:-1]])
        if hidden_w
        else W0.new_empty(1, width),
        w_last_ptr=weights[-1].contiguous(),
        bias_last_ptr=bias_or_zeros(biases[-1], weights[-1].shape[0]),
    )


def _run_network(x, weights, biases, spec, y, J, jacobian, precision):
    P = x.shape[0]
    constexprs = network_constexprs(weights, biases, spec, jacobian, precision)
    J_arg = J if J is not None else y  # not written without tangents
    args = dict(
        x_ptr=x,
        **network_parameters(weights, biases),
        y_ptr=y,
        j_ptr=J_arg,
        num_points=P,
        num_hidden=len(weights) - 2,
        points_bucket=tuning.points_bucket(P),
        stride_xp=x.stride(0),
        stride_xf=x.stride(1),
        stride_yp=y.stride(0),
        stride_yf=y.stride(1),
        stride_jp=J_arg.stride(0),
        stride_jo=J_arg.stride(1),
        stride_jk=J_arg.stride(2) if J is not None else 0,
        **constexprs,
        **interpret_bf16(x.dtype),
    )
    key = tuning_key(x.dtype, constexprs, depth=args["num_hidden"], bucket=args["points_bucket"])
    launch_autotuned("mlp_forward", lambda meta: (triton.cdiv(P, meta["BLOCK_M"]),), args, key, x.device, traced(x))


# ---- the per-layer plan ----------------------------------------------------------------------------
def layer_constexprs(act, k: int, first: bool, has_bias: bool, jacobian: bool, precision: str) -> dict:
    """`layer_forward_kernel`'s constexprs for one layer."""
    return {
        "NUM_TANGENTS": k,
        "FIRST": first,
        **activation_constexprs(act, "ACT"),
        "HAS_BIAS": has_bias,
        "JACOBIAN": jacobian,
        "PRECISION": precision,
        "SLOTS": slots(k, jacobian),
    }


def layer_args(a, a_strides, W, b, num_points: int, h_out, t_out, z_out=None) -> dict:
    """`layer_forward_kernel`'s runtime arguments. h_out = (tensor, point stride, feature stride),
    t_out = (tensor, point, tangent and feature strides), z_out = (tensor, point and slot strides)."""
    d_out, d_in = W.shape
    h, t = h_out[0], t_out[0]
    z = z_out if z_out is not None else (h, 0, 0)
    return dict(
        # the kernel reads the bias with unit stride (a column of a matrix is not): copy it then
        a_ptr=a,
        w_ptr=W,
        bias_ptr=b.contiguous() if b is not None else W,
        h_ptr=h,
        t_ptr=t,
        z_ptr=z[0],
        num_points=num_points,
        d_in=d_in,
        d_out=d_out,
        points_bucket=tuning.points_bucket(num_points),
        stride_ap=a_strides[0],
        stride_as=a_strides[1],
        stride_af=a_strides[2],
        stride_wn=W.stride(0),
        stride_wk=W.stride(1),
        stride_hp=h_out[1],
        stride_hf=h_out[2],
        stride_tp=t_out[1],
        stride_ts=t_out[2],
        stride_tf=t_out[3],
        stride_zp=z[1],
        stride_zs=z[2],
    )


def _run_layers(x, weights, biases, spec, y, J, jacobian, precision):
    P = x.shape[0]
    k, L = spec.jacobian_inputs, len(weights)
    rows = 1 + k if jacobian else 1
    a = x
    a_strides = (x.stride(0), 0, x.stride(1))
    for l, (W, b, act) in enumerate(zip(weights, biases, spec.activations)):
        d_out, d_in = W.shape
        if l == L - 1:
            h, t = y, (J if jacobian else y)
            h_strides = (y.stride(0), y.stride(1))
            t_strides = (J.stride(0), J.stride(2), J.stride(1)) if jacobian else (0, 0, 0)
        else:  # [h; T] as (P, 1+k, d_out) in the compute dtype
            buf = allocate(f"[h; T] of layer {l}", x, P, rows, d_out)
            h, t = buf, buf[:, 1:] if jacobian else buf
            h_strides = (buf.stride(0), buf.stride(2))
            t_strides = (buf.stride(0), buf.stride(1), buf.stride(2))
        constexprs = layer_constexprs(act, k, l == 0, b is not None, jacobian, precision)
        args = layer_args(a, a_strides, W, b, P, (h, *h_strides), (t, *t_strides)) | constexprs
        args |= {"STORE_Z": False, **interpret_bf16(x.dtype)}
        key = tuning_key(x.dtype, constexprs, d_in=d_in, d_out=d_out, bucket=args["points_bucket"])
        grid = lambda meta, d_out=d_out: (triton.cdiv(P, meta["BLOCK_M"]), triton.cdiv(d_out, meta["BLOCK_N"]))  # noqa: E731
        launch_autotuned("layer_forward", grid, args, key, x.device, traced(x))
        if l < L - 1:
            a, a_strides = buf, (buf.stride(0), buf.stride(1), buf.stride(2))
