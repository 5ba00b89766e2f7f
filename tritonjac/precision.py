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

__all__ = ["float32_matmul_precision", "matmul_precision"]


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
