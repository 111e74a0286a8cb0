"""The triton backend's forward with the Hopper kernel wired in (``hopper.serves``) against the same calls
on the portable forward (the Hopper threshold raised out of reach), through ``portattn.attention``, in one
process on one GPU: kernel time (``triton.testing.do_bench``, median, L2 flushed) and the per-call time of
back-to-back calls (host and GPU together: where the Hopper launch's extra host time shows), on
flash-attention's grid (batch x N = 16384, hidden 2048), fp16.

    python benchmarks/hopper_wired.py --json benchmarks/results/h100-hopper-wired.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

POINTS = [(16384 // n, 2048 // d, n, d) for d in (64, 128) for n in (1024, 4096, 16384)] + [(4, 8, 4096, 256)]


def per_call_ms(fn, sync, calls: int = 50) -> float:
    for _ in range(5):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch
    import triton
    import triton.testing

    import portattn
    from portattn import api
    from portattn.backends.triton import _hopper_config, hopper

    record = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
              "command": " ".join(["python"] + sys.argv),
              "versions": {"torch": torch.__version__, "triton": triton.__version__, "portattn": portattn.__version__,
                           "python": platform.python_version(), "cuda": torch.version.cuda}, "points": []}
    threshold = hopper.MIN_FLOPS
    for b, h, n, d in POINTS:
        for causal in (False, True):
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
            point = {"B": b, "H": h, "N": n, "D": d, "causal": causal}
            for name, minimum in (("hopper", threshold), ("portable", float("inf"))):
                hopper.MIN_FLOPS = minimum
                _hopper_config.cache_clear()
                api._PREPARED.clear()
                run = lambda: portattn.attention(q, k, v, causal=causal, backend="triton")  # noqa: E731
                ms = triton.testing.do_bench(run, return_mode="median")
                call = api.prepare(q, k, v, causal=causal, backend="triton")
                point[name] = {"tflops": call.spec.flops_forward / ms / 1e9, "per_call_ms": per_call_ms(run, torch.cuda.synchronize),
                               "hopper_used": _hopper_config(call.backend, call.spec) is not None}
            hopper.MIN_FLOPS = threshold
            point["ratio"] = point["hopper"]["tflops"] / point["portable"]["tflops"]
            record["points"].append(point)
            print(json.dumps(point), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
