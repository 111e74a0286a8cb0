"""The tiling planner: every plan fits its device and follows the rules planner.py documents (G1-G8,
C1-C5), plus pinned choices for well-known problems and the IO model's scaling laws."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from portattn.devices import CATALOG
from portattn.spec import DTYPE_BYTES, AttentionSpec
from portattn.tiling import iomodel, plan
from portattn.tiling import planner as planner_mod

GPU_KEYS = sorted(k for k, d in CATALOG.items() if d.kind == "gpu")
CPU_KEYS = sorted(k for k, d in CATALOG.items() if d.kind == "cpu")
GPU_DTYPES = ("float16", "bfloat16", "float32")
CPU_DTYPES = ("float32", "float64", "float16")
HEAD_DIMS = st.one_of(st.sampled_from((16, 32, 40, 64, 80, 96, 111, 128, 160, 192, 256)), st.integers(16, 256))
SEQLENS = st.one_of(st.integers(0, 65536), st.integers(0, 300))
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


def problems(dtypes):
    return st.builds(
        AttentionSpec,
        batch=st.integers(1, 64),
        heads=st.integers(1, 64),
        seqlen_q=SEQLENS,
        seqlen_k=SEQLENS,
        head_dim=HEAD_DIMS,
        dtype=st.sampled_from(dtypes),
        causal=st.booleans(),
    )


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def documented_rows_per_warp(device, dtype: str) -> int:
    """G2, as the docstring states it: 16 rows for mma.sync/WMMA (and for wgmma, whose 64 rows are
    shared by 4 warps), 32 for AMD's 32x32 MFMA, 8 for Intel DPAS and Apple simdgroup matrices, 16
    when no matrix unit takes the dtype."""
    unit = device.matrix_unit_for(dtype)
    if unit is None:
        return 16
    return {"nvidia": 16, "amd": 32, "intel": 8, "apple": 8}[device.vendor]


def smallest_block_q(device, dtype: str) -> int:
    rows = documented_rows_per_warp(device, dtype)
    return min(b for b in planner_mod.GPU_BLOCK_Q if b % rows == 0)


def gpu_min_stages(device) -> int:
    return 2 if device.has_async_copy else 1


def gpu_tile_fits(device, spec, block_q: int, block_k: int) -> bool:
    """Whether some warp count makes a block_q x block_k tile legal under G2, G4 and G5."""
    e = DTYPE_BYTES[spec.dtype]
    d = max(16, planner_mod.next_power_of_two(spec.head_dim))
    rows = documented_rows_per_warp(device, spec.dtype)
    if (block_q + gpu_min_stages(device) * 2 * block_k) * d * e > device.sram_per_block:
        return False
    for warps in planner_mod.GPU_WARPS:
        threads = warps * device.simd_width
        if warps > block_q // rows or threads > device.max_threads_per_block:
            continue
        if cdiv(block_q * d + block_q * block_k, threads) + planner_mod.GPU_REGISTER_OVERHEAD <= device.max_registers_per_thread:
            return True
    return False


def cpu_working_set(head_dim_padded: int, block_q: int, block_k: int) -> int:
    return 4 * (2 * block_q * head_dim_padded + 2 * block_k * head_dim_padded + block_q * block_k)  # C1


def check_key_splits(p, spec, target: int) -> None:
    """G8/C3: split only when the query blocks cannot reach ``target``; keep >= 2 key blocks per split;
    split until the target is reached or no more splits are allowed."""
    query_work = spec.batch * spec.heads * cdiv(spec.seqlen_q, p.block_q)
    key_blocks = cdiv(spec.seqlen_k, p.block_k)
    assert p.work_units == query_work * p.key_splits
    assert p.key_splits >= 1
    if query_work >= target:
        assert p.key_splits == 1
    elif p.key_splits > 1:
        assert p.key_splits * planner_mod.MIN_KEY_BLOCKS_PER_SPLIT <= key_blocks
        allowed = key_blocks // planner_mod.MIN_KEY_BLOCKS_PER_SPLIT
        assert query_work * p.key_splits >= target or p.key_splits == allowed
    else:  # no split although the device is not full: no queries, or a second split would get < 2 key blocks
        assert query_work == 0 or key_blocks // planner_mod.MIN_KEY_BLOCKS_PER_SPLIT <= 1


def check_common(p, spec, device) -> None:
    assert p.device == device.name
    assert p.reasons and all(isinstance(r, str) and r.strip() for r in p.reasons)
    assert p.head_dim_padded >= spec.head_dim
    assert p.block_q >= 1 and p.block_k >= 1
    assert p.backward.block_q >= 1 and p.backward.block_k >= 1
    assert p.backward.work_units == spec.batch * spec.heads * cdiv(spec.seqlen_k, p.backward.block_k)
    # the traffic figure is the IO model's for exactly these blocks
    e = DTYPE_BYTES[spec.dtype]
    bh = spec.batch * spec.heads
    assert p.hbm_bytes == iomodel.forward_bytes(
        batch_heads=bh, seqlen_q=spec.seqlen_q, seqlen_k=spec.seqlen_k, head_dim=spec.head_dim,
        element_bytes=e, block_q=p.block_q, causal=spec.causal, key_splits=p.key_splits,
    )
    # every element that must be read or written once is: Q and O, and each key/value some query sees
    if spec.seqlen_q:
        keys_needed = min(spec.seqlen_k, spec.seqlen_q) if spec.causal else spec.seqlen_k
        assert p.hbm_bytes >= bh * 2 * (spec.seqlen_q + keys_needed) * spec.head_dim * e
        if not spec.causal:  # here the lower bound's compulsory part is exactly this
            assert p.hbm_bytes >= bh * 2 * (spec.seqlen_q + spec.seqlen_k) * spec.head_dim * e
    assert plan(spec, device) == p  # deterministic


@pytest.mark.parametrize("key", GPU_KEYS)
@PROPERTY_SETTINGS
@given(spec=problems(GPU_DTYPES))
def test_gpu_plan_fits_and_follows_rules(key, spec):
    device = CATALOG[key]
    try:
        p = plan(spec, device)
    except ValueError:
        assume(False)  # when the planner refuses is test_gpu_planner_refuses_only_without_sram
    assert p.target == "gpu"
    e = DTYPE_BYTES[spec.dtype]
    # G1
    assert p.head_dim_padded == max(16, planner_mod.next_power_of_two(spec.head_dim))
    # G4 / G5 / launch limits
    assert p.sram_bytes == (p.block_q + p.stages * 2 * p.block_k) * p.head_dim_padded * e
    assert p.sram_bytes <= device.sram_per_block
    assert 0 < p.registers_per_thread <= device.max_registers_per_thread
    assert p.threads == p.warps * device.simd_width <= device.max_threads_per_block
    assert p.backward.sram_bytes <= device.sram_per_block
    # G2 / G3
    rows = documented_rows_per_warp(device, spec.dtype)
    assert p.block_q % rows == 0
    assert p.warps in planner_mod.GPU_WARPS  # G2: warps beyond block_q / rows split key columns
    unit = device.matrix_unit_for(spec.dtype)
    if unit is not None:
        assert p.block_k % unit.k == 0
        assert p.matrix_unit is not None and p.matrix_unit.startswith(unit.name)
    else:
        assert p.matrix_unit is None
    # G6
    if device.has_async_copy:
        assert 2 <= p.stages <= planner_mod.GPU_MAX_STAGES
    else:
        assert p.stages == 1
    # blocks are not larger than the problem needs
    assert p.block_q <= max(rows, planner_mod.next_power_of_two(max(1, spec.seqlen_q)), 16)
    assert p.block_k <= max(16, planner_mod.next_power_of_two(max(1, spec.seqlen_k)))
    # G7: fill the device first -- if the smallest legal tile fills it, the plan does too
    query_work = spec.batch * spec.heads * cdiv(spec.seqlen_q, p.block_q)
    b_min = smallest_block_q(device, spec.dtype)
    if spec.batch * spec.heads * cdiv(spec.seqlen_q, b_min) >= device.compute_units and gpu_tile_fits(device, spec, b_min, 16):
        assert query_work >= device.compute_units
    # G8
    check_key_splits(p, spec, device.compute_units)
    check_common(p, spec, device)


@pytest.mark.parametrize("key", GPU_KEYS)
@settings(max_examples=40, deadline=None)
@given(head_dim=HEAD_DIMS, dtype=st.sampled_from(GPU_DTYPES), causal=st.booleans())
def test_gpu_planner_refuses_only_without_sram(key, head_dim, dtype, causal):
    """The planner's error says a 16x16 tile does not fit SRAM; it must raise only when that is true."""
    device = CATALOG[key]
    spec = AttentionSpec(batch=2, heads=8, seqlen_q=1024, seqlen_k=1024, head_dim=head_dim, dtype=dtype, causal=causal)
    d = max(16, planner_mod.next_power_of_two(head_dim))
    smallest = (16 + gpu_min_stages(device) * 2 * 16) * d * DTYPE_BYTES[dtype]
    try:
        plan(spec, device)
    except ValueError:
        assert smallest > device.sram_per_block, f"{key} refused D={head_dim} {dtype} though a 16x16 tile needs {smallest} B"


@pytest.mark.parametrize("key", CPU_KEYS)
@PROPERTY_SETTINGS
@given(spec=problems(CPU_DTYPES))
def test_cpu_plan_fits_and_follows_rules(key, spec):
    device = CATALOG[key]
    p = plan(spec, device)
    assert p.target == "cpu"
    lanes = device.simd_width
    cache = device.sram_per_block
    assert p.head_dim_padded % lanes == 0 and p.head_dim_padded - spec.head_dim < lanes
    threads = device.hardware_threads or device.compute_units
    assert p.threads == threads and p.warps == 1 and p.stages == 1 and p.registers_per_thread == 0
    # C1
    assert p.sram_bytes == cpu_working_set(p.head_dim_padded, p.block_q, p.block_k)
    if cpu_working_set(p.head_dim_padded, 16, 16) <= cache:
        assert p.sram_bytes <= cache
    else:
        assert (p.block_q, p.block_k) == (16, 16)
    # backward fits too, unless even a 16x16 backward tile does not
    d = p.head_dim_padded
    if 4 * (4 * 16 * d + 2 * 16 * d + 2 * 16 * 16) <= cache:
        assert p.backward.sram_bytes <= cache, (p.backward.block_q, p.backward.block_k, p.backward.sram_bytes)
    # C2: at least 4 tasks per thread whenever the smallest fitting tile gives that many
    query_work = spec.batch * spec.heads * cdiv(spec.seqlen_q, p.block_q)
    if spec.batch * spec.heads * cdiv(spec.seqlen_q, 16) >= planner_mod.CPU_TASKS_PER_THREAD * threads and (
        cpu_working_set(d, 16, 16) <= cache
    ):
        assert query_work >= planner_mod.CPU_TASKS_PER_THREAD * threads
    # C3
    check_key_splits(p, spec, threads)
    # C4
    assert p.backward.dq_separate == (spec.batch * spec.heads < 2 * threads)
    assert p.backward.block_q <= p.block_q  # C4 halves it when the backward tiles overflow L2
    # C5 (not for a decoding step's few queries)
    if spec.causal and spec.seqlen_q > 16:
        assert p.block_k <= p.block_q
    check_common(p, spec, device)


# ---- pinned choices -------------------------------------------------------------------------------


def test_h100_fp16_d64_long_loop_uses_the_swept_best_tile():
    """G9: the flash-grid sweep on the H100 put 128x64, 4 warps, 3 stages within 5% of the best at every N >= 1024."""
    p = plan(AttentionSpec(batch=8, heads=16, seqlen_q=4096, seqlen_k=4096, head_dim=64, dtype="float16"), CATALOG["h100"])
    assert (p.block_q, p.block_k, p.warps) == (128, 64, 4)
    assert p.stages == 3 and p.key_splits == 1


@pytest.mark.parametrize("head_dim, block_k", [(64, 64), (128, 32)])
def test_h100_short_causal_loop_uses_64_row_tiles(head_dim, block_k):
    """G9: causal N = 1024 is a short loop (~8 key blocks per query block): 64-row tiles, 8 KiB K tiles."""
    spec = AttentionSpec(batch=16, heads=2048 // head_dim, seqlen_q=1024, seqlen_k=1024, head_dim=head_dim, dtype="float16", causal=True)
    p = plan(spec, CATALOG["h100"])
    assert (p.block_q, p.block_k, p.warps) == (64, block_k, 4)


@pytest.mark.parametrize("head_dim, expected", [(64, (32, 64, 4, 3)), (128, (64, 64, 4, 2))])
def test_h100_backward_follows_b1_b2(head_dim, expected):
    spec = AttentionSpec(batch=4, heads=2048 // head_dim, seqlen_q=4096, seqlen_k=4096, head_dim=head_dim, dtype="float16")
    p = plan(spec, CATALOG["h100"])
    assert (p.backward.block_q, p.backward.block_k, p.backward.warps, p.backward.stages) == expected
    assert p.backward.dq_separate


def test_h100_fp16_d128_uses_8_warps():
    p = plan(AttentionSpec(batch=8, heads=16, seqlen_q=4096, seqlen_k=4096, head_dim=128, dtype="float16"), CATALOG["h100"])
    assert p.block_q == 128 and p.warps == 8


def test_h100_fp16_d256_fits_with_pipelining():
    device = CATALOG["h100"]
    p = plan(AttentionSpec(batch=8, heads=16, seqlen_q=4096, seqlen_k=4096, head_dim=256, dtype="float16"), device)
    assert p.stages >= 2
    assert p.sram_bytes <= device.sram_per_block and p.registers_per_thread <= device.max_registers_per_thread


@pytest.mark.parametrize("head_dim", [16, 40, 64, 128, 256])
@pytest.mark.parametrize("seqlen", [113, 4096])
def test_h100_fp32_tiles_bound_the_fma_work_per_thread(head_dim, seqlen):
    """G10: fp32 has no matrix unit on the H100; a 128x128 tile at d = 64 (8192 FMAs per thread)
    took Triton a minute to compile, so both passes keep each tile product at <= 2048 per thread."""
    spec = AttentionSpec(batch=1, heads=2, seqlen_q=seqlen, seqlen_k=seqlen, head_dim=head_dim, dtype="float32")
    p = plan(spec, CATALOG["h100"])
    d = p.head_dim_padded
    assert p.block_q * p.block_k * d // (p.warps * 32) <= planner_mod.GPU_FMA_PER_THREAD
    assert p.backward.block_q * p.backward.block_k * d // (p.backward.warps * 32) <= planner_mod.GPU_FMA_PER_THREAD
    assert any(r.startswith("G10") for r in p.reasons)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_v100_has_one_stage(dtype):
    p = plan(AttentionSpec(batch=8, heads=16, seqlen_q=4096, seqlen_k=4096, head_dim=64, dtype=dtype), CATALOG["v100"])
    assert p.stages == 1


def test_zen3_cpu_has_enough_tasks():
    p = plan(AttentionSpec(batch=1, heads=8, seqlen_q=2048, seqlen_k=2048, head_dim=64, dtype="float32"), CATALOG["zen3-epyc"])
    assert p.work_units >= 8


def test_small_batch_decoding_splits_the_key_loop():
    """One query row against a long cache cannot fill an H100 without flash-decoding (G8)."""
    p = plan(AttentionSpec(batch=1, heads=8, seqlen_q=1, seqlen_k=32768, head_dim=128, dtype="float16"), CATALOG["h100"])
    assert p.key_splits > 1 and p.work_units >= CATALOG["h100"].compute_units


def test_a_decoding_step_reuses_the_search_and_plans_as_a_fresh_search_would():
    """Each decoding step has one more key: the tile searches are cached by what they depend on (the block
    sizes a length allows), so steps reuse them, and every plan equals the one an empty cache gives."""
    device = CATALOG["h100"]
    specs = [AttentionSpec(batch=2, heads=32, kv_heads=8, seqlen_q=q, seqlen_k=k, head_dim=128, dtype="float16",
                           causal=True, align="bottom-right")
             for q in (1, 4) for k in (*range(1, 70), 127, 128, 129, 1023, 1024, 1025, 2047, 2048, 2049, 5000)]
    fresh = []
    for spec in specs:
        planner_mod._gpu_forward_search.cache_clear()
        planner_mod._plan_gpu_backward.cache_clear()
        fresh.append(planner_mod._plan_gpu(spec, device))
    planner_mod._gpu_forward_search.cache_clear()
    cached = [planner_mod._plan_gpu(spec, device) for spec in specs]
    assert cached == fresh
    info = planner_mod._gpu_forward_search.cache_info()
    assert info.hits > 0.8 * len(specs), info


# ---- the IO model ---------------------------------------------------------------------------------

IO_ARGS = dict(batch_heads=st.integers(1, 8), seqlen_q=st.integers(0, 5000), seqlen_k=st.integers(0, 5000),
               head_dim=st.integers(1, 256), element_bytes=st.sampled_from((2, 4)), causal=st.booleans())


@settings(max_examples=200, deadline=None)
@given(**IO_ARGS, small=st.integers(0, 9), large=st.integers(0, 9))
def test_forward_bytes_do_not_grow_with_block_q(batch_heads, seqlen_q, seqlen_k, head_dim, element_bytes, causal, small, large):
    """Power-of-two block sizes (what the planner uses): a larger block_q never moves more bytes."""
    small, large = sorted((small, large))
    kw = dict(batch_heads=batch_heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim,
              element_bytes=element_bytes, causal=causal)
    assert iomodel.forward_bytes(block_q=2**large, **kw) <= iomodel.forward_bytes(block_q=2**small, **kw)


@settings(max_examples=200, deadline=None)
@given(**{k: v for k, v in IO_ARGS.items() if k != "causal"}, small=st.integers(1, 600), large=st.integers(1, 600))
def test_forward_bytes_do_not_grow_with_block_q_non_causal(batch_heads, seqlen_q, seqlen_k, head_dim, element_bytes, small, large):
    small, large = sorted((small, large))
    kw = dict(batch_heads=batch_heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim,
              element_bytes=element_bytes, causal=False)
    assert iomodel.forward_bytes(block_q=large, **kw) <= iomodel.forward_bytes(block_q=small, **kw)


@settings(max_examples=200, deadline=None)
@given(**{k: v for k, v in IO_ARGS.items() if k != "causal"}, block_q=st.integers(1, 512), key_splits=st.integers(1, 8))
def test_causal_traffic_at_most_non_causal(batch_heads, seqlen_q, seqlen_k, head_dim, element_bytes, block_q, key_splits):
    kw = dict(batch_heads=batch_heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim,
              element_bytes=element_bytes, block_q=block_q, key_splits=key_splits)
    assert iomodel.forward_bytes(causal=True, **kw) <= iomodel.forward_bytes(causal=False, **kw)


@pytest.mark.parametrize("head_dim, sram_bytes", [(64, 227 * 1024), (128, 64 * 1024), (256, 163 * 1024)])
def test_lower_bound_scales_as_n_squared(head_dim, sram_bytes):
    """For N far above M/d the N^2 d^2 / M term dominates: doubling N quadruples the bound."""
    e = 2
    m = sram_bytes // e
    n0 = planner_mod.next_power_of_two(256 * m // head_dim)

    def bound(n):
        return iomodel.lower_bound_bytes(batch_heads=1, seqlen_q=n, seqlen_k=n, head_dim=head_dim, element_bytes=e, sram_bytes=sram_bytes)

    for n in (n0, 2 * n0, 4 * n0):
        assert 3.95 <= bound(2 * n) / bound(n) <= 4.0
        assert bound(n) / (n * n * head_dim * head_dim / m * e) == pytest.approx(1.0, rel=0.02)


def test_lower_bound_falls_as_sram_grows():
    kw = dict(batch_heads=4, seqlen_q=8192, seqlen_k=8192, head_dim=128, element_bytes=2)
    assert iomodel.lower_bound_bytes(sram_bytes=228 * 1024, **kw) < iomodel.lower_bound_bytes(sram_bytes=64 * 1024, **kw)


def test_visible_keys_causal_top_left():
    assert iomodel.visible_keys(0, 64, 1000, 1000, causal=True) == 64
    assert iomodel.visible_keys(15, 64, 1000, 1000, causal=True) == 1000
    assert iomodel.visible_keys(0, 64, 1000, 10, causal=True) == 10
    assert iomodel.visible_keys(3, 64, 1000, 1000, causal=False) == 1000
