"""Shared helpers: the torch.func oracle, a relative-error measure, the device the Triton kernels run on.

Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on before
triton is imported: that happens here, first thing (unless TRITON_INTERPRET is already set).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU: one fixed configuration per kernel instead of autotuning every shape the tests use
# (test_triton_gpu.py turns tuning back on where it tests it).
os.environ.setdefault("TRITONJAC_AUTOTUNE", "0")

import pytest  # noqa: E402

import tritonjac  # noqa: E402
from tritonjac.benchmark import func_jacobian  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The device the Triton backend runs on in this test session: a real GPU, or the interpreter on CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def func_reference(f, x2d, k):
    """y and J of a per-point function f: (d_in,) -> (d_out,) at every row of x2d, by torch.func."""
    y, J = func_jacobian(f, torch.func.jacfwd)(x2d)
    return y, J[..., :k]


def sequential_reference(seq, x, k):
    """torch.func oracle for an nn.Sequential of Linear layers at x (..., d_in)."""
    x2d = x.reshape(-1, x.shape[-1])
    y, J = func_reference(seq, x2d, k)
    lead = x.shape[:-1]
    return y.reshape(*lead, y.shape[-1]), J.reshape(*lead, *J.shape[-2:])


def rel_err(a, b):
    """max |a - b| / max |b| (0 when both are empty)."""
    if b.numel() == 0:
        assert a.numel() == 0
        return 0.0
    scale = b.abs().max().clamp_min(1e-300)
    return ((a - b).abs().max() / scale).item()


def make_mlp(d_in, hidden, d_out, activation="softplus", **kw):
    kw.setdefault("dtype", torch.float64)
    model = tritonjac.JacobianMLP(d_in, hidden, d_out, activation, **kw)
    if "sine" in str(activation).lower():  # keep sin(30 z) well conditioned, as SIREN's init does
        with torch.no_grad():
            for layer in model.linear_layers:
                layer.weight.mul_(1.0 / 30.0)
    return model


@pytest.fixture
def tf32():
    """Matmul precision "high" (TF32 on GPUs, exact fp32 in the interpreter) for one test."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after a test, so each test compiles its own graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every tensor the Triton launchers allocate starts as NaN, so an unwritten element fails."""
    from tritonjac import triton_ops

    def nan_buffer(like, *shape):
        return like.new_full(shape, float("nan"))

    monkeypatch.setattr(triton_ops, "new_buffer", nan_buffer)
