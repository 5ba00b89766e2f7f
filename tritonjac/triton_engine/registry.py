"""The kernel registry: every Triton kernel with what launching and compiling it needs to know.

One `KernelInfo` per `@triton.jit` kernel of `tritonjac.kernels`: where the function lives, its
pointer arguments (and which of them are fp32 whatever the data dtype), and for the autotuned
forward kernels the autotune key and the candidate configurations with their pruning. The
launchers (`launch.py`) and the ahead-of-time compile step (`tritonjac.aot`) both read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from . import tuning

__all__ = ["KernelInfo", "KERNELS", "candidates"]

_NETWORK_PARAMETERS = (
    "w_first_ptr",
    "bias_first_ptr",
    "w_hidden_ptr",
    "bias_hidden_ptr",
    "w_last_ptr",
    "bias_last_ptr",
)
_FUSED_GRADIENT_SLABS = ("gw_first_ptr", "gb_first_ptr", "gw_hidden_ptr", "gb_hidden_ptr", "gw_last_ptr", "gb_last_ptr")


@dataclass(frozen=True)
class KernelInfo:
    name: str
    module: str  # tritonjac.kernels.<module>
    function: str
    pointers: tuple[str, ...]
    fp32_pointers: frozenset = frozenset()  # fp32 whatever the data dtype (partial sums, workspaces)
    int32_pointers: frozenset = frozenset()  # int32 tables
    autotune_key: tuple[str, ...] = ()  # empty: launched with a fixed configuration (tuning.py)
    # the autotuner's candidates, and candidates -> those that fit (by register budget); looked up in
    # tuning.py at each call
    configs: Callable | None = None
    prune: Callable | None = None

    def jit_function(self):
        return getattr(importlib.import_module(f"tritonjac.kernels.{self.module}"), self.function)


KERNELS: dict[str, KernelInfo] = {
    k.name: k
    for k in (
        KernelInfo(
            "mlp_forward",
            "forward",
            "mlp_forward_kernel",
            pointers=(
                "x_ptr",
                *_NETWORK_PARAMETERS,
                "y_ptr",
                "j_ptr",
                "w_first_enc_ptr",
                "share_ptr",
                "enc_func_ptr",
                "enc_freq_ptr",
                "enc_weight_ptr",
            ),
            fp32_pointers=frozenset({"enc_freq_ptr", "enc_weight_ptr"}),
            int32_pointers=frozenset({"enc_func_ptr"}),
            autotune_key=(
                "IN",
                "PLAIN_INPUT",
                "ENCODED",
                "HAS_SKIP",
                "NUM_TANGENTS",
                "WIDTH_PAD",
                "OUT",
                "SLOTS",
                "ACT",
                "LAST_ACT",
                "HAS_BIAS",
                "JACOBIAN",
                "PRECISION",
                "num_hidden",
                "points_bucket",
            ),
            configs=lambda: tuning.network_configs(),
            prune=lambda *a, **kw: tuning.prune_network_configs(*a, **kw),
        ),
        KernelInfo(
            "layer_forward",
            "forward",
            "layer_forward_kernel",
            pointers=(
                "a_ptr",
                "w_ptr",
                "bias_ptr",
                "h_ptr",
                "t_ptr",
                "z_ptr",
                "x_ptr",
                "w_in_ptr",
                "w_enc_ptr",
                "enc_func_ptr",
                "enc_freq_ptr",
                "enc_weight_ptr",
                "gj_ptr",
            ),
            fp32_pointers=frozenset({"z_ptr", "enc_freq_ptr", "enc_weight_ptr"}),
            int32_pointers=frozenset({"enc_func_ptr"}),
            autotune_key=(
                "NUM_TANGENTS",
                "HAS_HIDDEN",
                "HAS_INPUT",
                "ENCODED",
                "SLOTS",
                "ACT",
                "HAS_BIAS",
                "JACOBIAN",
                "PRECISION",
                "d_in",
                "d_out",
                "points_bucket",
            ),
            configs=lambda: tuning.layer_configs(),
            prune=lambda *a, **kw: tuning.prune_layer_configs(*a, **kw),
        ),
        KernelInfo(
            "mlp_reverse",
            "reverse",
            "mlp_reverse_kernel",
            pointers=("x_ptr", *_NETWORK_PARAMETERS, "y_ptr", "j_ptr", "ws_ptr"),
            fp32_pointers=frozenset({"ws_ptr"}),
        ),
        KernelInfo(
            "mlp_backward",
            "backward",
            "mlp_backward_kernel",
            pointers=("x_ptr", *_NETWORK_PARAMETERS, "gy_ptr", "gj_ptr", "gx_ptr", *_FUSED_GRADIENT_SLABS, "ws_ptr"),
            fp32_pointers=frozenset({*_FUSED_GRADIENT_SLABS, "ws_ptr"}),
        ),
        KernelInfo(
            "layer_backward",
            "backward",
            "layer_backward_kernel",
            pointers=("gz_ptr", "w_ptr", "z_prev_ptr", "out_ptr"),
            fp32_pointers=frozenset({"gz_ptr", "z_prev_ptr"}),
        ),
        KernelInfo(
            "layer_weight_grad",
            "backward",
            "layer_weight_grad_kernel",
            pointers=("gz_ptr", "a_ptr", "gw_ptr", "gb_ptr"),
            fp32_pointers=frozenset({"gz_ptr", "gw_ptr", "gb_ptr"}),
        ),
    )
}


def candidates(name: str, args: dict) -> list:
    """The candidate configurations of an autotuned kernel that fit these launch arguments."""
    info = KERNELS[name]
    return info.prune(info.configs(), args)
