"""Which kernels run a call: the whole network in one launch, or one launch per layer.

- "network": one launch of `mlp_forward_kernel` for the whole MLP, when the hidden layers share
  one width whose stacked tile fits the registers (`network_fits`), in/out features are at most 16
  and every layer but the last has the same activation. Its backward is the fused
  `mlp_backward_kernel` where a configuration fits (`fused_backward_available`).
  Real networks (docs/design.md section 8) take it with an encoding, a latent code, one skip into a
  hidden layer and selected inputs and outputs; their backward runs per layer.
- "layers": one launch of `layer_forward_kernel` per layer otherwise (wide layers such as IDR's
  512, mixed widths or activations, single-layer nets, several skips), with [h; T] between layers
  in global memory in the compute dtype, and the per-layer backward kernels.
- In reverse mode (fewer outputs than inputs, docs/design.md section 9), "network" is one launch of
  `mlp_reverse_kernel` (plain chains, selected inputs and outputs: no encodings or skips yet), and
  "layers" goes up with `layer_forward_kernel` and down with `layer_backward_kernel`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton

from ..network import NetworkSpec
from ..precision import matmul_precision
from . import tuning
from .launch import device_arch

__all__ = [
    "Plan",
    "plan_for",
    "planned_kind",
    "network_fits",
    "backward_plan",
    "fused_backward_available",
    "seeded_backward_available",
    "seeds_tangents",
    "per_layer_backward",
    "unseeded_backward",
    "slots",
    "adjoint_slots",
    "pad_width",
]

MAX_NETWORK_FEATURES = 16  # in_features and out_features of the whole-network kernel
MAX_NETWORK_WIDTH = 128


@dataclass(frozen=True)
class Plan:
    kind: str  # "network" or "layers"
    reason: str  # why "layers" was chosen, for users asking `plan_for`


def slots(k: int, jacobian: bool) -> int:
    """Stacked rows per point: the value and k tangents, padded to a power of two (1 without tangents)."""
    return triton.next_power_of_2(1 + k) if jacobian else 1


def second_order_rows(second: str, k: int) -> int:
    """The second-order rows after the k tangents: the Hessian's k (k + 1) / 2, or the Laplacian's one."""
    return k * (k + 1) // 2 if second == "hessian" else 1


def second_order_constexprs(second: str, k: int) -> dict:
    """The per-layer kernels' constexprs for `second` ("laplacian" or "hessian") rows after k tangents."""
    return {second.upper(): True, "SLOTS": slots(k + second_order_rows(second, k), True)}


def adjoint_slots(m: int) -> int:
    """Stacked adjoint rows per point in reverse mode: J's m rows, padded to a power of two."""
    return triton.next_power_of_2(m)


def pad_width(width: int) -> int:
    """The whole-network kernels' tile width: a power of two, at least 16 (a `tl.dot` minimum)."""
    return max(16, triton.next_power_of_2(width))


def network_fits(width: int, num_slots: int, precision: str, arch: int, encoded: bool = False) -> bool:
    """Whether some whole-network configuration fits the registers at this width and slot count
    (with an encoded first layer: fewer, `tuning.ENCODED_SPILLS`)."""
    named = {"SLOTS": num_slots, "WIDTH_PAD": pad_width(width), "PRECISION": precision, "ENCODED": encoded}
    return bool(tuning.prune_network_configs(tuning.network_configs(), named, arch=arch))


def plan_for(
    weights, spec: NetworkSpec, jacobian: bool = True, precision: str = "tf32", arch: int = 90, mode: str = "forward"
) -> Plan:
    """The forward plan for these weights and spec on a GPU of compute capability `arch`.

    Args:
        weights: one (out, in) tensor (or anything with `.shape`) per layer.
        spec: the network's activations and tangent count.
        jacobian: whether the call computes J (tangents take registers).
        precision: the `tl.dot` input precision, see `tritonjac.precision.matmul_precision`.
        arch: compute capability as 80, 90, ...
        mode: how J is computed, "forward" or "reverse" (`mlp_reverse_kernel` for the whole network:
            plain chains, with selected inputs and outputs, but no encodings or skips yet).
    Returns:
        A `Plan`: kind "network" or "layers", and the reason for "layers".
    """
    L = len(weights)
    d_in, d_out = weights[0].shape[1], weights[-1].shape[0]
    hidden = {w.shape[0] for w in weights[:-1]}
    reverse = jacobian and mode == "reverse"
    if reverse and (spec.encoding is not None or spec.skips):
        return Plan("layers", "the whole-network reverse kernel has no encodings or skips yet")
    if not spec.is_plain and not reverse:
        problem = _real_network_problem(weights, spec)
        if problem:
            return Plan("layers", problem)
        d_in -= spec.encoding.width if spec.encoding is not None else 0  # x's columns besides the encoded
    if L < 2:
        return Plan("layers", "a single layer")
    if len(hidden) > 1:
        return Plan("layers", f"hidden widths differ ({sorted(hidden)})")
    (width,) = hidden
    if width > MAX_NETWORK_WIDTH:
        return Plan("layers", f"hidden width {width} > {MAX_NETWORK_WIDTH}")
    if d_in > MAX_NETWORK_FEATURES or d_out > MAX_NETWORK_FEATURES:
        return Plan("layers", f"in/out features {d_in}/{d_out} > {MAX_NETWORK_FEATURES}")
    if len(set(spec.activations[:-1])) > 1:
        return Plan("layers", "hidden activations differ")
    if reverse:
        m = spec.jacobian_outputs(d_out)
        if tuning.reverse_config(adjoint_slots(m), pad_width(width), precision, arch) is None:
            return Plan("layers", f"width {width} with {m} adjoints in {precision} does not fit the registers")
        return Plan("network", "")
    if not network_fits(width, slots(spec.jacobian_inputs, jacobian), precision, arch, spec.encoding is not None):
        return Plan(
            "layers", f"width {width} with {spec.jacobian_inputs} tangents in {precision} does not fit the registers"
        )
    return Plan("network", "")


def _real_network_problem(weights, spec: NetworkSpec) -> str:
    """Why the whole-network kernel cannot run this network's skips ("" if it can): it holds one
    skip into a hidden layer whose previous layer has the common width."""
    if len(spec.skips) > 1:
        return f"{len(spec.skips)} skips (the whole-network kernel holds one)"
    if spec.skips and spec.skips[0] == len(weights) - 1:
        return "a skip into the last layer"
    if spec.skips:
        skip = spec.skips[0]
        a0 = weights[0].shape[1]
        if weights[skip].shape[1] - a0 != weights[skip - 1].shape[0]:
            return "the skip layer's widths"
    return ""


def planned_kind(x2d: torch.Tensor, weights, spec: NetworkSpec, jacobian: bool, mode: str = "forward") -> str:
    """ "network" or "layers": the plan the forward takes for these inputs on x2d's device."""
    return plan_for(weights, spec, jacobian, matmul_precision(x2d.dtype), device_arch(x2d), mode).kind


_FUSED_BACKWARD = [True]


@contextlib.contextmanager
def per_layer_backward():
    """Within it, every backward runs per layer: how the benchmark times both backward plans of one
    network (on the first GPU, the fused backward was 90% of a training step)."""
    _FUSED_BACKWARD.append(False)
    try:
        yield
    finally:
        _FUSED_BACKWARD.pop()


_SEEDED_BACKWARD = [True]


@contextlib.contextmanager
def unseeded_backward():
    """Within it, a backward with m < k carries J's k columns as tangents instead of m tangents
    seeded with dLoss/dJ's rows: how the scalar-field benchmark measures what seeding saves."""
    _SEEDED_BACKWARD.append(False)
    try:
        yield
    finally:
        _SEEDED_BACKWARD.pop()


def seeds_tangents(spec: NetworkSpec, out_features: int) -> bool:
    """Whether a backward with a loss on J carries J's m rows as tangents seeded with dLoss/dJ's
    rows (docs/design.md section 9) rather than its k columns: when m < k, whichever mode made J."""
    return _SEEDED_BACKWARD[-1] and spec.jacobian_outputs(out_features) < spec.jacobian_inputs


def seeded_backward_available(x2d: torch.Tensor, weights, spec: NetworkSpec) -> bool:
    """Whether a backward with a loss on J runs the fused kernel with seeded tangents
    (`seeds_tangents`): plain chains of the whole-network plan whose (1 + m)-row tile fits."""
    d_out = weights[-1].shape[0]
    if not _FUSED_BACKWARD[-1] or not spec.is_plain or not seeds_tangents(spec, d_out):
        return False
    if planned_kind(x2d, weights, spec, False) != "network":
        return False
    precision = matmul_precision(x2d.dtype)
    width_pad = pad_width(weights[0].shape[0])
    return tuning.fused_backward_config(slots(d_out, True), width_pad, precision, device_arch(x2d)) is not None


def backward_plan(x2d: torch.Tensor, weights, spec: NetworkSpec, loss_on_jacobian: bool) -> tuple[str, bool]:
    """(kernels, seeded) of a backward: "fused" or "layers", and whether its tangents are J's m rows
    seeded with dLoss/dJ's rows (`seeds_tangents`) rather than J's k columns."""
    seeded = loss_on_jacobian and seeds_tangents(spec, weights[-1].shape[0])
    if seeded:
        fused = seeded_backward_available(x2d, weights, spec)
    else:
        fused = fused_backward_available(x2d, weights, spec, loss_on_jacobian)
    return ("fused" if fused else "layers"), seeded


def fused_backward_available(x2d: torch.Tensor, weights, spec: NetworkSpec, jacobian: bool) -> bool:
    """Whether a call with these inputs is differentiated by the fused backward kernel (else the
    per-layer backward runs). Without a loss on J (`jacobian=False`) it needs no tangents, which
    fits more often."""
    if not _FUSED_BACKWARD[-1]:
        return False
    if not spec.is_plain or planned_kind(x2d, weights, spec, jacobian) != "network":
        return False  # the fused backward has no skips, encodings or selections yet: per layer
    num_slots = slots(spec.jacobian_inputs, jacobian)
    precision = matmul_precision(x2d.dtype)
    return (
        tuning.fused_backward_config(num_slots, pad_width(weights[0].shape[0]), precision, device_arch(x2d)) is not None
    )
