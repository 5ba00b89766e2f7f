"""`mlp_jacobian(x, weights, biases, activations)`: input checks, backend choice and dispatch.

Eager calls go to an engine's differentiable entry (`torch_engine.mlp_jacobian` or
`triton_engine.mlp_jacobian`); calls under `torch.compile` go to the `torch.library` operators
(`tritonjac.ops`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import torch

from . import torch_engine
from .encoding import PositionalEncoding
from .network import TRITON_DTYPES, NetworkSpec, check_backend, check_input, check_tensors, make_spec
from .ops.common import band_weights_argument, bias_arguments
from .ops.opaque import mlp_jacobian_op

__all__ = [
    "mlp_jacobian",
    "apply_spec",
    "apply_second_order",
    "second_order_plan",
    "resolve_backend",
    "choose_mode",
    "plan_call",
    "CallPlan",
    "compiler_sees_kernels",
]


def mlp_jacobian(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None,
    activations: Sequence,
    *,
    jacobian_inputs: int | slice | None = None,
    jacobian_outputs: int | slice | None = None,
    encoding: PositionalEncoding | None = None,
    skips: Sequence[int] = (),
    skip_scale: float = 1.0,
    skip_input_first: bool = False,
    mode: str = "auto",
    backend: str = "auto",
    hessian: bool = False,
    laplacian: bool = False,
):
    """Outputs and per-point Jacobians of a point-wise MLP, the functional form of `JacobianMLP`.

    Layer l computes h_l = s_l(W_l a_l + b_l) with a_0 = x (or its encoding, see below) and
    a_l = h_{l-1}, or cat([h_{l-1}, a_0]) * skip_scale for the layers in `skips`.

    Args:
        x: points, (..., in_features), any number of leading dimensions (including none); float32,
            float64, bfloat16 or float16.
        weights: one tensor per layer, (out, in) as in `nn.Linear`, in x's dtype and on its device.
        biases: one tensor (out,) or None per layer, or None for no biases at all.
        activations: one per layer: a name, a torch activation module or None (identity).
        jacobian_inputs: the inputs J differentiates: None (all), an int k (the first k) or a
            slice of contiguous indices (`slice(-3, None)`: xyz after a latent code).
        jacobian_outputs: the outputs J holds: None (all), an int m (the first m) or a slice; the
            tangents of the others are not computed.
        encoding: a `PositionalEncoding` of the differentiated inputs (which must be the first k):
            the first layer's input is cat([encoding(x[..., :k]), x[..., k:]]).
        skips: indices of layers whose input is cat([h, a_0]) * skip_scale (cat([a_0, h]) with
            skip_input_first), h the previous layer's output.
        mode: how J is computed: "forward" (k tangents up the layers with the values),
            "reverse" (m adjoints down after them: an SDF's gradient) or "auto" (reverse when
            m < k, see `choose_mode`).
        backend: "auto" (Triton kernels for CUDA tensors in their dtypes, else PyTorch), "torch"
            or "triton".
        hessian: also return H (..., m, k, k), H[..., i, a, b] = d2 y_(o+i) / d x_(s+a) d x_(s+b).
        laplacian: also return the Laplacian (..., m), the trace of H over the k inputs.
            Second derivatives run in forward mode on the PyTorch engine (any device): "auto"
            takes it; mode="reverse" and backend="triton" are refused.

    Returns:
        (y, J): y (..., out_features) and J (..., m, k) with J[..., i, j] = d y_(o+i) / d x_(s+j)
        (o, s: the first selected output and input), then H if `hessian`, then the Laplacian if
        `laplacian`; all differentiable with respect to x, the weights and the biases (first order).

    Example:
        >>> W1, W2 = torch.randn(64, 3), torch.randn(3, 64)
        >>> y, J = mlp_jacobian(torch.randn(10, 3), [W1, W2], None, ["tanh", None])
        >>> J.shape
        torch.Size([10, 3, 3])
    """
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    check_input(x, weights)
    spec = make_spec(
        activations,
        len(weights),
        x.shape[-1],
        jacobian_inputs,
        out_features=weights[-1].shape[0] if weights[-1].dim() == 2 else None,
        jacobian_outputs=jacobian_outputs,
        encoding=encoding,
        skips=skips,
        skip_scale=skip_scale,
        skip_input_first=skip_input_first,
        mode=mode,
    )
    check_tensors(x, weights, biases, spec)
    band_weights = encoding.band_weights(x) if encoding is not None else None
    if hessian or laplacian:
        return apply_second_order(x, weights, biases, spec, backend, hessian, laplacian, band_weights)
    return apply_spec(x, weights, biases, spec, backend, band_weights=band_weights)


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """ "auto": the Triton kernels for CUDA tensors they support, the PyTorch engine otherwise."""
    check_backend(backend)
    if backend == "auto":
        backend = "triton" if x.device.type == "cuda" and x.dtype in TRITON_DTYPES else "torch"
    if backend == "triton":
        from . import triton_engine  # imports triton: only when the kernels are asked for

        triton_engine.launch.check_device(x)
        triton_engine.launch.check_dtype(x.dtype)
    return backend


def apply_spec(x, weights, biases, spec: NetworkSpec, backend: str, jacobian: bool = True, band_weights=None):
    """`mlp_jacobian` after validation: flatten the leading dimensions, run the engine, restore them.

    Returns (y, J), or (y, None) without `jacobian` (Triton backend only: the PyTorch engine's
    forward without tangents is the module's own plain forward). `band_weights`: the encoding's
    window, one weight per band (constants), when it has one.
    """
    lead, d_in = x.shape[:-1], x.shape[-1]
    d_out = weights[-1].shape[0]
    x2d = x.reshape(-1, d_in)
    engine = resolve_backend(backend, x)
    if jacobian:
        mode, _ = choose_mode(spec, d_out)
        if spec.mode != mode:
            spec = dataclasses.replace(spec, mode=mode)
    x2d, weights, biases = _autocast_operands(x, x2d, weights, biases)
    if torch.compiler.is_compiling():
        bands = band_weights_argument(band_weights, x2d)
        args = (x2d, weights, bias_arguments(biases, x2d), bands, *spec.to_op_args(), jacobian)
        if compiler_sees_kernels(engine, x2d):
            from .ops import traced  # defines the triton_op pair on first use (imports inductor)

            y, J = traced.triton_mlp_jacobian_op(*args)
        else:
            y, J = mlp_jacobian_op(*args, engine)
    elif engine == "triton":
        from . import triton_engine

        y, J = triton_engine.mlp_jacobian(x2d, weights, biases, spec, jacobian, band_weights)
    else:
        y, J = torch_engine.mlp_jacobian(x2d, weights, biases, spec, band_weights)
    y = y.view(*lead, d_out)
    if not jacobian:
        return y, None
    return y, J.view(*lead, spec.jacobian_outputs(d_out), spec.jacobian_inputs)


def _second_order_engine(x, spec: NetworkSpec, backend: str, hessian: bool) -> tuple[str, str]:
    """("torch" or "triton", why) for a call with second derivatives, refusing what cannot run:
    mode="reverse", and backend="triton" where the kernels lack what the call needs."""
    check_backend(backend)
    if spec.mode == "reverse":
        raise ValueError(
            "second derivatives are carried up the layers in forward mode; mode='reverse' cannot give them: "
            "use mode='auto' or 'forward'"
        )
    if backend == "torch" or resolve_backend(backend, x) != "triton":
        return "torch", ""
    from . import triton_engine

    unsupported = triton_engine.second_order.second_order_unsupported(spec, hessian)
    if unsupported is None:
        rows = "the Hessian's rows" if hessian else "the Laplacian row"
        return "triton", f"{rows} on the per-layer kernels, forward and backward"
    if backend == "triton":
        raise ValueError(
            f"backend='triton' cannot compute these second derivatives: {unsupported}; use backend='auto' or "
            "'torch' (the PyTorch engine runs on any device)"
        )
    return "torch", f"; not on the Triton kernels: {unsupported}"


def second_order_plan(x, spec: NetworkSpec, backend: str, hessian: bool, laplacian: bool) -> CallPlan:
    """The `CallPlan` of a call with second derivatives (refusing what `apply_second_order` refuses)."""
    engine, engine_why = _second_order_engine(x, spec, backend, hessian)
    k = spec.jacobian_inputs
    what = f"{k * (k + 1) // 2} Hessian rows" if hessian else "1 Laplacian row"
    why = f"second derivatives: 1 + {k} + {what} per point and layer (values, tangents, second order)"
    if engine == "triton":
        return CallPlan(engine, "forward", why, "layers", engine_why)
    return CallPlan(engine, "forward", why + engine_why)


def apply_second_order(
    x, weights, biases, spec: NetworkSpec, backend: str, hessian: bool, laplacian: bool, band_weights=None
):
    """(y, J, [H], [Laplacian]) after validation: `apply_spec` with second derivatives, which run
    in forward mode (docs/design.md, section 11): on the per-layer Triton kernels for CUDA tensors
    (the Hessian for k <= 4), else on the PyTorch engine; under torch.compile as a custom op on the
    same engine."""
    engine, _ = _second_order_engine(x, spec, backend, hessian)
    spec = dataclasses.replace(spec, mode="forward")
    order = torch_engine.second_order.SecondOrder(spec.jacobian_inputs, hessian, laplacian)
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, d_in)
    x2d, weights, biases = _autocast_operands(x, x2d, weights, biases)
    if torch.compiler.is_compiling():  # the custom op: opaque, on the engine an eager call takes
        from .ops.second_order import mlp_second_order_op

        bands = band_weights_argument(band_weights, x2d)
        on_kernels = engine == "triton"
        args = (x2d, weights, bias_arguments(biases, x2d), bands, *spec.to_op_args(), hessian, laplacian, on_kernels)
        y, J, S = mlp_second_order_op(*args)
        outputs = (y, J, *torch_engine.second_order.assemble(order, S))
    elif engine == "triton":
        from . import triton_engine

        y, J, S = triton_engine.second_order.mlp_second_order(x2d, weights, biases, spec, order, band_weights)
        outputs = (y, J, *torch_engine.second_order.assemble(order, S))
    else:
        outputs = torch_engine.second_order_jacobian(x2d, weights, biases, spec, hessian, laplacian, band_weights)
    return tuple(t.view(*lead, *t.shape[1:]) for t in outputs)


def choose_mode(spec: NetworkSpec, out_features: int) -> tuple[str, str]:
    """("forward" or "reverse", why) for a call computing J.

    "auto" compares the stacked rows per point and layer: forward mode carries 1 + k (the values
    and k tangents), reverse mode 1 + m (the values, then m adjoints), and takes reverse when
    m < k (an SDF: 2 rows instead of 4), on both engines."""
    m, k = spec.jacobian_outputs(out_features), spec.jacobian_inputs
    if spec.mode != "auto":
        return spec.mode, f"mode={spec.mode!r} was asked for"
    if spec.uses_reverse_mode(out_features):
        return "reverse", f"{m} outputs < {k} inputs: 1 + {m} rows per point and layer instead of 1 + {k}"
    return "forward", f"{m} outputs >= {k} inputs: 1 + {k} rows per point and layer, one GEMM (reverse: 1 + {m}, two)"


@dataclasses.dataclass(frozen=True)
class CallPlan:
    """What a call computing J runs: the engine ("torch" or "triton"), the mode ("forward" or
    "reverse") and why, and for the Triton kernels their plan ("network" or "layers") and why."""

    engine: str
    mode: str
    mode_reason: str
    kernels: str | None = None
    kernels_reason: str = ""

    def __str__(self) -> str:
        text = f"{self.mode} mode on the {'Triton kernels' if self.engine == 'triton' else 'PyTorch engine'}"
        text += f": {self.mode_reason}"
        if self.kernels == "network":
            text += "; the whole network in one launch"
        elif self.kernels == "layers":
            text += f"; one launch per layer: {self.kernels_reason}"
        return text


def plan_call(x: torch.Tensor, weights, spec: NetworkSpec, backend: str = "auto") -> CallPlan:
    """The `CallPlan` of `apply_spec(x, weights, ..., spec, backend)` (x: (..., in_features))."""
    check_input(x, weights)
    engine = resolve_backend(backend, x)
    mode, why = choose_mode(spec, weights[-1].shape[0])
    if engine != "triton":
        return CallPlan(engine, mode, why)
    from . import triton_engine
    from .precision import matmul_precision

    x2d = x.reshape(-1, x.shape[-1])
    dtype = _autocast_dtype(x) or x.dtype
    arch = triton_engine.launch.device_arch(x2d)
    plan = triton_engine.plan_for(weights, spec, True, matmul_precision(dtype), arch, mode)
    return CallPlan(engine, mode, why, plan.kind, plan.reason)


def compiler_sees_kernels(engine: str, x: torch.Tensor) -> bool:
    """Whether torch.compile traces into the Triton kernels (the `triton_op`s) rather than calling
    them as an opaque op: on CUDA, unless TRITONJAC_OPAQUE_COMPILE=1 (inductor lowers Triton
    kernels for GPUs only; the interpreter's kernels cannot be traced)."""
    return engine == "triton" and x.device.type == "cuda" and os.environ.get("TRITONJAC_OPAQUE_COMPILE", "0") == "0"


def _autocast_operands(x, x2d, weights, biases):
    """(x2d, weights, biases) in the half dtype autocast asks for (what a built-in layer does under
    autocast: compute and return in half), unchanged without one."""
    half = _autocast_dtype(x)
    if half is None:
        return x2d, weights, biases
    return x2d.to(half), [w.to(half) for w in weights], [None if b is None else b.to(half) for b in biases]


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The half dtype autocast asks for on x's device, or None (autocast off, or x not float32)."""
    kind = x.device.type
    if x.dtype != torch.float32 or not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None
