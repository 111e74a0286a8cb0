"""Fixtures for the pytest-benchmark suite: shared inputs per shape, and the device in the record.

Run with ``pytest benchmarks --benchmark-only --benchmark-save=cpu`` (the default ``pytest`` run
collects only ``tests/``); compare saved runs with ``pytest-benchmark compare``.
"""

from __future__ import annotations

import pytest

from portattn import bench


@pytest.fixture(scope="session")
def inputs_for():
    """``inputs_for(problem)``: (q, k, v, grad_out) for a shape, made once and shared by every backend."""
    made = {}

    def get(problem: bench.Problem):
        if problem not in made:
            made.clear()  # one shape's arrays at a time: the suite runs shape by shape
            made[problem] = bench.make_inputs(problem)
        return made[problem]

    return get


def pytest_benchmark_update_machine_info(config, machine_info):
    """Store portattn's view of the device and the versions next to pytest-benchmark's own."""
    from portattn.tiling.probe import probe_cpu

    machine_info["portattn_device"] = probe_cpu().describe()
    machine_info["portattn_versions"] = bench.environment()
