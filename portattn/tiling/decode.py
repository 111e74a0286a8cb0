"""The decode planner: a KV-cache decoding step (few queries, a long cache, contiguous or paged) and a
device in, a `DecodePlan` out. Pure functions, like ``planner.py``; every rule is stated where it acts.

Decoding is a stream of the cache through the device: each K/V row is read once and meets only the
G x Nq query rows of its KV group (G = H / H_kv), so the time is the bytes over the memory bandwidth
as soon as enough programs are in flight to keep the memory system busy. The rules:

* D1 GQA packing: a program holds the G x Nq query rows of a KV group, so every K/V row it loads
  serves the whole group. GPU: one program per (sequence, KV head, key split), the rows padded to a
  power of two >= 16 (``tl.dot``'s smallest M) and, above ``GPU_MAX_ROWS``, cut into row blocks (each
  re-reads K/V; only very wide groups with many queries get there). CPU: one task per (sequence, key
  split) over every KV head, since a key's (H_kv, D) rows are contiguous in the cache and one core
  streams them sequentially (a single KV head's rows are a strided 1 / H_kv of the stream, which ran
  at a fifth of the bandwidth on an EPYC).
* D2 split-KV: each sequence's key loop is cut into at most ``key_splits`` ranges, run in parallel and
  merged by log-sum-exp. ``key_splits`` comes from the shapes alone: enough programs for
  ``GPU_DECODE_WAVES`` programs per compute unit (GPU: a memory-bound stream wants several in flight
  per SM to hide DRAM latency) or ``CPU_TASKS_PER_THREAD`` tasks per worker thread (CPU), at most
  ``GPU_MAX_SPLITS`` on a GPU (the merge holds one query's partials of every split in registers). The
  kernels cut each sequence's own keys, L_b, evenly: ranges of ``max(keys_per_split, ceil(L_b /
  key_splits))`` keys rounded up to ``block_k``, so a short sequence uses fewer splits and the rest of
  its programs exit at once. ``keys_per_split`` = ``MIN_KEYS_PER_SPLIT`` (``CPU_MIN_KEYS_PER_SPLIT`` on a
  CPU) rounded up to ``block_k``: a shorter range costs more in the merge's partials than it gains in
  parallelism. The lengths never enter the plan, so a GPU call needs no device-to-host copy of them
  (``portattn/kvcache.py``).
* D3 key tile: GPU ``block_k`` 64 keys at D <= 128 (32 above: K and V tiles of 16 KiB per stage in
  fp16), 4 warps, 3 stages where the device copies asynchronously; CPU 64 keys per softmax rescale
  (the K/V rows go straight from the cache to the FMAs: no tile is copied).
* D4 the grid is (sequence, KV head, row block) x ``key_splits`` whatever the lengths; sequence b's
  keys are clamped to the cache's capacity and, paged, its page ids to the cache's pages (a bad
  length or table never reads outside the cache; ``attention_with_kvcache`` checks them on the host
  where it reads them).
* D5 bytes moved: every present key's K and V row once per row block (``total_keys``: the cache's
  capacity per sequence when the lengths stay on the device -- an upper bound), q and out once, plus
  the float32 partials written and merged when split; the predicted time is those bytes over the
  device's memory bandwidth (the catalog's, or the probe's) -- the floor the kernel is measured against.
* D6 (GPU) a split must pay for its merge. A step costs the longer of its host time and its stream
  (back to back, each hides the other): one launch takes ``GPU_STEP_HOST_S`` of the host, a split step
  ``GPU_MERGE_HOST_S`` more (the merge's launch and its float32 allocation); unsplit, a program streams
  its sequence's K/V alone at ``GPU_PROGRAM_GBS``, split the stream is shared out, each bounded below by
  the bytes over the device's bandwidth. The key loop is split only when that makes the step shorter:
  at batch 1 to 8 and D 128, caches up to about 2k keys run one program per KV head and one launch.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..devices.description import DeviceSpec
from ..spec import DTYPE_BYTES

if TYPE_CHECKING:  # the spec module imports tiling; importing it back at run time would be circular
    from ..spec import AttentionSpec
    from .plan import TilePlan

GPU_MAX_ROWS = 64  # D1: G x Nq rows of one tile at most (the O accumulator stays in registers over 4 warps)
GPU_DECODE_WAVES = 4  # D2: programs per compute unit
GPU_WARPS = 4
GPU_MAX_SPLITS = 128  # D2: the merge holds every split's partial row of one query in registers
CPU_TASKS_PER_THREAD = 2  # D2: decode tasks are of equal size, so a couple per thread balance the load
# D3: 64 keys per softmax rescale on a CPU (the G x Nq rows' scores of a tile stay in L1): 1.1-1.3x the
# speed of 128 at batch 1-8 and 4k-16k keys on this project's EPYC
CPU_BLOCK_K = 64
MIN_KEYS_PER_SPLIT = 256  # D2
# D2 on a CPU: a split's merge is a few microseconds there, so a cache of 256 keys already takes two
# threads (1.5x the one-task step at batch 1)
CPU_MIN_KEYS_PER_SPLIT = 128
# D6, measured on the H200 (benchmarks/decode_splits.py, 32/8 heads, D 128, fp16): a lone program streamed
# 26-34 GB/s (1024 keys unsplit in 19.7 us, 8192 in 119 us); back-to-back steps of one launch took 21-22 us
# per call where the GPU needed less, split ones 38-44 us
GPU_PROGRAM_GBS = 30.0
GPU_STEP_HOST_S = 20e-6
GPU_MERGE_HOST_S = 17e-6
MAX_QUERIES = 16  # the decode kernels serve Nq <= 16 per sequence; longer query blocks take the prefill path


@dataclass(frozen=True)
class DecodeProblem:
    """One decoding call: the attention ``spec`` (``seqlen_k`` = the keys one sequence can hold: the cache's
    capacity), the cache's ``page_size`` (0: contiguous) and the keys present over all sequences (the
    capacity times the batch when the lengths are not read on the host)."""

    spec: "AttentionSpec"
    page_size: int
    total_keys: int


@dataclass(frozen=True)
class DecodePlan:
    """How a decode kernel is launched: ``block_q`` packed query rows (G x Nq, padded) of each of
    ``kv_heads_per_program`` KV heads per program, in ``row_blocks`` blocks, keys in tiles of ``block_k``,
    each sequence's key loop cut in at most ``key_splits`` ranges of at least ``keys_per_split`` keys
    (D2); ``programs`` work units in all. ``bytes_moved`` and ``predicted_s`` are
    D5's traffic and its time at the memory bandwidth (None when the device's bandwidth is unknown)."""

    device: str
    target: str  # "gpu" or "cpu"
    block_q: int
    row_blocks: int
    kv_heads_per_program: int
    block_k: int
    warps: int
    stages: int
    threads: int
    key_splits: int
    keys_per_split: int
    programs: int
    bytes_moved: int
    predicted_s: float | None
    bandwidth_gbs: float | None
    reasons: tuple[str, ...]

    def summary(self) -> str:
        launch = f"{self.warps} warps, {self.stages} stages" if self.target == "gpu" else f"{self.threads} threads"
        split = (f", key loop split up to {self.key_splits}x (>= {self.keys_per_split} keys each)"
                 if self.key_splits > 1 else "")
        rows = f" in {self.row_blocks} row blocks" if self.row_blocks > 1 else ""
        return f"decode: {self.block_q} packed query rows{rows} x {self.block_k} keys, {launch}{split}, {self.programs} programs"

    def describe(self) -> str:
        mib = 1024 * 1024
        time = (f"{self.predicted_s * 1e6:.1f} us at {self.bandwidth_gbs:g} GB/s" if self.predicted_s is not None
                else "unknown (no memory bandwidth for this device)")
        lines = [f"decode plan for {self.device} ({self.target} rules)", f"  {self.summary()}",
                 f"  bytes moved: {self.bytes_moved / mib:.2f} MiB; predicted time {time}", "  why:"]
        return "\n".join(lines + [f"    - {reason}" for reason in self.reasons])


@functools.lru_cache(maxsize=4096)
def plan_decode(problem: DecodeProblem, device: DeviceSpec) -> DecodePlan:
    """The decode plan for ``problem`` on ``device`` (GPU or CPU rules by ``device.kind``)."""
    spec = problem.spec
    gpu = device.kind != "cpu"
    rows = spec.group_size * spec.seqlen_q
    if gpu:  # D1
        block_q = min(GPU_MAX_ROWS, max(16, 1 << max(0, rows - 1).bit_length()))
        block_k = 64 if spec.head_dim <= 128 else 32
        stages, warps, threads = (3 if device.has_async_copy else 1), GPU_WARPS, GPU_WARPS * device.simd_width
        target, parallel = GPU_DECODE_WAVES * device.compute_units, device.compute_units
    else:
        block_q, block_k, stages, warps = rows, CPU_BLOCK_K, 1, 1
        threads = device.hardware_threads or device.compute_units
        target, parallel = CPU_TASKS_PER_THREAD * threads, threads
    row_blocks = -(-rows // block_q)
    kv_heads_per_program = 1 if gpu else spec.kv_heads
    groups = spec.batch * (spec.kv_heads // kv_heads_per_program) * row_blocks
    # D2: as many splits as fill the target, at most as many as the capacity has ranges of keys_per_split keys
    keys_per_split = -(-(MIN_KEYS_PER_SPLIT if gpu else CPU_MIN_KEYS_PER_SPLIT) // block_k) * block_k
    most = max(1, -(-spec.seqlen_k // keys_per_split))
    if gpu:
        most = min(most, GPU_MAX_SPLITS)
    splits = max(1, min(-(-target // max(1, groups)), most))
    bandwidth = device.memory_bandwidth_gbs
    steps = _step_times(problem, row_blocks, splits, bandwidth) if gpu and splits > 1 and bandwidth else None
    if steps is not None and steps[1] >= steps[0]:
        splits = 1
    programs = groups * splits
    moved = _bytes_moved(problem, row_blocks, splits)
    predicted = moved / (bandwidth * 1e9) if bandwidth else None
    unit = "compute units" if gpu else "threads"
    reasons = [
        f"D1 GQA packing: the {spec.group_size} query heads x {spec.seqlen_q} queries of a KV group are {rows} rows"
        + (f", padded to {block_q} per tile" if gpu and block_q > rows else "")
        + (f", in {row_blocks} row blocks of {block_q}" if row_blocks > 1 else "")
        + "; each K/V tile is read once for them"
        + ("" if gpu else f"; a task reads all {spec.kv_heads} KV heads' rows of a key (contiguous)"),
        (f"D2 {groups} ({'sequence, KV head' if gpu else 'sequence'}{', row block' if row_blocks > 1 else ''}) groups x "
         f"{splits} key split(s) = {programs} programs for {parallel} {unit} (target {target}); a sequence's keys "
         f"in ranges of >= {keys_per_split}"),
        f"D3 {block_k}-key tiles" + (f", {warps} warps, {stages} stage(s)" if gpu else ", read from the cache in place"),
        f"D5 {moved / 1e6:.2f} MB: K/V of {problem.total_keys} present keys x {spec.kv_heads} KV heads"
        + (f" x {row_blocks} row blocks" if row_blocks > 1 else "") + ", q and out"
        + (", float32 partials" if splits > 1 else "")
        + (f"; {predicted * 1e6:.1f} us at {bandwidth:g} GB/s" if predicted is not None else ""),
    ]
    if steps is not None:
        reasons.append(f"D6 a step unsplit takes {steps[0] * 1e6:.1f} us, split {steps[1] * 1e6:.1f} us (the longer of "
                       "host and stream): " + ("one split" if splits == 1 else "split"))
    if problem.page_size:
        reasons.insert(3, f"D4 paged cache, {problem.page_size} keys per page: each key's page found in the block table")
    return DecodePlan(device=device.name, target="gpu" if gpu else "cpu", block_q=block_q, row_blocks=row_blocks,
                      kv_heads_per_program=kv_heads_per_program,
                      block_k=block_k, warps=warps, stages=stages, threads=threads, key_splits=splits,
                      keys_per_split=keys_per_split, programs=programs, bytes_moved=moved, predicted_s=predicted,
                      bandwidth_gbs=bandwidth, reasons=tuple(reasons))


def _step_times(problem: DecodeProblem, row_blocks: int, splits: int, bandwidth_gbs: float) -> tuple[float, float]:
    """D6: seconds of a step unsplit and in ``splits`` key splits, each the longer of its host time and its
    stream -- one program's share at ``GPU_PROGRAM_GBS`` or all the bytes at the device's bandwidth."""
    spec = problem.spec
    per_program = 2 * spec.seqlen_k * spec.head_dim * DTYPE_BYTES[spec.dtype]  # one KV head of one sequence

    def stream(n: int) -> float:
        return max(per_program / n / (GPU_PROGRAM_GBS * 1e9),
                   _bytes_moved(problem, row_blocks, n) / (bandwidth_gbs * 1e9))

    return max(GPU_STEP_HOST_S, stream(1)), max(GPU_STEP_HOST_S + GPU_MERGE_HOST_S, stream(splits))


def _bytes_moved(problem: DecodeProblem, row_blocks: int, splits: int) -> int:
    """D5: K and V of every present key once per row block, q read and out written once, the LSE, the
    block table's entries, and the float32 partials (O and LSE) written and read back by the merge."""
    spec = problem.spec
    e = DTYPE_BYTES[spec.dtype]
    d = spec.head_dim
    kv = 2 * problem.total_keys * spec.kv_heads * d * e * row_blocks
    queries = spec.batch * spec.heads * spec.seqlen_q
    moved = kv + 2 * queries * d * e + 4 * queries
    if problem.page_size:
        moved += 4 * -(-problem.total_keys // problem.page_size)
    if splits > 1:
        moved += 2 * splits * queries * (d + 1) * 4
    return moved


@functools.lru_cache(maxsize=4096)
def with_decode_reason(plan: "TilePlan", spec: "AttentionSpec", steps: DecodePlan | None) -> "TilePlan":
    """``plan``, saying so when a backend's forward runs its decode kernel for ``spec`` (``steps``, its decode
    plan; None: the tiled forward, and ``plan`` as it is)."""
    if steps is None:
        return plan
    return dataclasses.replace(plan, reasons=(*plan.reasons, (
        f"D0 {spec.seqlen_q} queries per sequence: the forward runs the decode kernel, {steps.key_splits} key "
        f"split(s) of >= {steps.keys_per_split} keys, {steps.block_k}-key tiles, the {spec.group_size} query heads "
        "of a KV group packed into one tile (tiling/decode.py); the tiles above serve the backward")))
