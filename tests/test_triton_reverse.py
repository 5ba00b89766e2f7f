"""Reverse mode on the Triton kernels (kernels/reverse.py, docs/design.md section 9) against the
PyTorch engine's forward mode in float64.

Both plans: the whole-network `mlp_reverse_kernel` (persistent programs over several blocks each,
their slopes in per-program slabs) and the per-layer plan (the recompute up, `layer_backward_kernel`
with ADJOINTS down, J from the first layer's kernel or through a0). Every activation, adjoint counts
that pad their slots, selected inputs and outputs, depths, point counts, chunks, half precision,
encodings and skips, and training through J (the backward is forward mode's, from dLoss/dJ). Every
buffer the launchers allocate is fenced by guard rows (conftest).
"""

import contextlib
import copy

import pytest
import torch

import tritonjac
from helpers import TOLERANCE, TRITON_DEVICE, assert_close, kernel_tolerances, model_gradients, rel_err
from tritonjac import triton_engine
from tritonjac.activations import ACTIVATION_NAMES
from tritonjac.network import make_spec
from tritonjac.precision import matmul_precision

# the kernels each plan runs for a call computing J in reverse mode
PLAN_KERNELS = {"network": {"mlp_reverse"}, "layers": {"layer_forward", "layer_backward"}}
HIDDEN = {"network": [32, 32], "layers": [40, 24]}


pytestmark = pytest.mark.usefixtures("highest_precision")  # conftest: fp32-accurate dots


def random_weights(dims, scale=1.0, bias=True):
    pairs = list(zip(dims[:-1], dims[1:]))
    weights = [torch.randn(o, i, dtype=torch.float64) * scale / i**0.5 for i, o in pairs]
    biases = [0.1 * torch.randn(o, dtype=torch.float64) if bias else None for _, o in pairs]
    return weights, biases


def both_engines(x, weights, biases, acts, kernels_run=None, expect_plan=None, dtype=torch.float32, **structure):
    """(y, J) from the Triton kernels in reverse mode (x, weights in `dtype` on TRITON_DEVICE) and
    from the PyTorch engine's forward mode in float64; checks the plan and the kernels it ran."""
    dev = TRITON_DEVICE
    cast = [w.to(dev, dtype) for w in weights], [None if b is None else b.to(dev, dtype) for b in biases]
    if expect_plan is not None:
        d_in, d_out = x.shape[-1], weights[-1].shape[0]
        spec = make_spec(acts, len(weights), d_in, out_features=d_out, mode="reverse", **structure)
        arch = triton_engine.launch.device_arch(x.to(dev))
        plan = triton_engine.plan_for(weights, spec, True, matmul_precision(dtype), arch, "reverse")
        assert plan.kind == expect_plan, plan
    if kernels_run is not None:
        kernels_run.clear()
    y, J = tritonjac.mlp_jacobian(x.to(dev, dtype), *cast, acts, mode="reverse", backend="triton", **structure)
    if kernels_run is not None and expect_plan is not None and x.shape[0]:
        assert set(kernels_run) == PLAN_KERNELS[expect_plan], sorted(set(kernels_run))
    y_ref, J_ref = tritonjac.mlp_jacobian(
        x.double(), weights, biases, acts, mode="forward", backend="torch", **structure
    )
    assert y.dtype == J.dtype == dtype
    return y.cpu(), J.cpu(), y_ref, J_ref


def check(dims, acts, plan, kernels_run, N=63, scale=1.0, **structure):
    weights, biases = random_weights(dims, scale)
    x = torch.randn(N, dims[0])
    y, J, y_ref, J_ref = both_engines(x, weights, biases, acts, kernels_run, plan, **structure)
    assert_close(y, y_ref, "float32", "y")
    assert_close(J, J_ref, "float32", "J")
    return J


def scale_for(act):
    return 1.0 / 30.0 if act == "sine" else 1.0  # keep sin(30 z) well conditioned, as SIREN's init does


@pytest.mark.parametrize("plan", ["network", "layers"])
@pytest.mark.parametrize("act", ACTIVATION_NAMES)
def test_every_activation(act, plan, kernels_run):
    check([3, *HIDDEN[plan], 1], [act, act, None], plan, kernels_run, scale=scale_for(act))


@pytest.mark.parametrize("plan", ["network", "layers"])
@pytest.mark.parametrize("act", ["sigmoid", "tanh", "softplus"])
def test_activation_on_the_last_layer(act, plan, kernels_run):
    """The last layer's slope starts the adjoints (an occupancy field's sigmoid)."""
    check([3, *HIDDEN[plan], 1], ["silu", "silu", act], plan, kernels_run)


@pytest.mark.parametrize("plan", ["network", "layers"])
@pytest.mark.parametrize(
    "d_in, d_out, structure",
    [
        (3, 2, {}),  # m = 2 of k = 3
        (5, 3, {}),  # m = 3: a padding adjoint slot (ADJ_SLOTS = 4)
        (3, 4, {"jacobian_outputs": slice(2, 3)}),  # one selected output among 4
        (7, 1, {"jacobian_inputs": slice(2, 5)}),  # a latent code first, then xyz
        (6, 3, {"jacobian_inputs": 5, "jacobian_outputs": slice(0, 2)}),
    ],
    ids=["m2", "m3-padded", "selected-output", "selected-inputs", "both-selected"],
)
def test_adjoint_counts_and_selections(d_in, d_out, structure, plan, kernels_run):
    J = check([d_in, *HIDDEN[plan], d_out], ["tanh", "tanh", None], plan, kernels_run, **structure)
    assert J.shape[1] < J.shape[2]  # reverse mode by the rule too


@pytest.mark.parametrize("plan", ["network", "layers"])
@pytest.mark.parametrize("N", [0, 1, 16, 17, 100])
def test_point_counts(N, plan, kernels_run):
    """100 points are 7 blocks for the interpreter's 3 persistent programs: each loops, and its
    slab of slopes is overwritten block after block."""
    check([3, *HIDDEN[plan], 1], ["softplus", "softplus", None], plan, kernels_run, N=N)


@pytest.mark.parametrize("plan", ["network", "layers"])
@pytest.mark.parametrize("depth", [1, 2, 5])
def test_depths(depth, plan, kernels_run):
    """depth hidden layers (of unequal widths per layer); one: no hidden matmul in the whole-network kernel."""
    width = HIDDEN[plan][0]
    hidden = [width] * depth if plan == "network" else [width + 8 * (i % 2) for i in range(depth + 1)]
    check([3, *hidden, 1], ["gelu"] * len(hidden) + [None], plan, kernels_run)


def test_a_single_layer_runs_per_layer(kernels_run):
    weights, biases = random_weights([3, 2])
    x = torch.randn(20, 3)
    y, J, y_ref, J_ref = both_engines(x, weights, biases, [None], kernels_run, "layers")
    assert_close(J, J_ref, "float32", "J")


def test_widths_beyond_the_whole_network_kernel(kernels_run):
    """Width 256 (SIREN's, IDR's 512) runs per layer."""
    check([3, 256, 256, 1], ["sine", "sine", None], "layers", kernels_run, scale=1 / 30)


def test_chunks_of_the_per_layer_plan(monkeypatch, kernels_run):
    """A byte budget of about 24 points (840 bytes each) per chunk: 5 chunks, J written chunk by chunk
    by the first layer's kernel, y concatenated."""
    from tritonjac.triton_engine import tuning

    monkeypatch.setattr(tuning, "LAYERS_BACKWARD_CHUNK_BYTES", 20_000)
    monkeypatch.setattr(tuning, "LAYERS_BACKWARD_MIN_CHUNK_BYTES", 0)
    check([3, *HIDDEN["layers"], 1], ["tanh", "tanh", None], "layers", kernels_run, N=100)
    assert kernels_run.count("layer_forward") == 3 * 5  # three layers, five chunks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("plan", ["network", "layers"])
def test_half_precision_within_twice_torch_error(dtype, plan, kernels_run):
    """bf16 / fp16: the error against float64 at most twice what PyTorch itself makes in that dtype
    (its nn.Sequential and torch.func's jacrev)."""
    dims = [3, *HIDDEN[plan], 1]
    weights, biases = random_weights(dims)
    weights, biases = [w.to(dtype).double() for w in weights], [b.to(dtype).double() for b in biases]
    x = torch.randn(1000, 3).to(dtype).double()
    acts = ["softplus", "softplus", None]
    y, J, y_ref, J_ref = both_engines(x, weights, biases, acts, kernels_run, plan, dtype=dtype)
    model = tritonjac.JacobianMLP(3, HIDDEN[plan], 1, "softplus", dtype=dtype)
    with torch.no_grad():
        for layer, W, b in zip(model.linear_layers, weights, biases):
            layer.weight.copy_(W)
            layer.bias.copy_(b)
    seq = model.to_sequential()
    with torch.no_grad():
        y_torch = seq(x.to(dtype))
    J_torch = torch.func.vmap(torch.func.jacrev(seq))(x.to(dtype))
    for what, ours, theirs, ref in (("y", y, y_torch, y_ref), ("J", J, J_torch, J_ref)):
        err, torch_err = rel_err(ours.double(), ref), rel_err(theirs.double(), ref)
        assert err <= 2 * torch_err, (what, err, torch_err)


def test_both_modes_agree_on_the_kernels():
    """The same SDF in forward and reverse mode on the kernels: one fp32 computation in two orders."""
    model = tritonjac.JacobianMLP(3, [32, 32], 1, "softplus", backend="triton", device=TRITON_DEVICE)
    x = torch.randn(50, 3, device=TRITON_DEVICE)
    y_r, J_r = model(x)
    model.mode = "forward"
    y_f, J_f = model(x)
    assert_close(y_r, y_f, "float32-reordered", "y")
    assert_close(J_r, J_f, TOLERANCE["float32"], "J")


# ---- training through reverse mode ---------------------------------------------------------------
def eikonal(y, J):
    return ((J.norm(dim=-1) - 1) ** 2).mean() + y.abs().mean()


@pytest.mark.parametrize("loss_name", ["y", "J", "eikonal"])
@pytest.mark.parametrize("plan", ["network", "layers"])
def test_training_through_reverse_mode(loss_name, plan, kernels_run):
    """Every gradient against torch.func's in float64 (the backward recomputes in forward mode)."""
    loss = {"y": lambda y, J: y.square().sum(), "J": lambda y, J: (J * J.detach().sign()).sum(), "eikonal": eikonal}
    model = tritonjac.JacobianMLP(3, HIDDEN[plan], 1, "softplus", backend="triton", device=TRITON_DEVICE)
    assert model.plan(torch.empty(1, 3, device=TRITON_DEVICE)).kernels == plan
    x = (torch.rand(60, 3) * 2 - 1).to(TRITON_DEVICE).requires_grad_()
    y, J = model(x)
    assert set(PLAN_KERNELS[plan]) <= set(kernels_run)
    loss[loss_name](y, J).backward()
    wanted = model_gradients(model, x, loss[loss_name])
    names = ["x", *(n for n, _ in model.named_parameters())]
    for name, got, want in zip(names, [x.grad, *(p.grad for p in model.parameters())], wanted, strict=True):
        assert_close(got, want, "float32-gradient", f"gradient of {name}")


@pytest.fixture
def seeded_recomputes():
    """For each recompute launch of the per-layer backward (layer_forward storing Z): whether a0's
    tangents were seeded with dLoss/dJ's rows."""
    from tritonjac.triton_engine import launch

    seen = []

    def observe(name, args, config):
        if name == "layer_forward" and args.get("STORE_Z") and args.get("JACOBIAN"):
            seen.append(args["SEEDED"])

    remove = launch.add_launch_observer(observe)
    yield seen
    remove()


@pytest.mark.parametrize("structure", ["encoding-skip-latent", "neus-like", "latent-first", "skip-two-outputs"])
def test_encodings_skips_and_latent_codes(structure, kernels_run, seeded_recomputes):
    """Per layer: a0's adjoints summed over the first and the skip layer, through the encoding's
    derivatives (coordinate-major in the kernels, encoding order here), with a latent code that J
    does not differentiate; NeuS's layout, one selected output of several. The backward seeds m
    tangents with dLoss/dJ's rows (through the encoding, whose derivatives depend on x), and gives
    the same gradients carrying J's k columns (`unseeded_backward`)."""
    if structure == "encoding-skip-latent":
        kw = dict(jacobian_inputs=3, encoding=tritonjac.PositionalEncoding(3), skips=(2,), skip_scale=0.7)
        reference = tritonjac.JacobianMLP(3 + 4, [32, 32, 32], 1, "softplus", dtype=torch.float64, **kw)
    elif structure == "neus-like":
        kw = dict(jacobian_outputs=1, encoding=tritonjac.PositionalEncoding(2), skips=(2,), skip_input_first=True)
        reference = tritonjac.JacobianMLP(3, [32, 24, 32], 9, "softplus", dtype=torch.float64, **kw)
    elif structure == "latent-first":  # DeepSDF's layout: the code, then xyz
        reference = tritonjac.JacobianMLP(7, [40, 24], 1, "softplus", jacobian_inputs=slice(4, 7), dtype=torch.float64)
    else:  # x itself read again by a skip layer, two outputs of three inputs
        reference = tritonjac.JacobianMLP(3, [32, 24, 32], 2, "tanh", skips=(2,), dtype=torch.float64)
    x = torch.rand(40, reference.in_features, dtype=torch.float64) * 2 - 1
    ours = copy.deepcopy(reference).to(device=TRITON_DEVICE, dtype=torch.float32)
    ours.backend = "triton"
    plan = ours.plan(x.float().to(TRITON_DEVICE))
    assert (plan.mode, plan.kernels) == ("reverse", "layers"), plan
    xo = x.float().to(TRITON_DEVICE).requires_grad_()
    y, J = ours(xo)
    assert "mlp_reverse" not in kernels_run and "layer_backward" in kernels_run
    reference.mode = "forward"
    xr = x.clone().requires_grad_()
    y_ref, J_ref = reference(xr)
    assert_close(y, y_ref, "float32", "y")
    assert_close(J, J_ref, "float32", "J")
    wanted = torch.autograd.grad(eikonal(y_ref, J_ref), [xr, *reference.parameters()])
    names = ["x", *(n for n, _ in reference.named_parameters())]
    for seeded in (True, False):
        seeded_recomputes.clear()
        with contextlib.nullcontext() if seeded else triton_engine.unseeded_backward():
            y, J = ours(xo)
            ours_grads = torch.autograd.grad(eikonal(y, J), [xo, *ours.parameters()])
        assert set(seeded_recomputes) == ({False, True} if seeded else {False})  # a0's layers seeded
        for name, got, want in zip(names, ours_grads, wanted, strict=True):
            assert_close(got, want, "float32-gradient", f"gradient of {name} ({'seeded' if seeded else 'columns'})")


# ---- plans ----------------------------------------------------------------------------------------------
def test_reverse_plans_and_their_reasons():
    sdf = tritonjac.JacobianMLP(3, [64] * 4, 1, "softplus")
    spec = sdf._spec
    for arch in (80, 90):
        for precision in ("tf32", "tf32x3", "ieee"):
            plan = triton_engine.plan_for(sdf._weights(), spec, precision=precision, arch=arch, mode="reverse")
            assert plan.kind == "network", (arch, precision, plan)
    wide = tritonjac.JacobianMLP(3, [256] * 3, 1, "softplus")
    plan = triton_engine.plan_for(wide._weights(), wide._spec, mode="reverse")
    assert plan == triton_engine.Plan("layers", "hidden width 256 > 128")
    encoded = tritonjac.JacobianMLP(3, [64] * 3, 1, "softplus", encoding=tritonjac.PositionalEncoding(4))
    plan = triton_engine.plan_for(encoded._weights(), encoded._spec, mode="reverse")
    assert plan == triton_engine.Plan("layers", "the whole-network reverse kernel has no encodings or skips yet")
    # forward mode's plan of the same SDF is unchanged by the mode argument's default
    assert triton_engine.plan_for(sdf._weights(), spec).kind == "network"


def test_kernel_tolerances_apply_in_tf32(tf32, kernels_run):
    """At matmul precision "high" (TF32 on a GPU, exact in the interpreter) within twice plain PyTorch's
    own error in that precision."""
    weights, biases = random_weights([3, 64, 64, 64, 1])
    x = torch.randn(200, 3)
    acts = ["softplus"] * 3 + [None]
    y, J, y_ref, J_ref = both_engines(x, weights, biases, acts, kernels_run, "network")

    def plain():
        model = tritonjac.JacobianMLP(3, [64] * 3, 1, "softplus", device=TRITON_DEVICE)
        with torch.no_grad():
            for layer, W, b in zip(model.linear_layers, weights, biases):
                layer.weight.copy_(W)
                layer.bias.copy_(b)
        seq = model.to_sequential()
        xd = x.to(TRITON_DEVICE)
        with torch.no_grad():
            y_p = seq(xd)
        return y_p, torch.func.vmap(torch.func.jacrev(seq))(xd)

    tolerance_y, tolerance_J = kernel_tolerances([y_ref, J_ref], plain, "float32")
    assert_close(y, y_ref, tolerance_y, "y")
    assert_close(J, J_ref, tolerance_J, "J")


@pytest.mark.parametrize("plan", ["network", "layers"])
def test_autocast_in_reverse_mode(plan, kernels_run):
    """Under bf16 autocast: y and J in bf16 from the reverse kernels, float32 gradients (through the
    seeded fused backward, whose 2-row tile fits in half precision, or the per-layer one)."""
    device_type = "cuda" if TRITON_DEVICE == "cuda" else "cpu"
    model = tritonjac.JacobianMLP(3, HIDDEN[plan], 1, "softplus", backend="triton", device=TRITON_DEVICE)
    x = torch.rand(63, 3, device=TRITON_DEVICE) * 2 - 1
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y, J = model(x)
    assert y.dtype == J.dtype == torch.bfloat16 and set(PLAN_KERNELS[plan]) <= set(kernels_run)
    reference = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    reference.backend = "torch"
    with torch.no_grad():
        y_ref, J_ref = reference(x.double().cpu())
    assert_close(y, y_ref, "bfloat16", "y")  # bf16 operands: 2^-9 relative rounding through a few layers
    assert_close(J, J_ref, "bfloat16", "J")
    (eikonal(y.float(), J.float())).backward()
    wanted = model_gradients(model, x, eikonal)[1:]
    for (name, p), want in zip(model.named_parameters(), wanted, strict=True):
        assert p.grad.dtype == torch.float32, name
        assert_close(p.grad, want, "bfloat16", f"gradient of {name} under autocast")
