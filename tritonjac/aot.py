"""Ahead-of-time compilation of the kernels for real GPUs, without one (docs/design.md, section 6).

`compile_config` compiles one kernel for one configuration and target and reads what the compiler
made of it: registers, spilled bytes (cuobjdump's STACK), local memory, shared memory and whether
the matmuls became tensor-core instructions (`wgmma` on sm_90, `mma` on sm_80).

    python -m tritonjac.aot [--arch 80 90] [--jobs 2]

compiles every shipped configuration (`shipped_cases`) and prints one line per case. It must run
without TRITON_INTERPRET (the interpreter replaces the jitted functions the compiler needs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Case", "CompileReport", "compile_config", "shipped_cases", "main"]

# Largest dynamic shared memory one block may use (CUDA occupancy tables: 163 KB on sm_80, 227 KB on sm_90).
SHARED_LIMIT = {80: 166_912, 90: 232_448}


@dataclass(frozen=True)
class Case:
    """One kernel specialisation: its constexprs, launch configuration, data dtype and target."""

    kernel: str
    constexprs: tuple  # sorted (name, value) pairs
    config: tuple  # sorted (name, value) pairs of the block sizes
    num_warps: int
    num_stages: int
    dtype: str  # "fp32", "bf16" or "fp16"
    arch: int

    @property
    def label(self) -> str:
        c = dict(self.constexprs)
        if self.kernel == "layer_forward":
            parts = "h" * c["HAS_HIDDEN"] + ("+x" if c["HAS_INPUT"] else "") + ("+enc" if c["ENCODED"] else "")
            shape = f"in={parts}" + (" +Z" if c.get("STORE_Z") else "") + (" seeded" if c.get("SEEDED") else "")
            shape += " laplacian" if c.get("LAPLACIAN") else ""
            shape += " hessian" if c.get("HESSIAN") else ""
        elif self.kernel.startswith("layer_"):
            shape = f"rows={c.get('LIVE_SLOTS', c.get('LIVE_SLOTS_A'))}" + (" last" if c.get("LAST_STEP") else "")
            shape += " adjoints" if c.get("ADJOINTS") else ""
            shape += " laplacian" if c.get("LAPLACIAN") else ""
            shape += " hessian" if c.get("HESSIAN") else ""
        elif self.kernel == "mlp_reverse":
            shape = f"W{c['WIDTH']} adjoints={c['ADJOINTS']}"
        else:
            shape = f"W{c.get('WIDTH', '-')}" + ("+enc+skip" if c.get("ENCODED") else "")
            shape += f" seeded={c['NUM_TANGENTS']}" if c.get("SEEDED") else ""
        cfg = dict(self.config)
        blocks = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_P", "BLOCK_N", "BLOCK_K") if k in cfg)
        tangents = int(c.get("JACOBIAN", c.get("HAS_GJ", c.get("SLOTS", 1) > 1)))
        return (
            f"sm_{self.arch} {self.kernel} {shape} K={c.get('NUM_TANGENTS', '-')} act={c.get('ACT', '-')} "
            f"{self.dtype}/{c['PRECISION']} jac={tangents} blocks={blocks} w{self.num_warps} s{self.num_stages}"
        )


@dataclass(frozen=True)
class CompileReport:
    label: str
    registers: int
    spill_bytes: int  # per thread
    local_bytes: int
    shared_bytes: int
    matrix_instruction: str  # "wgmma", "mma" or "none"
    seconds: float
    tf32_roundings: int = 0  # cvt.rna.tf32.f32 in the PTX: TF32 operands rounded to nearest
    error: str = ""
    shared_limit: int = 0

    @property
    def problems(self) -> list[str]:
        """Why this compilation is unacceptable (empty when it is fine)."""
        if self.error:
            return [self.error]
        out = []
        if self.spill_bytes or self.local_bytes:
            out.append(f"spills {self.spill_bytes} B/thread, local memory {self.local_bytes} B")
        if self.shared_bytes > self.shared_limit:
            out.append(f"shared memory {self.shared_bytes} B > {self.shared_limit} B")
        return out


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_config(case: Case) -> CompileReport:
    """Compile one case and read its resource usage from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    from .triton_engine.registry import KERNELS

    info = KERNELS[case.kernel]
    fn = info.jit_function()
    # the kernel's defaulted constexprs, as a launch without them would take them
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    constexprs = defaults | dict(case.constexprs) | dict(case.config) | {"INTERPRET_BF16": False}
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    pointers = info.pointers
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in info.int32_pointers:
            signature[name] = "*i32"
        elif name in pointers:
            signature[name] = "*fp32" if name in info.fp32_pointers else f"*{case.dtype}"
        else:
            signature[name] = "i32"
    # pointers from torch's allocator are 16-byte aligned, as the JIT would find at launch
    attrs = {(fn.arg_names.index(p),): [["tt.divisibility", 16]] for p in pointers}
    start = time.perf_counter()
    try:
        src = ASTSource(fn, signature, constexprs, attrs)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", case.arch, 32),
            options={"num_warps": case.num_warps, "num_stages": case.num_stages},
        )
    except Exception as err:  # report, do not hide: the caller fails the case
        error = f"{type(err).__name__}: {err}"[:2000]
        seconds = time.perf_counter() - start
        return CompileReport(case.label, 0, 0, 0, 0, "none", seconds, error=error, shared_limit=SHARED_LIMIT[case.arch])
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout

    def field(name):
        m = re.search(rf"\b{name}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    ptx = compiled.asm["ptx"]
    instr = "wgmma" if "wgmma" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "none"
    return CompileReport(
        case.label,
        registers=field("REG"),
        spill_bytes=field("STACK"),
        local_bytes=field("LOCAL"),
        shared_bytes=max(field("SHARED"), int(compiled.metadata.shared)),
        matrix_instruction=instr,
        seconds=round(seconds, 1),
        tf32_roundings=ptx.count("cvt.rna.tf32.f32"),
        shared_limit=SHARED_LIMIT[case.arch],
    )


def _case(kernel, constexprs: dict, config, dtype: str, arch: int) -> Case:
    return Case(
        kernel,
        tuple(sorted(constexprs.items())),
        tuple(sorted(config.kwargs.items())),
        config.num_warps,
        config.num_stages,
        dtype,
        arch,
    )


def shipped_cases(archs=(80, 90)) -> list[Case]:
    """Every configuration tritonjac ships, at the shapes its shipped tables and candidates serve.

    The whole-network kernel at widths 64 and 128 (3 -> W -> 3, softplus, K = 3), with and without
    tangents, TF32 / 3xTF32 / bf16, and its fused backward (with and without a loss on J) wherever
    that plan is taken; the per-layer kernel (first and later layers, with and without
    tangents) in the same precisions: each candidate configuration the pruning keeps for the arch;
    the Laplacian's and the Hessian's rows: forward, recompute and propagation (`layer_backward`).
    """
    import torch

    from .activations import as_activation
    from .network import NetworkSpec
    from .triton_engine import forward, launch, plans, tuning
    from .triton_engine.reverse import reverse_constexprs

    cases = []
    softplus = as_activation(torch.nn.Softplus(beta=100.0))
    sine = as_activation("sine")
    for arch in archs:
        for width in (64, 128):
            W = [torch.empty(width, 3), torch.empty(width, width), torch.empty(3, width)]
            spec = NetworkSpec((softplus, softplus, as_activation(None)), 3)
            for dtype, precision in (("fp32", "tf32"), ("fp32", "tf32x3"), ("bf16", "ieee")):
                for jacobian in (True, False):
                    cx = forward.network_constexprs(W, [None] * 3, spec, jacobian, precision)
                    cx["HAS_BIAS"] = True
                    named = dict(cx)
                    for config in tuning.prune_network_configs(tuning.network_configs(), named, arch=arch):
                        cases.append(_case("mlp_forward", cx, config, dtype, arch))
                    if jacobian:  # a real network: Nerfies' warp (PE(8), an 8-d code, one skip, J of 3 of 6)
                        real = cx | {"IN": 8, "OUT": 6, "PLAIN_INPUT": False, "ENCODED": True, "HAS_SKIP": True}
                        real |= {"OUT_START": 3, "OUT_STOP": 6, "BLOCK_E": 32, "LIVE_SLOTS": 4}
                        for config in tuning.prune_network_configs(tuning.network_configs(), real, arch=arch):
                            cases.append(_case("mlp_forward", real, config, dtype, arch))
                    if jacobian:  # reverse mode (an SDF's one output, and two of three outputs)
                        for m in (1, 2):
                            rx = reverse_constexprs(W[:-1] + [torch.empty(m, width)], spec, precision, m)
                            config = tuning.reverse_config(rx["ADJ_SLOTS"], rx["WIDTH_PAD"], precision, arch)
                            if config is not None:
                                cases.append(_case("mlp_reverse", rx | {"HAS_BIAS": True}, config, dtype, arch))
                            # its backward: m tangents seeded with dLoss/dJ's rows
                            sx = {k: v for k, v in cx.items() if k != "JACOBIAN"} | {"OUT": m, "NUM_TANGENTS": m}
                            sx |= {"SLOTS": plans.slots(m, True), "HAS_GY": True, "HAS_GJ": True, "NEED_X": True}
                            sx |= {"SEEDED": True, "SEED_INPUTS": 3}
                            for config in tuning.backward_configs(sx, arch):
                                cases.append(_case("mlp_backward", sx, config, dtype, arch))
                    if not plans.network_fits(width, cx["SLOTS"], precision, arch):
                        continue  # this plan runs per layer, forward and backward
                    bx = {k: v for k, v in cx.items() if k != "JACOBIAN"}
                    bx |= {"HAS_GY": True, "HAS_GJ": jacobian, "NEED_X": True}
                    for config in tuning.backward_configs(named, arch):
                        cases.append(_case("mlp_backward", bx, config, dtype, arch))
        # (previous layer's output, x, encoded x) parts: hidden, first, skip, encoded first, encoded skip
        layer_parts = (
            (False, True, False),
            (True, False, False),
            (True, True, False),
            (False, True, True),
            (True, True, True),
        )
        # with tangents, and without: the forward without J (hidden layers), reverse mode's way up (all)
        for (hidden, has_input, encoded), jacobian in [(p, j) for p in layer_parts for j in (True, False)]:
            first = not hidden
            for dtype, precision in (("fp32", "tf32"), ("fp32", "tf32x3"), ("bf16", "ieee")):
                cx = forward.layer_constexprs(softplus, 3, hidden, has_input, encoded, True, jacobian, precision)
                if encoded:
                    cx["BLOCK_E"] = 16
                if jacobian or (hidden and not has_input):
                    for config in tuning.prune_layer_configs(tuning.layer_configs(), dict(cx), arch=arch):
                        cases.append(_case("layer_forward", cx, config, dtype, arch))
                # the Laplacian row or the Hessian's rows after the tangents, and their backward's recompute
                for second in ("laplacian", "hessian") if jacobian else ():
                    lx = cx | plans.second_order_constexprs(second, 3)
                    for config in tuning.prune_layer_configs(tuning.layer_configs(), dict(lx), arch=arch):
                        cases.append(_case("layer_forward", lx, config, dtype, arch))
                    lz = lx | {"STORE_Z": True}
                    cases.append(_case("layer_forward", lz, tuning.recompute_config(lx, arch), dtype, arch))
                # the per-layer backward's recompute (storing Z), also reverse mode's way up
                recompute = tuning.recompute_config(cx, arch)
                cases.append(_case("layer_forward", cx | {"STORE_Z": True}, recompute, dtype, arch))
                if jacobian and has_input:  # the recompute with a0's tangent seeded by dLoss/dJ (m = 1 < k)
                    sx = forward.layer_constexprs(softplus, 1, hidden, has_input, encoded, True, True, precision)
                    sx |= {"STORE_Z": True, "SEEDED": True, "SEED_INPUTS": 3} | ({"BLOCK_E": 16} if encoded else {})
                    cases.append(_case("layer_forward", sx, tuning.recompute_config(sx, arch), dtype, arch))
                if first or has_input:
                    continue
                if not jacobian:  # reverse mode's way down: an SDF's adjoint row, and J from the first layer
                    adjoint_config, _ = tuning.layer_backward_configs(arch, precision, 1)
                    for last_step in (False, True):
                        ax = {
                            "LIVE_SLOTS": 1,
                            "LAST_STEP": last_step,
                            **launch.activation_constexprs(softplus, "ACT"),
                            "PRECISION": precision,
                            "SLOTS": 1,
                            "ADJOINTS": True,
                        }
                        cases.append(_case("layer_backward", ax, adjoint_config, dtype, arch))
                # the backward's two kernels: J's 3 columns as tangents, one seeded tangent, or none;
                # and the 3 tangents with the Laplacian row (softplus, and SIREN's sine)
                rows_and_activations = [(1 + t, "", softplus) for t in ((3, 1) if jacobian else (0,))]
                for second in ("laplacian", "hessian") if jacobian else ():
                    rows = 1 + 3 + plans.second_order_rows(second, 3)
                    rows_and_activations += [(rows, second, act) for act in (softplus, sine)]
                for rows, second, act in rows_and_activations:
                    tangents = rows - 1
                    slots = plans.slots(tangents, tangents > 0)
                    backward_config, _ = tuning.layer_backward_configs(arch, precision, slots)
                    for last_step in (False, True):
                        bx = {
                            "LIVE_SLOTS": rows,
                            "LAST_STEP": last_step,
                            **launch.activation_constexprs(act, "ACT"),
                            "PRECISION": precision,
                            "SLOTS": slots,
                            "ADJOINTS": False,
                        }
                        bx |= {second.upper(): True, "NUM_TANGENTS": 3} if second else {}
                        cases.append(_case("layer_backward", bx, backward_config, dtype, arch))
                    for rows_a in (rows, 1) if tangents else (1,):
                        slots_a = slots if rows_a > 1 else 1
                        wx = {"LIVE_SLOTS_A": rows_a, "HAS_BIAS": True, "PRECISION": precision, "SLOTS": slots_a}
                        _, weight_grad_config = tuning.layer_backward_configs(arch, precision, slots, slots_a)
                        cases.append(_case("layer_weight_grad", wx, weight_grad_config, dtype, arch))
    return list(dict.fromkeys(cases))  # each case once (the no-tangent weight gradient recurs)


def _compile_case(case: Case) -> CompileReport:
    return compile_config(case)


def format_report(r: CompileReport) -> str:
    return (
        f"{'BAD' if r.problems else 'ok '} {r.label:<80} regs={r.registers:>3} spill={r.spill_bytes:>5} "
        f"local={r.local_bytes} smem={r.shared_bytes:>6} {r.matrix_instruction:<5} {r.seconds:>5.1f}s"
        + (f"  {'; '.join(r.problems)[:300]}" if r.problems else "")
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonjac.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the reports to this file")
    parser.add_argument("--match", default="", help="only cases whose label contains this text")
    args = parser.parse_args(argv)
    cases = [c for c in shipped_cases(tuple(args.arch)) if args.match in c.label]
    with ProcessPoolExecutor(args.jobs) as pool:
        reports = list(pool.map(_compile_case, cases))
    bad = 0
    for r in reports:
        bad += bool(r.problems)
        print(format_report(r))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in reports], indent=1))
    print(f"{len(reports) - bad}/{len(reports)} cases compile without spills", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
