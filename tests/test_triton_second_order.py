"""The Laplacian row on the per-layer Triton kernels (`layer_forward_kernel` with LAPLACIAN,
tritonjac/triton_engine/second_order.py) against torch.func's Hessian trace in float64, and its
backward on the per-layer kernels (`layer_backward_kernel` with LAPLACIAN). Every buffer the
launchers allocate is fenced by guard rows (conftest)."""

import copy

import pytest
import torch
from torch import nn

import tritonjac
from helpers import TRITON_DEVICE, assert_close, func_second_order, input_and_weight_gradients, make_mlp, poisson_loss
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


def check(model, x, what, tolerance="float32", gradient_tolerance="float32-gradient", hessian=False):
    """y, J and the Laplacian (and with `hessian` H, from its rows) on the kernels, and the gradients
    of a loss on all of them, against float64 torch.func on a copy of the model."""
    model = model.to(TRITON_DEVICE)
    model.backend = "triton"
    x = x.to(TRITON_DEVICE)
    oracle = copy.deepcopy(model).double().cpu()
    oracle.backend = "torch"

    def reference(x):  # (y, J, [H], lap) from torch.func
        y, J, H = func_second_order(oracle, x)
        return (y, J, *([H] if hessian else []), H.diagonal(dim1=-2, dim2=-1).sum(-1))

    outputs, names = launched(lambda: model(x, hessian=hessian, laplacian=True))
    assert set(names) == {"layer_forward"}, names
    for name, got, want in zip(("y", "J", *(["H"] if hessian else []), "lap"), outputs, reference(x.double().cpu())):
        assert_close(got, want, tolerance, f"{what} {name}")

    def loss(y, J, *second):
        total = y.sin().sum() + J.square().sum()
        for t in second:  # lap (and H): a nonlinear loss, so every row's adjoint differs
            total = total + t.cos().sum() + (t * t).sum()
        return total

    xg = x.clone().requires_grad_()
    params = list(model.parameters())
    total = loss(*model(xg, hessian=hessian, laplacian=True))
    got, names = launched(lambda: torch.autograd.grad(total, [xg, *params], allow_unused=True, materialize_grads=True))
    assert set(names) == {"layer_forward", "layer_backward", "layer_weight_grad"}, names
    xr = x.double().cpu().requires_grad_()
    want = torch.autograd.grad(
        loss(*reference(xr)), [xr, *oracle.parameters()], allow_unused=True, materialize_grads=True
    )
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, gradient_tolerance, f"{what} gradient {i}")


@pytest.mark.parametrize("activation", [a for a in ACTIVATION_NAMES if a != "identity"])
def test_every_activation(activation):
    torch.manual_seed(0)
    model = make_mlp(3, [16, 24], 2, activation, output_activation="tanh", dtype=torch.float32)
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
    windowed = make_mlp(
        3, [16, 16], 3, "sine", encoding=PositionalEncoding(2, alpha=1.5), skips=(1,), dtype=torch.float32
    )
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


def test_plans_limits_and_empty_input():
    """The Hessian on the kernels for k <= 4 (16 slots); k = 5 needs 32: backend="triton" refuses it,
    naming why, and "auto" takes the PyTorch engine on a GPU."""
    torch.manual_seed(4)
    x = torch.randn(8, 3, device=TRITON_DEVICE)
    model = JacobianMLP(3, [16], 1, "tanh", device=TRITON_DEVICE, backend="triton")
    for second in (dict(laplacian=True), dict(hessian=True)):
        plan = model.plan(x, **second)
        assert (plan.engine, plan.kernels) == ("triton", "layers"), plan
    wide = JacobianMLP(5, [16], 1, "tanh", device=TRITON_DEVICE, backend="triton")
    x5 = torch.randn(8, 5, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="16 slots"):
        wide(x5, hessian=True)
    assert wide(x5, laplacian=True)[2].shape == (8, 1)
    wide.backend = "auto"
    if TRITON_DEVICE == "cuda":
        plan = wide.plan(x5, hessian=True)
        assert plan.engine == "torch" and "16 slots" in str(plan)
    empty = model(torch.empty(0, 3, device=TRITON_DEVICE), hessian=True, laplacian=True)
    assert [t.shape for t in empty] == [(0, 1), (0, 1, 3), (0, 1, 3, 3), (0, 1)]
    weights = [m.weight for m in model.linear_layers]
    assert tritonjac.mlp_jacobian(x, weights, None, ["tanh", None], laplacian=True, backend="triton")[2].shape == (8, 1)


@pytest.mark.parametrize("activation", ["tanh", "sine", "gelu_tanh"])
def test_hessian(activation):
    """H's k (k + 1) / 2 rows in 16 slots (`activate_hessian`, `_hessian_activation_backward`)."""
    torch.manual_seed(8)
    model = make_mlp(3, [16, 24], 2, activation, output_activation="tanh", dtype=torch.float32)
    check(model, torch.randn(21, 3), f"hessian {activation}", hessian=True)


def test_hessian_real_networks():
    """Two differentiated inputs of a latent code's network with a skip (8 slots), NeuS's layout
    with an encoding (its second derivatives on the diagonal rows), and k = 4 (15 rows)."""
    torch.manual_seed(9)
    skips = JacobianMLP(
        2 + 3, [16, 16, 16], 3, "softplus", jacobian_inputs=slice(1, 3), jacobian_outputs=slice(0, 2), skips=(2,),
    )  # fmt: skip
    check(skips, torch.randn(13, 5), "hessian skips", hessian=True)
    neus = JacobianMLP(
        3 + 2, [16, 16, 16], 2, nn.Softplus(beta=5.0), jacobian_inputs=3, jacobian_outputs=1,
        encoding=PositionalEncoding(2), skips=(2,), skip_scale=2**-0.5,
    )  # fmt: skip
    check(neus, torch.randn(11, 5) * 0.5, "hessian neus-like", hessian=True)
    check(JacobianMLP(4, [16, 16], 1, "silu"), torch.randn(9, 4), "hessian k=4", hessian=True)


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


def test_compiled_training_step_runs_on_the_kernels():
    """Under torch.compile (fullgraph) the custom op takes the engine an eager call takes: the
    kernels, forward and backward, with eager's gradients."""
    torch._dynamo.reset()
    torch.manual_seed(10)
    model = JacobianMLP(3, [16, 16], 1, "tanh", device=TRITON_DEVICE, backend="triton")
    x = torch.rand(24, 3, device=TRITON_DEVICE) * 2 - 1
    loss, params = poisson_loss(model), list(model.parameters())
    compiled, names = launched(lambda: input_and_weight_gradients(torch.compile(loss, fullgraph=True), x, params))
    assert {"layer_forward", "layer_backward", "layer_weight_grad"} <= set(names), names
    eager = input_and_weight_gradients(loss, x, params)
    for i, (got, want) in enumerate(zip(compiled, eager, strict=True)):
        assert_close(got, want, "float32-reordered", f"compiled gradient {i}")
