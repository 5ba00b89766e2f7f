"""The GPU check's dry run: the same steps as on a lent GPU, on CPU under the Triton interpreter at
tiny sizes, bringing back what a lease brings back (at most 8 files, 2 folders down, plain names,
16 MiB each) with a summary that parses, and keeping finished cases when a step is killed."""

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from helpers import assert_close, sequential_reference
from tritonjac.activations import ACTIVATION_NAMES

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "perf" / "gpu_check.py"
ACTIVATIONS = set(ACTIVATION_NAMES)


def run_dry(out: Path, *args: str, env_extra=None, timeout=900):
    env = dict(os.environ, TRITON_INTERPRET="1", **(env_extra or {}))
    env.pop("TRITONJAC_AUTOTUNE", None)  # the check decides per step (the suite's conftest sets 0)
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def brought_back(out: Path) -> list[Path]:
    """What a lease returns from $OUT: plain files at most 2 folders down."""
    return [p for p in out.rglob("*") if p.is_file()]


def check_lease_limits(out: Path):
    files = brought_back(out)
    assert 0 < len(files) <= 8, files
    assert sum(1 for p in files if p.suffix == ".png") <= 5
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3, rel
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
        assert p.stat().st_size <= 16 << 20, rel
    assert sum(p.stat().st_size for p in files) <= 64 << 20
    return {p.name for p in files}


@pytest.fixture(scope="module")
def quick_dry_run(tmp_path_factory):
    """The --quick steps without the torch.compile peers (a minute of inductor on CPU; the step runs
    the same code as main-tf32 with other methods)."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = run_dry(out, "--skip", "main-tf32-compiled")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_dry_run_brings_back_what_a_lease_allows(quick_dry_run):
    out, printed = quick_dry_run
    names = check_lease_limits(out)
    assert {"summary.json", "summary.txt", "results.tgz"} <= names
    assert len(printed) <= 7000  # the summary (at most 6,000 characters) and two lines per step
    # the most important last: the bf16 table, then the main TF32 table, then the targets
    order = [printed.rfind(s) for s in ("== main bf16", "== main TF32\n", "targets (value vs required")]
    assert -1 < order[0] < order[1] < order[2], order


def load_gpu_check():
    """perf/gpu_check.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_dry_run_summary_parses_and_covers_every_kernel_path(quick_dry_run):
    out, _ = quick_dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "quick" and summary["environment"]["dry_run"]
    assert {"torch", "triton", "date", "card"} <= set(summary["environment"])
    for name in ("environment", "correctness", "main-tf32", "real-networks", "main-bf16"):
        assert summary["steps"][name]["status"] == "ok", summary["steps"][name]
    assert summary["steps"]["correctness"]["variants"] > 20
    checks = summary["correctness"]
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    assert {(c["plan"], c["backward"]) for c in checks} >= {
        ("forward network", "fused"),
        ("forward network", "layers"),
        ("forward layers", "layers"),
        ("reverse network", "fused seeded"),  # an SDF: one output of three inputs
        ("forward network", "fused seeded"),  # the same in forward mode: the backward seeds anyway
        ("reverse layers", "layers seeded"),  # NeuS
    }
    assert {c["precision"] for c in checks} == {"tf32", "tf32x3", "bfloat16", "float16"}
    # TF32 cases also carry an all-TF32 PyTorch's errors, to read a failure by
    assert all(c["all_tf32_torch_errors"].keys() >= {"y", "grad x"} for c in checks if c["precision"] == "tf32")
    # the grid by shapes: strided and broadcast inputs, last-layer activations, non-default activation
    # parameters, biases absent or mixed, k < in, one output, a y-only per-layer backward
    assert {c["layout"] for c in checks} == set(load_gpu_check().LAYOUTS)
    assert {c.get("last") for c in checks} >= {None, "tanh", "sigmoid", "softplus", "sine"}
    assert {c["act"] for c in checks if c.get("act_args")} >= {"softplus", "leaky_relu", "sine"}
    assert any(c.get("mixed_bias") for c in checks) and any(c.get("bias") is False for c in checks)
    assert any(c.get("k") for c in checks) and any(c.get("d_out") == 1 for c in checks)
    assert any(c["plan"].endswith("layers") and c["loss"] == "y" for c in checks)
    assert all(not c["guards"] and c["tolerances"] for c in checks)
    assert {c["act"] for c in checks} >= ACTIVATIONS
    assert {c["loss"] for c in checks} == {"y", "J", "both"} and any(c.get("jacobian") is False for c in checks)
    for label in ("main TF32", "main bf16"):
        methods = {r["method"] for r in summary["runs"][label]["rows"]}
        assert {"tritonjac (triton)", "vmap(jacfwd)", "3x autograd.grad (seed)", "limit: the matmuls alone"} <= methods
    assert any(t["run"] == "main TF32" for t in summary["targets"])
    # real networks: skips (scaled), encodings (windowed), a latent code, input and output selections
    assert any(c.get("encoding") and c["encoding"][1] is not None for c in checks)
    assert any(c.get("skip_scale", 1.0) != 1.0 for c in checks) and any(isinstance(c.get("k"), list) for c in checks)
    assert any(isinstance(c.get("outputs"), int) for c in checks) and any(
        isinstance(c.get("outputs"), list) for c in checks
    )
    real = {record["label"].split(" (")[0] for record in summary["real_networks"]}
    assert real == {"NeuS SDF", "Nerfies warp"}
    assert {t["run"] for t in summary["targets"]} >= real


def test_every_benchmark_step_saves_its_tuned_configurations(quick_dry_run):
    """Each benchmark step writes the table after each case (the interpreter's fixed choice stands in
    for autotuning's): one key per dtype and precision that ran."""
    out, _ = quick_dry_run
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
        table = json.load(tar.extractfile("results/configs/cpu.json"))
    for step in ("environment", "correctness", "main-tf32", "main-bf16"):
        assert f"results/{step}.jsonl" in names and f"results/{step}.log" in names
    keys = list(table["mlp_forward"])
    assert any("dtype=float32" in k and "PRECISION=tf32," in k for k in keys)
    assert any("dtype=bfloat16" in k for k in keys)


def test_a_step_killed_at_its_limit_keeps_its_finished_cases(tmp_path):
    """The correctness step hangs after 3 cases (a test hook); its limit kills it; the 3 cases and
    the summary come back."""
    proc = run_dry(
        tmp_path,
        "--skip",
        "main-tf32",
        "main-tf32-compiled",
        "main-bf16",
        "--limit",
        "correctness=40",
        env_extra={"TRITONJAC_GPU_CHECK_STALL_AFTER": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_lease_limits(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    step = summary["steps"]["correctness"]
    assert step["status"] == "timed out at 40 s" and step["cases_done"] == 3
    assert len(summary["correctness"]) == 3
    assert "timed out" in (tmp_path / "summary.txt").read_text()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="drives the interpreter")
def test_precompile_workers_launch_their_slice_of_the_candidates(monkeypatch, tf32):
    """Worker i of n launches candidates i, i + n, ... of every autotuned launch once (so that Triton
    compiles them into its on-disk cache), and the launch still produces its outputs."""

    import torch
    import triton

    import tritonjac
    from tritonjac.triton_engine import launch, tuning

    gpu_check = load_gpu_check()
    candidates = [triton.Config({"BLOCK_M": bm}, num_warps=4, num_stages=2) for bm in (16, 32, 64)]
    monkeypatch.setattr(tuning, "network_configs", lambda: candidates)
    monkeypatch.setattr(tuning, "current_arch", lambda: 90)  # all three fit at width 16 in TF32
    monkeypatch.setattr(launch, "interpreting", lambda: False)  # take the autotuning path
    monkeypatch.setattr(launch, "check_device", lambda x: None)
    monkeypatch.setattr(launch, "device_name", lambda index: "Precompile GPU")
    outputs, x_used = [], {}

    def build_and_run(train):
        model = tritonjac.JacobianMLP(3, [16, 16], 3, "tanh", backend="triton")
        x = torch.randn(40, 3)
        x_used[id(model)] = x.double()
        with torch.no_grad():
            outputs.append((model(x), model))

    assert gpu_check._precompile_worker(build_and_run, 0, 2) == 2  # candidates 0 and 2
    assert gpu_check._precompile_worker(build_and_run, 1, 2) == 1  # candidate 1
    for (y, J), model in outputs:  # each candidate computed the right values
        y_ref, J_ref = sequential_reference(copy.deepcopy(model.to_sequential()).double(), x_used[id(model)], 3)
        assert_close(y, y_ref, "float32", "y")  # the interpreter's exact fp32 dots
        assert_close(J, J_ref, "float32", "J")


def test_steps_beyond_the_calls_budget_are_skipped_and_reported(tmp_path):
    """A call's budget (4 minutes on a lent GPU) cuts every step's limit to what is left and skips
    the steps that no longer fit, saying so in the summary."""
    proc = run_dry(tmp_path, "--budget", "12", "--skip", "correctness", "main-tf32-compiled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert steps["environment"]["limit_s"] <= 7
    assert steps["main-tf32"]["status"] == steps["main-bf16"]["status"] == "skipped: out of the call's budget"


def test_scalar_fields_step_reports_both_modes_and_the_targets(tmp_path, monkeypatch):
    """--real's scalar-fields step (dry: on CPU, 1/1024 of the points): every case times tritonjac in
    both modes and autograd, with memory, and the summary turns them into the issue's targets."""
    gpu_check = load_gpu_check()
    monkeypatch.setenv("TRITONJAC_AUTOTUNE", "0")  # the step sets these for its process: restore them
    monkeypatch.setattr(sys, "path", list(sys.path))
    precision = torch.get_float32_matmul_precision()
    try:
        gpu_check.step_scalar_fields(tmp_path, dry_run=True)
    finally:
        torch.set_float32_matmul_precision(precision)
    summary = gpu_check.collect(tmp_path, "real", {})
    records = summary["scalar_fields"]
    assert [r["label"].split(",")[0] for r in records] == ["SDF 3 -> 4x64 -> 1", "NeuS SDF (PE6"]
    for record in records:
        methods = {(row["mode"], row["method"]) for row in record["rows"] if row["median_ms"] is not None}
        for mode in ("y and gradient", "eikonal step"):
            assert {(mode, "tritonjac (auto)"), (mode, "tritonjac (mode='forward')"), (mode, "autograd")} <= methods
    targets = {(t["run"], t["target"]): t for t in summary["targets"]}
    assert targets[("SDF 3 -> 4x64 -> 1", "eikonal step: autograd time / ours")]["required"] == 5.0
    assert targets[("NeuS SDF", "y and gradient: autograd peak memory / ours")]["required"] == 3.0
    assert "== NeuS SDF" in gpu_check.format_summary(summary)


def test_second_order_step_reports_the_laplacian_against_its_peers(tmp_path, monkeypatch):
    """--second's step (dry: on CPU, 1/1024 of the points): both cases time tritonjac's Laplacian
    against nested autograd and vmap(hessian), and the summary turns them into the issue's targets."""
    gpu_check = load_gpu_check()
    monkeypatch.setattr(sys, "path", list(sys.path))
    precision = torch.get_float32_matmul_precision()
    try:
        gpu_check.step_second_order(tmp_path, dry_run=True)
    finally:
        torch.set_float32_matmul_precision(precision)
    summary = gpu_check.collect(tmp_path, "second", {})
    records = summary["second_order"]
    assert [r["label"].split(",")[0] for r in records] == ["SIREN 3 -> 3x256 -> 1", "3 -> 4x64 -> 1"]
    for record in records:
        methods = {(row["mode"], row["method"]) for row in record["rows"] if row["median_ms"] is not None}
        for mode in ("y, J and Laplacian", "Poisson step"):
            assert {(mode, "tritonjac (laplacian=True)"), (mode, "nested autograd")} <= methods
    targets = {(t["run"], t["target"]): t for t in summary["targets"]}
    assert targets[("3 -> 4x64 -> 1", "Poisson step: nested autograd time / ours")]["required"] == 5.0
    siren_forward = "y, J and Laplacian: torch.func vmap(hessian), trace time / ours"
    assert targets[("SIREN 3 -> 3x256 -> 1", siren_forward)]["required"] == 3.0
    assert "== SIREN 3 -> 3x256 -> 1" in gpu_check.format_summary(summary)
