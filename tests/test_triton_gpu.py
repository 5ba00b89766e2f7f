"""Checks only a real GPU can make: autotuning, TF32 accuracy, 64-bit offsets, the dispatch on CUDA.

The kernels' correctness over shapes and activations is in test_triton_forward.py, which runs the
compiled kernels on a GPU machine and the interpreter elsewhere.
"""

import pytest
import torch

import tritonjac
from helpers import INTERPRETING, assert_close, kernel_tolerances
from tritonjac.triton_engine import tuning

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU (compiled kernels)"),
]


def reference(model, x):
    with torch.no_grad():
        backend = model.backend
        model.backend = "torch"
        y, J = model.double()(x.double())
        model.float().backend = backend
    return y, J


def test_auto_backend_runs_the_kernels_on_cuda(kernels_run):
    model = tritonjac.JacobianMLP(3, [64] * 4, 3, torch.nn.Softplus(beta=100), device="cuda")
    model(torch.randn(100, 3, device="cuda"))
    assert kernels_run == ["mlp_forward"]


def test_autotuned_launch_is_recorded_and_correct(monkeypatch):
    monkeypatch.setenv("TRITONJAC_AUTOTUNE", "1")
    model = tritonjac.JacobianMLP(3, [48] * 3, 3, "tanh", device="cuda")
    x = torch.randn(5000, 3, device="cuda")
    with torch.no_grad():
        y, J = model(x)
    name = torch.cuda.get_device_name()
    assert any("WIDTH=48" in key for key in tuning.tuned_table(name).get("mlp_forward", {}))
    y_ref, J_ref = reference(model, x)
    assert_close(y, y_ref, "float32", "y")
    assert_close(J, J_ref, "float32", "J")


@pytest.mark.parametrize("hidden", [[64] * 4, [128] * 2, [512] * 2], ids=["w64", "w128", "w512"])
def test_tf32_accuracy(hidden, tf32):
    """TF32 (10-bit mantissa): the error against float64 at most twice plain PyTorch's in TF32 (the
    nn.Sequential and torch.func's jacfwd, on the GPU at the same setting)."""
    model = tritonjac.JacobianMLP(3, hidden, 3, torch.nn.Softplus(beta=100), device="cuda")
    x = torch.randn(2**16, 3, device="cuda")
    with torch.no_grad():
        y, J = model(x)
    y_ref, J_ref = reference(model, x)

    def plain_pytorch():
        seq = model.to_sequential()
        with torch.no_grad():
            return seq(x), torch.func.vmap(torch.func.jacfwd(seq))(x)

    tolerance_y, tolerance_J = kernel_tolerances([y_ref, J_ref], plain_pytorch, "float32")
    assert_close(y, y_ref, tolerance_y, "y")
    assert_close(J, J_ref, tolerance_J, "J")


def test_offsets_beyond_int32():
    """The per-layer path's (P, 4, 64) buffer has more than 2^31 elements at P = 8.5M points."""
    P = 8_500_000
    assert P * 4 * 64 > 2**31
    model = tritonjac.JacobianMLP(3, [64, 60], 3, "tanh", device="cuda")  # mixed widths: per-layer kernel
    x = torch.randn(P, 3, device="cuda")
    with torch.no_grad():
        y, J = model(x)
    tail = slice(P - 1000, P)
    y_ref, J_ref = reference(model, x[tail])
    assert_close(y[tail], y_ref, "float32", "y")
    assert_close(J[tail], J_ref, "float32", "J")


def test_weights_on_another_cuda_device_are_refused():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = tritonjac.JacobianMLP(3, [16], 3, device="cuda:1")
    with pytest.raises(RuntimeError, match="layer 0 weight is on cuda:1 but x is on cuda:0"):
        model(torch.randn(4, 3, device="cuda:0"))


# ---- torch.compile with inductor: the kernels inside the compiled graph -----------------------------------
@pytest.mark.parametrize("opaque", [False, True], ids=["traced", "opaque"])
def test_inductor_compiles_a_training_step_with_the_kernels(opaque, monkeypatch, fresh_dynamo, tf32):
    """fullgraph=True over forward, loss on y and J, and backward. Traced (the default on CUDA),
    inductor's generated code launches tritonjac's kernels itself; with TRITONJAC_OPAQUE_COMPILE=1
    it calls the opaque op. Both equal eager."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TRITONJAC_OPAQUE_COMPILE", "1" if opaque else "0")
    model = tritonjac.JacobianMLP(3, [64] * 3, 3, torch.nn.Softplus(beta=100), device="cuda")
    x = torch.randn(5000, 3, device="cuda")

    def loss_fn(x):
        y, J = model(x)
        return y.square().mean() + (J + torch.eye(3, device="cuda")).square().mean()

    loss, code = run_and_get_code(torch.compile(loss_fn, fullgraph=True), x)  # the forward graph's code
    loss.backward()  # compiles and runs the backward graph
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_ref = loss_fn(x)
    loss_ref.backward()
    code = "\n".join(code)
    assert ("mlp_forward_kernel" in code) != opaque and ("tritonjac.mlp_jacobian" in code) == opaque
    assert_close(loss, loss_ref, "tf32-same-kernels", "loss")
    for g, p in zip(grads, model.parameters()):
        assert_close(g, p.grad, "tf32-same-kernels", "gradient")


def test_triton_ops_pass_opcheck():
    from tritonjac.ops.common import bias_arguments
    from tritonjac.ops.traced import triton_mlp_jacobian_backward_op, triton_mlp_jacobian_op

    model = tritonjac.JacobianMLP(3, [32, 32], 3, "tanh", device="cuda")
    weights = [m.weight for m in model.linear_layers]
    x = torch.randn(300, 3, device="cuda", requires_grad=True)
    biases = bias_arguments([m.bias for m in model.linear_layers[:-1]] + [None], x)
    args = (x, weights, biases, x.new_empty(0), *model._spec.to_op_args(), True)
    torch.library.opcheck(triton_mlp_jacobian_op, args)
    with torch.no_grad():
        y, J = triton_mlp_jacobian_op(*args)
    detached = [t.detach() for t in weights], [t.detach() for t in biases]
    back = (x.detach(), *detached, x.new_empty(0), torch.ones_like(y), torch.ones_like(J), *model._spec.to_op_args())
    torch.library.opcheck(triton_mlp_jacobian_backward_op, back)
