"""`JacobianMLP`: the user-facing module, conversion of existing models, and `tritonjac.jacobian`."""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from .activations import Activation, as_activation, supported_modules
from .encoding import PositionalEncoding
from .functional import CallPlan, apply_second_order, apply_spec, plan_call, resolve_backend, second_order_plan
from .network import SUPPORTED_DTYPES, check_backend, check_input, check_mode, check_tensors, make_spec

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
        jacobian_inputs: the inputs J differentiates: None (all), an int k (the first k) or a
            slice of contiguous indices (`slice(-3, None)`: xyz after a latent code).
        jacobian_outputs: the outputs J holds: None (all), an int m (the first m) or a slice. The
            tangents of the other outputs are never computed (an SDF with a 256-wide feature
            vector pays for one row).
        encoding: a `tritonjac.PositionalEncoding` of the differentiated inputs, which must then
            be the first k: the first layer's input is a0 = cat([encoding(x[..., :k]), x[..., k:]]).
        skips: indices of Linear layers whose input is cat([h, a0]) * skip_scale, h the previous
            layer's activated output (IDR/NeuS: skips=(4,), skip_scale=2 ** -0.5); such a layer
            has hidden_features[i - 1] + len(a0) inputs.
        skip_scale: see skips (1 by default, as in DeepSDF and Nerfies).
        skip_input_first: cat([a0, h]) instead (D-NeRF's order).
        mode: how J is computed: "forward" (k tangents carried up the layers with the values),
            "reverse" (m adjoints carried down after them, for fewer outputs than inputs: an
            SDF's gradient) or "auto" (reverse when m < k; `plan(x)` says which and why).
        backend: "auto" (the Triton kernels for CUDA tensors in float32/bfloat16/float16 and the
            networks they support, else the PyTorch engine), "torch" or "triton".
        device, dtype: of the parameters, as in `nn.Linear`.

    Shapes:
        x (..., in_features) with any leading dimensions (including none) gives y
        (..., out_features) and J (..., m, k), J[..., i, j] = d y_(o+i) / d x_(s+j) for the first
        selected output o and input s (all of them by default: J[..., i, j] = d y_i / d x_j). A
        model converted from Conv1d(kernel_size=1) layers takes x (B, C_in, N) and gives y
        (B, C_out, N) and J (B, N, m, k).

    Returns:
        `model(x)` returns (y, J), both differentiable with respect to x and every parameter
        (first order); `model(x, jacobian=False)` returns y alone. Second derivatives:
        `model(x, hessian=True)` returns (y, J, H) with H (..., m, k, k) symmetric,
        H[..., i, a, b] = d2 y_(o+i) / d x_(s+a) d x_(s+b), and `laplacian=True` appends the
        Laplacian (..., m), the trace of H (y, J, H, lap with both), carried up the layers in the
        same pass (forward mode, PyTorch engine) and differentiable to first order.

    Without skips or an encoding the layers are registered under the names they have in the
    equivalent `nn.Sequential` (Linear, activation, Linear, ...), so `state_dict()` loads into that
    Sequential and back, and `to_sequential()` returns it, sharing the parameters.

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
        jacobian_inputs: int | slice | None = None,
        jacobian_outputs: int | slice | None = None,
        encoding: PositionalEncoding | None = None,
        skips: Sequence[int] = (),
        skip_scale: float = 1.0,
        skip_input_first: bool = False,
        mode: str = "auto",
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
        num_layers = len(widths) - 1
        hidden_act, out_act = as_activation(activation), as_activation(output_activation)
        activations = [hidden_act] * (num_layers - 1) + [out_act]
        # the structure first: the layers' input widths depend on the encoding and the skips
        spec = make_spec(
            activations,
            num_layers,
            in_features,
            jacobian_inputs,
            out_features=out_features,
            jacobian_outputs=jacobian_outputs,
            encoding=encoding,
            skips=skips,
            skip_scale=skip_scale,
            skip_input_first=skip_input_first,
            mode=mode,
        )
        a0 = spec.first_input_width(in_features)
        layers = []
        for l in range(num_layers):
            d_in = a0 if l == 0 else widths[l] + (a0 if l in spec.skips else 0)
            layers.append(nn.Linear(d_in, widths[l + 1], bias=bias, device=device, dtype=dtype))
            if not activations[l].is_identity:
                layers.append(activations[l].to_module())
        named = [(str(i), m) for i, m in enumerate(layers)]
        structure = spec_args(jacobian_inputs, jacobian_outputs, skips, skip_scale, skip_input_first, mode)
        self._install(named, named, encoding, structure, backend)

    # ---- construction shared with from_module --------------------------------------------------
    def _install(
        self,
        children,
        layers,
        encoding,
        structure: dict,
        backend,
        activation=None,
        output_activation=None,
        sequential=True,
    ):
        """Register `children` (name, module) and derive the engine's description from `layers`,
        the flat (path, module) sequence of Linear/Conv1d layers and activations they hold.
        `sequential`: the children are an nn.Sequential's (its forward is the plain forward).

        With `activation`, `layers` holds Linear layers only and `activation` goes between them
        (`output_activation` after the last)."""
        linear_paths, activations, kind = [], [], None
        for index, (path, m) in enumerate(layers):
            where = f"layer {index} ({path!r}: {type(m).__name__})"
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
                linear_paths.append(path)
                activations.append(Activation("identity"))
            elif activation is not None:
                raise ValueError(
                    f"{where}: with activation= given, the layers must all be Linear (the activation goes "
                    "between them); put the activations in the list instead, or leave activation= out"
                )
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
                if not linear_paths:
                    raise ValueError(f"{where}: the stack must start with a Linear or Conv1d layer")
                if not activations[-1].is_identity:
                    raise ValueError(f"{where}: two activations in a row are not supported")
                activations[-1] = act
        if not linear_paths:
            raise ValueError("the stack has no Linear or Conv1d layer")
        if activation is not None:
            activations = [as_activation(activation)] * (len(linear_paths) - 1) + [as_activation(output_activation)]
        for name, m in children:
            self.add_module(name, m)
        if encoding is not None:
            if not isinstance(encoding, PositionalEncoding):
                raise TypeError(f"encoding must be a tritonjac.PositionalEncoding, not {type(encoding).__name__}")
            self.encoding = encoding
        else:
            self.encoding = None
        self._linear_paths = tuple(linear_paths)
        self._sequential = sequential
        self.channels_first = kind is nn.Conv1d
        first = self.linear_layers[0]
        in_channels = first.in_features if kind is nn.Linear else first.in_channels
        weights = self._weights()
        # x's width: the first layer's inputs, less the encoding's features plus the inputs it encodes
        self.in_features = in_channels
        if encoding is not None:
            k = _encoded_inputs(encoding, in_channels, structure["jacobian_inputs"])
            self.in_features = in_channels - encoding.width(k) + k
        self._spec = make_spec(
            activations,
            len(linear_paths),
            self.in_features,
            structure["jacobian_inputs"],
            out_features=weights[-1].shape[0],
            jacobian_outputs=structure["jacobian_outputs"],
            encoding=encoding,
            skips=structure["skips"],
            skip_scale=structure["skip_scale"],
            skip_input_first=structure["skip_input_first"],
            mode=structure["mode"],
        )
        if self.channels_first and not self._spec.is_plain and (self._spec.skips or encoding is not None):
            raise ValueError("skips and encodings are supported for Linear layers, not Conv1d stacks")
        self._check_widths(weights)
        self.backend = backend

    def _check_widths(self, weights):
        """The layers' widths chain, through the skips: an error naming the layers otherwise."""
        spec, paths = self._spec, self._linear_paths
        a0 = spec.first_input_width(self.in_features)
        for l in range(1, len(weights)):
            outputs, inputs = weights[l - 1].shape[0], weights[l].shape[1]
            skip = a0 if l in spec.skips else 0
            if outputs + skip != inputs:
                extra = f" (plus the skip's {a0} input features: {outputs + skip})" if skip else ""
                raise ValueError(
                    f"layer {paths[l - 1]!r} has {outputs} outputs{extra} but the next layer "
                    f"{paths[l]!r} expects {inputs} inputs"
                )

    @classmethod
    def from_module(
        cls,
        module,
        *,
        activation=None,
        output_activation=None,
        jacobian_inputs: int | slice | None = None,
        jacobian_outputs: int | slice | None = None,
        encoding: PositionalEncoding | None = None,
        skips: Sequence[int] = (),
        skip_scale: float = 1.0,
        skip_input_first: bool = False,
        mode: str = "auto",
        backend: str = "auto",
    ):
        """Convert an existing network's layers, sharing their parameters.

        Args:
            module: an `nn.Sequential` of Linear (or Conv1d with kernel_size=1) layers and
                activations (nested Sequentials are flattened), a JacobianMLP, or a list or
                `nn.ModuleList` of layers: Linear layers alone with `activation` between them (how
                IDR, NeuS and DeepSDF hold theirs), or Linear layers and activations. Layers under
                weight_norm (either API) or other parametrizations are accepted; anything else is
                refused with an error naming the layer and its index.
            activation, output_activation: for a list of Linear layers: between them and after
                the last (identity by default).
            jacobian_inputs, jacobian_outputs, encoding, skips, skip_scale, skip_input_first,
                mode, backend: as in the constructor; Linear layer i's in_features must match them.

        Returns:
            A JacobianMLP holding the very same layer modules, so it shares their Parameters:
            training either trains both, and the network's own checkpoints and optimizer keep
            working. A Sequential's children keep their names (its state_dict loads into the
            result); a list's layers are registered as `layers`. A Conv1d stack keeps its
            channels-first layout: x (B, C_in, N) gives y (B, C_out, N) and J (B, N, m, k).

        Example:
            >>> seq = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 3))
            >>> y, J = JacobianMLP.from_module(seq)(torch.randn(100, 3))
            >>> lins = [nn.Linear(39, 64), nn.Linear(64, 64), nn.Linear(64 + 39, 65)]  # a NeuS-like net's
            >>> sdf = JacobianMLP.from_module(lins, activation=nn.Softplus(beta=100),
            ...     encoding=PositionalEncoding(6), skips=(2,), skip_scale=2 ** -0.5, jacobian_outputs=1)
            >>> [t.shape for t in sdf(torch.randn(10, 3))]
            [torch.Size([10, 65]), torch.Size([10, 1, 3])]
        """
        sequential = True
        if isinstance(module, JacobianMLP):  # its layers and structure; jacobian_inputs/outputs may change
            if any(a is not None for a in (activation, output_activation, encoding)) or skips:
                raise ValueError(
                    "from_module(JacobianMLP) takes the layers and structure of the model; pass only "
                    "jacobian_inputs, jacobian_outputs, mode and backend"
                )
            spec = module._spec
            children = [(n, m) for n, m in module.named_children() if n != "encoding"]
            layers = _flatten(children)
            sequential, encoding = module._sequential, module.encoding
            skips, skip_scale, skip_input_first = spec.skips, spec.skip_scale, spec.skip_input_first
            if not sequential:
                activation, output_activation = spec.activations[0], spec.activations[-1]
                if any(a != activation for a in spec.activations[:-1]):
                    raise ValueError("from_module of a model converted from a list: use the model itself")
        elif type(module) is nn.Sequential:
            children = list(module.named_children())
            layers = _flatten(children)
        elif isinstance(module, (list, tuple, nn.ModuleList)):
            holder = module if isinstance(module, nn.ModuleList) else nn.ModuleList(module)
            children = [("layers", holder)]
            layers = _flatten([(f"layers.{i}", m) for i, m in enumerate(holder)])
            sequential = False
        else:
            raise TypeError(
                f"from_module expects an nn.Sequential, a list or nn.ModuleList of layers, or a JacobianMLP, "
                f"got {type(module).__name__}"
            )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        structure = spec_args(jacobian_inputs, jacobian_outputs, skips, skip_scale, skip_input_first, mode)
        self._install(children, layers, encoding, structure, backend, activation, output_activation, sequential)
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
    def mode(self) -> str:
        """How J is computed: "auto", "forward" or "reverse" (see the class docstring); settable."""
        return self._spec.mode

    @mode.setter
    def mode(self, value: str):
        self._spec = dataclasses.replace(self._spec, mode=check_mode(value))

    def plan(self, x: torch.Tensor, hessian: bool = False, laplacian: bool = False) -> CallPlan:
        """What a call `self(x, hessian=..., laplacian=...)` runs, and why: the engine, the mode,
        and for the Triton kernels whether the whole network runs in one launch (a `CallPlan`;
        printing it reads as a sentence)."""
        x = self._points_last(x)
        if hessian or laplacian:
            check_input(x, self._weights())
            return second_order_plan(x, self._spec, self.backend, hessian, laplacian)
        return plan_call(x, self._weights(), self._spec, self.backend)

    @property
    def jacobian_inputs(self) -> int:
        """k, the number of inputs J differentiates (from `input_start`)."""
        return self._spec.jacobian_inputs

    @property
    def jacobian_outputs(self) -> int:
        """m, the number of outputs J holds."""
        return self._spec.jacobian_outputs(self.out_features)

    @property
    def skips(self) -> tuple[int, ...]:
        return self._spec.skips

    @property
    def activations(self) -> tuple[Activation, ...]:
        """One activation per Linear layer (identity where none follows it)."""
        return self._spec.activations

    @property
    def linear_layers(self) -> list[nn.Module]:
        return [self.get_submodule(p) for p in self._linear_paths]

    @property
    def out_features(self) -> int:
        return self._weights()[-1].shape[0]

    @property
    def hidden_features(self) -> list[int]:
        return [W.shape[0] for W in self._weights()[:-1]]

    def to_sequential(self) -> nn.Sequential:
        """The equivalent `nn.Sequential`, holding the same layer modules (shared parameters)."""
        if self._spec.skips or self.encoding is not None:
            raise ValueError("a network with skips or an encoding has no nn.Sequential equivalent")
        if not self._sequential:
            raise ValueError("a model converted from a list of layers has no nn.Sequential of its own; use its layers")
        return nn.Sequential(OrderedDict(self.named_children()))

    def extra_repr(self) -> str:
        spec, extras = self._spec, []
        d_out = self.out_features
        if spec.input_start == 0:
            extras.append(f"jacobian_inputs={spec.jacobian_inputs}")
        else:
            extras.append(f"jacobian_inputs=slice({spec.input_start}, {spec.input_start + spec.jacobian_inputs})")
        rows = spec.output_rows(d_out)
        if (rows.start, rows.stop) != (0, d_out):
            extras.append(f"jacobian_outputs=slice({rows.start}, {rows.stop})")
        if spec.skips:
            extras.append(f"skips={spec.skips}, skip_scale={spec.skip_scale:g}")
        if spec.skip_input_first:
            extras.append("skip_input_first=True")
        if spec.mode != "auto":
            extras.append(f"mode={spec.mode!r}")
        return ", ".join([*extras, f"backend={self.backend!r}"])

    def _weights(self) -> list[torch.Tensor]:
        # read on every call: parametrized weights (weight_norm) are recomputed on access, and the
        # old hook-based weight_norm's from weight_g and weight_v, as its hook would
        weights = [_current_weight(m) for m in self.linear_layers]
        return [W.squeeze(-1) for W in weights] if self.channels_first else weights

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, jacobian: bool = True, hessian: bool = False, laplacian: bool = False):
        """(y, J), then H (..., m, k, k) if `hessian`, then the Laplacian (..., m) if `laplacian`;
        y alone with jacobian=False."""
        second_order = hessian or laplacian
        if second_order and not jacobian:
            raise ValueError("hessian=True and laplacian=True return J as well: they need jacobian=True")
        if not jacobian and not (isinstance(x, torch.Tensor) and self._fused_without_jacobian(x)):
            return self._plain_forward(x)
        weights = self._weights()
        biases = [m.bias for m in self.linear_layers]
        x = self._points_last(x)
        check_tensors(x, weights, biases, self._spec)
        bands = self.encoding.band_weights(x) if self.encoding is not None else None
        if second_order:
            y, *rest = apply_second_order(x, weights, biases, self._spec, self.backend, hessian, laplacian, bands)
        else:
            y, J = apply_spec(x, weights, biases, self._spec, self.backend, jacobian, bands)
            rest = [J]
        if self.channels_first:
            y = y.transpose(-1, -2).contiguous()
        return (y, *rest) if jacobian else y

    def _points_last(self, x):
        """x with its features last: a Conv1d stack's (B, C_in, N) transposed, checked."""
        if not self.channels_first:
            return x
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"a Conv1d stack takes x of shape (B, C_in, N) or (C_in, N), got {shape}")
        if x.shape[-2] != self.in_features:
            raise ValueError(
                f"x has {x.shape[-2]} channels (dimension -2) but the first Conv1d "
                f"expects {self.in_features} (x.shape = {tuple(x.shape)})"
            )
        return x.transpose(-1, -2)

    def _plain_forward(self, x):
        """y alone, in plain PyTorch: the nn.Sequential forward where there is one."""
        if self._sequential and self.encoding is None and not self._spec.skips:
            for name, m in self.named_children():  # exactly the nn.Sequential forward
                if name != "encoding":
                    x = m(x)
            return x
        spec = self._spec
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have {self.in_features} features in its last dimension, got {shape}")
        a0 = x
        if self.encoding is not None:
            k = spec.jacobian_inputs
            a0 = torch.cat([self.encoding(x[..., :k]), x[..., k:]], -1)
        h = a0
        for l, (m, act) in enumerate(zip(self.linear_layers, spec.activations)):
            if l in spec.skips:
                h = torch.cat([a0, h] if spec.skip_input_first else [h, a0], -1) * spec.skip_scale
            h = act.value(m(h))
        return h

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


def spec_args(jacobian_inputs, jacobian_outputs, skips, skip_scale, skip_input_first, mode) -> dict:
    """The structure arguments the constructor and from_module share, for `make_spec`."""
    return dict(
        jacobian_inputs=jacobian_inputs,
        jacobian_outputs=jacobian_outputs,
        skips=tuple(skips),
        skip_scale=skip_scale,
        skip_input_first=skip_input_first,
        mode=mode,
    )


def _encoded_inputs(encoding: PositionalEncoding, first_layer_inputs: int, jacobian_inputs) -> int:
    """k, the encoded inputs, for a converted network: from jacobian_inputs (an int or slice(0, k)),
    or, when it is None, the k whose encoding fills the first layer's inputs."""
    if isinstance(jacobian_inputs, int) and not isinstance(jacobian_inputs, bool):
        return jacobian_inputs
    if isinstance(jacobian_inputs, slice) and jacobian_inputs.start in (0, None) and jacobian_inputs.stop:
        if jacobian_inputs.stop > 0:
            return jacobian_inputs.stop
    per_input = encoding.width(1)
    if jacobian_inputs is None and first_layer_inputs % per_input == 0:
        return first_layer_inputs // per_input
    raise ValueError(
        f"cannot tell how many inputs the encoding encodes for a first layer of {first_layer_inputs} inputs: "
        "pass jacobian_inputs=k (the encoded inputs come first)"
    )


def _flatten(named) -> list:
    """(path, module) of the layers, nested nn.Sequentials flattened."""
    flat = []
    for name, m in named:
        if type(m) is nn.Sequential:
            flat += _flatten([(f"{name}.{n}", c) for n, c in m.named_children()])
        else:
            flat.append((name, m))
    return flat


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


def jacobian(
    module: nn.Module,
    x: torch.Tensor,
    *,
    jacobian_inputs: int | None = None,
    hessian: bool = False,
    laplacian: bool = False,
):
    """(y, J) of a supported `nn.Sequential` (or a JacobianMLP) at x, converting it once and caching.

    Args:
        module: what `JacobianMLP.from_module` accepts without structure arguments (a Sequential, a
            list of layers and activations, a JacobianMLP); the conversion is cached per module
            (not for a Python list) and renewed when a layer is replaced. Networks with skips or
            encodings: convert them once with `JacobianMLP.from_module`.
        x: (..., in_features) points.
        jacobian_inputs: k, as in `JacobianMLP`.
        hessian, laplacian: also return H, then the Laplacian, as `JacobianMLP.forward` does.

    Returns:
        y (..., out_features) and J (..., out_features, k) (then H and the Laplacian if asked),
        differentiable as the module's forward.

    Example:
        >>> seq = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 1))
        >>> d, grad = jacobian(seq, torch.randn(100, 3))  # grad: (100, 1, 3)
    """
    orders = {"hessian": hessian, "laplacian": laplacian}
    if isinstance(module, JacobianMLP) and jacobian_inputs in (None, module.jacobian_inputs):
        return module(x, **orders)
    if isinstance(module, (list, tuple)):  # not weak-referenceable: converted at each call
        return JacobianMLP.from_module(module, jacobian_inputs=jacobian_inputs)(x, **orders)
    per_module = _converted.setdefault(module, {})
    layers = tuple(module.children())
    entry = per_module.get(jacobian_inputs)
    if entry is None or entry[0] != tuple(map(id, layers)):
        entry = (tuple(map(id, layers)), JacobianMLP.from_module(module, jacobian_inputs=jacobian_inputs))
        per_module[jacobian_inputs] = entry
    return entry[1](x, **orders)
