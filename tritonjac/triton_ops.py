"""Launchers for the Triton kernels: plans, shapes, strides, grids and configurations.

`mlp_forward` picks one of two plans:
- "network": one launch of `_mlp_forward_kernel` for the whole MLP, when the hidden layers share
  one width whose stacked tile fits the registers (see `network_fits`), in/out features are at most
  16 and every layer but the last has the same activation;
- "layers": one launch of `_layer_forward_kernel` per layer otherwise (wide layers such as IDR's
  512, mixed widths or activations, single-layer nets), with [h; T] between layers in global memory
  in the compute dtype.

Precision of float32 inputs follows torch's float32 matmul setting (`precision.py`): "highest" runs the
matmuls as 3xTF32 (fp32-accurate), "high" and "medium" as TF32. bfloat16 and float16 inputs use
half operands with fp32 accumulation; activations, tangent scaling and reductions are fp32.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import triton

from . import tuning
from .activations import ACTIVATION_NAMES
from .functional import TRITON_DTYPES
from .precision import float32_matmul_precision
from .reference import MLPSpec
from .tuning import interpreting

__all__ = ["mlp_forward", "mlp_backward", "plan_for", "ACTIVATION_IDS", "TRITON_DTYPES", "matmul_precision", "Plan"]

# The kernels' activation ids (kernels/activations.py) follow ACTIVATION_NAMES (tested).
ACTIVATION_IDS = {name: i for i, name in enumerate(ACTIVATION_NAMES)}
MAX_NETWORK_FEATURES = 16  # in_features and out_features of the whole-network kernel
MAX_NETWORK_WIDTH = 128


@functools.lru_cache(maxsize=None)
def _kernels():
    """The jitted kernels and their autotuned wrappers, built on first use (Triton imports lazily)."""
    from .kernels import forward

    network_tuned = tuning.autotune(
        tuning.network_configs(),
        key=["IN", "K", "WIDTH_PAD", "OUT", "SLOTS", "ACT", "LAST_ACT", "HAS_BIAS", "JACOBIAN", "PRECISION",
             "num_hidden", "points_bucket"],
        prune=tuning.prune_network_configs,
    )(forward._mlp_forward_kernel)
    layer_tuned = tuning.autotune(
        tuning.layer_configs(),
        key=["K", "FIRST", "SLOTS", "ACT", "HAS_BIAS", "JACOBIAN", "PRECISION", "d_in", "d_out", "points_bucket"],
        prune=tuning.prune_layer_configs,
    )(forward._layer_forward_kernel)
    return {
        "mlp_forward": (forward._mlp_forward_kernel, network_tuned),
        "layer_forward": (forward._layer_forward_kernel, layer_tuned),
    }


# Under the interpreter: one fixed configuration per kernel, small enough that the tests' shapes
# exercise partial blocks in every dimension.
INTERPRETER_CONFIGS = {
    "mlp_forward": triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1),
    "layer_forward": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1),
}


def matmul_precision(dtype: torch.dtype) -> str:
    """The `tl.dot` input precision for this input dtype under the current float32 matmul setting."""
    if dtype != torch.float32:
        return "ieee"  # half operands: the setting only concerns fp32 operands
    return "tf32x3" if float32_matmul_precision() == "highest" else "tf32"


def _slots(k: int, jacobian: bool) -> int:
    return triton.next_power_of_2(1 + k) if jacobian else 1


def _pad_width(width: int) -> int:
    return max(16, triton.next_power_of_2(width))


def _activation_constexprs(act, prefix: str) -> dict:
    return {
        prefix: ACTIVATION_IDS[act.name],
        f"{prefix}_PARAM": float(act.param),
        f"{prefix}_THRESHOLD": float(act.threshold),
    }


# ---- plans -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    kind: str  # "network" or "layers"
    reason: str  # why "layers" was chosen, for users asking `plan_for`


def network_fits(width: int, slots: int, precision: str, arch: int) -> bool:
    """Whether some whole-network configuration fits the registers at this width and slot count."""
    named = {"SLOTS": slots, "WIDTH_PAD": _pad_width(width), "PRECISION": precision}
    return bool(tuning.prune_network_configs(tuning.network_configs(), named, arch=arch))


def plan_for(weights, spec: MLPSpec, jacobian: bool = True, precision: str = "tf32", arch: int = 90) -> Plan:
    """Whole network in one launch, or one launch per layer (see the module docstring)."""
    L = len(weights)
    d_in, d_out = weights[0].shape[1], weights[-1].shape[0]
    hidden = {w.shape[0] for w in weights[:-1]}
    if L < 2:
        return Plan("layers", "a single layer")
    if len(hidden) > 1:
        return Plan("layers", f"hidden widths differ ({sorted(hidden)})")
    (width,) = hidden
    if width > MAX_NETWORK_WIDTH:
        return Plan("layers", f"hidden width {width} > {MAX_NETWORK_WIDTH}")
    if d_in > MAX_NETWORK_FEATURES or d_out > MAX_NETWORK_FEATURES:
        return Plan("layers", f"in/out features {d_in}/{d_out} > {MAX_NETWORK_FEATURES}")
    if len(set(spec.activations[:-1])) > 1:
        return Plan("layers", "hidden activations differ")
    if not network_fits(width, _slots(spec.jacobian_inputs, jacobian), precision, arch):
        return Plan("layers", f"width {width} with {spec.jacobian_inputs} tangents in {precision} does not fit the registers")
    return Plan("network", "")


# ---- launching -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    """The GPU's name, which keys the config tables ("cpu" for the interpreter and CPU tracing)."""
    return torch.cuda.get_device_name(index) if torch.cuda.is_available() else "cpu"


_CANDIDATES = {
    "mlp_forward": (tuning.network_configs, tuning.prune_network_configs),
    "layer_forward": (tuning.layer_configs, tuning.prune_layer_configs),
}


def traced(x: torch.Tensor) -> bool:
    """Whether x is being traced by torch.compile (a fake or functional tensor) rather than computed.
    Launches then go through `torch.library.wrap_triton`, so that the compiler sees the kernels, with
    a configuration chosen without running anything."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(x, (FakeTensor, FunctionalTensor))


def _interpret_bf16(dtype: torch.dtype) -> bool:
    """The kernels' interpreter-only bf16 workaround (kernels/forward.py `_dot`). Every launch passes
    it, and every other defaulted argument: torch.compile's analysis of which tensors a kernel
    writes needs them all, and without it takes every tensor argument as written."""
    return interpreting() and dtype == torch.bfloat16


def _launchable(kernel, is_traced: bool):
    """The kernel as launched: through `wrap_triton` while traced (eagerly its HOP dispatch costs ~1 ms)."""
    return torch.library.wrap_triton(kernel) if is_traced else kernel


def _launch(name: str, grid, args: dict, key: str, device: torch.device, is_traced: bool = False) -> None:
    """Run kernel `name` with the interpreter's, the shipped, the tuned, a fixed or the autotuned
    configuration. Traced (torch.compile) launches never autotune: they take the shipped table's
    entry, else what autotuning chose for this key in this process, else the first fitting candidate."""
    raw, tuned = _kernels()[name]
    gpu = _device_name(device.index or 0)
    if interpreting():
        config = INTERPRETER_CONFIGS[name]
        # recorded as the choice, so a dry run of the GPU check writes a table of the GPU's shape
        tuning.record_tuned(name, key, gpu, config)
    else:
        config = tuning.shipped_config(name, key, gpu)
        if config is None and is_traced:
            config = tuning.tuned_config(name, key, gpu)
        if config is None and (is_traced or not tuning.autotuning_enabled()):
            candidates, prune = _CANDIDATES[name]
            config = prune(candidates(), args)[0]
    if config is None:
        try:
            tuned[grid](**args)
            tuning.record_tuned(name, key, gpu, tuned.best_config)
            return
        except (OSError, ValueError) as err:  # e.g. Triton's on-disk autotune cache unreadable or unwritable
            warnings.warn(f"tritonjac: autotuning {name} failed ({type(err).__name__}: {err}); "
                          "using a fixed configuration", RuntimeWarning, stacklevel=3)  # fmt: skip
            candidates, prune = _CANDIDATES[name]
            config = prune(candidates(), args)[0]
    kernel = _launchable(raw, is_traced)
    kernel[grid(config.kwargs)](**args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _key(dtype: torch.dtype, constexprs: dict, **runtime) -> str:
    parts = [f"dtype={str(dtype).removeprefix('torch.')}"]
    parts += [f"{k}={v}" for k, v in sorted(constexprs.items())]
    parts += [f"{k}={v}" for k, v in sorted(runtime.items())]
    return ",".join(parts)


def network_constexprs(weights, biases, spec: MLPSpec, jacobian: bool, precision: str) -> dict:
    width = weights[0].shape[0]
    return {
        "IN": weights[0].shape[1],
        "K": spec.jacobian_inputs,
        "WIDTH": width,
        "OUT": weights[-1].shape[0],
        **_activation_constexprs(spec.activations[0], "ACT"),
        **_activation_constexprs(spec.activations[-1], "LAST_ACT"),
        "HAS_BIAS": any(b is not None for b in biases),
        "JACOBIAN": jacobian,
        "PRECISION": precision,
        "SLOTS": _slots(spec.jacobian_inputs, jacobian),
        "WIDTH_PAD": _pad_width(width),
    }


def layer_constexprs(act, k: int, first: bool, has_bias: bool, jacobian: bool, precision: str) -> dict:
    return {
        "K": k,
        "FIRST": first,
        **_activation_constexprs(act, "ACT"),
        "HAS_BIAS": has_bias,
        "JACOBIAN": jacobian,
        "PRECISION": precision,
        "SLOTS": _slots(k, jacobian),
    }


def _rename_last(constexprs: dict) -> dict:
    """The kernel names the last layer's activation LAST_ACT / LAST_PARAM / LAST_THRESHOLD."""
    out = dict(constexprs)
    out["LAST_PARAM"] = out.pop("LAST_ACT_PARAM")
    out["LAST_THRESHOLD"] = out.pop("LAST_ACT_THRESHOLD")
    return out


def _network_parameters(weights, biases) -> dict:
    """The whole-network kernels' parameter arguments: contiguous, hidden layers stacked, zero biases."""
    width = weights[0].shape[0]
    W0 = weights[0]

    def bias_or_zeros(b, n):
        return b.contiguous() if b is not None else W0.new_zeros(n)

    hidden_w = weights[1:-1]
    return dict(
        w_first_ptr=W0.contiguous(),
        b_first_ptr=bias_or_zeros(biases[0], width),
        w_hidden_ptr=torch.stack(hidden_w).contiguous() if hidden_w else W0.new_empty(1, width, width),
        b_hidden_ptr=torch.stack([bias_or_zeros(b, width) for b in biases[1:-1]]) if hidden_w else W0.new_empty(1, width),
        w_last_ptr=weights[-1].contiguous(),
        b_last_ptr=bias_or_zeros(biases[-1], weights[-1].shape[0]),
    )


def _run_network(x, weights, biases, spec, y, J, jacobian, precision):
    P = x.shape[0]
    constexprs = _rename_last(network_constexprs(weights, biases, spec, jacobian, precision))
    J_arg = J if J is not None else y  # not written without tangents
    args = dict(
        x_ptr=x,
        **_network_parameters(weights, biases),
        y_ptr=y,
        j_ptr=J_arg,
        num_points=P,
        num_hidden=len(weights) - 2,
        points_bucket=tuning.points_bucket(P),
        stride_xp=x.stride(0),
        stride_xf=x.stride(1),
        stride_yp=y.stride(0),
        stride_yf=y.stride(1),
        stride_jp=J_arg.stride(0),
        stride_jo=J_arg.stride(1),
        stride_jk=J_arg.stride(2) if J is not None else 0,
        **constexprs,
        INTERPRET_BF16=_interpret_bf16(x.dtype),
    )
    key = _key(x.dtype, constexprs, depth=args["num_hidden"], bucket=args["points_bucket"])
    _launch("mlp_forward", lambda meta: (triton.cdiv(P, meta["BLOCK_M"]),), args, key, x.device, traced(x))


def _run_layers(x, weights, biases, spec, y, J, jacobian, precision):
    P = x.shape[0]
    k, L = spec.jacobian_inputs, len(weights)
    rows = 1 + k if jacobian else 1
    a = x
    a_strides = (x.stride(0), 0, x.stride(1))
    for l, (W, b, act) in enumerate(zip(weights, biases, spec.activations)):
        d_out, d_in = W.shape
        if l == L - 1:
            h, t = y, (J if jacobian else y)
            h_strides = (y.stride(0), y.stride(1))
            t_strides = (J.stride(0), J.stride(2), J.stride(1)) if jacobian else (0, 0, 0)
        else:  # [h; T] as (P, 1+k, d_out) in the compute dtype
            buf = new_buffer(x, P, rows, d_out)
            h, t = buf, buf[:, 1:] if jacobian else buf
            h_strides = (buf.stride(0), buf.stride(2))
            t_strides = (buf.stride(0), buf.stride(1), buf.stride(2))
        constexprs = layer_constexprs(act, k, l == 0, b is not None, jacobian, precision)
        args = _layer_args(a, a_strides, W, b, P, (h, *h_strides), (t, *t_strides)) | constexprs
        args |= {"STORE_Z": False, "INTERPRET_BF16": _interpret_bf16(x.dtype)}
        key = _key(x.dtype, constexprs, d_in=d_in, d_out=d_out, bucket=args["points_bucket"])
        grid = lambda meta, d_out=d_out: (triton.cdiv(P, meta["BLOCK_M"]), triton.cdiv(d_out, meta["BLOCK_N"]))  # noqa: E731
        _launch("layer_forward", grid, args, key, x.device, traced(x))
        if l < L - 1:
            a, a_strides = buf, (buf.stride(0), buf.stride(1), buf.stride(2))


def _layer_args(a, a_strides, W, b, num_points: int, h_out, t_out, z_out=None) -> dict:
    """`_layer_forward_kernel`'s runtime arguments. h_out = (tensor, point stride, feature stride),
    t_out = (tensor, point, tangent and feature strides), z_out = (tensor, point and slot strides)."""
    d_out, d_in = W.shape
    h, t = h_out[0], t_out[0]
    z = z_out if z_out is not None else (h, 0, 0)
    return dict(
        # the kernel reads the bias with unit stride (a column of a matrix is not): copy it then
        a_ptr=a, w_ptr=W, b_ptr=b.contiguous() if b is not None else W, h_ptr=h, t_ptr=t, z_ptr=z[0],
        num_points=num_points, d_in=d_in, d_out=d_out, points_bucket=tuning.points_bucket(num_points),
        stride_ap=a_strides[0], stride_as=a_strides[1], stride_af=a_strides[2],
        stride_wn=W.stride(0), stride_wk=W.stride(1), stride_hp=h_out[1], stride_hf=h_out[2],
        stride_tp=t_out[1], stride_ts=t_out[2], stride_tf=t_out[3], stride_zp=z[1], stride_zs=z[2],
    )  # fmt: skip


def new_buffer(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """Every tensor the kernels write (the tests replace this to poison them with NaN)."""
    return like.new_empty(shape)


def check_device(x: torch.Tensor) -> None:
    """The Triton backend needs CUDA tensors, or CPU tensors under the interpreter."""
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors (x is on {x.device}); on CPU it runs only under the "
        "Triton interpreter (TRITON_INTERPRET=1 set before triton is imported). Use backend='auto' or 'torch'."
    )


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in TRITON_DTYPES:
        raise TypeError(
            f"the Triton backend computes in float32, bfloat16 or float16, not {dtype}; "
            "use backend='torch' for float64"
        )


def planned_kind(x2d, weights, spec: MLPSpec, jacobian: bool) -> str:
    """"network" or "layers": the plan `mlp_forward` takes for these inputs."""
    arch = tuning.current_arch() if x2d.device.type == "cuda" else 90
    return plan_for(weights, spec, jacobian, matmul_precision(x2d.dtype), arch).kind


def mlp_forward(x2d, weights, biases, spec: MLPSpec, *, jacobian: bool = True):
    """y (P, d_L) and J (P, d_L, k) (None without `jacobian`) from the fused kernels; no autograd."""
    check_device(x2d)
    check_dtype(x2d.dtype)
    P = x2d.shape[0]
    d_out, k = weights[-1].shape[0], spec.jacobian_inputs
    y = new_buffer(x2d, P, d_out)
    J = new_buffer(x2d, P, d_out, k) if jacobian else None
    if P == 0:
        return y, J
    precision = matmul_precision(x2d.dtype)
    with torch.cuda.device(x2d.device) if x2d.device.type == "cuda" else _null():
        if planned_kind(x2d, weights, spec, jacobian) == "network":
            _run_network(x2d, weights, biases, spec, y, J, jacobian, precision)
        else:
            _run_layers(x2d, weights, biases, spec, y, J, jacobian, precision)
    return y, J


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- backward ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    """Streaming multiprocessors (1 without CUDA: tracing on CPU, tests/traced_kernels_worker.py)."""
    return torch.cuda.get_device_properties(index).multi_processor_count if torch.cuda.is_available() else 1


def mlp_backward(x2d, weights, biases, spec: MLPSpec, gy, gJ, need_x: bool):
    """dLoss/dx (or None) and the gradients of every weight and bias (fp32 sums, cast to the
    parameters' dtype) from the fused backward of the whole-network plan. gy or gJ may be None."""
    from .kernels import backward

    check_device(x2d)
    P, d_in = x2d.shape
    L, width, d_out = len(weights), weights[0].shape[0], weights[-1].shape[0]
    num_hidden = L - 2
    has_gj = gJ is not None
    precision = matmul_precision(x2d.dtype)
    constexprs = _rename_last(network_constexprs(weights, biases, spec, has_gj, precision))
    arch = tuning.current_arch() if x2d.device.type == "cuda" else 90
    config = backward_config(constexprs["SLOTS"], constexprs["WIDTH_PAD"], precision, arch)
    if config is None:
        raise ValueError("no fused-backward configuration fits these shapes (see fused_backward_available)")
    block_m = config.kwargs["BLOCK_M"]
    num_blocks = triton.cdiv(P, block_m)
    if interpreting():
        num_programs = min(num_blocks, 3)  # a few, so that programs loop over several blocks
    else:
        num_programs = min(num_blocks, 2 * _sm_count(x2d.device.index or 0))
    num_programs = max(num_programs, 1)
    f32 = dict(device=x2d.device, dtype=torch.float32)
    slabs = dict(
        gw_first_ptr=torch.zeros(num_programs, width, d_in, **f32),
        gb_first_ptr=torch.zeros(num_programs, width, **f32),
        gw_hidden_ptr=torch.zeros(num_programs, max(num_hidden, 1), width, width, **f32),
        gb_hidden_ptr=torch.zeros(num_programs, max(num_hidden, 1), width, **f32),
        gw_last_ptr=torch.zeros(num_programs, d_out, width, **f32),
        gb_last_ptr=torch.zeros(num_programs, d_out, **f32),
    )
    rows = block_m * constexprs["SLOTS"]
    workspace = torch.empty(num_programs, num_hidden + 1, rows, constexprs["WIDTH_PAD"], **f32)
    gx = new_buffer(x2d, P, d_in) if need_x else None
    gx_arg = gx if gx is not None else x2d
    gy_arg = gy if gy is not None else x2d
    gj_arg = gJ if gJ is not None else x2d.view(P, 1, d_in)
    args = dict(
        x_ptr=x2d, **_network_parameters(weights, biases), gy_ptr=gy_arg, gj_ptr=gj_arg, gx_ptr=gx_arg,
        **slabs, ws_ptr=workspace, num_points=P, num_hidden=num_hidden, num_programs=num_programs,
        stride_xp=x2d.stride(0), stride_xf=x2d.stride(1), stride_gyp=gy_arg.stride(0), stride_gyf=gy_arg.stride(1),
        stride_gjp=gj_arg.stride(0), stride_gjo=gj_arg.stride(1), stride_gjk=gj_arg.stride(2),
        stride_gxp=gx_arg.stride(0), stride_gxf=gx_arg.stride(1),
        **{k: v for k, v in constexprs.items() if k != "JACOBIAN"},
        HAS_GY=gy is not None, HAS_GJ=has_gj, NEED_X=need_x, BLOCK_M=block_m,
    )  # fmt: skip
    args["INTERPRET_BF16"] = _interpret_bf16(x2d.dtype)
    if P > 0:
        with torch.cuda.device(x2d.device) if x2d.device.type == "cuda" else _null():
            kernel = _launchable(backward._mlp_backward_kernel, traced(x2d))
            kernel[(num_programs,)](**args, num_warps=config.num_warps, num_stages=config.num_stages)
    sums = {name: t.sum(0) for name, t in slabs.items()}  # one fixed-order sum: deterministic
    grad_W = [sums["gw_first_ptr"], *sums["gw_hidden_ptr"][:num_hidden], sums["gw_last_ptr"]]
    grad_b = [sums["gb_first_ptr"], *sums["gb_hidden_ptr"][:num_hidden], sums["gb_last_ptr"]]
    grad_W = [g.to(W.dtype) for g, W in zip(grad_W, weights)]
    grad_b = [None if b is None else g.to(b.dtype) for g, b in zip(grad_b, biases)]
    return gx, grad_W, grad_b


def backward_config(slots: int, width_pad: int, precision: str, arch: int) -> triton.Config | None:
    """The fused backward's configuration (the largest block that fits), or None if none fits.
    The interpreter takes the fused path exactly where an sm_90 GPU would, with its own block."""
    named = {"SLOTS": slots, "WIDTH_PAD": width_pad, "PRECISION": precision}
    configs = tuning.backward_configs(named, arch)
    if configs and interpreting():
        return triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)
    return configs[0] if configs else None


def fused_backward_available(x2d, weights, spec: MLPSpec, jacobian: bool) -> bool:
    """Whether a forward with these inputs can be differentiated by the fused backward kernel."""
    if planned_kind(x2d, weights, spec, jacobian) != "network":
        return False
    arch = tuning.current_arch() if x2d.device.type == "cuda" else 90
    slots = _slots(spec.jacobian_inputs, jacobian)
    return backward_config(slots, _pad_width(weights[0].shape[0]), matmul_precision(x2d.dtype), arch) is not None


# The per-layer backward recomputes chunks of points, keeping every layer's [h; T] and [z; U] for
# the chunk. Each chunk costs about three launches per layer, so chunks are as large as memory
# allows: at most this many bytes of saved state, and at most an eighth of the GPU's free memory
# (2^20 points of 3 -> 4x64 -> 3 with 3 tangents in fp32 save 10.8 GB: 6 chunks).
LAYERS_BACKWARD_CHUNK_BYTES = 2 << 30
LAYERS_BACKWARD_MIN_CHUNK_BYTES = 64 << 20


def layers_backward_chunk(num_points: int, bytes_per_point: int, free_bytes: int | None = None) -> int:
    """Points per chunk of the per-layer backward: equal chunks within the memory budget above."""
    budget = LAYERS_BACKWARD_CHUNK_BYTES
    if free_bytes is not None:
        budget = min(budget, max(free_bytes // 8, LAYERS_BACKWARD_MIN_CHUNK_BYTES))
    chunks = max(1, triton.cdiv(num_points * bytes_per_point, budget))
    return max(1, triton.cdiv(num_points, chunks))


def _layer_backward_configs(arch: int = 90, precision: str = "tf32", slots: int = 4, weight_grad_slots: int = 4):
    """(propagation, weight-gradient) configurations of the per-layer backward: fixed choices that
    compile without spills (tests/test_aot.py); 3xTF32 on sm_80 needs smaller tiles. Dots need at
    least 16 rows (64 for a wgmma on sm_90): BLOCK_M * slots and BLOCK_P * weight_grad_slots."""
    propagation, weight_grad = _layer_backward_tiles(arch, precision)
    min_rows = tuning.WGMMA_ROWS if arch >= 90 and not interpreting() else 16
    kw_p = dict(propagation.kwargs)
    kw_p["BLOCK_M"] = max(kw_p["BLOCK_M"], min_rows // slots)
    kw_w = dict(weight_grad.kwargs)
    kw_w["BLOCK_P"] = max(kw_w["BLOCK_P"], 16 // weight_grad_slots)
    return (triton.Config(kw_p, num_warps=propagation.num_warps, num_stages=propagation.num_stages),
            triton.Config(kw_w, num_warps=weight_grad.num_warps, num_stages=weight_grad.num_stages))  # fmt: skip


def _recompute_config(slots: int, arch: int) -> triton.Config:
    """The per-layer backward's forward recompute: the first forward candidate that fits."""
    if interpreting():
        return INTERPRETER_CONFIGS["layer_forward"]
    return tuning.prune_layer_configs(tuning.layer_configs(), {"SLOTS": slots}, arch=arch)[0]


def _layer_backward_tiles(arch: int, precision: str):
    if interpreting():  # small, so the tests' shapes leave partial blocks in every dimension
        return (triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1),
                triton.Config({"BLOCK_P": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1))  # fmt: skip
    if arch < 90 and precision == "tf32x3":
        return (triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2),
                triton.Config({"BLOCK_P": 8, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2))  # fmt: skip
    return (triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_P": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=2))  # fmt: skip


def layers_backward(x2d, weights, biases, spec: MLPSpec, gy, gJ, need_x: bool):
    """The per-layer plan's backward (any widths, depths, activations): recompute a chunk's forward
    layer by layer keeping [h; T] and [z; U], then two kernels per layer (see kernels/backward.py).
    Returns dLoss/dx (or None) and every weight and bias gradient in the parameters' dtypes."""
    from .kernels import backward, forward

    check_device(x2d)
    P = x2d.shape[0]
    L, k = len(weights), spec.jacobian_inputs
    jacobian = gJ is not None
    rows, slots = (1 + k, _slots(k, True)) if jacobian else (1, 1)
    precision = matmul_precision(x2d.dtype)
    f32 = dict(device=x2d.device, dtype=torch.float32)
    grad_W = [torch.zeros(W.shape, **f32) for W in weights]
    grad_b = [None if b is None else torch.zeros(b.shape, **f32) for b in biases]
    gx = new_buffer(x2d, *x2d.shape) if need_x else None
    arch = tuning.current_arch() if x2d.device.type == "cuda" else 90
    fwd_cfg = _recompute_config(slots, arch)
    interp = {"INTERPRET_BF16": _interpret_bf16(x2d.dtype)}
    per_point = rows * sum(W.shape[0] for W in weights) * (x2d.element_size() + 4) + 2 * rows * max(W.shape[1] for W in weights) * 4
    free = torch.cuda.mem_get_info(x2d.device)[0] if x2d.device.type == "cuda" else None
    chunk = layers_backward_chunk(P, per_point, free)

    is_traced = traced(x2d)

    def launch(kernel, grid, config, **args):
        kernel = _launchable(kernel, is_traced)
        kernel[grid](**args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages, **interp)

    with torch.cuda.device(x2d.device) if x2d.device.type == "cuda" else _null():
        for start in range(0, P, chunk):
            xc = x2d[start : start + chunk]
            C = xc.shape[0]
            # forward again, keeping A_l = [h; T] (compute dtype) and Z_l = [z; U] (fp32)
            As, Zs = [], []
            a, a_strides = xc, (xc.stride(0), 0, xc.stride(1))
            for l, (W, b, act) in enumerate(zip(weights, biases, spec.activations)):
                d_out, d_in = W.shape
                A = x2d.new_empty(C, rows, d_out)
                Z = torch.empty(C, rows, d_out, **f32)
                args = _layer_args(a, a_strides, W, b, C, (A, A.stride(0), A.stride(2)),
                                   (A[:, 1:] if jacobian else A, A.stride(0), A.stride(1), A.stride(2)),
                                   (Z, Z.stride(0), Z.stride(1)))  # fmt: skip
                args |= layer_constexprs(act, k, l == 0, b is not None, jacobian, precision)
                grid = (triton.cdiv(C, fwd_cfg.kwargs["BLOCK_M"]), triton.cdiv(d_out, fwd_cfg.kwargs["BLOCK_N"]))
                launch(forward._layer_forward_kernel, grid, fwd_cfg, **args, STORE_Z=True)
                As.append(A)
                Zs.append(Z)
                a, a_strides = A, (A.stride(0), A.stride(1), A.stride(2))

            # dLoss/d[z; U] of the last layer, from dLoss/d[y; J]
            G = torch.zeros(C, rows, weights[-1].shape[0], **f32)
            if gy is not None:
                G[:, 0] = gy[start : start + chunk]
            if jacobian:
                G[:, 1:] = gJ[start : start + chunk].transpose(1, 2)
            G = _activation_backward_torch(spec.activations[-1], G, Zs[-1], jacobian)

            for l in range(L - 1, -1, -1):
                W = weights[l]
                d_out, d_in = W.shape
                # weight and bias gradients: G_Z^T A_{l-1}, split over the points, summed in order
                if l > 0:
                    A_prev, rows_a, a_st = As[l - 1], rows, (As[l - 1].stride(0), As[l - 1].stride(1), As[l - 1].stride(2))
                else:  # A_0 = [x; E]: the x row here, the identity rows below
                    A_prev, rows_a, a_st = xc, 1, (xc.stride(0), 0, xc.stride(1))
                slots_a = slots if rows_a > 1 else 1
                bwd_cfg, wgrad_cfg = _layer_backward_configs(arch, precision, slots, slots_a)
                block_p = wgrad_cfg.kwargs["BLOCK_P"]
                splits = max(1, min(64, triton.cdiv(C, 8 * block_p)))
                per_split = triton.cdiv(triton.cdiv(C, splits), block_p) * block_p
                splits = triton.cdiv(C, per_split)
                gw_part = torch.empty(splits, d_out, d_in, **f32)
                gb_part = torch.empty(splits, d_out, **f32)
                grid = (triton.cdiv(d_out, wgrad_cfg.kwargs["BLOCK_N"]), triton.cdiv(d_in, wgrad_cfg.kwargs["BLOCK_K"]), splits)
                launch(backward._layer_weight_grad_kernel, grid, wgrad_cfg,
                       gz_ptr=G, a_ptr=A_prev, gw_ptr=gw_part, gb_ptr=gb_part, num_points=C, d_in=d_in, d_out=d_out,
                       points_per_split=per_split, stride_gp=G.stride(0), stride_gs=G.stride(1),
                       stride_ap=a_st[0], stride_as=a_st[1], stride_af=a_st[2], ROWS_A=rows_a,
                       HAS_BIAS=biases[l] is not None, PRECISION=precision, SLOTS=slots_a)  # fmt: skip
                grad_W[l] += gw_part.sum(0)
                if biases[l] is not None:
                    grad_b[l] += gb_part.sum(0)
                if l == 0 and jacobian:
                    grad_W[0][:, :k] += G[:, 1:].sum(0).t()
                # propagate: G_Z of the previous layer, or dLoss/dx after the first
                if l == 0 and not need_x:
                    break
                out = gx[start : start + chunk] if l == 0 else torch.empty(C, rows, d_in, **f32)
                prev_act = spec.activations[l - 1] if l > 0 else spec.activations[0]
                z_prev = Zs[l - 1] if l > 0 else G
                grid = (triton.cdiv(C, bwd_cfg.kwargs["BLOCK_M"]), triton.cdiv(d_in, bwd_cfg.kwargs["BLOCK_K"]))
                launch(backward._layer_backward_kernel, grid, bwd_cfg,
                       gz_ptr=G, w_ptr=W, z_prev_ptr=z_prev, out_ptr=out, num_points=C, d_in=d_in, d_out=d_out,
                       stride_gp=G.stride(0), stride_gs=G.stride(1), stride_wn=W.stride(0), stride_wk=W.stride(1),
                       stride_zp=z_prev.stride(0), stride_zs=z_prev.stride(1), stride_op=out.stride(0),
                       stride_os=out.stride(1) if l > 0 else 0, stride_of=out.stride(-1), ROWS=rows, LAST_STEP=l == 0,
                       **_activation_constexprs(prev_act, "ACT"), PRECISION=precision, SLOTS=slots)  # fmt: skip
                G = out
    grad_W = [g.to(W.dtype) for g, W in zip(grad_W, weights)]
    grad_b = [None if g is None else g.to(b.dtype) for g, b in zip(grad_b, biases)]
    return gx, grad_W, grad_b


def _activation_backward_torch(act, G, Z, jacobian: bool):
    """dLoss/d[z; U] from dLoss/d[s(z); s'(z) U] for the last layer (usually the identity), in PyTorch."""
    if act.is_identity:
        return G
    _, slope, second = act.evaluate(Z[:, 0], value=False, curvature=jacobian)
    g_z = slope * G[:, 0]
    if jacobian and second is not None:
        g_z += second * (G[:, 1:] * Z[:, 1:]).sum(1)
    G[:, 1:] *= slope[:, None]
    G[:, 0] = g_z
    return G


# The torch.compile operators over these launchers (library.py): defined here, on the import every
# Triton path makes, so that they exist before the compiler traces a call.
from .library import triton_library_ops  # noqa: E402

triton_library_ops()
