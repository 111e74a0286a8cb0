"""Linear memory: a (1, 1, 32768, 64) float32 forward, whose score matrix alone would be 4 GiB,
stays under 1.5 GiB of peak RSS (measured in a fresh process, imports included). A first process
runs a tiny call, so numba compiles and caches its kernels there: a cold compile alone peaks near
1.5 GiB (LLVM), which is not the attention's memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("numba", reason="the numba backend is the one measured")

SCRIPT = """
import resource, sys, numpy as np, portattn
n = int(sys.argv[1])
q, k, v = (np.random.default_rng(i).standard_normal((1, 1, n, 64), dtype=np.float32) for i in range(3))
out = portattn.attention(q, k, v, backend="numba")
assert out.shape == q.shape and np.isfinite(out).all()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_long_sequence_runs_in_linear_memory():
    subprocess.run([sys.executable, "-c", SCRIPT, "64"], capture_output=True, text=True, check=True)  # compile, cache
    result = subprocess.run([sys.executable, "-c", SCRIPT, "32768"], capture_output=True, text=True, check=True)
    peak_gib = int(result.stdout.split()[-1]) / 2**20
    assert peak_gib < 1.5, f"peak RSS {peak_gib:.2f} GiB"
