"""The benchmark harness and the main job run end to end on a tiny case (correctness, not speed)."""

import json

import pytest

from tritonjac import benchmark
from tritonjac.__main__ import main


@pytest.fixture(scope="module")
def rows():
    case = benchmark.Case(n_points=300, width=16, depth=2)
    return benchmark.run_case(case, rounds=3, include_compile=False)


def test_rows_follow_the_schema(rows):
    methods = {r["method"] for r in rows}
    assert {
        "tritonjac (torch)",
        "nn.Sequential forward (no J)",
        "3x autograd.grad (seed)",
        "vmap(jacfwd)",
        "vmap(jacrev)",
        "autograd.functional.jacobian",
    } <= methods
    for r in rows:
        assert set(r) <= set(benchmark.ROW_FIELDS), set(r) - set(benchmark.ROW_FIELDS)
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert {r["mode"] for r in rows} == set(benchmark.MODES)
    ours = next(r for r in rows if r["method"].startswith("tritonjac") and r["mode"] == "train_step")
    assert "3x autograd.grad (seed)" in ours["speedup_vs_method"]


def test_peers_compute_the_same_jacobian():
    import torch

    case = benchmark.Case(n_points=50, width=8, depth=2, dtype="float64")
    model, seq, x = benchmark.build(case)
    table = benchmark.method_table(case, model, seq, x, include_compile=False)
    y0, J0 = table["tritonjac (torch)"][0]()
    for name, (forward, _) in table.items():
        if name.startswith("limit:"):  # the matmuls alone, on random operands
            continue
        y, J = forward()
        assert torch.allclose(y, y0, rtol=1e-10, atol=1e-12), name
        if J is not None:
            assert torch.allclose(J, J0, rtol=1e-10, atol=1e-12), name


def test_targets_and_table(rows):
    text = benchmark.format_table(rows) + benchmark.format_targets(rows)
    assert "forward_jacobian" in text and "train_step" in text
    results = benchmark.check_targets(rows)
    assert len(results) == len(benchmark.CPU_TARGETS)
    assert all(value is not None for _, value, _, _, _ in results)


def test_failing_peer_is_reported_not_fatal():
    def broken():
        raise RuntimeError("refused by the compiler")

    results = benchmark.time_interleaved({"ok": lambda: None, "broken": broken}, "cpu", rounds=2)
    assert results["ok"].status == "ok" and len(results["ok"].times_ms) == 2
    assert results["broken"].status.startswith("error: RuntimeError: refused by the compiler")


def test_main_job(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert (
        main(["--points", "256", "--width", "8", "--depth", "2", "--rounds", "2", "--no-compile", "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "self-check against torch.func (float64)" in printed and "-> OK" in printed
    assert "targets:" in printed
    assert json.loads(out.read_text())[0]["n_points"] == 256


def test_plot(rows, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "case.png"
    benchmark.plot_case(rows, str(path))
    assert path.stat().st_size > 10_000


def test_gpu_targets_from_rows():
    """The GPU targets read the right ratios (checked on synthetic rows: no GPU here)."""

    def row(mode, method, ms, mem=None, frac=None):
        return {
            "device": "cuda",
            "dtype": "float32",
            "mode": mode,
            "method": method,
            "median_ms": ms,
            "peak_mem_mb": mem,
            "fraction_of_matmul_peak": frac,
        }

    rows = [
        row("forward_jacobian", "tritonjac (triton)", 0.5, frac=0.6),
        row("forward_jacobian", "tritonjac (torch)", 3.0),
        row("forward_jacobian", "nn.Sequential forward (no J)", 0.6),
        row("forward_jacobian", "vmap(jacfwd)", 12.0),
        row("forward_jacobian", "3x autograd.grad (seed)", 4.0),
        row("forward_jacobian", "torch.compile(vmap(jacfwd))", 3.0),
        row("train_step", "tritonjac (triton)", 1.5, mem=100.0),
        row("train_step", "3x autograd.grad (seed)", 18.0, mem=1000.0),
        row("train_step", "vmap(jacfwd)", 6.0),
    ]
    got = {text: (value, met) for text, value, _, _, met in benchmark.check_targets(rows)}
    assert got["vmap(jacfwd) eager time / forward+J time"] == (24.0, True)
    assert got["three-grad time / forward+J time"] == (8.0, False)
    assert got["best torch.compile peer time / forward+J time"] == (6.0, True)
    assert got["forward+J time / plain nn.Sequential forward time"][1] is True
    assert got["useful TFLOP/s / measured dense matmul TFLOP/s (target 0.5 in TF32, 0.4 in bf16)"] == (0.6, True)
    assert got["three-grad (create_graph) step time / our step time"] == (12.0, True)
    assert got["vmap(jacfwd) + backward step time / our step time"] == (4.0, False)
    assert got["our peak memory / three-grad peak memory"] == (0.1, True)
    assert got["our step time / our forward+J time"] == (3.0, True)


def test_gpu_timing_and_memory_name_the_case_device(monkeypatch):
    """On a machine with several GPUs the case's device (cuda:1) is timed and measured, not the
    current one (checked with a stand-in for torch.cuda: no GPU here)."""
    import torch

    seen = []

    class Stream:
        def __init__(self, device):
            self.device = device

    class Event:
        def __init__(self, enable_timing=False):
            self.stream = None

        def record(self, stream=None):
            seen.append(("record", None if stream is None else stream.device))

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 2.0

    def on(name):
        def call(device=None):
            seen.append((name, device))
            return 0

        return call

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
    for name in ("synchronize", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, on(name))
    assert benchmark._elapsed_ms(lambda: None, "cuda:1", reps=2) == 1.0
    assert benchmark.peak_memory_mb(lambda: None, "cuda:1") == 0.0
    assert seen and all(device == torch.device("cuda:1") for _, device in seen), seen


def test_tuned_configurations_are_written_before_the_plot(tmp_path, monkeypatch):
    """A plotting error must not lose what autotuning found (the costliest result of a GPU run)."""
    import triton

    from tritonjac.triton_engine import tuning

    def broken_plot(rows, path):
        raise RuntimeError("matplotlib backend missing")

    monkeypatch.setattr(benchmark, "plot_case", broken_plot)
    tuning.record_tuned("mlp_forward", "a key", "cpu", triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=2))
    with pytest.raises(RuntimeError, match="matplotlib"):
        main(
            [
                "--points",
                "64",
                "--width",
                "8",
                "--depth",
                "2",
                "--rounds",
                "1",
                "--no-compile",
                "--skip-check",
                "--tuned-configs",
                str(tmp_path),
                "--plot",
                str(tmp_path / "plot.png"),
            ]
        )
    table = json.loads((tmp_path / "cpu.json").read_text())
    assert table["mlp_forward"]["a key"]["kwargs"] == {"BLOCK_M": 32}


def test_limit_row_and_progress(rows, capsys):
    """Each CPU table holds the matmuls-alone row, and each method
    announces itself on stderr while it runs."""
    for mode in benchmark.MODES:
        sub = {r["method"]: r for r in rows if r["mode"] == mode}
        limit = sub[benchmark.CPU_LIMIT]
        assert limit["median_ms"] > 0 and limit["status"] == "ok"
    benchmark.run_case(
        benchmark.Case(n_points=64, width=8, depth=2), rounds=1, include_compile=False, methods=["vmap(jacfwd)"]
    )
    err = capsys.readouterr().err
    assert "forward_jacobian | vmap(jacfwd): warming up" in err and "train_step | vmap(jacfwd)" in err
