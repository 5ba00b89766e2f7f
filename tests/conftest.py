"""Fixtures (the shared helpers are in helpers.py): the interpreter switched on, seeds, precision,
poisoned outputs, the kernels a test ran.

Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on before
triton is imported: that happens here, first thing (unless TRITON_INTERPRET is already set).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU: one fixed configuration per kernel instead of autotuning every shape the tests use
# (test_triton_gpu.py turns tuning back on where it tests it).
os.environ.setdefault("TRITONJAC_AUTOTUNE", "0")

import pytest  # noqa: E402

import tritonjac  # noqa: E402, F401  (after TRITON_INTERPRET is set)
from helpers import INTERPRETING, TRITON_DEVICE  # noqa: E402, F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tf32():
    """Matmul precision "high" (TF32 on GPUs, exact fp32 in the interpreter) for one test."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after a test, so each test compiles its own graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def poisoned_outputs():
    """Every tensor the Triton launchers allocate starts as NaN, so an unwritten element fails."""
    from tritonjac.triton_engine import launch

    with launch.use_allocator(lambda like, *shape: like.new_full(shape, float("nan"))):
        yield


@pytest.fixture
def kernels_run():
    """The names of the kernels launched during a test (the launchers' observer seam)."""
    from tritonjac.triton_engine import launch

    names = []
    remove = launch.add_launch_observer(lambda name, args, config: names.append(name))
    yield names
    remove()
