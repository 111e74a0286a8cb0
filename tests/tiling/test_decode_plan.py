"""The decode planner (``portattn/tiling/decode.py``): GQA packing, key splits that fill the device, and the
bytes and time it predicts."""

from __future__ import annotations

import pytest

from portattn.devices import catalog
from portattn.spec import AttentionSpec
from portattn.tiling import decode


def _plan(batch, keys, *, heads=32, kv_heads=8, n_q=1, head_dim=128, dtype="float16", page=16, device="h200"):
    spec = AttentionSpec(batch=batch, heads=heads, kv_heads=kv_heads, seqlen_q=n_q, seqlen_k=keys, head_dim=head_dim,
                         dtype=dtype, align="bottom-right")
    return decode.plan_decode(decode.DecodeProblem(spec, page, batch * keys), catalog.lookup(device))


def test_one_long_sequence_is_split_to_fill_the_gpu_and_priced_at_the_bandwidth():
    plan = _plan(1, 32768)
    h200 = catalog.lookup("h200")
    assert plan.block_q == 16 and plan.row_blocks == 1  # 4 query heads x 1 query, padded for tl.dot
    # 8 (sequence, KV head) groups: splits for GPU_DECODE_WAVES programs per SM, ranges of whole tiles
    assert plan.key_splits == -(-decode.GPU_DECODE_WAVES * h200.compute_units // 8)
    assert plan.keys_per_split >= decode.MIN_KEYS_PER_SPLIT and plan.keys_per_split % plan.block_k == 0
    kv = 2 * 32768 * 8 * 128 * 2  # the 134 MB
    assert kv <= plan.bytes_moved <= 1.02 * kv
    assert plan.predicted_s == pytest.approx(plan.bytes_moved / 4.8e12)
    assert "bytes moved" in plan.describe() and "us at 4800 GB/s" in plan.describe()


def test_a_full_batch_needs_few_splits_and_splits_stay_under_the_merge_limit():
    assert _plan(64, 1024).key_splits <= 2  # 1024 keys: at most 4 ranges of 256, and 512 groups need 2
    assert _plan(1, 131072, kv_heads=1).key_splits <= decode.GPU_MAX_SPLITS


@pytest.mark.parametrize("group,n_q,rows,blocks", [(1, 1, 16, 1), (8, 1, 16, 1), (8, 16, 64, 2), (4, 3, 16, 1)])
def test_the_group_and_its_queries_are_the_rows_of_a_tile(group, n_q, rows, blocks):
    plan = _plan(2, 4096, heads=8 * group, n_q=n_q)
    assert (plan.block_q, plan.row_blocks) == (rows, blocks)


def test_cpu_tasks_own_whole_sequences():
    plan = _plan(1, 16384, dtype="float32", page=0, device="zen4-epyc")
    assert plan.target == "cpu" and plan.kv_heads_per_program == 8 and plan.block_q == 4
    assert plan.programs >= decode.CPU_TASKS_PER_THREAD  # one sequence, split over the threads


def test_a_short_cache_is_not_split_when_the_merge_costs_more_than_it_saves():
    """D6: at batch 1 and 8, a cache of up to 2k keys streams unsplit in about the time a step's launch takes
    the host anyway, less than the merge's launch would add: one split, one launch (the H200 measured
    21-22 us per step unsplit against 38-44 us split there). From 4k keys, and for long caches, the split
    stream is the shorter step; the reason gives both times."""
    for batch, keys in ((1, 512), (1, 1024), (1, 2048), (8, 1024), (8, 2048)):
        plan = _plan(batch, keys)
        assert plan.key_splits == 1, (batch, keys)
        assert any(r.startswith("D6") and r.endswith("one split") for r in plan.reasons)
    for batch, keys in ((1, 4096), (1, 32768), (8, 4096), (8, 32768)):
        plan = _plan(batch, keys)
        assert plan.key_splits > 1, (batch, keys)
        assert any(r.startswith("D6") and r.endswith("split") and "one split" not in r for r in plan.reasons)
