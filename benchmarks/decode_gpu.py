"""Decoding on a CUDA GPU: `attention_with_kvcache` (triton, cache read in place) against SDPA's cuDNN and
flash kernels, with the bandwidth each achieves.

    python benchmarks/decode_gpu.py --json benchmarks/results/h200-decode.json            # the default grid
    python benchmarks/decode_gpu.py --batch 1 --keys 16384 32768 131072 --group 4 --head-dim 128

One query per sequence, H_kv = 8 K/V heads and H = group x 8 query heads, every sequence holding
``keys`` keys. portattn reads a flash-attn cache, (B, N, H_kv, D) contiguous and (num_pages, 16, H_kv,
D) pages in a shuffled order; SDPA gets (B, H, N, D) contiguous tensors, as its users hold them, with
``enable_gqa``. GPU time from CUDA events around back-to-back batches of ~20 ms, contenders
interleaved, median of ``--repeats``. "GB/s" is the decode plan's ``bytes_moved`` (K/V once, q, out,
partials) over the time; "x cudnn" is cuDNN's time over portattn's (>= 1: portattn as fast or faster).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys

KV_HEADS = 8
MAX_CACHE_BYTES = 40e9  # a point whose K/V (twice: portattn's cache and SDPA's copy) would pass this is skipped


def point(torch, portattn, timing, batch, keys, head_dim, group, dtype, repeats) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    dt = getattr(torch, dtype)
    heads = group * KV_HEADS
    page = 16
    q = torch.randn(batch, 1, heads, head_dim, dtype=dt, device="cuda")
    k_cache, v_cache = (torch.randn(batch, keys, KV_HEADS, head_dim, dtype=dt, device="cuda") for _ in range(2))
    pages = batch * keys // page
    k_pages, v_pages = (x.view(pages, page, KV_HEADS, head_dim) for x in (k_cache, v_cache))
    table = torch.randperm(pages, device="cuda").to(torch.int32).view(batch, keys // page)
    lengths = torch.full((batch,), keys, dtype=torch.int32, device="cuda")
    q_sdpa = q.transpose(1, 2).contiguous()
    k_sdpa, v_sdpa = (x.transpose(1, 2).contiguous() for x in (k_cache, v_cache))

    def sdpa_with(kind):
        def run():
            with sdpa_kernel(kind):
                return sdpa(q_sdpa, k_sdpa, v_sdpa, enable_gqa=group > 1)
        return run

    fns = {
        "portattn contiguous": lambda: portattn.attention_with_kvcache(q, k_cache, v_cache, lengths, backend="triton"),
        "portattn paged 16": lambda: portattn.attention_with_kvcache(q, k_pages, v_pages, lengths, table, backend="triton"),
        "sdpa cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
        "sdpa flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
    }
    clocks = {name: timing.CudaEventClock("cuda", target_s=0.02) for name in fns}
    errors: dict = {}
    times = timing.time_interleaved(fns, repeats, warmup=2, clocks=clocks, errors=errors)
    seconds = {name: statistics.median(t) for name, t in times.items() if t}
    plans = {layout: portattn.explain_with_kvcache(q, *cache, lengths, *extra, backend="triton").plan
             for layout, cache, extra in (("contiguous", (k_cache, v_cache), ()), ("paged 16", (k_pages, v_pages), (table,)))}
    moved = plans["contiguous"].bytes_moved
    row = {"batch": batch, "keys": keys, "head_dim": head_dim, "group": group, "dtype": dtype,
           "us": {name: s * 1e6 for name, s in seconds.items()},
           "GB/s": {name: moved / s / 1e9 for name, s in seconds.items()},
           "predicted us": plans["contiguous"].predicted_s * 1e6 if plans["contiguous"].predicted_s else None,
           "plans": {layout: plan.summary() for layout, plan in plans.items()}, "errors": errors}
    if "sdpa cudnn" in seconds:
        row["x cudnn"] = {name: seconds["sdpa cudnn"] / s for name, s in seconds.items() if name.startswith("portattn")}
    del k_cache, v_cache, k_sdpa, v_sdpa
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--keys", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[128])
    parser.add_argument("--group", type=int, nargs="+", default=[4])
    parser.add_argument("--dtype", nargs="+", default=["float16"], choices=["float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    import torch

    import portattn
    from portattn import timing

    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(["python"] + sys.argv),
              "kv_heads": KV_HEADS, "points": []}
    for dtype, head_dim, group, batch, keys in itertools.product(args.dtype, args.head_dim, args.group, args.batch, args.keys):
        if 4 * batch * keys * KV_HEADS * head_dim * 2 > MAX_CACHE_BYTES:
            print(f"skip B={batch} N={keys} D={head_dim}: over {MAX_CACHE_BYTES / 1e9:.0f} GB of K/V", flush=True)
            continue
        row = point(torch, portattn, timing, batch, keys, head_dim, group, dtype, args.repeats)
        record["points"].append(row)
        shown = ", ".join(f"{name} {us:.1f} us ({row['GB/s'][name]:.0f} GB/s)" for name, us in row["us"].items())
        ratio = ", ".join(f"{name} {x:.2f}x" for name, x in row.get("x cudnn", {}).items())
        print(f"{dtype} D={head_dim} G={group} B={batch} N={keys}: {shown}; vs cudnn: {ratio}"
              + (f"; errors {row['errors']}" if row["errors"] else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
