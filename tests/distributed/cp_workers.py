"""What each spawned rank runs for tests/distributed: every case on this rank's pieces against single-process
``portattn.attention`` on the whole sequence, the per-rank errors written to ``<out>/rank<r>.pkl``.

Every rank draws the same full q, k, v (one seed), cuts its own piece with ``shard`` and compares its
piece of the output, LSE and q/k/v gradients with the same piece of the single-process results.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback

import torch
import torch.distributed as dist

BACKEND = "numba"  # float64 forward and backward on the CPU


def cases(world: int) -> list[dict]:
    """name -> the call: mode, sharding, causal, heads / kv heads, features."""
    found = []
    for mode in ("ring", "ulysses"):
        for sharding in ("zigzag", "contiguous"):
            for causal in (False, True):
                for heads, kv_heads in ((4, 4), (4, 2)):
                    found.append(dict(mode=mode, sharding=sharding, causal=causal, heads=heads, kv_heads=kv_heads))
    found += [
        dict(mode="ring", sharding="zigzag", causal=True, heads=4, kv_heads=1, window=(9, 0)),
        dict(mode="ring", sharding="contiguous", causal=False, heads=2, kv_heads=1, window=(5, 3)),
        dict(mode="ring", sharding="zigzag", causal=False, heads=2, kv_heads=2, window=(0, 11)),
        dict(mode="ring", sharding="zigzag", causal=True, heads=2, kv_heads=1, padding=True, softcap=5.0),
        dict(mode="ring", sharding="contiguous", causal=False, heads=2, kv_heads=2, padding=True),
        dict(mode="ring", sharding="zigzag", causal=False, heads=2, kv_heads=2, cross=True),  # Nk != Nq
        dict(mode="ulysses", sharding="zigzag", causal=True, heads=4, kv_heads=1, window=(6, 0), alibi=True),
        dict(mode="ulysses", sharding="contiguous", causal=False, heads=world, kv_heads=1, padding=True, softcap=5.0),
        dict(mode="ring", sharding="zigzag", causal=True, heads=2, kv_heads=2, no_grad=True),
        dict(mode="ring", sharding="zigzag", causal=True, heads=2, kv_heads=1, subgroup=True),
    ]
    return found


def case_name(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


def _data(case: dict, world: int):
    gen = torch.Generator().manual_seed(1234)
    batch, length, dim = 2, 2 * world * 7, 8  # odd chunks: 7 rows
    length_k = 2 * world * 5 if case.get("cross") else length
    q = torch.randn(batch, case["heads"], length, dim, dtype=torch.float64, generator=gen)
    k = torch.randn(batch, case["kv_heads"], length_k, dim, dtype=torch.float64, generator=gen)
    v = torch.randn(batch, case["kv_heads"], length_k, dim, dtype=torch.float64, generator=gen)
    grad = torch.randn(batch, case["heads"], length, dim, dtype=torch.float64, generator=gen)
    features = {}
    if case.get("window"):
        features["window"] = case["window"]
    if case.get("softcap"):
        features["softcap"] = case["softcap"]
    if case.get("alibi"):
        features["alibi_slopes"] = torch.rand(case["heads"], generator=gen) * 0.5
    if case.get("padding"):
        padding = torch.rand(batch, length_k, generator=gen) > 0.3
        padding[0, : 2 * 7] = False  # whole chunks padded: blocks where every key is hidden
        padding[1] = False  # a sequence with no real key: rows with LSE -inf, zero output and gradients
        features["key_padding_mask"] = padding
    return q, k, v, grad, features


def _error(got, want) -> float:
    if got.shape != want.shape:
        return float("inf")
    same_inf = torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got[torch.isinf(got)],
                                                                                 want[torch.isinf(want)])
    if not same_inf or torch.isnan(got).any() or torch.isnan(want).any():
        return float("inf")
    finite = torch.isfinite(want)
    return (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0


def run_case(case: dict, world: int) -> dict:
    import portattn
    from portattn.distributed import ring_attention, shard, ulysses_attention

    group = None
    if case.get("subgroup"):  # every rank creates it; only its members run the case
        members = list(range(1, world, 2))
        group = dist.new_group(members)
        if dist.get_rank() not in members:
            return {}
    sharding = case["sharding"]
    q, k, v, grad, features = _data(case, world if group is None else dist.get_world_size(group))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want, want_lse = portattn.attention(*leaves, causal=case["causal"], backend=BACKEND, return_lse=True, **features)
    want.backward(grad)

    def piece(x, dim=-2):
        return shard(x.detach(), group=group, sharding=sharding, dim=dim)

    local = [piece(x).requires_grad_(not case.get("no_grad")) for x in (q, k, v)]
    local_features = dict(features)
    if "key_padding_mask" in features:
        local_features["key_padding_mask"] = piece(features["key_padding_mask"], dim=-1)
    attend = ring_attention if case["mode"] == "ring" else ulysses_attention
    started = time.perf_counter()
    with torch.set_grad_enabled(not case.get("no_grad")):
        out, lse = attend(*local, causal=case["causal"], group=group, sharding=sharding, backend=BACKEND,
                          return_lse=True, **local_features)
        if not case.get("no_grad"):
            out.backward(piece(grad))
    errors = {"out": _error(out.detach(), piece(want)), "lse": _error(lse, piece(want_lse, dim=-1)),
              "seconds": time.perf_counter() - started}
    if not case.get("no_grad"):
        for name, mine, full in zip("qkv", local, leaves):
            errors["d" + name] = _error(mine.grad, piece(full.grad))
    return errors


def run_checks(world: int) -> dict:
    """The errors a call gets, as (type name, message), by check."""
    import numpy as np

    from portattn.distributed import ring_attention, shard, ulysses_attention

    x = torch.zeros(1, 4, 2 * world, 8, dtype=torch.float64)
    odd = torch.zeros(1, 4, 2 * world + 1, 8, dtype=torch.float64)
    calls = {
        "shard_length": lambda: shard(odd),
        "shard_sharding": lambda: shard(x, sharding="ring"),
        "ring_attn_mask": lambda: ring_attention(x, x, x, attn_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)),
        "ring_alibi": lambda: ring_attention(x, x, x, alibi_slopes=torch.ones(4)),
        "ring_dropout": lambda: ring_attention(x, x, x, dropout_p=0.1),
        "ring_unknown": lambda: ring_attention(x, x, x, windows=(1, 1)),
        "ring_numpy": lambda: ring_attention(np.zeros((1, 4, 2, 8)), x, x),
        "ring_causal_lengths": lambda: ring_attention(x, x[..., :2, :], x[..., :2, :], causal=True),
        "ring_negative_window": lambda: ring_attention(x, x, x, window=(-2, 0)),
        "ulysses_heads": lambda: ulysses_attention(x[:, :1], x[:, :1], x[:, :1]) if world > 1 else None,
        "ulysses_block_mask": lambda: ulysses_attention(x, x, x, block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)),
        "ring_twice": lambda: _differentiate_twice(ring_attention),
    }
    found = {}
    for name, call in calls.items():
        try:
            call()
            found[name] = None
        except Exception as error:  # noqa: BLE001 -- the test asserts the type and message
            found[name] = (type(error).__name__, str(error))
    return found


def run_unshard(world: int) -> dict:
    from portattn.distributed import shard, unshard

    found = {}
    x = torch.randn(2, 3, 4 * world, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for sharding in ("zigzag", "contiguous"):
        local = shard(x, sharding=sharding).requires_grad_()
        whole = unshard(local, sharding=sharding)
        whole.backward(x)  # every rank's loss sum(x * whole): the gradient of the sum is W * x's piece
        found[sharding] = (torch.equal(whole.detach(), x), _error(local.grad, world * shard(x, sharding=sharding)))
        ids = torch.arange(4 * world).repeat(2, 1)
        found[sharding + "-ids"] = torch.equal(unshard(shard(ids, sharding=sharding, dim=-1), sharding=sharding,
                                                       dim=-1), ids)
    return found


def run_tensor_parallel(world: int) -> dict:
    """tiled_allreduce_attention_output (and its overlap=False baseline) against the whole layer on one process."""
    import portattn
    from portattn.distributed import tiled_allreduce_attention_output

    rank, found = dist.get_rank(), {}
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, length, dim, width = 2 * world, world, 24, 8, 12
    q = torch.randn(2, heads, length, dim, dtype=torch.float64, generator=gen)
    k, v = torch.randn(2, 2, kv_heads, length, dim, dtype=torch.float64, generator=gen)
    w_o = torch.randn(heads * dim, width, dtype=torch.float64, generator=gen)
    padding = torch.rand(2, length, generator=gen) > 0.2
    mine, mine_kv = slice(2 * rank, 2 * rank + 2), slice(rank, rank + 1)  # GQA: 2 query heads per K/V head
    for causal in (False, True):
        for name, features in (("plain", {}), ("padding", {"key_padding_mask": padding, "softcap": 4.0})):
            full = portattn.attention(q, k, v, causal=causal, backend=BACKEND, **features)
            want = full.transpose(1, 2).reshape(2, length, heads * dim) @ w_o
            for overlap in (True, False):
                got = tiled_allreduce_attention_output(q[:, mine], k[:, mine_kv], v[:, mine_kv],
                                                       w_o[2 * rank * dim:(2 * rank + 2) * dim], tiles=3,
                                                       causal=causal, backend=BACKEND, overlap=overlap, **features)
                found[f"causal={causal}-{name}-overlap={overlap}"] = _error(got, want)
    return found


def _differentiate_twice(attention) -> None:
    """A gradient of a gradient through ``attention`` (a gradient penalty)."""
    q = torch.randn(1, 4, 4, 8, dtype=torch.float64, requires_grad=True)
    (dq,) = torch.autograd.grad(attention(q, q, q, backend=BACKEND).sum(), q, create_graph=True)
    dq.sum().backward()


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # up to 4 ranks share the CI machine's cores: one thread each (numba reads this when portattn imports it)
    os.environ["NUMBA_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
    results = {"cases": {}, "checks": None, "unshard": None, "tensor_parallel": None}
    try:
        for case in cases(world):
            try:
                results["cases"][case_name(case)] = run_case(case, world)
            except Exception:  # noqa: BLE001 -- reported per case by the test
                results["cases"][case_name(case)] = {"error": traceback.format_exc()}
        results["checks"] = run_checks(world)
        results["unshard"] = run_unshard(world)
        results["tensor_parallel"] = run_tensor_parallel(world)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
        dist.destroy_process_group()
