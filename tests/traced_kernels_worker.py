"""torch.compile through the `triton_op`s on a machine without a GPU (run by tests/test_compile.py).

    python tests/traced_kernels_worker.py CASE      (without TRITON_INTERPRET)

A GPU process compiles a JacobianMLP by tracing into `tritonjac::triton_mlp_jacobian` and its
backward: every kernel launch becomes a `triton_kernel_wrapper` node, and torch reads each kernel's
Triton IR to learn which tensors it writes. This worker does the same with CPU tensors: the kernels
are compiled Triton functions while tracing (the IR analysis targets sm_90 through a driver that
only names its target), then the traced graphs run with the same kernels under Triton's
interpreter. So the graphs the compiler builds (buffers, views, grids, arguments, what is cloned)
are checked for real, short of inductor's GPU code generation.

Prints one JSON line: the graphs' code, and the errors against the PyTorch engine in float64.

    python tests/traced_kernels_worker.py inductor PRECISION

goes one step further on the GPU's road: inductor compiles the training step, and the Triton
kernels it generates from tritonjac's (its own copy of their source, with the helpers and
constants they use) are compiled for sm_90 where inductor would compile them for the GPU. Running
stops there (no GPU to load them on). Prints the kernels compiled.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys

assert not os.environ.get("TRITON_INTERPRET"), "trace with compiled kernels: run without TRITON_INTERPRET"

import torch
import triton
from torch._functorch.aot_autograd import aot_module_simplified
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

import tritonjac
from tritonjac import functional
from tritonjac.triton_engine import launch


class CompileOnlyDriver:
    """Enough of a Triton driver for torch's analysis of a kernel's IR: the target to compile for."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


_interpreted: dict = {}


def run_kernels_in_the_interpreter() -> None:
    """From here on, Triton interprets: re-create triton.language's and tritonjac's jitted functions
    as interpreted ones, and point the traced graphs' kernels at them (by name)."""
    if not _interpreted:
        triton.knobs.runtime.interpret = True
        os.environ["TRITON_INTERPRET"] = "1"
        for name in ("standard", "math", "random"):
            importlib.reload(importlib.import_module(f"triton.language.{name}"))
        importlib.reload(importlib.import_module("triton.language"))
        from tritonjac.kernels import activations, backward, forward, reverse

        for module in (activations, forward, backward, reverse):
            _interpreted.update(vars(importlib.reload(module)))
    for idx, kernel in list(kernel_side_table.id_to_kernel.items()):
        if isinstance(kernel, JITFunction):
            kernel_side_table.id_to_kernel[idx] = _interpreted[kernel.fn.__name__]
        elif isinstance(getattr(kernel, "fn", None), JITFunction):  # an autotuner around one config
            kernel.fn = _interpreted[kernel.fn.fn.__name__]


graphs: list[str] = []


def interpreting_backend(gm, example_inputs):
    """aot_autograd's graphs (forward, backward), kept as text and run as they are."""

    def compiler(graph, inputs):
        graphs.append(graph.code)
        run_kernels_in_the_interpreter()
        return torch._functorch.aot_autograd.make_boxed_func(graph.forward)

    return aot_module_simplified(gm, example_inputs, fw_compiler=compiler, bw_compiler=compiler)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


CASES = {
    # name: (hidden widths, activation, matmul precision, dynamic shapes, training step, with J, outputs)
    "network": ([32, 32], "softplus", "highest", False, True, True, 3),  # whole-network forward, per-layer backward
    "network-tf32": ([32, 32], "softplus", "high", False, True, True, 3),  # whole-network forward and backward
    "layers": ([32, 48], "tanh", "highest", False, True, True, 3),  # per-layer forward and backward
    "dynamic": ([32, 32], "silu", "high", True, True, True, 3),  # symbolic point count, one graph for two sizes
    "no-grad": ([32, 32], "gelu", "high", False, False, True, 3),  # inference: the forward alone
    "y-only": ([32, 32], "softplus", "highest", False, True, False, 3),  # forward(x, jacobian=False): no tangents
    "sdf-network": ([32, 32], "softplus", "high", False, True, True, 1),  # reverse mode, whole network
    "sdf-layers": ([32, 48], "softplus", "highest", False, True, True, 1),  # reverse mode, per layer
}


def main(case: str) -> None:
    widths, act, precision, dynamic, train, with_jacobian, outputs = CASES[case]
    triton.runtime.driver.set_active(CompileOnlyDriver())
    launch.check_device = lambda x: None  # CPU tensors, though not interpreted while traced
    functional.compiler_sees_kernels = lambda engine, x: engine == "triton"  # the CUDA choice, on CPU
    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(0)
    model = tritonjac.JacobianMLP(3, widths, outputs, act, backend="triton")
    model.linear_layers[1].bias = None  # a layer without bias
    reference = copy.deepcopy(model).double()  # float64, with its own parameters
    reference.backend = "torch"

    def loss(m, x):
        if not with_jacobian:
            y = m(x, jacobian=False)
            return y.square().mean(), y
        y, J = m(x)
        return y.square().mean() + (J + torch.eye(*J.shape[-2:], dtype=x.dtype)).square().mean(), y, J

    compiled = torch.compile(lambda x: loss(model, x), backend=interpreting_backend, fullgraph=True, dynamic=dynamic)
    errors = {}
    for n in (100, 37) if dynamic else (100,):
        x = torch.randn(n, 3)
        for m in (model, reference):
            m.zero_grad()
        with torch.set_grad_enabled(train):
            got = compiled(x)
            want = loss(reference, x.double())
        for name, a, b in zip(("loss", "y", "J"), got, want):
            errors[f"{name}@{n}"] = rel_err(a, b)
        if train:
            got[0].backward()
            want[0].backward()
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                errors[f"grad {name}@{n}"] = rel_err(p.grad, q.grad)
    print(json.dumps({"graphs": graphs, "errors": errors}))


def inductor(precision: str) -> None:
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    from triton.compiler import ASTSource

    compiled = []

    def precompile(self, *args, **kwargs):  # CachingAutotuner.precompile, for sm_90, without loading
        for cfg in self.configs:
            meta = self._create_compile_meta(cfg)
            source = ASTSource(self.fn, meta["signature"], meta["constants"], meta["configs"][0])
            options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            binary = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            compiled.append({"kernel": self.fn.__name__, "wgmma": "wgmma" in binary.asm["ptx"]})

    class NoGPUToLaunchOn(Exception):
        pass

    def run(self, *args, **kwargs):
        raise NoGPUToLaunchOn(self.fn.__name__)

    CachingAutotuner.precompile = precompile
    CachingAutotuner.run = run
    # torch >= 2.14 asks Triton for a CPU backend, and for its options, before lowering kernels on
    # CPU tensors; the kernels are compiled for sm_90 instead (precompile above): answer for that
    from torch._dynamo import device_interface
    from triton.compiler import compiler as triton_compiler

    if hasattr(device_interface.CpuInterface, "raise_if_triton_unavailable"):
        device_interface.CpuInterface.raise_if_triton_unavailable = staticmethod(lambda device=None: None)
    make_backend = triton_compiler.make_backend
    triton_compiler.make_backend = lambda target: make_backend(
        GPUTarget("cuda", 90, 32) if target.backend == "cpu" else target
    )
    torch._inductor.config.compile_threads = 1  # compile here, where precompile is replaced
    torch._functorch.config.force_non_lazy_backward_lowering = True  # the backward graph too, now
    triton.runtime.driver.set_active(CompileOnlyDriver())
    launch.check_device = lambda x: None
    functional.compiler_sees_kernels = lambda engine, x: engine == "triton"
    torch.set_float32_matmul_precision(precision)
    model = tritonjac.JacobianMLP(3, [32, 32], 3, "softplus", backend="triton")

    def loss(x):
        y, J = model(x)
        return y.square().mean() + J.square().mean()

    try:
        torch.compile(loss, fullgraph=True)(torch.randn(100, 3)).backward()
        stopped = "ran"
    except Exception as err:  # expected: NoGPUToLaunchOn at the first launch, everything compiled
        stopped = f"{type(err).__name__}: {err}"[:2000]
    print(json.dumps({"compiled": compiled, "stopped": stopped}))


if __name__ == "__main__":
    if sys.argv[1] == "inductor":
        inductor(sys.argv[2])
    else:
        main(sys.argv[1])
