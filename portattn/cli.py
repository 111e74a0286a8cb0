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
    from . import __version__
    from .backends import registry
    from .status import backends
    from .tiling.probe import probe_all

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
    from .tiling import device_named

    try:
        device = device_named(args.device)
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


# ----------------------------------------------------------------------------------------------
# bench


def _bench_problems(args):
    from . import bench

    seqlens = args.seqlen or (bench.QUICK_SEQLENS if args.quick else (1024, 2048, 4096))
    head_dims = args.head_dim or (bench.QUICK_HEAD_DIMS if args.quick else (64, 128))
    modes = args.mode or ("fwd",)
    dtype = args.dtype or default_dtype(args.device.split(":", 1)[0])
    return bench.grid(seqlens, head_dims, causal=args.causal, modes=modes, dtype=dtype, heads=args.batch_heads)


def cmd_bench(args, argv) -> int:
    from . import bench
    from .backends import registry
    from .tiling import device_named

    unknown = [name for name in args.backend or () if name not in registry()]
    if unknown:
        return _fail(ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(registry())}"))
    try:
        device = device_named(args.device)
    except (ValueError, RuntimeError) as error:
        return _fail(error)
    problems = _bench_problems(args)
    backends = bench.default_backends(args.device, args.backend or ())
    peers = [] if args.no_peers else bench.peer_names(args.device)
    print(f"device: {device.describe().splitlines()[0]}")
    print(f"backends: {', '.join(backends) or 'none'}; peers: {', '.join(peers) or 'none'}; repeats: {args.repeats}")
    started = time.perf_counter()
    results = bench.run_grid(problems, backends, peers, device=args.device, repeats=args.repeats)
    print(bench.format_table(results))
    print(f"vs best peer: GFLOP/s over the best peer's on the same shape (>1 = faster); wall time {time.perf_counter() - started:.1f} s")
    if args.json:
        record = bench.report(results, device, command=bench.command_line(argv), repeats=args.repeats)
        print(f"wrote {bench.write_json(args.json, record)}")
    return 0


# ----------------------------------------------------------------------------------------------
# parser and entry point


def _fail(error: Exception) -> int:
    print(f"portattn: error: {error}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portattn", description="Portable exact attention: devices, tile plans and timings.")
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

    bench = commands.add_parser("bench", help="time the usable backends against peers on this device")
    bench.add_argument("--quick", action="store_true", help="N in {512, 1024, 2048}, D=64, forward")
    bench.add_argument("--device", default="cpu", help="live device label (default: cpu)")
    bench.add_argument("--seqlen", type=int, nargs="+", default=None)
    bench.add_argument("--head-dim", type=int, nargs="+", default=None)
    bench.add_argument("--causal", action="store_true")
    bench.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on CPUs, float16 on GPUs")
    bench.add_argument("--mode", choices=("fwd", "fwd+bwd"), nargs="+", default=None, help="default: fwd")
    bench.add_argument("--batch-heads", type=int, default=8, help="H with B=1 (default 8)")
    bench.add_argument("--backend", nargs="+", default=None, help="also time these (e.g. reference, for tiny sizes only)")
    bench.add_argument("--no-peers", action="store_true", help="time portattn backends only")
    bench.add_argument("--json", default=None, metavar="PATH", help="write results, device, versions and command here")
    bench.add_argument("--repeats", type=int, default=7)
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
