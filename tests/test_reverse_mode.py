"""Reverse mode (J's m rows by adjoints, for m < k) against torch.func and autograd, next to forward
mode on the same networks; the choice of mode; its chunking, dtypes and compile op."""

import copy

import pytest
import torch
from torch import nn

import tritonjac
from helpers import assert_close, func_reference, make_mlp, model_gradients
from tritonjac.activations import REGISTRY
from tritonjac.functional import CallPlan
from tritonjac.init import geometric_

MODES = ["forward", "reverse"]
LOSSES = {
    "y": lambda y, J, wy, wJ: (y * wy).sum() + y.square().sum(),
    "J": lambda y, J, wy, wJ: (J * wJ).sum() + J.square().sum(),
    "both": lambda y, J, wy, wJ: (y * wy).sum() + (J * wJ).sum() + (J.square().sum(-1) * y[..., :1]).sum(),
}
ACTIVATIONS = [*REGISTRY, nn.Softplus(beta=100)]


def check_mode(model, x, loss_name, outputs: slice, mode: str, tolerance="float64"):
    """y, J and the gradients of x and every parameter in `mode` against torch.func's, in float64."""
    model.mode = mode
    assert model.plan(x).mode == mode
    xo = x.clone().requires_grad_()
    y, J = model(xo)
    torch.manual_seed(1)
    wy, wJ = torch.randn_like(y), torch.randn_like(J)
    ours = torch.autograd.grad(LOSSES[loss_name](y, J, wy, wJ), [xo, *model.parameters()])
    expected = model_gradients(model, x, lambda y, J: LOSSES[loss_name](y, J[..., outputs, :], wy, wJ))
    seq = copy.deepcopy(model.to_sequential()).double()
    y_ref = seq(x.double())
    J_ref = torch.func.vmap(torch.func.jacfwd(seq))(x.double())[..., outputs, : model.jacobian_inputs]
    assert_close(y, y_ref, tolerance, f"{mode} y")
    assert_close(J, J_ref, tolerance, f"{mode} J")
    names = ["x"] + [n for n, _ in model.named_parameters()]
    gradient_tolerance = "float32-gradient" if tolerance == "float32" else tolerance
    for name, a, b in zip(names, ours, expected, strict=True):
        assert_close(a, b, gradient_tolerance, f"{mode} d/d{name}")


def check_against_double_backward(model, x, outputs: slice, inputs: slice, mode: str):
    """Like `check_mode` for networks with skips (no nn.Sequential): the oracle is autograd, one
    reverse pass per selected output with create_graph=True, through the model's plain forward."""
    model.mode = mode
    xo = x.clone().requires_grad_()
    y, J = model(xo)
    ours = torch.autograd.grad(LOSSES["both"](y, J, 0.5, 1.0), [xo, *model.parameters()])
    plain = copy.deepcopy(model)
    xr = x.clone().requires_grad_()
    y_ref = plain._plain_forward(xr)
    rows = [
        torch.autograd.grad(y_ref[:, o].sum(), xr, create_graph=True)[0] for o in range(outputs.start, outputs.stop)
    ]
    J_ref = torch.stack(rows, -2)[..., inputs]
    assert_close(y, y_ref, "float64", f"{mode} y")
    assert_close(J, J_ref, "float64", f"{mode} J")
    expected = torch.autograd.grad(LOSSES["both"](y_ref, J_ref, 0.5, 1.0), [xr, *plain.parameters()])
    names = ["x"] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, ours, expected, strict=True):
        assert_close(a, b, "float64", f"{mode} d/d{name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_every_activation_in_both_modes(activation, loss_name, mode):
    """Two of three outputs, three of four inputs: reverse mode's 'auto' case, and forward mode on
    the same network. The output activation makes the last layer's curvature count too."""
    model = make_mlp(4, [24, 13, 9], 3, activation, output_activation="tanh", jacobian_inputs=3, jacobian_outputs=2)
    check_mode(model, torch.randn(40, 4, dtype=torch.float64), loss_name, slice(0, 2), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ["one-layer", "one-hidden", "linear-hidden", "latent-skip", "skip-into-last"])
def test_structures_in_both_modes(shape, mode):
    """The reverse sweep's edge cases: no hidden layer, a first layer that is also the last's input,
    equal-width hidden layers with no activation (an adjoint passes through unchanged), a latent
    code before xyz with a skip, a skip into the last layer (a0's adjoint from there)."""
    x = torch.randn(30, 3, dtype=torch.float64)
    if shape == "linear-hidden":
        check_mode(make_mlp(3, [16, 16, 16, 16], 2, "identity", output_activation="tanh"), x, "both", slice(0, 2), mode)
    elif shape == "one-layer":
        check_mode(make_mlp(3, [], 2, None, output_activation="sigmoid"), x, "both", slice(0, 2), mode)
    elif shape == "one-hidden":
        check_mode(make_mlp(3, [16], 1, "sine"), x, "both", slice(0, 1), mode)
    elif shape == "latent-skip":
        model = make_mlp(8 + 3, [24, 24, 24], 1, "softplus", jacobian_inputs=slice(-3, None), skips=(2,))
        check_against_double_backward(model, torch.randn(30, 11, dtype=torch.float64), slice(0, 1), slice(8, 11), mode)
    else:
        model = make_mlp(3, [16, 16], 4, "gelu", skips=(2,), skip_input_first=True, jacobian_outputs=slice(2, 4))
        check_against_double_backward(model, x, slice(2, 4), slice(0, 3), mode)


@pytest.mark.parametrize("mode", MODES)
def test_eikonal_step_against_double_backward(mode):
    """An SDF's training step as users write it without tritonjac: the gradient by autograd with
    create_graph=True, the eikonal loss, backward. Both modes give its gradients."""
    torch.manual_seed(0)
    model = make_mlp(3, [32] * 4, 1, nn.Softplus(beta=100), mode=mode)
    geometric_(model, radius=0.5)
    x = torch.rand(64, 3, dtype=torch.float64) * 2 - 1

    def eikonal(y, grad):
        return ((grad.norm(dim=-1) - 1) ** 2).mean() + y.abs().mean()

    xo = x.clone().requires_grad_()
    y, J = model(xo)
    ours = torch.autograd.grad(eikonal(y, J[:, 0]), [xo, *model.parameters()])
    plain = copy.deepcopy(model)
    xr = x.clone().requires_grad_()
    y_ref = plain._plain_forward(xr)
    (grad,) = torch.autograd.grad(y_ref.sum(), xr, create_graph=True)
    expected = torch.autograd.grad(eikonal(y_ref, grad), [xr, *plain.parameters()])
    for a, b in zip(ours, expected, strict=True):
        assert_close(a, b, "float64", f"{mode} eikonal gradient")


def test_reverse_mode_over_many_chunks(monkeypatch):
    """Chunk boundaries and a ragged last chunk: the saved adjoints belong to their chunk."""
    from tritonjac import torch_engine

    monkeypatch.setattr(torch_engine.common, "REVERSE_CHUNK_BYTES", 2 * 16 * 8 * 5)  # 5 points per chunk
    model = make_mlp(3, [16, 16], 1, "tanh")
    check_mode(model, torch.randn(23, 3, dtype=torch.float64), "both", slice(0, 1), "reverse")


@pytest.mark.parametrize("mode", MODES)
def test_float32_in_both_modes(mode):
    model = make_mlp(3, [32, 32], 1, nn.Softplus(beta=100), dtype=torch.float32)
    check_mode(model, torch.randn(50, 3), "both", slice(0, 1), mode, tolerance="float32")


def test_bfloat16_autocast_in_reverse_mode():
    """Under CPU autocast to bf16 the engine computes in bf16, as nn.Linear would; reverse mode
    stays within bf16's error of the float64 result, like forward mode."""
    torch.manual_seed(0)
    model = make_mlp(3, [32, 32], 1, "tanh", dtype=torch.float32)
    x = torch.randn(50, 3)
    y_ref, J_ref = copy.deepcopy(model).double()(x.double())
    for mode in MODES:
        model.mode = mode
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, J = model(x)
        assert y.dtype == J.dtype == torch.bfloat16
        assert_close(J.double(), J_ref, "bfloat16", f"{mode} J in bf16")


def test_auto_takes_reverse_mode_for_fewer_outputs_and_says_why():
    x = torch.randn(5, 3)
    sdf = tritonjac.JacobianMLP(3, [16], 1)
    plan = sdf.plan(x)
    assert isinstance(plan, CallPlan) and (plan.engine, plan.mode) == ("torch", "reverse")
    assert (
        str(plan)
        == "reverse mode on the PyTorch engine: 1 outputs < 3 inputs: 1 + 1 rows per point and layer instead of 1 + 3"
    )
    field = tritonjac.JacobianMLP(3, [16], 3)
    assert field.plan(x).mode == "forward"
    narrow = tritonjac.JacobianMLP(3, [16], 8, jacobian_outputs=1)  # m counts the selected outputs
    assert narrow.plan(x).mode == "reverse"
    field.mode = "reverse"
    assert field.plan(x).mode == "reverse" and "was asked for" in field.plan(x).mode_reason
    assert "mode='reverse'" in repr(field)
    converted = tritonjac.JacobianMLP.from_module(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)))
    assert converted.plan(x).mode == "reverse"
    y, J = tritonjac.mlp_jacobian(x, [sdf.linear_layers[0].weight], None, [None], mode="forward")
    assert J.shape == (5, 16, 3)


def test_plan_names_the_triton_kernels_plan():
    x = torch.randn(4, 3)
    field = tritonjac.JacobianMLP(3, [16, 16], 3, backend="triton")
    assert str(field.plan(x)) == (
        "forward mode on the Triton kernels: 3 outputs >= 3 inputs: 1 + 3 rows per point and layer, one GEMM "
        "(reverse: 1 + 3, two); the whole network in one launch"
    )
    sdf = tritonjac.JacobianMLP(3, [16, 32], 1, backend="triton")
    plan = sdf.plan(x)
    assert (plan.engine, plan.mode, plan.kernels) == ("triton", "reverse", "layers")
    assert "1 outputs < 3 inputs" in plan.mode_reason and "hidden widths differ" in str(plan)
    sdf = tritonjac.JacobianMLP(3, [16, 16], 1, backend="triton")
    assert str(sdf.plan(x)).endswith("1 + 1 rows per point and layer instead of 1 + 3; the whole network in one launch")
    encoded = tritonjac.JacobianMLP(3, [16, 16], 1, encoding=tritonjac.PositionalEncoding(2), backend="triton")
    assert encoded.plan(x).kernels_reason == "the whole-network reverse kernel has no encodings or skips yet"


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match="mode must be one of 'auto', 'forward', 'reverse', not 'backward'"):
        tritonjac.JacobianMLP(3, [16], 1, mode="backward")
    model = tritonjac.JacobianMLP(3, [16], 1)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.mode = "fast"


@pytest.mark.parametrize("mode", MODES)
def test_chunks_on_worker_threads(mode, monkeypatch):
    """Chunks on 3 workers (torch's intra-op threads set to 3 for the call): every chunk computed
    once by its worker, the per-worker weight gradients summed, the caller's thread count restored,
    and the same inputs give bit-identical gradients (the workers' chunks are fixed)."""
    from tritonjac import torch_engine

    monkeypatch.setattr(torch_engine.common, "CHUNK_BYTES", 4 * 16 * 8 * 3)  # 3 points per chunk
    monkeypatch.setattr(torch_engine.common, "REVERSE_CHUNK_BYTES", 2 * 16 * 8 * 3)  # and in reverse mode
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        model = make_mlp(3, [16, 16], 1, "tanh")
        check_mode(model, torch.randn(47, 3, dtype=torch.float64), "both", slice(0, 1), mode)
        assert torch.get_num_threads() == 3
        x = torch.randn(47, 3, dtype=torch.float64)
        runs = []
        for _ in range(2):
            model.zero_grad()
            y, J = model(x)
            (y.square().sum() + J.square().sum()).backward()
            runs.append([p.grad.clone() for p in model.parameters()])
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


def test_workers_keep_inference_mode_and_raise_errors(monkeypatch):
    from tritonjac.torch_engine import common

    monkeypatch.setattr(common, "REVERSE_CHUNK_BYTES", 2 * 16 * 8 * 3)  # one output: reverse mode
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = make_mlp(3, [16, 16], 1, "tanh")
        x = torch.randn(40, 3, dtype=torch.float64)
        with torch.inference_mode():
            y, J = model(x)  # the workers write into inference tensors: they must be in inference mode too
        assert y.is_inference()
        expected = model(x)[1]
        assert_close(J, expected, "float64-same-math", "J under inference mode")

        def fail(start, stop, worker, scratch):
            if worker == 1:
                raise RuntimeError(f"chunk {start}:{stop} failed")

        with pytest.raises(RuntimeError, match="failed"):
            common.run_chunks(40, 5, x, fail)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("caller_flushing", [False, True])
def test_workers_flush_denormals_and_restore_the_callers_mode(threads, caller_flushing):
    """Every worker (the calling thread included, and the single-worker path) works with denormals
    flushed, which is what keeps softplus(100) from running 9x slower on CPU; afterwards the calling
    thread is back in its own mode, whichever it was."""
    from tritonjac.torch_engine import common

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(caller_flushing)
    seen = {}

    def probe(start, stop, worker, scratch):
        tiny = torch.full((4,), 2.0**-140)  # a float32 denormal
        seen[start] = (worker, common.flushing_denormals(), bool((tiny * 1.0).eq(0).all()))

    try:
        assert common.flushing_denormals() is caller_flushing
        workers = common.run_chunks(40, 5, torch.zeros(1), probe)
        assert workers == threads
        assert sorted(seen) == list(range(0, 40, 5))
        assert {w for w, _, _ in seen.values()} == set(range(threads))
        assert all(flushing and flushed for _, flushing, flushed in seen.values())
        assert common.flushing_denormals() is caller_flushing
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads, points", [(1, 40), (2, 40), (2, 5)])
def test_what_skips_the_flush_passes_zeroes_their_products(threads, points):
    """`flush_denormals` zeroes softplus's values below 2^26 x the smallest normal, so that their
    products with small tangents are not denormal; it skips that pass only on a worker whose ops run
    alone with the CPU's flush mode set, where such products come out zero anyway. Outside the
    workers, and on a worker whose ops run on several threads (one chunk, two threads), the pass is
    made."""
    from tritonjac.torch_engine import common

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    seen = []

    def probe(start, stop, worker, scratch):
        small = torch.full((4,), 1e-35)  # a normal float32; times 1e-5, a denormal
        common.flush_denormals(small)
        alone = torch.get_num_threads() == 1
        seen.append((alone, bool(small.eq(0).all()), bool((small * 1e-5).eq(0).all())))

    try:
        small = torch.full((4,), 1e-35)
        common.flush_denormals(small)
        assert small.eq(0).all(), "outside the workers the pass zeroes them"
        common.run_chunks(points, 5, torch.zeros(1), probe)
        assert len(seen) == points // 5
        assert all(product_zero for _, _, product_zero in seen)
        assert all(zeroed is not alone for alone, zeroed, _ in seen)
        assert any(alone for alone, _, _ in seen) is (points > 5 or threads == 1)
    finally:
        torch.set_num_threads(before)


def test_softplus_network_is_accurate_where_values_are_denormal():
    """Softplus(100) where most pre-activations are far below zero: values and slopes there are
    below float32's normal range and flushed to zero on the workers; y and J in float32 still agree
    with the float64 oracle (which keeps them) to float32 accuracy, in both modes."""
    torch.manual_seed(3)
    model = make_mlp(3, [32, 32], 2, nn.Softplus(beta=100.0), dtype=torch.float32)
    x = torch.randn(200, 3) * 4
    z1 = x @ model.linear_layers[0].weight.t() + model.linear_layers[0].bias
    assert (100 * z1 < -90).float().mean() > 0.3  # exp(100 z) is a float32 denormal there
    seq64 = copy.deepcopy(model.to_sequential()).double()
    y_ref, J_ref = func_reference(seq64, x.double(), 3)
    for mode in ("forward", "reverse"):
        model.mode = mode
        y, J = model(x)
        assert_close(y, y_ref, "float32", f"y ({mode} mode)")
        assert_close(J, J_ref, "float32", f"J ({mode} mode)")
