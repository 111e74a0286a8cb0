"""CPU timings of the usable portattn backends against torch's SDPA flash kernel, per shape.

Each shape is its own ``benchmark.group`` (e.g. ``fp32-causal-1x8x2048x64``) so the backends and
the peer line up in one table, and ``extra_info`` keeps GFLOP/s (flash-attention's count: 4·B·H·N²·D,
halved when causal) and the tile plan. ``reference`` is left out: it materializes the N x N scores.
"""

from __future__ import annotations

import pytest

from portattn import bench

pytest.importorskip("pytest_benchmark", reason="the benchmark suite needs pytest-benchmark")

DEVICE = "cpu"
ROUNDS = 5
SHAPES = [
    bench.Problem(batch=1, heads=8, seqlen=n, head_dim=d, causal=causal, dtype="float32", mode="fwd")
    for n in (1024, 2048)
    for d in (64, 128)
    for causal in (False, True)
]
RUNNERS = [("portattn", name) for name in bench.default_backends(DEVICE) if name != "reference"] + [
    ("peer", name) for name in bench.peer_names(DEVICE)
]


def _id(value) -> str:
    return value.spec().label() if isinstance(value, bench.Problem) else value[1]


@pytest.mark.parametrize("problem", SHAPES, ids=_id)
@pytest.mark.parametrize("runner", RUNNERS, ids=_id)
def test_forward(benchmark, inputs_for, runner, problem):
    role, name = runner
    inputs = inputs_for(problem)
    if role == "portattn":
        fn, plan = bench.portattn_call(name, problem, inputs)
    else:
        fn, plan = bench.peer_call(name, problem, inputs, DEVICE), None
    benchmark.group = problem.spec().label()
    benchmark.extra_info.update(backend=name, role=role, plan=plan, flops=problem.flops)
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["gflops"] = problem.flops / benchmark.stats.stats.median / 1e9
