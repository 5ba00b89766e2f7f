"""Every configuration choice of the Triton engine, in one module.

Block sizes, warps and stages of every kernel (the autotuner's candidates and their pruning by
register budget, the fixed choices of the backward kernels, the interpreter's small blocks), the
shipped per-GPU tables, and the sizes that follow from memory (the per-layer backward's chunks,
the fused backward's number of programs, the weight-gradient splits).

How a launch picks its configuration (block sizes, warps, stages):
1. Under the Triton interpreter, one fixed configuration (the interpreter cannot time anything); with
   TRITONJAC_AUTOTUNE=0 (the test suite sets it), the first candidate that fits, without timing.
2. The shipped table for this GPU (`tritonjac/configs/<GPU name>.json`, filled from real runs by
   `perf/gpu_check.sh`), looked up by the launch's key.
3. Otherwise `triton.autotune` over the candidates below, with its on-disk result cache where the
   installed Triton has `cache_results`. What it picks is recorded (`tuned_table`) so a GPU run can
   write the next shipped table.

Keys hold the shapes that change the best choice and a bucket of the point count, never the raw
count (a new N must not retune or recompile).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import warnings
from pathlib import Path

import triton

__all__ = [
    "INTERPRETER_CONFIGS",
    "fused_backward_config",
    "fused_backward_programs",
    "reverse_fits_config",
    "reverse_configs",
    "reverse_config",
    "layer_backward_configs",
    "recompute_config",
    "layers_backward_chunk",
    "weight_grad_splits",
    "interpreting",
    "autotuning_enabled",
    "current_arch",
    "points_bucket",
    "network_configs",
    "layer_configs",
    "network_fits_config",
    "backward_fits_config",
    "backward_configs",
    "prune_network_configs",
    "prune_layer_configs",
    "shipped_config",
    "record_tuned",
    "tuned_table",
    "write_tuned_table",
    "SHIPPED_DIR",
]

SHIPPED_DIR = Path(__file__).parent.parent / "configs"

# Register budgets below which ahead-of-time compilation showed no spills (tests/test_aot.py checks
# every candidate the pruning keeps), in fp32 elements per thread:
# - whole-network kernel: its stacked (BLOCK_M * SLOTS, WIDTH_PAD) tile at most NETWORK_TILE_BUDGET
#   (before sm_90, whose mma.sync keeps more in registers: half of it, and 8 for 3xTF32), and the
#   tile plus the layer's weight tile (twice for 3xTF32) at most NETWORK_BUDGET;
# - fused backward: see backward_fits_config;
# - per-layer kernel: its (BLOCK_M * SLOTS, BLOCK_N) accumulator (the 3-D epilogue is costly).
# On sm_90 the dot also needs at least 64 rows (BLOCK_M * SLOTS) to become a wgmma (a warpgroup's M);
# with fewer, Triton falls back to the older mma.sync.
WGMMA_ROWS = 64

# Triton before 3.8 (3.6 is the lent GPUs' version) spills in a few configurations that 3.8 and 3.9
# compile cleanly: those are left out only there (see ENCODED_SPILLS, REVERSE_SPILLS, _no_known_spill).
OLD_TRITON = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 8)
NETWORK_TILE_BUDGET = 32
NETWORK_BUDGET = 160
LAYER_BUDGET = 16


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotuning_enabled() -> bool:
    """False with TRITONJAC_AUTOTUNE=0: launches take the first fitting candidate instead of tuning."""
    return os.environ.get("TRITONJAC_AUTOTUNE", "1") != "0"


def points_bucket(num_points: int) -> int:
    """log2 bucket of the number of 4096-point blocks: 0 up to 4096 points, then one per doubling.
    A symbolic count (torch.compile with dynamic shapes) gets the bucket of 2^20 points."""
    if not isinstance(num_points, int):
        num_points = 1 << 20
    return max(0, (num_points - 1) // 4096).bit_length()


# ---- candidates ------------------------------------------------------------------------------------
def network_configs() -> list[triton.Config]:
    """Candidates; `network_fits_config` keeps one num_stages per case (see there)."""
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm in (16, 32, 64, 128)
        for w in (4, 8)
        for s in (1, 2)
    ]


def layer_configs() -> list[triton.Config]:
    # the last: 4 points of 16 slots (the Hessian's rows for k = 3, 4), kept for those alone; on sm_80
    # (triton 3.9) it spilled 8-16 bytes with 4 warps (an encoded skip layer), and 16 with 3 stages
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32}, num_warps=w, num_stages=s)
        for bm, bn, w in ((16, 32, 4), (32, 32, 8), (16, 16, 4), (64, 32, 4), (64, 64, 8))
        for s in (2, 3)
    ] + [triton.Config({"BLOCK_M": 4, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2)]


def current_arch() -> int:
    """Compute capability of the current CUDA device as 80, 90, ...; 90 without one (interpreter)."""
    import torch

    if not torch.cuda.is_available():
        return 90
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def network_fits_config(
    block_m: int, slots: int, width_pad: int, num_warps: int, precision: str, arch: int, num_stages: int = 2
) -> bool:
    """Whether this whole-network configuration stays within the register and shared-memory budgets.

    Two stages (the next layer's weights prefetched) everywhere but 3xTF32 at width 128, whose
    split weight tiles need 256 KB of shared memory with two stages (192 KB with one; sm_90 has
    227 KB). One stage was left out elsewhere: it spilled 8 bytes in one sm_90 case (W64, bf16, no
    tangents) where two stages did not.
    """
    if num_stages != (1 if precision == "tf32x3" and width_pad >= 128 else 2):
        return False
    threads = 32 * num_warps
    tile = block_m * slots * width_pad / threads
    weight = width_pad * width_pad / threads * (2 if precision == "tf32x3" else 1)
    if arch >= 90:
        tile_budget = NETWORK_TILE_BUDGET
    else:  # mma.sync keeps more in registers (3xTF32 its split operands); measured with triton 3.6
        tile_budget = 8 if precision == "tf32x3" else NETWORK_TILE_BUDGET // 2
    min_rows = WGMMA_ROWS if arch >= 90 else 16
    return block_m * slots >= min_rows and tile <= tile_budget and tile + weight <= NETWORK_BUDGET


def backward_fits_config(block_m: int, slots: int, width_pad: int, num_warps: int, precision: str, arch: int) -> bool:
    """Whether the fused backward compiles without spills (measured by ahead-of-time compilation with
    triton 3.6 and 3.9). Its live state is about twice the forward's (the gradient, Z, G_Z and the
    previous layer's A tiles, the weight-gradient tile): per-thread budgets are tighter, tighter
    still with tangents, and 3xTF32 with tangents fits nowhere."""
    threads = 32 * num_warps
    rows = block_m * slots
    tile = rows * width_pad / threads
    weight = width_pad * width_pad / threads * (2 if precision == "tf32x3" else 1)
    if rows < 16:
        return False
    if slots > 1:
        if arch < 90 and precision == "tf32" and rows < 32:
            return False  # reverse mode's seeded backward (SLOTS 2, BLOCK_M 8): 40 spilled bytes (triton 3.9)
        return precision != "tf32x3" and tile <= 8 and weight <= (64 if arch >= 90 else 16)
    if arch >= 90:
        return tile <= 16 and tile + weight <= 72
    if precision == "tf32" and block_m == 16:
        return False  # with the TF32 operands rounded (cvt.rna): 8 spilled bytes (triton 3.9, sm_80)
    return tile <= 8 and weight <= 32


def backward_configs(named_args: dict, arch: int) -> list[triton.Config]:
    """Configurations for the fused backward that fit, largest block first (possibly none: then the
    backward recomputes with the analytic engine)."""
    slots, width, precision = named_args["SLOTS"], named_args["WIDTH_PAD"], named_args["PRECISION"]
    candidates = [triton.Config({"BLOCK_M": bm}, num_warps=8, num_stages=1) for bm in (32, 16, 8)]
    return [
        c for c in candidates if backward_fits_config(c.kwargs["BLOCK_M"], slots, width, c.num_warps, precision, arch)
    ]


def layer_cost(block_m: int, slots: int, block_n: int, num_warps: int) -> float:
    return block_m * slots * block_n / (32 * num_warps)


def prune_network_configs(configs, named_args, arch: int | None = None, **kwargs):
    """Keep the configurations within the register budgets (possibly none: use the layer kernel).

    `triton.autotune` passes the positional arguments as named_args and the keyword ones (all of
    ours) as **kwargs: read from both."""
    arch = current_arch() if arch is None else arch
    named_args = {**named_args, **kwargs}
    slots, width, precision = named_args["SLOTS"], named_args["WIDTH_PAD"], named_args["PRECISION"]
    encoded = bool(named_args.get("ENCODED"))
    return [
        c
        for c in configs
        if network_fits_config(c.kwargs["BLOCK_M"], slots, width, c.num_warps, precision, arch, c.num_stages)
        and not (encoded and (arch >= 90, width, precision, c.kwargs["BLOCK_M"], c.num_warps) in ENCODED_SPILLS)
    ]


# Whole-network configurations whose encoded first layer (feature tiles and their dots beside the
# stacked tile) spills, measured by ahead-of-time compilation (triton 3.9; Nerfies' warp, 3 tangents):
# (sm_90 or later, WIDTH_PAD, PRECISION, BLOCK_M, num_warps). Left out: with none left (3xTF32 at
# width 128 on sm_90, and before triton 3.8 every width-128 case there) such a network runs per layer.
ENCODED_SPILLS = {
    (False, 64, "tf32", 16, 8),
    (False, 64, "ieee", 16, 8),
    (True, 64, "tf32x3", 32, 8),
    (True, 64, "tf32x3", 16, 4),  # triton 3.8 (torch 2.14's): 255 registers, 168 bytes spilled
    (True, 128, "tf32x3", 16, 8),
}
if OLD_TRITON:  # triton 3.6 (the lent GPUs'; perf/results/aot-triton-3.6.0-alternatives.txt)
    ENCODED_SPILLS |= {
        (True, 64, "tf32", 16, 4),  # 64 bytes
        (True, 64, "tf32", 32, 8),  # 864 bytes
        (True, 64, "ieee", 32, 8),  # 784 bytes
        (True, 128, "tf32", 16, 8),  # 136 bytes (every candidate at width 128 spilled)
        (True, 128, "ieee", 16, 8),  # 96 bytes
    }


def _no_known_spill(config: triton.Config, arch: int, named: dict) -> bool:
    """Configurations that spill before sm_90 (ahead-of-time compile), left out there:
    - triton 3.8 (the version torch 2.14 pins) compiles the 16x32 tile with 4 warps and 3 stages
      to 96 registers and 8 spilled bytes per thread (first layer; 2 stages and triton 3.6/3.9 do
      not spill);
    - a skip layer (the previous layer's part and x's) in half precision ("ieee" dots) with the
      32x32 tile and 8 warps: 128 registers and 16 spilled bytes (triton 3.9);
    - triton 3.8, 8 spilled bytes each: a skip layer's recompute (storing Z) in TF32 with the 16x32
      tile, 4 warps, 2 stages (the operands rounded to nearest); an encoded first layer in 3xTF32
      with the 16x16 tile and 4 warps;
    - a skip layer carrying the Laplacian row (8 slots) with the 16x16 tile, 4 warps and 3 stages:
      24 spilled bytes in TF32, and 16 in 3xTF32 with an encoding (triton 3.9);
    - before triton 3.8 (3.6 is the lent GPUs'): an encoded first layer's TF32 recompute with the
      16x32 tile, 4 warps, 2 stages: 16 bytes."""
    if arch >= 90:
        return True
    tile = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
    if tile == (16, 32, 4, 3):
        return False
    precision = named.get("PRECISION")
    skip_layer = named.get("HAS_HIDDEN") and named.get("HAS_INPUT")
    if skip_layer and named.get("STORE_Z") and precision == "tf32" and tile == (16, 32, 4, 2):
        return False
    laplacian_skip = skip_layer and named.get("LAPLACIAN") and tile == (16, 16, 4, 3)
    if laplacian_skip and (precision == "tf32" or (precision == "tf32x3" and named.get("ENCODED"))):
        return False
    encoded_first = named.get("ENCODED") and not named.get("HAS_HIDDEN")
    if encoded_first and precision == "tf32x3" and tile[:3] == (16, 16, 4):
        return False
    if OLD_TRITON and encoded_first and named.get("STORE_Z") and precision == "tf32" and tile == (16, 32, 4, 2):
        return False  # the recompute of an encoded first layer: 16 bytes (triton 3.6)
    return not (skip_layer and precision == "ieee" and tile[:3] == (32, 32, 8))


def prune_layer_configs(configs, named_args, arch: int | None = None, **kwargs):
    """Keep the configurations within the register budget, with wgmma-sized dots on sm_90 (the
    arguments arrive as in `prune_network_configs`)."""
    arch = current_arch() if arch is None else arch
    named = {**named_args, **kwargs}
    slots = named["SLOTS"]

    def cost(c):
        return layer_cost(c.kwargs["BLOCK_M"], slots, c.kwargs["BLOCK_N"], c.num_warps)

    fits = [c for c in configs if cost(c) <= LAYER_BUDGET and _no_known_spill(c, arch, named)]
    fits = [c for c in fits if c.kwargs["BLOCK_M"] >= 16 or slots >= 16]  # 4-point tiles: 16 slots only
    big = [c for c in fits if arch < 90 or c.kwargs["BLOCK_M"] * slots >= WGMMA_ROWS]
    # many tangents (SLOTS >= 16): nothing fits; the smallest tile spills least
    return big or fits or [min(configs, key=cost)]


def autotune(configs, key, prune):
    """`triton.autotune` with the on-disk result cache where this Triton has it."""
    kwargs = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs["cache_results"] = True
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, **kwargs)


# ---- shipped tables and what tuning found --------------------------------------------------------------
def _config_to_json(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def _config_from_json(entry) -> triton.Config:
    kwargs = entry["kwargs"]
    if not isinstance(kwargs, dict) or not all(isinstance(v, int) for v in kwargs.values()):
        raise ValueError(f"bad kwargs {kwargs!r}")
    return triton.Config(dict(kwargs), num_warps=int(entry["num_warps"]), num_stages=int(entry["num_stages"]))


def _table_path(device_name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in device_name)
    return SHIPPED_DIR / f"{safe}.json"


@functools.lru_cache(maxsize=None)
def _shipped_table(device_name: str) -> dict:
    path = _table_path(device_name)
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {kernel: {key: _config_from_json(e) for key, e in entries.items()} for kernel, entries in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(f"tritonjac: ignoring the config table {path}: {err}", RuntimeWarning, stacklevel=2)
        return {}


def shipped_config(kernel: str, key: str, device_name: str) -> triton.Config | None:
    """The shipped configuration for this kernel and key on this GPU, or None."""
    return _shipped_table(device_name).get(kernel, {}).get(key)


_TUNED: dict = {}


def record_tuned(kernel: str, key: str, device_name: str, config: triton.Config) -> None:
    _TUNED.setdefault(device_name, {}).setdefault(kernel, {})[key] = _config_to_json(config)


def tuned_config(kernel: str, key: str, device_name: str) -> triton.Config | None:
    """What autotuning chose for this kernel and key on this GPU in this process, or None."""
    entry = _TUNED.get(device_name, {}).get(kernel, {}).get(key)
    return None if entry is None else _config_from_json(entry)


def tuned_table(device_name: str) -> dict:
    """What autotuning chose in this process on that GPU, in the shipped tables' JSON format."""
    return _TUNED.get(device_name, {})


def write_tuned_table(directory, device_name: str) -> Path | None:
    """Merge what tuning chose on this GPU into directory/<GPU name>.json (a shipped-table candidate)."""
    table = tuned_table(device_name)
    if not table:
        return None
    path = Path(directory) / _table_path(device_name).name
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(path.read_text()) if path.exists() else {}
    for kernel, entries in table.items():
        merged.setdefault(kernel, {}).update(entries)
    path.write_text(json.dumps(merged, indent=1, sort_keys=True))
    return path


# ---- fixed choices ---------------------------------------------------------------------------------
# Under the interpreter: one fixed configuration per forward kernel, small enough that the tests'
# shapes exercise partial blocks in every dimension.
INTERPRETER_CONFIGS = {
    "mlp_forward": triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1),
    "layer_forward": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1),
}


def fused_backward_config(slots: int, width_pad: int, precision: str, arch: int) -> triton.Config | None:
    """The fused backward's configuration (the largest block that fits), or None if none fits.
    The interpreter takes the fused path exactly where an sm_90 GPU would, with its own block."""
    named = {"SLOTS": slots, "WIDTH_PAD": width_pad, "PRECISION": precision}
    configs = backward_configs(named, arch)
    if configs and interpreting():
        return triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)
    return configs[0] if configs else None


def reverse_fits_config(
    block_m: int, adj_slots: int, width_pad: int, num_warps: int, precision: str, arch: int
) -> bool:
    """Whether the whole-network reverse kernel compiles without spills (ahead-of-time compilation of
    every candidate, triton 3.8 and 3.9). On sm_90 its adjoint tile, slope tile and weight tiles
    together spilled beyond these budgets, and two stages (the next layer's weights prefetched)
    spilled where one did not: one stage there. Before sm_90 the forward kernel's budgets held,
    but for the cases in REVERSE_SPILLS and, with triton 3.8, every 3xTF32 one at width 128."""
    key = (arch >= 90, width_pad, precision, block_m, num_warps, adj_slots)
    if key in REVERSE_SPILLS:
        return False
    if key in REVERSE_CLEAN_BEYOND_BUDGET:
        return True
    if arch < 90:
        if precision == "tf32x3" and width_pad >= 128:
            return False
        return network_fits_config(block_m, adj_slots, width_pad, num_warps, precision, arch, 2)
    threads = 32 * num_warps
    tile = block_m * adj_slots * width_pad / threads
    weight = width_pad * width_pad / threads * (2 if precision == "tf32x3" else 1)
    return block_m * adj_slots >= WGMMA_ROWS and tile <= 32 and tile + weight <= 96


# Reverse-kernel configurations within the budgets above that still spilled (ahead-of-time
# compilation): (sm_90 or later, WIDTH_PAD, PRECISION, BLOCK_M, num_warps, ADJ_SLOTS)
REVERSE_SPILLS = {
    (True, 64, "tf32x3", 64, 8, 1),  # triton 3.9: 255 registers and spills
    (False, 64, "ieee", 32, 8, 2),  # triton 3.8: 24 bytes
    (False, 128, "tf32", 32, 8, 1),  # triton 3.8: 80 bytes
}
# ... and configurations beyond the budgets that compiled clean, where the ones within spilled
REVERSE_CLEAN_BEYOND_BUDGET = set()
if OLD_TRITON:
    REVERSE_SPILLS.add((True, 64, "tf32x3", 64, 8, 2))  # triton 3.6: 40 bytes
    # triton 3.6, 16-bit at width 128 with 2 adjoints: 32 rows on 8 warps spilled 40 bytes, on 4
    # warps they took 187 registers and no spill (perf/results/aot-triton-3.6.0-alternatives.txt)
    REVERSE_SPILLS.add((True, 128, "ieee", 32, 8, 2))
    REVERSE_CLEAN_BEYOND_BUDGET.add((True, 128, "ieee", 32, 4, 2))


def reverse_configs(named_args: dict, arch: int) -> list[triton.Config]:
    """Configurations of the whole-network reverse kernel that fit, preferred first (possibly none:
    then it runs per layer; 3xTF32 at width 128 on sm_90)."""
    slots, width, precision = named_args["ADJ_SLOTS"], named_args["WIDTH_PAD"], named_args["PRECISION"]
    stages = 1 if arch >= 90 else 2
    candidates = [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=stages)
        for bm, w in ((64, 4), (64, 8), (32, 4), (32, 8), (16, 4), (16, 8), (128, 8))
    ]
    return [
        c for c in candidates if reverse_fits_config(c.kwargs["BLOCK_M"], slots, width, c.num_warps, precision, arch)
    ]


def reverse_config(adj_slots: int, width_pad: int, precision: str, arch: int) -> triton.Config | None:
    """The whole-network reverse kernel's configuration (the first that fits), or None. The
    interpreter takes the whole-network path exactly where an sm_90 GPU would, with its own block."""
    configs = reverse_configs({"ADJ_SLOTS": adj_slots, "WIDTH_PAD": width_pad, "PRECISION": precision}, arch)
    if configs and interpreting():
        return triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)
    return configs[0] if configs else None


def fused_backward_programs(num_blocks: int, sm_count: int) -> int:
    """Persistent programs of the fused backward and of the whole-network reverse kernel: two per SM
    (a few under the interpreter, so that programs loop over several blocks)."""
    limit = 3 if interpreting() else 2 * sm_count
    return max(1, min(num_blocks, limit))


def layer_backward_configs(arch: int = 90, precision: str = "tf32", slots: int = 4, weight_grad_slots: int = 4):
    """(propagation, weight-gradient) configurations of the per-layer backward: fixed choices that
    compile without spills (tests/test_aot.py); 3xTF32 on sm_80 needs smaller tiles. Dots need at
    least 16 rows (64 for a wgmma on sm_90): BLOCK_M * slots and BLOCK_P * weight_grad_slots."""
    propagation, weight_grad = _layer_backward_tiles(arch, precision)
    min_rows = WGMMA_ROWS if arch >= 90 and not interpreting() else 16
    kw_p = dict(propagation.kwargs)
    kw_p["BLOCK_M"] = max(kw_p["BLOCK_M"], min_rows // slots)
    kw_w = dict(weight_grad.kwargs)
    kw_w["BLOCK_P"] = max(kw_w["BLOCK_P"], 16 // weight_grad_slots)
    warps_p = propagation.num_warps
    if arch >= 90 and precision == "tf32x3" and slots == 2 and not interpreting():
        warps_p = 8  # one seeded tangent (32 points x 2 rows) in 3xTF32: 24 spilled bytes with 4 warps (triton 3.9)
    if slots >= 8 and not interpreting():
        warps_p = 8  # the Laplacian's 8 slots: 64-224 spilled bytes with 4 warps (sm_80 TF32, sm_90 3xTF32; triton 3.9)
    if slots >= 16 and not interpreting():  # the Hessian's: 4 points (64 rows, a wgmma's minimum)
        kw_p["BLOCK_M"] = max(WGMMA_ROWS // slots, 1)
    if weight_grad_slots >= 8 and not interpreting():
        # 16 points of 8 slots spilled 192-880 bytes (triton 3.9): 64 rows; on sm_80 4 points of 16
        # slots in 3xTF32 spilled 24 (triton 3.6), and 2 points in TF32 16: 32 rows in 3xTF32 there
        rows = 32 if arch < 90 and precision == "tf32x3" else WGMMA_ROWS
        kw_w["BLOCK_P"] = rows // weight_grad_slots
    return (
        triton.Config(kw_p, num_warps=warps_p, num_stages=propagation.num_stages),
        triton.Config(kw_w, num_warps=weight_grad.num_warps, num_stages=weight_grad.num_stages),
    )


def _layer_backward_tiles(arch: int, precision: str):
    if interpreting():  # small, so the tests' shapes leave partial blocks in every dimension
        return (
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1),
            triton.Config({"BLOCK_P": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1),
        )
    if arch < 90 and precision == "tf32x3":
        return (
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_P": 8, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2),
        )
    return (
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_P": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=2),
    )


def recompute_config(constexprs: dict, arch: int) -> triton.Config:
    """The per-layer backward's forward recompute of a layer (its `layer_forward` constexprs): the
    first forward candidate that fits."""
    if interpreting():
        return INTERPRETER_CONFIGS["layer_forward"]
    named = {**constexprs, "STORE_Z": True}
    skip_layer = named["HAS_HIDDEN"] and named["HAS_INPUT"]
    if named.get("LAPLACIAN") and skip_layer and named["PRECISION"] != "ieee":
        # a skip layer's 8 slots with Z stored in TF32 / 3xTF32: the first fitting tile (16 x 16, 4
        # warps) spilled 8-40 bytes (sm_80 TF32, 3xTF32 with an encoding; triton 3.9); 8 warps hold it
        # on both archs (and spill 8 bytes in bf16 and in a first layer, which keep the first tile)
        return triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=8, num_stages=2)
    if arch >= 90 and named["PRECISION"] == "tf32x3" and named["HAS_INPUT"] and not named["JACOBIAN"]:
        # a layer reading x without tangents (reverse mode's way up, a loss on y alone): the first
        # fitting tile, 64 x 32 with 4 warps, spilled 48-88 bytes with triton 3.8 (torch 2.14's)
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2)
    return prune_layer_configs(layer_configs(), named, arch=arch)[0]


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


def weight_grad_splits(num_points: int, block_p: int) -> tuple[int, int]:
    """(splits, points per split) of the per-layer weight gradient: at most 64 fp32 partial sums,
    each over a whole number of blocks of at least 8 blocks' worth of points."""
    splits = max(1, min(64, triton.cdiv(num_points, 8 * block_p)))
    per_split = triton.cdiv(triton.cdiv(num_points, splits), block_p) * block_p
    return triton.cdiv(num_points, per_split), per_split
