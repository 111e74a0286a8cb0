#!/usr/bin/env bash
# Conformance and benchmarks on a GPU machine, in one command (run from the repository root).
# The lent GPU machine reaches no registry, so the package runs from the tree (PYTHONPATH), and
# pyopencl comes from wheels made beforehand with ../shared/tools/gpu-wheels.sh into .whl/.
# Results land in ${OUT:-benchmarks/results}.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
mkdir -p /tmp/icd && echo libnvidia-opencl.so.1 > /tmp/icd/nvidia.icd && export OCL_ICD_VENDORS=/tmp/icd
device=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
python3 -m portattn info | tee "$out/info-$device.txt"
# the whole suite, natively on the GPU (pytest-xdist, when present, compiles the kernels in parallel);
# --full-grid: every conformance case even on a backend that would fall back to a CPU emulation
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
python3 -m pytest -q -p no:cacheprovider $workers --full-grid --junitxml="$out/conformance-$device.xml" tests
# the flash-attention grid: the plan against the swept configurations, then triton against the peers
python3 benchmarks/flash_grid.py sweep --json "$out/flash-grid-sweep-$device.json"
python3 benchmarks/flash_grid.py peers --json "$out/flash-grid-peers-$device.json"
# the cupy backend (WMMA) against SDPA's memory-efficient kernel (its issue's peer) and FlashAttention-2,
# and the tensor-core forms it chose between
python3 benchmarks/flash_grid.py peers --backend cupy --sdpa efficient flash --no-flex --modes fwd \
  --json "$out/flash-grid-cupy-fwd-$device.json"
python3 benchmarks/flash_grid.py peers --backend cupy --sdpa efficient flash --no-flex --modes fwd+bwd \
  --json "$out/flash-grid-cupy-fwdbwd-$device.json"
python3 benchmarks/mma_shapes.py --out "$out/mma-shapes-$device.json"
python3 benchmarks/sparsity.py --backend cupy --json "$out/sparsity-cupy-$device.json"
# block-sparse (25% of blocks kept) and sliding-window runs against the dense one, N = 8192
python3 benchmarks/sparsity.py --json "$out/sparsity-$device.json"
# every usable backend and peer on the flash-attention grid (cuda:0), with plots; then the pytest-benchmark suite
python3 -m portattn bench --mode fwd --json "$out/bench-fwd-$device.json" --plot "$out/bench-fwd-$device.png"
python3 -m portattn bench --mode fwd+bwd --json "$out/bench-fwdbwd-$device.json" --plot "$out/bench-fwdbwd-$device.png"
histogram=$(python3 -c "import pygal, pygaljs" 2>/dev/null && echo "--benchmark-histogram=$out/pytest-benchmark/histogram-$device" || true)
python3 -m pytest benchmarks -p no:cacheprovider --benchmark-only --benchmark-storage="file://$out/pytest-benchmark" \
  --benchmark-save="$device" $histogram
