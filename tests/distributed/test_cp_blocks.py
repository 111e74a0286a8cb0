"""The ring's block planner against brute-force masks, and the merge by LSE -- no process group needed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from portattn.distributed.blocks import Task, plan_step  # noqa: E402
from portattn.distributed.merge import merge  # noqa: E402
from portattn.distributed.sharding import assemble, segments  # noqa: E402

WINDOWS = [None, (0, 0), (1, 0), (3, 2), (0, 5), (None, 2), (2, None), (7, 1), (100, 100)]


def _covered(task: Task, nq: int, nk: int) -> np.ndarray:
    """How often each (local query, local key) pair is attended by ``task``."""
    i = np.arange(nq)[:, None] - task.q0
    j = np.arange(nk)[None, :] - task.k0
    seen = (i >= 0) & (i < task.q1 - task.q0) & (j >= 0) & (j < task.k1 - task.k0)
    if task.causal:
        seen &= j <= i
    if task.window is not None:
        left, right = task.window
        if left is not None:
            seen &= j >= i - left
        if right is not None:
            seen &= j <= i + right
    return seen.astype(int)


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_visible_pair_is_attended_exactly_once(sharding, world):
    for local, causal, window in itertools.product((2, 6) if sharding == "zigzag" else (1, 3),
                                                   (False, True), WINDOWS):
        for rank, src in itertools.product(range(world), repeat=2):
            q_segs, k_segs = segments(rank, world, local, sharding), segments(src, world, local, sharding)
            qpos = np.concatenate([np.arange(s.start, s.start + s.length) for s in q_segs])
            kpos = np.concatenate([np.arange(s.start, s.start + s.length) for s in k_segs])
            d = qpos[:, None] - kpos[None, :]
            want = np.ones_like(d, dtype=bool)
            if causal:
                want &= d >= 0
            if window is not None:
                if window[0] is not None:
                    want &= d <= window[0]
                if window[1] is not None:
                    want &= d >= -window[1]
            tasks = plan_step(q_segs, k_segs, causal, window)
            got = sum((_covered(t, local, local) for t in tasks), np.zeros((local, local), int))
            assert (got == want).all(), (sharding, world, local, causal, window, rank, src, tasks)


def test_zigzag_causal_is_one_call_per_step():
    world, local = 4, 8
    for rank in range(world):
        steps = [plan_step(segments(rank, world, local, "zigzag"), segments(src, world, local, "zigzag"), True, None)
                 for src in range(world)]
        assert [len(s) for s in steps] == [1] * world
        work = sum((t.q1 - t.q0) * (t.k1 - t.k0) / (2 if t.causal else 1) for s in steps for t in s)
        assert work == (world - 1) * local * local / 2 + local * local / 2  # the same on every rank


def test_merge_by_lse_equals_attention_over_the_union_and_keeps_empty_rows_finite():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen)
    v = torch.randn(2, 6, 3, dtype=torch.float64, generator=gen)
    s[:, 0, :3] = float("-inf")  # row 0 sees no key in the first part
    s[:, 1, :] = float("-inf")  # row 1 sees no key at all
    parts = []
    for keys in (slice(0, 3), slice(3, 6)):
        lse = torch.logsumexp(s[..., keys], -1)
        p = torch.nan_to_num(torch.exp(s[..., keys] - lse[..., None]))
        parts.append((p @ v[:, keys], lse))
    out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
    full_lse = torch.logsumexp(s, -1)
    full = torch.nan_to_num(torch.exp(s - full_lse[..., None])) @ v
    assert not out.isnan().any() and torch.equal(lse.isneginf(), full_lse.isneginf())
    assert torch.allclose(out, full, atol=1e-14) and (out[:, 1] == 0).all()


def test_assemble_puts_zigzag_chunks_in_order():
    world = 3
    pieces = [torch.tensor([r, 2 * world - 1 - r]) for r in range(world)]
    assert assemble(pieces, "zigzag", 0).tolist() == list(range(2 * world))
    assert assemble([torch.tensor([r]) for r in range(world)], "contiguous", 0).tolist() == [0, 1, 2]
