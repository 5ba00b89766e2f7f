"""y and J of the PyTorch engine against torch.func in float64 (docs/design.md, section 6, check 1)."""

import pytest
import torch
from torch import nn

import tritonjac
from helpers import assert_close, make_mlp, sequential_reference
from tritonjac.activations import ACTIVATION_NAMES, as_activation

ACTIVATIONS = [a for a in ACTIVATION_NAMES if a != "identity"] + [
    nn.Softplus(beta=100),
    nn.LeakyReLU(0.2),
    nn.GELU(approximate="tanh"),
    tritonjac.Sine(w0=30.0),
    nn.Identity(),
]


def check(model, x):
    y, J = model(x)
    y_ref, J_ref = sequential_reference(model.to_sequential(), x, model.jacobian_inputs)
    assert y.shape == y_ref.shape and J.shape == J_ref.shape
    assert_close(y, y_ref, "float64", "y")
    assert_close(J, J_ref, "float64", "J")
    return y, J


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("output_activation", [None, "tanh"], ids=["linear-out", "tanh-out"])
def test_every_activation(activation, output_activation):
    model = make_mlp(3, [32, 17], 3, activation, output_activation=output_activation)
    check(model, torch.randn(200, 3, dtype=torch.float64))


@pytest.mark.parametrize("activation", ACTIVATIONS[:-1], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_activations_written_into_buffers_equal_their_formulas(activation, dtype):
    """`Activation.into` (the CPU engine's allocation-free path) gives s, s' and s'' bit for bit as
    `evaluate` does, writes into strided views, and leaves the s'' buffer alone where s'' is zero."""
    act = as_activation(activation)
    z = torch.randn(40, 24, dtype=dtype) * 3
    z[0, :4] = torch.tensor([0.0, 25.0 / max(act.param, 1.0), -1e-30, 200.0])  # 0, softplus's threshold, tails
    value, slope, second = (torch.full((2, 40, 24), float("nan"), dtype=dtype)[1] for _ in range(3))
    if not act.into(z, value, slope, second):
        assert act.kind.into is None
        return
    want_value, want_slope, want_second = act.evaluate(z, curvature=True)
    assert torch.equal(value, want_value) and torch.equal(slope, want_slope)
    if want_second is None:
        assert second.isnan().all()
    else:
        assert torch.equal(second, want_second)
    slope.fill_(float("nan"))
    act.into(z, value, slope)  # without s''
    assert torch.equal(slope, want_slope)
    value.fill_(float("nan"))
    act.into(z, value)  # s alone
    assert torch.equal(value, want_value)


def test_softplus_threshold_region_matches_torch():
    # beta * z crosses nn.Softplus's threshold (20): there torch switches to the identity
    model = make_mlp(3, [16, 16], 2, nn.Softplus(beta=100))
    x = torch.randn(500, 3, dtype=torch.float64) * 3
    check(model, x)


@pytest.mark.parametrize("depth", range(1, 9))
def test_depths(depth):
    model = make_mlp(3, [24] * depth, 3, "tanh")
    check(model, torch.randn(64, 3, dtype=torch.float64))


def test_no_hidden_layer():
    model = make_mlp(4, [], 2, "softplus")
    y, J = check(model, torch.randn(10, 4, dtype=torch.float64))
    assert torch.allclose(J, model.linear_layers[0].weight.expand(10, 2, 4))


@pytest.mark.parametrize("width", [1, 3, 48, 100, 257])
def test_widths(width):
    model = make_mlp(3, [width, width], 3, "silu")
    check(model, torch.randn(50, 3, dtype=torch.float64))


def test_mixed_widths():
    model = make_mlp(5, [7, 100, 3, 48], 4, "gelu")
    check(model, torch.randn(40, 5, dtype=torch.float64))


@pytest.mark.parametrize("d_in,d_out", [(1, 1), (1, 8), (2, 5), (3, 3), (8, 1), (8, 8), (6, 2)])
def test_feature_counts(d_in, d_out):
    model = make_mlp(d_in, [20, 20], d_out, "sigmoid")
    check(model, torch.randn(30, d_in, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_jacobian_inputs_subset(k):
    # a point xyz followed by a latent code that is not differentiated
    model = make_mlp(7, [32, 32], 4, "softplus", jacobian_inputs=k)
    y, J = check(model, torch.randn(40, 7, dtype=torch.float64))
    assert J.shape == (40, 4, k)


def test_without_bias():
    model = make_mlp(3, [16, 16], 3, "tanh", bias=False)
    check(model, torch.randn(20, 3, dtype=torch.float64))


@pytest.mark.parametrize("lead", [(), (7,), (2, 5), (2, 3, 4)], ids=str)
def test_leading_shapes(lead):
    model = make_mlp(3, [16, 16], 2, "softplus")
    x = torch.randn(*lead, 3, dtype=torch.float64)
    y, J = check(model, x)
    assert y.shape == (*lead, 2) and J.shape == (*lead, 2, 3)


@pytest.mark.parametrize("n", [0, 1, 2, 1023, 10_000])
def test_point_counts(n):
    model = make_mlp(3, [48, 48], 3, "softplus")
    check(model, torch.randn(n, 3, dtype=torch.float64))


def test_many_chunks(monkeypatch):
    # force tiny chunks so that chunk boundaries (and a ragged last chunk) are exercised
    from tritonjac import torch_engine

    monkeypatch.setattr(torch_engine.common, "CHUNK_BYTES", 4 * 16 * 8 * 7)
    model = make_mlp(3, [16, 16], 3, "tanh")
    check(model, torch.randn(101, 3, dtype=torch.float64))


def test_gpu_chunks_are_large():
    """On a GPU each chunk costs a score of launches: CPU-sized chunks made the engine 145x slower
    than the three-grad trick on an H200 at 2^20 points. A GPU tensor (meta stands in) takes chunks
    of 2^16 points and more for the benchmark network; a CPU one keeps its cache-sized chunks."""
    from tritonjac import torch_engine
    from tritonjac.network import NetworkSpec

    weights = [torch.empty(64, 3), *[torch.empty(64, 64)] * 3, torch.empty(3, 64)]
    spec = NetworkSpec((as_activation("softplus"),) * 4 + (as_activation(None),), 3)
    points = 1 << 20
    on_cpu = torch_engine.chunk_points(points, weights, spec, torch.empty(1, 3))
    on_gpu = torch_engine.chunk_points(points, weights, spec, torch.empty(1, 3, device="meta"))
    assert on_cpu == torch_engine.common.CHUNK_BYTES // (4 * 64 * 4)
    assert on_gpu >= 1 << 16


def test_float32_close_to_float64():
    model = make_mlp(3, [64] * 4, 3, nn.Softplus(beta=100))
    x = torch.randn(1000, 3, dtype=torch.float64)
    y64, J64 = model(x)
    y32, J32 = model.float()(x.float())
    assert y32.dtype == J32.dtype == torch.float32
    assert_close(y32, y64, "float32-engine", "y")
    assert_close(J32, J64, "float32-engine", "J")


def test_jacobian_false_is_plain_forward():
    model = make_mlp(3, [16, 16], 2, "softplus")
    x = torch.randn(10, 3, dtype=torch.float64)
    y = model(x, jacobian=False)
    assert torch.equal(y, model.to_sequential()(x))
    assert torch.allclose(y, model(x)[0], rtol=1e-12, atol=0)
