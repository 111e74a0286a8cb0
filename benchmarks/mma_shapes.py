"""Tensor-core throughput of WMMA 16x16x16 vs inline-PTX mma.sync.m8n8k4 on the GPU present.

Why it exists: the cupy backend had to choose one of the two Volta-era forms (issue 5); this times
both on register operands, so only the instruction's own rate is measured, and writes a JSON:

    python benchmarks/mma_shapes.py --out benchmarks/results/h100-mma-shapes.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("mma_shapes.cu")
ITERATIONS = 4096
CHAINS = 4  # as in the .cu file
WARPS_PER_BLOCK = 4


def measure() -> dict:
    import cupy
    import triton.testing

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from portattn.backends.cupy.launch import include_options

    module = cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++17", *include_options()))
    device = cupy.cuda.Device()
    sms = device.attributes["MultiProcessorCount"]
    blocks = sms * 8
    threads = 32 * WARPS_PER_BLOCK
    operand = cupy.random.standard_normal(256, dtype=cupy.float32).astype(cupy.float16)
    out = cupy.empty(blocks * threads, dtype=cupy.float32)
    flops = 2 * 16 * 16 * 16 * CHAINS * ITERATIONS * blocks * WARPS_PER_BLOCK  # equal work in both kernels
    results = {}
    for name in ("wmma_16x16x16", "mma_m8n8k4"):
        kernel = module.get_function(name)
        launch = lambda: kernel((blocks,), (threads,), (operand, out, cupy.int32(ITERATIONS)))  # noqa: E731
        ms = triton.testing.do_bench(launch, warmup=50, rep=300)
        results[name] = {"ms": ms, "tflops": flops / ms / 1e9}
    results["ratio_wmma_over_m8n8k4"] = results["wmma_16x16x16"]["tflops"] / results["mma_m8n8k4"]["tflops"]
    import torch

    return {
        "device": torch.cuda.get_device_name(),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "versions": {"cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(), "torch": torch.__version__},
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/mma_shapes.py " + " ".join(sys.argv[1:]),
        "iterations": ITERATIONS, "blocks": blocks, "threads_per_block": threads,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON here (default: print it)")
    args = parser.parse_args()
    report = measure()
    text = json.dumps(report, indent=2)
    if args.out:
        os.makedirs(args.out.parent, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
