"""The precision policy: which matmul precision a call gets, from its dtype and torch's setting.

| input | matmuls (`tl.dot` input precision) | everything else |
|---|---|---|
| float32, torch's float32 matmul precision "highest" (its default) | 3xTF32, fp32-accurate ("tf32x3") | fp32 |
| float32, "high" or "medium" | TF32 ("tf32") | fp32 |
| bfloat16, float16 | half operands, fp32 accumulation ("ieee") | fp32 |

The float32 setting is read through whichever of torch's two APIs the user set.

torch has a legacy API (`torch.set_float32_matmul_precision("highest" | "high" | "medium")`) and,
since 2.9, a per-backend one (`torch.backends.cuda.matmul.fp32_precision = "ieee" | "tf32"`, with
"none" deferring to `torch.backends.fp32_precision`). Once the new one is set, the legacy getter
raises instead of answering, so the new API is read first where it exists.
"""

from __future__ import annotations

import torch

__all__ = [
    "float32_matmul_precision",
    "matmul_precision",
    "layer_precision",
    "NARROW_FEATURES",
    "round_to_tf32",
    "tf32_linear",
]

# A layer with at most this many input or output features (x's coordinates in, an SDF's one output
# out) is computed fp32-accurately wherever the network runs in TF32: its dots are padded to 16 wide
# anyway, so they are cheap, and rounding their operands to TF32 costs accuracy. The whole-network
# kernels compute such layers with fp32 FMAs; the per-layer kernels get 3xTF32 dots for them (fp32
# "ieee" dots, FMAs in a matmul's layout, spilled in 6 of the per-layer configurations on sm_80/90).
# Without this the per-layer backward's gradients carried up to twice the fused backward's error
# (on an H200, and under emulated TF32: tests/test_tf32_emulation.py).
NARROW_FEATURES = 16


def float32_matmul_precision() -> str:
    """ "highest" (fp32-accurate matmuls) or "high"/"medium" (TF32 allowed), in the legacy API's words."""
    matmul = getattr(getattr(torch.backends, "cuda", None), "matmul", None)
    setting = getattr(matmul, "fp32_precision", None)
    if setting == "none":
        setting = getattr(torch.backends, "fp32_precision", "none")
    if setting == "tf32":
        return "high"
    if setting == "ieee":
        return "highest"
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:  # the APIs mixed in a way torch refuses to summarise: fp32-accurate is safe
        return "highest"


def matmul_precision(dtype: torch.dtype) -> str:
    """The `tl.dot` input precision for this input dtype under the current float32 matmul setting."""
    if dtype != torch.float32:
        return "ieee"  # half operands: the setting only concerns fp32 operands
    return "tf32x3" if float32_matmul_precision() == "highest" else "tf32"


def layer_precision(precision: str, d_in: int, d_out: int) -> str:
    """The `tl.dot` input precision of one layer's per-layer kernels: 3xTF32 for a narrow layer of a
    TF32 network, the network's precision otherwise."""
    if precision == "tf32" and min(d_in, d_out) <= NARROW_FEATURES:
        return "tf32x3"
    return precision


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 t rounded to TF32 (10 mantissa bits, to nearest, ties away from zero: `cvt.rna`), NaN
    kept: what the kernels and cuBLAS feed the tensor cores in TF32. For emulating TF32 elsewhere
    (tests/test_tf32_emulation.py, the GPU check's all-TF32 PyTorch)."""
    bits = t.contiguous().view(torch.int32)
    return torch.where(torch.isnan(t), t, ((bits + 0x1000) & -8192).view(torch.float32))


def tf32_linear(a: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` as cuBLAS computes it in TF32: operands rounded to TF32, products summed in fp32
    (at "highest" matmul precision on a GPU). The rounding passes derivatives straight through, to
    any order; the gradients flowing back into a matmul are not rounded, so this errs a little less
    than a GPU's TF32 does. Patched over `torch.nn.functional.linear`, it runs a model in TF32."""

    def rounded(t):
        return t + (round_to_tf32(t.detach()) - t.detach())

    y = rounded(a) @ rounded(W).T
    return y if b is None else y + b
