"""Plans, configuration candidates, the shipped per-GPU tables (no kernel runs here)."""

import json

import pytest
import torch
import triton

from tritonjac import triton_engine
from tritonjac.network import make_spec
from tritonjac.precision import layer_precision
from tritonjac.triton_engine import launch, plans, registry, tuning


def spec_for(dims, act="softplus", k=None, last=None):
    weights = [torch.empty(o, i) for i, o in zip(dims[:-1], dims[1:])]
    acts = [act] * (len(dims) - 2) + [last]
    return weights, make_spec(acts, len(weights), dims[0], k)


@pytest.mark.parametrize(
    "dims,precision,arch,kind",
    [
        ([3, 64, 64, 64, 64, 3], "tf32", 90, "network"),  # the benchmark net
        ([3, 64, 64, 64, 64, 3], "tf32x3", 80, "layers"),  # 3xTF32 with tangents spills on sm_80
        ([3, 128, 128, 3], "tf32", 90, "network"),
        ([3, 128, 128, 3], "tf32x3", 90, "network"),  # one pipeline stage: shared memory
        ([3, 128, 128, 3], "ieee", 90, "network"),  # half operands
        ([3, 128, 128, 3], "ieee", 80, "layers"),  # sm_80 keeps more in registers
        ([3, 100, 100, 3], "tf32", 90, "network"),  # padded to 128
        ([3, 512, 512, 512, 1], "tf32", 90, "layers"),  # IDR's width
        ([3, 64, 32, 3], "tf32", 90, "layers"),  # mixed widths
        ([3, 3], "tf32", 90, "layers"),  # one layer
        ([17, 64, 3], "tf32", 90, "layers"),  # more than 16 inputs
        ([3, 64, 17], "tf32", 90, "layers"),  # more than 16 outputs
    ],
)
def test_plan_for(dims, precision, arch, kind):
    weights, spec = spec_for(dims)
    assert triton_engine.plan_for(weights, spec, True, precision, arch).kind == kind


def test_many_tangents_run_per_layer():
    weights, spec = spec_for([16, 128, 128, 3], k=16)
    plan = triton_engine.plan_for(weights, spec, True, "tf32", 90)
    assert plan.kind == "layers" and "does not fit" in plan.reason


def test_mixed_activations_run_per_layer():
    weights = [torch.empty(32, 3), torch.empty(32, 32), torch.empty(3, 32)]
    spec = make_spec(["tanh", "relu", None], 3, 3, None)
    assert triton_engine.plan_for(weights, spec).reason == "hidden activations differ"


def test_points_bucket_is_coarse():
    assert tuning.points_bucket(0) == tuning.points_bucket(1) == tuning.points_bucket(4096) == 0
    assert tuning.points_bucket(4097) == tuning.points_bucket(8192) == 1
    assert tuning.points_bucket(2**20) == tuning.points_bucket(2**20 - 5000) == 8
    assert len({tuning.points_bucket(n) for n in range(1, 2**22, 997)}) == 11


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("width", [16, 32, 64, 128])
@pytest.mark.parametrize("jacobian", [True, False])
def test_network_candidates_exist_where_the_plan_says_network(arch, width, jacobian):
    slots = 4 if jacobian else 1
    for precision in ("tf32", "tf32x3", "ieee"):
        named = {"SLOTS": slots, "WIDTH_PAD": width, "PRECISION": precision}
        kept = tuning.prune_network_configs(tuning.network_configs(), named, arch=arch)
        assert bool(kept) == plans.network_fits(width, slots, precision, arch)
        for c in kept:
            assert c.kwargs["BLOCK_M"] * slots >= (64 if arch >= 90 else 16)  # wgmma needs 64 rows


@pytest.mark.parametrize("slots", [1, 2, 4, 8, 16, 32])
def test_layer_candidates_never_empty(slots):
    for arch in (80, 90):
        assert tuning.prune_layer_configs(tuning.layer_configs(), {"SLOTS": slots}, arch=arch)


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path)
    tuning._shipped_table.cache_clear()
    yield tmp_path
    tuning._shipped_table.cache_clear()


def test_shipped_table_lookup(table_dir):
    entry = {"kwargs": {"BLOCK_M": 32}, "num_warps": 8, "num_stages": 2}
    (table_dir / "NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps({"mlp_forward": {"key-a": entry}}))
    config = tuning.shipped_config("mlp_forward", "key-a", "NVIDIA H100 80GB HBM3")
    assert isinstance(config, triton.Config)
    assert config.kwargs == {"BLOCK_M": 32} and config.num_warps == 8 and config.num_stages == 2
    assert tuning.shipped_config("mlp_forward", "key-b", "NVIDIA H100 80GB HBM3") is None
    assert tuning.shipped_config("mlp_forward", "key-a", "NVIDIA A100-SXM4-80GB") is None


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps(
            {"mlp_forward": {"k": {"kwargs": {"BLOCK_M": "__import__('os')"}, "num_warps": 4, "num_stages": 2}}}
        ),
        json.dumps(["a list"]),
    ],
    ids=["corrupt", "non-int-value", "wrong-shape"],
)
def test_bad_shipped_table_is_ignored_with_a_warning(table_dir, content):
    (table_dir / "GPU.json").write_text(content)
    with pytest.warns(RuntimeWarning, match="ignoring the config table"):
        assert tuning.shipped_config("mlp_forward", "k", "GPU") is None


def test_tuned_table_round_trips_through_the_shipped_format(table_dir):
    config = triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=2)
    tuning.record_tuned("mlp_forward", "key", "Test GPU", config)
    (table_dir / "Test_GPU.json").write_text(json.dumps(tuning.tuned_table("Test GPU")))
    back = tuning.shipped_config("mlp_forward", "key", "Test GPU")
    assert back.kwargs == config.kwargs and back.num_warps == 4


def test_failing_autotune_cache_falls_back_with_a_warning(monkeypatch):
    """An unreadable or unwritable on-disk autotune cache (Triton's cache_results) must not crash."""
    calls = []

    class Tuned:
        def __getitem__(self, grid):
            def run(**kwargs):
                raise OSError("cache file is corrupt or read-only")

            return run

    monkeypatch.setattr(launch, "run_kernel", lambda name, grid, config, args, is_traced=False: calls.append(config))
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "device_name", lambda index: "Test GPU")
    monkeypatch.setattr(tuning, "current_arch", lambda: 90)
    monkeypatch.setenv("TRITONJAC_AUTOTUNE", "1")
    args = {"SLOTS": 4, "WIDTH_PAD": 64, "PRECISION": "tf32"}
    with launch.use_autotuner(lambda name, kernel: Tuned()):
        with pytest.warns(RuntimeWarning, match="autotuning mlp_forward failed .*OSError"):
            launch.launch_autotuned("mlp_forward", lambda meta: (1,), args, "key", torch.device("cpu"))
    (config,) = calls
    assert config.kwargs["BLOCK_M"] * 4 >= 64 and config.num_warps in (4, 8)


@pytest.mark.parametrize("kernel", ["mlp_forward", "layer_forward"])
def test_pruning_through_triton_autotune(kernel, monkeypatch):
    """triton.autotune hands the launch's keyword arguments to the pruning function as **kwargs
    (named_args holds only positional ones): the real Autotuner must find SLOTS and friends."""
    monkeypatch.setattr(tuning, "current_arch", lambda: 90)
    tuned = launch.triton_autotuner(kernel, registry.KERNELS[kernel].jit_function())
    tuned.nargs = {}  # what Autotuner.run sets when every argument is passed by keyword
    kwargs = {"SLOTS": 4, "WIDTH_PAD": 64, "PRECISION": "tf32"}
    kept = tuned.prune_configs(kwargs)
    assert kept and all(c.kwargs["BLOCK_M"] * 4 >= 64 for c in kept)


def one_candidate_autotuning(monkeypatch, gpu_name: str) -> None:
    """The GPU's autotuned launch path, in the interpreter: the real triton.autotune wrapper with one
    candidate left after pruning (which it runs without timing, as the interpreter can)."""
    one = triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=2)
    monkeypatch.setattr(tuning, "network_configs", lambda: [one])
    monkeypatch.setattr(tuning, "current_arch", lambda: 80)  # 16-row blocks are allowed there
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "check_device", lambda x: None)
    monkeypatch.setattr(launch, "device_name", lambda index: gpu_name)
    monkeypatch.setenv("TRITONJAC_AUTOTUNE", "1")
    launch.reset_autotuners()


@pytest.mark.skipif(not tuning.interpreting(), reason="drives the interpreter through the autotuned path")
def test_autotuned_launch_path_runs(monkeypatch):
    """The launch path a GPU takes without a shipped table, through the real triton.autotune
    wrapper: with one candidate left after pruning the autotuner runs it without timing, which the
    interpreter can do. Checks the keys, the grid, the recorded choice and the result."""
    import tritonjac

    one_candidate_autotuning(monkeypatch, "Interpreter GPU")
    try:
        model = tritonjac.JacobianMLP(3, [32, 32], 3, "tanh", backend="triton")
        x = torch.randn(40, 3)
        with torch.no_grad():
            y, J = model(x)
            model.backend = "torch"
            y_ref, J_ref = model(x)
    finally:
        launch.reset_autotuners()
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(J, J_ref, atol=1e-5)
    (entry,) = tuning.tuned_table("Interpreter GPU")["mlp_forward"].values()
    assert entry == {"kwargs": {"BLOCK_M": 16}, "num_warps": 4, "num_stages": 2}


@pytest.mark.skipif(not tuning.interpreting(), reason="drives the interpreter through the autotuned path")
def test_depth_keys_the_tuned_choice(monkeypatch):
    """Networks of 2 and 8 hidden layers get a tuning each (the best block depends on the depth),
    in the autotuner's key and in the shipped table's."""
    import tritonjac

    one_candidate_autotuning(monkeypatch, "Depth GPU")
    try:
        for depth in (2, 8):
            with torch.no_grad():
                tritonjac.JacobianMLP(3, [32] * depth, 3, "tanh", backend="triton")(torch.randn(20, 3))
        assert (
            "num_hidden" in launch.triton_autotuner("mlp_forward", registry.KERNELS["mlp_forward"].jit_function()).keys
        )
    finally:
        launch.reset_autotuners()
    keys = sorted(tuning.tuned_table("Depth GPU")["mlp_forward"])
    assert len(keys) == 2 and keys[0].endswith(",depth=1") and keys[1].endswith(",depth=7")


def test_kernel_activation_ids_follow_the_registry():
    from tritonjac.activations import KERNEL_IDS
    from tritonjac.kernels import activations as kernel_activations

    assert sorted(KERNEL_IDS.values()) == list(range(len(KERNEL_IDS)))
    for name, i in KERNEL_IDS.items():
        assert getattr(kernel_activations, name.upper()).value == i


def test_traced_launches_reuse_what_autotuning_chose(monkeypatch):
    """Under torch.compile nothing can be timed: a traced launch takes what an eager launch's
    autotuning recorded for the same key, before falling back to the first fitting candidate."""
    calls = []

    chosen = triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=2)
    monkeypatch.setattr(launch, "run_kernel", lambda name, grid, config, args, is_traced=False: calls.append(config))
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "device_name", lambda index: "Traced GPU")
    monkeypatch.setattr(tuning, "current_arch", lambda: 90)
    monkeypatch.setenv("TRITONJAC_AUTOTUNE", "1")
    args = {"SLOTS": 4, "WIDTH_PAD": 64, "PRECISION": "tf32"}
    tuning.record_tuned("mlp_forward", "tuned key", "Traced GPU", chosen)
    launch.launch_autotuned("mlp_forward", lambda meta: (1,), args, "tuned key", torch.device("cpu"), True)
    launch.launch_autotuned("mlp_forward", lambda meta: (1,), args, "other key", torch.device("cpu"), True)
    first_fitting = tuning.prune_network_configs(tuning.network_configs(), args)[0]
    assert (calls[0].kwargs["BLOCK_M"], calls[0].num_warps) == (128, 8)
    assert (calls[1].kwargs["BLOCK_M"], calls[1].num_warps) == (
        first_fitting.kwargs["BLOCK_M"],
        first_fitting.num_warps,
    )


def _key_values(key: str) -> dict:
    def value(text):
        for convert in (int, float):
            try:
                return convert(text)
            except ValueError:
                pass
        return {"True": True, "False": False}.get(text, text)

    return {name: value(text) for name, _, text in (item.partition("=") for item in key.split(","))}


def test_shipped_tables_hold_candidates_that_fit():
    """Every configuration a shipped table holds (`tritonjac/configs/*.json`, written by autotuning
    on a real GPU) is one of the kernel's candidates that its pruning keeps for that launch key on a
    Hopper card, so `tests/test_aot.py` has compiled it without spills, and its key is one that
    launches still ask for."""
    paths = sorted(tuning.SHIPPED_DIR.glob("*.json"))
    assert paths, "the H200 table from the first GPU run is shipped"
    for path in paths:
        assert "H100" in path.name or "H200" in path.name, f"{path.name}: which arch prunes it?"
        table = json.loads(path.read_text())
        for kernel, entries in table.items():
            info = registry.KERNELS[kernel]
            assert info.autotune_key, f"{kernel} is launched with a fixed configuration"
            for key, entry in entries.items():
                config = tuning._config_from_json(entry)
                as_tuple = (config.kwargs, config.num_warps, config.num_stages)
                named = _key_values(key)
                if "d_in" in named:  # a narrow layer's launches ask for another precision's key
                    precision = layer_precision(named["PRECISION"], named["d_in"], named["d_out"])
                    assert precision == named["PRECISION"], f"{path.name} {kernel} {key}: no launch uses it"
                kept = [(c.kwargs, c.num_warps, c.num_stages) for c in info.prune(info.configs(), named, arch=90)]
                assert as_tuple in kept, f"{path.name} {kernel} {key}: {as_tuple} is not a candidate that fits"
