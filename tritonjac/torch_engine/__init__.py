"""The PyTorch engine: y, J and a first-order backward in plain PyTorch (docs/design.md, sections
2-3, 8-9).

It runs on any device and dtype (float64 included), and is the CPU path users run; the tests use
its float64 results as one of their oracles for the Triton kernels. Two modes, chosen by the
spec (`NetworkSpec.uses_reverse_mode`; `tritonjac.functional.choose_mode` says why):
- `forward_mode`: the k tangents of J's columns carried up with the values, 1 + k stacked rows per
  layer, one GEMM each;
- `reverse_mode`: the values up, then the adjoints of J's m rows down, 1 + m rows per layer: for
  fewer outputs than inputs (an SDF's gradient);
- `second_order`: forward mode with the Hessian's or the Laplacian's rows carried as well.

Both share `common`: the input a0 (x, or its encoding and a latent code) with its sparse tangent,
skip layers' split weights, selected outputs, and chunks of points of about 1.5 MB each (256 MB on
a GPU), which bound temporary memory and keep the temporaries in cache (`CHUNK_BYTES`). On CPU the
chunks run on worker threads of one intra-op thread each (`run_chunks`, docs/design.md section 10).
"""

from __future__ import annotations

from ..network import NetworkSpec
from . import common, forward_mode, reverse_mode, second_order
from .common import InputMap, chunk_points
from .second_order import second_order_jacobian

__all__ = [
    "mlp_jacobian",
    "forward_points",
    "backward_by_recompute",
    "InputMap",
    "chunk_points",
    "common",
    "forward_mode",
    "reverse_mode",
    "second_order",
    "second_order_jacobian",
]


def _mode(spec: NetworkSpec, weights):
    return reverse_mode if spec.uses_reverse_mode(weights[-1].shape[0]) else forward_mode


def mlp_jacobian(x2d, weights, biases, spec: NetworkSpec, band_weights=None):
    """y (P, d_L) and J (P, m, k) of the MLP at the points x2d (P, d_0), differentiable.

    Inputs are assumed validated (`tritonjac.network`). Autograd is recorded only when some input
    requires a gradient; otherwise nothing is saved and memory stays at one chunk's worth.
    `band_weights`: the encoding's window per band (constants), when it has one.
    """
    return _mode(spec, weights).mlp_jacobian(x2d, weights, biases, spec, band_weights)


def forward_points(x2d, weights, biases, spec: NetworkSpec, band_weights=None):
    """y (P, d_L) and J (P, m, k) without recording anything for a backward."""
    return _mode(spec, weights).forward_points(x2d, weights, biases, spec, None, band_weights)


def backward_by_recompute(x2d, weights, biases, spec: NetworkSpec, gy, gJ, need_x, need_W, need_b, band_weights=None):
    """Gradients of x, the weights and the biases (None where not needed) from dLoss/dy and dLoss/dJ
    (either may be None), recomputing the forward chunk by chunk: the backward of the torch.compile
    operator, which saves only the inputs."""
    return _mode(spec, weights).backward_by_recompute(
        x2d, weights, biases, spec, gy, gJ, need_x, need_W, need_b, band_weights
    )
