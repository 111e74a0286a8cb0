"""ring_attention, ulysses_attention, shard and unshard on 2 and 4 gloo ranks spawned on the CPU, against
single-process ``portattn.attention`` on the whole sequence in float64: outputs, LSE and the gradients of
q, k and v, for both shardings, causal or not, GQA/MQA, windows, key padding (with rows that see no key),
softcap, ALiBi (Ulysses), a sequence of odd chunks (7 rows), K/V shorter than Q, and a subgroup.

Each world size is one spawn (``cp_workers.worker`` runs every case on every rank), so the whole file
costs two process-group start-ups; the tests read what the ranks wrote. On a 2-core machine the file
takes about 25 s with numba's kernel cache warm (after the conformance suite) and about 100 s cold (each
rank compiles the float64 kernels).
"""

from __future__ import annotations

import os
import pickle
import sys
import time

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
pytest.importorskip("numba", reason="the ranks compute with backend='numba' (float64 forward and backward)")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this torch build", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import cp_workers by this path
import cp_workers  # noqa: E402

WORLDS = (2, 4)
TOLERANCE = 1e-12  # float64; the merge by LSE reorders sums, so not bitwise
SPAWN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """world size -> [per-rank results], one spawn per world size."""
    import torch.multiprocessing as mp

    found = {}
    for world in WORLDS:
        where = tmp_path_factory.mktemp(f"world{world}")
        context = mp.spawn(cp_workers.worker, args=(world, str(where / "init"), str(where)), nprocs=world,
                           join=False)
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        try:  # join returns as each rank ends (True once all have; raises if one failed)
            while not context.join(timeout=max(deadline - time.monotonic(), 0.001)):
                if time.monotonic() > deadline:
                    raise AssertionError(f"the {world} ranks did not finish within {SPAWN_TIMEOUT_S} s (a hang in a "
                                         "collective?)")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
        found[world] = []
        for rank in range(world):
            with open(where / f"rank{rank}.pkl", "rb") as f:
                found[world].append(pickle.load(f))
    return found


CASES = [(world, cp_workers.case_name(case)) for world in WORLDS for case in cp_workers.cases(world)]


@pytest.mark.parametrize("world, name", CASES, ids=[f"w{w}-{n}" for w, n in CASES])
def test_matches_single_process_attention(ranks, world, name):
    for rank, results in enumerate(ranks[world]):
        errors = results["cases"][name]
        assert "error" not in errors, f"rank {rank}:\n{errors.get('error')}"
        for what, error in errors.items():
            if what != "seconds":
                assert error <= TOLERANCE, f"rank {rank}: {what} differs by {error} (case {name})"


def test_every_case_ran_on_every_rank(ranks):
    for world in WORLDS:
        for rank, results in enumerate(ranks[world]):
            assert set(results["cases"]) == {n for w, n in CASES if w == world}, f"world {world} rank {rank}"
            ran = [n for n, e in results["cases"].items() if e]
            assert len(ran) >= len(results["cases"]) - 1  # the subgroup case runs on its members only


EXPECTED_ERRORS = {
    "shard_length": ("ValueError", "must be divisible by"),
    "shard_sharding": ("ValueError", "sharding must be one of"),
    "ring_attn_mask": ("ValueError", "ring_attention does not run attn_mask"),
    "ring_alibi": ("ValueError", "does not run alibi_slopes"),
    "ring_dropout": ("ValueError", "does not run dropout_p"),
    "ring_unknown": ("TypeError", "unexpected keyword argument 'windows'"),
    "ring_numpy": ("TypeError", "takes torch tensors"),
    "ring_causal_lengths": ("ValueError", "same positions"),
    "ring_negative_window": ("ValueError", "window must be"),
    "ulysses_heads": ("ValueError", "must be divisible by"),
    "ulysses_block_mask": ("ValueError", "ulysses_attention does not run block_mask"),
    "ring_twice": ("RuntimeError", "not differentiable twice"),
}


@pytest.mark.parametrize("check", sorted(EXPECTED_ERRORS))
def test_refusals_name_the_argument(ranks, check):
    kind, words = EXPECTED_ERRORS[check]
    for results in ranks[2]:
        got = results["checks"][check]
        assert got is not None and got[0] == kind and words in got[1], got


def test_unshard_inverts_shard_and_sums_gradients(ranks):
    for world in WORLDS:
        for results in ranks[world]:
            for sharding in ("zigzag", "contiguous"):
                same, grad_error = results["unshard"][sharding]
                assert same and grad_error == 0.0, (world, sharding, grad_error)
                assert results["unshard"][sharding + "-ids"]


def test_tiled_allreduce_matches_the_whole_layer(ranks):
    for world in WORLDS:
        for rank, results in enumerate(ranks[world]):
            found = results["tensor_parallel"]
            assert found is not None and len(found) == 8, (world, rank, found)
            for name, error in found.items():
                assert error <= TOLERANCE, (world, rank, name, error)


def test_not_initialized_is_a_clear_error():
    from portattn.distributed import shard

    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        shard(torch.zeros(1, 1, 4, 2))
