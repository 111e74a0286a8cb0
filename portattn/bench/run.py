"""Running the grid: every contender on every problem, timed in turns, ratios to the best peer.

For each problem the inputs are drawn once; each contender is set up and called once (compiling
whatever compiles -- a failure here becomes the row's reason, never an exception that stops the
grid), warmed up, then all are timed in turns and their medians compared. One more call of each
measures its memory. Everything runs in one process so ratios compare like with like.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass, field
from typing import Callable

from .. import timing
from .contenders import Inputs, Timed, device_kind, portattn_timed
from .peers import peer_timed
from .problems import Problem


@dataclass
class Result:
    """The timing of one backend or peer on one problem (``error`` set when it could not run)."""

    name: str
    role: str  # "portattn" or "peer"
    problem: Problem
    times_s: list[float] = field(default_factory=list)
    plan: str | None = None  # TilePlan.summary() for portattn backends
    error: str | None = None
    ratio_to_best_peer: float | None = None  # this row's GFLOP/s over the best peer's; >1 = faster
    best_peer: str | None = None
    memory_bytes: int | None = None
    memory_note: str | None = None  # how the memory was measured, or why it was not
    clock: str | None = None  # what timed it: "CUDA events", "host clock", ...

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_s) * 1e3 if self.times_s else None

    @property
    def gflops(self) -> float | None:
        return self.problem.flops / (self.median_ms * 1e-3) / 1e9 if self.times_s else None

    @property
    def gbps(self) -> float | None:
        """The problem's least bytes moved over the median time, GB/s (decoding's figure of merit)."""
        return self.problem.bytes_moved / (self.median_ms * 1e-3) / 1e9 if self.times_s else None


def setup(name: str, role: str, problem: Problem, inputs: Inputs) -> Timed:
    """The contender set up and called once; a warning torch gave before failing (SDPA says there
    why it has no kernel) is added to the error's message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            timed = portattn_timed(name, problem, inputs) if role == "portattn" else peer_timed(name, problem, inputs)
            timed.fn()  # the first call compiles, if anything compiles: a kernel that fails is reported, not timed
            if timed.sync is not None:
                timed.sync()
        except Exception as error:
            reasons = [timing.reason(w.message) for w in caught if issubclass(w.category, UserWarning)]
            raise RuntimeError(timing.reason(error) + (f" ({reasons[0]})" if reasons else "")) from error
    return timed


def _release(device: str) -> None:
    """Give the problem's device memory back before the next one (the flash grid's inputs are large)."""
    if device_kind(device) == "cuda":
        import torch

        torch.cuda.empty_cache()


def run_problem(problem: Problem, backends, peers, *, device: str = "cpu", repeats: int = 7, warmup: int = 1,
                budget_s: float | None = None, stage: Callable[[str], None] | None = None) -> list[Result]:
    """Every backend and peer on one problem, on the same inputs, timed in turns; ratios filled in.

    Each contender is called once when set up, then ``warmup`` more times (at least one, which also
    estimates its time), then timed ``repeats`` times -- fewer when that would take more than
    ``budget_s`` seconds (at least 5). ``stage(text)`` hears what is being done (for a progress bar).
    """
    stage = stage or (lambda text: None)
    results = [Result(name, role, problem) for role, names in (("portattn", backends), ("peer", peers)) for name in names]
    try:
        inputs = Inputs(problem, device)
    except Exception as error:  # noqa: BLE001 - e.g. out of memory for the inputs themselves
        for result in results:
            result.error = f"inputs: {timing.reason(error)}"
        return results
    timed: dict[int, Timed] = {}
    counts: dict[int, int] = {}
    errors: dict[int, str] = {}
    for index, result in enumerate(results):
        stage(f"{result.name} (set up)")
        try:
            timed[index] = setup(result.name, result.role, problem, inputs)
            result.plan = timed[index].plan
            seconds = [timed[index].clock(timed[index].fn) for _ in range(max(1, warmup))]
        except Exception as error:  # noqa: BLE001 - the row says why; the grid goes on
            result.error = timing.reason(error)
            timed.pop(index, None)
            continue
        counts[index] = repeats if budget_s is None else timing.repeats_within(min(seconds), repeats, budget_s=budget_s)
    stage("timing")
    times = time_in_turns(timed, counts, errors)
    for index, t in timed.items():
        result = results[index]
        result.clock = getattr(t.clock, "name", None)
        if index in errors:
            result.error = errors[index]
            continue
        result.times_s = times[index]
        stage(f"{result.name} (memory)")
        try:
            result.memory_bytes, result.memory_note = t.memory()
        except Exception as error:  # noqa: BLE001
            result.memory_note = f"n/a: {timing.reason(error)}"
    del timed, inputs
    _release(device)
    add_ratios(results)
    return results


def time_in_turns(timed: dict, counts: dict, errors: dict) -> dict:
    fns = {index: t.fn for index, t in timed.items()}
    clocks = {index: t.clock for index, t in timed.items()}
    return timing.time_interleaved(fns, counts, warmup=0, clocks=clocks, errors=errors)


def run_grid(problems, backends, peers, *, device: str = "cpu", repeats: int = 7, warmup: int = 1,
             budget_s: float | None = None, progress: Callable | None = None,
             after: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """``run_problem`` over ``problems``. ``progress(done, total, problem, stage)`` hears each step;
    ``after(results so far)`` runs after each problem (e.g. to save the JSON as the grid goes)."""
    results: list[Result] = []
    for done, problem in enumerate(problems):
        report = (lambda text, done=done, problem=problem: progress(done, len(problems), problem, text)) if progress else None
        if report:
            report("start")
        results.extend(run_problem(problem, backends, peers, device=device, repeats=repeats, warmup=warmup,
                                   budget_s=budget_s, stage=report))
        if after is not None:
            after(results)
    if progress:
        progress(len(problems), len(problems), None, "done")
    return results


def add_ratios(results: list[Result]) -> None:
    """Each timed row's GFLOP/s over the best peer's on the same problem."""
    best: dict[Problem, Result] = {}
    for r in results:
        if r.role == "peer" and r.gflops is not None and (r.problem not in best or r.gflops > best[r.problem].gflops):
            best[r.problem] = r
    for r in results:
        peer = best.get(r.problem)
        if peer is not None and r.gflops is not None:
            r.ratio_to_best_peer = r.gflops / peer.gflops
            r.best_peer = peer.name
