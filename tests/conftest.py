"""Fixtures (the shared helpers are in helpers.py): the interpreter switched on, seeds, precision,
guarded kernel buffers, the kernels a test ran.

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
from helpers import INTERPRETING, TRITON_DEVICE  # noqa: E402


def pytest_configure(config):
    """No silent skipping: on a machine without a GPU the kernel tests run in the interpreter, and a
    session that could run neither (TRITON_INTERPRET=0 set by hand) stops here instead."""
    if TRITON_DEVICE == "cpu" and not INTERPRETING:
        raise pytest.UsageError(
            "no CUDA GPU and TRITON_INTERPRET is off: every Triton kernel test would be skipped. "
            "Unset TRITON_INTERPRET (the tests then switch the interpreter on) or run on a GPU machine."
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _float32_matmul_precision(precision: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def tf32():
    """Matmul precision "high" (TF32 on GPUs, exact fp32 in the interpreter) for one test."""
    yield from _float32_matmul_precision("high")


@pytest.fixture
def highest_precision():
    """fp32-accurate dots (3xTF32 on a GPU) for one test: the fp32 figures of `helpers.TOLERANCE` apply."""
    yield from _float32_matmul_precision("highest")


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after a test, so each test compiles its own graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def guarded_buffers():
    """Every buffer the Triton launchers allocate (outputs and workspaces) is poisoned and fenced
    by guard rows; a guard row written or an output element left unwritten fails the test (checked
    at the end of its call, below)."""
    from tritonjac.triton_engine import guards, launch

    allocator = guards.GuardedAllocator()
    with launch.use_allocator(allocator):
        yield allocator


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """After the test function: the guard check, as part of the test (a failure, not an error)."""
    result = yield
    allocator = pyfuncitem.funcargs.get("guarded_buffers")
    if allocator is not None:
        allocator.check()
    return result


@pytest.fixture
def kernels_run():
    """The names of the kernels launched during a test (the launchers' observer seam)."""
    from tritonjac.triton_engine import launch

    names = []
    remove = launch.add_launch_observer(lambda name, args, config: names.append(name))
    yield names
    remove()
