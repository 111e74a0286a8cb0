"""``portattn.scaled_dot_product_attention`` against torch's own SDPA, on every usable backend, and
``attention`` with every mask shape SDPA broadcasts.

The peer is ``torch.nn.functional.scaled_dot_product_attention`` itself (its math backend, in
float64 where the backend takes float64, else float32), never a re-implementation. Fully masked
rows are kept out of the random masks: SDPA gives NaN there, portattn zeros (checked on its own).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import portattn  # noqa: E402

# (backend, dtype, tolerance): float32 through the backends' fp32 paths
BACKENDS = [("numba", torch.float32, 2e-5), ("triton", torch.float32, 2e-5), ("opencl", torch.float32, 2e-5),
            ("reference", torch.float64, 1e-10)]


def _device(name):
    return "cuda" if name in ("triton", "cupy") and torch.cuda.is_available() else "cpu"


def _peer(*args, **kwargs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _randn(*shape, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def _bool_mask(shape, seed, device):
    """Random True/False, with the last key visible everywhere so that no row is fully masked."""
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.4
    if mask.ndim:
        mask[..., -1] = True
    return mask.to(device)


MASK_SHAPES = [(2, 4, 9, 11), (2, 1, 9, 11), (2, 1, 1, 11), (1, 11), (9, 1), (11,), (1, 1), (9, 11), (4, 1, 11)]


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS, ids=[b[0] for b in BACKENDS])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_every_broadcastable_mask_matches_sdpa(usable_backend, backend, dtype, tol, shape, kind):
    usable_backend(backend)
    device = _device(backend)
    q = _randn(2, 4, 9, 16, dtype=dtype, device=device, seed=1)
    k, v = (_randn(2, 4, 11, 16, dtype=dtype, device=device, seed=s) for s in (2, 3))
    if kind == "bool":
        mask = _bool_mask(shape, 4, device)
    else:
        mask = _randn(*shape, dtype=dtype, device=device, seed=4)
    expected = _peer(q, k, v, attn_mask=mask if mask.ndim >= 2 else mask.expand(9, 11))
    got = portattn.scaled_dot_product_attention(q, k, v, mask, backend=backend)
    assert got.shape == expected.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    direct = portattn.attention(q, k, v, attn_mask=mask, backend=backend)
    torch.testing.assert_close(direct, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS, ids=[b[0] for b in BACKENDS])
@pytest.mark.parametrize("case", ["3d", "5d", "gqa", "causal", "scale", "value-dim-smaller", "value-dim-larger", "2d"])
def test_sdpa_signature_matches_torch(usable_backend, backend, dtype, tol, case):
    usable_backend(backend)
    device = _device(backend)
    shapes = {"3d": ((6, 13, 32), (6, 17, 32), (6, 17, 32)), "5d": ((2, 3, 2, 13, 32), (2, 3, 2, 17, 32), (2, 3, 2, 17, 32)),
              "gqa": ((2, 8, 13, 32), (2, 2, 17, 32), (2, 2, 17, 32)), "causal": ((2, 3, 17, 32), (2, 3, 13, 32), (2, 3, 13, 32)),
              "scale": ((2, 3, 13, 32), (2, 3, 17, 32), (2, 3, 17, 32)),
              "value-dim-smaller": ((2, 3, 13, 64), (2, 3, 17, 64), (2, 3, 17, 32)),
              "value-dim-larger": ((2, 3, 13, 32), (2, 3, 17, 32), (2, 3, 17, 64)),
              "2d": ((13, 32), (17, 32), (17, 32))}[case]
    q, k, v = (_randn(*s, dtype=dtype, device=device, seed=i) for i, s in enumerate(shapes))
    kwargs = {"gqa": dict(enable_gqa=True), "causal": dict(is_causal=True), "scale": dict(scale=0.3)}.get(case, {})
    expected = _peer(q, k, v, **kwargs)
    got = portattn.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend,dtype,tol", [b for b in BACKENDS if b[0] != "reference"], ids=lambda b: str(b))
def test_sdpa_gradients_match_torch(usable_backend, backend, dtype, tol):
    usable_backend(backend)
    device = _device(backend)
    inputs = [_randn(2, 4, n, 32, dtype=dtype, device=device, seed=s).requires_grad_() for s, n in ((1, 13), (2, 17), (3, 17))]
    mask = _randn(2, 1, 13, 17, dtype=dtype, device=device, seed=5)
    expected = _peer(*inputs, attn_mask=mask)
    grads = torch.autograd.grad(expected.square().sum(), inputs)
    got = portattn.scaled_dot_product_attention(*inputs, mask, backend=backend)
    mine = torch.autograd.grad(got.square().sum(), inputs)
    for a, b in zip(mine, grads):
        torch.testing.assert_close(a, b, atol=20 * tol, rtol=20 * tol)


def test_sdpa_errors_are_sdpa_s():
    q = torch.randn(2, 8, 5, 16)
    k = torch.randn(2, 2, 5, 16)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        portattn.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        portattn.scaled_dot_product_attention(q, q, q, torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="head dim"):
        portattn.scaled_dot_product_attention(q, torch.randn(2, 8, 5, 8), torch.randn(2, 8, 5, 8))


def test_sdpa_dropout_seed_comes_from_torch_s_generator():
    q = torch.randn(1, 2, 7, 16, dtype=torch.float64)
    torch.manual_seed(3)
    first = portattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend="reference")
    torch.manual_seed(3)
    again = portattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend="reference")
    other = portattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend="reference")
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)


def test_fully_masked_rows_are_zeros_not_nan():
    q = torch.randn(1, 2, 4, 16, dtype=torch.float64)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False
    out = portattn.scaled_dot_product_attention(q, q, q, mask, backend="reference")
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all()


@pytest.mark.parametrize("name", ["attn_mask", "alibi_slopes"])
def test_feature_arrays_that_require_grad_are_refused_not_silently_ignored(name):
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    given = {"attn_mask": torch.zeros(5, 5, requires_grad=True), "alibi_slopes": torch.ones(2, requires_grad=True)}[name]
    with pytest.raises(ValueError, match=f"{name} requires grad"):
        portattn.attention(q, q, q, **{name: given}, backend="reference")
    portattn.attention(q, q, q, **{name: given.detach()}, backend="reference")  # detached: fine


def test_repeated_plain_calls_take_the_direct_path_and_keep_every_argument():
    """A plain 4-D call is remembered (``sdpa._DIRECT``) and repeated calls go straight to ``attention``:
    calls of the same shapes with another ``is_causal``, ``scale`` or GQA layout must not be served the
    remembered one's answer, and a call with a mask must not take the path at all."""
    from portattn import sdpa

    sdpa._DIRECT.clear()
    q = _randn(1, 4, 7, 16, dtype=torch.float32, device="cpu", seed=1)
    k, v = (_randn(1, 4, 7, 16, dtype=torch.float32, device="cpu", seed=s) for s in (2, 3))
    k2, v2 = k[:, :2].contiguous(), v[:, :2].contiguous()
    calls = [dict(is_causal=True), dict(is_causal=False), dict(is_causal=True, scale=0.3), dict(scale=0.3)]
    for _ in range(2):  # the second round is served from the remembered mappings
        for kwargs in calls:
            expected = _peer(q.double(), k.double(), v.double(), **kwargs).float()
            torch.testing.assert_close(portattn.scaled_dot_product_attention(q, k, v, backend="numba", **kwargs),
                                       expected, atol=2e-5, rtol=0)
        expected = _peer(q.double(), k2.double(), v2.double(), is_causal=True, enable_gqa=True).float()
        torch.testing.assert_close(portattn.scaled_dot_product_attention(q, k2, v2, is_causal=True, enable_gqa=True,
                                                                         backend="numba"), expected, atol=2e-5, rtol=0)
    assert len(sdpa._DIRECT) == len(calls) + 1
    mask = _bool_mask((7, 7), 4, "cpu")
    expected = _peer(q.double(), k.double(), v.double(), attn_mask=mask).float()
    torch.testing.assert_close(portattn.scaled_dot_product_attention(q, k, v, mask, backend="numba"), expected,
                               atol=2e-5, rtol=0)
    assert len(sdpa._DIRECT) == len(calls) + 1


def test_meta_tensors_give_shapes_and_the_same_errors():
    """On the meta device (shape inference, a model built there) nothing is computed: the results' shapes
    come from the custom op's fake implementation, gradients too, and a bad call is refused as on a real
    device -- as torch's SDPA does for meta tensors."""
    q = torch.empty(2, 4, 8, 16, device="meta")
    k = torch.empty(2, 2, 11, 16, device="meta", requires_grad=True)
    out = portattn.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    assert out.shape == F.scaled_dot_product_attention(q, k, k, enable_gqa=True).shape and out.device.type == "meta"
    out, lse = portattn.attention(q, k, k, causal=True, return_lse=True)
    assert (out.shape, lse.shape) == ((2, 4, 8, 16), (2, 4, 8))
    out.sum().backward()
    assert k.grad.shape == k.shape and k.grad.device.type == "meta"
    assert portattn.scaled_dot_product_attention(q[..., :8], q[..., :8], q).shape == (2, 4, 8, 16)  # Ev != E
    with pytest.raises(ValueError, match="head dim"):
        portattn.attention(q, torch.empty(2, 4, 8, 32, device="meta"), q)
    with pytest.raises(RuntimeError, match="enable_gqa"):
        portattn.scaled_dot_product_attention(q, k, k)
