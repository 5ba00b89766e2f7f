"""The fused Triton backward against the analytic engine's backward and autograd through torch.func.

Runs in Triton's interpreter without a GPU, compiled on a GPU machine (see test_triton_forward.py).
"""

import copy

import pytest
import torch

import tritonjac
from helpers import (
    TOLERANCE,
    TRITON_DEVICE,
    assert_close,
    kernel_tolerances,
    model_gradients,
    rel_err,
)
from tritonjac import triton_engine
from tritonjac.activations import ACTIVATION_NAMES
from tritonjac.triton_engine import tuning
from tritonjac.triton_engine.plans import slots

pytestmark = [
    pytest.mark.usefixtures("tf32"),
]

# Matmul precision "high": TF32 on GPUs (unit roundoff 4.9e-4), exact fp32 in the interpreter. The
# fused backward with a loss on J needs it: in 3xTF32 ("highest") its tile spills, and the per-layer
# kernels run instead (test_highest_precision). Gradients sum over all points. The accepted errors:
# the fp32 figure in the interpreter and in 3xTF32, twice plain PyTorch's own in TF32 on a GPU
# (`helpers.kernel_tolerances`).
ALL_ACTIVATIONS = list(ACTIVATION_NAMES)


def ran_fused(kernels_run) -> bool:
    """Whether the fused whole-network backward ran (else the per-layer backward kernels did)."""
    fused, layers = "mlp_backward" in kernels_run, "layer_weight_grad" in kernels_run
    assert fused or layers, "no backward kernel ran"
    return fused and not layers


def make_pair(d_in, hidden, d_out, act, *, last=None, bias=True, k=None):
    """The same MLP as a float64 reference (torch engine) and a float32 Triton-backend copy."""
    reference = tritonjac.JacobianMLP(
        d_in,
        hidden,
        d_out,
        act,
        output_activation=last,
        bias=bias,
        jacobian_inputs=k,
        backend="torch",
        dtype=torch.float64,
    )
    if act == "sine" or last == "sine":  # keep sin(30 z) well conditioned, as SIREN's init does
        with torch.no_grad():
            for layer in reference.linear_layers:
                layer.weight.div_(30.0)
    ours = copy.deepcopy(reference).to(device=TRITON_DEVICE, dtype=torch.float32)
    ours.backend = "triton"
    return ours, reference


def loss_of(y, J, loss_on):
    weights_y = torch.linspace(-1.0, 2.0, y.shape[-1], dtype=y.dtype, device=y.device)
    loss = y.new_zeros(())
    if loss_on in ("y", "both"):
        loss = loss + (y * weights_y).sum() + 0.5 * (y**2).sum()
    if loss_on in ("J", "both"):
        loss = loss + (J**2).sum() + J[..., 0, :].sum()
    return loss


def grads_of(model, x, loss_on):
    x = x.clone().requires_grad_()
    for p in model.parameters():
        p.grad = None
    y, J = model(x)
    loss_of(y, J, loss_on).backward()
    return [x.grad] + [p.grad for p in model.parameters()]


def parameter_names(model):
    return ["x"] + [name for name, _ in model.named_parameters()]


def gradient_tolerances(model, x, loss, expected):
    """`kernel_tolerances` with plain PyTorch in float32 on the kernels' device as the TF32 peer."""
    return kernel_tolerances(expected, lambda: model_gradients(model, x, loss, torch.float32, TRITON_DEVICE))


def check_gradients(ours, reference, N, loss_on, x=None):
    x = torch.randn(N, reference.in_features, dtype=torch.float64) if x is None else x
    got = grads_of(ours, x.to(device=TRITON_DEVICE, dtype=torch.float32), loss_on)
    want = grads_of(reference, x, loss_on)
    tolerances = gradient_tolerances(reference, x, lambda y, J: loss_of(y, J, loss_on), want)
    for name, g, w, tol in zip(parameter_names(reference), got, want, tolerances, strict=True):
        assert g is not None and g.dtype == torch.float32, f"gradient of {name}: {g}"
        assert_close(g, w, tol, f"gradient of {name}")


def check_against_torch_func(ours, x, loss):
    """ours (a Triton-backend model) against `model_gradients` (the float64 oracle) for x and every parameter."""
    xt = x.to(device=TRITON_DEVICE, dtype=torch.float32).requires_grad_()
    for p in ours.parameters():
        p.grad = None
    loss(*ours(xt)).backward()
    got = [xt.grad] + [p.grad for p in ours.parameters()]
    want = model_gradients(ours, x, loss)
    tolerances = gradient_tolerances(ours, x, loss, want)
    for name, g, w, tol in zip(parameter_names(ours), got, want, tolerances, strict=True):
        assert_close(g, w, tol, f"gradient of {name}")


@pytest.fixture
def fused_seeded():
    """Whether each fused backward launch seeded its tangents with dLoss/dJ's rows (SEEDED)."""
    from tritonjac.triton_engine import launch

    seen = []

    def observe(name, args, config):
        if name == "mlp_backward":
            seen.append(args["SEEDED"])

    remove = launch.add_launch_observer(observe)
    yield seen
    remove()


@pytest.mark.parametrize("loss_on", ["y", "J", "both"])
@pytest.mark.parametrize("act", ALL_ACTIVATIONS)
@pytest.mark.parametrize("outputs", [3, 1], ids=["J-columns", "seeded"])
def test_every_activation(act, loss_on, outputs, kernels_run, fused_seeded):
    """J's k = 3 columns carried as tangents (3 outputs), or (one output: m < k, reverse mode's
    backward) one tangent seeded with dLoss/dJ's row."""
    ours, reference = make_pair(3, [32, 32], outputs, act)
    check_gradients(ours, reference, 63, loss_on)
    assert ran_fused(kernels_run)
    assert fused_seeded == [loss_on != "y" and outputs == 1]


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize(
    "d_in, d_out, k, last",
    [(3, 1, None, None), (3, 2, None, "tanh"), (5, 3, 4, None), (7, 1, 5, "sigmoid")],
    ids=["sdf", "m2-last-activation", "m3-padded-slot", "k5-last-activation"],
)
def test_seeded_backward_whichever_mode_made_J(d_in, d_out, k, last, mode, kernels_run, fused_seeded):
    """m < k: the fused backward seeds m tangents with dLoss/dJ's rows, whether reverse or forward
    mode computed J; every gradient against float64, at several point counts."""
    ours, reference = make_pair(d_in, [32, 32], d_out, "softplus", last=last, k=k)
    ours.mode = mode
    for N in (1, 63, 200):
        check_gradients(ours, reference, N, "both")
    assert ran_fused(kernels_run) and fused_seeded == [True] * 3
    kernels_run.clear()
    fused_seeded.clear()
    with triton_engine.per_layer_backward():  # the per-layer backward carries J's columns
        check_gradients(ours, reference, 63, "J")
    assert not ran_fused(kernels_run) and fused_seeded == []
    kernels_run.clear()
    with triton_engine.unseeded_backward():  # the fused one too, on request (the benchmark's comparison)
        check_gradients(ours, reference, 63, "J")
    assert ran_fused(kernels_run) and fused_seeded == [False]


@pytest.mark.parametrize("loss_on", ["y", "both"])
def test_per_layer_backward_on_request(loss_on, kernels_run):
    """`per_layer_backward()` (how the benchmark times both plans) runs the per-layer kernels on a
    network the fused backward would take, with the same gradients; outside it, the fused again."""
    ours, reference = make_pair(3, [32, 32], 2, "softplus")
    with triton_engine.per_layer_backward():
        check_gradients(ours, reference, 63, loss_on)
    assert not ran_fused(kernels_run)
    kernels_run.clear()
    check_gradients(ours, reference, 63, loss_on)
    assert ran_fused(kernels_run)


@pytest.mark.parametrize("loss_on", ["y", "J", "both"])
def test_highest_precision(loss_on, kernels_run):
    """3xTF32: fp32-accurate gradients; fused without a loss on J, per layer with one."""
    torch.set_float32_matmul_precision("highest")
    ours, reference = make_pair(3, [64, 64, 64], 3, "softplus")
    check_gradients(ours, reference, 100, loss_on)  # not TF32: the fp32 figure
    assert ran_fused(kernels_run) == (loss_on == "y")


# ---- the per-layer plan's backward ----------------------------------------------------------------
@pytest.mark.parametrize("loss_on", ["y", "J", "both"])
@pytest.mark.parametrize("act", ALL_ACTIVATIONS)
def test_every_activation_per_layer(act, loss_on, kernels_run):
    ours, reference = make_pair(3, [40, 24], 2, act)  # mixed widths: the per-layer plan
    check_gradients(ours, reference, 63, loss_on)
    assert not ran_fused(kernels_run)


@pytest.mark.parametrize("last", ["softplus", "sigmoid"])
def test_activation_on_the_last_layer_per_layer(last, kernels_run):
    ours, reference = make_pair(3, [40, 24], 4, "tanh", last=last)
    check_gradients(ours, reference, 63, "both")
    assert not ran_fused(kernels_run)


@pytest.mark.parametrize(
    "d_in,hidden,d_out,k",
    [(3, [3, 5], 3, None), (3, [], 2, None), (5, [100, 100], 7, 2), (20, [48], 17, 5), (3, [256], 1, None)],
    ids=["narrow-mixed", "single-layer", "w100-k2", "in20-out17", "w256"],
)
def test_shapes_per_layer(d_in, hidden, d_out, k, kernels_run):
    ours, reference = make_pair(d_in, hidden, d_out, "silu", k=k)
    check_gradients(ours, reference, 40, "both")
    assert not ran_fused(kernels_run)


@pytest.mark.parametrize("loss_on", ["y", "J", "both"])
def test_per_layer_in_chunks(loss_on, monkeypatch, kernels_run):
    """Several chunks of points (each recomputes its forward and reads its own slice of dLoss/dy
    and dLoss/dJ), a layer without bias, torch.func as the oracle; bit-identical when repeated."""
    monkeypatch.setattr(tuning, "layers_backward_chunk", lambda points, per_point, free=None: 64)  # 64, 64, 22
    ours, _ = make_pair(3, [40, 24], 3, "gelu")
    ours.linear_layers[1].bias = None
    x = torch.randn(150, 3, dtype=torch.float64)
    check_against_torch_func(ours, x, lambda y, J: loss_of(y, J, loss_on))
    assert not ran_fused(kernels_run)
    assert kernels_run.count("layer_weight_grad") == 3 * len(ours.linear_layers), "expected three chunks"
    xt = x.to(device=TRITON_DEVICE, dtype=torch.float32)
    first = [g.clone() for g in grads_of(ours, xt, loss_on)]
    assert all(torch.equal(a, b) for a, b in zip(first, grads_of(ours, xt, loss_on), strict=True))


@pytest.mark.parametrize("hidden", [[32, 32], [40, 24]], ids=["network", "layers"])
def test_each_point_counts_once(hidden, kernels_run):
    """A loss on one point at a time (the first, the last, either side of a block and of a weight-
    gradient split): a kernel that skips a point, counts it twice or reads another point's dLoss is
    wrong by 100% there, whatever the tolerance."""
    P = 200  # two weight-gradient splits of 112 points in the interpreter
    ours, _ = make_pair(3, hidden, 3, "tanh")
    x = torch.randn(P, 3, dtype=torch.float64)
    num_slots = slots(3, True)
    _, weight_grad = tuning.layer_backward_configs(90, "tf32", num_slots, num_slots)
    _, per_split = tuning.weight_grad_splits(P, weight_grad.kwargs["BLOCK_P"])
    generator = torch.Generator().manual_seed(2)
    wy, wJ = torch.randn(3, generator=generator), torch.randn(3, 3, generator=generator)
    # interior boundaries: of the fused backward's 16-point tiles (interpreter), of the splits
    boundary = 16 if hidden == [32, 32] else per_split  # (one split only where per_split >= P)
    for p in sorted({0, boundary - 1, boundary, P - 1} & set(range(P))):

        def loss(y, J, p=p):
            return (y[p] * wy.to(y)).sum() + (J[p] * wJ.to(J)).sum() + 0.5 * J[p].square().sum()

        check_against_torch_func(ours, x, loss)
    assert ran_fused(kernels_run) == (hidden == [32, 32])


# Activation parameters away from their defaults, each with a loss on J (which reaches s'') on both
# plans: softplus beta and threshold (crossed by these inputs), sine's w0, leaky_relu's slope.
ACTIVATION_PARAMETERS = {
    "softplus-beta3-threshold5": torch.nn.Softplus(beta=3.0, threshold=5.0),
    "softplus-beta0.5-threshold2": torch.nn.Softplus(beta=0.5, threshold=2.0),
    "sine-w0-7": tritonjac.Sine(7.0),
    "leaky_relu-0.2": torch.nn.LeakyReLU(0.2),
}


@pytest.mark.parametrize("loss_on", ["J", "both"])
@pytest.mark.parametrize("hidden", [[32, 32], [40, 24]], ids=["network", "layers"])
@pytest.mark.parametrize("act", list(ACTIVATION_PARAMETERS))
def test_activation_parameters(act, hidden, loss_on, kernels_run):
    ours, _ = make_pair(3, hidden, 2, ACTIVATION_PARAMETERS[act])
    x = 2.0 * torch.randn(63, 3, dtype=torch.float64)
    check_against_torch_func(ours, x, lambda y, J: loss_of(y, J, loss_on))
    assert ran_fused(kernels_run) == (hidden == [32, 32])


def test_per_layer_backward_takes_few_large_chunks():
    """2^20 points of 3 -> 4x64 -> 3 with 3 tangents in fp32 (10,336 saved bytes per point) take a
    handful of chunks on a GPU with room, and chunks within an eighth of free memory on a full one."""
    per_point, P = 10_336, 2**20
    chunk = tuning.layers_backward_chunk(P, per_point, free_bytes=75 << 30)
    assert -(-P // chunk) <= 6 and chunk * per_point <= tuning.LAYERS_BACKWARD_CHUNK_BYTES
    chunk = tuning.layers_backward_chunk(P, per_point, free_bytes=2 << 30)
    assert chunk * per_point <= (2 << 30) // 8 and -(-P // chunk) <= 2 * (P * per_point) // ((2 << 30) // 8)
    assert tuning.layers_backward_chunk(1000, per_point, free_bytes=75 << 30) == 1000
    assert tuning.layers_backward_chunk(1000, per_point, free_bytes=0) == 1000  # a floor of 64 MB
    assert tuning.layers_backward_chunk(P, per_point) * per_point <= tuning.LAYERS_BACKWARD_CHUNK_BYTES


@pytest.mark.parametrize("hidden", [[32, 32], [40, 24]], ids=["network", "layers"])
def test_strided_biases(hidden):
    """A bias that is a view with a stride (a column of a matrix) trains like a contiguous one,
    through the per-layer backward's recompute as well as the fused backward."""
    ours, reference = make_pair(3, hidden, 3, "tanh")
    for layer in ours.linear_layers:
        b = layer.bias.detach()
        layer.bias = torch.nn.Parameter(torch.stack([b, torch.full_like(b, 7.0)], dim=1))
    views = [layer.bias[:, 0] for layer in ours.linear_layers]
    assert all(v.stride() == (2,) for v in views)
    x = torch.randn(60, 3, dtype=torch.float64)
    weights = [layer.weight for layer in ours.linear_layers]
    xt = x.to(device=TRITON_DEVICE, dtype=torch.float32).requires_grad_()
    y, J = tritonjac.mlp_jacobian(xt, weights, views, ["tanh", "tanh", None], backend="triton")
    loss_of(y, J, "both").backward()
    want = grads_of(reference, x, "both")  # x, then weight and bias of each layer
    tol = gradient_tolerances(reference, x, lambda y, J: loss_of(y, J, "both"), want)
    assert_close(xt.grad, want[0], tol[0], "gradient of x")
    for l, layer in enumerate(ours.linear_layers):
        assert_close(layer.weight.grad, want[1 + 2 * l], tol[1 + 2 * l], f"gradient of weight {l}")
        assert_close(layer.bias.grad[:, 0], want[2 + 2 * l], tol[2 + 2 * l], f"gradient of bias {l}")
        assert torch.all(layer.bias.grad[:, 1] == 0)


@pytest.mark.parametrize("last", ["softplus", "tanh", "sigmoid", "sine"])
@pytest.mark.parametrize("loss_on", ["y", "J", "both"])
def test_activation_on_the_last_layer(last, loss_on, kernels_run):
    ours, reference = make_pair(3, [32, 32], 4, "silu", last=last)
    check_gradients(ours, reference, 63, loss_on)
    assert ran_fused(kernels_run)


def test_softplus_beta_100_across_the_threshold(kernels_run):
    ours, reference = make_pair(3, [64] * 4, 3, torch.nn.Softplus(beta=100.0))
    check_gradients(ours, reference, 200, "both")
    assert ran_fused(kernels_run)


@pytest.mark.parametrize("width", [1, 3, 16, 48, 64, 100])
def test_widths(width, kernels_run):
    ours, reference = make_pair(3, [width, width], 3, "tanh")
    check_gradients(ours, reference, 63, "both")
    # 100 pads to 128: its fused backward with a loss on J does not fit the registers
    assert ran_fused(kernels_run) == (width <= 64)


@pytest.mark.parametrize("depth", range(2, 9))
def test_depths(depth, kernels_run):
    ours, reference = make_pair(3, [32] * (depth - 1), 3, "softplus")
    check_gradients(ours, reference, 40, "both")
    assert ran_fused(kernels_run)


@pytest.mark.parametrize("d_in,d_out,k", [(1, 1, 1), (2, 5, 1), (3, 3, 2), (7, 3, 7), (16, 16, 3), (16, 2, 1)], ids=str)
def test_in_out_features_and_tangents(d_in, d_out, k, kernels_run):
    ours, reference = make_pair(d_in, [32, 32], d_out, "gelu", k=k)
    check_gradients(ours, reference, 63, "both")
    assert ran_fused(kernels_run)


@pytest.mark.parametrize("N", [1, 63, 1000])
def test_point_counts(N, kernels_run):
    ours, reference = make_pair(3, [32, 32], 3, "softplus")
    check_gradients(ours, reference, N, "both")
    assert ran_fused(kernels_run)


def test_without_bias(kernels_run):
    ours, reference = make_pair(3, [32, 32], 3, "tanh", bias=False)
    check_gradients(ours, reference, 63, "both")
    assert ran_fused(kernels_run)


def test_mixed_bias(kernels_run):
    ours, reference = make_pair(3, [32, 32], 3, "tanh")
    for model in (ours, reference):
        model.linear_layers[1].bias = None
    check_gradients(ours, reference, 63, "both")
    assert ran_fused(kernels_run)


def test_non_contiguous_points_and_leading_shapes(kernels_run):
    ours, reference = make_pair(3, [32, 32], 3, "sigmoid")
    x = torch.randn(2, 3, 40, dtype=torch.float64).transpose(-1, -2)  # (2, 40, 3), non-contiguous
    check_gradients(ours, reference, None, "both", x=x)
    assert ran_fused(kernels_run)


@pytest.mark.parametrize("hidden", [[32, 32], [40, 24]], ids=["network", "layers"])
def test_against_autograd_through_torch_func(hidden, kernels_run):
    ours, _ = make_pair(3, hidden, 3, "softplus")
    check_against_torch_func(ours, torch.randn(50, 3, dtype=torch.float64), lambda y, J: loss_of(y, J, "both"))
    assert ran_fused(kernels_run) == (hidden == [32, 32])


def test_deterministic():
    ours, _ = make_pair(3, [64, 64, 64], 3, "softplus")
    x = torch.randn(1000, 3, device=TRITON_DEVICE)
    first = [g.clone() for g in grads_of(ours, x, "both")]
    second = grads_of(ours, x, "both")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_frozen_parameters_and_inputs_without_grad(kernels_run):
    ours, reference = make_pair(3, [32, 32], 3, "tanh")
    for model in (ours, reference):
        model.linear_layers[0].weight.requires_grad_(False)
        model.linear_layers[2].bias.requires_grad_(False)
    x = torch.randn(63, 3, dtype=torch.float64)
    for model in (ours, reference):
        y, J = model(x.to(next(model.parameters())))
        loss_of(y, J, "both").backward()
    assert ours.linear_layers[0].weight.grad is None and ours.linear_layers[2].bias.grad is None
    want = [p.grad for p in reference.parameters()]
    trained = [w for w in want if w is not None]

    def plain_pytorch():  # the trainable parameters' gradients (x's and the frozen ones left out)
        grads = model_gradients(reference, x, lambda y, J: loss_of(y, J, "both"), torch.float32, TRITON_DEVICE)
        return [g for g, w in zip(grads[1:], want, strict=True) if w is not None]

    tolerances = iter(kernel_tolerances(trained, plain_pytorch))
    for (name, a), b in zip(ours.named_parameters(), want, strict=True):
        if b is None:
            assert a.grad is None, name
        else:
            assert_close(a.grad, b, next(tolerances), f"gradient of {name}")
    assert ran_fused(kernels_run)


def test_retain_graph_and_accumulation(kernels_run):
    ours, _ = make_pair(3, [32, 32], 3, "silu")
    x = torch.randn(63, 3, device=TRITON_DEVICE)
    y, J = ours(x)
    loss = loss_of(y, J, "both")
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in ours.parameters()]
    loss.backward()
    for p, g in zip(ours.parameters(), once):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("plan", ["network", "layers"])
def test_half_precision_gradients(dtype, plan, kernels_run):
    """Half operands, fp32 accumulation: each gradient's error against float64 at most twice plain
    PyTorch's own in that dtype (autograd over torch.func, on the same device and parameters)."""
    hidden = [32, 32] if plan == "network" else [40, 24]
    reference = tritonjac.JacobianMLP(3, hidden, 3, "tanh", backend="torch", dtype=torch.float64)
    ours = copy.deepcopy(reference).to(device=TRITON_DEVICE, dtype=dtype)
    ours.backend = "triton"
    with torch.no_grad():  # the reference starts from the very same (rounded) parameters
        for a, b in zip(reference.parameters(), ours.parameters()):
            a.copy_(b.double())
    x = torch.randn(200, 3, dtype=torch.float64).to(dtype)
    got = grads_of(ours, x.to(TRITON_DEVICE), "both")
    want = grads_of(reference, x.double(), "both")
    loss = lambda y, J: loss_of(y.float(), J.float(), "both")  # noqa: E731
    plain = model_gradients(ours, x, loss, dtype, TRITON_DEVICE)
    for name, g, w, p in zip(parameter_names(reference), got, want, plain, strict=True):
        assert g.dtype == dtype, name
        assert_close(g, w, max(2 * rel_err(p.cpu().double(), w), TOLERANCE["float32-gradient"]), f"gradient of {name}")
    assert ran_fused(kernels_run) == (plan == "network")


def test_training_a_deformation_field_with_an_elastic_regulariser():
    """Nerfies-style: fit a 3-D deformation y = x + d(x) with the elastic loss sum(log(sigma(J))^2)
    on J's singular values. Both engines start from the same parameters and must lower the loss
    the same way (the Triton one through its fused backward)."""
    torch.manual_seed(3)
    x = torch.rand(128, 3) * 2 - 1
    target = x + 0.2 * torch.stack([torch.sin(2 * x[:, 1]), torch.cos(2 * x[:, 2]), x[:, 0] * x[:, 1]], dim=1)
    start = tritonjac.JacobianMLP(3, [32, 32, 32], 3, "softplus", dtype=torch.float32)
    curves = {}
    for backend in ("torch", "triton"):
        model = copy.deepcopy(start).to(TRITON_DEVICE if backend == "triton" else "cpu")
        model.backend = backend
        xb, tb = x.to(next(model.parameters()).device), target.to(next(model.parameters()).device)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            d, J_d = model(xb)
            eye = torch.eye(3, device=xb.device)
            sigma = torch.linalg.svdvals(eye + J_d)  # the deformation x + d(x) has Jacobian I + J_d
            loss = ((xb + d - tb) ** 2).sum(-1).mean() + 1e-2 * torch.log(sigma).square().sum(-1).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[backend] = losses
    for losses in curves.values():
        assert losses[-1] < 0.3 * losses[0]
    for a, b in zip(curves["torch"], curves["triton"]):
        assert abs(a - b) <= 1e-3 * abs(b)


def test_double_backward_is_refused():
    ours, _ = make_pair(3, [32, 32], 3, "tanh")
    x = torch.randn(10, 3, device=TRITON_DEVICE, requires_grad=True)
    y, J = ours(x)
    with pytest.raises(RuntimeError, match="backward is first-order"):
        torch.autograd.grad(J.sum(), x, create_graph=True)
