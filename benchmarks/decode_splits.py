"""How many key splits a decoding step should have, measured: the triton decode kernel run through
``attention`` (one query per sequence, 32 query heads over 8 KV heads, D = 128, fp16) with each split
count forced, against the decode plan's choice (its rules D2 and D6, ``portattn/tiling/decode.py``) and
SDPA, in one process.

Two times per point: the GPU's (``triton.testing.do_bench``, median: what a GPU-bound step costs) and the
per-call time of back-to-back calls (host and GPU together: what a batch-1 model step costs, where the
host is the bound). D6 keeps one split where the merge's launch costs more than splitting saves.
``--tiles`` also sweeps the kernel's key tile, warps and stages at batch 1 on long caches (the plan's
splits and twice as many), against the bytes a step must read: the fraction of the memory bandwidth each reaches.

    python benchmarks/decode_splits.py --tiles --json decode-splits.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import platform
import sys
import time

BATCHES = (1, 8)
KEYS = (512, 1024, 2048, 4096, 8192, 32768)
SPLITS = (1, 2, 4, 8, 16, 32, 64)
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def per_call_us(fn, sync, calls: int = 300, runs: int = 5) -> float:
    """Median over ``runs`` of back-to-back calls' wall time per call (synchronized once before and after)."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls)
    return sorted(times)[runs // 2] * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--keys", type=int, nargs="+", default=list(KEYS))
    parser.add_argument("--tiles", action="store_true", help="also sweep block_k, warps, stages at batch 1")
    parser.add_argument("--tile-keys", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--tiles-only", action="store_true", help="the tile sweep alone (no split counts)")
    args = parser.parse_args(argv)
    import torch
    import triton
    import triton.testing
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    import portattn
    from portattn import api
    from portattn.backends.triton import decode
    from portattn.extras import NONE

    sync = torch.cuda.synchronize
    record = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
              "command": " ".join(["python"] + sys.argv),
              "versions": {"torch": torch.__version__, "triton": triton.__version__, "portattn": portattn.__version__,
                           "python": platform.python_version(), "cuda": torch.version.cuda},
              "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float16", "queries": 1},
              "points": []}
    for batch in [] if args.tiles_only else args.batches:
        for keys in args.keys:
            q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.float16)
            k, v = (torch.randn(batch, KV_HEADS, keys, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(2))
            call = api.prepare(q, k, v, backend="triton")
            planned = call.backend.forward_decode_plan(call.spec)
            point = {"batch": batch, "keys": keys, "planned_splits": planned.key_splits, "splits": {},
                     "sdpa": {"gpu_us": triton.testing.do_bench(lambda: sdpa(q, k, v, enable_gqa=True),
                                                                return_mode="median") * 1e3,
                              "per_call_us": per_call_us(lambda: sdpa(q, k, v, enable_gqa=True), sync)}}
            most = -(-keys // planned.keys_per_split)
            for splits in [s for s in SPLITS if s <= most]:
                plan = dataclasses.replace(planned, key_splits=splits)
                run = lambda plan=plan: decode.attention(q, k, v, call.spec, plan, NONE, False)  # noqa: E731
                point["splits"][splits] = {"gpu_us": triton.testing.do_bench(run, return_mode="median") * 1e3,
                                           "per_call_us": per_call_us(run, sync)}
            best_gpu = min(point["splits"], key=lambda s: point["splits"][s]["gpu_us"])
            best_call = min(point["splits"], key=lambda s: point["splits"][s]["per_call_us"])
            point.update(best_gpu_splits=best_gpu, best_per_call_splits=best_call)
            record["points"].append(point)
            print(json.dumps(point), flush=True)
    if args.tiles or args.tiles_only:
        record["tiles"] = [sweep_tiles(torch, triton, keys, sdpa) for keys in args.tile_keys]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


def sweep_tiles(torch, triton, keys: int, sdpa) -> dict:
    """GPU time of a batch-1 step over ``keys`` keys for each (block_k, warps, stages) at the plan's splits and twice;
    achieved bandwidth = the plan's bytes moved / time."""
    from portattn import api
    from portattn.backends.triton import decode
    from portattn.extras import NONE
    from portattn.tiling.decode import GPU_MAX_SPLITS

    q = torch.randn(1, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(1, KV_HEADS, keys, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(2))
    call = api.prepare(q, k, v, backend="triton")
    planned = call.backend.forward_decode_plan(call.spec)
    result = {"keys": keys, "planned": [planned.block_k, planned.warps, planned.stages, planned.key_splits],
              "bytes_moved": planned.bytes_moved, "configs": [],
              "sdpa_gpu_us": triton.testing.do_bench(lambda: sdpa(q, k, v, enable_gqa=True), return_mode="median") * 1e3}
    # the plan's splits and twice as many (more programs in flight per SM), at most the kernels' limit
    for splits in sorted({planned.key_splits, min(2 * planned.key_splits, GPU_MAX_SPLITS)}):
        for block_k, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3, 4)):
            keys_per_split = -(-planned.keys_per_split // block_k) * block_k
            plan = dataclasses.replace(planned, block_k=block_k, warps=warps, stages=stages, key_splits=splits,
                                       keys_per_split=keys_per_split)
            run = lambda plan=plan: decode.attention(q, k, v, call.spec, plan, NONE, False)  # noqa: E731
            config = {"block_k": block_k, "warps": warps, "stages": stages, "splits": splits}
            try:
                us = triton.testing.do_bench(run, return_mode="median") * 1e3
            except Exception as error:  # a configuration out of shared memory or registers
                result["configs"].append({**config, "error": str(error).splitlines()[0][:120]})
                continue
            result["configs"].append({**config, "gpu_us": us, "tb_per_s": planned.bytes_moved / us / 1e6})
    timed = [c for c in result["configs"] if "gpu_us" in c]
    result["best"] = min(timed, key=lambda c: c["gpu_us"]) if timed else None
    print(json.dumps({key: result[key] for key in ("keys", "planned", "sdpa_gpu_us", "best")}), flush=True)
    return result


if __name__ == "__main__":
    main()
