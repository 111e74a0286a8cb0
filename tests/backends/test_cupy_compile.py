"""Every kernel variant the WMMA planner emits for Volta (V100, sm_70) and Turing (T4, sm_75), compiled
without a GPU: CUDA 12's NVRTC to PTX, then ``ptxas -v`` (``portattn/backends/cupy/offline.py``).

A compile alone proves the shared-memory layout: ``attention.cu`` ``static_assert``s that its layout
equals the plan's ``FWD_SMEM_BYTES``/``BWD_SMEM_BYTES``. On top of that each variant is checked for
  * all four kernels of ``build.KERNELS`` assembled, none over 255 registers;
  * forward registers within a calibrated band of the plan's estimate (``plan.registers_per_thread``,
    ``wmma.forward_registers``), and the dK/dV kernel's within one of ``wmma.backward_registers``;
  * spills: none, except the two kinds explained at ``SPILL_TRADE_BYTES`` (each one reported as a warning).

Variants: fp16, causal with a sliding window and ``vector_loads = head_dim % 8 == 0`` (the most registers), over the
conformance suite's head dims and a grid of problem sizes that puts the planner in each of its
regimes (see ``PROBLEMS``), de-duplicated by compile options. Each (device, variant) is compiled once
per session in a thread pool (NVRTC releases the GIL; ptxas is a subprocess), about 1-2 s each.

Run ``python tests/backends/test_cupy_compile.py`` for the measured table (recalibration).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from portattn.backends.cupy import offline as cupy_offline
from portattn.backends.cupy import plan as wmma
from portattn.backends.cupy.build import KERNELS, SM80_ACCUMULATOR, Variant
from portattn.devices import catalog
from portattn.spec import AttentionSpec
from portattn.tiling import TilePlan


def _conformance_head_dims() -> tuple[int, ...]:
    """``tests/conformance/cases.py`` HEAD_DIMS, loaded by path (independent of pytest's import mode)."""
    path = Path(__file__).resolve().parents[1] / "conformance" / "cases.py"
    name = "_portattn_conformance_cases"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return tuple(module.HEAD_DIMS)


HEAD_DIMS = _conformance_head_dims()  # 16, 32, 40, 64, 80, 96, 111, 128, 256
DEVICES = {"v100": 70, "t4": 75}  # catalog key -> the sm_XX / compute_XX it is compiled for
# The register-softmax path (REGISTER_SOFTMAX=1) runs only from sm_80 on (cupy/launch.py's accumulator), so
# every V100 and T4 variant keeps the shared-memory softmax. Compiled for sm_75 with the H100's
# SM80_ACCUMULATOR the register path's dK/dV spills 36-76 B at head dims >= 112 -- the reason it is
# not enabled on Turing before a T4 run weighs it; list "t4" here to compile those variants too.
REGISTER_SOFTMAX_DEVICES: tuple[str, ...] = ()
# The plan depends on the problem only through how many query blocks there are (batch * heads *
# ceil(Nq / rows per block)) against the SM count: whether blocks of 1, 2, 4 or 8 warps fill the device.
# batch * heads from 1 to 2048 and Nq from 1 to 16384 give each of those cases on both devices (from
# "none fills", 1x1 with few queries, to "all fill", 64x32 heads), small Nq against many heads and large
# Nq against few. A denser grid (9 batches x 8 head counts x 24 lengths) emitted no other variant.
BATCH_HEADS = ((1, 1), (2, 8), (16, 16), (64, 32))
LENGTHS = ((1, 1), (1, 1000), (17, 113), (113, 113), (1000, 1000), (2048, 2048), (4096, 4096), (8192, 8192), (16384, 16384))
PROBLEMS = tuple((b, h, nq, nk) for b, h in BATCH_HEADS for nq, nk in LENGTHS)

MAX_REGISTERS = 255  # per thread on every architecture since Kepler; ptxas never goes over it (it spills)
# Register bands, measured / estimated, calibrated with CUDA 12.9 ptxas on every variant for sm_70 and
# sm_75, over three revisions of the kernels and planner (63b4921, 90742aa and its follow-up), and once
# more with __launch_bounds__(threads, 1) on the three big kernels:
#   forward (plan.registers_per_thread): 0.82 (t4 d16 w4 k32: 72 for 88, ptxas spilled to stay low)
#            .. 1.24 now; 0.69 .. 1.39 (v100 d96 w1 k64: 254 for 184) at 63b4921; up to 1.47 (v100 d40
#            w4 k64: 200 for 136) with __launch_bounds__(threads, 1)
#   dK/dV   (wmma.backward_registers(pad, block_n)): 0.95 .. 1.31 (v100 d32 n64: 168 for 128) now; up
#            to 1.43 (183 for 128) with __launch_bounds__(threads, 1)
# ptxas's choice moves in steps (96, 128, 168, 255 are common), so the bands are wide; they still
# catch a kernel that doubles its registers at small head dims, or an estimate that has drifted.
FORWARD_BAND = (0.6, 1.5)
BACKWARD_BAND = (0.75, 1.5)
# Spills. Two kinds are accepted (and reported as warnings), anything else fails:
#   * occupancy trades: ptxas settles on a register count below 255 (72, 96, 128, 168) and spills a
#     few bytes rather than use more registers (no --maxrregcount in play). Measured: 4-20 B stored by
#     the forward, 4 B by dK/dV, 12 B by dQ (28 B at 63b4921). All of them disappear with
#     __launch_bounds__(threads, 1) in the .cu, so they are ptxas's heuristic, not registers running
#     out; ptxas inside NVRTC (cupy's own path on a V100) reports the same figures as the binary here;
#   * at the cap: 255 registers and a few bytes spilled, accepted only where the plan said the kernel is
#     near the limit, i.e. its estimate times the band's upper end reaches 255 (measured: 4-8 B,
#     forward v100 d128 w4 k64, estimate 216; 4 B, forward v100 d256 w2 k64, estimate 224; both stay
#     with __launch_bounds__(threads, 1)).
SPILL_TRADE_BYTES = 32


@dataclass(frozen=True)
class Case:
    """One compile: a planned variant for one device (the test id), with a problem that plans it."""

    id: str
    device: str
    arch: int
    variant: Variant
    problem: str  # an AttentionSpec label that the planner gave this variant

    @property
    def plan(self) -> TilePlan:
        return self.variant.plan


def _variant_id(device: str, head_dim: int, plan: TilePlan) -> str:
    return f"{device}-d{head_dim}-w{plan.warps}-k{plan.block_k}-s{plan.stages}"


def _enumerate() -> tuple[list[Case], list[str]]:
    """Every distinct (device, compile options) the planner emits over HEAD_DIMS x PROBLEMS, and the
    (device, head dim, problem) combinations it refused (ValueError: no tiling fits), which is allowed."""
    cases: dict[tuple, Case] = {}
    refused = []
    for device, arch in DEVICES.items():
        spec_device = catalog.lookup(device)
        for head_dim in HEAD_DIMS:
            for batch, heads, seqlen_q, seqlen_k in PROBLEMS:
                spec = AttentionSpec(batch=batch, heads=heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim,
                                     dtype="float16", causal=True, device="cuda:0")
                try:
                    plan = wmma.plan(spec, spec_device)
                except ValueError as error:
                    refused.append(f"{device} {spec.label()}: {error}")
                    continue
                layouts = (None, SM80_ACCUMULATOR) if device in REGISTER_SOFTMAX_DEVICES else (None,)
                for layout in layouts:
                    variant = Variant(head_dim=head_dim, plan=plan, causal=True, bf16=False, window=True,
                                      vector_loads=head_dim % 8 == 0, accumulator=layout)
                    # the plan also carries work units and traffic figures that differ per problem; what
                    # is compiled is decided by the options alone
                    key = (device, variant.options())
                    if key not in cases:
                        cases[key] = Case("", device, arch, variant, spec.label())
    named: dict[str, Case] = {}
    for case in cases.values():
        p = case.plan
        base = _variant_id(case.device, case.variant.head_dim, p) + ("-reg" if case.variant.accumulator else "")
        name = base if base not in named else f"{base}-b{p.backward.warps}n{p.backward.block_q}"
        suffix = 2
        while name in named:
            name, suffix = f"{base}-{suffix}", suffix + 1
        named[name] = Case(name, case.device, case.arch, case.variant, case.problem)
    return list(named.values()), refused


CASES, REFUSED = _enumerate()

# The score-mask variants (attn_mask bool / additive, key_padding_mask: compile-time MASK, MASK_FLOAT32,
# KEY_PADDING) on the two code paths they change: Volta's shared-memory softmax (sm_70; Turing runs the same
# source) and the register softmax that sm_80+ runs (SM80_ACCUMULATOR), each beside the plain variant of the
# same plan and dtype. Head dims 40 (element-by-element loads), 64 and 128 (the most registers); the problem
# is 2 x 8 heads x 1000 queries and keys, causal with a window (every Visibility check in play too).
MASK_DEVICES = {"v100": (70, None), "a100": (80, SM80_ACCUMULATOR)}
MASK_HEAD_DIMS = (40, 64, 128)
MASK_KINDS = {  # id -> Variant fields
    "plain": {},
    "bool": {"mask": "bool"},
    "additive": {"mask": "additive"},  # read in the inputs' dtype
    "additive32-padding": {"mask": "additive", "mask_float32": True, "key_padding": True},
    "padding": {"key_padding": True},
}
BF16_MASK_KINDS = ("plain", "additive")  # sm_80 only: a bfloat16 mask read as it is


def _mask_cases() -> list[Case]:
    cases = []
    for device, (arch, layout) in MASK_DEVICES.items():
        for head_dim in MASK_HEAD_DIMS:
            spec = AttentionSpec(batch=2, heads=8, seqlen_q=1000, seqlen_k=1000, head_dim=head_dim, dtype="float16",
                                 causal=True, device="cuda:0")
            plan = wmma.plan(spec, catalog.lookup(device))
            for bf16 in (False, True) if arch >= 80 and head_dim >= 64 else (False,):
                for kind, fields in MASK_KINDS.items():
                    if bf16 and kind not in BF16_MASK_KINDS:
                        continue
                    variant = Variant(head_dim=head_dim, plan=plan, causal=True, bf16=bf16, window=True,
                                      vector_loads=head_dim % 8 == 0, accumulator=layout, **fields)
                    cases.append(Case(f"{device}-d{head_dim}-{kind}" + ("-bf16" if bf16 else ""), device, arch, variant,
                                      spec.label()))
    return cases


MASK_CASES = _mask_cases()
PLAIN_OF = {case.id: next(c for c in MASK_CASES if c.device == case.device and c.variant == dataclasses.replace(
    case.variant, mask=None, mask_float32=False, key_padding=False)) for case in MASK_CASES}
# What a mask may add to a kernel's spill stores over the plain variant of its plan (which the checks above
# hold to SPILL_TRADE_BYTES on sm_70/sm_75; on sm_80 the plain bfloat16 variants already spill 24 B (d64) and
# 48 B (d128) in dK/dV at the cap). Measured with CUDA 12.9 ptxas: on sm_70 a mask costs the kernels 0-15
# registers (the forward at d128 goes from 240 to the cap, spilling 4-8 B); on sm_80, where the register
# softmax stages a tile's masks in shared memory first (stage_bias in the .cu file), -66..+40 registers and
# at most 12 B more spilled (the d40 forward: 128 registers, 12 B). Read straight from global memory per
# fragment element instead, the masked dK/dV kernel went from 168 registers to the cap.
MASK_SPILL_BYTES = SPILL_TRADE_BYTES

UNAVAILABLE = cupy_offline.unavailable_reason()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None,
                                reason=f"offline CUDA 12 compilation unavailable: {UNAVAILABLE}")


@dataclass(frozen=True)
class Build:
    reports: dict | None  # kernel name -> cupy_offline.KernelReport
    error: str | None
    seconds: float


def _build(case: Case) -> Build:
    start = time.perf_counter()
    try:
        reports = cupy_offline.compile_variant(case.variant, case.arch)
    except cupy_offline.OfflineCompileError as error:
        return Build(None, str(error), time.perf_counter() - start)
    return Build(reports, None, time.perf_counter() - start)


class _Builds:
    """Compiles on demand, each case once; ``prefetch`` queues many at once on the thread pool."""

    def __init__(self, workers: int):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nvrtc")
        self.futures: dict[str, Future] = {}

    def prefetch(self, cases) -> None:
        for case in cases:
            self.future(case)

    def future(self, case: Case) -> Future:
        if case.id not in self.futures:
            self.futures[case.id] = self.executor.submit(_build, case)
        return self.futures[case.id]

    def get(self, case: Case) -> Build:
        return self.future(case).result()


def _workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


@pytest.fixture(scope="module")
def builds(request):
    pool = _Builds(_workers())
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # under xdist each worker compiles only what it runs
        selected = {}
        for item in request.session.items:
            callspec = getattr(item, "callspec", None)
            if item.module is request.module and callspec is not None and "case" in callspec.params:
                selected.setdefault(callspec.params["case"].id, callspec.params["case"])
        pool.prefetch(selected.values())
    yield pool
    pool.executor.shutdown(wait=True, cancel_futures=True)


def _reports(builds: _Builds, case: Case) -> dict:
    build = builds.get(case)
    if build.reports is None:
        pytest.fail(f"{case.id} does not compile (see test_compiles[{case.id}]):\n{build.error}", pytrace=False)
    return build.reports


def _backward_estimate(plan: TilePlan) -> int:
    try:
        return wmma.backward_registers(plan.head_dim_padded, plan.backward.block_q)  # streamed tile: block_n
    except TypeError:  # the one-argument form (no block_n)
        return wmma.backward_registers(plan.head_dim_padded)


def _where(case: Case) -> str:
    p = case.plan
    return (f"{case.id} (sm_{case.arch}, planned for {case.problem}; forward {p.warps} warps x {p.block_k} keys, "
            f"backward {p.backward.warps} warps x {p.backward.block_q}; {' '.join(case.variant.options())})")


parametrize = pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])


def test_enumeration():
    """Both devices emit variants; problems the planner refused (ValueError: no tiling fits) are allowed and listed."""
    for device in DEVICES:
        assert any(case.device == device for case in CASES), f"the planner emitted no variant for {device}"
    if REFUSED:
        warnings.warn(f"not emitted ({len(REFUSED)} problems refused by the planner): " + "; ".join(REFUSED[:20]),
                      stacklevel=1)


@parametrize
def test_compiles(builds, case):
    build = builds.get(case)
    assert build.error is None, f"{_where(case)}\n{build.error}"
    missing = set(KERNELS) - set(build.reports)
    assert not missing, f"ptxas reported no {sorted(missing)} for {_where(case)}: {sorted(build.reports)}"
    for name in KERNELS:
        assert build.reports[name].registers <= MAX_REGISTERS, f"{name} of {_where(case)}: {build.reports[name]}"


def _assert_in_band(report, predicted: int, band: tuple[float, float], case: Case) -> None:
    low, high = band
    assert low * predicted <= report.registers <= high * predicted, (
        f"{report.kernel} uses {report.registers} registers, the plan estimates {predicted} "
        f"(band {low}x..{high}x): {_where(case)}")


@parametrize
def test_forward_registers(builds, case):
    forward = _reports(builds, case)["attention_forward"]
    assert forward.registers <= MAX_REGISTERS
    _assert_in_band(forward, case.plan.registers_per_thread, FORWARD_BAND, case)


@parametrize
def test_backward_registers(builds, case):
    reports = _reports(builds, case)
    if case.plan.backward is None:
        unlaunched = ", ".join(f"{name} {reports[name].registers} registers, {reports[name].spill_stores} B spill stores"
                               for name in ("attention_backward_dkdv", "attention_backward_dq"))
        pytest.skip(f"no backward planned (head dim {case.plan.head_dim_padded}): the backward kernels are compiled at "
                    f"the smallest size and never launched ({unlaunched})")
    _assert_in_band(reports["attention_backward_dkdv"], _backward_estimate(case.plan), BACKWARD_BAND, case)


@parametrize
def test_spills(builds, case):
    reports = _reports(builds, case)
    launched = {"attention_forward": case.plan.registers_per_thread, "attention_backward_delta": None}
    if case.plan.backward is not None:
        # the dQ kernel holds one accumulator set where dK/dV holds two: the dK/dV estimate bounds it
        launched["attention_backward_dkdv"] = launched["attention_backward_dq"] = _backward_estimate(case.plan)
    accepted, refused = [], []
    for name, report in sorted(reports.items()):
        if not (report.spill_stores or report.spill_loads):
            continue
        figures = (f"{name}: {report.registers} registers, {report.spill_stores} B spill stores, "
                   f"{report.spill_loads} B spill loads, {report.stack_frame} B stack frame")
        if name not in launched:
            continue  # no backward planned: never launched (test_backward_registers's skip reason has its figures)
        predicted = launched[name]
        band_high = FORWARD_BAND[1] if name == "attention_forward" else BACKWARD_BAND[1]
        small = report.spill_stores <= SPILL_TRADE_BYTES
        if small and report.registers < MAX_REGISTERS:
            accepted.append(f"{figures} (ptxas's occupancy trade)")
        elif small and predicted is not None and predicted * band_high >= MAX_REGISTERS:
            accepted.append(f"{figures} (at the cap; estimate {predicted} is near the limit)")
        else:
            refused.append(f"{figures} (estimate {predicted})")
    if accepted:
        warnings.warn(f"spills in {case.id}: " + "; ".join(accepted), stacklevel=1)
    assert not refused, f"spills in {_where(case)}:\n  " + "\n  ".join(refused)


mask_parametrize = pytest.mark.parametrize("case", MASK_CASES, ids=[case.id for case in MASK_CASES])


@mask_parametrize
def test_mask_variant_compiles(builds, case):
    """Every kernel of a score-mask variant compiles for sm_70 and sm_80, at or under 255 registers, a
    launched kernel spilling at most MASK_SPILL_BYTES more than the plain variant, the forward in its band."""
    reports = _reports(builds, case)
    assert set(KERNELS) <= set(reports), sorted(reports)
    launched = KERNELS if case.plan.backward is not None else ("attention_forward", "attention_backward_delta")
    plain = _reports(builds, PLAIN_OF[case.id])
    for name in launched:
        report = reports[name]
        assert report.registers <= MAX_REGISTERS, f"{report}: {_where(case)}"
        assert report.spill_stores <= plain[name].spill_stores + MASK_SPILL_BYTES, (
            f"{report} (the plain variant spills {plain[name].spill_stores} B): {_where(case)}")
    _assert_in_band(reports["attention_forward"], case.plan.registers_per_thread, FORWARD_BAND, case)
    if case.plan.backward is not None:  # the lower end of the band: no kernel lost its accumulators
        dkdv = reports["attention_backward_dkdv"]
        assert dkdv.registers >= BACKWARD_BAND[0] * _backward_estimate(case.plan), f"{dkdv}: {_where(case)}"
    extra = {name: reports[name].registers - plain[name].registers for name in launched}
    if any(reports[name].spill_stores for name in launched):
        warnings.warn(f"{case.id}: registers vs plain {extra}, spills "
                      f"{ {name: reports[name].spill_stores for name in launched} }", stacklevel=1)


def test_plain_variant_has_no_mask_parameters(builds):
    """A call without masks compiles the kernels it always had: the mask and padding pointers and strides
    (5 + 3 parameters) exist only in the variants that use them."""
    import re

    plain = next(case for case in MASK_CASES if case.id == "v100-d64-plain")
    both = next(case for case in MASK_CASES if case.id == "v100-d64-additive32-padding")
    counts = {}
    for case in (plain, both):
        ptx = cupy_offline.compile_ptx(case.variant, case.arch)
        counts[case.id] = {name: len(set(re.findall(rf"\b{name}_param_(\d+)", ptx))) for name in KERNELS}
    assert counts[plain.id]["attention_forward"] == 27, counts
    for name in KERNELS:
        wanted = counts[plain.id][name] + (0 if name == "attention_backward_delta" else 8)
        assert counts[both.id][name] == wanted, (name, counts)


def _table() -> None:
    """The measured registers and spills of every case against the plan's estimates, and compile times."""
    pool = _Builds(_workers())
    start = time.perf_counter()
    pool.prefetch(CASES)
    print(f"{'variant':22} {'fwd':>11} {'ratio':>5} {'spill':>5} | {'dkdv':>11} {'ratio':>5} {'spill':>5} | "
          f"{'dq':>3} {'spill':>5} | {'delta':>5} | time")
    for case in CASES:
        build = pool.get(case)
        if build.reports is None:
            print(f"{case.id:22} FAILED: {build.error.splitlines()[0]}")
            continue
        r, p = build.reports, case.plan
        f, kv, dq = r["attention_forward"], r["attention_backward_dkdv"], r["attention_backward_dq"]
        b = _backward_estimate(p) if p.backward is not None else None
        print(f"{case.id:22} {f.registers:>3} / {p.registers_per_thread:>3}   {f.registers / p.registers_per_thread:5.2f} "
              f"{f.spill_stores:>5} | {kv.registers:>3} / {b if b else '-':>3}   "
              f"{kv.registers / b if b else float('nan'):5.2f} {kv.spill_stores:>5} | {dq.registers:>3} {dq.spill_stores:>5} | "
              f"{r['attention_backward_delta'].registers:>5} | {build.seconds:.1f}s")
    print(f"{len(CASES)} variants in {time.perf_counter() - start:.1f}s on {_workers()} threads")
    _mask_table(pool)
    pool.executor.shutdown()


def _mask_table(pool: _Builds) -> None:
    """The score-mask variants: registers / spill stores per kernel, and the registers added to the plain variant."""
    pool.prefetch(MASK_CASES)
    print(f"\n{'mask variant':30} {'forward':>14} {'dkdv':>14} {'dq':>14}")
    for case in MASK_CASES:
        build, plain = pool.get(case), pool.get(PLAIN_OF[case.id])
        if build.reports is None or plain.reports is None:
            print(f"{case.id:30} FAILED: {(build.error or plain.error).splitlines()[0]}")
            continue
        cells = []
        for name in ("attention_forward", "attention_backward_dkdv", "attention_backward_dq"):
            r, extra = build.reports[name], build.reports[name].registers - plain.reports[name].registers
            cells.append(f"{r.registers:>3}/{r.spill_stores:<3} ({extra:+d})")
        print(f"{case.id:30} " + " ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    if UNAVAILABLE:
        raise SystemExit(UNAVAILABLE)
    _table()
