"""The ``backend`` fixture: every registered backend; one not usable here skips with its own reasons.

The CPU emulations -- Triton's kernels in its interpreter (TRITON_INTERPRET=1), OpenCL kernels on a
CPU device (PoCL) -- take ~85% of the full grid's time on a CPU machine (27 minutes cold on 2 cores:
the interpreter runs each block operation in numpy, PoCL builds a program per dtype, head dim and
feature set). There, by default, each case shape runs in one of its three dtypes
(``cases.EMULATOR_DEFAULT``, ``features.FEATURE_EMULATOR_DEFAULT``, ``features.VARLEN_EMULATOR_DEFAULT``
say which and why), and the rest skip saying so; ``pytest --full-grid`` runs them all. Backends that
run natively (numba, reference; triton, cupy and opencl on a GPU) always run the whole grid.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from portattn.backends import registry

from .cases import EMULATOR_DEFAULT
from .features import FEATURE_EMULATOR_DEFAULT, VARLEN_EMULATOR_DEFAULT


@pytest.fixture(params=list(registry()))
def backend(request, usable_backend):
    return usable_backend(request.param)


@functools.lru_cache(maxsize=None)
def emulation(name: str) -> str | None:
    """How backend ``name`` runs its kernels emulated on this machine's CPU, or None: natively, or
    not usable here at all (then its tests skip with its own reasons)."""
    backend = registry()[name]
    if not backend.usable:
        return None
    if name == "triton":
        from portattn.backends import triton as triton_gpu

        return "in Triton's CPU interpreter (TRITON_INTERPRET=1)" if triton_gpu.interpreting() else None
    if name == "opencl":
        import pyopencl as cl

        from portattn.backends.opencl import runtime as opencl_runtime

        try:
            device = opencl_runtime.device_of(opencl_runtime.choose())
        except ValueError:  # a bad $PORTATTN_OPENCL_DEVICE: the tests themselves report it
            return None
        if device.type & cl.device_type.CPU:
            return f"on the OpenCL CPU device {device.name.strip()!r} ({device.platform.name.strip()})"
    return None


def _in_emulator_default(test: str, params: dict) -> bool:
    if test in ("test_forward", "test_backward"):
        return params["case"].id in EMULATOR_DEFAULT
    if test in ("test_feature_forward", "test_feature_backward"):
        return params["case"].id in FEATURE_EMULATOR_DEFAULT
    if test == "test_varlen":
        return (params["causal"], params["dtype"], params["align"]) in VARLEN_EMULATOR_DEFAULT
    return True


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full-grid"):
        return
    here = Path(__file__).parent
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.path.parent != here or "backend" not in params or _in_emulator_default(item.originalname, params):
            continue
        how = emulation(params["backend"])
        if how is not None:
            item.add_marker(pytest.mark.skip(
                reason=f"{params['backend']} runs {how}, so the default run trims its grid there (mostly to one "
                       "dtype per case shape: tests/conformance/cases.py, features.py say which and why); "
                       "pytest --full-grid runs this"))
