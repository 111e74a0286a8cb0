"""Options and fixtures of the pytest-benchmark suite: the device, shared inputs, the machine record.

Run with ``pytest benchmarks --benchmark-only --benchmark-save=<device>`` (the default ``pytest`` run
collects only ``tests/``); compare saved runs with ``pytest-benchmark compare --group-by=group``.
``--bench-device`` picks the device (default: cuda:0 when torch sees a GPU, else cpu);
``--bench-skip`` leaves contenders out (e.g. ``--bench-skip torch-flex`` to spare torch.compile).
"""

from __future__ import annotations

import pytest

from portattn import bench


def pytest_addoption(parser):
    group = parser.getgroup("portattn benchmarks")
    group.addoption("--bench-device", default=None, help="cpu, cuda[:N] (default: cuda:0 when torch sees a GPU, else cpu)")
    group.addoption("--bench-skip", nargs="+", default=[], metavar="NAME", help="backends or peers not to time")


@pytest.fixture(scope="session")
def device(request) -> str:
    return bench.default_device(request.config.getoption("--bench-device"))


@pytest.fixture(scope="session")
def inputs_for(device):
    """``inputs_for(problem)``: the problem's ``bench.Inputs``, drawn once and shared by every contender."""
    made = {}

    def get(problem: bench.Problem) -> bench.Inputs:
        if problem not in made:
            made.clear()  # one shape's arrays at a time: the suite runs shape by shape
            if device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
            made[problem] = bench.Inputs(problem, device)
        return made[problem]

    return get


def pytest_benchmark_update_machine_info(config, machine_info):
    """Store portattn's view of the device and the versions next to pytest-benchmark's own."""
    from portattn.devices import device_named

    label = bench.default_device(config.getoption("--bench-device"))
    machine_info["portattn_device"] = f"{label}: {device_named(label).describe()}"
    machine_info["portattn_versions"] = bench.environment()
