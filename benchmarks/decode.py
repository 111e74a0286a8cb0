"""Decoding on the CPU: one query per sequence against a long KV cache, portattn against torch's SDPA.

    python benchmarks/decode.py --json benchmarks/results/cpu-decode.json

GQA (32 query heads over 8 K/V heads), D = 128, fp32 (``--dtype``), batch 1-8, keys 4k-32k. Timed in one process
with warm-up, median of 7 calls each, on the host clock: `portattn.attention` (numba), the same step
through `attention_with_kvcache` on a contiguous cache and on a paged one (pages of 16 keys), both read
in place by numba's decode kernel (backends/numba/decode.py), and torch's
`scaled_dot_product_attention(enable_gqa=True)` on (B, H, N, D) tensors, as an SDPA user holds them.
Every point is measured ``--rounds`` times, the methods interleaved in each round, and the best round's
median kept per method (the machine may be shared: a round that other work slowed is dropped).
``--dtype bfloat16`` or ``float16`` times 16-bit caches (torch's SDPA on the same dtype).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys

BATCHES = (1, 4, 8)
KEYS = (4096, 16384, 32768)
HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


def median_s(fn, reps: int = 7) -> float:
    from portattn.timing import time_callable

    return statistics.median(time_callable(fn, reps, warmup=2))


def point(torch, portattn, batch: int, keys: int, dtype: str = "float32", rounds: int = 2) -> dict:
    dt = getattr(torch, dtype)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, dtype=dt)
    k, v = (torch.randn(batch, KV_HEADS, keys, HEAD_DIM, dtype=dt) for _ in range(2))
    # the same keys as flash-attn's caches hold them: (B, N, H_kv, D), and as pages of PAGE keys
    k_cache, v_cache = (x.transpose(1, 2).contiguous() for x in (k, v))
    pages = batch * (keys // PAGE)
    table = torch.arange(pages, dtype=torch.int32).reshape(batch, keys // PAGE)
    k_pages, v_pages = (x.reshape(pages, PAGE, KV_HEADS, HEAD_DIM) for x in (k_cache, v_cache))
    lengths = torch.full((batch,), keys, dtype=torch.int32)
    q_bnhd = q.transpose(1, 2).contiguous()
    methods = {
        "portattn attention (numba)": lambda: portattn.attention(q, k, v, backend="numba"),
        "portattn kvcache contiguous (numba)": lambda: portattn.attention_with_kvcache(q_bnhd, k_cache, v_cache, lengths,
                                                                                       backend="numba"),
        "portattn kvcache paged 16 (numba)": lambda: portattn.attention_with_kvcache(q_bnhd, k_pages, v_pages, lengths,
                                                                                     table, backend="numba"),
        "torch sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    }
    seconds = {name: median_s(fn) for name, fn in methods.items()}
    for _ in range(rounds - 1):  # interleaved again: the best round per method
        seconds = {name: min(seconds[name], median_s(fn)) for name, fn in methods.items()}
    plan = portattn.api.prepare(q, k, v, backend="numba").plan
    decode_plan = portattn.kvcache.explain_with_kvcache(q_bnhd, k_pages, v_pages, lengths, table, backend="numba").plan
    return {"batch": batch, "keys": keys, "ms": {name: s * 1e3 for name, s in seconds.items()},
            "vs torch": {name: seconds["torch sdpa"] / s for name, s in seconds.items() if name != "torch sdpa"},
            "plan": plan.summary(), "decode plan": decode_plan.summary()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    import portattn

    record = {"device": portattn.devices.probe.probe_cpu().name, "threads": torch.get_num_threads(),
              "date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
              "versions": {"portattn": portattn.__version__, "torch": torch.__version__,
                           "python": platform.python_version()},
              "shape": f"q (B, {HEADS}, 1, {HEAD_DIM}), k/v (B, {KV_HEADS}, N, {HEAD_DIM}), {args.dtype}", "points": []}
    for batch in BATCHES:
        for keys in KEYS:
            row = point(torch, portattn, batch, keys, args.dtype, args.rounds)
            record["points"].append(row)
            shown = ", ".join(f"{name} {ms:.2f} ms" for name, ms in row["ms"].items())
            print(f"B={batch} N={keys}: {shown}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
