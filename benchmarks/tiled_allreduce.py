"""FastAttention's tiling all-reduce against attention followed by one all-reduce, on torch.distributed ranks.

    python benchmarks/tiled_allreduce.py --json benchmarks/results/cpu-tiled-allreduce-gloo.json      # gloo, CPU
    torchrun --nproc-per-node 8 benchmarks/tiled_allreduce.py --backend nccl --json out.json         # GPUs

Each rank holds ``--heads`` heads (B = 1, D = ``--head-dim``) over ``--seqlen`` tokens and its (H * D, E)
rows of the output projection; ``portattn.distributed.tiled_allreduce_attention_output`` is timed with
``overlap=False`` (the whole attention, the projection, one all-reduce of (1, N, E)) and with
``overlap=True`` for each ``--tiles`` count (each tile's all-reduce issued while the next tile's attention
runs). Per setting: a warm-up, then ``--reps`` calls, each between barriers, median of rank 0's wall
times; also the attention alone and the all-reduce alone, which bound what overlap can save. Without
torchrun the script spawns ``--world`` CPU processes itself, each given ``cores / world`` numba and torch
threads so the ranks do not oversubscribe the machine (gloo's own threads still share those cores: on a CPU the
overlap measured is a lower bound of what a GPU's separate copy engines give).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def timed(fn, reps: int, barrier) -> float:
    fn()
    times = []
    for _ in range(reps):
        barrier()
        start = time.perf_counter()
        fn()
        barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args, rank: int, world: int) -> dict | None:
    import torch
    import torch.distributed as dist

    import portattn
    from portattn.distributed import tiled_allreduce_attention_output

    device = f"cuda:{rank % torch.cuda.device_count()}" if args.backend == "nccl" else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    dtype = torch.float16 if device != "cpu" else torch.float32
    gen = torch.Generator().manual_seed(rank)
    shape = (1, args.heads, args.seqlen, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    w_o = (torch.randn(args.heads * args.head_dim, args.hidden, generator=gen) / args.hidden ** 0.5).to(device, dtype)

    def barrier():
        if device != "cpu":
            torch.cuda.synchronize()
        dist.barrier()

    run = lambda **kw: tiled_allreduce_attention_output(q, k, v, w_o, causal=args.causal, **kw)  # noqa: E731
    buffer = torch.zeros((1, args.seqlen, args.hidden), device=device, dtype=dtype)
    row = {"attention alone": timed(lambda: portattn.attention(q, k, v, causal=args.causal), args.reps, barrier),
           "all-reduce alone": timed(lambda: dist.all_reduce(buffer), args.reps, barrier),
           "attention, then one all-reduce": timed(lambda: run(overlap=False), args.reps, barrier)}
    for tiles in args.tiles:
        row[f"tiled, {tiles} tiles"] = timed(lambda t=tiles: run(overlap=True, tiles=t), args.reps, barrier)
    return {name: seconds * 1e3 for name, seconds in row.items()} if rank == 0 else None


def worker(rank: int, world: int, args, port: int, results) -> None:
    import numba
    import torch
    import torch.distributed as dist

    share = max(1, (os.cpu_count() or 1) // world)  # numba's kernels and torch's projection alike
    numba.set_num_threads(share)
    torch.set_num_threads(share)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        row = measure(args, rank, world)
        if row is not None:
            results.put(row)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--world", type=int, default=2, help="ranks to spawn without torchrun (gloo)")
    parser.add_argument("--heads", type=int, default=8, help="heads per rank")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024, help="E, the projection's output width")
    parser.add_argument("--tiles", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch
    import torch.multiprocessing as mp

    if "RANK" in os.environ:  # under torchrun
        import torch.distributed as dist

        dist.init_process_group(args.backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        row = measure(args, rank, world)
        dist.destroy_process_group()
        if rank != 0:
            return
    else:
        world = args.world
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(worker, args=(world, args, 29500 + os.getpid() % 1000, queue), nprocs=world, join=True)
        row = queue.get()
    base = row["attention, then one all-reduce"]
    record = {"date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
              "device": torch.cuda.get_device_name(0) if args.backend == "nccl" else _cpu_model(),
              "cores": os.cpu_count(), "backend": args.backend, "world": world,
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "shape per rank": {"batch": 1, "heads": args.heads, "seqlen": args.seqlen, "head_dim": args.head_dim,
                                 "hidden": args.hidden, "causal": args.causal},
              "ms": row, "speedup over attention then all-reduce": {name: base / ms for name, ms in row.items()
                                                                     if name.startswith("tiled")}}
    print(json.dumps(record, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
