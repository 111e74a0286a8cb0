"""portattn's ``opencl`` backend against PyTorch on the same device, in one process.

On a GPU (NVIDIA's OpenCL driver beside CUDA): portattn on pyopencl arrays against SDPA's ``math``
backend (the materialized softmax; OpenCL reaches no tensor cores there, so this is the fair peer)
and SDPA's default choice, on CUDA tensors of the same shapes, fp16 and fp32. On a CPU (PoCL): against
torch's CPU ``scaled_dot_product_attention`` (its flash-attention CPU kernel), fp32.

    python benchmarks/opencl_peers.py --json results.json              # the grid
    python benchmarks/opencl_peers.py --sweep --json sweep.json        # every forward grid (TM x TN x tile x chunk) too
    python benchmarks/opencl_peers.py --shapes 4,16,2048,128 --causal 0 --sweep   # one point
    python benchmarks/opencl_peers.py --memory --json memory.json      # device memory against N

Timing, medians of ``--reps`` after a warm-up, two clocks for each side:
  * device time (``opencl_s``, ``peers_s``; the ratios quoted): portattn's public call on
    device-resident pyopencl arrays, calls enqueued back to back on a profiling queue, each bracketed
    by markers whose profiling timestamps give its time on the device; CUDA peers with
    ``triton.testing.do_bench`` (CUDA events: the same bracket) where triton is present. On a CPU
    (PoCL, torch's CPU kernel: both synchronous) device time is the host clock.
  * end to end (``opencl_host_s``, ``peers_host_s``): one call, then ``queue.finish()`` or
    ``torch.cuda.synchronize()``, on the host clock. Each waiting call pays the driver's wake-up on
    top of the device time.
FLOPs: 4 B H N^2 D, halved when causal.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import platform
import statistics
import sys
import time

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

import portattn
from portattn import bench
from portattn.api import prepare
from portattn.backends import registry
from portattn.backends.opencl import runtime as opencl_runtime

GPU_POINTS = [(4, 16, 2048, 64), (2, 16, 4096, 64), (4, 16, 2048, 128), (2, 16, 4096, 128)]
CPU_POINTS = [(1, 8, 2048, 64), (1, 8, 1024, 128)]
DTYPES = {"float16": (np.float16, torch.float16), "float32": (np.float32, torch.float32)}
FP32_PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 67.0}  # vector fp32 FMA peak (NVIDIA's H100 SXM datasheet)


def host_median(fn, reps):
    """Median seconds of ``reps`` host-clock timings after one warm-up call (``fn`` waits for its device)."""
    return statistics.median(bench.time_callable(fn, reps))


def cuda_median(fn, reps):
    try:
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    except ImportError:
        return host_median(lambda: (fn(), torch.cuda.synchronize()), reps)


def flops(b, h, n, d, causal):
    return 4 * b * h * n * n * d / (2 if causal else 1)


def opencl_inputs(queue, shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [cla.to_device(queue, rng.standard_normal(shape).astype(dtype)) for _ in range(3)]


def profiling_queue(queue):
    """A queue beside ``queue`` (same context and device) whose commands record profiling timestamps."""
    return cl.CommandQueue(queue.context, queue.device, properties=cl.command_queue_properties.PROFILING_ENABLE)


def device_median(queue, fn, reps):
    """Median device seconds of ``fn``'s commands on ``queue`` (a profiling queue): after a warm-up the
    calls are enqueued back to back, so the host stays ahead of the device as it does for CUDA events,
    each between two markers; a call's time is the span between the markers' end timestamps."""
    fn()
    queue.finish()
    spans = []
    start = time.perf_counter()
    for _ in range(reps):
        before = cl.enqueue_marker(queue)
        fn()
        spans.append((before, cl.enqueue_marker(queue)))
    queue.finish()
    elapsed = time.perf_counter() - start
    try:
        return statistics.median((after.profile.end - before.profile.end) * 1e-9 for before, after in spans)
    except cl.RuntimeError:  # a driver without marker timestamps: the mean over the back-to-back calls
        return elapsed / reps


def time_opencl(queue, arrays, causal, reps, plan=None):
    """(device seconds, end-to-end seconds) of the forward on ``arrays`` (made on a profiling queue)."""
    q, k, v = arrays
    if plan is None:
        run = lambda: portattn.attention(q, k, v, backend="opencl", causal=causal)  # noqa: E731
    else:
        call = dataclasses.replace(prepare(q, k, v, backend="opencl", causal=causal), plan=plan)
        run = lambda: call.forward(q, k, v)  # noqa: E731
    host = host_median(lambda: (run(), queue.finish()), reps)
    if queue.device.type & cl.device_type.CPU:
        return host, host  # PoCL runs the call on the host's cores: the host clock is the device clock
    return device_median(queue, run, reps), host


def peers(device_kind, shape, torch_dtype, causal, reps):
    """({peer name: device seconds}, {peer name: end-to-end seconds}) for torch on the same device."""
    if device_kind == "cpu":
        q, k, v = (torch.randn(shape, dtype=torch_dtype) for _ in range(3))
        seconds = {"torch-cpu-sdpa": host_median(lambda: scaled_dot_product_attention(q, k, v, is_causal=causal), reps)}
        return seconds, seconds
    q, k, v = (torch.randn(shape, dtype=torch_dtype, device="cuda") for _ in range(3))
    found, host = {}, {}
    for name, backends in (("sdpa-math", [SDPBackend.MATH]), ("sdpa-default", None)):
        def run(backends=backends):
            if backends is None:
                return scaled_dot_product_attention(q, k, v, is_causal=causal)
            with sdpa_kernel(backends):
                return scaled_dot_product_attention(q, k, v, is_causal=causal)
        try:
            found[name] = cuda_median(run, reps)
            host[name] = host_median(lambda run=run: (run(), torch.cuda.synchronize()), reps)
        except RuntimeError as error:  # e.g. the math path out of memory
            found[name] = host[name] = None
            print(f"  {name}: {error}", file=sys.stderr)
    del q, k, v
    torch.cuda.empty_cache()
    return found, host


def sweep_plans(queue, call, device_kind, widths):
    """Every forward grid around ``call``'s plan whose local memory fits, with every work-item register
    tile (rows x column vectors) and head-dim chunk (0: all columns); on GPUs only whole sub-groups
    (32 work-items or more)."""
    backend = registry()["opencl"]
    plan = call.plan
    widths = widths or ((plan.vector_width or 4,) if device_kind == "cpu" else (4,))
    smallest = 32 if device_kind == "gpu" else 1
    largest = 256 if device_kind == "gpu" else 1024  # O6: larger groups lost every GPU sweep so far
    plans = []
    sides = (1, 2, 4, 8, 16, 32)
    for vw, tm, tn, (rm, cn) in itertools.product(widths, sides, sides, ((4, 1), (8, 1), (4, 2), (8, 2))):
        for chunk in (0, *(c for c in (16, 32, 64, 128) if c < call.spec.head_dim)):
            other = backend.retile(plan, {"block_q": rm * tm, "block_k": cn * vw * tn, "vector_width": vw,
                                          "head_dim_chunk": chunk, "item_rows": rm, "item_vectors": cn})
            if other is not None and smallest <= other.threads <= largest and other.sram_bytes <= queue.device.local_mem_size:
                plans.append(other)
    return plans


def compiler_report(queue, call, plan):
    """NVIDIA's compiler report for a plan's forward (``-cl-nv-verbose``: registers, spills), else []."""
    if "NVIDIA" not in queue.device.platform.name:
        return []
    from portattn.backends.opencl.launch import Call
    from portattn.backends.opencl import plan as rules
    from portattn.extras import NONE

    q = opencl_inputs(queue, (1, 1, 4, call.spec.head_dim), np.float16 if call.spec.dtype == "float16" else np.float32)[0]
    state = Call(None, q, call.spec, NONE)
    state.align(q)  # contiguous rows, as the timed call's: the same -DALIGNED as the program that ran
    options = rules.forward_grid(plan, call.spec.head_dim).options() + state.options
    program = cl.Program(queue.context, opencl_runtime._source())
    program.build(options=[*opencl_runtime.BUILD_FLAGS, *options, "-cl-nv-verbose"])
    log = program.get_build_info(queue.device, cl.program_build_info.LOG)
    return [line.split(":", 1)[-1].strip() for line in log.splitlines() if "Used" in line or "spill" in line]



def run_grid(args, record, queue, device_kind):
    points = args.shapes or (GPU_POINTS if device_kind == "gpu" else CPU_POINTS)
    dtypes = args.dtypes or (["float16", "float32"] if device_kind == "gpu" else ["float32"])
    for dtype in dtypes:
        np_dtype, torch_dtype = DTYPES[dtype]
        for shape in points:
            for causal in args.causal:
                arrays = opencl_inputs(queue, shape, np_dtype)
                seconds, host = time_opencl(queue, arrays, causal, args.reps)
                call = prepare(*arrays, backend="opencl", causal=causal)
                row = {"shape": list(shape), "dtype": dtype, "causal": causal, "mode": "fwd",
                       "flops": flops(*shape, causal), "opencl_s": seconds, "opencl_host_s": host,
                       "plan": call.plan.summary()}
                if args.sweep:
                    plans = sweep_plans(queue, call, device_kind, args.widths)
                    row["sweep"] = []
                    for p in plans:
                        seconds = time_opencl(queue, arrays, causal, args.reps, p)[0]
                        row["sweep"].append({"block_q": p.block_q, "block_k": p.block_k, "vector_width": p.vector_width,
                                             "item_rows": p.item_rows, "item_vectors": p.item_vectors,
                                             "head_dim_chunk": p.head_dim_chunk, "threads": p.threads,
                                             "local_bytes": p.sram_bytes, "seconds": seconds})
                        print(f"  {p.block_q}x{p.block_k} ({p.item_rows}x{p.item_vectors} per item) float{p.vector_width} "
                              f"chunk {p.head_dim_chunk}: {row['flops'] / seconds / 1e12:.2f}", flush=True)
                    ranked = sorted(zip(row["sweep"], plans), key=lambda pair: pair[0]["seconds"])
                    for entry, p in ranked[:args.reports]:
                        entry["compiler"] = compiler_report(queue, call, p)
                    row["compiler"] = compiler_report(queue, call, call.plan)
                del arrays
                row["peers_s"], row["peers_host_s"] = peers(device_kind, shape, torch_dtype, causal, args.reps)
                record["rows"].append(row)
                print(_line(row), flush=True)


def _line(row):
    tflops = row["flops"] / row["opencl_s"] / 1e12
    parts = [f"{row['dtype']} {tuple(row['shape'])} causal={int(row['causal'])}: opencl {tflops:.2f} TFLOP/s"]
    for name, seconds in row["peers_s"].items():
        if seconds:
            parts.append(f"{name} {row['flops'] / seconds / 1e12:.2f} ({seconds / row['opencl_s']:.2f}x)")
    host = row["peers_host_s"].get("sdpa-math")
    if host:
        parts.append(f"end to end against sdpa-math {host / row['opencl_host_s']:.2f}x")
    if "sweep" in row:
        best = min(row["sweep"], key=lambda r: r["seconds"])
        parts.append(f"best swept {best['block_q']}x{best['block_k']} ({best['item_rows']}x{best['item_vectors']} per item) "
                     f"float{best['vector_width']} chunk {best['head_dim_chunk']} {row['flops'] / best['seconds'] / 1e12:.2f}")
    return ", ".join(parts)


def run_memory(args, record, queue):
    """Device memory a forward adds (its outputs; nothing N x N) at growing N, read from CUDA's free-memory
    counter (device-wide, so it sees the OpenCL context's buffers), with the memory pool's idle buffers
    handed back first."""
    b, h, d = 1, 8, 64
    for n in (4096, 8192, 16384, 32768):
        arrays = opencl_inputs(queue, (b, h, n, d), np.float16)
        portattn.attention(*arrays, backend="opencl")  # builds and warms
        queue.finish()
        opencl_runtime.memory_pool(queue.context).free_held()  # the warm-up's buffers, back to the driver
        before = torch.cuda.mem_get_info()[0]
        out = portattn.attention(*arrays, backend="opencl", return_lse=True)
        queue.finish()
        used = before - torch.cuda.mem_get_info()[0]
        record["memory"].append({"n": n, "shape": [b, h, n, d], "dtype": "float16", "device_bytes_added": used,
                                 "scores_bytes_if_materialized": b * h * n * n * 2})
        print(f"N={n}: forward outputs took {used / 2**20:.1f} MiB of device memory "
              f"(an N x N score matrix would be {b * h * n * n * 2 / 2**30:.1f} GiB)", flush=True)
        del out, arrays


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="also time every forward grid around the plan")
    parser.add_argument("--widths", nargs="*", type=int, help="vector widths to sweep (default: the plan's on CPUs, 4 on GPUs)")
    parser.add_argument("--reports", type=int, default=5, help="NVIDIA compiler reports for this many of the fastest swept grids")
    parser.add_argument("--memory", action="store_true", help="device memory against N instead of the grid (GPU)")
    parser.add_argument("--dtypes", nargs="*")
    parser.add_argument("--shapes", nargs="*", type=lambda text: tuple(int(x) for x in text.split(",")),
                        help="B,H,N,D points (default: the device kind's grid)")
    parser.add_argument("--causal", nargs="*", type=lambda text: bool(int(text)), default=[False, True],
                        help="0, 1 or both (default both)")
    args = parser.parse_args(argv)
    label = opencl_runtime.choose()
    queue = profiling_queue(opencl_runtime.queue_for(label))
    device = queue.device
    device_kind = "cpu" if device.type & cl.device_type.CPU else "gpu"
    record = {
        "benchmark": "opencl_peers", "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "opencl_device": {"label": label, "name": device.name.strip(), "platform": device.platform.name,
                          "driver": device.driver_version, "version": device.version,
                          "compute_units": device.max_compute_units, "local_mem_bytes": device.local_mem_size},
        "peer_device": torch.cuda.get_device_name() if device_kind == "gpu" else platform.processor() or platform.machine(),
        "fp32_peak_tflops": FP32_PEAK_TFLOPS.get(device.name.strip()),
        "versions": {"torch": torch.__version__, "pyopencl": cl.VERSION_TEXT, "numpy": np.__version__,
                     "python": platform.python_version(), "portattn": portattn.__version__},
        "timing": "opencl_s: device time of the call on pyopencl arrays (profiling markers around back-to-back calls; "
                  "host clock on CPUs), peers_s: triton.testing.do_bench (CUDA events; host clock on CPUs); "
                  "*_host_s: one call then queue.finish / torch.cuda.synchronize, host clock; all medians",
        "rows": [], "memory": [],
    }
    print(f"{label}: {device.name.strip()} ({device.platform.name}); peers on {record['peer_device']}", flush=True)
    if args.memory:
        run_memory(args, record, queue)
    else:
        run_grid(args, record, queue, device_kind)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
