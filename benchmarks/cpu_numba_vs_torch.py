"""portattn's numba backend against torch's CPU scaled_dot_product_attention, and this CPU's FMA peak.

Times ``portattn.attention(..., backend="numba")`` and ``torch.nn.functional.scaled_dot_product_attention``
on the same torch CPU tensors, (1, 8, N, D), in one process: a first call and one warm-up each, then
``--reps`` rounds in which the two take turns (a slow spell of a shared machine hits both), medians
kept. fwd+bwd is one forward and ``backward`` of a fixed grad. FLOPs as flash-attention counts them
(forward 4 B H N^2 D, halved when causal; fwd+bwd 3.5x). The peak: a numba register-blocked FMA loop
(8 independent 16-lane accumulators per thread) on 1 and all threads, a 2048^3 sgemm through SciPy's
OpenBLAS and through torch (MKL, which the kernels call where torch is loaded), and torch's bf16 matmul.

    python benchmarks/cpu_numba_vs_torch.py --json benchmarks/results/cpu-numba-vs-torch-<date>.json

Run it with another tree first on PYTHONPATH to time that tree's portattn (the record names the file).
Timings are never asserted in tests.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def fma_peak(threads: int, steps: int = 20_000_000) -> float:
    """GFLOP/s of a register-blocked FMA loop on ``threads`` numba threads (best of 5). In LLVM's default
    vector width: 256 bits on Intel's AVX-512 cores, so half their 512-bit peak there (the 512-bit build of
    this loop, as the kernels' ``wide_vectors`` makes it, reads twice the possible rate: LLVM shortcuts it).
    The sgemm rates below are the practical peak."""
    import numba
    from numba import njit, prange

    @njit(fastmath=True, inline="always")
    def chains(n):
        acc = np.zeros(128, np.float32)  # 8 zmm registers: enough independent FMAs to hide the latency
        x, y = np.float32(0.999999), np.float32(1e-7)
        for _ in range(n):
            for lane in range(128):
                acc[lane] = acc[lane] * x + y
        return acc.sum()

    @njit(fastmath=True, parallel=True)
    def run(n, t):
        out = np.zeros(t, np.float32)
        for i in prange(t):
            out[i] = chains(n)
        return out.sum()

    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        run(10, threads)
        best = min(_timed(lambda: run(steps, threads)) for _ in range(5))
    finally:
        numba.set_num_threads(previous)
    return 2 * 128 * steps * threads / best / 1e9


def sgemm_rates(n: int = 2048) -> dict:
    import scipy.linalg.blas as scipy_blas
    import torch
    from threadpoolctl import threadpool_limits

    a, b = (np.random.default_rng(0).random((n, n), dtype=np.float32) for _ in range(2))
    rates = {}
    for threads in (1, os.cpu_count() or 1):
        with threadpool_limits(threads, user_api="blas"):
            scipy_blas.sgemm(1.0, a, b)
            rates[f"scipy_openblas_{threads}t"] = 2 * n ** 3 / min(_timed(lambda: scipy_blas.sgemm(1.0, a, b)) for _ in range(5)) / 1e9
        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ta @ tb
        rates[f"torch_mkl_{threads}t"] = 2 * n ** 3 / min(_timed(lambda: ta @ tb) for _ in range(5)) / 1e9
        ha, hb = ta.bfloat16(), tb.bfloat16()  # bf16 x bf16 -> float32 sums: AMX / AVX512-BF16 where present
        ha @ hb
        rates[f"torch_bf16_{threads}t"] = 2 * n ** 3 / min(_timed(lambda: ha @ hb) for _ in range(5)) / 1e9
    return rates


def numba_blas() -> str:
    """The BLAS the timed tree's kernels call (trees before blas.py: SciPy's OpenBLAS, bfloat16 widened)."""
    try:
        from portattn.backends.numba import blas
    except ImportError:
        return "openblas (scipy), before blas.py"
    return blas.chosen().name


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_problem(n: int, d: int, causal: bool, mode: str, dtype: str, reps: int) -> dict:
    import torch
    import portattn

    g = torch.Generator().manual_seed(0)
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(1, 8, n, d, generator=g, dtype=getattr(torch, dtype)).requires_grad_(grad) for _ in range(3))
    do = torch.randn(1, 8, n, d, generator=g, dtype=getattr(torch, dtype))

    def call(fn):
        def run():
            out = fn(q, k, v)
            if grad:
                out.backward(do)
        return run

    contenders = {
        "numba": call(lambda q, k, v: portattn.attention(q, k, v, causal=causal, backend="numba")),
        "torch-sdpa": call(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)),
    }
    times = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
        fn()
    for _ in range(reps):
        for name, fn in contenders.items():
            for x in (q, k, v):
                x.grad = None
            times[name].append(_timed(fn))
    flops = 4 * 8 * n * n * d / (2 if causal else 1) * (3.5 if grad else 1.0)
    median = {name: float(np.median(t)) for name, t in times.items()}
    plan = portattn.plan(seqlen_q=n, head_dim=d, heads=8, dtype="float32", causal=causal, device="cpu")
    return {
        "N": n, "D": d, "causal": causal, "mode": mode, "dtype": dtype,
        "ms": {name: t * 1e3 for name, t in median.items()},
        "gflops": {name: flops / t / 1e9 for name, t in median.items()},
        "spread_ms": {name: [min(t) * 1e3, max(t) * 1e3] for name, t in times.items()},
        "numba_over_torch": median["torch-sdpa"] / median["numba"],
        "plan": f"{plan.block_q}x{plan.block_k}",
        "loadavg_1min_after": os.getloadavg()[0],  # above the core count: something else was running
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlen", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--bwd-seqlen", type=int, nargs="*", default=[512, 1024, 2048, 4096], help="none: no fwd+bwd")
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-peak", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import numba
    import torch
    import portattn

    torch.set_num_threads(os.cpu_count() or 1)
    record = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                     "numba": numba.__version__, "portattn_file": portattn.__file__, "numba_blas": numba_blas()},
        "method": "medians of --reps interleaved rounds after a first call and a warm-up; host clock; (1, 8, N, D)",
        "results": [],
    }
    if not args.no_peak:
        record["peak"] = {"fma_loop_1t": fma_peak(1), f"fma_loop_{os.cpu_count()}t": fma_peak(os.cpu_count() or 1),
                          **sgemm_rates()}
        print(json.dumps(record["peak"]), flush=True)
    grid = [(n, d, c, "fwd", dt) for dt in args.dtypes for d in args.head_dim for c in (False, True) for n in args.seqlen]
    grid += [(n, d, c, "fwd+bwd", dt) for dt in args.dtypes for d in args.head_dim for c in (False, True) for n in args.bwd_seqlen]
    for n, d, c, mode, dt in grid:
        row = time_problem(n, d, c, mode, dt, args.reps)
        record["results"].append(row)
        print(f"{mode:7s} {dt:8s} N={n:5d} D={d:3d} causal={int(c)} plan {row['plan']:8s} "
              f"numba {row['ms']['numba']:8.1f} ms {row['gflops']['numba']:6.1f} GF  "
              f"torch {row['ms']['torch-sdpa']:8.1f} ms {row['gflops']['torch-sdpa']:6.1f} GF  "
              f"{row['numba_over_torch']:.2f}x  load {row['loadavg_1min_after']:.1f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
