"""Second derivatives in the forward pass (Hessians and Laplacians) on the PyTorch engine, against
torch.func.hessian over the model's plain forward in float64: values, every gradient of losses on
them, and the API around them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tritonjac
from helpers import assert_close, func_second_order, input_and_weight_gradients, make_mlp, poisson_loss
from tritonjac import JacobianMLP, PositionalEncoding
from tritonjac.activations import REGISTRY
from tritonjac.torch_engine import second_order


def losses(y, J, H, lap):
    """A loss touching every output, each term with its own weights (no symmetry to hide behind)."""
    weights_H = torch.arange(H[0].numel(), dtype=H.dtype).view(H.shape[1:]) / H[0].numel()
    return (
        y.sin().sum()
        + (J * J.roll(1, -1)).sum()
        + (H * weights_H).sum()
        + H.square().sum()
        + lap.cos().sum()
        + lap.square().sum()
    )


def gradients(loss, inputs):
    """d loss / d inputs, zeros for those it does not reach (and all zeros for a constant loss)."""
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True, retain_graph=True)


def check(model, x, what=""):
    """y, J, H and the Laplacian, alone and together, and the gradients of `losses` of x and every
    parameter, against torch.func in float64."""
    y_ref, J_ref, H_ref = func_second_order(model, x)
    lap_ref = H_ref.diagonal(dim1=-2, dim2=-1).sum(-1)
    y, J, H, lap = model(x, hessian=True, laplacian=True)
    for name, got, want in (("y", y, y_ref), ("J", J, J_ref), ("H", H, H_ref), ("lap", lap, lap_ref)):
        assert_close(got, want, "float64", f"{what} {name}")
    assert torch.equal(H, H.transpose(-1, -2)), f"{what}: H not symmetric"
    y2, J2, lap_alone = model(x, laplacian=True)  # the single Laplacian row
    assert_close(lap_alone, lap_ref, "float64", f"{what} Laplacian alone")
    y3, J3, H_alone = model(x, hessian=True)
    assert torch.equal(H_alone, H)

    params = [p for p in model.parameters() if p.requires_grad]
    xg = x.clone().requires_grad_()
    got = gradients(losses(*model(xg, hessian=True, laplacian=True)), [xg, *params])
    xr = x.clone().requires_grad_()
    y_r, J_r, H_r = func_second_order(model, xr)
    lap_r = H_r.diagonal(dim1=-2, dim2=-1).sum(-1)
    want = gradients(losses(y_r, J_r, H_r, lap_r), [xr, *params])
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, 1e-8, f"{what} gradient {'of x' if i == 0 else f'of parameter {i - 1}'}")
    # a loss on the Laplacian alone, through its own row
    xg = x.clone().requires_grad_()
    got = gradients(model(xg, laplacian=True)[2].square().sum(), [xg, *params])
    want = gradients(lap_r.square().sum(), [xr, *params])
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, 1e-8, f"{what} Laplacian-alone gradient {i}")


ACTIVATIONS = [name for name in REGISTRY if name != "identity"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_against_torch_func(activation):
    torch.manual_seed(0)
    model = make_mlp(4, [16, 12], 2, activation, jacobian_inputs=3)
    if activation == "softplus":
        model = make_mlp(4, [16, 12], 2, nn.Softplus(beta=3.0), jacobian_inputs=3)
    check(model, torch.randn(23, 4, dtype=torch.float64), activation)


@pytest.mark.parametrize("activation", ["tanh", "sine", "softplus"])
def test_output_activation_and_depths(activation):
    torch.manual_seed(1)
    for hidden in ([], [8], [8, 8, 8, 8]):
        model = make_mlp(3, hidden, 3, activation, output_activation="sigmoid")
        check(model, torch.randn(11, 3, dtype=torch.float64), f"{activation} {hidden}")


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_piecewise_linear_activations_give_exact_zeros(activation):
    torch.manual_seed(2)
    model = make_mlp(3, [16, 16], 2, activation)
    x = torch.randn(40, 3, dtype=torch.float64)
    y, J, H, lap = model(x, hessian=True, laplacian=True)
    assert torch.count_nonzero(H) == 0 and torch.count_nonzero(lap) == 0
    assert torch.count_nonzero(model(x, laplacian=True)[2]) == 0
    # the gradient of a loss on H still reaches the weights through nothing: exact zeros too
    W = model.linear_layers[0].weight
    (g,) = torch.autograd.grad(model(x, hessian=True)[2].sum(), W, allow_unused=True, materialize_grads=True)
    assert torch.count_nonzero(g) == 0


def test_selected_outputs_and_inputs_after_a_latent_code():
    torch.manual_seed(3)
    model = make_mlp(6, [16, 16], 5, "tanh", jacobian_inputs=slice(2, 5), jacobian_outputs=slice(1, 3))
    check(model, torch.randn(17, 6, dtype=torch.float64), "slices")


def test_real_network_layouts():
    """An encoding (its second derivatives analytic, its third in the backward), a latent code
    after the encoded inputs, a scaled skip and a selected output: NeuS's layout, small."""
    torch.manual_seed(4)
    model = JacobianMLP(
        3 + 2,
        [16, 16, 16, 16],
        4,
        nn.Softplus(beta=5.0),
        jacobian_inputs=3,
        jacobian_outputs=1,
        encoding=PositionalEncoding(3),
        skips=(2,),
        skip_scale=2**-0.5,
        dtype=torch.float64,
    )
    check(model, torch.randn(13, 5, dtype=torch.float64) * 0.5, "neus-like")
    windowed = JacobianMLP(
        3, [16, 16], 3, "sine", encoding=PositionalEncoding(2, alpha=1.5), skips=(1,), dtype=torch.float64
    )
    with torch.no_grad():
        for layer in windowed.linear_layers:
            layer.weight.mul_(1 / 30)
    check(windowed, torch.randn(9, 3, dtype=torch.float64), "windowed encoding")


def test_leading_dimensions_api_and_functional_forms():
    torch.manual_seed(5)
    model = make_mlp(3, [16], 2, "tanh")
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    y, J, H, lap = model(x, hessian=True, laplacian=True)
    assert y.shape == (2, 5, 2) and J.shape == (2, 5, 2, 3) and H.shape == (2, 5, 2, 3, 3) and lap.shape == (2, 5, 2)
    assert len(model(x)) == 2 and len(model(x, laplacian=True)) == 3
    weights = [m.weight for m in model.linear_layers]
    biases = [m.bias for m in model.linear_layers]
    out = tritonjac.mlp_jacobian(x, weights, biases, ["tanh", None], hessian=True, laplacian=True)
    for a, b in zip(out, (y, J, H, lap)):
        assert torch.equal(a, b)
    seq = model.to_sequential()
    for a, b in zip(tritonjac.jacobian(seq, x, laplacian=True), model(x, laplacian=True)):
        assert torch.equal(a, b)
    assert model(x[0, 0], hessian=True)[2].shape == (2, 3, 3)  # a single point


def test_conv1d_stack():
    torch.manual_seed(6)
    convs = nn.Sequential(nn.Conv1d(3, 16, 1), nn.Tanh(), nn.Conv1d(16, 2, 1)).double()
    model = JacobianMLP.from_module(convs)
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    y, J, lap = model(x, laplacian=True)
    assert y.shape == (2, 2, 7) and lap.shape == (2, 7, 2)
    points = x.transpose(1, 2).reshape(-1, 3)
    plain = JacobianMLP(3, [16], 2, "tanh", dtype=torch.float64)
    plain.load_state_dict({k: v.squeeze(-1) for k, v in model.state_dict().items()})
    assert_close(lap.reshape(-1, 2), plain(points, laplacian=True)[2], "float64-same-math", "Conv1d Laplacian")


def test_many_chunks_on_workers_are_deterministic(monkeypatch):
    monkeypatch.setattr(second_order, "SECOND_ORDER_CHUNK_BYTES", 8 * 16 * 8 * 3)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        torch.manual_seed(7)
        model = make_mlp(3, [16, 16], 2, "sine")
        x = torch.randn(31, 3, dtype=torch.float64)
        order = second_order.SecondOrder(3, True, True)
        assert second_order.chunk_points(31, model._weights(), order, x) == 2  # 16 chunks on 3 workers
        check(model, x, "chunks")
        runs = []
        for _ in range(2):
            model.zero_grad()
            losses(*model(x, hessian=True, laplacian=True)).backward()
            runs.append([p.grad.clone() for p in model.parameters()])
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


def test_float32_and_no_points():
    torch.manual_seed(8)
    model = make_mlp(3, [32, 32], 1, nn.Softplus(beta=100.0), dtype=torch.float32)
    x = torch.randn(64, 3) * 0.1
    y, J, H, lap = model(x, hessian=True, laplacian=True)
    model64 = make_mlp(3, [32, 32], 1, nn.Softplus(beta=100.0))
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    _, _, H_ref = func_second_order(model64, x.double())
    assert_close(H, H_ref, 1e-4, "float32 H")
    empty = model(torch.empty(0, 3), hessian=True, laplacian=True)
    assert [t.shape for t in empty] == [(0, 1), (0, 1, 3), (0, 1, 3, 3), (0, 1)]


def test_refusals_name_the_problem():
    model = make_mlp(3, [8], 1, "tanh")
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="need jacobian=True"):
        model(x, jacobian=False, laplacian=True)
    model.mode = "reverse"
    with pytest.raises(ValueError, match="mode='reverse' cannot give them"):
        model(x, hessian=True)
    model.mode = "auto"
    with pytest.raises(TypeError, match="float64"):  # what the Triton backend says of float64, as for J
        make_mlp(3, [8], 1, "tanh", backend="triton")(x, laplacian=True)
    xg = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="first-order.*laplacian=True"):
        torch.autograd.grad(model(xg, laplacian=True)[2].sum(), xg, create_graph=True)


def test_plan_names_the_second_order_rows():
    model = make_mlp(3, [8], 1, "tanh")
    x = torch.randn(4, 3, dtype=torch.float64)
    plan = model.plan(x, laplacian=True)
    assert (plan.engine, plan.mode) == ("torch", "forward")
    assert "1 + 3 + 1 Laplacian row per point and layer" in str(plan)
    assert "1 + 3 + 6 Hessian rows" in str(model.plan(x, hessian=True, laplacian=True))
    assert model.plan(x).mode == "reverse"  # J alone: one output of three inputs


def test_autocast_computes_in_bfloat16_and_trains_the_float32_parameters():
    torch.manual_seed(9)
    model = make_mlp(3, [32, 32], 2, "tanh", dtype=torch.float32)
    x = torch.randn(50, 3)
    expected = model(x, hessian=True, laplacian=True)
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(xg, hessian=True, laplacian=True)
    for name, g, e in zip(("y", "J", "H", "lap"), got, expected):
        assert g.dtype == torch.bfloat16
        assert_close(g, e, "bfloat16", f"autocast {name}")
    got[3].float().square().sum().backward()
    assert xg.grad.dtype == torch.float32 and model.linear_layers[0].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("hessian, laplacian", [(True, True), (False, True), (True, False)])
def test_opcheck(hessian, laplacian):
    from tritonjac.ops.common import band_weights_argument, bias_arguments
    from tritonjac.ops.second_order import mlp_second_order_backward_op, mlp_second_order_op

    encoding = PositionalEncoding(2, alpha=1.5)
    model = JacobianMLP(
        3 + 1, [8, 6, 8], 4, "tanh", jacobian_inputs=3, jacobian_outputs=slice(1, 3), encoding=encoding,
        skips=(2,), skip_scale=0.5, dtype=torch.float64,
    )  # fmt: skip
    weights = [m.weight for m in model.linear_layers]
    biases = [m.bias for m in model.linear_layers]
    biases[1] = None  # a layer without bias
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    biases = bias_arguments(biases, x)
    bands = band_weights_argument(model.encoding.band_weights(x), x)
    spec_args = model._spec.to_op_args()
    args = (x, weights, biases, bands, *spec_args, hessian, laplacian, False)
    torch.library.opcheck(mlp_second_order_op, args)
    with torch.no_grad():
        y, J, S = mlp_second_order_op(*args)
    detached = [t.detach() for t in weights], [t.detach() for t in biases]
    ones = [torch.ones_like(t) for t in (y, J, S)]
    torch.library.opcheck(
        mlp_second_order_backward_op, (x.detach(), *detached, bands, *ones, *spec_args, hessian, laplacian, False)
    )


def test_poisson_step_compiles_fullgraph_and_matches_eager():
    """SIREN-like training on a Poisson residual and a Hessian term, compiled with fullgraph=True:
    the custom op's backward recomputes the forward and gives eager's gradients."""
    torch._dynamo.reset()
    torch.manual_seed(10)
    model = make_mlp(3, [16, 16], 1, "sine", dtype=torch.float32)
    x = torch.rand(64, 3) * 2 - 1
    loss, params = poisson_loss(model), list(model.parameters())
    compiled = input_and_weight_gradients(torch.compile(loss, fullgraph=True), x, params)
    eager = input_and_weight_gradients(loss, x, params)
    for i, (got, want) in enumerate(zip(compiled, eager, strict=True)):
        assert_close(got, want, "float32", f"compiled gradient {i}")


def test_inference_mode_and_frozen_parameters():
    torch.manual_seed(11)
    model = make_mlp(3, [16, 16], 2, "tanh")
    x = torch.randn(40, 3, dtype=torch.float64)
    expected = model(x, hessian=True, laplacian=True)
    with torch.inference_mode():
        got = model(x, hessian=True, laplacian=True)
    for g, e in zip(got, expected):
        assert g.is_inference() and torch.equal(g, e)
    model.requires_grad_(False)  # a fitted field: only x is differentiated
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(model(xg, laplacian=True)[2].square().sum(), xg)
    xr = x.clone().requires_grad_()
    lap_ref = func_second_order(model, xr)[2].diagonal(dim1=-2, dim2=-1).sum(-1)
    (want,) = torch.autograd.grad(lap_ref.square().sum(), xr)
    assert_close(g, want, 1e-8, "x gradient with frozen parameters")
