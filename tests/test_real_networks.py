"""The networks users of per-point derivatives train, at their published sizes: NeuS/IDR, DeepSDF,
IGR's shape space, Nerfies' warp field, D-NeRF's deformation field and SIREN.

Each reference below is this file's own plain PyTorch forward, written from the papers'
descriptions (encoding, skip placement and scale, activations, widths) over the very nn.Linear
modules the JacobianMLP holds. Its J and every gradient come from autograd (create_graph=True) in
float64: the oracle for y, J (1e-10) and the gradients of losses on y and J (1e-8).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonjac
from helpers import TOLERANCE, TRITON_DEVICE, assert_close, rel_err
from tritonjac import JacobianMLP, PositionalEncoding
from tritonjac.init import geometric_, siren_
from tritonjac.triton_engine.tuning import OLD_TRITON

GRADIENT_TOLERANCE = 1e-8  # autograd's double backward against the analytic backward, float64


# ---- the references: plain PyTorch, from the papers ---------------------------------------------
def nerf_encoding(x, num_frequencies, alpha=None):
    """NeRF: [x, sin(2^0 x), cos(2^0 x), ..., sin(2^(L-1) x), cos(2^(L-1) x)]; Nerfies' window
    scales band i by (1 - cos(pi * clamp(alpha - i, 0, 1))) / 2."""
    features = [x]
    for i in range(num_frequencies):
        w = 1.0 if alpha is None else (1 - math.cos(math.pi * min(max(alpha - i, 0.0), 1.0))) / 2
        features += [w * torch.sin(2.0**i * x), w * torch.cos(2.0**i * x)]
    return torch.cat(features, -1)


def run_layers(lins, inputs, skip_at, *, activation, last_activation=None, scale=1.0, input_first=False):
    """The layer loop these codebases share: before layer `skip_at` the input is concatenated."""
    h = inputs
    for l, lin in enumerate(lins):
        if l == skip_at:
            h = torch.cat([inputs, h] if input_first else [h, inputs], -1) * scale
        h = lin(h)
        if l < len(lins) - 1:
            h = activation(h)
        elif last_activation is not None:
            h = last_activation(h)
    return h


def reference_jacobian(forward, x, inputs: slice, outputs: slice):
    """y, and J = d y[outputs] / d x[inputs] by autograd with create_graph (one grad per output)."""
    y = forward(x)
    rows = []
    for o in range(*outputs.indices(y.shape[-1])):
        (g,) = torch.autograd.grad(y[..., o].sum(), x, create_graph=True)
        rows.append(g[..., inputs])
    return y, torch.stack(rows, -2)


def eikonal(y, J):
    return ((J.norm(dim=-1) - 1) ** 2).mean() + (y[..., 0] ** 2).mean()


def squares(y, J):
    return (J**2).mean() + (y**2).mean()


def elastic(y, J):
    """Nerfies' elastic loss: the squared log singular values of the 3x3 Jacobian."""
    return (torch.log(torch.linalg.svdvals(J)) ** 2).sum(-1).mean() + 0.1 * (y**2).mean()


# ---- the networks -----------------------------------------------------------------------------------
def neus(weight_norm=None):
    """NeuS/IDR SDF: PE(6) of xyz (39), 8 x 256 Softplus(100), skip at 4 scaled 1/sqrt(2) with the
    layer before narrowed to 256 - 39, 257 outputs of which only the SDF is differentiated."""
    torch.manual_seed(0)
    model = JacobianMLP(
        3, [256, 256, 256, 217, 256, 256, 256, 256], 257, nn.Softplus(beta=100), encoding=PositionalEncoding(6),
        skips=(4,), skip_scale=2**-0.5, jacobian_outputs=1, dtype=torch.float64,
    )  # fmt: skip
    geometric_(model, radius=0.5)
    if weight_norm is not None:
        for lin in model.linear_layers:
            weight_norm(lin)

    def forward(x):
        inputs = nerf_encoding(x, 6)
        return run_layers(model.linear_layers, inputs, 4, activation=lambda z: F.softplus(z, beta=100), scale=2**-0.5)

    x = torch.rand(24, 3, dtype=torch.float64) * 2 - 1
    return model, forward, x, slice(0, 3), slice(0, 1), eikonal


def deepsdf(width=512, latent=256):
    """DeepSDF: a 256-d latent code first and xyz last (259 inputs), 8 x 512 ReLU, unscaled skip at
    4 (layer 3 narrowed to 512 - 259), tanh on the SDF, J with respect to the last 3 inputs."""
    torch.manual_seed(1)
    d_in = latent + 3
    model = JacobianMLP(
        d_in, [width] * 3 + [width - d_in] + [width] * 4, 1, "relu", output_activation="tanh",
        jacobian_inputs=slice(-3, None), skips=(4,), dtype=torch.float64,
    )  # fmt: skip

    def forward(x):
        return run_layers(model.linear_layers, x, 4, activation=torch.relu, last_activation=torch.tanh)

    code = torch.randn(16, latent, dtype=torch.float64) * 0.01
    x = torch.cat([code, torch.rand(16, 3, dtype=torch.float64) - 0.5], -1)
    return model, forward, x, slice(latent, d_in), slice(0, 1), eikonal


def igr(width=512, latent=256):
    """IGR's shape space: latent (256) then xyz, 8 x 512 Softplus(100), skip at 4 scaled
    1/sqrt(2), geometric initialisation, the eikonal loss on the gradient w.r.t. xyz."""
    torch.manual_seed(2)
    d_in = latent + 3
    model = JacobianMLP(
        d_in, [width] * 3 + [width - d_in] + [width] * 4, 1, nn.Softplus(beta=100),
        jacobian_inputs=slice(latent, d_in), skips=(4,), skip_scale=2**-0.5, dtype=torch.float64,
    )  # fmt: skip
    geometric_(model, radius=1.0)

    def forward(x):
        return run_layers(model.linear_layers, x, 4, activation=lambda z: F.softplus(z, beta=100), scale=2**-0.5)

    x = torch.cat([torch.randn(16, latent, dtype=torch.float64) * 0.1, torch.randn(16, 3, dtype=torch.float64)], -1)
    return model, forward, x, slice(latent, d_in), slice(0, 1), eikonal


def nerfies(alpha=3.5):
    """Nerfies' warp field: windowed PE(8) of xyz (51) then an 8-d per-frame code, 6 x 128 ReLU,
    unscaled skip at 4, 6 outputs; the elastic loss on the 3x3 Jacobian of outputs 3..5."""
    torch.manual_seed(3)
    model = JacobianMLP(
        11, [128] * 6, 6, "relu", jacobian_inputs=3, jacobian_outputs=slice(3, 6),
        encoding=PositionalEncoding(8, alpha=alpha), skips=(4,), dtype=torch.float64,
    )  # fmt: skip

    def forward(x):
        inputs = torch.cat([nerf_encoding(x[..., :3], 8, alpha), x[..., 3:]], -1)
        return run_layers(model.linear_layers, inputs, 4, activation=torch.relu)

    x = torch.cat([torch.rand(32, 3, dtype=torch.float64) - 0.5, torch.randn(32, 8, dtype=torch.float64)], -1)
    return model, forward, x, slice(0, 3), slice(3, 6), elastic


def dnerf(width=256):
    """D-NeRF's deformation field: PE(10) of xyz, then t's own encoding (computed outside: not
    differentiated), 8 x 256 ReLU, the input placed first at the skip into layer 5, 3 outputs."""
    torch.manual_seed(4)
    model = JacobianMLP(
        3 + 13, [width] * 8, 3, "relu", jacobian_inputs=3, encoding=PositionalEncoding(10),
        skips=(5,), skip_input_first=True, dtype=torch.float64,
    )  # fmt: skip

    def forward(x):
        inputs = torch.cat([nerf_encoding(x[..., :3], 10), x[..., 3:]], -1)
        return run_layers(model.linear_layers, inputs, 5, activation=torch.relu, input_first=True)

    t = torch.rand(20, 1, dtype=torch.float64)
    x = torch.cat([torch.rand(20, 3, dtype=torch.float64) - 0.5, nerf_encoding(t, 6)], -1)
    return model, forward, x, slice(0, 3), slice(0, 3), elastic


def siren():
    """SIREN's SDF: 3 -> 3 x 256 sin(30 z) -> 1, SIREN's initialisation."""
    torch.manual_seed(5)
    model = siren_(JacobianMLP(3, [256] * 3, 1, tritonjac.Sine(30.0), dtype=torch.float64))

    def forward(x):
        return run_layers(model.linear_layers, x, None, activation=lambda z: torch.sin(30 * z))

    x = torch.rand(24, 3, dtype=torch.float64) * 2 - 1
    return model, forward, x, slice(0, 3), slice(0, 1), eikonal


NETWORKS = {"neus": neus, "deepsdf": deepsdf, "igr": igr, "nerfies": nerfies, "dnerf": dnerf, "siren": siren}
# The Triton kernels' test sizes: the published ones, except narrower layers and latent codes (the
# same structure) where the interpreter would take over half a minute a network.
KERNEL_SIZES = {"deepsdf": dict(width=64, latent=13), "igr": dict(width=64, latent=13), "dnerf": dict(width=64)}


def check_against_reference(model, forward, x, inputs, outputs, loss):
    params = list(model.parameters())
    y, J = model(x.clone().requires_grad_())
    xr = x.clone().requires_grad_()
    y_ref, J_ref = reference_jacobian(forward, xr, inputs, outputs)
    assert_close(y, y_ref, "float64", "y")
    assert_close(J, J_ref, "float64", "J")
    xo = x.clone().requires_grad_()
    y, J = model(xo)
    ours = torch.autograd.grad(loss(y, J), [xo, *params])
    expected = torch.autograd.grad(loss(y_ref, J_ref), [xr, *params])
    compare_gradients(model, ours, expected, inputs, lambda name, part: GRADIENT_TOLERANCE)


def compare_gradients(model, ours, expected, inputs, tolerance):
    """Each gradient (x's, then every parameter's) against the expected one; x's in two parts on
    their own scales, the differentiated inputs and the others (a latent code), whose gradients
    can be many orders of magnitude smaller. tolerance(name, part) gives each part's figure."""
    names = ["x"] + [n for n, _ in model.named_parameters()]
    for name, g, e in zip(names, ours, expected):
        g = g.detach().cpu().double()
        parts = [(name, slice(None))]
        if name == "x":
            others = torch.ones(g.shape[-1], dtype=torch.bool)
            others[inputs] = False
            parts = [("x[inputs]", inputs)] + ([("x[other inputs]", others)] if others.any() else [])
        for part, columns in parts:
            assert_close(g[..., columns], e[..., columns], tolerance(name, columns), f"gradient of {part}")


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("name", NETWORKS)
def test_network_against_its_plain_pytorch_version(name, mode):
    """Both modes of the PyTorch engine ("auto" takes reverse for the SDFs' one output)."""
    model, forward, x, inputs, outputs, loss = NETWORKS[name]()
    model.mode = mode
    check_against_reference(model, forward, x, inputs, outputs, loss)


# the networks the whole-network forward kernel takes (one skip into a hidden layer, equal widths up
# to 128), run again on the per-layer kernels; the SDFs run in reverse mode ("auto"), the two with
# a latent code again in forward mode (Nerfies' warp, per layer, runs an encoding in forward mode)
WHOLE_NETWORK = {"nerfies", "dnerf"}
SDFS = {"neus", "deepsdf", "igr", "siren"}
KERNEL_CASES = (
    [(name, "auto") for name in NETWORKS]
    + [(name, "layers") for name in sorted(WHOLE_NETWORK)]
    + [(name, "forward-mode") for name in ("deepsdf", "igr")]
)


@pytest.mark.parametrize("name, plan", KERNEL_CASES, ids=[f"{n}-{p}" for n, p in KERNEL_CASES])
def test_triton_kernels_on_the_network(name, plan, kernels_run, monkeypatch, tf32):
    """The kernels in float32 against the float64 reference: within the fp32 figure, or twice
    plain PyTorch's own float32 error on the same inputs where that is larger (TF32 on a GPU: the
    test runs at matmul precision "high", where Nerfies' warp fits the whole-network forward on
    sm_90; the interpreter computes exactly). The elastic loss is replaced by J^2 here: its log
    singular values amplify float32 rounding in any engine (x's gradient: 2.3e-5 in plain PyTorch,
    5e-5 and 7e-5 in ours, kernels and PyTorch engine); the float64 test checks it."""
    model, forward, x, inputs, outputs, loss = NETWORKS[name](**KERNEL_SIZES.get(name, {}))
    if loss is elastic:
        loss = squares
    xr = x.clone().requires_grad_()
    y_ref, J_ref = reference_jacobian(forward, xr, inputs, outputs)
    expected = torch.autograd.grad(loss(y_ref, J_ref), [xr, *model.parameters()])

    def gradients(y, J, xo, params):
        return torch.autograd.grad(loss(y.double(), J.double()), [xo, *params])

    kernels = copy.deepcopy(model).to(device=TRITON_DEVICE, dtype=torch.float32)
    kernels.backend = "triton"
    if plan == "layers":
        from tritonjac.triton_engine import plans

        monkeypatch.setattr(plans, "MAX_NETWORK_WIDTH", 0)
    if plan == "forward-mode":
        kernels.mode = "forward"
    xo = x.to(TRITON_DEVICE, torch.float32).requires_grad_()
    assert kernels.plan(xo).mode == ("reverse" if name in SDFS and plan == "auto" else "forward")
    y, J = kernels(xo)
    ours = gradients(y, J, xo, list(kernels.parameters()))
    whole = "mlp_forward" in kernels_run
    # before triton 3.8 the encoded whole-network configurations at width 128 are left out (they spilled)
    takes_whole = name in WHOLE_NETWORK and plan == "auto" and not (OLD_TRITON and kernels.hidden_features[0] >= 128)
    assert whole == takes_whole, f"kernels run: {sorted(set(kernels_run))}"
    assert "mlp_backward" not in kernels_run  # real networks' backward runs per layer

    # the same network rebuilt (same seed) and converted in place: its forward reads its layers
    plain, forward32, *_ = NETWORKS[name](**KERNEL_SIZES.get(name, {}))
    plain.to(device=TRITON_DEVICE, dtype=torch.float32)
    xp = x.to(TRITON_DEVICE, torch.float32).requires_grad_()
    y_p, J_p = reference_jacobian(forward32, xp, inputs, outputs)
    peer = gradients(y_p, J_p, xp, list(plain.parameters()))

    for what, ours_, peer_, ref in (("y", y, y_p, y_ref), ("J", J, J_p, J_ref)):
        assert_close(ours_, ref, max(TOLERANCE["float32"], 2 * rel_err(peer_.detach().cpu().double(), ref)), what)
    peers = dict(zip(["x"] + [n for n, _ in model.named_parameters()], peer))
    expected_by_name = dict(zip(peers, expected))

    def tolerance(name, columns):
        error = rel_err(peers[name].detach().cpu().double()[..., columns], expected_by_name[name][..., columns])
        return max(TOLERANCE["float32-gradient"], 2 * error)

    compare_gradients(model, ours, expected, inputs, tolerance)


def test_plain_forward_is_the_reference():
    """model(x, jacobian=False) runs the same network."""
    for build in NETWORKS.values():
        model, forward, x, *_ = build()
        assert_close(model(x, jacobian=False), forward(x), 1e-14, "y without J")


@pytest.mark.parametrize("window", [0.0, 2.3, 8.0])
def test_nerfies_window_follows_alpha(window):
    """The window is read at every call: setting alpha changes y and J as the reference does."""
    model, _, x, inputs, outputs, loss = nerfies(alpha=3.5)
    model.encoding.alpha = window

    def forward_same_layers(x):
        inputs_ = torch.cat([nerf_encoding(x[..., :3], 8, window), x[..., 3:]], -1)
        return run_layers(model.linear_layers, inputs_, 4, activation=torch.relu)

    check_against_reference(model, forward_same_layers, x, inputs, outputs, loss)


def test_encoding_tables_are_made_once_and_train_after_inference_mode():
    """The encoding's column tables are built once per encoding and device (on a GPU each build
    was five host-to-device copies per call), and a first call under `torch.inference_mode()`
    leaves none that autograd cannot save: training afterwards works and matches the reference."""
    from tritonjac import torch_engine
    from tritonjac.torch_engine import InputMap

    model, _, x, inputs, outputs, loss = nerfies(alpha=3.5)
    torch_engine.common._encoding_tables.cache_clear()  # this test's first call makes them
    with torch.inference_mode():
        model(x)
    first = InputMap(model._spec, None, x)
    again = InputMap(model._spec, None, x)
    assert first.frequency is again.frequency and first.perm is again.perm
    assert not first.frequency.is_inference()

    def forward_same_layers(x):
        inputs_ = torch.cat([nerf_encoding(x[..., :3], 8, 3.5), x[..., 3:]], -1)
        return run_layers(model.linear_layers, inputs_, 4, activation=torch.relu)

    check_against_reference(model, forward_same_layers, x, inputs, outputs, loss)


@pytest.mark.parametrize("api", ["parametrizations", "hook"])
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_neus_with_weight_norm_converted_from_its_layer_list(api):
    """NeuS keeps its layers as attributes lin0..lin8 under weight norm: from_module(list of them)
    shares their parameters. One optimizer step on the JacobianMLP's parameters moves the
    original layers, and the two stay equal to the reference."""
    weight_norm = nn.utils.parametrizations.weight_norm if api == "parametrizations" else nn.utils.weight_norm
    source, forward, x, inputs, outputs, loss = neus(weight_norm)
    lins = source.linear_layers  # the user's own layer objects
    model = JacobianMLP.from_module(
        lins, activation=nn.Softplus(beta=100), encoding=PositionalEncoding(6), skips=(4,), skip_scale=2**-0.5,
        jacobian_outputs=1,
    )  # fmt: skip
    assert all(a is b for a, b in zip(model.linear_layers, lins))
    check_against_reference(model, forward, x, inputs, outputs, loss)

    before = forward(x).detach()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    y, J = model(x)
    loss(y, J).backward()
    optimizer.step()
    after = forward(x).detach()  # the user's layers, outside tritonjac
    assert (after - before).abs().max() > 1e-6, "the step did not reach the shared layers"
    y, J = model(x)
    assert_close(y, after, "float64", "y after the step")


def test_nested_sequentials_are_flattened_and_keep_their_state_dict():
    seq = nn.Sequential(
        nn.Sequential(nn.Linear(3, 16), nn.Tanh()), nn.Sequential(nn.Linear(16, 16), nn.Softplus()), nn.Linear(16, 2)
    ).double()
    model = JacobianMLP.from_module(seq)
    assert model.state_dict().keys() == seq.state_dict().keys()
    x = torch.randn(10, 3, dtype=torch.float64)
    y_ref, J_ref = reference_jacobian(seq, x.clone().requires_grad_(), slice(0, 3), slice(0, 2))
    y, J = model(x)
    assert_close(y, y_ref, "float64", "y")
    assert_close(J, J_ref, "float64", "J")
    assert torch.equal(model(x, jacobian=False), seq(x))


def test_geometric_init_starts_as_a_sphere():
    """Output 0 starts close to a function of |x| whose gradient points outwards with norm about 1
    (exactly |x| - r only for infinite width: at 256 wide it is offset by about 0.2 and correlates
    0.9 with |x|), the band columns of the first and the skip layer are zero, the raw xyz's not,
    and the last layer has IDR's mean sqrt(pi / in) and bias -r."""
    model, *_ = neus()
    x = torch.randn(512, 3, dtype=torch.float64)
    r = torch.empty(512, dtype=torch.float64).uniform_(0.3, 0.9)
    x = x / x.norm(dim=-1, keepdim=True) * r[:, None]
    y, J = model(x)
    assert torch.corrcoef(torch.stack([y[:, 0], r]))[0, 1] > 0.85
    outwards = (J[:, 0] * x).sum(-1) / (r * J[:, 0].norm(dim=-1))
    assert outwards.mean() > 0.95 and 0.8 < J[:, 0].norm(dim=-1).mean() < 1.3
    first, skip = model.linear_layers[0].weight, model.linear_layers[4].weight
    assert torch.all(first[:, 3:] == 0) and torch.all(first[:, :3] != 0), "bands zeroed, raw xyz kept"
    assert torch.all(skip[:, 217 + 3 :] == 0) and torch.all(skip[:, 217 : 217 + 3] != 0)
    last = model.linear_layers[-1]
    assert abs(last.weight.mean() - math.sqrt(math.pi / 256)) < 1e-5 and torch.all(last.bias == -0.5)


def test_siren_init_bounds():
    model, *_ = siren()
    first, *others = [m.weight for m in model.linear_layers]
    assert first.abs().max() <= 1 / 3 and first.abs().max() > 0.3
    for W in others:
        bound = math.sqrt(6 / W.shape[1]) / 30
        assert W.abs().max() <= bound and W.abs().max() > 0.9 * bound


@pytest.mark.parametrize(
    "order, scale", [("nerf", 1.0), ("nerfstudio", 2 * math.pi), ("nerf", math.pi)], ids=["nerf", "nerfstudio", "pi"]
)
def test_encoding_orders(order, scale):
    """Other orders and frequency scales: nerfstudio's coordinate-major sines, then cosines, then x."""

    def features(x):
        if order == "nerf":
            return torch.cat([x] + [f(scale * 2.0**i * x) for i in range(3) for f in (torch.sin, torch.cos)], -1)
        scaled = (scale * x[..., None] * 2.0 ** torch.arange(3, dtype=torch.float64)).flatten(-2)
        return torch.cat([torch.sin(scaled), torch.cos(scaled), x], -1)

    x = torch.rand(7, 2, dtype=torch.float64)
    pe = PositionalEncoding(3, order=order, frequency_scale=scale)
    assert_close(pe(x), features(x), 1e-14, "features")
    model = JacobianMLP(2, [16, 16], 2, "tanh", encoding=pe, skips=(2,), dtype=torch.float64)
    forward = lambda x: run_layers(model.linear_layers, features(x), 2, activation=torch.tanh)  # noqa: E731
    check_against_reference(model, forward, x, slice(0, 2), slice(0, 2), eikonal)


def test_selection_costs_only_what_it_keeps():
    """J (..., m, k) for the selected outputs and inputs is the full J's block."""
    torch.manual_seed(6)
    full = JacobianMLP(7, [32, 32], 5, "silu", dtype=torch.float64)
    part = JacobianMLP.from_module(full, jacobian_inputs=slice(2, 5), jacobian_outputs=slice(1, 3))
    x = torch.randn(9, 7, dtype=torch.float64)
    _, J_full = full(x)
    y, J = part(x)
    assert J.shape == (9, 2, 3)
    assert_close(J, J_full[:, 1:3, 2:5], "float64", "J block")
    forward = lambda x: full(x, jacobian=False)  # noqa: E731
    check_against_reference(part, forward, x, slice(2, 5), slice(1, 3), eikonal)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(skips=(0,)), "skips must be indices of Linear layers from 1"),
        (dict(skips=(3,)), "skips must be indices of Linear layers from 1 to 2"),
        (dict(jacobian_outputs=3), "jacobian_outputs must be None, an int from 1 to out_features=2"),
        (dict(jacobian_outputs=slice(1, 1)), "jacobian_outputs must select at least one index"),
        (dict(jacobian_inputs=slice(0, 3, 2)), "contiguously"),
        (
            dict(encoding=PositionalEncoding(2), jacobian_inputs=slice(1, 3)),
            "the differentiated inputs must be the first",
        ),
        (dict(encoding="nerf"), "encoding must be a tritonjac.PositionalEncoding"),
        (dict(skip_scale=0.0), "skip_scale must be finite and non-zero"),
    ],
)
def test_structure_refusals(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        JacobianMLP(3, [8, 8], 2, **kwargs)


def test_layer_widths_are_checked_through_the_skip():
    lins = [nn.Linear(39, 16), nn.Linear(16, 16), nn.Linear(16, 1)]
    with pytest.raises(ValueError, match=r"has 16 outputs \(plus the skip's 39 input features: 55\)"):
        JacobianMLP.from_module(lins, activation="softplus", encoding=PositionalEncoding(6), skips=(2,))
    with pytest.raises(ValueError, match="with activation= given, the layers must all be Linear"):
        JacobianMLP.from_module([nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)], activation="tanh")


def test_which_plan_real_networks_take():
    """The whole-network forward takes Nerfies' warp (one skip into an equal-width hidden layer)
    where an encoded configuration fits; NeuS (a narrowed layer before its skip, width 256) and
    networks with two skips run per layer, and the plan says why."""
    from tritonjac.triton_engine import plan_for, tuning

    warp, *_ = nerfies()
    # before triton 3.8 every width-128 encoded configuration spilled on sm_90 (tuning.ENCODED_SPILLS)
    expected = "layers" if tuning.OLD_TRITON else "network"
    assert plan_for(warp._weights(), warp._spec, precision="tf32", arch=90).kind == expected
    plan = plan_for(warp._weights(), warp._spec, precision="tf32x3", arch=90)
    assert plan.kind == "layers" and "does not fit the registers" in plan.reason
    sdf, *_ = neus()
    plan = plan_for(sdf._weights(), sdf._spec, precision="tf32", arch=90)
    assert plan.kind == "layers" and "hidden widths differ" in plan.reason
    two = JacobianMLP(3, [32] * 5, 3, "tanh", encoding=PositionalEncoding(2), skips=(2, 4))
    plan = plan_for(two._weights(), two._spec)
    assert plan.kind == "layers" and "2 skips" in plan.reason


@pytest.mark.parametrize("holder", [list, nn.ModuleList])
def test_jacobian_of_a_layer_list(holder):
    """tritonjac.jacobian takes a list or ModuleList of layers and activations too."""
    torch.manual_seed(7)
    layers = holder([nn.Linear(3, 8).double(), nn.Tanh(), nn.Linear(8, 2).double()])
    x = torch.randn(6, 3, dtype=torch.float64)
    y, J = tritonjac.jacobian(layers, x)
    seq = nn.Sequential(*layers)
    y_ref, J_ref = reference_jacobian(seq, x.clone().requires_grad_(), slice(0, 3), slice(0, 2))
    assert_close(y, y_ref, "float64", "y")
    assert_close(J, J_ref, "float64", "J")
