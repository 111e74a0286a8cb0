"""The numba backend's features against the float64 reference: forward (O, LSE) and backward, each
feature alone and combined, through key splits (decoding) and packed sequences (varlen); the
dropout counter; and tile skipping (keys in skipped blocks are NaN, which any load would spread).

Small shapes with odd lengths so every test is quick once numba's on-disk cache is warm.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import portattn
from portattn import api, reference
from portattn.backends import registry
from portattn.extras import Extras
from portattn.spec import FEATURES, AttentionSpec

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

NUMBA = registry()["numba"]
B, H, HKV, NQ, NK, D = 2, 4, 2, 37, 53, 16
TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 5e-3}


def _rng(seed=0):
    return np.random.default_rng(seed)


def _tensor(x, dtype=torch.float32, grad=False):
    return torch.tensor(np.asarray(x), dtype=dtype, requires_grad=grad)


def _max_error(got, want):
    got, want = (np.asarray(torch.as_tensor(x).detach().double()) for x in (got, want))
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), finite), "-inf / finite pattern differs from the reference"
    return float(np.abs(got[finite] - want[finite]).max()) if finite.any() else 0.0


def _run(backend, q, k, v, grad, varlen=None, **kw):
    """(out, lse, dq, dk, dv) of one backend through the public API and torch autograd."""
    for x in (q, k, v):
        x.grad = None
    if varlen is None:
        out, lse = portattn.attention(q, k, v, backend=backend, return_lse=True, **kw)
    else:
        out, lse = portattn.attention_varlen(q, k, v, *varlen, backend=backend, return_lse=True, **kw)
    (out * grad).sum().backward()
    return out.detach(), lse, q.grad, k.grad, v.grad


def _check_against_reference(shape_q=(B, H, NQ, D), shape_kv=(B, HKV, NK, D), dtype=torch.float32, **kw):
    rng = _rng(1)
    q, k, v = (_tensor(rng.standard_normal(s), dtype, grad=True) for s in (shape_q, shape_kv, shape_kv))
    grad = _tensor(rng.standard_normal(shape_q), dtype)
    got = _run("numba", q, k, v, grad, **kw)
    want = _run("reference", q, k, v, grad, **kw)
    errors = [_max_error(g, w) for g, w in zip(got, want)]
    assert max(errors) < TOLERANCE[dtype], f"out, lse, dq, dk, dv errors {errors}"


def _masks():
    rng = _rng(2)
    additive = rng.standard_normal((B, 1, NQ, NK)).astype(np.float32)
    additive[..., 5] = -np.inf  # a key no query sees
    padding = rng.random((B, NK)) > 0.2
    padding[1] = False  # a sequence with no real key: O = 0, LSE = -inf
    return dict(
        bool_mask=_tensor(rng.random((NQ, NK)) > 0.3, torch.bool),  # broadcast from (Nq, Nk)
        additive=_tensor(additive),
        slopes=_tensor(rng.random(H)),
        padding=_tensor(padding, torch.bool),
        blocks=_tensor(rng.random((B, H, 3, 4)) > 0.5, torch.bool),
    )


M = _masks()
CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "causal-bottom-right": dict(causal=True, align="bottom-right"),
    "window": dict(window=(5, 3)),
    "window-left-only-causal-br": dict(window=(7, None), causal=True, align="bottom-right"),
    "window-right-only": dict(window=(None, 2)),
    "bool-mask": dict(attn_mask=M["bool_mask"]),
    "additive-mask-causal": dict(attn_mask=M["additive"], causal=True),
    "alibi-br": dict(alibi_slopes=M["slopes"], causal=True, align="bottom-right"),
    "softcap": dict(softcap=0.5),
    "softcap-alibi-window": dict(softcap=2.0, alibi_slopes=M["slopes"], window=(10, 10)),
    "key-padding": dict(key_padding_mask=M["padding"]),
    "block-sparse": dict(block_mask=M["blocks"], block_size=16),
    "block-sparse-causal-padding": dict(block_mask=M["blocks"], block_size=(16, 16), causal=True,
                                        key_padding_mask=M["padding"]),
    "everything": dict(attn_mask=M["additive"], alibi_slopes=M["slopes"], softcap=3.0, key_padding_mask=M["padding"],
                       window=(20, 4), causal=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_feature_matches_reference(name):
    _check_against_reference(**CASES[name])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_other_dtypes(dtype):
    _check_against_reference(dtype=dtype, window=(6, 2), softcap=1.5, causal=True, align="bottom-right")


@pytest.mark.parametrize("name", ["causal", "window", "bool_mask", "alibi", "softcap", "padding", "block"])
def test_decoding_key_splits(name):
    nq, nk = 3, 2000
    rng = _rng(3)
    kw = {
        "causal": dict(causal=True, align="bottom-right"),
        "window": dict(window=(300, 0), causal=True, align="bottom-right"),
        "bool_mask": dict(attn_mask=_tensor(rng.random((nq, nk)) > 0.5, torch.bool)),
        "alibi": dict(alibi_slopes=_tensor([0.01]), align="bottom-right"),
        "softcap": dict(softcap=1.0),
        "padding": dict(key_padding_mask=_tensor(rng.random((1, nk)) > 0.5, torch.bool)),
        "block": dict(block_mask=_tensor(rng.random((1, 16)) > 0.5, torch.bool), block_size=(16, 128)),
    }[name]
    x = np.zeros((1, 1, nq, D), np.float32), np.zeros((1, 1, nk, D), np.float32)
    assert portattn.explain(x[0], x[1], x[1], backend="numba").plan.key_splits > 1
    _check_against_reference((1, 1, nq, D), (1, 1, nk, D), **kw)


def _packed(lengths_q, lengths_k, heads=H, kv_heads=HKV, dtype=torch.float32):
    rng = _rng(4)
    cu = [torch.tensor(np.concatenate([[0], np.cumsum(n)]), dtype=torch.int32) for n in (lengths_q, lengths_k)]
    q = _tensor(rng.standard_normal((sum(lengths_q), heads, D)), dtype, grad=True)
    k, v = (_tensor(rng.standard_normal((sum(lengths_k), kv_heads, D)), dtype, grad=True) for _ in range(2))
    grad = _tensor(rng.standard_normal(q.shape), dtype)
    return q, k, v, grad, (cu[0], cu[1], max(lengths_q), max(lengths_k))


LENGTHS_Q, LENGTHS_K = [5, 0, 130, 17, 64], [9, 4, 100, 300, 64]


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(causal=True, align="bottom-right"),
                                dict(window=(12, 3), softcap=2.0, causal=True, align="bottom-right",
                                     alibi_slopes=torch.rand(H))], ids=["plain", "causal", "causal-br", "features"])
def test_varlen(kw):
    q, k, v, grad, varlen = _packed(LENGTHS_Q, LENGTHS_K)
    got = _run("numba", q, k, v, grad, varlen, **kw)
    want = _run("reference", q, k, v, grad, varlen, **kw)
    errors = [_max_error(g, w) for g, w in zip(got, want)]
    assert max(errors) < 2e-4, errors


def test_varlen_decoding_key_splits():
    q, k, v, grad, varlen = _packed([1, 2, 3], [1000, 2000, 10], heads=2, kv_heads=1)
    got = _run("numba", q, k, v, grad, varlen, causal=True, align="bottom-right")
    want = _run("reference", q, k, v, grad, varlen, causal=True, align="bottom-right")
    assert max(_max_error(g, w) for g, w in zip(got, want)) < 2e-4


def _reference_with_numba_keep(q, k, v, grad, call, extras, to_bhnd=lambda x: x):
    keep = NUMBA.dropout_keep(call.spec, extras)
    args = [to_bhnd(x.detach().numpy()) for x in (q, k, v)]
    scale = call.spec.softmax_scale
    out, lse = reference.attention_forward(*args, scale=scale, spec=call.spec, extras=extras, keep=keep)
    grads = reference.attention_backward(to_bhnd(grad.numpy()), *args, scale=scale, spec=call.spec, extras=extras, keep=keep)
    return keep, [out, lse, *grads]


@pytest.mark.parametrize("kw", [dict(dropout_p=0.3, dropout_seed=7),
                                dict(dropout_p=0.5, dropout_seed=8, causal=True, window=(9, None), softcap=1.0)],
                         ids=["dropout", "dropout-causal-window-softcap"])
def test_dropout_matches_reference_given_the_same_mask(kw):
    rng = _rng(5)
    q, k, v = (_tensor(rng.standard_normal(s), grad=True) for s in ((B, H, NQ, D), (B, HKV, NK, D), (B, HKV, NK, D)))
    grad = _tensor(rng.standard_normal((B, H, NQ, D)))
    got = _run("numba", q, k, v, grad, **kw)
    call, extras = api._prepare(*(x.detach().numpy() for x in (q, k, v)), backend="numba", **kw)
    keep, want = _reference_with_numba_keep(q, k, v, grad, call, extras)
    assert abs(keep.mean() - (1 - kw["dropout_p"])) < 0.05
    assert max(_max_error(g, w) for g, w in zip(got, want)) < 2e-4


def test_dropout_varlen_uses_each_sequences_own_indices():
    q, k, v, grad, varlen = _packed(LENGTHS_Q, LENGTHS_K)
    kw = dict(dropout_p=0.3, dropout_seed=11, causal=True)
    got = _run("numba", q, k, v, grad, varlen, **kw)
    packed = [x.detach().numpy()[None] for x in (q, k, v)]
    call, extras = api._prepare(*packed, backend="numba", layout="bnhd", varlen=tuple(
        x.numpy() if torch.is_tensor(x) else x for x in varlen), **kw)
    keep, want = _reference_with_numba_keep(q, k, v, grad, call, extras, lambda x: x[None].transpose(0, 2, 1, 3))
    want = [want[0][0].transpose(1, 0, 2), want[1][0]] + [x[0].transpose(1, 0, 2) for x in want[2:]]
    assert max(_max_error(g, w) for g, w in zip(got, want)) < 2e-4
    # sequence b's mask is the dense counter's (b, h, i, j) for its own rows and keys
    dense = NUMBA.dropout_keep(AttentionSpec(len(LENGTHS_Q), H, 130, 300, D, dropout_p=0.3), Extras(dropout_seed=11))
    assert np.array_equal(keep, dense)


def test_dropout_counter_is_fixed_by_the_seed():
    spec = AttentionSpec(1, 2, 8, 999, D, dropout_p=0.25)
    first, again, other = (NUMBA.dropout_keep(spec, Extras(dropout_seed=s)) for s in (1, 1, 2))
    assert np.array_equal(first, again)
    assert 0.2 < (first != other).mean() < 0.5
    assert abs(first.mean() - 0.75) < 0.01


def _poisoned(nq, nk, poison, seed=6):
    """q, k, v with NaN in the keys and values listed in ``poison``: a kernel that loads or
    multiplies them at all returns NaN."""
    rng = _rng(seed)
    q = rng.standard_normal((1, 2, nq, D)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, nk, D)).astype(np.float32) for _ in range(2))
    k[:, :, poison] = np.nan
    v[:, :, poison] = np.nan
    return _tensor(q, grad=True), _tensor(k, grad=True), _tensor(v, grad=True)


def _finite_run(q, k, v, **kw):
    out = portattn.attention(q, k, v, backend="numba", **kw)
    out.sum().backward()
    for name, x in (("out", out), ("dq", q.grad), ("dk", k.grad[:, :, :1]), ("dv", v.grad[:, :, :1])):
        assert torch.isfinite(x).all(), f"{name} is not finite: a skipped block was read"


def test_window_skips_key_blocks_it_cannot_see():
    q, k, v = _poisoned(64, 2048, slice(1024, None))  # queries 0..63 see keys <= 79
    _finite_run(q, k, v, window=(16, 16))
    assert (k.grad[:, :, 1024:] == 0).all() and (v.grad[:, :, 1024:] == 0).all()


def test_causal_bottom_right_skips_key_blocks_after_the_queries():
    q, k, v = _poisoned(64, 2048, slice(1024, None))  # top-left causal: query i sees keys <= i
    _finite_run(q, k, v, causal=True)


def test_block_sparse_skips_empty_blocks():
    blocks = np.zeros((2, 16), bool)  # (Nq / 32, Nk / 32): only the first two key blocks are kept
    blocks[:, :2] = True
    q, k, v = _poisoned(64, 512, slice(64, None))
    _finite_run(q, k, v, block_mask=_tensor(blocks, torch.bool), block_size=32)


def test_tiles_larger_than_sparse_blocks_mask_key_by_key():
    """A tuned plan may cover several sparse blocks per tile; those are masked per score."""
    rng = _rng(7)
    blocks = rng.random((2, 4, 4, 4)) > 0.5
    q, k, v = (rng.standard_normal((2, 4, 64, D)).astype(np.float32) for _ in range(3))
    call, extras = api._prepare(q, k, v, backend="numba", block_mask=blocks, block_size=16, causal=True)
    big = dataclasses.replace(call, plan=call.plan.with_changes({"block_q": 64, "block_k": 64, "backward.block_q": 32,
                                                                 "backward.block_k": 64}))
    out, lse = big.forward(q, k, v, extras)
    want_out, want_lse = reference.attention_forward(q, k, v, scale=call.spec.softmax_scale, spec=call.spec, extras=extras)
    assert _max_error(out, want_out) < 2e-4 and _max_error(lse, want_lse) < 2e-4
    grad = rng.standard_normal(q.shape).astype(np.float32)
    got = big.backward(grad, q, k, v, out, lse, extras)
    want = reference.attention_backward(grad, q, k, v, scale=call.spec.softmax_scale, spec=call.spec, extras=extras)
    assert max(_max_error(g, w) for g, w in zip(got, want)) < 2e-4


def test_every_feature_is_declared_with_a_note():
    caps = NUMBA.capabilities
    assert caps.features == frozenset(FEATURES)
    assert set(caps.feature_notes) == set(FEATURES)


def test_blas_threads_are_limited_only_where_a_tile_gemm_could_start_them(usable_backend, monkeypatch):
    """OpenBLAS is kept to one thread inside numba's threads only when a tile GEMM is large enough for it to
    thread (above 65536 multiply-adds) and OpenBLAS runs it: a tiny call skips the setting, and so does any
    float32 call where MKL serves the products (set per task in the kernels); all give the reference's answer."""
    usable_backend("numba")
    from portattn.backends.numba import blas, launch

    assert not launch.blas_may_thread(16, 16, 64) and not launch.blas_may_thread(32, 32, 64)
    assert launch.blas_may_thread(64, 64, 64) and launch.blas_may_thread(256, 512, 64)
    mkl = blas.chosen().threads_per_task
    for dtype in ("float32", "float64"):
        spec = AttentionSpec(batch=1, heads=1, seqlen_q=512, seqlen_k=512, head_dim=64, dtype=dtype)
        assert launch.blas_may_thread(256, 512, 64, spec) is not (mkl and dtype == "float32")
    asked = []
    entered = launch.run_with.__enter__
    monkeypatch.setattr(launch.run_with, "__enter__", lambda self: asked.append(self.blas) or entered(self))
    rng = np.random.default_rng(4)
    for n in (16, 200):
        q, k, v = (rng.standard_normal((1, 2, n, 64)).astype(np.float32) for _ in range(3))
        out = portattn.attention(q, k, v, causal=True, backend="numba")
        want, _ = reference.attention_forward(q, k, v, scale=0.125, causal=True)
        np.testing.assert_allclose(out, want, atol=2e-5)
    assert asked == [False, not mkl]


def _mkl_or_skip():
    from portattn.backends.numba import blas

    chosen = blas.chosen()
    if not chosen.bfloat16:
        pytest.skip(f"the numba kernels' BLAS here is {chosen.name}, with no bfloat16 GEMM: bfloat16 is computed in float32")
    return chosen


@pytest.mark.parametrize("shape, causal", [((2, 4, 77, 64), True), ((1, 2, 300, 128), False)], ids=["d64-causal", "d128"])
def test_bfloat16_tiles_multiply_in_bfloat16_as_accurately_as_torch(usable_backend, shape, causal):
    """Where MKL is in the process (torch's CPU library), bfloat16 calls keep their bits (no widened copy)
    and multiply tiles in bfloat16: O and the gradients are as close to float64 as torch's own bfloat16
    SDPA is, and the calling thread's MKL setting (what torch's matmuls use next) is left as it was."""
    usable_backend("numba")
    _mkl_or_skip()
    import ctypes
    import os

    from portattn.backends.numba import launch

    spec = AttentionSpec(batch=1, heads=1, seqlen_q=4, seqlen_k=4, head_dim=64, dtype="bfloat16")
    bits = np.zeros((1, 1, 4, 64), np.uint16)
    assert launch.bfloat16_products(spec) and launch.product_operand(bits, spec) is bits
    rng = _rng(7)
    q, k, v = (_tensor(rng.standard_normal(shape) * 2, torch.bfloat16, grad=True) for _ in range(3))
    grad = _tensor(rng.standard_normal(shape), torch.bfloat16)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*exact, is_causal=causal)
    want = (want, *torch.autograd.grad(want, exact, grad.double()))
    peer = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    peer = (peer, *torch.autograd.grad(peer, (q, k, v), grad))
    got = portattn.attention(q, k, v, causal=causal, backend="numba")
    got = (got, *torch.autograd.grad(got, (q, k, v), grad))
    for name, g, p, w in zip(("out", "dq", "dk", "dv"), got, peer, want):
        ours, theirs = _max_error(g, w), _max_error(p, w)
        assert ours <= 2 * theirs + 1e-3, f"{name}: portattn {ours:.2e} against torch's bfloat16 {theirs:.2e}"
    library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    assert library.MKL_Set_Num_Threads_Local(0) == 0, "a kernel left this thread's MKL threads set"


def _packed_tiles_or_skip():
    from portattn.backends.numba import blas

    chosen = _mkl_or_skip()
    if chosen.could_pack is None:
        pytest.skip(f"{chosen.name} exports no cpublas::brgemm for bfloat16 (another torch build, or MKL alone): the "
                    "forward's bfloat16 products run on MKL's GEMM")
    if not blas.packed_tiles():
        pytest.skip("torch's could_pack(BFloat16) is False here (no AMX, or oneDNN disabled in torch): the forward's "
                    "bfloat16 products run on MKL's GEMM")


def test_packed_operands_are_laid_out_as_torchs_own_packing():
    """pair_keys/pair_values give exactly what torch's ``cpublas::pack`` makes of K^T and V (VNNI pairs), the
    layout its micro-kernel reads."""
    _packed_tiles_or_skip()
    import ctypes
    import os

    from portattn.backends.numba import kernels

    library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    pack = library._ZN2at6native7cpublas4packEllllN3c1010ScalarTypeES3_PKvPv
    pack.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_int8] * 2 + [ctypes.c_void_p] * 2

    def torch_pack(matrix):  # (K, N) bfloat16 bits -> VNNI pairs as torch packs them
        rows, cols = matrix.shape
        out = np.empty((rows // 2, cols), np.uint32)
        pack(rows, cols, cols, cols, 15, 15, matrix.ctypes.data, out.ctypes.data)
        return out

    k, v = (_rng(3).integers(0, 2 ** 16, (1, 1, 128, 64), dtype=np.uint16) for _ in range(2))
    k_pairs = np.empty((1, 1, 2, 32, 64), np.uint32)
    kernels.pair_keys(k.view(np.uint32), 64, k_pairs)
    v_pairs = np.empty((1, 1, 64, 64), np.uint32)
    kernels.pair_values(v, v_pairs)
    for block in range(2):
        keys = np.ascontiguousarray(k[0, 0, 64 * block:64 * (block + 1)].T)
        np.testing.assert_array_equal(k_pairs[0, 0, block], torch_pack(keys))
    np.testing.assert_array_equal(v_pairs[0, 0], torch_pack(v[0, 0]))


@pytest.mark.parametrize("case", ["plain", "causal-bottom-right", "bool-mask", "softcap-alibi-window"])
@pytest.mark.parametrize("n_k, head_dim", [(NK, D), (301, 96)], ids=["odd-keys-d16", "d96"])
def test_bfloat16_forward_runs_on_torchs_micro_kernel_with_packed_operands(monkeypatch, case, n_k, head_dim):
    """Where torch's bfloat16 micro-kernel runs (AMX), the forward's products take it on K and V packed once per
    call (an odd key count, GQA, masks, features): against the reference within bfloat16's tolerance; with
    oneDNN switched off in torch (``torch.backends.mkldnn.enabled = False``) the same call runs on MKL's GEMM."""
    _packed_tiles_or_skip()
    from portattn.backends.numba import launch

    packed = []
    original = launch.packed_pairs
    monkeypatch.setattr(launch, "packed_pairs", lambda *args: packed.append(original(*args)[0] is not None) or original(*args))
    shape_q, shape_kv = (B, H, NQ, head_dim), (B, HKV, n_k, head_dim)
    kw = dict(CASES[case])
    if case == "bool-mask":
        kw["attn_mask"] = torch.tensor(_rng(5).random((B, 1, NQ, n_k)) < 0.7)
    _check_against_reference(shape_q, shape_kv, dtype=torch.bfloat16, **kw)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    _check_against_reference(shape_q, shape_kv, dtype=torch.bfloat16, **kw)
    assert packed == [True, False]


def test_openblas_can_be_chosen_instead_and_computes_bfloat16_in_float32(usable_backend):
    """``PORTATTN_NUMBA_BLAS=openblas`` (read once per process) makes the kernels call SciPy's OpenBLAS: bfloat16
    is then widened to float32, and the answers still match the reference."""
    usable_backend("numba")
    import os
    import subprocess
    import sys

    script = """
import numpy as np, torch, portattn
from portattn import reference
from portattn.backends.numba import blas
q, k, v = (torch.randn(1, 2, 50, 32, dtype=torch.bfloat16) for _ in range(3))
out = portattn.attention(q, k, v, causal=True, backend="numba")
want, _ = reference.attention_forward(*(x.double().numpy() for x in (q, k, v)), scale=32 ** -0.5, causal=True)
print(blas.chosen().name, float(np.abs(out.double().numpy() - want).max()))
"""
    env = dict(os.environ, PORTATTN_NUMBA_BLAS="openblas")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    name, error = done.stdout.split()[-3:-1], float(done.stdout.split()[-1])
    assert name == ["openblas", "(scipy)"] and error < 2e-2, done.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n_q, n_k, kw", [
    (1, 300, dict(causal=True, align="bottom-right")),
    (5, 77, dict(causal=True, align="bottom-right", window=(20, 0))),
    (3, 40, dict(softcap=2.0)),
    (16, 33, dict(alibi_slopes=M["slopes"], causal=True, align="bottom-right")),
], ids=["decode-causal", "spec-window", "softcap", "alibi-16q"])
def test_few_query_calls_run_the_decode_kernel_forward_and_backward(monkeypatch, dtype, n_q, n_k, kw):
    """``attention`` with at most 16 queries per sequence (a model's decoding step through its own cache) runs
    the decode kernel, GQA packed, reading K/V in their (B, H, N, D) layout: O, LSE and, through the usual
    backward, the gradients match the reference. A key padding keeps the tiled forward."""
    from portattn.backends.numba import decode

    monkeypatch.setattr(decode, "MIN_KEY_ELEMENTS", 0)  # these short calls would take the forward kernel
    ran = []
    original = decode.attention
    monkeypatch.setattr(decode, "attention", lambda *args: ran.append(1) or original(*args))
    _check_against_reference((B, H, n_q, D), (B, HKV, n_k, D), dtype=dtype, **kw)
    assert ran
    ran.clear()
    _check_against_reference((B, H, 2, D), (B, HKV, n_k, D), dtype=dtype, key_padding_mask=M["padding"][:, :1].expand(B, n_k),
                             causal=True, align="bottom-right")
    assert not ran
    assert "decode kernel" in " ".join(NUMBA.plan(AttentionSpec(batch=1, heads=4, kv_heads=2, seqlen_q=1, seqlen_k=8192,
                                                                head_dim=32, causal=True, align="bottom-right")).reasons)
    assert not decode.takes(AttentionSpec(batch=1, heads=4, kv_heads=4, seqlen_q=1, seqlen_k=8192, head_dim=32))  # no GQA
