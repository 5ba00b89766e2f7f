"""`JacobianMLP`: the user-facing module, conversion of existing models, and `tritonjac.jacobian`."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from .activations import Activation, as_activation, supported_modules
from .functional import apply_spec, resolve_backend
from .network import SUPPORTED_DTYPES, check_backend, check_tensors, make_spec

__all__ = ["JacobianMLP", "jacobian"]


class JacobianMLP(nn.Module):
    """A point-wise MLP that returns its outputs and their Jacobians with respect to its inputs.

    Args:
        in_features, out_features: feature counts of x and y.
        hidden_features: one width per hidden layer (may differ; may be empty).
        activation: between layers: a name ("softplus", "relu", "leaky_relu", "tanh", "sigmoid",
            "silu", "gelu", "gelu_tanh", "sine", "identity"), a torch activation module
            (`nn.Softplus(beta=100)`, ...), `tritonjac.Sine(w0)` or None.
        output_activation: after the last layer (identity by default).
        bias: whether the Linear layers have biases.
        jacobian_inputs: k, J differentiates y with respect to x[..., :k] (all inputs by default).
        backend: "auto" (the Triton kernels for CUDA tensors in float32/bfloat16/float16, else the
            PyTorch engine), "torch" or "triton".
        device, dtype: of the parameters, as in `nn.Linear`.

    Shapes:
        x (..., in_features) with any leading dimensions (including none) gives y
        (..., out_features) and J (..., out_features, k), J[..., i, j] = d y_i / d x_j. A model
        converted from Conv1d(kernel_size=1) layers takes x (B, C_in, N) and gives y (B, C_out, N)
        and J (B, N, C_out, k).

    Returns:
        `model(x)` returns (y, J), both differentiable with respect to x and every parameter
        (first order); `model(x, jacobian=False)` returns y alone.

    The layers are registered under the names they have in the equivalent `nn.Sequential`
    (Linear, activation, Linear, ...), so `state_dict()` loads into that Sequential and back, and
    `to_sequential()` returns it, sharing the parameters.

    Example:
        >>> model = JacobianMLP(3, [64, 64], 3, nn.Softplus(beta=100))
        >>> y, J = model(torch.randn(8, 1024, 3))
        >>> y.shape, J.shape
        (torch.Size([8, 1024, 3]), torch.Size([8, 1024, 3, 3]))
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Sequence[int],
        out_features: int,
        activation="softplus",
        *,
        output_activation=None,
        bias: bool = True,
        jacobian_inputs: int | None = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        widths = [in_features, *hidden_features, out_features]
        for w in widths:
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ValueError(
                    f"feature counts must be positive ints, got in={in_features!r}, "
                    f"hidden={list(hidden_features)!r}, out={out_features!r}"
                )
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype {dtype} is not supported; use float32, float64, bfloat16 or float16")
        hidden_act, out_act = as_activation(activation), as_activation(output_activation)
        layers = []
        for l in range(len(widths) - 1):
            layers.append(nn.Linear(widths[l], widths[l + 1], bias=bias, device=device, dtype=dtype))
            act = hidden_act if l < len(widths) - 2 else out_act
            if not act.is_identity:
                layers.append(act.to_module())
        self._install([(str(i), m) for i, m in enumerate(layers)], jacobian_inputs, backend)

    # ---- construction shared with from_module --------------------------------------------------
    def _install(self, named_layers, jacobian_inputs, backend):
        """Register the layers under their names and derive the engine's description of them."""
        linear_names, activations, kind = [], [], None
        for index, (name, m) in enumerate(named_layers):
            where = f"layer {index} ({name!r}: {type(m).__name__})"
            if m._forward_hooks or any(not _is_weight_norm_hook(h) for h in m._forward_pre_hooks.values()):
                raise ValueError(
                    f"{where} has forward hooks, which the Jacobian engine would bypass (only the old "
                    "torch.nn.utils.weight_norm's is understood); remove them or use "
                    "torch.nn.utils.parametrizations"
                )
            layer_type = _layer_type(m)
            if layer_type in (nn.Linear, nn.Conv1d):
                if layer_type is nn.Conv1d:
                    _check_pointwise_conv(m, where)
                if kind is not None and layer_type is not kind:
                    raise ValueError(f"{where}: a stack mixes Linear and Conv1d layers; use one kind")
                kind = layer_type
                linear_names.append(name)
                activations.append(Activation("identity"))
            elif type(m) is nn.Identity:
                pass
            else:
                try:
                    act = as_activation(m)
                except ValueError:
                    raise ValueError(
                        f"{where} is not supported: expected nn.Linear, nn.Conv1d(kernel_size=1) or a "
                        f"supported activation ({supported_modules()})"
                    ) from None
                if not linear_names:
                    raise ValueError(f"{where}: the stack must start with a Linear or Conv1d layer")
                if not activations[-1].is_identity:
                    raise ValueError(f"{where}: two activations in a row are not supported")
                activations[-1] = act
            self.add_module(name, m)
        if not linear_names:
            raise ValueError("the stack has no Linear or Conv1d layer")
        self._linear_names = tuple(linear_names)
        self.channels_first = kind is nn.Conv1d
        shapes = [W.shape for W in self._weights()]  # (out, in) per Linear/Conv1d layer
        for l in range(1, len(shapes)):
            if shapes[l - 1][0] != shapes[l][1]:
                raise ValueError(
                    f"layer {linear_names[l - 1]!r} has {shapes[l - 1][0]} outputs but the next "
                    f"layer {linear_names[l]!r} expects {shapes[l][1]} inputs"
                )
        first = self._modules[linear_names[0]]
        self.in_features = first.in_features if kind is nn.Linear else first.in_channels
        self._spec = make_spec(activations, len(linear_names), self.in_features, jacobian_inputs)
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.Module, *, jacobian_inputs: int | None = None, backend: str = "auto"):
        """Convert an `nn.Sequential` of Linear (or Conv1d with kernel_size=1) layers and activations.

        Args:
            module: the Sequential (or a JacobianMLP). Layers under weight_norm (either API) or other
                parametrizations are accepted; anything else is refused with an error naming the
                layer and its index.
            jacobian_inputs: k, as in the constructor.
            backend: as in the constructor.

        Returns:
            A JacobianMLP holding the very same layer modules, so it shares their Parameters:
            training either trains both. A Conv1d stack keeps its channels-first layout: x
            (B, C_in, N) gives y (B, C_out, N) and J (B, N, C_out, k).

        Example:
            >>> seq = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 3))
            >>> y, J = JacobianMLP.from_module(seq)(torch.randn(100, 3))
        """
        if isinstance(module, JacobianMLP) or type(module) is nn.Sequential:
            named = list(module.named_children())
        else:
            raise TypeError(
                f"from_module expects an nn.Sequential of Linear/Conv1d(kernel_size=1) layers and "
                f"activations, got {type(module).__name__}"
            )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._install(named, jacobian_inputs, backend)
        return self

    # ---- properties ------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """'auto' (Triton for CUDA tensors once available, else PyTorch), 'torch' or 'triton'."""
        return self._backend

    @backend.setter
    def backend(self, value: str):
        self._backend = check_backend(value)

    @property
    def jacobian_inputs(self) -> int:
        return self._spec.jacobian_inputs

    @property
    def activations(self) -> tuple[Activation, ...]:
        """One activation per Linear layer (identity where none follows it)."""
        return self._spec.activations

    @property
    def linear_layers(self) -> list[nn.Module]:
        return [self._modules[n] for n in self._linear_names]

    @property
    def out_features(self) -> int:
        return self._weights()[-1].shape[0]

    @property
    def hidden_features(self) -> list[int]:
        return [W.shape[0] for W in self._weights()[:-1]]

    def to_sequential(self) -> nn.Sequential:
        """The equivalent `nn.Sequential`, holding the same layer modules (shared parameters)."""
        return nn.Sequential(OrderedDict(self.named_children()))

    def extra_repr(self) -> str:
        return f"jacobian_inputs={self.jacobian_inputs}, backend={self.backend!r}"

    def _weights(self) -> list[torch.Tensor]:
        # read on every call: parametrized weights (weight_norm) are recomputed on access, and the
        # old hook-based weight_norm's from weight_g and weight_v, as its hook would
        weights = [_current_weight(m) for m in self.linear_layers]
        return [W.squeeze(-1) for W in weights] if self.channels_first else weights

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, jacobian: bool = True):
        if not jacobian and not (isinstance(x, torch.Tensor) and self._fused_without_jacobian(x)):
            for m in self.children():  # exactly the nn.Sequential forward
                x = m(x)
            return x
        weights = self._weights()
        biases = [m.bias for m in self.linear_layers]
        if self.channels_first:
            if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"a Conv1d stack takes x of shape (B, C_in, N) or (C_in, N), got {shape}")
            if x.shape[-2] != self.in_features:
                raise ValueError(
                    f"x has {x.shape[-2]} channels (dimension -2) but the first Conv1d "
                    f"expects {self.in_features} (x.shape = {tuple(x.shape)})"
                )
            x = x.transpose(-1, -2)
        check_tensors(x, weights, biases)
        y, J = apply_spec(x, weights, biases, self._spec, self.backend, jacobian)
        if self.channels_first:
            y = y.transpose(-1, -2).contiguous()
        return (y, J) if jacobian else y

    def _fused_without_jacobian(self, x: torch.Tensor) -> bool:
        """Whether forward(x, jacobian=False) runs the Triton kernels' forward-only variant."""
        if self.backend == "torch":
            return False
        if self.backend == "triton":
            return True  # resolve_backend names the problem if x does not suit the kernels
        try:
            return resolve_backend(self.backend, x) == "triton"
        except TypeError:
            return False


def _layer_type(m: nn.Module) -> type:
    """m's class, or for a module with torch.nn.utils.parametrize parametrizations (weight_norm,
    spectral_norm, ...; its class is then a generated subclass) the class it was made from."""
    if nn.utils.parametrize.is_parametrized(m):
        return type(m).__bases__[0]
    return type(m)


def _is_weight_norm_hook(hook) -> bool:
    """The forward pre-hook of the old torch.nn.utils.weight_norm, on the weight."""
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(hook, WeightNorm) and hook.name == "weight"


def _current_weight(m: nn.Module) -> torch.Tensor:
    """m's weight as its forward would use it (computed from weight_g, weight_v under the old weight_norm)."""
    for hook in m._forward_pre_hooks.values():
        if _is_weight_norm_hook(hook):
            return hook.compute_weight(m)
    return m.weight


def _check_pointwise_conv(m: nn.Conv1d, where: str):
    problems = []
    if m.kernel_size != (1,):
        problems.append(f"kernel_size={m.kernel_size[0]}")
    if m.stride != (1,):
        problems.append(f"stride={m.stride[0]}")
    if m.padding not in ((0,), "valid", "same"):  # with kernel_size 1 all three pad nothing
        problems.append(f"padding={m.padding}")
    if m.dilation != (1,):
        problems.append(f"dilation={m.dilation[0]}")
    if m.groups != 1:
        problems.append(f"groups={m.groups}")
    if problems:
        raise ValueError(
            f"{where} is not point-wise ({', '.join(problems)}); only Conv1d with "
            "kernel_size=1, stride=1, padding=0, dilation=1, groups=1 is supported"
        )


# Conversions made by `jacobian`, per module; an entry is reused while the module's layers are the
# same objects (replacing a layer invalidates it).
_converted: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def jacobian(module: nn.Module, x: torch.Tensor, *, jacobian_inputs: int | None = None):
    """(y, J) of a supported `nn.Sequential` (or a JacobianMLP) at x, converting it once and caching.

    Args:
        module: what `JacobianMLP.from_module` accepts; the conversion is cached per module and
            renewed when a layer is replaced.
        x: (..., in_features) points.
        jacobian_inputs: k, as in `JacobianMLP`.

    Returns:
        y (..., out_features) and J (..., out_features, k), differentiable as the module's forward.

    Example:
        >>> seq = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 1))
        >>> d, grad = jacobian(seq, torch.randn(100, 3))  # grad: (100, 1, 3)
    """
    if isinstance(module, JacobianMLP) and jacobian_inputs in (None, module.jacobian_inputs):
        return module(x)
    per_module = _converted.setdefault(module, {})
    layers = tuple(module.children())
    entry = per_module.get(jacobian_inputs)
    if entry is None or entry[0] != tuple(map(id, layers)):
        entry = (tuple(map(id, layers)), JacobianMLP.from_module(module, jacobian_inputs=jacobian_inputs))
        per_module[jacobian_inputs] = entry
    return entry[1](x)
