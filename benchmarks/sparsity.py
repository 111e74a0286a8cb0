"""Skipped work is saved time: block-sparse and sliding-window attention against the dense run, on one
backend, in one process.

At N = 8192 a block mask keeps 25% of its (128 x 128) blocks -- the same number in every row of
blocks, at random places -- and a window (left = right = N/8) leaves each query about a quarter
of the keys; both should run at least 2.5x faster than the dense call on the same backend (the
ideal is 4x, minus the per-row and pipeline overheads). Forward, and forward+backward.

    python benchmarks/sparsity.py --json out.json                        # CUDA: triton; else numba on the CPU
    python benchmarks/sparsity.py --backend numba --shape 1 8 8192 64    # the CPU run of the issue

Timing: ``triton.testing.do_bench`` (CUDA events, medians) on a GPU; on the CPU the median of
``--repeats`` wall-clock runs after one warm-up call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys

import torch

import portattn
from portattn.timing import time_callable

KEPT = 0.25


def block_mask(batch, heads, seqlen, block, kept, device):
    """Exactly ``kept`` of the blocks in every row of blocks, at random columns."""
    blocks = -(-seqlen // block)
    per_row = max(1, round(kept * blocks))
    gen = torch.Generator().manual_seed(0)
    order = torch.rand(batch, heads, blocks, blocks, generator=gen).argsort(dim=-1)
    return (order < per_row).to(device)


def timer(device):
    if device == "cuda":
        import triton

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3

    def cpu(fn, repeats=3):
        return statistics.median(time_callable(fn, repeats, warmup=1))

    return cpu


def run(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = args.backend or ("triton" if device == "cuda" else "numba")
    dtype = getattr(torch, args.dtype or ("float16" if device == "cuda" else "float32"))
    b, h, n, d = args.shape
    torch.manual_seed(0)
    leaves = [torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(b, h, n, d, device=device, dtype=dtype)
    variants = {
        "dense": {},
        "block_sparse_25": {"block_mask": block_mask(b, h, n, 128, KEPT, device), "block_size": (128, 128)},
        "window_25": {"window": (n // 8, n // 8)},
    }
    measure = timer(device)
    rows, refused = [], {}
    for mode in args.modes:
        for name, kwargs in variants.items():
            call = lambda kw=kwargs: portattn.attention(*leaves, backend=backend, **kw)  # noqa: E731
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        seconds = measure(call)
                else:
                    seconds = measure(lambda call=call: torch.autograd.grad(call(), leaves, grad_out))
            except ValueError as error:  # a feature the backend refuses, with its reason: recorded, not timed
                refused[name] = str(error).splitlines()[1].strip(" -") if "\n" in str(error) else str(error)
                print(f"{backend} {mode} {name}: refused ({refused[name]})", flush=True)
                continue
            rows.append({"mode": mode, "variant": name, "seconds": seconds})
            print(f"{backend} {mode} {name}: {seconds * 1e3:.2f} ms", flush=True)
    for row in rows:
        dense = next(r["seconds"] for r in rows if r["mode"] == row["mode"] and r["variant"] == "dense")
        row["speedup_vs_dense"] = dense / row["seconds"]
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine(),
        "backend": backend,
        "shape": {"batch": b, "heads": h, "seqlen": n, "head_dim": d}, "dtype": str(dtype).removeprefix("torch."),
        "kept": KEPT, "block_size": [128, 128], "window": [n // 8, n // 8],
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "portattn": portattn.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "timing": "triton.testing.do_bench median (CUDA)" if device == "cuda" else "median of 3 runs after a warm-up",
        "results": rows,
        "refused": refused,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=None, help="default: triton on CUDA, numba on the CPU")
    parser.add_argument("--shape", type=int, nargs=4, default=[2, 16, 8192, 64], metavar=("B", "H", "N", "D"))
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on the CPU")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=("fwd", "fwd+bwd"))
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    record = run(args)
    for row in record["results"]:
        print(f"{row['mode']:8s} {row['variant']:16s} {row['seconds'] * 1e3:9.2f} ms  {row['speedup_vs_dense']:.2f}x dense")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
