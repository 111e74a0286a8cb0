"""The flash-attention benchmark grid on a CUDA GPU: portattn's ``triton`` backend against PyTorch's SDPA
backends and ``torch.compile(flex_attention)``, and the planner's plan against a sweep of the
configurations a Triton user would try -- every ratio taken in one process.

Grid (flash-attention's benchmark): batch * seqlen = 16384, hidden 2048 (H = 2048 / D), D in {64, 128},
N in {512, ..., 16384}, causal and not, fp16, forward and forward+backward. FLOPs: forward
4*B*H*N^2*D (halved when causal), forward+backward 3.5x forward.

    python benchmarks/flash_grid.py peers --json results.json   # triton vs SDPA flash/cudnn/efficient/math and flex
    python benchmarks/flash_grid.py sweep --json sweep.json     # the plan vs every swept configuration

``peers`` times the public call ``portattn.attention`` (argument checks included) and, for
forward+backward, ``torch.autograd.grad`` through it, exactly as the peers are timed. ``sweep``
times the forward (and the backward kernels) of the plan and of each configuration of
``portattn.tuning``'s spaces; every configuration is compiled beforehand in parallel worker
processes, so compilation stays out of the device time. Timing: ``triton.testing.do_bench``
(CUDA events, L2 flushed), medians.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import multiprocessing
import platform
import sys
import time
import traceback

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

import portattn
from portattn import tuning
from portattn.api import prepare

TOKENS, HIDDEN = 16384, 2048
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
SDPA = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
MATH_MAX_SEQLEN = 4096  # the materialized N x N scores of longer sequences take tens of GB


def points(seqlens=SEQLENS, head_dims=HEAD_DIMS, masks=(False, True)):
    return [(d, causal, n) for d in head_dims for causal in masks for n in seqlens]


def shape(d, n):
    return TOKENS // n, HIDDEN // d, n, d


def flops(d, causal, n, mode):
    b, h, _, _ = shape(d, n)
    forward = 4 * b * h * n * n * d / (2 if causal else 1)
    return forward * (3.5 if mode == "fwd+bwd" else 1.0)


def inputs(d, n, requires_grad=False):
    torch.manual_seed(0)
    make = lambda: torch.randn(*shape(d, n), device="cuda", dtype=torch.float16, requires_grad=requires_grad)  # noqa: E731
    return make(), make(), make(), torch.randn(*shape(d, n), device="cuda", dtype=torch.float16)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_bwd(forward, leaves, grad_out):
    def run():
        out = forward(*leaves)
        return torch.autograd.grad(out, leaves, grad_out)

    return run


# ----------------------------------------------------------------------------------------------
# peers


def flex_callables():
    """``make(causal, n)`` -> a ``torch.compile(flex_attention)`` callable, causal through a block mask.

    Compiled with static shapes (``dynamic=False``) and a recompile limit above the grid's size, so
    every shape gets its own specialized kernel, as a user running one shape would: with the default
    limit of 8, dynamo would fall back to dynamic-shape or eager code part-way through the grid."""
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    for limit in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo_config, limit):
            setattr(dynamo_config, limit, 1024)
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def make(causal, n):
        if causal and n not in masks:
            masks[n] = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, n, n, device="cuda")
        block_mask = masks.get(n) if causal else None
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)

    return make


def _flex_warm_worker(jobs):
    """Compile flex for some grid points in a worker process: inductor's on-disk caches then serve
    the timing process, so compilation (minutes, on one core) stays out of the device time."""
    make = flex_callables()
    for d, causal, n, mode in jobs:
        q, k, v, grad_out = inputs(d, n, requires_grad=mode == "fwd+bwd")
        try:
            if mode == "fwd":
                with torch.no_grad():
                    make(causal, n)(q, k, v)
            else:
                fwd_bwd(make(causal, n), (q, k, v), grad_out)()
        except Exception:  # noqa: BLE001 - reported when timed
            pass
        del q, k, v, grad_out
        torch.cuda.empty_cache()
    return len(jobs)


def warm_flex(args):
    jobs = [(d, c, n, mode) for d, c, n in points(args.seqlens, args.head_dims, args.causal) for mode in args.modes]
    shares = [jobs[i::args.workers] for i in range(args.workers)]
    start = time.time()
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_flex_warm_worker, [s for s in shares if s]))
    print(f"flex compiled for {len(jobs)} grid points in {time.time() - start:.0f} s", flush=True)


def run_peers(args, record):
    if not args.no_flex and not args.no_warm:
        warm_flex(args)
    make_flex = flex_callables() if not args.no_flex else None
    for d, causal, n in points(args.seqlens, args.head_dims, args.causal):
        for mode in args.modes:
            q, k, v, grad_out = inputs(d, n, requires_grad=mode == "fwd+bwd")
            ours_name = f"portattn-{args.backend}"
            contenders = {ours_name: lambda q, k, v: portattn.attention(q, k, v, causal=causal, backend=args.backend)}
            for name, kernel in SDPA.items():
                if name not in args.sdpa or (name == "math" and n > MATH_MAX_SEQLEN):
                    continue
                contenders[f"sdpa-{name}"] = (lambda kernel: lambda q, k, v: _sdpa(q, k, v, causal, kernel))(kernel)
            if make_flex is not None:
                contenders["flex"] = make_flex(causal, n)
            row = {"D": d, "causal": causal, "N": n, "mode": mode, "B": shape(d, n)[0], "H": shape(d, n)[1],
                   "backend": args.backend, "plan": prepare(q, k, v, causal=causal, backend=args.backend).plan.summary(), "tflops": {}, "ms": {}, "errors": {}}
            for name, forward in contenders.items():
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            ms = bench(lambda: forward(q, k, v))
                    else:
                        ms = bench(fwd_bwd(forward, (q, k, v), grad_out))
                    row["ms"][name] = ms
                    row["tflops"][name] = flops(d, causal, n, mode) / ms * 1e-9
                except Exception as error:  # noqa: BLE001 - a peer that cannot run this shape is a result
                    row["errors"][name] = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
                torch.cuda.empty_cache()
            ours = row["tflops"].get(ours_name)
            row["ratios"] = {name: ours / t for name, t in row["tflops"].items() if ours and name != ours_name}
            record["peers"].append(row)
            print(_peer_line(row), flush=True)
            save(args, record)


def _sdpa(q, k, v, causal, kernel):
    with sdpa_kernel([kernel]):
        return scaled_dot_product_attention(q, k, v, is_causal=causal)


def _peer_line(row):
    cells = " ".join(f"{name}={t:.0f}" for name, t in row["tflops"].items())
    versus = " ".join(f"{name.removeprefix('sdpa-')} {ratio:.2f}x" for name, ratio in row["ratios"].items())
    return f"D={row['D']} causal={int(row['causal'])} N={row['N']} {row['mode']}: {cells} | ours vs {versus}"


# ----------------------------------------------------------------------------------------------
# planner sweep


def _sweep_plans(d, causal, n, backward):
    """The plans the sweep will time at this grid point (the plan comes from the live device's probe,
    as ``attention`` gets it; no arrays needed)."""
    b, h, _, _ = shape(d, n)
    plan = portattn.plan(seqlen_q=n, head_dim=d, batch=b, heads=h, causal=causal, dtype="float16", device="cuda")
    return tuning.candidates(plan, tuning.BACKWARD_SPACE if backward else tuning.FORWARD_SPACE)


def _compile_worker(job):
    """Launch a share of the configurations once on a small problem of the same specialization (every
    grid length is a multiple of 16, as 512 is), which fills Triton's on-disk cache for the timed runs."""
    d, causal, n, backward, share, shares = job
    q, k, v, grad_out = (torch.randn(1, 1, 512, d, device="cuda", dtype=torch.float16) for _ in range(4))
    call = prepare(q, k, v, causal=causal, backend="triton")
    for p in _sweep_plans(d, causal, n, backward)[share::shares]:
        try:
            step = dataclasses.replace(call, plan=dataclasses.replace(p, key_splits=1))
            out, lse = step.forward(q, k, v)
            if backward:
                step.backward(grad_out, q, k, v, out, lse)
        except Exception:  # noqa: BLE001 - reported when the configuration is timed
            pass
    torch.cuda.synchronize()
    return job


def precompile(jobs, workers):
    start = time.time()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        list(pool.map(_compile_worker, jobs))
    print(f"precompiled {len(jobs)} shares in {time.time() - start:.0f} s", flush=True)


def _config(p, backward):
    fields = tuning.BACKWARD_SPACE if backward else tuning.FORWARD_SPACE
    return {name: p.value(name) for name in fields}


def run_sweep(args, record):
    jobs = [(d, c, n, False) for d, c, n in points(args.seqlens, args.head_dims, args.causal) if args.forward_sweep]
    jobs += [(d, c, n, True) for d, c, n in points(args.backward_seqlens, args.head_dims, args.causal)]
    # the configurations differ only by (D, causal, pass): compile each set once, split across workers
    shares = 4
    distinct = sorted({(d, c, bwd): n for d, c, n, bwd in jobs}.items())
    precompile([(d, c, n, bwd, i, shares) for (d, c, bwd), n in distinct for i in range(shares)], args.workers)
    for d, causal, n, backward in jobs:
        q, k, v, grad_out = inputs(d, n)
        call = prepare(q, k, v, causal=causal, backend="triton")
        if backward:
            trials = tuning.sweep_backward(call, q, k, v, grad_out)
        else:
            trials = tuning.sweep_forward(call, q, k, v)
        plan_trial, winner = trials[0], tuning.best(trials)
        mode = "bwd" if backward else "fwd"
        row = {"D": d, "causal": causal, "N": n, "mode": mode, "plan": _config(call.plan, backward),
               "plan_ms": plan_trial.seconds and plan_trial.seconds * 1e3, "best": _config(winner.plan, backward),
               "best_ms": winner.seconds * 1e3,
               "plan_fraction_of_best": winner.seconds / plan_trial.seconds if plan_trial.seconds else None,
               "trials": [{**_config(t.plan, backward), "ms": t.seconds and t.seconds * 1e3, "error": t.error} for t in trials]}
        record["sweep"].append(row)
        frac = row["plan_fraction_of_best"]
        print(f"sweep {mode} D={d} causal={int(causal)} N={n}: plan {row['plan']} {row['plan_ms']:.3f} ms, "
              f"best {row['best']} {row['best_ms']:.3f} ms -> plan at {frac:.3f} of best", flush=True)
        save(args, record)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def save(args, record):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("peers", "sweep", "warm-flex"))
    parser.add_argument("--json")
    parser.add_argument("--seqlens", type=int, nargs="+", default=list(SEQLENS))
    parser.add_argument("--backward-seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=("fwd", "fwd+bwd"))
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1], choices=(0, 1), help="masks: 0 full, 1 causal")
    parser.add_argument("--forward-sweep", type=int, default=1, choices=(0, 1), help="sweep: 0 skips the forward configurations")
    parser.add_argument("--backend", default="triton", help="peers: the portattn backend timed against the peers")
    parser.add_argument("--sdpa", nargs="+", default=list(SDPA), choices=list(SDPA), help="peers: the SDPA backends timed")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--no-warm", action="store_true", help="peers: flex is already compiled (warm-flex ran before)")
    parser.add_argument("--workers", type=int, default=12)
    args = parser.parse_args(argv)
    args.causal = tuple(bool(c) for c in args.causal)
    record = {
        "device": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                     "portattn": portattn.__version__, "cuda": torch.version.cuda, "cupy": _version("cupy")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "grid": f"B*N = {TOKENS}, H = {HIDDEN}/D, fp16, (B, H, N, D)",
        "flops": "forward 4*B*H*N^2*D (halved when causal); fwd+bwd 3.5x forward",
        "timing": "triton.testing.do_bench, median, warmup 25 ms, rep 100 ms (sweep: 10 / 40 ms), one process",
        "peers": [], "sweep": [],
    }
    if args.part == "warm-flex":
        return warm_flex(args)
    try:
        (run_peers if args.part == "peers" else run_sweep)(args, record)
    except Exception:
        record["error"] = traceback.format_exc()
        print(record["error"], flush=True)
    save(args, record)


if __name__ == "__main__":
    main()
