"""Linear memory: a (1, 1, 32768, 64) float32 forward, whose score matrix alone would be 4 GiB,
stays under 1.5 GiB of peak RSS, imports included -- on numba, and on opencl through PoCL (whose
device memory is this process's memory, so the RSS sees the device buffers too).

The peak is measured around the call alone: the process first runs a tiny call (numba compiles or
loads its kernels; a cold LLVM compile by itself peaked near 1.5 GiB on a fresh CI clone, which is
not the attention's memory), then resets the kernel's peak-RSS counter (``/proc/self/clear_refs``)
and reads it back (``VmHWM``) after the long call."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import numpy as np, portattn

def run(n):
    q, k, v = (np.random.default_rng(i).standard_normal((1, 1, n, 64), dtype=np.float32) for i in range(3))
    out = portattn.attention(q, k, v, backend=BACKEND)
    assert out.shape == q.shape and np.isfinite(out).all()

run(64)  # compile (or load) the kernels
with open("/proc/self/clear_refs", "w") as counter:
    counter.write("5")  # reset the peak resident set size to the current one
run(32768)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))  # KiB
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the peak-RSS counter is Linux's /proc")
@pytest.mark.parametrize("backend", ["numba", "opencl"])
def test_long_sequence_runs_in_linear_memory(backend, usable_backend):
    usable_backend(backend)
    if backend == "opencl" and not _is_cpu_device():
        pytest.skip("the default OpenCL device is a GPU: its memory is not this process's RSS "
                    "(benchmarks/opencl_peers.py --memory measures it)")
    script = f"BACKEND = {backend!r}\n" + SCRIPT
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak_gib = int(result.stdout.split()[-1]) / 2**20
    assert peak_gib < 1.5, f"peak RSS {peak_gib:.2f} GiB"


def _is_cpu_device() -> bool:
    import pyopencl as cl

    from portattn.backends.opencl import runtime as opencl_runtime

    return bool(opencl_runtime.device_of(opencl_runtime.choose()).type & cl.device_type.CPU)
