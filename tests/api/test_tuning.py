"""``portattn.tune`` / ``attention(..., autotune=True)`` and the cache of validated calls.

On CI the triton backend runs in its interpreter, so timings mean nothing here; what is checked is
the machinery: the sweep covers the space around the plan, the winner is remembered per device and
shape (in memory and in the JSON file), an autotuned call computes the same attention, and a
repeated call reuses its validated plan without letting a different call through.
"""

from __future__ import annotations

import json

import pytest

import portattn
from portattn import api, tuning

torch = pytest.importorskip("torch", reason="tuning runs on torch tensors")

SMALL_FORWARD = {"block_q": (16, 32), "block_k": (16,), "warps": (4,), "stages": (2,)}
SMALL_BACKWARD = {"backward.block_k": (16,), "backward.block_q": (16,), "backward.warps": (4,), "backward.stages": (2,),
                  "backward.dq_separate": (True, False)}


def _triton_device() -> str:
    """Where the triton backend's inputs live: the GPU when there is one, else the CPU (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_backend(usable_backend):
    return usable_backend("triton")


@pytest.fixture
def small_spaces(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "FORWARD_SPACE", SMALL_FORWARD)
    monkeypatch.setattr(tuning, "BACKWARD_SPACE", SMALL_BACKWARD)
    monkeypatch.setattr(tuning.sweep_forward, "__defaults__", (SMALL_FORWARD, tuning.NONE))
    monkeypatch.setattr(tuning.sweep_backward, "__defaults__", (SMALL_BACKWARD, tuning.NONE))
    monkeypatch.setenv("PORTATTN_TUNE_CACHE", str(tmp_path / "tuned.json"))
    monkeypatch.setattr(tuning, "_MEMORY", {})
    return tmp_path / "tuned.json"


def test_candidates_start_with_the_plan_and_cover_the_space():
    plan = portattn.plan(seqlen_q=4096, head_dim=64, device="h100")
    plans = tuning.candidates(plan, tuning.FORWARD_SPACE)
    assert plans[0] == plan
    configs = {(p.block_q, p.block_k, p.warps, p.stages) for p in plans}
    assert len(configs) == len(plans)  # no configuration twice
    assert {(bq, bk, w, s) for bq in (64, 128) for bk in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)} <= configs


def test_tune_remembers_the_winner_and_autotune_uses_it(triton_backend, small_spaces):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=gen).to(_triton_device()) for _ in range(3))
    planned = api.prepare(q, k, v, causal=True, backend="triton").plan
    tuned = portattn.tune(q, k, v, causal=True, backend="triton", backward=True)
    # the winner is the plan or a point of the (patched) spaces
    assert (tuned.block_q, tuned.block_k) in {(16, 16), (32, 16), (planned.block_q, planned.block_k)}
    assert (tuned.backward.block_q, tuned.backward.block_k) in {(16, 16), (planned.backward.block_q, planned.backward.block_k)}
    saved = json.loads(small_spaces.read_text())
    (key, entry), = saved.items()
    assert key.startswith("triton|") and "fp32-causal-1x2x40x32" in key
    assert entry["block_q"] == tuned.block_q and entry["backward.dq_separate"] == tuned.backward.dq_separate

    out = portattn.attention(q, k, v, causal=True, backend="triton", autotune=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    tuning._MEMORY.clear()  # a new process: the file alone must bring the winner back
    call = api.prepare(q, k, v, causal=True, backend="triton")
    assert tuning.remembered(call) == tuned


def test_failed_configurations_are_recorded_not_raised(triton_backend, small_spaces, monkeypatch):
    q, k, v = (torch.randn(1, 1, 20, 16, device=_triton_device()) for _ in range(3))
    call = api.prepare(q, k, v, backend="triton")
    real = api.PreparedCall.forward

    def forward(self, *arrays):
        if self.plan.block_q == 32:
            raise RuntimeError("out of resources: shared memory")
        return real(self, *arrays)

    monkeypatch.setattr(api.PreparedCall, "forward", forward)
    trials = tuning.sweep_forward(call, q, k, v)
    failed = [t for t in trials if t.seconds is None]
    assert failed and all("shared memory" in t.error for t in failed)
    assert tuning.best(trials).plan.block_q != 32


def test_repeated_calls_reuse_the_validated_call_but_not_across_shapes(monkeypatch):
    api._PREPARED.clear()
    seen = []
    real = api._prepare
    monkeypatch.setattr(api, "_prepare", lambda *a, **kw: seen.append(a[0].shape) or real(*a, **kw))
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    first = portattn.attention(q, k, v, backend="numba")
    again = portattn.attention(q, k, v, backend="numba")
    assert len(seen) == 1 and torch.equal(first, again)
    with pytest.raises(ValueError, match="head dim"):
        portattn.attention(q, k[..., :8], v, backend="numba")  # a new shape is validated afresh
    portattn.attention(q, k, v, causal=True, backend="numba")
    assert len(seen) == 3


def test_block_sparse_sweeps_keep_tiles_inside_the_sparse_blocks():
    """Rule S1 binds the tuner too: a 128-key tile over 64-key sparse blocks would read two blocks' keys."""
    from portattn.devices import CATALOG
    from portattn.spec import AttentionSpec
    from portattn.tiling import plan

    spec = AttentionSpec(1, 2, 512, 512, 64, "float16", block_size=(64, 64))
    planned = plan(spec, CATALOG["h100"])
    kept = [p for p in tuning.candidates(planned, {**tuning.FORWARD_SPACE, **tuning.BACKWARD_SPACE})
            if tuning._respects_sparsity(p, spec)]
    assert planned in kept and len(kept) > 1
    assert all(p.block_q <= 64 and p.block_k <= 64 and p.backward.block_k <= 64 for p in kept)
