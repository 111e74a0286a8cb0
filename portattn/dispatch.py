"""Choosing a backend: which can run a call (their reasons), and which should (their priority).

``select`` honours an explicit name or, for ``"auto"``, takes the highest ``auto_priority`` among
backends with no reason to refuse. Every refusal carries the complete list of reasons, and an
error names the backends that would have worked.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

from .backends import Backend, registry
from .devices import DeviceSpec
from .spec import AttentionSpec
from .tiling import TilePlan


@dataclass(frozen=True)
class Candidate:
    name: str
    reasons: tuple[str, ...]  # why it cannot run this call; empty when it can
    priority: int | None  # its auto rank on the call's device kind; None: never picked by auto

    @property
    def can_run(self) -> bool:
        return not self.reasons


def candidates(spec: AttentionSpec) -> list[Candidate]:
    return [
        Candidate(name, tuple(backend.not_supported_reasons(spec)), backend.auto_priority.get(spec.device_kind))
        for name, backend in registry().items()
    ]


def _format_refusals(refused: list[Candidate]) -> str:
    return "\n".join(f"  {c.name}: " + "; ".join(c.reasons) for c in refused)


def check_name(requested: str) -> str:
    """The backend name as registered (names are case-insensitive: "Numba" is "numba"); ValueError
    listing the known ones for anything else."""
    backends = registry()
    name = requested.strip().lower() if isinstance(requested, str) else None
    if name is None or (name != "auto" and name not in backends):
        raise ValueError(f"unknown backend {requested!r}; use 'auto' or one of: {', '.join(backends)}")
    return name


def select(spec: AttentionSpec, requested: str = "auto") -> Backend:
    """The backend for ``spec``. Cached per (spec, name): a backend's availability is fixed for the
    process and its refusals depend on the spec alone, so a repeated call (a training step) costs a
    dictionary lookup, not a round of capability checks."""
    return _select(spec, check_name(requested))


@functools.lru_cache(maxsize=4096)
def _select(spec: AttentionSpec, requested: str) -> Backend:
    """Asks only as many backends as it takes: the named one, or for ``"auto"`` each in priority order until
    one can run the call. Every backend's reasons are gathered only for an error, whose message lists them
    (a backend's reasons can cost a plan of its own, and a decoding step meets a new key length each time)."""
    backends = registry()
    if requested != "auto":
        reasons = tuple(backends[requested].not_supported_reasons(spec))
        if reasons:
            listing = "\n".join(f"  - {r}" for r in reasons)
            able = [c.name for c in candidates(spec) if c.can_run]
            alternatives = ", ".join(able) if able else "none"
            raise ValueError(f"backend {requested!r} cannot run {spec.label()}:\n{listing}\nbackends that can: {alternatives}")
        return backends[requested]
    ranked = sorted((name for name, backend in backends.items() if backend.auto_priority.get(spec.device_kind) is not None),
                    key=lambda name: -backends[name].auto_priority[spec.device_kind])  # stable: registry order on ties
    for name in ranked:
        if not backends[name].not_supported_reasons(spec):
            return backends[name]
    everyone = candidates(spec)
    able = [c.name for c in everyone if c.can_run]
    refused = [c for c in everyone if not c.can_run]
    if LAST_RESORT in able:
        _warn_last_resort(spec, refused)
        return backends[LAST_RESORT]
    raise ValueError(
        f"no backend can run {spec.label()} on {spec.device} automatically:\n{_format_refusals(refused)}"
        + (f"\nusable only by name: {', '.join(able)}" if able else ""))


# What auto runs when nothing faster can (a numpy-only install): exact but slow, so it says so, once
LAST_RESORT = "reference"
_WARNED: list[bool] = []


def _warn_last_resort(spec: AttentionSpec, refused: list[Candidate]) -> None:
    if _WARNED:
        return
    _WARNED.append(True)
    extras = sorted({extra for c in refused for extra in [registry()[c.name].extra] if extra})
    warnings.warn(
        f"portattn: no fast backend can run {spec.label()} here, so backend='auto' computes it with the float64 "
        f"reference backend (exact, but slow and O(N^2) in memory). Install one: "
        + ", ".join(f"pip install 'portattn[{extra}]'" for extra in extras)
        + "; `portattn info` lists each backend's reasons.", RuntimeWarning, stacklevel=4)


@dataclass(frozen=True)
class Explanation:
    """What ``auto`` (or a named backend) would do with a call, and why the others were not used."""

    spec: AttentionSpec
    chosen: str | None
    device: DeviceSpec | None
    plan: TilePlan | None
    candidates: tuple[Candidate, ...]
    error: str | None = None  # set when no backend can run the call

    def __str__(self) -> str:
        lines = [f"call: {self.spec.label()} on {self.spec.device} ({self.spec.array_kind}, layout {self.spec.layout})"]
        if self.chosen is None:
            lines.append(f"no backend chosen: {self.error}")
        else:
            lines.append(f"backend: {self.chosen} on {self.device.name}")
            lines.extend("  " + line for line in self.plan.describe().splitlines())
        others = [c for c in self.candidates if c.name != self.chosen]
        if others:
            lines.append("other backends:")
        for c in others:
            if c.reasons:
                lines.append(f"  {c.name}: cannot run it: " + "; ".join(c.reasons))
            elif c.priority is None:
                lines.append(f"  {c.name}: could run it, but auto never picks it on {self.spec.device_kind}")
            else:
                lines.append(f"  {c.name}: could run it, ranked below (priority {c.priority})")
        return "\n".join(lines)


def explain(spec: AttentionSpec, requested: str = "auto") -> Explanation:
    requested = check_name(requested)
    ranked = tuple(candidates(spec))
    try:
        backend = select(spec, requested)
    except ValueError as error:
        return Explanation(spec, None, None, None, ranked, str(error))
    device = backend.device(spec)
    return Explanation(spec, backend.name, device, backend.plan(spec, device), ranked)
