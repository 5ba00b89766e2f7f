"""JacobianMLP as a PyTorch citizen: weight norm, autocast and half precision, DDP, threads, big inputs."""

import copy
import os
import threading
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tritonjac
from helpers import ENGINES, TRITON_DEVICE, assert_close, model_gradients, rel_err, sequential_reference
from tritonjac import benchmark


def device_for(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def three_grad_reference(seq, x):
    """y and J of an nn.Sequential by the three-autograd.grad trick, differentiable (create_graph)."""
    x = x.detach().requires_grad_()
    y = seq(x)
    rows = [torch.autograd.grad(y[:, i].sum(), x, create_graph=True)[0] for i in range(y.shape[1])]
    return x, y, torch.stack(rows, dim=1)


# ---- existing models: weight norm, both APIs -----------------------------------------------------------
def weight_normed_stack(api):
    seq = nn.Sequential(nn.Linear(3, 16), nn.Softplus(beta=10), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    for i in (0, 2, 4):
        if api == "parametrizations":
            seq[i] = nn.utils.parametrizations.weight_norm(seq[i])
        else:
            with warnings.catch_warnings():  # torch deprecates the old API (IDR and NeuS still use it)
                warnings.simplefilter("ignore")
                seq[i] = nn.utils.weight_norm(seq[i])
    return seq


@pytest.mark.parametrize("api", ["parametrizations", "hooks"])
def test_weight_norm_trains_the_underlying_parameters(api):
    seq = weight_normed_stack(api)
    model = tritonjac.JacobianMLP.from_module(seq)
    names = {n for n, _ in seq.named_parameters()}
    assert ("0.weight_g" in names) == (api == "hooks")
    x = torch.randn(20, 3, dtype=torch.float64)
    y, J = model(x.clone().requires_grad_())
    xr, y_ref, J_ref = three_grad_reference(seq, x)
    assert_close(y, y_ref, "float64-same-math", "y")
    assert_close(J, J_ref, "float64-same-math", "J")
    params = list(seq.parameters())
    ours = torch.autograd.grad(y.square().sum() + J.square().sum(), params)
    ref = torch.autograd.grad(y_ref.square().sum() + J_ref.square().sum(), params)
    for a, b in zip(ours, ref):
        assert_close(a, b, "float64")


@pytest.mark.parametrize("api", ["parametrizations", "hooks"])
def test_weight_norm_state_dict_round_trip(api):
    model = tritonjac.JacobianMLP.from_module(weight_normed_stack(api))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    other = tritonjac.JacobianMLP.from_module(weight_normed_stack(api))
    other.load_state_dict(model.state_dict())
    x = torch.randn(10, 3, dtype=torch.float64)
    for a, b in zip(model(x), other(x)):
        assert torch.equal(a, b)


def test_other_forward_hooks_are_still_refused():
    layer = nn.Linear(3, 3)
    layer.register_forward_pre_hook(lambda m, args: None)
    with pytest.raises(ValueError, match=r"layer 0 .* has forward hooks"):
        tritonjac.JacobianMLP.from_module(nn.Sequential(layer))


# ---- autocast and half precision ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ENGINES)
def test_half_precision_within_twice_torch_error(backend, dtype):
    """Both engines in bf16/fp16: the error against float64 is at most 2x PyTorch's own in that dtype."""
    model = tritonjac.JacobianMLP(3, [64, 64], 3, nn.Softplus(beta=100), dtype=torch.float64)
    half = copy.deepcopy(model).to(device=device_for(backend), dtype=dtype)
    half.backend = backend
    with torch.no_grad():  # the reference from the very same rounded parameters
        for a, b in zip(model.parameters(), half.parameters()):
            a.copy_(b.double())
    x = (0.5 * torch.randn(1000, 3)).to(dtype)
    with torch.no_grad():
        y, J = half(x.to(half.linear_layers[0].weight.device))
        y_ref, J_ref = model(x.double())
        seq = copy.deepcopy(half).cpu().to_sequential()
        y_torch = seq(x)
    J_torch = torch.func.vmap(torch.func.jacfwd(seq))(x)
    assert y.dtype == J.dtype == dtype
    assert rel_err(y.cpu().double(), y_ref) <= 2 * rel_err(y_torch.double(), y_ref)
    assert rel_err(J.cpu().double(), J_ref) <= 2 * rel_err(J_torch.double(), J_ref)


@pytest.mark.parametrize("backend", ENGINES)
def test_cpu_autocast_like_a_built_in_layer(backend):
    """Under autocast the module computes and returns in the autocast dtype, as nn.Linear does, and
    the float32 parameters get float32 gradients."""
    device = device_for(backend)
    model = tritonjac.JacobianMLP(3, [32, 32], 3, "tanh", backend=backend, device=device)
    x = torch.randn(63, 3, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, J = model(x)
        y_linear = model.linear_layers[0](x)
    assert y.dtype == J.dtype == y_linear.dtype == torch.bfloat16
    y_ref, J_ref = sequential_reference(copy.deepcopy(model.to_sequential()).double().cpu(), x.double().cpu(), 3)
    assert_close(y, y_ref, "bfloat16", "y under autocast")
    assert_close(J, J_ref, "bfloat16", "J under autocast")

    def loss(y, J):
        return y.float().square().sum() + J.float().square().sum()

    loss(y, J).backward()
    wanted = model_gradients(model, x, loss)[1:]
    for (name, p), want in zip(model.named_parameters(), wanted, strict=True):
        assert p.grad.dtype == torch.float32, name
        assert_close(p.grad, want, "bfloat16", f"gradient of {name} under autocast")


# ---- distributed data parallel ---------------------------------------------------------------------------
def _ddp_worker(rank, world, init_file, out_file):
    torch.manual_seed(0)
    torch.set_num_threads(1)  # two processes on a 2-core CI machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tritonjac.JacobianMLP(3, [16, 16], 3, "softplus", dtype=torch.float64)
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(40, 3, dtype=torch.float64)  # the same batch everywhere (same seed)
        y, J = ddp(x.chunk(world)[rank])
        (y.square().mean() + J.square().mean()).backward()
        if rank == 0:
            torch.save([p.grad for p in model.parameters()], out_file)
        dist.barrier()  # neither rank tears gloo down while the other still uses it
        del ddp  # its reducer holds gloo work: release it before the group goes
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's threads abort there now and then ("terminate
    # called without an active exception", about 1 run in 30 on the CI machine), after all the work
    # above has finished and been checked by the barrier.
    os._exit(0)


def test_ddp_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "grads.pt")), nprocs=2, join=True)
    torch.manual_seed(0)
    model = tritonjac.JacobianMLP(3, [16, 16], 3, "softplus", dtype=torch.float64)
    x = torch.randn(40, 3, dtype=torch.float64)
    y, J = model(x)
    (y.square().mean() + J.square().mean()).backward()
    for a, b in zip(torch.load(tmp_path / "grads.pt"), model.parameters()):
        assert_close(a, b.grad, "float64-same-math")


# ---- hostile use ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(
                TRITON_DEVICE == "cpu", reason="compiled kernels only: Triton's interpreter keeps global state"
            ),
        ),
    ],
)
def test_concurrent_calls_from_two_threads(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    device = device_for(backend)
    model = tritonjac.JacobianMLP(3, [32, 32], 3, "softplus", dtype=dtype, backend=backend, device=device)
    inputs = [torch.randn(5000, 3, dtype=dtype, device=device) for _ in range(2)]
    expected = [model(x) for x in inputs]
    results = [None, None]

    def run(i):
        for _ in range(3):
            results[i] = model(inputs[i])
        if device == "cuda":
            torch.cuda.synchronize()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (y, J), (y0, J0) in zip(results, expected):
        assert torch.equal(y, y0) and torch.equal(J, J0)


def test_ten_million_points_on_cpu():
    """No int32 overflow and memory linear in N: the peak is the outputs plus a chunk's scratch."""
    model = tritonjac.JacobianMLP(3, [8], 3, "tanh", backend="torch")
    N = 10_000_000
    x = torch.randn(N, 3)
    holder = {}

    def run():
        with torch.no_grad():
            holder["out"] = model(x)

    peak = benchmark.peak_memory_mb(run, "cpu")
    y, J = holder["out"]
    assert y.shape == (N, 3) and J.shape == (N, 3, 3)
    outputs_mb = (y.numel() + J.numel()) * 4 / 2**20
    if peak is not None:
        assert peak < outputs_mb + 64, (peak, outputs_mb)
    tail = slice(N - 100, N)
    with torch.no_grad():
        y_ref, J_ref = copy.deepcopy(model).double()(x[tail].double())
    assert_close(y[tail], y_ref, "float32-engine", "y")
    assert_close(J[tail], J_ref, "float32-engine", "J")


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_saved_state_without_grad(backend, mode):
    device = device_for(backend)
    model = tritonjac.JacobianMLP(3, [32, 32], 3, backend=backend, device=device)
    x = torch.randn(10, 3, device=device, requires_grad=True)
    with getattr(torch, mode)():
        y, J = model(x)
    assert y.grad_fn is None and J.grad_fn is None and not y.requires_grad


@pytest.mark.parametrize("backend", ENGINES)
def test_nan_and_inf_stay_in_their_points(backend):
    device = device_for(backend)
    model = tritonjac.JacobianMLP(3, [32, 32], 3, backend=backend, device=device)
    x = torch.randn(20, 3, device=device)
    x[3, 1] = float("nan")
    x[7, 0] = float("inf")
    with torch.no_grad():
        y, J = model(x)
        clean = [i for i in range(20) if i not in (3, 7)]
        y_clean, J_clean = model(x[clean])
    assert torch.isnan(y[3]).all()
    # equal up to rounding (a block of other size may sum in another order)
    assert_close(y[clean], y_clean, "float32-reordered", "y")
    assert_close(J[clean], J_clean, "float32-reordered", "J")


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("n", [0, 1])
def test_zero_and_one_point_train(backend, n):
    device = device_for(backend)
    _zero_and_one_point_train(backend, n, device)


@pytest.mark.parametrize("n", [0, 1])
def test_zero_and_one_point_train_fused_backward(n, tf32):
    """In TF32 the fused backward takes the loss on J; with no points it launches nothing, and
    allocates no workspace that would stay unwritten."""
    _zero_and_one_point_train("triton", n, device_for("triton"))


def _zero_and_one_point_train(backend, n, device):
    model = tritonjac.JacobianMLP(3, [32, 32], 3, backend=backend, device=device)
    x = torch.randn(n, 3, device=device, requires_grad=True)
    y, J = model(x)
    assert y.shape == (n, 3) and J.shape == (n, 3, 3)
    loss = lambda y, J: y.sum() + J.square().sum()  # noqa: E731
    loss(y, J).backward()
    wanted = model_gradients(model, x, loss)  # zeros for no points
    names = ["x"] + [name for name, _ in model.named_parameters()]
    for name, got, want in zip(names, [x.grad, *(p.grad for p in model.parameters())], wanted, strict=True):
        assert_close(got, want, "float32-gradient", f"gradient of {name}")
        assert n or not got.any(), f"gradient of {name} from no points"


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("x_grad,params_grad", [(True, False), (False, True), (False, False)])
def test_requires_grad_combinations(backend, x_grad, params_grad):
    device = device_for(backend)
    model = tritonjac.JacobianMLP(3, [32, 32], 3, backend=backend, device=device)
    model.requires_grad_(params_grad)
    x = torch.randn(10, 3, device=device, requires_grad=x_grad)
    y, J = model(x)
    assert y.requires_grad == (x_grad or params_grad)
    if y.requires_grad:
        loss = lambda y, J: y.sum() + J.square().sum()  # noqa: E731
        loss(y, J).backward()
        assert (x.grad is not None) == x_grad
        assert all((p.grad is not None) == params_grad for p in model.parameters())
        wanted = model_gradients(model, x, loss)
        got = [x.grad, *(p.grad for p in model.parameters())]
        for name, g, want in zip(["x"] + [n for n, _ in model.named_parameters()], got, wanted, strict=True):
            if g is not None:
                assert_close(g, want, "float32-gradient", f"gradient of {name}")


def test_environment_is_not_changed_by_import():
    before = dict(os.environ)
    import importlib

    importlib.reload(tritonjac)
    assert dict(os.environ) == before
