#!/usr/bin/env bash
# The path a real model takes, on a GPU machine, in one command that fits the lent machine's 10 minutes:
# its tests (SDPA, torch.compile, Hugging Face, KV cache, on every usable backend), the per-call host time
# of small calls against SDPA, decoding against SDPA's kernels, and every key-split count of a decoding step
# against the decode plan's. Results land in ${OUT:-benchmarks/results}.
#   ci/gpu_model_path.sh [BEFORE_TREE]   # BEFORE_TREE: a folder holding an older portattn/ to time beside this one
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
site="${PYTHONPATH:-}"
export PYTHONPATH="$PWD:$site"
mkdir -p /tmp/icd && echo libnvidia-opencl.so.1 > /tmp/icd/nvidia.icd && export OCL_ICD_VENDORS=/tmp/icd
device=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
# the model path's tests on every usable backend, compiled in parallel
# (-rf: the failures' names in the summary, which the tail keeps)
timeout 220 python3 -m pytest -q -rf -p no:cacheprovider -n 12 --junitxml="$out/model-path-$device.xml" \
  tests/api/test_torch_compile.py tests/integrations tests/api/test_sdpa.py tests/api/test_kvcache.py \
  tests/api/test_hardening.py tests/backends/test_triton_features.py tests/backends/test_triton_hopper.py \
  tests/tiling/test_decode_plan.py 2>&1 | tail -40
# small calls back to back (and the large shapes' kernel time), this tree and, when given, an older one
timeout 150 python3 benchmarks/call_overhead.py --label after --calls 1000 --json "$out/call-overhead-$device.json" \
  --profile "$out/profile-small-calls-$device.txt"
# decoding: the KV-cache entry point against SDPA's cuDNN, flash and efficient kernels (fp16, D 128, GQA 8)
timeout 90 python3 -m portattn bench --decode --no-flex --dtypes float16 --head-dim 128 --group 8 --page-size 0 16 --seqlen 4096 32768 131072 \
  --json "$out/decode-$device.json"
if [ -n "${1:-}" ]; then
  (cd /tmp && PYTHONPATH="$OLDPWD/$1:$site" timeout 120 python3 "$OLDPWD/benchmarks/call_overhead.py" --label before \
    --calls 1000 --json "$out/call-overhead-before-$device.json")
fi
# every key-split count of a decoding step against the decode plan's (rule D6) and SDPA, GPU and per-call time
timeout 60 python3 benchmarks/decode_splits.py --json "$out/decode-splits-$device.json"
