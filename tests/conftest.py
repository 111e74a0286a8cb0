"""Test-session setup shared by every suite.

Without a CUDA device, Triton's kernels run in its CPU interpreter, so the conformance suite checks
them on every push. ``triton.jit`` reads ``TRITON_INTERPRET`` when the kernels are defined, so it is
set here, before any test imports them; a GPU machine leaves it unset and runs them natively.

``--full-grid`` runs the conformance suite's whole grid on the CPU emulations (Triton's interpreter,
OpenCL on a CPU device such as PoCL) too; without it they run a trimmed grid
(``tests/conformance/conftest.py``). Backends that run natively always run the whole grid. Tests marked
``full_grid`` (a few whose OpenCL builds take tens of seconds on PoCL) run only with it.
"""

from __future__ import annotations

import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--full-grid", action="store_true", default=False,
        help="run every conformance case on the slow CPU emulations too (Triton's interpreter, OpenCL on a "
             "CPU device such as PoCL), not only the default's trimmed grid; natively run backends always run all")



def pytest_configure(config):
    config.addinivalue_line(
        "markers", "full_grid: a case whose kernel builds take tens of seconds on the CPU emulations; runs only with "
                   "--full-grid (ci/gpu.sh passes it), its siblings cover the same code paths by default")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full-grid"):
        return
    for item in items:
        if item.get_closest_marker("full_grid"):
            item.add_marker(pytest.mark.skip(
                reason="kept to pytest --full-grid: its kernel builds cost tens of seconds on a CPU device, and the "
                       "default run keeps its siblings, which reach the same code paths"))

@pytest.fixture(scope="session")
def usable_backend():
    """``usable_backend(name)``: the registered backend, or a skip that gives its own reasons for not
    being usable on this machine."""
    from portattn.backends import registry

    def get(name: str):
        backend = registry()[name]
        if not backend.usable:
            pytest.skip(f"{name} is not usable here: " + "; ".join(backend.unavailable_reasons()))
        return backend

    return get


@pytest.fixture
def split_decoding(monkeypatch):
    """Decode plans split the key loop wherever D2 would (the decode planner's D6 -- a merge must pay for
    itself -- off), so that the tests' short caches run the split kernels and their merge. The caches that
    hold plans are emptied before and after."""
    from portattn.tiling import decode

    monkeypatch.setattr(decode, "GPU_MERGE_HOST_S", float("-inf"))
    _forget_plans()
    yield
    _forget_plans()


def _forget_plans():
    from portattn import api, kvcache
    from portattn.backends import base
    from portattn.tiling import decode

    decode.plan_decode.cache_clear()
    kvcache._decode_plan.cache_clear()
    api._PREPARED.clear()
    kvcache._CHECKED.clear()
    base._forward_decode_plan.cache_clear()
