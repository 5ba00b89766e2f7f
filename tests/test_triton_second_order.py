"""The Laplacian row on the per-layer Triton kernels (`layer_forward_kernel` with LAPLACIAN,
tritonjac/triton_engine/second_order.py) against torch.func's Hessian trace in float64, and its
backward on the per-layer kernels (`layer_backward_kernel` with LAPLACIAN). Every buffer the
launchers allocate is fenced by guard rows (conftest)."""

import copy

import pytest
import torch
from torch import nn

import tritonjac
from helpers import TRITON_DEVICE, assert_close, func_second_order
from tritonjac import JacobianMLP, PositionalEncoding
from tritonjac.activations import ACTIVATION_NAMES
from tritonjac.triton_engine import launch

pytestmark = pytest.mark.usefixtures("highest_precision")  # conftest: fp32-accurate dots


def launched(fn, laplacian_only=False):
    """fn()'s result and the names of the kernels it launched (those launched with LAPLACIAN only)."""
    names = []

    def observe(name, args, config):
        if args.get("LAPLACIAN", False) or not laplacian_only:
            names.append(name)

    remove = launch.add_launch_observer(observe)
    try:
        return fn(), names
    finally:
        remove()


def check(model, x, what, tolerance="float32", gradient_tolerance="float32-gradient"):
    """y, J and the Laplacian on the kernels, and the gradients of a loss on all three, against
    float64 torch.func on a copy of the model."""
    model = model.to(TRITON_DEVICE)
    model.backend = "triton"
    x = x.to(TRITON_DEVICE)
    oracle = copy.deepcopy(model).double().cpu()
    oracle.backend = "torch"
    y_ref, J_ref, H_ref = func_second_order(oracle, x.double().cpu())
    lap_ref = H_ref.diagonal(dim1=-2, dim2=-1).sum(-1)
    (y, J, lap), names = launched(lambda: model(x, laplacian=True))
    assert set(names) == {"layer_forward"}, names
    for name, got, want in (("y", y, y_ref), ("J", J, J_ref), ("lap", lap, lap_ref)):
        assert_close(got, want, tolerance, f"{what} {name}")

    def loss(y, J, lap):
        return y.sin().sum() + J.square().sum() + lap.cos().sum() + (lap * lap).sum()

    xg = x.clone().requires_grad_()
    params = list(model.parameters())
    total = loss(*model(xg, laplacian=True))
    got, names = launched(lambda: torch.autograd.grad(total, [xg, *params], allow_unused=True, materialize_grads=True))
    assert set(names) == {"layer_forward", "layer_backward", "layer_weight_grad"}, names
    xr = x.double().cpu().requires_grad_()
    y_r, J_r, H_r = func_second_order(oracle, xr)
    want = torch.autograd.grad(
        loss(y_r, J_r, H_r.diagonal(dim1=-2, dim2=-1).sum(-1)),
        [xr, *oracle.parameters()],
        allow_unused=True,
        materialize_grads=True,
    )
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, gradient_tolerance, f"{what} gradient {i}")


@pytest.mark.parametrize("activation", [a for a in ACTIVATION_NAMES if a != "identity"])
def test_every_activation(activation):
    torch.manual_seed(0)
    model = JacobianMLP(3, [16, 24], 2, activation, output_activation="tanh")
    if activation == "sine":
        with torch.no_grad():
            for layer in model.linear_layers:
                layer.weight.mul_(1 / 30)
    check(model, torch.randn(37, 3), activation)


def test_softplus_100_and_many_blocks():
    torch.manual_seed(1)
    model = JacobianMLP(3, [64, 48], 1, nn.Softplus(beta=100))
    check(model, torch.rand(100, 3) * 0.2 - 0.1, "softplus(100)")


def test_skips_latent_code_and_selected_outputs():
    """A skip layer reads both inputs (the previous layer's rows and x's, whose Laplacian row is
    zero: the unit tangents must stay off it and off the latent columns), a latent code after the
    differentiated inputs, and J and the Laplacian of some outputs only."""
    torch.manual_seed(2)
    model = JacobianMLP(
        3 + 4, [16, 16, 16], 5, "tanh", jacobian_inputs=slice(2, 5), jacobian_outputs=slice(1, 3), skips=(2,),
        skip_scale=0.5,
    )  # fmt: skip
    check(model, torch.randn(21, 7), "skips")


def test_encodings():
    """The encoding's second derivatives in the kernels (`encoded_input` with LAPLACIAN): NeuS's
    layout (an encoding, a latent code, a scaled skip, one output of several), and a windowed
    encoding with sine activations."""
    torch.manual_seed(5)
    neus = JacobianMLP(
        3 + 2, [16, 16, 16, 16], 4, nn.Softplus(beta=5.0), jacobian_inputs=3, jacobian_outputs=1,
        encoding=PositionalEncoding(3), skips=(2,), skip_scale=2**-0.5,
    )  # fmt: skip
    check(neus, torch.randn(19, 5) * 0.5, "neus-like")
    windowed = JacobianMLP(3, [16, 16], 3, "sine", encoding=PositionalEncoding(2, alpha=1.5), skips=(1,))
    with torch.no_grad():
        for layer in windowed.linear_layers:
            layer.weight.mul_(1 / 30)
    check(windowed, torch.randn(9, 3), "windowed encoding")


def test_half_precision():
    torch.manual_seed(3)
    model = JacobianMLP(3, [32, 32], 2, "tanh").to(torch.bfloat16)
    model = model.to(TRITON_DEVICE)
    model.backend = "triton"
    x = torch.randn(40, 3, device=TRITON_DEVICE, dtype=torch.bfloat16)
    y, J, lap = model(x, laplacian=True)
    reference = copy.deepcopy(model).float()
    reference.backend = "torch"
    lap_ref = reference(x.float(), laplacian=True)[2]
    assert lap.dtype == torch.bfloat16
    assert_close(lap, lap_ref, "bfloat16", "bf16 Laplacian")


def test_the_hessian_stays_on_the_pytorch_engine():
    torch.manual_seed(4)
    x = torch.randn(8, 3, device=TRITON_DEVICE)
    model = JacobianMLP(3, [16], 1, "tanh", device=TRITON_DEVICE, backend="triton")
    with pytest.raises(ValueError, match="not the Hessian"):
        model(x, hessian=True)
    model.backend = "auto"  # on a GPU: the Hessian on the PyTorch engine, saying why
    if TRITON_DEVICE == "cuda":
        plan = model.plan(x, hessian=True)
        assert plan.engine == "torch" and "not the Hessian" in str(plan)
    model.backend = "triton"
    plan = model.plan(x, laplacian=True)
    assert (plan.engine, plan.kernels) == ("triton", "layers")
    empty = model(torch.empty(0, 3, device=TRITON_DEVICE), laplacian=True)
    assert [t.shape for t in empty] == [(0, 1), (0, 1, 3), (0, 1)]
    weights = [m.weight for m in model.linear_layers]
    assert tritonjac.mlp_jacobian(x, weights, None, ["tanh", None], laplacian=True, backend="triton")[2].shape == (8, 1)


def test_losses_on_some_outputs():
    """A loss on the Laplacian alone takes it back through the kernels' Laplacian backward; a loss on
    y and J alone needs no Laplacian row (the first-order backward, fused where it fits). Both
    against the PyTorch engine's analytic backward in float64."""
    torch.manual_seed(6)
    model = JacobianMLP(3, [16, 16], 2, "silu", device=TRITON_DEVICE, backend="triton")
    oracle = copy.deepcopy(model).double().cpu()
    oracle.backend = "torch"
    x = torch.randn(23, 3, device=TRITON_DEVICE)
    for what, loss, with_laplacian in (
        ("lap", lambda y, J, lap: lap.square().sum(), {"layer_forward", "layer_backward"}),
        ("y and J", lambda y, J, lap: y.sum() + J.square().sum(), set()),
    ):
        xg = x.clone().requires_grad_()
        total = loss(*model(xg, laplacian=True))
        inputs = [xg, *model.parameters()]
        got, names = launched(lambda: torch.autograd.grad(total, inputs), laplacian_only=True)  # noqa: B023
        assert set(names) == with_laplacian, (what, names)
        xr = x.double().cpu().requires_grad_()
        want = torch.autograd.grad(loss(*oracle(xr, laplacian=True)), [xr, *oracle.parameters()])
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, "float32-gradient", f"{what} gradient {i}")


def test_half_precision_gradients():
    """bf16 operands through the Laplacian's backward, against the same model in float32."""
    torch.manual_seed(7)
    model = JacobianMLP(3, [32, 32], 1, "softplus", device=TRITON_DEVICE, backend="triton").to(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    reference.backend = "torch"
    x = torch.randn(40, 3, device=TRITON_DEVICE, dtype=torch.bfloat16)
    grads = []
    for net, inputs in ((model, x), (reference, x.float())):
        y, J, lap = net(inputs, laplacian=True)
        grads.append(torch.autograd.grad(lap.square().sum() + y.sum(), list(net.parameters())))
    for i, (g, w) in enumerate(zip(*grads)):
        assert g.dtype == torch.bfloat16
        assert_close(g, w, "bfloat16", f"bf16 weight gradient {i}")
