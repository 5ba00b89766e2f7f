"""The op: `(y, J) = mlp_jacobian(x, weights, biases, activations)`, input checks and backend dispatch."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .activations import as_activation
from .library import bias_arguments, mlp_jacobian_op, spec_arguments, triton_library_ops
from .reference import MLPSpec, mlp_jacobian_reference, refuse_double_backward

__all__ = ["mlp_jacobian", "BACKENDS", "SUPPORTED_DTYPES"]

BACKENDS = ("auto", "torch", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # the PyTorch engine's
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, not {backend!r}")
    return backend


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"auto": the Triton kernels for CUDA tensors they support, the PyTorch engine otherwise."""
    check_backend(backend)
    if backend == "auto":
        backend = "triton" if x.device.type == "cuda" and x.dtype in TRITON_DTYPES else "torch"
    if backend == "triton":
        from . import triton_ops  # imports triton: only when the kernels are asked for

        triton_ops.check_device(x)
        triton_ops.check_dtype(x.dtype)
    return backend


def make_spec(activations: Sequence, num_layers: int, in_features: int, jacobian_inputs) -> MLPSpec:
    acts = tuple(as_activation(a) for a in activations)
    if len(acts) != num_layers:
        raise ValueError(f"got {len(acts)} activations for {num_layers} layers; give one per layer (None for identity)")
    k = in_features if jacobian_inputs is None else jacobian_inputs
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= in_features:
        raise ValueError(f"jacobian_inputs must be an int from 1 to in_features={in_features}, not {jacobian_inputs!r}")
    return MLPSpec(acts, k)


def check_tensors(x, weights, biases):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, not {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; tritonjac supports float32, float64, bfloat16 and float16 inputs")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension, its last being the input features")
    if len(weights) == 0:
        raise ValueError("the MLP needs at least one layer")
    if len(biases) != len(weights):
        raise ValueError(f"got {len(biases)} biases for {len(weights)} layers; use None for a layer without bias")
    width = x.shape[-1]
    for l, (W, b) in enumerate(zip(weights, biases)):
        for name, t in (("weight", W), ("bias", b)):
            if t is None:
                continue
            if t.dtype != x.dtype:
                raise TypeError(
                    f"layer {l} {name} has dtype {t.dtype} but x has dtype {x.dtype}; "
                    "convert one of them (e.g. module.to(x.dtype))"
                )
            if t.device != x.device:
                raise RuntimeError(f"layer {l} {name} is on {t.device} but x is on {x.device}")
        if W.dim() != 2:
            raise ValueError(f"layer {l} weight must be 2-D (out, in), got shape {tuple(W.shape)}")
        if W.shape[1] != width:
            what = f"x has {width} features in its last dimension" if l == 0 else f"layer {l - 1} has {width} outputs"
            raise ValueError(f"{what} but layer {l} expects {W.shape[1]} inputs (x.shape = {tuple(x.shape)})")
        if b is not None and tuple(b.shape) != (W.shape[0],):
            raise ValueError(f"layer {l} bias has shape {tuple(b.shape)}, expected ({W.shape[0]},)")
        width = W.shape[0]


def mlp_jacobian(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None,
    activations: Sequence,
    *,
    jacobian_inputs: int | None = None,
    backend: str = "auto",
):
    """Outputs and per-point Jacobians of a point-wise MLP.

    Layer l computes h_l = s_l(W_l h_{l-1} + b_l), with `weights[l]` of shape (out, in) as in
    `nn.Linear` and `activations[l]` a name, a torch activation module or None (identity).
    x (..., in) gives y (..., out) and J (..., out, k) with J[..., i, j] = d y_i / d x_j for the
    first k = `jacobian_inputs` input features (all by default). Both are differentiable with
    respect to x, the weights and the biases.
    """
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    check_tensors(x, weights, biases)
    spec = make_spec(activations, len(weights), x.shape[-1], jacobian_inputs)
    return apply_spec(x, weights, biases, spec, backend)


def apply_spec(x, weights, biases, spec: MLPSpec, backend: str, jacobian: bool = True):
    """`mlp_jacobian` after validation: flatten the leading dimensions, run the engine, restore them.

    Returns (y, J), or (y, None) without `jacobian` (Triton backend only: the PyTorch engine's
    forward without tangents is the module's own nn.Sequential forward).
    """
    lead, d_in = x.shape[:-1], x.shape[-1]
    d_out = weights[-1].shape[0]
    x2d = x.reshape(-1, d_in)
    engine = resolve_backend(backend, x)
    half = _autocast_dtype(x)
    if half is not None:  # what a built-in layer does under autocast: compute and return in half
        x2d = x2d.to(half)
        weights = [w.to(half) for w in weights]
        biases = [None if b is None else b.to(half) for b in biases]
    if torch.compiler.is_compiling():  # under torch.compile: the torch.library ops (library.py)
        args = (x2d, weights, bias_arguments(biases, x2d), *spec_arguments(spec), jacobian)
        if compiler_sees_kernels(engine, x2d):  # defined when resolve_backend imported triton_ops
            y, J = triton_library_ops().forward(*args)
        else:
            y, J = mlp_jacobian_op(*args, engine)
    elif engine == "triton":
        y, J = _triton_mlp(x2d, weights, biases, spec, jacobian)
    else:
        y, J = mlp_jacobian_reference(x2d, weights, biases, spec)
    y = y.view(*lead, d_out)
    if not jacobian:
        return y, None
    return y, J.view(*lead, d_out, spec.jacobian_inputs)


def compiler_sees_kernels(engine: str, x: torch.Tensor) -> bool:
    """Whether torch.compile traces into the Triton kernels (the `triton_op`s) rather than calling
    them as an opaque op: on CUDA, unless TRITONJAC_OPAQUE_COMPILE=1 (inductor lowers Triton
    kernels for GPUs only; the interpreter's kernels cannot be traced)."""
    return engine == "triton" and x.device.type == "cuda" and os.environ.get("TRITONJAC_OPAQUE_COMPILE", "0") == "0"


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The half dtype autocast asks for on x's device, or None (autocast off, or x not float32)."""
    kind = x.device.type
    if x.dtype != torch.float32 or not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _triton_mlp(x2d, weights, biases, spec: MLPSpec, jacobian: bool):
    from . import triton_ops

    params = [*weights, *biases]
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2d, *params))
    if not tracked:
        return triton_ops.mlp_forward(x2d, weights, biases, spec, jacobian=jacobian)
    out = _TritonMLP.apply(spec, jacobian, x2d, *params)
    return out if jacobian else (out, None)


class _TritonMLP(torch.autograd.Function):
    """The fused Triton forward and backward.

    Saves only x and the parameters: the backward recomputes the forward (DESIGN.md section 2), in
    one fused kernel for the whole-network plan, layer by layer otherwise.
    """

    @staticmethod
    def forward(ctx, spec: MLPSpec, jacobian: bool, x2d, *params):
        from . import triton_ops

        L = len(spec.activations)
        weights, biases = list(params[:L]), list(params[L:])
        y, J = triton_ops.mlp_forward(x2d, weights, biases, spec, jacobian=jacobian)
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x2d, *weights, *(b for b in biases if b is not None))
        if J is None:
            return y
        return y, J

    @staticmethod
    def backward(ctx, gy, gJ=None):
        refuse_double_backward()
        from . import triton_ops

        spec = ctx.spec
        L = len(spec.activations)
        x2d, *rest = ctx.saved_tensors
        weights, present = rest[:L], iter(rest[L:])
        biases = [next(present) if has else None for has in ctx.has_bias]
        needs = ctx.needs_input_grad  # (spec, jacobian, x, W_1..W_L, b_1..b_L)
        need_W, need_b = needs[3 : 3 + L], [h and n for h, n in zip(ctx.has_bias, needs[3 + L :])]
        if gy is None and gJ is None:
            return (None,) * len(needs)
        # the whole-network fused backward where it fits (without a loss on J it needs no tangents,
        # which fits more often), else the per-layer kernels
        fused = triton_ops.fused_backward_available(x2d, weights, spec, gJ is not None)
        run = triton_ops.mlp_backward if fused else triton_ops.layers_backward
        gx, grad_W, grad_b = run(x2d, weights, biases, spec, gy, gJ, needs[2])
        grad_W = [g if need else None for g, need in zip(grad_W, need_W)]
        grad_b = [g if need else None for g, need in zip(grad_b, need_b)]
        return (None, None, gx, *grad_W, *grad_b)
