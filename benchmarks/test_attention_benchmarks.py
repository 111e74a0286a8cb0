"""pytest-benchmark timings of the usable portattn backends against the peers on this device.

One device per run (``--bench-device``; default cuda:0 when torch sees a GPU, else cpu), timed in its
default dtype (fp32 on CPUs, fp16 on GPUs, recorded in ``extra_info``). Names and groups leave the
device and dtype out -- ``test_attention[triton-1x8x2048x64-full-fwd]`` in group
``1x8x2048x64-full-fwd`` -- so that a CPU run and a GPU run saved with ``--benchmark-save`` line up
shape by shape in ``pytest-benchmark compare --group-by=group``. The shapes both devices run are
``COMMON``; GPUs also run flash-attention's grid points ``GPU_ONLY`` (B·N = 16384, H = 2048/D).

Each round is one call followed by the device's sync (``torch.cuda.synchronize``, OpenCL's
``queue.finish``), timed by pytest-benchmark's host clock. ``extra_info`` keeps backend, role, device,
dtype, GFLOP/s (flash-attention's count: 4·B·H·N²·D, halved when causal, ×3.5 for fwd+bwd) and the
tile plan. ``reference`` is left out: it materializes the N x N scores.
"""

from __future__ import annotations

import os

import pytest

from portattn import bench
from portattn.spec import default_dtype

pytest.importorskip("pytest_benchmark", reason="the benchmark suite needs pytest-benchmark")

COMMON = [(1, 8, n, d, causal, "fwd") for n in (1024, 2048) for d in (64, 128) for causal in (False, True)]
GPU_ONLY = [(*bench.flash_shape(n, d), n, d, False, mode) for mode in ("fwd", "fwd+bwd") for d in (64, 128) for n in (2048, 4096, 8192)]
ROUNDS = {"cpu": 5, "cuda": 20}


def _problems(device: str) -> list[bench.Problem]:
    kind = device.split(":", 1)[0]
    dtype = default_dtype(kind)
    shapes = COMMON + (GPU_ONLY if kind == "cuda" else [])
    return [bench.Problem(b, h, n, d, causal, dtype, mode) for b, h, n, d, causal, mode in shapes]


def _runners(device: str, skip) -> list[tuple[str, str]]:
    backends = [name for name in bench.default_backends(device) if name != "reference"]
    return [(role, name) for role, names in (("portattn", backends), ("peer", bench.peer_names(device)))
            for name in names if name not in skip]


def pytest_generate_tests(metafunc):
    if {"problem", "runner"} <= set(metafunc.fixturenames):
        device = bench.default_device(metafunc.config.getoption("--bench-device"))
        runners = _runners(device, metafunc.config.getoption("--bench-skip"))
        metafunc.parametrize("problem", _problems(device), ids=bench.Problem.label)
        metafunc.parametrize("runner", runners, ids=[name for _, name in runners])


@pytest.fixture(scope="module", autouse=True)
def flex_compiled(request, device):
    """On CUDA, compile FlexAttention for every shape in parallel processes first (inductor's on-disk
    caches then serve the tests), as ``portattn bench`` does: one by one it takes minutes."""
    if device.startswith("cuda") and "torch-flex" in [name for _, name in _runners(device, request.config.getoption("--bench-skip"))]:
        bench.warm_flex(_problems(device), device, workers=min(8, os.cpu_count() or 1))


def test_attention(benchmark, device, inputs_for, runner, problem):
    role, name = runner
    try:
        timed = bench.setup(name, role, problem, inputs_for(problem))
    except Exception as error:  # noqa: BLE001 - a backend refusing a shape is a skip with its reason
        pytest.skip(f"{name} cannot run {problem.label()}: {bench.reason(error)}")
    sync = timed.sync or (lambda: None)

    def one_call():
        timed.fn()
        sync()

    benchmark.group = problem.label()
    benchmark.extra_info.update(backend=name, role=role, device=device, dtype=problem.dtype, plan=timed.plan,
                                flops=problem.flops)
    benchmark.pedantic(one_call, rounds=ROUNDS.get(device.split(":", 1)[0], 5), warmup_rounds=2, iterations=1)
    benchmark.extra_info["gflops"] = problem.flops / benchmark.stats.stats.median / 1e9


# The small-call host time: a (1, 8, 128, 64) causal forward, where a GPU kernel takes a few us and the
# per-call glue (the call cache, dispatch, array conversions, the launch) is what a call costs. A round is
# SMALL_CALLS calls back to back then the device's sync; extra_info keeps the per-call time in us.
SMALL_CALLS = 200
SMALL_PATHS = ["eager", "torch-op", "compiled", "sdpa"]


@pytest.mark.parametrize("path", SMALL_PATHS)
def test_small_call(benchmark, device, path):
    """``eager``: ``portattn.attention`` (auto backend); ``torch-op``: the same call through the custom op
    ``portattn::attention_forward`` (what traced code runs, ``portattn/torch_ops.py``); ``compiled``:
    ``portattn.attention`` under ``torch.compile(fullgraph=True)``; ``sdpa``: torch's
    ``scaled_dot_product_attention``, the peer."""
    import torch

    from portattn import attention, torch_ops

    problem = bench.Problem(1, 8, 128, 64, True, default_dtype(device.split(":", 1)[0]), "fwd")
    q, k, v, _ = (torch.as_tensor(x, device=device) for x in bench.make_inputs(problem, device))
    fn = {
        "eager": lambda: attention(q, k, v, causal=True),
        "torch-op": lambda: torch_ops.attention(q, k, v, causal=True),
        "compiled": torch.compile(lambda: attention(q, k, v, causal=True), fullgraph=True),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    }[path]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def calls():
        for _ in range(SMALL_CALLS):
            fn()
        sync()

    benchmark.group = f"small-call-{problem.label()}"
    benchmark.extra_info.update(path=path, device=device, dtype=problem.dtype, calls_per_round=SMALL_CALLS)
    benchmark.pedantic(calls, rounds=10, warmup_rounds=2, iterations=1)
    benchmark.extra_info["per_call_us"] = benchmark.stats.stats.median / SMALL_CALLS * 1e6
