"""What the tests share: the torch.func oracle, one tolerance table, one assertion, model builders.

The oracle is the tests' own (not the benchmark's): `torch.func.vmap(jacfwd)` of the per-point
function, independent of both engines.
"""

from __future__ import annotations

import copy
import os

import torch

import tritonjac
from tritonjac.precision import matmul_precision

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The device the Triton backend runs on in this test session: a real GPU, or the interpreter on CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu"
# Both engines as a pytest parameter. The Triton one always runs: on a GPU, or in the interpreter
# (conftest refuses to start a CPU session that would have to skip it).
ENGINES = ["torch", "triton"]

# Largest accepted max |error| / max |reference| against float64, per computation. Each figure is
# tied to what the computation can reach:
# - "float64": either engine in float64 against torch.func (a few roundings per layer);
# - "float32": y and J from the kernels with fp32-accurate matmuls (3xTF32, or the interpreter's
#   exact fp32 dots): unit roundoff 6e-8, a few layers of accumulation;
# - "float32-gradient": the same for gradients (one more pass through every layer).
# TF32 on a GPU is judged against PyTorch's own TF32 error on the same inputs (`kernel_tolerances`),
# and half precision against PyTorch's own error in that dtype (at most twice it), not here.
TOLERANCE = {
    "float64": 1e-10,
    "float64-same-math": 1e-12,  # two float64 paths through the same formulas (compiled vs eager, ...)
    "float32": 2e-5,
    "float32-gradient": 5e-5,
    "float32-engine": 1e-5,  # the PyTorch engine in float32 (fp32 matmuls throughout)
    "float32-reordered": 1e-6,  # one float32 computation summed in another order (other block sizes)
    "tf32-same-kernels": 1e-4,  # compiled against eager through the same kernels and configurations
    "bfloat16": 2e-2,  # bf16 operands: 2^-9 relative rounding through a few layers
}


def kernels_in_tf32() -> bool:
    """Whether the Triton kernels' float32 matmuls run in TF32 now: on a GPU at matmul precision
    "high" (the interpreter computes TF32 dots in exact fp32)."""
    return TRITON_DEVICE == "cuda" and matmul_precision(torch.float32) == "tf32"


def kernel_tolerances(expected, plain_pytorch, fp32_figure="float32-gradient") -> list:
    """The accepted relative error of each of the kernels' float32 results against the float64
    `expected` tensors. In TF32 on a GPU: twice what plain PyTorch errs in TF32 on the same inputs
    (`plain_pytorch()` returns its results, computed in float32 on the GPU at the same setting),
    and never below the fp32 figure. Otherwise (3xTF32; the interpreter): the fp32 figure."""
    floor = TOLERANCE[fp32_figure] if isinstance(fp32_figure, str) else fp32_figure
    if not kernels_in_tf32():
        return [floor] * len(expected)
    errors = [rel_err(p.detach().cpu().double(), e.detach().cpu().double()) for p, e in zip(plain_pytorch(), expected)]
    return [max(2 * err, floor) for err in errors]


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (0 when both are empty)."""
    if b.numel() == 0:
        assert a.numel() == 0
        return 0.0
    scale = b.abs().max().clamp_min(1e-300)
    return ((a - b).abs().max() / scale).item()


def assert_close(actual, expected, tolerance, what: str = "") -> None:
    """rel_err(actual, expected) below tolerance (a number or a TOLERANCE key), comparing in
    float64 on the CPU; the message names what differs and by how much."""
    tol = TOLERANCE[tolerance] if isinstance(tolerance, str) else tolerance
    assert actual is not None, f"{what}: missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual.detach().cpu().double(), expected.detach().cpu().double())
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


def func_jacobian(f, x2d):
    """y and J of a per-point function f: (d_in,) -> (d_out,) at every row of x2d, by torch.func."""

    def with_aux(p):
        y = f(p)
        return y, y

    J, y = torch.func.vmap(torch.func.jacfwd(with_aux, has_aux=True))(x2d)
    return y, J


def func_gradients(f, x, loss, params, k=None):
    """Gradients of loss(y, J) w.r.t. x and each of params, with y and J of the per-point function f
    at the rows of x (..., d_in) by torch.func, J restricted to the first k inputs: the tests' oracle
    for every backward. A parameter the loss does not reach gets a zero gradient."""
    x = x.detach().clone().requires_grad_()
    y, J = func_jacobian(f, x.reshape(-1, x.shape[-1]))
    y, J = y.reshape(*x.shape[:-1], y.shape[-1]), J.reshape(*x.shape[:-1], *J.shape[-2:])
    J = J if k is None else J[..., :k]
    return torch.autograd.grad(loss(y, J), [x, *params], allow_unused=True, materialize_grads=True)


def model_gradients(model, x, loss, dtype=torch.float64, device="cpu"):
    """`func_gradients` (x first, then every parameter, frozen ones included) through a copy of the
    model's plain nn.Sequential in `dtype` on `device`: float64 on the CPU is the oracle; float32 or
    a half dtype on the kernels' device is plain PyTorch as a peer."""
    seq = copy.deepcopy(model.to_sequential()).to(device=device, dtype=dtype).requires_grad_()
    x = x.detach().to(device=device, dtype=dtype)
    return func_gradients(seq, x, loss, list(seq.parameters()), model.jacobian_inputs)


def func_reference(f, x2d, k):
    """torch.func's y and J of f at the rows of x2d, J restricted to the first k inputs."""
    y, J = func_jacobian(f, x2d)
    return y, J[..., :k]


def sequential_reference(seq, x, k):
    """torch.func oracle for an nn.Sequential of Linear layers at x (..., d_in)."""
    x2d = x.reshape(-1, x.shape[-1])
    y, J = func_reference(seq, x2d, k)
    lead = x.shape[:-1]
    return y.reshape(*lead, y.shape[-1]), J.reshape(*lead, *J.shape[-2:])


def make_mlp(d_in, hidden, d_out, activation="softplus", **kw):
    kw.setdefault("dtype", torch.float64)
    model = tritonjac.JacobianMLP(d_in, hidden, d_out, activation, **kw)
    if "sine" in str(activation).lower():  # keep sin(30 z) well conditioned, as SIREN's init does
        with torch.no_grad():
            for layer in model.linear_layers:
                layer.weight.mul_(1.0 / 30.0)
    return model


def poisson_loss(model):
    """A loss on every second-order output: a Poisson residual on the Laplacian, H and y (SIREN-like
    training), as a function of the points x (P, 3)."""

    def loss(x):
        y, J, H, lap = model(x, hessian=True, laplacian=True)
        return (lap[:, 0] - x.sin().sum(-1)).square().mean() + H.square().mean() + y.square().mean()

    return loss


def input_and_weight_gradients(loss, x, params):
    """d loss(x) / d(x, params) at a fresh copy of x."""
    x = x.clone().requires_grad_()
    return torch.autograd.grad(loss(x), [x, *params])


def func_second_order(model, x):
    """torch.func's y, J, H of the model's plain forward at the rows of x (P, d_in), J and H
    restricted to the model's jacobian inputs and outputs; differentiable in the parameters."""
    start = model._spec.input_start
    k, rows = model.jacobian_inputs, model._spec.output_rows(model.out_features)

    def f(p):
        return model(p.unsqueeze(0), jacobian=False)[0]

    y = model(x, jacobian=False)
    J = torch.func.vmap(torch.func.jacfwd(f))(x)[:, rows, start : start + k]
    H = torch.func.vmap(torch.func.hessian(f))(x)[:, rows, start : start + k, start : start + k]
    return y, J, H
