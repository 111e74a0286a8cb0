"""Which attention calls one ring step needs: the local queries against the K/V block it holds.

Pure Python over ``Segment``s (where local rows sit in the global sequence). For every (query
segment, key segment) pair the global mask -- causal and/or a window ``(left, right)`` in global
positions -- is one of: nothing visible (the pair is skipped, never computed), everything visible
(a plain call), or a band that one top-left-aligned call expresses with ``causal=True`` or a
``window`` after dropping the leading keys or queries that see nothing. Pairs are then coalesced so
that a step is one call where it can be: the diagonal step of a causal ring is one causal call over
the concatenated chunks (zigzag keeps positions increasing), and a row or column of fully visible
pairs is one call.
"""

from __future__ import annotations

from typing import NamedTuple

from .sharding import Segment


class Task(NamedTuple):
    """One attention call: local query rows [q0, q1) against local key rows [k0, k1) of the block held,
    top-left aligned, with ``causal`` and ``window`` (None: no window)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool = False
    window: tuple | None = None

    @property
    def full(self) -> bool:
        return not self.causal and self.window is None


def global_band(causal: bool, window) -> tuple[int | None, int | None]:
    """(left, right) bounds on ``query position - key position`` ... as a window: None is unbounded."""
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def pair_task(qs: Segment, ks: Segment, causal: bool, window) -> Task | None:
    """The call for one (query segment, key segment) pair, or None when no query sees a key."""
    left, right = global_band(causal, window)
    delta = qs.start - ks.start
    # local query i, key j: visible iff -right' <= i - j <= left'
    lft = None if left is None else left - delta
    rgt = None if right is None else right + delta
    nq, nk = qs.length, ks.length
    if (lft is not None and lft < -(nk - 1)) or (rgt is not None and rgt < -(nq - 1)):
        return None
    q0, k0 = qs.local, ks.local
    if lft is not None and lft < 0:  # the first -lft keys are before every visible one: start the keys there
        k0, nk = k0 - lft, nk + lft
        rgt, lft = (None if rgt is None else rgt + lft), 0
    if rgt is not None and rgt < 0:  # the first -rgt queries see no key: start the queries there
        q0, nq = q0 - rgt, nq + rgt
        lft, rgt = (None if lft is None else lft + rgt), 0
    if lft is not None and lft >= nq - 1:
        lft = None
    if rgt is not None and rgt >= nk - 1:
        rgt = None
    if lft is None and rgt is None:
        return Task(q0, q0 + nq, k0, k0 + nk)
    if lft is None and rgt == 0:
        return Task(q0, q0 + nq, k0, k0 + nk, causal=True)
    return Task(q0, q0 + nq, k0, k0 + nk, window=(lft, rgt))


def _increasing(segs) -> bool:
    return all(a.start + a.length <= b.start for a, b in zip(segs, segs[1:]))


def _span(segs) -> tuple[int, int]:
    return segs[0].local, segs[-1].local + segs[-1].length


def plan_step(q_segs, k_segs, causal: bool, window) -> list[Task]:
    """The calls for the local queries (``q_segs``) against the K/V block held (``k_segs``)."""
    q_segs, k_segs = tuple(q_segs), tuple(k_segs)
    (qa, qb), (ka, kb) = _span(q_segs), _span(k_segs)
    if window is None and causal and [(s.start, s.length) for s in q_segs] == [(s.start, s.length) for s in k_segs] \
            and _increasing(q_segs):
        return [Task(qa, qb, ka, kb, causal=True)]  # the diagonal: local order is global order
    grid = {(a, b): pair_task(qs, ks, causal, window) for a, qs in enumerate(q_segs) for b, ks in enumerate(k_segs)}
    if all(t is not None and t.full for t in grid.values()):
        return [Task(qa, qb, ka, kb)]
    by_rows = _coalesce(grid, q_segs, k_segs, rows=True)
    by_cols = _coalesce(grid, q_segs, k_segs, rows=False)
    return by_rows if len(by_rows) <= len(by_cols) else by_cols


def _coalesce(grid, q_segs, k_segs, rows: bool) -> list[Task]:
    """Pairs as tasks, a whole row (one query segment against every key) or a whole column (every query
    against one key segment) of fully visible pairs as one task."""
    tasks = []
    outer, inner = (q_segs, k_segs) if rows else (k_segs, q_segs)
    (ia, ib) = _span(inner)
    for o, seg in enumerate(outer):
        line = [grid[(o, i)] if rows else grid[(i, o)] for i in range(len(inner))]
        if len(line) > 1 and all(t is not None and t.full for t in line):
            a, b = seg.local, seg.local + seg.length
            tasks.append(Task(a, b, ia, ib) if rows else Task(ia, ib, a, b))
        else:
            tasks.extend(t for t in line if t is not None)
    return tasks
