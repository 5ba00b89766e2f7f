"""The op as `torch.library` operators, so that `torch.compile(fullgraph=True)` can trace models
containing a JacobianMLP, forward and training step alike.

    tritonjac::mlp_jacobian            (x, weights, biases, activations..., jacobian, backend) -> (y, J)
    tritonjac::mlp_jacobian_backward   (x, weights, biases, dy, dJ, ..., backend) -> (dx, dweights, dbiases)
    tritonjac::triton_mlp_jacobian     (x, weights, biases, activations..., jacobian) -> (y, J)
    tritonjac::triton_mlp_jacobian_backward

The first two are `custom_op`s, opaque to the compiler: the PyTorch engine (CPU and CUDA), and
the Triton kernels where the compiler cannot trace them (under the interpreter, or by choice with
TRITONJAC_OPAQUE_COMPILE=1). The `triton_` pair are `triton_op`s for CUDA tensors: the compiler
traces into them and sees each kernel launch (`wrap_triton`), so inductor schedules the kernels
in its own graph. Inductor lowers such kernels for GPUs only (DESIGN.md section 6), hence two
families.

Biases travel as a list of tensors (an empty tensor for a layer without bias; a list holding None
is not differentiable through aot_autograd). Each forward's autograd formula calls its backward
op, which recomputes the forward (nothing but the inputs is saved). The engine is resolved before
an op is entered (the compiler never sees a device-dependent choice). Eager calls do not go
through these ops: they use the autograd.Functions of `functional.py`, which keep intermediate
state where that is faster.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .activations import ACTIVATION_NAMES, Activation
from .reference import MLPSpec, _forward, backward_by_recompute

__all__ = [
    "mlp_jacobian_op",
    "mlp_jacobian_backward_op",
    "triton_library_ops",
    "spec_arguments",
    "bias_arguments",
]


def bias_arguments(biases, like: torch.Tensor) -> list[torch.Tensor]:
    """Biases for the ops: an empty tensor where a layer has none."""
    return [b if b is not None else like.new_empty(0) for b in biases]


def _biases(biases: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return [b if b.numel() else None for b in biases]


def spec_arguments(spec: MLPSpec) -> tuple[list[int], list[float], list[float], int]:
    """An MLPSpec as the op's primitive arguments (activations by their index in ACTIVATION_NAMES:
    custom ops take no list of strings)."""
    acts = spec.activations
    ids = [ACTIVATION_NAMES.index(a.name) for a in acts]
    return ids, [float(a.param) for a in acts], [float(a.threshold) for a in acts], spec.jacobian_inputs


def _spec(ids, params, thresholds, k) -> MLPSpec:
    acts = (Activation(ACTIVATION_NAMES[i], p, t) for i, p, t in zip(ids, params, thresholds))
    return MLPSpec(tuple(acts), k)


@torch.library.custom_op("tritonjac::mlp_jacobian", mutates_args=())
def mlp_jacobian_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    activation_ids: list[int],
    params: list[float],
    thresholds: list[float],
    k: int,
    jacobian: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _spec(activation_ids, params, thresholds, k)
    biases = _biases(biases)
    with torch.no_grad():
        if backend == "triton":
            from . import triton_ops

            y, J = triton_ops.mlp_forward(x, weights, biases, spec, jacobian=jacobian)
        else:  # the module never asks the PyTorch engine for y alone (it runs its nn.Sequential)
            y, J = _forward(x, weights, biases, spec, None)
    return y, J if jacobian else _no_jacobian(x)


@mlp_jacobian_op.register_fake
def _(x, weights, biases, activation_ids, params, thresholds, k, jacobian, backend):
    d_out = weights[-1].shape[0]
    return x.new_empty(x.shape[0], d_out), x.new_empty(x.shape[0], d_out, k) if jacobian else _no_jacobian(x)


def _no_jacobian(x: torch.Tensor) -> torch.Tensor:
    """J's place in the forward ops' outputs when it is not asked for: a 1-D empty tensor (a real J
    is 3-D), whose gradient tells the backward op that there is no loss on J."""
    return x.new_empty(0)


def _loss_on_jacobian(dJ: torch.Tensor) -> torch.Tensor | None:
    return dJ if dJ.dim() == 3 else None


@torch.library.custom_op("tritonjac::mlp_jacobian_backward", mutates_args=())
def mlp_jacobian_backward_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    dy: torch.Tensor,
    dJ: torch.Tensor,
    activation_ids: list[int],
    params: list[float],
    thresholds: list[float],
    k: int,
    backend: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    spec = _spec(activation_ids, params, thresholds, k)
    L = len(weights)
    biases = _biases(biases)
    has_bias = [b is not None for b in biases]
    if backend == "triton":
        return _triton_backward(x, weights, biases, dy, dJ, spec)
    dx, dW, db = backward_by_recompute(x, weights, biases, spec, dy, _loss_on_jacobian(dJ), True, [True] * L, has_bias)
    return dx, list(dW), bias_arguments(db, x)  # an empty gradient for an empty bias


@mlp_jacobian_backward_op.register_fake
def _(x, weights, biases, dy, dJ, activation_ids, params, thresholds, k, backend):
    return torch.empty_like(x), [torch.empty_like(W) for W in weights], [torch.empty_like(b) for b in biases]


def _triton_backward(x, weights, biases, dy, dJ, spec: MLPSpec):
    from . import triton_ops

    gJ = _loss_on_jacobian(dJ)  # without one, the backward needs no tangents: fused more often
    fused = triton_ops.fused_backward_available(x, weights, spec, gJ is not None)
    run = triton_ops.mlp_backward if fused else triton_ops.layers_backward
    dx, dW, db = run(x, weights, biases, spec, dy, gJ, True)
    return dx, list(dW), bias_arguments(db, x)  # an empty gradient for an empty bias


# ---- the Triton kernels, visible to the compiler ------------------------------------------------------
class TritonOps(NamedTuple):
    forward: torch.library.CustomOpDef
    backward: torch.library.CustomOpDef


_triton_ops: TritonOps | None = None


def triton_library_ops() -> TritonOps:
    """The `triton_op` pair, defined on first use: defining a `triton_op` imports triton and
    inductor (about a second), which `import tritonjac` should not pay. `triton_ops.py` calls this
    when it is imported, before anything can be traced, so every Triton path finds them defined."""
    global _triton_ops
    if _triton_ops is None:
        _triton_ops = _define_triton_ops()
    return _triton_ops


def _define_triton_ops() -> TritonOps:
    @torch.library.triton_op("tritonjac::triton_mlp_jacobian", mutates_args=())
    def forward(
        x: torch.Tensor,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor],
        activation_ids: list[int],
        params: list[float],
        thresholds: list[float],
        k: int,
        jacobian: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from . import triton_ops

        # the body is traced (fake tensors) and becomes the kernel launches in the compiled graph
        spec = _spec(activation_ids, params, thresholds, k)
        y, J = triton_ops.mlp_forward(x, weights, _biases(biases), spec, jacobian=jacobian)
        return y, J if jacobian else _no_jacobian(x)

    @torch.library.triton_op("tritonjac::triton_mlp_jacobian_backward", mutates_args=())
    def backward(
        x: torch.Tensor,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor],
        dy: torch.Tensor,
        dJ: torch.Tensor,
        activation_ids: list[int],
        params: list[float],
        thresholds: list[float],
        k: int,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        spec = _spec(activation_ids, params, thresholds, k)
        return _triton_backward(x, weights, _biases(biases), dy, dJ, spec)

    def autograd_formula(ctx, dy, dJ):
        dx, dW, db = backward(*_saved(ctx), dy, dJ, *ctx.spec_args)
        return dx, dW, db, None, None, None, None, None

    forward.register_autograd(autograd_formula, setup_context=_setup_context)
    return TritonOps(forward, backward)


# ---- autograd: each forward op differentiates through its backward op ----------------------------------
def _setup_context(ctx, inputs, output):
    x, weights, biases, activation_ids, params, thresholds, k, _jacobian, *backend = inputs
    ctx.save_for_backward(x, *weights, *biases)
    ctx.spec_args = (activation_ids, params, thresholds, k, *backend)


def _saved(ctx):
    x, *rest = ctx.saved_tensors
    L = len(rest) // 2
    return x, list(rest[:L]), list(rest[L:])


def _backward(ctx, dy, dJ):
    dx, dW, db = mlp_jacobian_backward_op(*_saved(ctx), dy, dJ, *ctx.spec_args)
    return dx, dW, db, None, None, None, None, None, None


mlp_jacobian_op.register_autograd(_backward, setup_context=_setup_context)
