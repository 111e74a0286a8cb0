"""Per-call host time of small calls and kernel time of large ones, portattn against SDPA, in one process.

    python benchmarks/call_overhead.py --json out.json [--label after] [--device cuda]

Small calls (a (1, 8, 128, 64) causal forward, a GQA decode step) are timed back to back: 2000 calls,
one synchronization at the end, median of 5 such runs, so the figure is what a model pays per call
when the GPU is not the bottleneck. The breakdown times the pieces of a cached call on their own:
the call-key lookup (validation and plan reuse), the conversions at the backend boundary, and the
backend's launch. Large shapes are timed with ``triton.testing.do_bench`` (CUDA events), forward and
forward+backward. Run it once per source tree (``--label before`` with the old tree on PYTHONPATH)
and ``--compare before.json after.json`` prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

SMALL = {
    "prefill (1, 8, 128, 64) causal": dict(q=(1, 8, 128, 64), kv=(1, 8, 128, 64), causal=True),
    # a model's decoding step at batch 1: the kernels take a few microseconds, so back-to-back calls time the host
    "decode (1, 32 / 8, 1 q, 1024 k, 128)": dict(q=(1, 32, 1, 128), kv=(1, 8, 1024, 128), causal=False),
    # a batch whose K/V read (134 MB) takes longer than the host's work: the kernels' time
    "decode (8, 32 / 8, 1 q, 4096 k, 128)": dict(q=(8, 32, 1, 128), kv=(8, 8, 4096, 128), causal=False),
}
LARGE = {
    "(4, 16, 4096, 128) causal": dict(q=(4, 16, 4096, 128), kv=(4, 16, 4096, 128), causal=True),
    "(16, 16, 1024, 64)": dict(q=(16, 16, 1024, 64), kv=(16, 16, 1024, 64), causal=False),
}
# attention_with_kvcache as an engine calls it each step: q (B, 1, H, D), a full (B, Nk, H_kv, D) cache,
# cache_seqlens on the GPU (the route that never reads them back)
KVCACHE = {"kvcache step (1, 32 / 8, 1 q, 1024 k, 128)": dict(batch=1, heads=32, kv_heads=8, keys=1024, head_dim=128),
           "kvcache step (8, 32 / 8, 1 q, 4096 k, 128)": dict(batch=8, heads=32, kv_heads=8, keys=4096, head_dim=128)}
CALLS = 2000
RUNS = 5


def _inputs(torch, case, device, dtype, grad=False):
    q = torch.randn(case["q"], device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(case["kv"], device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(case["kv"], device=device, dtype=dtype, requires_grad=grad)
    return q, k, v


def _per_call(fn, calls=CALLS, sync=None, warmup=0) -> float:
    """Median over RUNS of the wall time of ``calls`` back-to-back calls, over ``calls``: ``sync`` (the
    GPU's synchronize) runs once before and once after each batch, none between calls. Self-contained,
    not portattn.timing, so that the same script times the tree before this round too."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(RUNS):
        if sync:
            sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            sync()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def _sdpa_peers(torch):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def peer(kind):
        def run(q, k, v, causal):
            if kind == "default":
                return sdpa(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
            with sdpa_kernel(getattr(SDPBackend, kind)):
                return sdpa(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
        return run

    return {f"sdpa-{kind.lower()}": peer(kind) for kind in ("default", "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")}


def breakdown(torch, portattn, q, k, v, causal):
    """Seconds per cached call spent in each piece (where this tree exposes the pieces)."""
    from portattn import api

    pieces = {}
    key = api._call_key(q, k, v, causal, None, "triton", "bhnd")
    call = api._PREPARED.get(key)
    if call is None:
        return pieces
    pieces["call-key lookup (checks reused)"] = _per_call(lambda: api._PREPARED.get(api._call_key(q, k, v, causal, None, "triton", "bhnd")))
    pieces["conversion to the backend's arrays"] = _per_call(lambda: call._to_backend(q, k, v))
    from portattn.extras import NONE

    pieces["backend forward (launch, enqueue only)"] = _per_call(lambda: call.backend.forward(q, k, v, call.spec, call.plan, NONE), calls=500)
    if hasattr(call.backend, "forward_output"):  # O alone, as attention() asks when no LSE is needed
        pieces["backend forward_output (launch, enqueue only)"] = _per_call(
            lambda: call.backend.forward_output(q, k, v, call.spec, call.plan, NONE), calls=500)
    torch.cuda.synchronize()
    pieces["validation + plan (uncached call)"] = _per_call(lambda: api._prepare(q, k, v, causal=causal, backend="triton"), calls=200)
    return pieces


def kvcache_breakdown(torch, portattn, q, k_cache, v_cache, lengths):
    """Seconds per call of the pieces of an ``attention_with_kvcache`` step (where this tree has them): the
    route (checks reused, plan), the decode launch alone, the whole call back to back with and without
    ``cache_seqlens``, and the same decode problem through ``attention`` on (B, H, N, D) views."""
    try:
        from portattn import kvcache
    except ImportError:
        return {}
    if not hasattr(kvcache, "_route"):
        return {}
    sync = torch.cuda.synchronize
    options = dict(causal=False, scale=None, window=None, softcap=None, alibi_slopes=None)
    route = kvcache._route(q, k_cache, v_cache, lengths, None, None, None, "triton", options)
    pieces = {"route (checks reused, plan)": _per_call(
        lambda: kvcache._route(q, k_cache, v_cache, lengths, None, None, None, "triton", options))}
    if route.in_place:
        pieces["decode launch alone (back to back)"] = _per_call(lambda: kvcache._decode(route, q, lengths, False),
                                                                 sync=sync, warmup=20)
    pieces["whole call (back to back)"] = _per_call(
        lambda: portattn.attention_with_kvcache(q, k_cache, v_cache, lengths, backend="triton"), sync=sync, warmup=20)
    pieces["whole call, cache_seqlens None"] = _per_call(
        lambda: portattn.attention_with_kvcache(q, k_cache, v_cache, None, backend="triton"), sync=sync, warmup=20)
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    pieces["attention on the (B, H, N, D) views"] = _per_call(lambda: portattn.attention(qt, kt, vt, backend="triton"),
                                                              sync=sync, warmup=20)
    return pieces


def _kvcache_inputs(torch, case, device, dtype):
    b, h, hk, n, d = (case[name] for name in ("batch", "heads", "kv_heads", "keys", "head_dim"))
    q = torch.randn((b, 1, h, d), device=device, dtype=dtype)
    k_cache = torch.randn((b, n, hk, d), device=device, dtype=dtype)
    v_cache = torch.randn((b, n, hk, d), device=device, dtype=dtype)
    lengths = torch.full((b,), n, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, lengths


def profile(torch, calls: dict, path: str, n: int = 500) -> None:
    """Where a small call's host time goes: cProfile of ``n`` back-to-back calls of each (by own time), then
    torch.profiler's table of the CPU-side CUDA API calls and kernels of 20 calls (a synchronization or a
    copy that should not be there shows up as such)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with open(path, "w") as report:
        for name, fn in calls.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as traced:
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
            table = traced.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            report.write(f"===== {name}: cProfile of {n} calls (tottime) =====\n{text.getvalue()}\n"
                         f"===== {name}: torch.profiler, 20 calls =====\n{table}\n\n")
            print(f"profiled {name}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--small-only", action="store_true", help="only the back-to-back small calls (no kernel timing)")
    parser.add_argument("--calls", type=int, default=CALLS, help=f"calls per timed run (default {CALLS})")
    parser.add_argument("--profile", metavar="PATH", help="also write where the small calls' host time goes (cProfile, "
                        "torch.profiler) to PATH")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    import torch
    import triton
    import triton.testing

    import portattn

    torch.backends.cuda.matmul.allow_tf32 = False
    device, dtype = "cuda", torch.float16
    record = {"label": args.label, "device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
              "command": " ".join(["python"] + sys.argv), "portattn_file": portattn.__file__,
              "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                           "cuda": torch.version.cuda},
              "small_us": {}, "breakdown_us": {}, "large_ms": {}}
    peers = _sdpa_peers(torch)
    for name, case in SMALL.items():
        q, k, v = _inputs(torch, case, device, dtype)
        row = {}
        for backend in ("triton", "auto"):
            row[f"portattn-{backend}"] = _per_call(
                lambda b=backend: portattn.attention(q, k, v, causal=case["causal"], backend=b), args.calls,
                torch.cuda.synchronize, warmup=20) * 1e6
        for peer, fn in peers.items():
            try:
                row[peer] = _per_call(lambda fn=fn: fn(q, k, v, case["causal"]), args.calls, torch.cuda.synchronize,
                                      warmup=20) * 1e6
            except RuntimeError as error:  # a kernel that refuses the shape
                row[peer] = f"refused: {str(error).splitlines()[0][:80]}"
        record["small_us"][name] = row
        record["breakdown_us"][name] = {piece: s * 1e6 for piece, s in breakdown(torch, portattn, q, k, v, case["causal"]).items()}
        print(name, json.dumps(row), json.dumps(record["breakdown_us"][name]), flush=True)
    for name, case in KVCACHE.items():
        q, k_cache, v_cache, lengths = _kvcache_inputs(torch, case, device, dtype)
        row = {}
        try:
            from portattn import attention_with_kvcache
        except ImportError:  # a tree from before the KV cache
            attention_with_kvcache = None
        for backend in ("triton", "auto") if attention_with_kvcache else ():
            row[f"portattn-{backend}"] = _per_call(
                lambda b=backend: attention_with_kvcache(q, k_cache, v_cache, lengths, backend=b), args.calls,
                torch.cuda.synchronize, warmup=20) * 1e6
        # the peers on the same step: (B, H, 1, D) queries against (B, H_kv, Nk, D) views of the cache
        qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        for peer, fn in peers.items():
            try:
                row[peer] = _per_call(lambda fn=fn: fn(qt, kt, vt, False), args.calls, torch.cuda.synchronize, warmup=20) * 1e6
            except RuntimeError as error:
                row[peer] = f"refused: {str(error).splitlines()[0][:80]}"
        record["small_us"][name] = row
        record["breakdown_us"][name] = {piece: t * 1e6 for piece, t in
                                        kvcache_breakdown(torch, portattn, q, k_cache, v_cache, lengths).items()}
        print(name, json.dumps(row), json.dumps(record["breakdown_us"][name]), flush=True)
    if args.profile:
        profiled = {}
        for name, case in SMALL.items():
            q, k, v = _inputs(torch, case, device, dtype)
            profiled[name] = lambda q=q, k=k, v=v, c=case["causal"]: portattn.attention(q, k, v, causal=c, backend="triton")
        for name, case in KVCACHE.items():
            q, k_cache, v_cache, lengths = _kvcache_inputs(torch, case, device, dtype)
            profiled[name] = lambda q=q, kc=k_cache, vc=v_cache, n=lengths: portattn.attention_with_kvcache(
                q, kc, vc, n, backend="triton")
        profile(torch, profiled, args.profile)
    for name, case in ({} if args.small_only else LARGE).items():
        q, k, v = _inputs(torch, case, device, dtype, grad=True)
        grad = torch.randn_like(q)
        row = {}
        fwd = lambda: portattn.attention(q, k, v, causal=case["causal"], backend="triton")  # noqa: E731
        row["portattn-triton fwd"] = triton.testing.do_bench(fwd, return_mode="median")
        row["portattn-triton fwd+bwd"] = triton.testing.do_bench(lambda: fwd().backward(grad), return_mode="median")
        sdpa = peers["sdpa-default"]
        row["sdpa fwd"] = triton.testing.do_bench(lambda: sdpa(q, k, v, case["causal"]), return_mode="median")
        row["sdpa fwd+bwd"] = triton.testing.do_bench(lambda: sdpa(q, k, v, case["causal"]).backward(grad), return_mode="median")
        record["large_ms"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


def compare(before_path: str, after_path: str):
    before, after = (json.load(open(p)) for p in (before_path, after_path))
    print(f"device: {after['device']}; {before['label']} vs {after['label']}")
    for section, unit in (("small_us", "us per call"), ("breakdown_us", "us"), ("large_ms", "ms")):
        print(f"\n{section} ({unit})")
        for case, row in after[section].items():
            for name, value in row.items():
                old = before.get(section, {}).get(case, {}).get(name)
                if isinstance(value, float) and isinstance(old, float):
                    print(f"  {case:40s} {name:40s} {old:10.2f} -> {value:10.2f}  ({value / old:.2f}x)")
                else:
                    print(f"  {case:40s} {name:40s} {old!s:>10} -> {value!s:>10}")


if __name__ == "__main__":
    main()
