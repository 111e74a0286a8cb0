"""Clocks and memory probes: how one call of a contender is timed and how much memory it takes.

A *clock* times a call to completion and returns seconds per call: the host clock
(``time.perf_counter``) with an optional ``sync`` before each read (``queue.finish`` for OpenCL),
or CUDA events recorded on torch's current stream around the call (GPU time, no host jitter;
portattn's cupy kernels run on that stream too). Device clocks time short calls in back-to-back
batches (``_Clock``). Contenders take turns (``time_interleaved``) and the median is reported.

A *memory probe* runs one call and returns (bytes, how it was measured) or (None, why not):
torch's CUDA allocator peak, the OpenCL buffers a call creates, or the process's peak resident
set on Linux, whose high-water mark can be reset (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import ctypes
import math
import time
from pathlib import Path
from typing import Callable

Sync = Callable[[], object] | None


class _Clock:
    """Times one call of ``fn``; subclasses say how (``_time``: seconds for ``n`` calls back to back).

    With ``target_s`` set, the first call sizes a batch: later timings run enough calls back to back
    to last about ``target_s`` (at most ``MAX_CALLS``) and return the time per call. On a GPU the host
    then enqueues the next call while the device runs the current one, so the Python overhead of a
    call hides behind the kernels as it does in a model (and in ``triton.testing.do_bench``) instead
    of being added to a 0.1 ms kernel.
    """

    MAX_CALLS = 100
    label = "clock"

    def __init__(self, target_s: float = 0.0):
        self.target_s, self.calls = target_s, None

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.calls is None:
            elapsed = self._time(fn, 1)
            self.calls = 1 if self.target_s <= 0 or elapsed <= 0 else max(1, min(self.MAX_CALLS, math.ceil(self.target_s / elapsed)))
            return elapsed
        return self._time(fn, self.calls) / self.calls

    @property
    def name(self) -> str:
        return self.label if (self.calls or 1) == 1 else f"{self.label}, {self.calls} calls back to back per timing"

    def _time(self, fn, n: int) -> float:
        raise NotImplementedError


class HostClock(_Clock):
    """``time.perf_counter`` around the calls and ``sync`` (which waits for the device, if any)."""

    def __init__(self, sync: Sync = None, name: str = "host clock", target_s: float = 0.0):
        super().__init__(target_s)
        self.sync, self.label = sync, name

    def _time(self, fn, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if self.sync is not None:
            self.sync()
        return time.perf_counter() - start


class CudaEventClock(_Clock):
    """``torch.cuda.Event`` pairs on the current stream of ``device``: the GPU's time for the calls."""

    label = "CUDA events"

    def __init__(self, device: str, target_s: float = 0.0):
        import torch

        super().__init__(target_s)
        self.torch, self.device = torch, torch.device(device)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def _time(self, fn, n: int) -> float:
        with self.torch.cuda.device(self.device):
            self.start.record()
            for _ in range(n):
                fn()
            self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


def time_callable(fn: Callable[[], object], repeats: int, *, warmup: int = 1, sync: Sync = None, clock=None) -> list[float]:
    """Seconds per call of ``fn``, ``repeats`` times (may be 0), after ``warmup`` untimed calls.

    ``clock`` times one call (default: the host clock, with ``sync`` -- e.g. ``torch.cuda.synchronize``
    -- before each read, so asynchronous devices are timed to completion).
    """
    clock = clock or HostClock(sync)
    for _ in range(warmup):
        clock(fn)
    return [clock(fn) for _ in range(repeats)]


def time_interleaved(fns: dict, repeats, *, warmup: int = 1, sync: Sync = None, clocks: dict | None = None,
                     errors: dict | None = None) -> dict[str, list[float]]:
    """Seconds per call for each of ``fns``, their repeats interleaved (a, b, c, b, c, a, ...).

    On a shared machine the load drifts over seconds; taking turns spreads that drift over every
    contender instead of charging it to whichever ran during the slow spell, so ratios stay fair.
    ``repeats`` is one count for all or a {name: count} (slow contenders get fewer, see
    ``repeats_within``); a name drops out of the rounds once it has its count. ``clocks`` gives each
    name its clock (default: the host clock with ``sync``). With ``errors`` given, a call that raises
    records its message there and its contender leaves the rounds, instead of the exception ending
    the run (a GPU kernel may run out of memory on its third call).
    """
    names = list(fns)
    counts = repeats if isinstance(repeats, dict) else {name: repeats for name in names}
    clocks = {name: (clocks or {}).get(name) or HostClock(sync) for name in names}
    times: dict = {name: [] for name in names}
    live = list(names)

    def one(name, record: bool) -> None:
        try:
            elapsed = clocks[name](fns[name])
        except Exception as error:  # noqa: BLE001 - only when the caller asked for errors to be kept
            if errors is None:
                raise
            errors[name] = reason(error)
            live.remove(name)
            return
        if record:
            times[name].append(elapsed)

    for name in names:
        for _ in range(warmup):
            if name in live:
                one(name, record=False)
    for repeat in range(max([1, *counts.values()])):
        order = [name for name in live if counts[name] > repeat or (repeat == 0 and counts[name] < 1)]
        shift = repeat % len(order) if order else 0
        for name in order[shift:] + order[:shift]:
            if name in live:
                one(name, record=True)
    return times


def repeats_within(seconds_per_call: float, repeats: int, *, budget_s: float, at_least: int = 5) -> int:
    """``repeats``, fewer when that many calls would take more than ``budget_s`` (never below ``at_least``,
    nor above ``repeats``): a 0.5 s OpenCL call need not run 30 times beside 1 ms kernels."""
    if seconds_per_call <= 0:
        return repeats
    return max(min(at_least, repeats), min(repeats, int(budget_s / seconds_per_call)))


def reason(error: BaseException | Warning | str, limit: int = 240) -> str:
    """An error as one table cell: its lines joined (portattn's refusals list reasons as "- ..." lines
    under a heading), cut at ``limit`` characters (a compiler's message can run to pages)."""
    lines = [line.strip().removeprefix("- ") for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# memory


def torch_cuda_peak(fn: Callable[[], object], device: str):
    """Growth of torch's CUDA allocator peak during one call (what it allocates; the inputs excluded)."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated growth over one call"


def opencl_buffers(fn: Callable[[], object], queue):
    """The bytes of the OpenCL buffers one call creates (outputs and temporaries): the sum of every
    ``pyopencl.Buffer`` made meanwhile, an upper bound of the call's peak. OpenCL has no allocator
    statistics, so the constructor pyopencl's arrays use is counted for this one call and restored."""
    import pyopencl as cl

    made = []
    original = cl.Buffer

    def counting(*args, **kwargs):
        buffer = original(*args, **kwargs)
        made.append(buffer.size)
        return buffer

    cl.Buffer = counting
    try:
        out = fn()
        queue.finish()
    finally:
        cl.Buffer = original
    del out
    return sum(made), "sum of the pyopencl.Buffer sizes the call created"


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def _malloc_trim() -> None:
    """Return the C allocator's free memory to the OS (glibc), so that a call reusing memory freed by
    earlier calls faults its pages in again and shows in the resident set. No-op elsewhere."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def process_peak(fn: Callable[[], object], sync: Sync = None):
    """Growth of the process's peak resident memory over one call: Linux's ``VmHWM``, reset by writing
    5 to ``/proc/self/clear_refs``, after ``malloc_trim`` has handed freed memory back to the OS. It
    counts everything the call touches -- numpy and torch buffers, numba's tiles, PoCL's buffers."""
    try:
        _malloc_trim()
        _CLEAR_REFS.write_text("5")
        before = _status_bytes("VmRSS")
    except (OSError, KeyError) as error:
        return None, f"n/a: peak RSS needs Linux's /proc/self/clear_refs ({reason(error)})"
    out = fn()
    if sync is not None:
        sync()
    peak = _status_bytes("VmHWM")
    del out
    return max(0, peak - before), "growth of the process's peak RSS (VmHWM, after malloc_trim) over one call"
