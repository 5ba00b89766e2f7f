"""TF32 on the CPU: the kernels' operand rounding emulated in Triton's interpreter.

On a GPU a TF32 `tl.dot` rounds its fp32 operands to 10 mantissa bits (`kernels/forward.py` rounds
them to nearest first, as cuBLAS does; the tensor cores alone would truncate). The interpreter
computes TF32 dots in exact fp32, so the kernel tests elsewhere check fp32 arithmetic. Here the
rounding is switched on in the interpreter (`ROUND_TF32_OPERANDS`; the same rounding by integer
arithmetic), and PyTorch's TF32 is emulated the same way (operands rounded, products summed in
fp32), so TF32 accuracy is tested without a GPU: the first H200 run had found it 2-12x off.
"""

import copy
import unittest.mock

import pytest
import torch
import triton
import triton.language as tl

import tritonjac
from helpers import INTERPRETING
from tritonjac import triton_engine
from tritonjac.kernels import forward as kernel_forward
from tritonjac.precision import round_to_tf32, tf32_linear

pytestmark = [
    pytest.mark.skipif(not INTERPRETING, reason="emulates a GPU's TF32 in Triton's interpreter"),
    pytest.mark.usefixtures("tf32"),
]


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < n
    tl.store(out_ptr + o, kernel_forward.round_to_tf32(tl.load(x_ptr + o, mask=m)), mask=m)


def test_round_to_tf32():
    """The interpreter's rounding: to nearest, ties away from zero, overflow to inf, NaN kept."""
    ulp = 2.0**-10
    special = [
        1.0 + ulp / 2,  # a tie: away from zero
        -(1.0 + ulp / 2),
        1.0 + ulp / 2 - 2**-23,  # just below the tie: down
        1.0 + 3 * ulp / 2,  # a tie above an odd mantissa: still away
        3.4028234663852886e38,  # the largest fp32 rounds up to inf
        float("inf"),
        float("-inf"),
        float("nan"),
        0.0,
        -0.0,
        1e-40,  # subnormal
    ]
    x = torch.cat([torch.tensor(special), torch.randn(501) * 10.0 ** torch.randint(-30, 30, (501,))])
    out = torch.full_like(x, 7.0)
    _round_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = round_to_tf32(x)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out[~want.isnan()], want[~want.isnan()])
    assert out[0] == 1.0 + ulp and out[1] == -(1.0 + ulp) and out[2] == 1.0 and out[3] == 1.0 + 2 * ulp
    assert out[4] == float("inf")
    assert (out.view(torch.int32)[~want.isnan()] & 0x1FFF == 0).all()  # 10 mantissa bits left


def _pytorch_in_tf32(model: tritonjac.JacobianMLP, x):
    """y of the model in plain PyTorch, each Linear in TF32 (`precision.tf32_linear`)."""
    with unittest.mock.patch.object(torch.nn.functional, "linear", tf32_linear):
        return model._plain_forward(x)


def _y_loss(y):
    weights = torch.linspace(-1, 2, y.shape[-1], dtype=y.dtype)
    return (y * weights).sum() + 0.5 * y.square().sum()


def _y_and_gradients(forward, model, x):
    x = x.clone().requires_grad_()
    y = forward(x)
    grads = torch.autograd.grad(_y_loss(y), [x, *model.parameters()])
    return [y, *grads]


def _relative_errors(got, want):
    return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


@pytest.fixture
def emulated_tf32(monkeypatch):
    monkeypatch.setattr(kernel_forward, "ROUND_TF32_OPERANDS", tl.constexpr(True))


def test_both_backward_plans_in_tf32(emulated_tf32, kernels_run):
    """3 -> 3x64 -> 3 (SiLU), loss on y: values and every gradient within twice PyTorch's own TF32
    error (the GPU check's criterion), from the fused backward and from the per-layer one. The
    per-layer kernels once computed x's 3 columns and the 3 outputs in TF32 too, where the fused
    kernel computes them in fp32: their gradients carried up to twice its error (1.7x for dLoss/dx,
    2.1x for the second-to-last weight), now the same."""
    torch.manual_seed(0)
    reference = tritonjac.JacobianMLP(3, [64] * 3, 3, "silu", backend="torch", dtype=torch.float64)
    ours = copy.deepcopy(reference).float()
    ours.backend = "triton"
    with torch.no_grad():  # the reference gets the very same (rounded) parameters and points
        for a, b in zip(reference.parameters(), ours.parameters()):
            a.copy_(b.double())
    x = torch.randn(517, 3)
    want = _y_and_gradients(lambda p: reference(p, jacobian=False), reference, x.double())
    pytorch = _relative_errors(_y_and_gradients(lambda p: _pytorch_in_tf32(ours, p), ours, x), want)
    assert max(pytorch) > 1e-4, "PyTorch's TF32 emulation rounds"

    fused = _relative_errors(_y_and_gradients(lambda p: ours(p)[0], ours, x), want)
    assert "mlp_backward" in kernels_run
    assert max(fused) > 1e-4, "the kernels' TF32 emulation rounds"
    kernels_run.clear()
    with triton_engine.per_layer_backward():
        per_layer = _relative_errors(_y_and_gradients(lambda p: ours(p)[0], ours, x), want)
    assert "layer_weight_grad" in kernels_run and "mlp_backward" not in kernels_run

    names = ["y", "grad x"] + [f"grad {n}" for n, _ in ours.named_parameters()]
    for row in zip(names, pytorch, fused, per_layer):
        print("%-16s pytorch %.2e fused %.2e per-layer %.2e" % row)
    for name, f, p, t in zip(names, fused, per_layer, pytorch):
        assert f <= 2 * t, f"fused backward, {name}: {f:.2e} > 2 x PyTorch's {t:.2e}"
        assert p <= 2 * t, f"per-layer backward, {name}: {p:.2e} > 2 x PyTorch's {t:.2e}"
        assert p <= 1.25 * f, f"per-layer backward, {name}: {p:.2e} against the fused backward's {f:.2e}"


def test_neus_like_network_in_tf32(emulated_tf32, kernels_run):
    """NeuS's structure at width 64 (PE(6), a skip scaled by 1/sqrt(2) into a narrowed layer, 65
    outputs of which J holds the first), losses on y and J, on the per-layer kernels: y, J and every
    gradient within twice PyTorch's TF32 error. (On the H200 this case's first-layer gradients were
    1.2x over that, against a PyTorch whose cuBLAS kept some products in fp32.)"""
    torch.manual_seed(1)
    kw = dict(encoding=tritonjac.PositionalEncoding(6), skips=(3,), skip_scale=2**-0.5, jacobian_outputs=1)
    softplus = torch.nn.Softplus(beta=100)
    reference = tritonjac.JacobianMLP(3, [64, 64, 25, 64], 65, softplus, backend="torch", dtype=torch.float64, **kw)
    ours = copy.deepcopy(reference).float()
    ours.backend = "triton"
    with torch.no_grad():
        for a, b in zip(reference.parameters(), ours.parameters()):
            a.copy_(b.double())
    x = torch.randn(257, 3)

    def loss(y, J):
        return _y_loss(y) + J.square().sum() + J.sum()

    def results(forward, model, points):
        points = points.clone().requires_grad_()
        y, J = forward(points)
        return [y, J, *torch.autograd.grad(loss(y, J), [points, *model.parameters()])]

    def pytorch_forward(points):
        y = _pytorch_in_tf32(ours, points)
        return y, torch.autograd.grad(y[:, 0].sum(), points, create_graph=True)[0].unsqueeze(1)

    want = results(reference, reference, x.double())
    got = _relative_errors(results(ours, ours, x), want)
    assert "layer_weight_grad" in kernels_run and "mlp_backward" not in kernels_run
    pytorch = _relative_errors(results(pytorch_forward, ours, x), want)
    names = ["y", "J", "grad x"] + [f"grad {n}" for n, _ in ours.named_parameters()]
    for row in zip(names, pytorch, got):
        print("%-16s pytorch %.2e ours %.2e" % row)
    assert max(got) > 1e-4, "the kernels' TF32 emulation rounds"
    for name, e, t in zip(names, got, pytorch):
        assert e <= 2 * t, f"{name}: {e:.2e} > 2 x PyTorch's {t:.2e}"
