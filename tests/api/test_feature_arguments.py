"""The feature keywords of ``attention``/``attention_varlen``: checked before any kernel runs, each
error naming the argument and what would work; refusals reported by ``explain`` and routed around
by ``auto``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import portattn
from portattn import dispatch

torch = pytest.importorskip("torch")


def qkv(b=2, h=4, nq=9, nk=11, d=16, kv_heads=None):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, nq, d, generator=gen)
    k, v = (torch.randn(b, kv_heads or h, nk, d, generator=gen) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(attn_mask=torch.ones(9, 10, dtype=torch.bool)), ValueError, r"attn_mask has shape \(9, 10\); it must broadcast to \(2, 4, 9, 11\)"),
    (dict(attn_mask=torch.ones(3, 4, 9, 11, dtype=torch.bool)), ValueError, r"attn_mask has shape \(3, 4, 9, 11\)"),
    (dict(attn_mask=torch.ones(9, 11, dtype=torch.int32)), TypeError, r"attn_mask has dtype int32; give bool"),
    (dict(attn_mask=np.ones((9, 11), bool)), ValueError, r"attn_mask is a numpy array on cpu but q is a torch array"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must be \(H,\) = \(4,\) or \(B, H\) = \(2, 4\)"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.bool)), TypeError, r"alibi_slopes must be a float array"),
    (dict(key_padding_mask=torch.ones(2, 9, dtype=torch.bool)), ValueError, r"key_padding_mask must be \(B, Nk\) = \(2, 11\)"),
    (dict(block_mask=torch.ones(2, 2, dtype=torch.bool), block_size=(16, 16)), ValueError,
     r"block_mask has shape \(2, 2\); it must broadcast to \(2, 4, 1, 1\)"),
    (dict(block_mask=torch.ones(1, 1, dtype=torch.bool), block_size=(16, 24)), ValueError, r"block_size must be .*powers of two"),
    (dict(block_size=(16, 16)), ValueError, r"block_size was given without block_mask"),
    (dict(window=(4,)), ValueError, r"window must be \(left, right\)"),
    (dict(window=(-3, 2)), ValueError, r"window must be \(left, right\) with non-negative ints or None"),
    (dict(align="bottom"), ValueError, r"unknown causal alignment 'bottom'; use 'top-left'"),
    (dict(softcap=0.0), ValueError, r"softcap must be a positive finite number"),
    (dict(dropout_p=1.0, dropout_seed=1), ValueError, r"dropout_p must be a probability in \[0, 1\)"),
    (dict(dropout_p=0.1), ValueError, r"dropout_p = 0.1 needs dropout_seed"),
])
def test_bad_feature_arguments_are_refused_before_any_kernel(kwargs, error, message):
    q, k, v = qkv()
    with pytest.raises(error, match=message):
        portattn.attention(q, k, v, backend="reference", **kwargs)


def test_gqa_head_counts_must_divide():
    with pytest.raises(ValueError, match=r"k and v have 3 heads and q has 4: the query heads must be a multiple"):
        portattn.attention(*qkv(kv_heads=3), backend="reference")


def test_window_takes_minus_one_for_unbounded_as_flash_attention():
    q, k, v = qkv()
    a = portattn.attention(q, k, v, backend="reference", window=(-1, 2))
    b = portattn.attention(q, k, v, backend="reference", window=(None, 2))
    assert torch.equal(a, b)


def _packed(lengths_q=(3, 5), lengths_k=(4, 6), h=2, d=8):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(lengths_q), h, d, generator=gen)
    k, v = (torch.randn(sum(lengths_k), h, d, generator=gen) for _ in range(2))
    cu = lambda n: torch.tensor(np.concatenate([[0], np.cumsum(n)]), dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lengths_q), cu(lengths_k)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].long()}, r"cu_seqlens_q must be an int32 array"),
    (lambda a: {**a, "cu_seqlens_q": torch.tensor([0, 5, 3], dtype=torch.int32)}, r"cu_seqlens_q must start at 0, never decrease"),
    (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 4, 9], dtype=torch.int32)}, r"cu_seqlens_k must start at 0.*end at the packed length 10"),
    (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 10], dtype=torch.int32)}, r"the same number of sequences: 2 and 1"),
    (lambda a: {**a, "max_seqlen_q": 4}, r"max_seqlen_q must be an int >= the longest sequence \(5\)"),
    (lambda a: {**a, "q": a["q"][None]}, r"q must be 3-D \(total, heads, head_dim\)"),
])
def test_varlen_arguments_are_checked(change, message):
    q, k, v, cu_q, cu_k = _packed()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=6)
    with pytest.raises(ValueError, match=message):
        portattn.attention_varlen(**change(args), backend="reference")


def test_varlen_is_the_per_sequence_attention():
    q, k, v, cu_q, cu_k = _packed()
    out = portattn.attention_varlen(q, k, v, cu_q, cu_k, 5, 6, causal=True, backend="reference")
    for i in range(2):
        qs, ks, vs = (x[c[i]:c[i + 1]].transpose(0, 1)[None] for x, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        alone = portattn.attention(qs, ks, vs, causal=True, backend="reference")
        assert torch.allclose(out[cu_q[i]:cu_q[i + 1]], alone[0].transpose(0, 1))


@pytest.fixture
def numba_without_alibi(monkeypatch, usable_backend):
    """The numba backend as if it did not run ALiBi (caches of earlier choices cleared)."""
    numba = usable_backend("numba")
    caps = numba.capabilities
    reduced = dataclasses.replace(caps, features=caps.features - {"alibi"},
                                  feature_notes={**caps.feature_notes, "alibi": "switched off by this test"})
    monkeypatch.setattr(type(numba), "capabilities", reduced)
    dispatch._select.cache_clear()
    yield numba
    dispatch._select.cache_clear()


def test_a_refused_feature_is_explained_and_auto_routes_around_it(numba_without_alibi):
    q, k, v = qkv()
    slopes = torch.ones(4)
    explanation = str(portattn.explain(q, k, v, alibi_slopes=slopes))
    assert "numba does not support alibi" in explanation and "switched off by this test" in explanation
    with pytest.raises(ValueError, match="numba does not support alibi"):
        portattn.attention(q, k, v, alibi_slopes=slopes, backend="numba")
    # without the feature, numba is auto's pick again
    assert portattn.explain(q, k, v).chosen == "numba"
