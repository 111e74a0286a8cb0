"""The ``portattn`` command: ``info``, ``plan`` and ``bench``.

This module only parses arguments and prints; the figures come from ``tiling`` (devices and
plans), ``status``/``backends`` (what is usable) and ``bench`` (timings). Errors a user can fix
(an unknown device, a backend that cannot run) exit with status 2 and one message on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .spec import DTYPES, default_dtype

# The problem ``info`` shows each backend's plan for.
INFO_PROBLEM = {"batch": 1, "heads": 8, "seqlen": 2048, "head_dim": 64}


# ----------------------------------------------------------------------------------------------
# info


def _print_devices(devices) -> None:
    print("devices:")
    for label, spec, note in devices:
        if spec is None:
            print(f"  {label}: not found ({note})")
            continue
        print(f"  {label}: {note}")
        print("\n".join("    " + line for line in spec.describe().splitlines()))


def _print_backends(statuses) -> None:
    print("backends:")
    for status in statuses:
        state = "usable" if status.usable else "unavailable"
        print(f"  {status.name}: {state} -- {status.summary}")
        for reason in status.reasons:
            print(f"    - {reason}")
        if status.install:
            print(f"    install: {status.install}")


def _print_default_plans(devices, registry) -> None:
    from .spec import AttentionSpec

    p = INFO_PROBLEM
    print(f"plans for B={p['batch']}, H={p['heads']}, N={p['seqlen']}, D={p['head_dim']} (backends auto can pick):")
    shown = False
    for label, device, _ in devices:
        if device is None:
            continue
        kind = label.split(":", 1)[0]
        ranked = sorted(
            ((b.auto_priority[kind], name, b) for name, b in registry.items() if b.usable and kind in b.auto_priority),
            reverse=True,
        )
        for rank, (_, name, backend) in enumerate(ranked):
            spec = AttentionSpec(p["batch"], p["heads"], p["seqlen"], p["seqlen"], p["head_dim"], dtype=default_dtype(device.kind), device=label)
            reasons = backend.not_supported_reasons(spec)
            pick = " (auto's pick)" if rank == 0 else ""
            print(f"  {name} on {label}, {spec.dtype}{pick}:")
            if reasons:
                print("\n".join(f"    cannot run it: {r}" for r in reasons))
            else:
                print(f"    {backend.plan(spec).summary()}")
            shown = True
    if not shown:
        print("  none: no usable backend is ranked for a device found here")


def cmd_info(args) -> int:
    from .backends import registry
    from .devices.probe import probe_all
    from .status import backends
    from .version import __version__

    devices = probe_all()
    print(f"portattn {__version__}")
    _print_devices(devices)
    _print_backends(backends())
    _print_default_plans(devices, registry())
    if args.features:
        from .capabilities import text

        print(text())
    return 0


# ----------------------------------------------------------------------------------------------
# plan


def cmd_plan(args) -> int:
    from .api import plan
    from .devices import device_named

    try:
        device = device_named(args.device)
        if args.decode:
            return _print_decode_plan(args, device)
        tile_plan = plan(
            seqlen_q=args.seqlen,
            seqlen_k=args.seqlen_k,
            head_dim=args.head_dim,
            batch=args.batch,
            heads=args.heads,
            dtype=args.dtype,
            causal=args.causal,
            device=device,
        )
    except (ValueError, RuntimeError, TypeError) as error:
        return _fail(error)
    print(tile_plan.describe())
    print("device:")
    print("\n".join("  " + line for line in device.describe().splitlines()))
    return 0


def _print_decode_plan(args, device) -> int:
    """``plan --decode``: the decode planner's plan for a KV-cache step (every sequence holding --seqlen-k keys)."""
    from .spec import AttentionSpec, default_dtype
    from .tiling.decode import DecodeProblem, plan_decode

    keys = args.seqlen_k if args.seqlen_k is not None else args.seqlen
    spec = AttentionSpec(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, seqlen_q=args.seqlen, seqlen_k=keys,
                         head_dim=args.head_dim, dtype=args.dtype or default_dtype(device.kind), causal=args.causal,
                         align="bottom-right")
    print(plan_decode(DecodeProblem(spec, args.page_size, args.batch * keys), device).describe())
    return 0


# ----------------------------------------------------------------------------------------------
# bench

LIVE_KINDS = ("cpu", "cuda", "opencl")


def _bench_problems(args, grid_kind: str):
    from . import bench

    dtypes = args.dtypes or ([args.dtype] if args.dtype else None)
    if args.decode:
        return bench.decode_grid(grid_kind, batches=args.batch, seqlens=args.seqlen, head_dims=args.head_dim,
                                 groups=args.group, dtypes=dtypes, page_sizes=args.page_size, queries=args.queries)
    masks = (True,) if args.causal else (False,) if args.no_causal else None
    return [problem for dtype in dtypes or [None]
            for problem in bench.default_grid(grid_kind, quick=args.quick, seqlens=args.seqlen, head_dims=args.head_dim,
                                              masks=masks, modes=args.mode, dtype=dtype, heads=args.batch_heads)]


def _methods(device_kind: str, repeats: int, warmup: int, budget: float) -> dict:
    """How time and memory were measured, for the JSON record and the table's footer."""
    batch = "calls back to back (as many as last 2 ms, up to 100; the count is each row's 'clock' in the JSON)"
    clock = {"cuda": f"CUDA events (torch.cuda.Event pairs on the current stream, no L2 flush) around {batch}",
             "opencl": f"host clock (time.perf_counter) around {batch} and queue.finish()"}.get(
        device_kind, "host clock (time.perf_counter) around each call")
    if device_kind == "cuda":
        clock += f"; opencl rows: host clock around {batch} and queue.finish()"
    memory = {"cuda": "torch.cuda.max_memory_allocated growth over one call (torch-based rows); opencl rows: "
                      "the sizes of the OpenCL buffers the call created",
              "opencl": "the sizes of the OpenCL buffers the call created"}.get(
        device_kind, "growth of the process's peak resident memory over one call (VmHWM reset through "
                  "/proc/self/clear_refs, after malloc_trim returns freed memory to the OS)")
    timing = (f"median of {repeats} timings (fewer, at least {min(5, repeats)}, where {repeats} would take over {budget:g} s) after "
              f"the first call and {warmup} warm-up call(s); contenders take turns in each repeat; {clock}; one process")
    return {"timing": timing, "memory": memory}


def _bench_run(args):
    """What ``bench`` will time, from the arguments: a namespace, or ValueError/RuntimeError to report."""
    from . import bench
    from .backends import registry
    from .devices import device_named

    unknown = [name for name in args.backend or () if name not in registry()]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(registry())}")
    label = bench.default_device(args.device)
    kind = label.split(":", 1)[0]
    if kind not in LIVE_KINDS:
        raise ValueError(f"bench times a live device: cpu, cuda[:N] or opencl:P:D, not {label!r} (catalog devices are for `portattn plan`)")
    device = device_named(label)
    unknown = [name for name in args.peer or () if name not in bench.known_peers(label)]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)} on {kind}; known: {', '.join(bench.known_peers(label)) or 'none'}")
    gpu = device.kind != "cpu"
    run = argparse.Namespace(label=label, device=device, unit=bench.unit_for(device.kind, args.decode), skipped={})
    run.repeats = args.repeats or (30 if gpu else 7)
    run.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    run.problems = _bench_problems(args, "cuda" if gpu else "cpu")
    run.backends = bench.default_backends(label, args.backend or (), run.skipped)
    run.peers = [] if args.no_peers else bench.peer_names(label, args.peer, run.skipped)
    if args.no_flex and "torch-flex" in run.peers:
        run.peers.remove("torch-flex")
    run.methods = _methods(kind, run.repeats, run.warmup, args.budget)
    run.opencl_device = _opencl_device(label) if "opencl" in run.backends else None
    return run


def cmd_bench(args, argv) -> int:
    from . import bench

    try:
        if args.plot:
            bench.plot.require_matplotlib()  # before a long run, not after it
        if args.from_json:
            return _bench_redraw(args)
        run = _bench_run(args)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        return _fail(error)
    print(f"device: {run.label}: {run.device.describe().splitlines()[0]}")
    print(f"problems: {len(run.problems)} ({', '.join(sorted({p.dtype for p in run.problems}))}); "
          f"backends: {', '.join(run.backends) or 'none'}; peers: {', '.join(run.peers) or 'none'}; repeats: {run.repeats}")
    for name, why in run.skipped.items():
        print(f"  not timed: {name}: {why}")
    if run.opencl_device:
        print(f"opencl runs on {run.opencl_device}")
    if not run.backends:
        print(f"no portattn backend can run on {run.label}, so there is nothing to time; `portattn info` says why "
              "(on a CPU: pip install 'portattn[numba]')", file=sys.stderr)
        return 1
    if "torch-flex" in run.peers and args.flex_workers > 0:
        print(f"compiling FlexAttention for {len(run.problems)} problem(s) in {args.flex_workers} worker processes first", flush=True)
        bench.warm_flex(run.problems, run.label, args.flex_workers)
    common = dict(command=bench.command_line(argv), repeats=run.repeats, **run.methods, unit=run.unit, skipped=run.skipped,
                  device_label=run.label, opencl_device=run.opencl_device)

    def save(results, complete: bool = False, wall_s: float | None = None) -> dict:
        record = bench.report(results, run.device, complete=complete, wall_s=wall_s, **common)
        if args.json:  # after every problem too: a run cut short keeps what it measured
            bench.write_json(args.json, record)
        return record

    started = time.perf_counter()
    sys.stdout.flush()
    results = bench.run_grid(run.problems, run.backends, run.peers, device=run.label, repeats=run.repeats, warmup=run.warmup,
                             budget_s=args.budget, progress=bench.progress.ProgressBar(), after=save)
    wall = time.perf_counter() - started
    print(bench.format_table(results, run.unit, plans=args.plans))
    print(f"vs best peer: {run.unit} over the best peer's on the same problem (>1 = faster). peak mem: {run.methods['memory']}.")
    print(f"time: {run.methods['timing']}. wall time {wall:.1f} s")
    record = save(results, complete=True, wall_s=round(wall, 1))
    if args.json:
        print(f"wrote {args.json}")
    for path in bench.plot.plot(record, results, args.plot) if args.plot else ():
        print(f"wrote {path}")
    return 0


def _opencl_device(label: str) -> str | None:
    """Which OpenCL device the opencl rows ran on, for the record."""
    from . import bench
    from .backends.opencl import runtime as opencl_runtime

    try:
        chosen = bench.opencl_label(label)
        found = opencl_runtime.device_of(chosen)
        return f"{chosen}: {found.name.strip()} ({found.platform.name.strip()}, {found.driver_version})"
    except Exception as error:  # noqa: BLE001 - only a note in the record
        return f"unknown ({bench.reason(error)})"


def _bench_redraw(args) -> int:
    """``--from-json``: the table and plots of a saved run, without timing anything."""
    from . import bench

    record, results = bench.read_json(args.from_json)
    unit = record.get("unit") or bench.unit_for(record.get("device", {}).get("kind", "cpu"))
    print(f"{args.from_json}: {record.get('command', '?')} -- {record.get('date', '?')}, {record.get('device', {}).get('name', '?')}")
    print(bench.format_table(results, unit, plans=args.plans))
    for path in bench.plot.plot(record, results, args.plot) if args.plot else ():
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------
# parser and entry point


def _fail(error: Exception) -> int:
    print(f"portattn: error: {error}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="portattn", description="Portable exact attention: devices, tile plans and timings.")
    parser.add_argument("--version", action="version", version=f"portattn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="devices found, backend status and the plans auto would use")
    info.add_argument("--features", action="store_true", help="also print each backend's capabilities")

    plan = commands.add_parser("plan", help="the tile plan for a problem on a catalog or live device")
    plan.add_argument("--device", default="cpu", help="catalog name (h100, v100, mi300x, ...) or live label (cpu, cuda:0)")
    plan.add_argument("--seqlen", type=int, required=True, help="query sequence length")
    plan.add_argument("--seqlen-k", type=int, default=None, help="key sequence length (default: --seqlen)")
    plan.add_argument("--head-dim", type=int, required=True)
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--heads", type=int, default=16)
    plan.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on CPUs, float16 on GPUs")
    plan.add_argument("--causal", action="store_true")
    plan.add_argument("--kv-heads", type=int, default=None, help="K/V heads (GQA/MQA; default: --heads)")
    plan.add_argument("--decode", action="store_true",
                      help="the decode plan of a KV-cache step instead (--seqlen queries per sequence, --seqlen-k cached keys)")
    plan.add_argument("--page-size", type=int, default=0, help="with --decode: keys per page of a paged cache (0: contiguous)")

    bench = commands.add_parser(
        "bench", help="time the usable backends against peers on this device",
        description="Time every usable portattn backend and the peer kernels present (torch SDPA's kernels, "
                    "FlexAttention on CUDA, torch's CPU kernel) on one device, interleaved in one process, and print "
                    "a table. Default grid: on GPUs flash-attention's (B*N = 16384, H = 2048/D, fp16, N 512..16384, "
                    "D 64 and 128, both masks, fwd and fwd+bwd); on CPUs B=1, H=8, fp32, N 512..4096, D 64 and 128, "
                    "both masks, fwd.")
    bench.add_argument("--plans", action="store_true", help="add each row's tile plan to the table (wide); --json always has it")
    bench.add_argument("--quick", action="store_true", help="about a minute: N in {512, 1024, 2048}, D=64, no mask, forward")
    bench.add_argument("--device", default=None, help="live device: cpu, cuda[:N], opencl:P:D (default: cuda:0 when torch sees a GPU, else cpu)")
    bench.add_argument("--seqlen", type=int, nargs="+", default=None)
    bench.add_argument("--head-dim", type=int, nargs="+", default=None)
    masks = bench.add_mutually_exclusive_group()
    masks.add_argument("--causal", action="store_true", help="causal mask only (default: both masks; --quick: no mask)")
    masks.add_argument("--no-causal", action="store_true", help="no mask only")
    bench.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on CPUs, float16 on GPUs")
    bench.add_argument("--mode", choices=("fwd", "fwd+bwd"), nargs="+", default=None, help="default: fwd on CPUs, both on GPUs")
    bench.add_argument("--batch-heads", type=int, default=None, metavar="H",
                       help="B=1 with H heads (default: 8 on CPUs; flash-attention's B = 16384/N, H = 2048/D on GPUs)")
    decode = bench.add_argument_group(
        "decoding", "--decode times attention_with_kvcache, one step of generation: 32 query heads, --queries new "
                    "queries per sequence against a full KV cache of --seqlen keys, contiguous or paged; the peers get "
                    "the cache as contiguous (B, H_kv, N, D) tensors. Default grid on GPUs: batch 1/8/64, keys 1k-128k, "
                    "D 64/128, GQA group 1/4/8, fp16 and bf16, contiguous and page 16 (K/V at most 8 GiB); on CPUs batch "
                    "1/8, keys 4k-32k, D 128, group 4, fp32. Rates are GB/s of the cache read.")
    decode.add_argument("--decode", action="store_true", help="time decoding against a KV cache instead of attention")
    decode.add_argument("--batch", type=int, nargs="+", default=None, help="sequences per step")
    decode.add_argument("--group", type=int, nargs="+", default=None, help="query heads per KV head (GQA group)")
    decode.add_argument("--page-size", type=int, nargs="+", default=None, help="0 for a contiguous cache, else pages of this size")
    decode.add_argument("--queries", type=int, default=1, help="new queries per sequence (default 1)")
    bench.add_argument("--dtypes", choices=DTYPES, nargs="+", default=None,
                       help="several dtypes, one grid each (decoding's or attention's); overrides --dtype")
    bench.add_argument("--backend", nargs="+", default=None, help="also time these (e.g. reference, for tiny sizes only)")
    bench.add_argument("--peer", nargs="+", default=None, metavar="NAME",
                       help="time these peers instead of the default ones (cpu: torch-sdpa-flash, torch-sdpa-math; cuda: "
                            "torch-sdpa-cudnn, torch-sdpa-flash, torch-sdpa-efficient, torch-sdpa-math, torch-flex)")
    bench.add_argument("--no-peers", action="store_true", help="time portattn backends only")
    bench.add_argument("--no-flex", action="store_true", help="leave FlexAttention out (torch.compile takes a while per shape)")
    bench.add_argument("--flex-workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                       help="compile FlexAttention for the grid in N processes before timing (0: compile while timing)")
    bench.add_argument("--repeats", type=int, default=None, help="timed calls per contender and problem (default: 7 on CPUs, 30 on GPUs)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default: 1 on CPUs, 3 on GPUs)")
    bench.add_argument("--budget", type=float, default=3.0, metavar="SECONDS",
                       help="fewer repeats (at least 5) for a contender whose repeats would take longer than this (default 3)")
    bench.add_argument("--json", default=None, metavar="PATH",
                       help="write results, device, versions, date, command and methods here (rewritten after each problem)")
    bench.add_argument("--plot", default=None, metavar="PATH",
                       help="draw throughput against N per backend and peer with matplotlib: PATH itself when there is one "
                            "(head dim, mask, mode) figure, else PATH's stem + -d<D>-<full|causal>-<fwd|fwdbwd>.png beside it")
    bench.add_argument("--from-json", default=None, metavar="PATH", help="time nothing: print the table (and --plot) of a saved --json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"info": cmd_info, "plan": cmd_plan}
    try:
        return commands[args.command](args) if args.command in commands else cmd_bench(args, argv)
    except BrokenPipeError:  # `portattn info | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
