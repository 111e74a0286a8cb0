"""K/V streamed from pinned host memory (portattn.distributed.attention_host_kv) against the copy limit and
against all-on-GPU attention.

    python benchmarks/offload.py --json benchmarks/results/h200-offload.json
    python benchmarks/offload.py --case decode --keys 131072 1048576 --budgets-mib 256 1024
    python benchmarks/offload.py --smoke            # tiny shapes on the CPU: checks the script, times nothing useful

For each case and key count it times, on one GPU, in one process:

- ``copy``: one plain host-to-device copy of the pinned K and V (the copy limit: what the link gives);
- ``streamed``: ``attention_host_kv`` with K/V in pinned host memory and each memory budget
  (the chunk is the longest whose two K/V buffers fit it), reporting the achieved host-to-device
  bandwidth (K/V bytes visible to the queries over the call's time) and its fraction of the copy limit;
- ``on GPU``: ``portattn.attention`` on K/V already in device memory (the all-on-GPU throughput),
  and the streamed call's time over it.

Cases (fp16, causal bottom-right): ``decode``: B=1, 32 query heads / 8 KV heads, D=128, one query,
Nk 128k-1M keys (K+V = 4 KiB per key: 0.5-4 GiB); ``prefill``: the same heads, ``--prefill-queries``
(default 4096) new queries against Nk 128k-512k keys. Times are the median of ``--reps`` calls after a
warm-up, host wall clock around torch.cuda.synchronize() (the streamed call waits for its last copy
anyway). Writes JSON with the device, versions, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
CASES = {
    "decode": dict(queries=1, keys=(131072, 262144, 524288, 1048576)),
    "prefill": dict(queries=None, keys=(131072, 262144, 524288)),  # queries: --prefill-queries
}
SMOKE = dict(heads=4, kv_heads=2, head_dim=16, keys=(300,), queries={"decode": 1, "prefill": 40}, budgets_kib=(16,))


def _median_s(fn, sync, reps: int) -> float:
    fn()  # warm-up: compiles, plans, allocator
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def point(torch, portattn, attention_host_kv, *, case, queries, keys, budgets, dtype, device, reps, shape):
    heads, kv_heads, dim = shape
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, queries, dim, generator=g).to(device, dtype)
    k_host = torch.randn(1, kv_heads, keys, dim, generator=g).to(dtype)
    v_host = torch.randn(1, kv_heads, keys, dim, generator=g).to(dtype)
    if cuda:
        k_host, v_host = k_host.pin_memory(), v_host.pin_memory()
    kv_bytes = 2 * k_host.numel() * k_host.element_size()
    row = {"case": case, "queries": queries, "keys": keys, "kv_bytes": kv_bytes}

    k_dev = torch.empty(k_host.shape, dtype=dtype, device=device)
    v_dev = torch.empty(v_host.shape, dtype=dtype, device=device)

    def copy():
        k_dev.copy_(k_host, non_blocking=True)
        v_dev.copy_(v_host, non_blocking=True)

    copy_s = _median_s(copy, sync, reps)
    row["copy"] = {"ms": copy_s * 1e3, "GB/s": kv_bytes / copy_s / 1e9}

    gpu_s = _median_s(lambda: portattn.attention(q, k_dev, v_dev, causal=True, align="bottom-right"), sync, reps)
    pairs = queries * keys - queries * (queries - 1) // 2  # causal bottom-right: the last Nq keys' triangle is hidden
    flops = 4 * heads * pairs * dim
    row["on GPU"] = {"ms": gpu_s * 1e3, "TFLOP/s": flops / gpu_s / 1e12, "KV GB/s": kv_bytes / gpu_s / 1e9}
    want = portattn.attention(q, k_dev, v_dev, causal=True, align="bottom-right")
    del k_dev, v_dev
    if cuda:
        torch.cuda.empty_cache()

    row["streamed"] = []
    for budget in budgets:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)

        def streamed(budget=budget):
            return attention_host_kv(q, k_host, v_host, causal=True, memory_budget=budget)

        s = _median_s(streamed, sync, reps)
        err = (streamed().float() - want.float()).abs().max().item()
        per_key = kv_heads * 2 * dim * k_host.element_size()
        entry = {"budget_bytes": budget, "chunk_keys": min(keys, budget // (2 * per_key)), "ms": s * 1e3,
                 "GB/s": kv_bytes / s / 1e9, "of copy limit": copy_s / s, "vs on GPU (time ratio)": s / gpu_s,
                 "max abs diff vs on GPU": err}
        if cuda:
            entry["peak_bytes_over_start"] = torch.cuda.max_memory_allocated(device) - base
        row["streamed"].append(entry)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--case", nargs="+", choices=tuple(CASES), default=list(CASES))
    parser.add_argument("--keys", nargs="+", type=int, help="key counts (default: the case's grid)")
    parser.add_argument("--prefill-queries", type=int, default=4096)
    parser.add_argument("--budgets-mib", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (no CUDA needed): checks the "
                                                             "script, measures nothing meaningful")
    args = parser.parse_args(argv)
    import torch

    import portattn
    from portattn.bench.report import environment
    from portattn.distributed import attention_host_kv

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        shape = (SMOKE["heads"], SMOKE["kv_heads"], SMOKE["head_dim"])
        budgets = [b * 1024 for b in SMOKE["budgets_kib"]]
        device_name = "cpu (smoke run)"
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/offload.py times host-to-GPU streaming and needs a CUDA device; torch sees none "
                     "(--smoke runs tiny shapes on the CPU to check the script)")
        device, dtype = torch.device("cuda", torch.cuda.current_device()), getattr(torch, args.dtype)
        shape = (HEADS, KV_HEADS, HEAD_DIM)
        budgets = [b << 20 for b in args.budgets_mib]
        device_name = torch.cuda.get_device_name(device)
    record = {"device": device_name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(["python"] + sys.argv), "versions": environment(), "platform": platform.platform(),
              "dtype": str(dtype).removeprefix("torch."), "heads": shape[0], "kv_heads": shape[1],
              "head_dim": shape[2], "batch": 1, "reps": args.reps, "points": []}
    for case in args.case:
        if args.smoke:
            queries, grid = SMOKE["queries"][case], SMOKE["keys"]
        else:
            queries = CASES[case]["queries"] or args.prefill_queries
            grid = args.keys or CASES[case]["keys"]
        for keys in grid:
            try:
                row = point(torch, portattn, attention_host_kv, case=case, queries=queries, keys=keys, budgets=budgets,
                            dtype=dtype, device=device, reps=args.reps, shape=shape)
            except torch.cuda.OutOfMemoryError as error:  # the all-on-GPU baseline may not fit: say so, go on
                row = {"case": case, "queries": queries, "keys": keys, "error": f"out of memory: {error}"[:300]}
                torch.cuda.empty_cache()
            record["points"].append(row)
            if "error" in row:
                print(f"{case} Nq={queries} Nk={keys}: {row['error']}", flush=True)
                continue
            streamed = "; ".join(f"budget {e['budget_bytes'] / 2 ** 20:g} MiB (chunk {e['chunk_keys']}): {e['ms']:.2f} ms, "
                                 f"{e['GB/s']:.1f} GB/s = {e['of copy limit']:.2f} of copy, "
                                 f"{e['vs on GPU (time ratio)']:.1f}x on-GPU time" for e in row["streamed"])
            print(f"{case} Nq={queries} Nk={keys}: copy {row['copy']['GB/s']:.1f} GB/s, on GPU {row['on GPU']['ms']:.2f} ms"
                  f"; {streamed}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
