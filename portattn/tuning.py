"""Autotuning: time tile configurations around the planner's plan and keep the fastest, per device and shape.

The planner's plan is a prediction; ``tune`` checks it. It sweeps the configurations a Triton user
would try -- forward ``block_q`` x ``block_k`` x warps x stages, and, when asked, the backward's
owned/streamed blocks, warps, stages and fused-or-separate dQ -- on the caller's own arrays, and
remembers the winner for this (backend, device, problem) in memory and in a JSON file
(``$PORTATTN_TUNE_CACHE``, default ``tuned.json`` in platformdirs' user cache folder). ``attention(...,
autotune=True)`` uses a remembered winner or tunes on the spot; a default call never tunes.

Configurations that do not fit the device (too much shared memory) fail to launch; they are
recorded as errors and skipped. Timing uses CUDA events through ``triton.testing.do_bench``
(median, L2 flushed between runs) on GPUs and the host clock elsewhere.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from .extras import NONE, Extras
from .tiling import TilePlan
from .tiling.planner import next_power_of_two
from .timing import time_callable

# The spaces a Triton user sweeps (the Triton tutorial's and FlexAttention's knobs), keyed by the
# names ``TilePlan.value`` / ``TilePlan.with_changes`` take: ``backward.<field>`` for the backward's.
FORWARD_SPACE = {"block_q": (64, 128), "block_k": (32, 64, 128), "warps": (4, 8), "stages": (2, 3, 4)}
BACKWARD_SPACE = {
    "backward.block_k": (64, 128),  # keys a dK/dV program owns (queries a dQ program owns)
    "backward.block_q": (32, 64),  # queries it streams per step (keys, in the dQ pass)
    "backward.warps": (4, 8),
    "backward.stages": (2, 3),
    "backward.dq_separate": (True, False),
}
_FORWARD_FIELDS = tuple(FORWARD_SPACE)
_BACKWARD_FIELDS = tuple(BACKWARD_SPACE)
# cache files written before the backward had a type of its own name its fields "backward_<field>"
_LEGACY_NAMES = {name.replace(".", "_"): name for name in _BACKWARD_FIELDS}


@dataclass(frozen=True)
class Trial:
    """One configuration's timing: ``seconds`` is the median, or None with ``error`` when it failed."""

    plan: TilePlan
    seconds: float | None
    error: str | None = None

    def config(self, fields) -> dict:
        return {name: self.plan.value(name) for name in fields}


def candidates(plan: TilePlan, space: dict, retile=None) -> list[TilePlan]:
    """``plan`` itself first, then every point of ``space`` applied to it (no repeats). ``retile``
    (a backend's ``retile``) applies a point, or drops it (None) when the backend's kernels cannot run it."""
    retile = retile or (lambda p, changes: p.with_changes(changes))
    plans = [plan]
    for values in itertools.product(*space.values()):
        other = retile(plan, dict(zip(space, values)))
        if other is not None and other not in plans:
            plans.append(other)
    return plans


def _fits_problem(plan: TilePlan, seqlen_q: int, seqlen_k: int) -> bool:
    """Blocks much larger than the sequence only add masked work; keep the sweep to useful ones
    (the cap the planner's own block choice uses)."""
    cap = lambda n: max(16, next_power_of_two(n))  # noqa: E731
    return plan.block_q <= cap(seqlen_q) and plan.block_k <= cap(seqlen_k)


def _respects_sparsity(plan: TilePlan, spec) -> bool:
    """Planner rule S1 holds for every swept configuration: with a block mask, no tile may straddle two
    sparse blocks (the kernels index one sparse block per tile)."""
    if spec.block_size is None:
        return True
    block_q, block_k = spec.block_size
    smallest = min(block_q, block_k)  # the backward's dQ pass swaps the roles of queries and keys
    return (plan.block_q <= block_q and plan.block_k <= block_k
            and (plan.backward is None or max(plan.backward.block_q, plan.backward.block_k) <= smallest))


def measure(fn, device: str, *, warmup_ms: float = 10, rep_ms: float = 40) -> float:
    """Median seconds per call of ``fn``: CUDA events via do_bench on GPUs, the host clock elsewhere."""
    if device.startswith("cuda"):
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e-3
    return statistics.median(time_callable(fn, 3, warmup=1))


def _try(fn, plan: TilePlan, device: str) -> Trial:
    try:
        fn()  # compile and check it launches before timing
        return Trial(plan, measure(fn, device))
    except Exception as error:  # noqa: BLE001 - a config that cannot launch (out of shared memory) is a result
        text = str(error).strip().splitlines()
        return Trial(plan, None, text[0] if text else type(error).__name__)


def sweep_forward(call, q, k, v, space: dict = FORWARD_SPACE, extras: Extras = NONE) -> list[Trial]:
    """Forward time of the plan and of every configuration in ``space``, on these arrays."""
    spec = call.spec
    plans = [p for p in candidates(call.plan, space, call.backend.retile)
             if p is call.plan or (_fits_problem(p, spec.seqlen_q, spec.seqlen_k) and _respects_sparsity(p, spec))]
    return [_try(lambda p=p: dataclasses.replace(call, plan=p).forward(q, k, v, extras), p, spec.device) for p in plans]


def sweep_backward(call, q, k, v, grad_out, space: dict = BACKWARD_SPACE, extras: Extras = NONE) -> list[Trial]:
    """Backward-kernel time (forward done once, outside the timing) of the plan and of ``space``."""
    out, lse = call.forward(q, k, v, extras)
    trials = []
    for p in candidates(call.plan, space, call.backend.retile):
        if p is not call.plan and not _respects_sparsity(p, call.spec):
            continue
        step = dataclasses.replace(call, plan=p)
        trials.append(_try(lambda step=step: step.backward(grad_out, q, k, v, out, lse, extras), p, call.spec.device))
    return trials


def best(trials: list[Trial]) -> Trial:
    timed = [t for t in trials if t.seconds is not None]
    if not timed:
        raise RuntimeError("no configuration ran: " + "; ".join(sorted({t.error or "" for t in trials})))
    return min(timed, key=lambda t: t.seconds)


# ----------------------------------------------------------------------------------------------
# the cache of winners


def cache_path() -> Path:
    """``$PORTATTN_TUNE_CACHE``, else ``tuned.json`` in the platform's user cache folder (platformdirs:
    ``$XDG_CACHE_HOME/portattn`` or ``~/.cache/portattn`` on Linux, ``~/Library/Caches/portattn`` on macOS)."""
    if os.environ.get("PORTATTN_TUNE_CACHE"):
        return Path(os.environ["PORTATTN_TUNE_CACHE"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("portattn", appauthor=False)) / "tuned.json"


_MEMORY: dict[str, dict] = {}


def cache_key(call) -> str:
    device = call.backend.device(call.spec)
    return f"{call.backend.name}|{device.key}|{call.spec.label()}|{call.spec.layout}"


def _load_file() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def remembered(call) -> TilePlan | None:
    """The tuned plan for this call if this process or the cache file has one."""
    key = cache_key(call)
    entry = _MEMORY.get(key) or _load_file().get(key)
    if entry is None:
        return None
    _MEMORY[key] = entry
    entry = {_LEGACY_NAMES.get(name, name): value for name, value in entry.items()}
    fields = {name: entry[name] for name in _FORWARD_FIELDS + _BACKWARD_FIELDS if name in entry}
    return call.backend.retile(call.plan, fields)


def _remember(call, plan: TilePlan, save: bool) -> None:
    key = cache_key(call)
    fields = _FORWARD_FIELDS + (_BACKWARD_FIELDS if plan.backward is not None else ())
    entry = {name: plan.value(name) for name in fields}
    _MEMORY[key] = entry
    if save:
        path = cache_path()
        table = _load_file()
        table[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
            tmp.replace(path)
        except OSError:
            pass  # a read-only home: the winner is still kept for this process


def tune_call(call, q, k, v, extras: Extras = NONE, *, backward: bool = False, save: bool = True):
    """``call`` with its plan replaced by the fastest forward (and, with ``backward``, backward) configuration."""
    import numpy as np

    winner = best(sweep_forward(call, q, k, v, extras=extras)).plan
    if backward:
        grad_out = _like(q, np.random.default_rng(0))
        call = dataclasses.replace(call, plan=winner)
        winner = best(sweep_backward(call, q, k, v, grad_out, extras=extras)).plan
    _remember(call, winner, save)
    return dataclasses.replace(call, plan=winner)


def tuned_call(call, q, k, v, extras: Extras = NONE):
    """``call`` with a remembered tuned plan, tuning now (and remembering) when there is none."""
    plan = remembered(call)
    if plan is not None:
        return dataclasses.replace(call, plan=plan)
    return tune_call(call, q, k, v, extras, backward=call.spec.requires_grad)


def _like(x, rng):
    """Random data shaped and typed like ``x`` (a gradient to time the backward with)."""
    from . import arrays

    if arrays.is_torch(x):
        import torch

        return torch.randn(x.shape, dtype=x.dtype, device=x.device)
    return rng.standard_normal(x.shape).astype(x.dtype)
