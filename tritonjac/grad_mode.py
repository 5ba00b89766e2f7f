"""Autograd policy shared by both engines' differentiable entries."""

from __future__ import annotations

import torch

__all__ = ["records_autograd", "refuse_double_backward"]


def records_autograd(*tensors) -> bool:
    """Whether a call on these tensors must record autograd (grad mode on and some input requires a
    gradient). Otherwise the engines run their forward alone and keep nothing for a backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def refuse_double_backward() -> None:
    """Called first in a backward: with grad mode on (create_graph=True) the gradient would itself be
    differentiated. Refuse loudly rather than return a gradient that silently carries no graph."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "tritonjac's backward is first-order: differentiating its gradients (create_graph=True, "
            "double backward) is not supported. J is already an output, and so are second derivatives "
            "(model(x, hessian=True) or laplacian=True): put the loss on them instead."
        )
