"""Launch plumbing shared by the forward and backward launchers.

- `allocate`: every tensor a kernel writes comes from here, outputs and workspaces (tests and the
  GPU check install `guards.GuardedAllocator`, which fences each in poisoned guard rows).
- `run_kernel`: the one place kernels are launched; `launch_autotuned` resolves the configuration
  of the autotuned forward kernels first (interpreter, shipped table, tuned, fixed, or autotune).
- `add_launch_observer`: callbacks told about every launch (the GPU check counts compiles).
- `use_autotuner`: replaces how autotuned kernels are wrapped (the GPU check's precompiler).
- checks that name the problem before a kernel could crash on bad input.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable

import torch
import triton

from ..network import TRITON_DTYPES
from . import registry, tuning
from .tuning import interpreting

__all__ = [
    "allocate",
    "set_allocator",
    "use_allocator",
    "run_kernel",
    "launch_autotuned",
    "add_launch_observer",
    "use_autotuner",
    "reset_autotuners",
    "triton_autotuner",
    "traced",
    "check_device",
    "check_dtype",
    "device_guard",
    "device_name",
    "sm_count",
    "tuning_key",
    "activation_constexprs",
]


# ---- buffers ---------------------------------------------------------------------------------------
def _empty(what: str, like: torch.Tensor, shape: tuple, dtype: torch.dtype, zeroed: bool) -> torch.Tensor:
    return like.new_zeros(shape, dtype=dtype) if zeroed else like.new_empty(shape, dtype=dtype)


_allocator: Callable[..., torch.Tensor] = _empty


def allocate(what: str, like: torch.Tensor, *shape: int, dtype: torch.dtype | None = None, zeroed: bool = False):
    """A tensor on `like`'s device (of `like`'s dtype unless `dtype`) that a kernel writes: outputs
    and workspaces alike. `zeroed`: partial sums the kernel adds into (start at zero; need not be
    written everywhere); otherwise the kernels must write every element. `what` names it in reports."""
    return _allocator(what, like, tuple(shape), dtype or like.dtype, zeroed)


def set_allocator(allocator: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Make `allocate` call allocator(what, like, shape, dtype, zeroed) (e.g. `guards.GuardedAllocator`);
    returns the previous one."""
    global _allocator
    previous, _allocator = _allocator, allocator
    return previous


@contextlib.contextmanager
def use_allocator(allocator: Callable[..., torch.Tensor]):
    """`set_allocator` inside the block."""
    previous = set_allocator(allocator)
    try:
        yield
    finally:
        set_allocator(previous)


# ---- checks ----------------------------------------------------------------------------------------
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
            f"the Triton backend computes in float32, bfloat16 or float16, not {dtype}; use backend='torch' for float64"
        )


# ---- devices ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def device_name(index: int) -> str:
    """The GPU's name, which keys the config tables ("cpu" for the interpreter and CPU tracing)."""
    return torch.cuda.get_device_name(index) if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors (1 without CUDA: tracing on CPU, tests/traced_kernels_worker.py)."""
    return torch.cuda.get_device_properties(index).multi_processor_count if torch.cuda.is_available() else 1


def device_arch(x: torch.Tensor) -> int:
    """The compute capability the kernels are planned for (90 under the interpreter)."""
    return tuning.current_arch() if x.device.type == "cuda" else 90


def device_guard(x: torch.Tensor):
    """Launch on x's GPU, whatever the current device is."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def traced(x: torch.Tensor) -> bool:
    """Whether x is being traced by torch.compile (a fake or functional tensor) rather than computed.
    Launches then go through `torch.library.wrap_triton`, so that the compiler sees the kernels, with
    a configuration chosen without running anything."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(x, (FakeTensor, FunctionalTensor))


# ---- arguments -------------------------------------------------------------------------------------
def activation_constexprs(act, prefix: str) -> dict:
    """ACT / ACT_PARAM / ACT_THRESHOLD (with prefix "ACT") for one activation."""
    return {
        prefix: act.kind.kernel_id,
        f"{prefix}_PARAM": float(act.param),
        f"{prefix}_THRESHOLD": float(act.threshold),
    }


def interpret_bf16(dtype: torch.dtype) -> dict:
    """The kernels' interpreter-only bf16 workaround (kernels/forward.py `dot_f32`). Every launch
    passes it, and every other defaulted argument: torch.compile's analysis of which tensors a kernel
    writes needs them all, and without it takes every tensor argument as written."""
    return {"INTERPRET_BF16": interpreting() and dtype == torch.bfloat16}


def tuning_key(dtype: torch.dtype, constexprs: dict, **runtime) -> str:
    """The key of a launch in the shipped and tuned tables."""
    parts = [f"dtype={str(dtype).removeprefix('torch.')}"]
    parts += [f"{k}={v}" for k, v in sorted(constexprs.items())]
    parts += [f"{k}={v}" for k, v in sorted(runtime.items())]
    return ",".join(parts)


# ---- launching -------------------------------------------------------------------------------------
_observers: list[Callable] = []


def add_launch_observer(observer: Callable) -> Callable[[], None]:
    """Call observer(kernel_name, args, config) before every launch with a configuration, and with
    config None first for a launch a GPU resolves by autotuning (it compiles every one of
    `registry.candidates(kernel_name, args)`), even under the interpreter, which does not tune.
    Returns a function that removes the observer."""
    _observers.append(observer)
    return lambda: _observers.remove(observer)


def run_kernel(name: str, grid, config: triton.Config, args: dict, is_traced: bool = False) -> None:
    """Launch kernel `name` with a fixed configuration: through `wrap_triton` while traced (eagerly
    its dispatch costs about 1 ms), directly otherwise."""
    for observe in _observers:
        observe(name, args, config)
    kernel = registry.KERNELS[name].jit_function()
    if is_traced:
        kernel = torch.library.wrap_triton(kernel)
    if callable(grid):
        grid = grid(config.kwargs)
    kernel[grid](**args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def triton_autotuner(name: str, kernel):
    """`triton.autotune` over the registry's candidates and key for kernel `name`."""
    info = registry.KERNELS[name]
    return tuning.autotune(info.configs(), key=list(info.autotune_key), prune=info.prune)(kernel)


_autotuner_factory: Callable = triton_autotuner


@functools.lru_cache(maxsize=None)
def _autotuned(name: str, factory: Callable):
    return factory(name, registry.KERNELS[name].jit_function())


def reset_autotuners() -> None:
    """Forget the wrapped autotuned kernels (and what they chose), e.g. after changing candidates."""
    _autotuned.cache_clear()


@contextlib.contextmanager
def use_autotuner(factory: Callable):
    """Wrap autotuned kernels with factory(name, jit_function) inside the block. The wrapper is
    launched as `wrapper[grid](**args)` and reports its choice as `wrapper.best_config`."""
    global _autotuner_factory
    previous, _autotuner_factory = _autotuner_factory, factory
    try:
        yield
    finally:
        _autotuner_factory = previous


def launch_autotuned(name: str, grid, args: dict, key: str, device: torch.device, is_traced: bool = False) -> None:
    """Run an autotuned kernel with the interpreter's, the shipped, the tuned, a fixed or the
    autotuned configuration. Traced (torch.compile) launches never autotune: they take the shipped
    table's entry, else what autotuning chose for this key in this process, else the first fitting
    candidate."""
    gpu = device_name(device.index or 0)
    shipped, autotuning = tuning.shipped_config(name, key, gpu), tuning.autotuning_enabled()
    if autotuning and shipped is None:
        for observe in _observers:  # a GPU autotunes this launch (the interpreter takes a fixed choice)
            observe(name, args, None)
    if interpreting():
        config = tuning.INTERPRETER_CONFIGS[name]
        # recorded as the choice, so a dry run of the GPU check writes a table of the GPU's shape
        tuning.record_tuned(name, key, gpu, config)
    else:
        config = shipped
        if config is None and is_traced:
            config = tuning.tuned_config(name, key, gpu)
        if config is None and (is_traced or not autotuning):
            config = registry.candidates(name, args)[0]
    if config is None:
        tuned = _autotuned(name, _autotuner_factory)
        try:
            tuned[grid](**args)
            tuning.record_tuned(name, key, gpu, tuned.best_config)
            return
        except (OSError, ValueError) as err:  # e.g. Triton's on-disk autotune cache unreadable or unwritable
            warnings.warn(
                f"tritonjac: autotuning {name} failed ({type(err).__name__}: {err}); using a fixed configuration",
                RuntimeWarning,
                stacklevel=3,
            )
            config = registry.candidates(name, args)[0]
    run_kernel(name, grid, config, args, is_traced)
