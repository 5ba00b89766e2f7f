"""Shared helpers: the torch.func oracle and a relative-error measure."""

import pytest
import torch

import tritonjac
from tritonjac.benchmark import func_jacobian


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
