"""JacobianMLP construction, conversion of existing models, parameter sharing and state_dict."""

import pytest
import torch
from torch import nn

import tritonjac
from helpers import assert_close, func_reference, sequential_reference
from tritonjac import JacobianMLP


def linear_stack(*widths, act=nn.Softplus, dtype=torch.float64):
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def test_constructor_builds_the_equivalent_sequential():
    model = JacobianMLP(3, [64, 32], 2, nn.Softplus(beta=100), output_activation="tanh")
    kinds = [type(m) for m in model.children()]
    assert kinds == [nn.Linear, nn.Softplus, nn.Linear, nn.Softplus, nn.Linear, nn.Tanh]
    assert model.in_features == 3 and model.hidden_features == [64, 32] and model.out_features == 2
    assert model.jacobian_inputs == 3 and model.backend == "auto"
    assert str(model.activations[0]) == "softplus(100, threshold=20)"
    assert model.activations[-1].name == "tanh"
    assert "jacobian_inputs=3" in repr(model)


def test_constructor_honours_device_dtype_and_bias():
    model = JacobianMLP(3, [8], 2, bias=False, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(layer.bias is None for layer in model.linear_layers)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(activation="swish"), "unknown activation 'swish'"),
        (dict(activation=nn.Hardtanh()), "unsupported activation module Hardtanh"),
        (dict(activation=3), "activation must be"),
        (dict(jacobian_inputs=4), "jacobian_inputs must be None, an int from 1 to in_features=3 or a slice"),
        (dict(jacobian_inputs=0), "jacobian_inputs"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(dtype=torch.int32), "dtype torch.int32 is not supported"),
    ],
)
def test_constructor_refusals(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        JacobianMLP(3, [8], 2, **kwargs)


def test_bad_widths_are_refused():
    with pytest.raises(ValueError, match="positive ints"):
        JacobianMLP(3, [8, 0], 2)


def test_backend_attribute():
    model = JacobianMLP(3, [8], 2, dtype=torch.float64)
    model.backend = "torch"
    model(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "gpu"
    model.backend = "triton"
    with pytest.raises(TypeError, match="Triton backend computes in float32, bfloat16 or float16"):
        model(torch.randn(4, 3, dtype=torch.float64))


# ---- from_module ---------------------------------------------------------------------------------
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, lambda: nn.Softplus(beta=100), nn.SiLU, nn.GELU, tritonjac.Sine])
def test_from_linear_stack(act):
    seq = linear_stack(3, 32, 32, 3, act=act)
    if isinstance(act(), tritonjac.Sine):
        with torch.no_grad():
            for m in seq:
                if isinstance(m, nn.Linear):
                    m.weight.mul_(1 / 30)
    model = JacobianMLP.from_module(seq)
    x = torch.randn(4, 25, 3, dtype=torch.float64)
    y, J = model(x)
    y_ref, J_ref = sequential_reference(seq, x, 3)
    assert_close(y, y_ref, "float64", "y")
    assert_close(J, J_ref, "float64", "J")


def test_from_module_keeps_names_mixed_activations_and_identity():
    from collections import OrderedDict

    seq = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(5, 16),
            act1=nn.LeakyReLU(0.3),
            fc2=nn.Linear(16, 16),
            skip=nn.Identity(),
            fc3=nn.Linear(16, 16),
            act3=nn.Tanh(),
            out=nn.Linear(16, 2),
            out_act=nn.Sigmoid(),
        )
    ).double()
    model = JacobianMLP.from_module(seq, jacobian_inputs=3)
    assert [a.name for a in model.activations] == ["leaky_relu", "identity", "tanh", "sigmoid"]
    assert set(model.state_dict()) == set(seq.state_dict())
    x = torch.randn(30, 5, dtype=torch.float64)
    y, J = model(x)
    y_ref, J_ref = sequential_reference(seq, x, 3)
    assert_close(y, y_ref, "float64", "y")
    assert_close(J, J_ref, "float64", "J")


def test_from_conv1d_stack_is_channels_first():
    seq = nn.Sequential(
        nn.Conv1d(3, 32, 1), nn.ReLU(), nn.Conv1d(32, 16, kernel_size=1), nn.Softplus(), nn.Conv1d(16, 4, 1)
    ).double()
    model = JacobianMLP.from_module(seq)
    x = torch.randn(2, 3, 50, dtype=torch.float64)  # (B, C_in, N)
    y, J = model(x)
    assert y.shape == (2, 4, 50) and J.shape == (2, 50, 4, 3)
    assert torch.allclose(y, seq(x), rtol=1e-12, atol=1e-12)

    def per_point(p):
        return seq(p[None, :, None])[0, :, 0]

    _, J_ref = func_reference(per_point, x.transpose(1, 2).reshape(-1, 3), 3)
    assert_close(J, J_ref.reshape(2, 50, 4, 3), "float64")
    # unbatched (C_in, N), as Conv1d accepts
    y1, J1 = model(x[0])
    assert torch.allclose(y1, y[0]) and torch.allclose(J1, J[0])
    assert torch.equal(model(x, jacobian=False), seq(x))


def test_conv_input_checks():
    model = JacobianMLP.from_module(nn.Sequential(nn.Conv1d(3, 4, 1)).double())
    with pytest.raises(ValueError, match="x has 5 channels"):
        model(torch.randn(2, 5, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B, C_in, N\)"):
        model(torch.randn(2, 2, 3, 10, dtype=torch.float64))


@pytest.mark.parametrize("conv", [True, False])
def test_parameters_are_shared(conv):
    if conv:
        seq = nn.Sequential(nn.Conv1d(3, 8, 1), nn.Tanh(), nn.Conv1d(8, 3, 1)).double()
        x = torch.randn(2, 3, 7, dtype=torch.float64)
    else:
        seq = linear_stack(3, 8, 3)
        x = torch.randn(7, 3, dtype=torch.float64)
    model = JacobianMLP.from_module(seq)
    assert {id(p) for p in model.parameters()} == {id(p) for p in seq.parameters()}
    before = [p.detach().clone() for p in seq.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y, J = model(x)
    (y.square().sum() + J.square().sum()).backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(seq.parameters(), before))
    # and the other way round: a step on the original changes what the converted module computes
    y_old = model(x)[0].detach()
    with torch.no_grad():
        next(seq.parameters()).add_(1.0)
    assert not torch.allclose(model(x)[0], y_old)


def bad_stacks():
    hooked = nn.Linear(3, 3)
    hooked.register_forward_pre_hook(lambda m, a: None)
    return [
        (
            nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)),
            r"layer 1 \('1': BatchNorm1d\) is not supported",
        ),
        (
            nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.1), nn.Linear(8, 3)),
            r"layer 1 \('1': Dropout\) is not supported",
        ),
        (nn.Sequential(nn.Linear(3, 8), nn.Hardtanh(), nn.Linear(8, 3)), r"layer 1 \('1': Hardtanh\) is not supported"),
        (nn.Sequential(nn.Conv1d(3, 8, 3), nn.Conv1d(8, 3, 1)), r"layer 0 .* not point-wise \(kernel_size=3\)"),
        (nn.Sequential(nn.Conv1d(3, 8, 1, padding=1)), r"not point-wise \(padding=\(1,\)\)"),
        (nn.Sequential(nn.Conv1d(4, 8, 1, groups=2)), r"not point-wise \(groups=2\)"),
        (nn.Sequential(nn.Conv1d(4, 8, 1, dilation=2)), r"not point-wise \(dilation=2\)"),
        (nn.Sequential(nn.Conv1d(4, 8, 1, stride=2)), r"not point-wise \(stride=2\)"),
        (nn.Sequential(nn.Conv2d(3, 8, 1)), r"layer 0 \('0': Conv2d\) is not supported"),
        (nn.Sequential(nn.Tanh(), nn.Linear(3, 3)), r"layer 0 .* must start with a Linear"),
        (nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.ReLU(), nn.Linear(8, 3)), r"layer 2 .* two activations in a row"),
        (nn.Sequential(nn.Linear(3, 8), nn.Conv1d(8, 3, 1)), r"layer 1 .* mixes Linear and Conv1d"),
        (nn.Sequential(hooked), r"layer 0 .* has forward hooks"),
        (nn.Sequential(), r"no Linear or Conv1d layer"),
        (
            nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(5, 3)),
            r"layer '0' has 8 outputs but the next layer '2' expects 5 inputs",
        ),
        (nn.Linear(3, 3), r"from_module expects an nn.Sequential.* got Linear"),
        (nn.Sequential(nn.Linear(3, 8), nn.ModuleList([nn.Tanh()])), r"layer 1 \('1': ModuleList\) is not supported"),
    ]


@pytest.mark.parametrize("module, match", bad_stacks(), ids=lambda v: v if isinstance(v, str) else "")
def test_from_module_refusals(module, match):
    with pytest.raises((ValueError, TypeError), match=match):
        JacobianMLP.from_module(module)


def test_subclassed_layer_is_refused():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match=r"MyLinear\) is not supported"):
        JacobianMLP.from_module(nn.Sequential(MyLinear(3, 3)))


# ---- state_dict and tritonjac.jacobian ----------------------------------------------------------------
def test_state_dict_round_trip():
    model = JacobianMLP(3, [16, 16], 2, nn.Softplus(beta=10), output_activation="tanh", dtype=torch.float64)
    seq = linear_stack(3, 16, 16, 2, act=lambda: nn.Softplus(beta=10))
    seq.append(nn.Tanh())
    seq.load_state_dict(model.state_dict())  # strict: same keys, same shapes
    x = torch.randn(9, 3, dtype=torch.float64)
    assert torch.equal(seq(x), model(x, jacobian=False))
    other = JacobianMLP(3, [16, 16], 2, nn.Softplus(beta=10), output_activation="tanh", dtype=torch.float64)
    other.load_state_dict(seq.state_dict())
    assert torch.equal(other(x)[1], model(x)[1])
    assert isinstance(model.to_sequential(), nn.Sequential)
    assert model.to_sequential()[0] is model.linear_layers[0]


def test_jacobian_function_converts_once_and_follows_changes():
    seq = linear_stack(3, 16, 3)
    x = torch.randn(5, 3, dtype=torch.float64)
    y, J = tritonjac.jacobian(seq, x)
    y_ref, J_ref = sequential_reference(seq, x, 3)
    assert_close(J, J_ref, "float64")
    from tritonjac.module import _converted

    first = _converted[seq][None][1]
    tritonjac.jacobian(seq, x)
    assert _converted[seq][None][1] is first  # cached
    _, J2 = tritonjac.jacobian(seq, x, jacobian_inputs=2)
    assert J2.shape == (5, 3, 2)
    seq[2] = nn.Linear(16, 3).double()  # replacing a layer invalidates the cached conversion
    _, J3 = tritonjac.jacobian(seq, x)
    assert_close(J3, sequential_reference(seq, x, 3)[1], "float64")
    model = JacobianMLP(3, [4], 2, dtype=torch.float64)
    assert torch.equal(tritonjac.jacobian(model, x)[1], model(x)[1])


def test_functional_api():
    W1, b1 = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    W2 = torch.randn(2, 8, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64)
    y, J = tritonjac.mlp_jacobian(x, [W1, W2], [b1, None], ["tanh", None])

    def f(p):
        return W2 @ torch.tanh(W1 @ p + b1)

    y_ref, J_ref = func_reference(f, x, 3)
    assert_close(y, y_ref, "float64-same-math", "y")
    assert_close(J, J_ref, "float64-same-math", "J")
    with pytest.raises(ValueError, match="got 1 activations for 2 layers"):
        tritonjac.mlp_jacobian(x, [W1, W2], None, ["tanh"])
    with pytest.raises(ValueError, match="got 1 biases for 2 layers"):
        tritonjac.mlp_jacobian(x, [W1, W2], [b1], ["tanh", None])
    with pytest.raises(ValueError, match="layer 1 expects 7 inputs"):
        tritonjac.mlp_jacobian(x, [W1, torch.randn(2, 7, dtype=torch.float64)], None, ["tanh", None])
    with pytest.raises(ValueError, match=r"layer 0 bias has shape \(3,\), expected \(8,\)"):
        tritonjac.mlp_jacobian(x, [W1, W2], [b1[:3], None], ["tanh", None])
    with pytest.raises(ValueError, match="at least one layer"):
        tritonjac.mlp_jacobian(x, [], None, [])
