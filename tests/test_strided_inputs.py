"""Strided, expanded and broadcast inputs through the forward and the backward, on both engines and
both Triton plans: y, J, x's gradient and every weight and bias gradient against torch.func in
float64 (`helpers.func_jacobian` over the plain nn.Sequential), never only shapes.

The kernels read x through its strides; a launcher that assumed a contiguous x would read the wrong
points, and only values show it. The loss weights every element of y and J differently, so a point
or feature read from the wrong place changes the gradients.
"""

import copy

import pytest
import torch

from helpers import TRITON_DEVICE, assert_close, func_jacobian, kernel_tolerances, make_mlp

N = 37  # not a multiple of any block size

# name -> (base shape, view of the base); the view is what the model sees
LAYOUTS = {
    "transposed": ((3, N), lambda b: b.t()),
    "row-step": ((2 * N, 3), lambda b: b[::2]),
    "column-slice": ((N, 5), lambda b: b[:, 1:4]),
    "feature-step": ((N, 7), lambda b: b[:, ::3]),
    "expanded-points": ((1, 3), lambda b: b.expand(N, 3)),
    "expanded-features": ((N, 1), lambda b: b.expand(N, 3)),
    "broadcast-leading": ((1, N, 3), lambda b: b.expand(2, N, 3)),
    "permuted-leading": ((N, 2, 3), lambda b: b.permute(1, 0, 2)),
}
# (engine, Triton plan): the widths choose the plan (equal widths <= 64 fit the whole-network kernels)
PLANS = {"torch": [32, 32], "triton-network": [32, 32], "triton-layers": [40, 24]}


def loss_of(y, J, wy, wJ):
    return (y * wy).sum() + (J * wJ).sum() + 0.5 * J.square().sum()


def run(model, base, view, wy, wJ):
    """y, J and the gradients of the loss w.r.t. the base tensor and every parameter."""
    base = base.detach().clone().requires_grad_()
    for p in model.parameters():
        p.grad = None
    y, J = model(view(base))
    loss_of(y, J, wy.to(y), wJ.to(J)).backward()
    return y, J, [base.grad] + [p.grad for p in model.parameters()]


def oracle(model, base, view, wy, wJ, dtype=torch.float64, device="cpu"):
    """The same through autograd over torch.func's Jacobian of the nn.Sequential, in float64 (or, as
    the peer whose TF32 error sets the tolerance on a GPU, in float32 on the GPU)."""
    seq = copy.deepcopy(model.to_sequential()).to(device=device, dtype=dtype)
    base = base.detach().to(device=device, dtype=dtype).clone().requires_grad_()
    wy, wJ = wy.to(base), wJ.to(base)
    x = view(base)
    y, J = func_jacobian(seq, x.contiguous().reshape(-1, x.shape[-1]))  # torch.func wants real memory
    y, J = y.reshape(*x.shape[:-1], -1), J.reshape(*x.shape[:-1], *J.shape[-2:])
    loss_of(y, J, wy, wJ).backward()
    return y, J, [base.grad] + [p.grad for p in seq.parameters()]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("plan", list(PLANS))
def test_values_and_every_gradient(plan, layout, kernels_run, tf32):
    """(At matmul precision "high": the fused backward with a loss on J needs it, test_triton_backward.py.)"""
    engine = plan.split("-")[0]
    shape, view = LAYOUTS[layout]
    model = make_mlp(3, PLANS[plan], 3, "tanh", backend=engine, dtype=torch.float32)
    device = TRITON_DEVICE if engine == "triton" else "cpu"
    model.to(device)
    base = torch.randn(shape, dtype=torch.float64)
    x = view(base)
    assert not x.is_contiguous() or x.stride(0) == 0, "the layout must not be a plain contiguous tensor"
    y_ref, J_ref, grads_ref = oracle(model, base, view, *weights_for(model, x))
    y, J, grads = run(model, base.to(device=device, dtype=torch.float32), view, *weights_for(model, x))

    expected = [y_ref, J_ref, *grads_ref]
    if engine == "triton":

        def plain_pytorch():
            y_p, J_p, grads_p = oracle(model, base, view, *weights_for(model, x), torch.float32, device)
            return [y_p, J_p, *grads_p]

        tolerances = kernel_tolerances(expected, plain_pytorch)
    else:
        tolerances = ["float32-gradient"] * len(expected)
    names = ["y", "J"] + [f"gradient of {name}" for name in ["x", *(n for n, _ in model.named_parameters())]]
    for name, got, want, tolerance in zip(names, [y, J, *grads], expected, tolerances, strict=True):
        assert_close(got, want, tolerance, name)
    if engine == "triton":
        fused = "mlp_backward" in kernels_run
        assert fused == (plan == "triton-network"), f"kernels run: {sorted(set(kernels_run))}"
    else:
        assert not kernels_run


def weights_for(model, x):
    """Loss weights, one per element of y and J, the same for every call at this seed."""
    generator = torch.Generator().manual_seed(1)
    lead = x.shape[:-1]
    wy = torch.randn(*lead, model.out_features, generator=generator, dtype=torch.float64)
    wJ = torch.randn(*lead, model.out_features, model.jacobian_inputs, generator=generator, dtype=torch.float64)
    return wy, wJ
