"""Bad and unusual input: clear errors, never a silent wrong answer or a crash."""

import pytest
import torch

import tritonjac
from helpers import assert_close, func_gradients, make_mlp, sequential_reference


@pytest.fixture
def model():
    return make_mlp(3, [16, 16], 2, "softplus")


def test_wrong_last_dimension(model):
    with pytest.raises(
        ValueError, match=r"x has 4 features in its last dimension but layer 0 expects 3 inputs \(x.shape = \(5, 4\)\)"
    ):
        model(torch.randn(5, 4, dtype=torch.float64))


def test_scalar_input(model):
    with pytest.raises(ValueError, match="at least one dimension"):
        model(torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex128])
def test_unsupported_dtypes(model, dtype):
    x = torch.ones(5, 3).to(dtype)
    with pytest.raises(
        TypeError, match=f"x has dtype {dtype}; tritonjac supports float32, float64, bfloat16 and float16"
    ):
        model(x)


def test_dtype_mismatch_with_parameters(model):
    with pytest.raises(TypeError, match="layer 0 weight has dtype torch.float64 but x has dtype torch.float32"):
        model(torch.randn(5, 3))


def test_device_mismatch(model):
    x = torch.empty(5, 3, dtype=torch.float64, device="meta")
    with pytest.raises(RuntimeError, match="layer 0 weight is on cpu but x is on meta"):
        model(x)


def test_not_a_tensor(model):
    with pytest.raises(TypeError, match="x must be a torch.Tensor, not list"):
        model([[1.0, 2.0, 3.0]])


def test_nan_and_inf_propagate_per_point(model):
    x = torch.randn(6, 3, dtype=torch.float64)
    x[1, 0] = float("nan")
    x[3, 2] = float("inf")
    y, J = model(x)
    assert torch.isnan(y[1]).all() and torch.isnan(J[1]).any()
    assert not torch.isfinite(J[3]).all() or not torch.isfinite(y[3]).all()
    clean = [0, 2, 4, 5]
    y_ref, J_ref = sequential_reference(model.to_sequential(), x[clean], 3)
    assert_close(y[clean], y_ref, "float64", "y")
    assert_close(J[clean], J_ref, "float64", "J")
    # the backward runs through them, and the clean points get their own gradients
    xg = x.clone().requires_grad_()
    y, J = model(xg)
    (y.sum() + J.sum()).backward()
    seq = model.to_sequential()
    (want,) = func_gradients(seq, x[clean], lambda y, J: y.sum() + J.sum(), [])
    assert_close(xg.grad[clean], want, "float64", "gradient of the clean points")


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(20, 6, dtype=torch.float64)[:, ::2],  # strided columns
        lambda: torch.randn(3, 20, dtype=torch.float64).t(),  # transposed
        lambda: torch.randn(1, 3, dtype=torch.float64).expand(20, 3),  # stride-0 rows
        lambda: torch.randn(3, dtype=torch.float64).expand(4, 5, 3),  # fully expanded
        lambda: torch.randn(5, 8, 3, dtype=torch.float64).transpose(0, 1),  # permuted leading dims
    ],
    ids=["strided", "transposed", "expanded-rows", "expanded-all", "permuted"],
)
def test_non_contiguous_inputs(model, make):
    x = make()
    y, J = model(x)
    y_ref, J_ref = sequential_reference(model.to_sequential(), x.contiguous(), 3)
    assert_close(y, y_ref, "float64", "y")
    assert_close(J, J_ref, "float64", "J")
    assert y.is_contiguous() and J.is_contiguous()
    xg = x.detach().clone().requires_grad_()  # gradient w.r.t. an input of the same shape
    y, J = model(xg)
    loss = lambda y, J: (y * torch.arange(y.shape[-1], dtype=y.dtype)).sum() + J.square().sum()  # noqa: E731
    loss(y, J).backward()
    (want,) = func_gradients(model.to_sequential(), x.contiguous(), loss, [])
    assert_close(xg.grad, want, "float64", "gradient of x")


def test_in_place_changes_to_outputs_keep_gradients_right(model):
    # the backward saves neither y nor J, so editing them in place is legal and tracked by autograd
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y, J = model(x)
    (g_plain,) = torch.autograd.grad(y.sum() + 2 * J.sum(), x)
    y, J = model(x)
    y.add_(1)
    J.mul_(2)
    (g_inplace,) = torch.autograd.grad(y.sum() + J.sum(), x)
    assert torch.allclose(g_plain, g_inplace, rtol=1e-12, atol=0)


def test_zero_points_backward(model):
    x = torch.randn(0, 3, dtype=torch.float64, requires_grad=True)
    y, J = model(x)
    assert y.shape == (0, 2) and J.shape == (0, 2, 3)
    (y.sum() + J.sum()).backward()
    assert x.grad.shape == (0, 3)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_functional_checks_weight_rank():
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer 0 weight must be 2-D \(out, in\), got shape \(8, 3, 1\)"):
        tritonjac.mlp_jacobian(x, [torch.randn(8, 3, 1, dtype=torch.float64)], None, [None])
