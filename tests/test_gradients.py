"""Gradients of losses on y, on J and on both: gradcheck and torch.func agreement, in float64."""

import pytest
import torch
from torch import nn

import tritonjac
from helpers import assert_close, func_gradients, func_reference, make_mlp
from tritonjac.activations import REGISTRY

LOSSES = {
    "y": lambda y, J, wy, wJ: (y * wy).sum() + y.square().sum(),
    "J": lambda y, J, wy, wJ: (J * wJ).sum() + J.square().sum(),
    "both": lambda y, J, wy, wJ: (y * wy).sum() + (J * wJ).sum() + (J.square().sum(-1) * y).sum(),
}
SMOOTH = [name for name, kind in REGISTRY.items() if not kind.piecewise_linear]


def gradients_both_ways(model, x, loss_name):
    """d loss / d(x, parameters) through tritonjac and through autograd over torch.func."""
    params = list(model.parameters())
    k = model.jacobian_inputs
    seq = model.to_sequential()
    x1 = x.clone().requires_grad_()
    y, J = model(x1)
    wy, wJ = torch.randn_like(y), torch.randn_like(J)
    loss = LOSSES[loss_name](y, J, wy, wJ)
    ours = torch.autograd.grad(loss, [x1, *params])
    x2 = x.clone().requires_grad_()
    y2, J2 = func_reference(seq, x2.reshape(-1, x.shape[-1]), k)
    y2, J2 = y2.reshape(y.shape), J2.reshape(J.shape)
    theirs = torch.autograd.grad(
        LOSSES[loss_name](y2, J2, wy, wJ), [x2, *params], allow_unused=True, materialize_grads=True
    )
    return ours, theirs


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("activation", SMOOTH + ["relu", "leaky_relu", nn.Softplus(beta=100)], ids=str)
def test_grads_match_torch_func(activation, loss_name):
    model = make_mlp(4, [24, 13, 9], 3, activation, jacobian_inputs=3)
    ours, theirs = gradients_both_ways(model, torch.randn(60, 4, dtype=torch.float64), loss_name)
    for a, b in zip(ours, theirs):
        assert_close(a, b, "float64")


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("output_activation", ["tanh", "softplus", "sine"])
def test_grads_with_output_activation(output_activation, loss_name):
    model = make_mlp(3, [16, 16], 2, "silu", output_activation=output_activation)
    ours, theirs = gradients_both_ways(model, torch.randn(30, 3, dtype=torch.float64), loss_name)
    for a, b in zip(ours, theirs):
        assert_close(a, b, "float64")


@pytest.mark.parametrize("depth", [1, 2, 5, 8])
def test_grads_depths(depth):
    model = make_mlp(3, [12] * depth, 3, "tanh")
    ours, theirs = gradients_both_ways(model, torch.randn(20, 3, dtype=torch.float64), "both")
    for a, b in zip(ours, theirs):
        assert_close(a, b, "float64")


def test_grads_no_hidden_layer_and_no_bias():
    for model in (make_mlp(3, [], 2, "tanh", output_activation="tanh"), make_mlp(3, [8], 2, "tanh", bias=False)):
        ours, theirs = gradients_both_ways(model, torch.randn(10, 3, dtype=torch.float64), "both")
        for a, b in zip(ours, theirs):
            assert_close(a, b, "float64")


def test_grads_across_chunks(monkeypatch):
    from tritonjac import torch_engine

    monkeypatch.setattr(torch_engine.common, "CHUNK_BYTES", 4 * 16 * 8 * 5)
    model = make_mlp(3, [16, 16], 3, "softplus")
    ours, theirs = gradients_both_ways(model, torch.randn(3, 37, 3, dtype=torch.float64), "both")
    for a, b in zip(ours, theirs):
        assert_close(a, b, "float64")


@pytest.mark.parametrize("activation", ["softplus", "tanh", "gelu_tanh", "sine"])
@pytest.mark.parametrize("k", [2, 3])
def test_gradcheck(activation, k):
    model = make_mlp(3, [5, 4], 2, activation, output_activation="sigmoid", jacobian_inputs=k)
    layers = model.linear_layers
    weights = [l.weight.detach().clone().requires_grad_() for l in layers]
    biases = [l.bias.detach().clone().requires_grad_() for l in layers]
    acts = model.activations
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return tritonjac.mlp_jacobian(x, params[:3], params[3:], acts, jacobian_inputs=k)

    assert torch.autograd.gradcheck(f, (x, *weights, *biases))


def test_gradients_reach_conv_parameters():
    seq = nn.Sequential(nn.Conv1d(3, 8, 1), nn.Tanh(), nn.Conv1d(8, 2, 1)).double()
    model = tritonjac.JacobianMLP.from_module(seq)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    y, J = model(x)

    def loss(y, J):
        return y.square().sum() + J.square().sum()

    loss(y, J).backward()

    def per_point(p):
        return seq(p[None, :, None])[0, :, 0]

    points = x.transpose(1, 2).reshape(-1, 3)
    wanted = func_gradients(per_point, points, loss, list(seq.parameters()))[1:]
    for (name, p), want in zip(seq.named_parameters(), wanted, strict=True):
        assert_close(p.grad, want, "float64", f"gradient of {name}")


def test_only_requested_gradients_and_frozen_parameters():
    model = make_mlp(3, [8, 8], 2, "tanh")
    model.linear_layers[0].weight.requires_grad_(False)
    x = torch.randn(10, 3, dtype=torch.float64)  # no grad for x
    y, J = model(x)
    J.square().sum().backward()
    assert model.linear_layers[0].weight.grad is None
    seq = model.to_sequential()
    wanted = func_gradients(seq, x, lambda y, J: J.square().sum(), [model.linear_layers[1].weight])
    assert_close(model.linear_layers[1].weight.grad, wanted[1], "float64", "gradient of the second weight")


def test_no_grad_records_nothing():
    model = make_mlp(3, [8], 2, "tanh")
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        y, J = model(x)
    assert y.grad_fn is None and J.grad_fn is None
    with torch.inference_mode():
        y, J = model(x)
    assert y.grad_fn is None


def test_gradient_accumulation_and_retain_graph():
    model = make_mlp(3, [8, 8], 2, "softplus")
    x = torch.randn(10, 3, dtype=torch.float64)
    y, J = model(x)
    loss = J.square().sum() + y.sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    loss.backward()
    for p, g in zip(model.parameters(), first):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-12, atol=0)


def test_double_backward_is_refused_clearly():
    model = make_mlp(3, [8], 2, "tanh")
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y, J = model(x)
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(J.sum(), x, create_graph=True)


def test_training_lowers_a_jacobian_loss():
    # fit J to a rotation-free target: the loss must go down with Adam
    model = make_mlp(3, [32, 32], 3, "softplus")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(256, 3, dtype=torch.float64)
    target = torch.eye(3, dtype=torch.float64) * 2

    def loss_fn():
        y, J = model(x)
        return (J - target).square().mean() + (y - 2 * x).square().mean()

    start = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.2 * start
