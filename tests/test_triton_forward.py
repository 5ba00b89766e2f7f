"""The Triton forward kernels against the analytic engine in float64.

Without a GPU these run in Triton's interpreter on CPU tensors (conftest switches it on); on a GPU
machine the same tests run the compiled kernels on CUDA tensors. Every buffer the launchers allocate
is poisoned and fenced by guard rows (conftest's `guarded_buffers`): an element a kernel forgets to
write, or a write past a buffer's end, fails the test.
"""

import copy

import pytest
import torch
import triton
import triton.language as tl

import tritonjac
from helpers import TOLERANCE as TABLE
from helpers import TRITON_DEVICE, assert_close, kernel_tolerances, model_gradients, rel_err
from tritonjac import triton_engine
from tritonjac.activations import ACTIVATION_NAMES, as_activation
from tritonjac.kernels.activations import sin_cos
from tritonjac.network import make_spec
from tritonjac.precision import matmul_precision
from tritonjac.triton_engine import launch

pytestmark = []

# The accepted errors: the fp32 figure at "highest" (3xTF32) and in the interpreter; at "high" on a
# GPU (TF32) twice what plain PyTorch errs in TF32 on the same inputs (`helpers.kernel_tolerances`).
ALL_ACTIVATIONS = list(ACTIVATION_NAMES)


@pytest.fixture(params=["highest"])
def precision(request):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision(before)


def random_mlp(dims, bias=True, dtype=torch.float32, scale=1.0):
    """Weights (out, in) with unit-variance outputs and small biases; `bias` may be a per-layer list."""
    pairs = list(zip(dims[:-1], dims[1:]))
    has_bias = bias if isinstance(bias, list) else [bias] * len(pairs)
    weights = [(torch.randn(o, i, dtype=torch.float64) * scale / i**0.5).to(dtype) for i, o in pairs]
    biases = [
        (0.1 * torch.randn(o, dtype=torch.float64)).to(dtype) if b else None for (i, o), b in zip(pairs, has_bias)
    ]
    return weights, biases


def run_both(x, weights, biases, acts, k=None):
    """(y, J) from the Triton backend on TRITON_DEVICE and from the analytic engine in float64."""
    dev = TRITON_DEVICE
    y, J = tritonjac.mlp_jacobian(
        x.to(dev),
        [w.to(dev) for w in weights],
        [None if b is None else b.to(dev) for b in biases],
        acts,
        jacobian_inputs=k,
        backend="triton",
    )
    y_ref, J_ref = tritonjac.mlp_jacobian(
        x.double(),
        [w.double() for w in weights],
        [None if b is None else b.double() for b in biases],
        acts,
        jacobian_inputs=k,
        backend="torch",
    )
    return y.cpu(), J.cpu(), y_ref, J_ref


def plain_pytorch(x, weights, biases, acts, k=None):
    """y and J by plain PyTorch in float32 on the kernels' device: an nn.Sequential of the same
    layers, J by torch.func's forward-mode Jacobian."""
    layers = []
    for W, b, act in zip(weights, biases, acts):
        linear = torch.nn.Linear(W.shape[1], W.shape[0], bias=b is not None)
        with torch.no_grad():
            linear.weight.copy_(W)
            if b is not None:
                linear.bias.copy_(b)
        layers += [linear, as_activation(act).to_module()]
    seq = torch.nn.Sequential(*layers).to(device=TRITON_DEVICE, dtype=torch.float32)
    x = x.to(device=TRITON_DEVICE, dtype=torch.float32).contiguous()
    with torch.no_grad():
        y = seq(x)
    J = torch.func.vmap(torch.func.jacfwd(seq))(x)
    return y, J[..., : k or x.shape[-1]]


def assert_outputs(y, J, y_ref, J_ref, plain):
    """y and J against float64 within `kernel_tolerances` (plain(): plain PyTorch's y and J)."""
    tolerance_y, tolerance_J = kernel_tolerances([y_ref, J_ref], plain, "float32")
    assert_close(y, y_ref, tolerance_y, "y")
    assert_close(J, J_ref, tolerance_J, "J")


def check(dims, acts, precision, *, N=63, k=None, bias=True, expect_plan=None, scale=1.0, x=None):
    weights, biases = random_mlp(dims, bias, scale=scale)
    if expect_plan is not None:
        spec = make_spec(acts, len(weights), dims[0], k)
        plan = triton_engine.plan_for(weights, spec, precision=matmul_precision(torch.float32))
        assert plan.kind == expect_plan, plan
    x = torch.randn(N, dims[0]) if x is None else x
    y, J, y_ref, J_ref = run_both(x, weights, biases, acts, k)
    assert_outputs(y, J, y_ref, J_ref, lambda: plain_pytorch(x, weights, biases, acts, k))


def scale_for(act):
    return 1.0 / 30.0 if act == "sine" else 1.0  # keep sin(30 z) well conditioned, as SIREN's init does


# ---- what the issue lists ------------------------------------------------------------------------
@pytest.mark.parametrize("plan", ["network", "layers"])
@pytest.mark.parametrize("act", ALL_ACTIVATIONS)
def test_every_activation(act, plan, precision):
    hidden = [32, 32] if plan == "network" else [40, 24]
    check([3, *hidden, 2], [act, act, None], precision, expect_plan=plan, scale=scale_for(act))


@pytest.mark.parametrize("act", ["softplus", "tanh", "sigmoid", "sine"])
def test_activation_on_the_last_layer(act, precision):
    check([3, 32, 32, 4], ["relu", "relu", act], precision, expect_plan="network", scale=scale_for(act))
    check([3, 40, 24, 4], ["relu", "relu", act], precision, expect_plan="layers", scale=scale_for(act))


def test_softplus_with_beta_and_threshold(precision):
    act = torch.nn.Softplus(beta=100.0, threshold=20.0)  # IDR/NeuS; beta z crosses the threshold here
    check([3, 64, 64, 64, 64, 3], [act] * 4 + [None], precision, N=200, expect_plan="network")


@pytest.mark.parametrize("width", [1, 3, 16, 48, 64, 100, 128, 256, 512])
def test_widths(width, precision):
    plan = "network" if width <= 128 else "layers"
    check([3, width, width, 3], ["softplus", "softplus", None], precision, expect_plan=plan)


@pytest.mark.parametrize("precision", ["high"], indirect=True)
def test_width_128_whole_network_in_tf32(precision):
    check([3, 128, 128, 3], ["tanh", "tanh", None], precision, expect_plan="network")


@pytest.mark.parametrize("depth", range(1, 9))
def test_depths(depth, precision):
    dims = [3] + [32] * (depth - 1) + [3]
    check(dims, ["tanh"] * (depth - 1) + [None], precision, expect_plan="layers" if depth == 1 else "network")


@pytest.mark.parametrize(
    "d_in,d_out,k",
    [(1, 1, 1), (2, 5, 1), (3, 3, 2), (4, 16, 2), (7, 3, 7), (16, 1, 3), (16, 16, 16)],
    ids=lambda v: str(v),
)
def test_in_out_features_and_tangents(d_in, d_out, k, precision):
    check([d_in, 32, 32, d_out], ["silu", "silu", None], precision, k=k)


@pytest.mark.parametrize("N", [0, 1, 63, 1000])
@pytest.mark.parametrize("plan", ["network", "layers"])
def test_point_counts(N, plan, precision):
    hidden = [64, 64] if plan == "network" else [40, 24]
    check([3, *hidden, 3], ["softplus", "softplus", None], precision, N=N, expect_plan=plan)


@pytest.mark.parametrize("bias", [False, [True, False, True], [False, True, False]], ids=["none", "mixed1", "mixed2"])
@pytest.mark.parametrize("plan", ["network", "layers"])
def test_bias_or_not(bias, plan, precision):
    hidden = [32, 32] if plan == "network" else [40, 24]
    check([3, *hidden, 3], ["gelu", "gelu", None], precision, bias=bias, expect_plan=plan)


def test_mixed_hidden_activations_run_per_layer(precision):
    check([3, 32, 32, 3], ["tanh", "relu", None], precision, expect_plan="layers")


@pytest.mark.parametrize("plan", ["network", "layers"])
def test_strided_weights_and_biases(plan, precision):
    """Parameters that are views (a column of a matrix for a bias, a transposed weight) give the
    same y and J as contiguous ones."""
    hidden = [32, 32] if plan == "network" else [40, 24]
    weights, biases = random_mlp([3, *hidden, 3])
    strided_w = [w.t().contiguous().t() for w in weights]
    strided_b = [torch.stack([b, torch.full_like(b, 7.0)], dim=1)[:, 0] for b in biases]
    assert all(b.stride() == (2,) for b in strided_b) and not strided_w[1].is_contiguous()
    x = torch.randn(63, 3)
    acts = ["tanh", "tanh", None]
    y, J, y_ref, J_ref = run_both(x, strided_w, strided_b, acts)
    assert_outputs(y, J, y_ref, J_ref, lambda: plain_pytorch(x, weights, biases, acts))


@pytest.fixture
def restore_matmul_settings():
    """torch's newer per-backend float32 matmul API, put back as it was after the test."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy float32 matmul API")
    before = matmul.fp32_precision, torch.backends.fp32_precision
    yield matmul
    matmul.fp32_precision, torch.backends.fp32_precision = before


@pytest.mark.parametrize("setting,expected", [("tf32", "tf32"), ("ieee", "tf32x3")])
def test_float32_precision_set_through_the_newer_api(setting, expected, restore_matmul_settings):
    """`torch.backends.cuda.matmul.fp32_precision = "tf32"` makes torch's legacy getter raise; the
    kernels read the newer setting instead and run."""
    restore_matmul_settings.fp32_precision = setting
    assert matmul_precision(torch.float32) == expected
    weights, biases = random_mlp([3, 32, 32, 3])
    x, acts = torch.randn(40, 3), ["tanh", "tanh", None]
    y, J, y_ref, J_ref = run_both(x, weights, biases, acts)
    assert_outputs(y, J, y_ref, J_ref, lambda: plain_pytorch(x, weights, biases, acts))


@pytest.mark.parametrize(
    "make_x",
    [
        lambda: torch.randn(3, 70).t(),  # transposed: stride (1, 70)
        lambda: torch.randn(140, 3)[::2],  # every other row
        lambda: torch.randn(70, 5)[:, 1:4],  # a column slice
        lambda: torch.randn(1, 3).expand(70, 3),  # stride 0 over the points
    ],
    ids=["transposed", "row-step", "column-slice", "expanded"],
)
@pytest.mark.parametrize("plan", ["network", "layers"])
def test_non_contiguous_inputs(make_x, plan, precision):
    hidden = [32, 32] if plan == "network" else [40, 24]
    check([3, *hidden, 3], ["tanh", "tanh", None], precision, x=make_x(), expect_plan=plan)


@pytest.mark.parametrize("lead", [(), (5,), (2, 7), (2, 3, 4)], ids=str)
def test_leading_shapes_through_the_module(lead, precision):
    model = tritonjac.JacobianMLP(3, [32, 32], 3, "softplus", backend="triton", device=TRITON_DEVICE)
    x = torch.randn(*lead, 3, device=TRITON_DEVICE)
    y, J = model(x)
    model.backend = "torch"
    y_ref, J_ref = model.double()(x.double())
    assert_close(y, y_ref, "float32", "y")  # at "highest": fp32-accurate
    assert_close(J, J_ref, "float32", "J")


@pytest.mark.parametrize("plan", ["network", "layers"])
def test_forward_without_jacobian(plan, precision):
    hidden = [32, 32] if plan == "network" else [40, 24]
    model = tritonjac.JacobianMLP(3, hidden, 2, "sigmoid", backend="triton", device=TRITON_DEVICE)
    x = torch.randn(63, 3, device=TRITON_DEVICE)
    y = model(x, jacobian=False)
    with torch.no_grad():
        y_seq = copy.deepcopy(model.to_sequential()).double()(x.cpu().double())
    assert_close(y, y_seq, "float32", "y")
    # the kernels' forward-only variant itself
    weights = [m.weight for m in model.linear_layers]
    biases = [m.bias for m in model.linear_layers]
    with torch.no_grad():
        y2, J2 = triton_engine.mlp_forward(x, weights, biases, model._spec, jacobian=False)
    assert J2 is None
    assert_close(y2, y_seq, "float32", "y of the forward-only kernels")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("plan", ["network", "layers"])
def test_half_precision_within_twice_torch_error(dtype, plan):
    """bf16/fp16: the error against float64 is at most 2x what PyTorch itself makes in that dtype."""
    hidden = [64, 64] if plan == "network" else [40, 24]
    dims = [3, *hidden, 3]
    acts = ["softplus", "softplus", None]
    weights, biases = random_mlp(dims, dtype=dtype)
    x = torch.randn(1000, 3).to(dtype)
    y, J, y_ref, J_ref = run_both(x, weights, biases, acts)
    assert y.dtype == dtype and J.dtype == dtype
    # PyTorch in the same dtype (CPU): the module's nn.Sequential and torch.func's jacfwd
    seq = tritonjac.JacobianMLP(3, hidden, 3, "softplus", dtype=dtype)
    with torch.no_grad():
        for layer, W, b in zip(seq.linear_layers, weights, biases):
            layer.weight.copy_(W)
            layer.bias.copy_(b)
    seq = seq.to_sequential()
    with torch.no_grad():
        y_torch = seq(x)
    J_torch = torch.func.vmap(torch.func.jacfwd(seq))(x)
    for ours, theirs, ref in ((y, y_torch, y_ref), (J, J_torch, J_ref)):
        err, torch_err = rel_err(ours.double(), ref), rel_err(theirs.double(), ref)
        assert err <= 2 * torch_err, (err, torch_err)


def test_autocast_runs_in_half_and_trains_the_float32_parameters():
    device_type = "cuda" if TRITON_DEVICE == "cuda" else "cpu"
    model = tritonjac.JacobianMLP(3, [32, 32], 3, "tanh", backend="triton", device=TRITON_DEVICE)
    x = torch.randn(63, 3, device=TRITON_DEVICE)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y, J = model(x)
    assert y.dtype == J.dtype == torch.bfloat16
    with torch.no_grad():
        model.backend = "torch"
        y_ref, J_ref = model(x)
    # bf16 operands: the error of bf16 rounding (2^-9 = 2e-3 relative) through three layers
    assert_close(y, y_ref, TABLE["bfloat16"], "y")
    assert_close(J, J_ref, TABLE["bfloat16"], "J")
    model.backend = "triton"
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y, J = model(x)
    (y.float().square().sum() + J.float().square().sum()).backward()
    wanted = model_gradients(model, x, lambda y, J: y.square().sum() + J.square().sum())[1:]
    for (name, p), want in zip(model.named_parameters(), wanted, strict=True):
        assert p.grad.dtype == torch.float32, name
        assert_close(p.grad, want, TABLE["bfloat16"], f"gradient of {name} under autocast")


# ---- autograd: the Triton forward's backward recomputes with the analytic engine -------------------
@pytest.mark.parametrize("loss_on", ["y", "J", "both"])
@pytest.mark.parametrize("plan", ["network", "layers"])
def test_gradients_through_the_triton_backend(loss_on, plan, precision):
    hidden = [32, 32] if plan == "network" else [40, 24]
    reference = tritonjac.JacobianMLP(3, hidden, 3, "softplus", backend="torch", dtype=torch.float64)
    ours = copy.deepcopy(reference).to(device=TRITON_DEVICE, dtype=torch.float32)
    ours.backend = "triton"
    x0 = torch.randn(50, 3, dtype=torch.float64)
    grads = {}
    for name, model in (("triton", ours), ("torch", reference)):
        p = next(model.parameters())
        x = x0.to(p).requires_grad_()
        y, J = model(x)
        loss = 0.0
        if loss_on in ("y", "both"):
            loss = loss + (y**2).sum()
        if loss_on in ("J", "both"):
            loss = loss + (J * torch.linspace(-1, 1, 9).to(p).view(3, 3)).sum()
        loss.backward()
        grads[name] = [x.grad.cpu()] + [p.grad.cpu() for p in model.parameters()]
    names = ["x", *(n for n, _ in reference.named_parameters())]
    for name, got, want in zip(names, grads["triton"], grads["torch"], strict=True):
        assert_close(got, want, "float32-gradient", f"gradient of {name}")  # at "highest": fp32-accurate


def test_training_on_y_only_without_jacobian(precision):
    model = tritonjac.JacobianMLP(3, [32, 32], 1, "softplus", backend="triton", device=TRITON_DEVICE)
    x = torch.randn(40, 3, device=TRITON_DEVICE)
    model(x, jacobian=False).sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.to_sequential()(x).sum().backward()
    for (name, b), a in zip(model.named_parameters(), ours, strict=True):
        assert_close(a, b.grad, "float32-gradient", f"gradient of {name}")


# ---- errors ------------------------------------------------------------------------------------------
def test_float64_is_refused_with_a_clear_error():
    model = tritonjac.JacobianMLP(3, [8], 2, backend="triton", dtype=torch.float64, device=TRITON_DEVICE)
    with pytest.raises(TypeError, match="Triton backend computes in float32, bfloat16 or float16, not torch.float64"):
        model(torch.randn(4, 3, dtype=torch.float64, device=TRITON_DEVICE))


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors \(x is on cpu\)"):
        launch.check_device(torch.zeros(1))


@triton.jit
def sin_cos_kernel(t_ptr, s_ptr, c_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    s, c = sin_cos(tl.load(t_ptr + o, mask=m, other=0.0))
    tl.store(s_ptr + o, s, mask=m)
    tl.store(c_ptr + o, c, mask=m)


def test_sin_cos_of_the_encodings():
    """The kernels' own sin and cos (no libdevice slow path) over the arguments encodings reach,
    |t| up to 2^9 * pi: within a few fp32 ulps of |t| (the argument's own rounding) of float64's."""
    t = torch.cat([torch.linspace(-1700, 1700, 20001), torch.randn(2000) * 3]).to(TRITON_DEVICE, torch.float32)
    s, c = torch.empty_like(t), torch.empty_like(t)
    sin_cos_kernel[(triton.cdiv(t.numel(), 1024),)](t, s, c, t.numel(), BLOCK=1024)
    t64 = t.double().cpu()
    allowed = 4 * torch.finfo(torch.float32).eps * t64.abs().clamp_min(1.0)
    assert ((s.double().cpu() - torch.sin(t64)).abs() <= allowed).all()
    assert ((c.double().cpu() - torch.cos(t64)).abs() <= allowed).all()
