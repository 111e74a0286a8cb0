"""``portattn.scaled_dot_product_attention`` where PyTorch's own SDPA tests found it apart from torch.

Each test is one divergence that ``benchmarks/sdpa_upstream.py`` (the replay of torch's OpInfo
samples and of ``test/test_transformers.py``) found; the peer is torch's math SDPA in float64. The
reference backend keeps them fast; the backends' kernels see the same calls through
``attention``, which the conformance suite covers.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import portattn  # noqa: E402


def sdpa(*args, **kwargs):
    return portattn.scaled_dot_product_attention(*args, backend="reference", **kwargs)


def peer(*args, **kwargs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def leaves(*shapes, dtype=torch.float64):
    generator = torch.Generator().manual_seed(sum(map(sum, shapes)))
    return [torch.randn(*s, generator=generator, dtype=dtype).requires_grad_() for s in shapes]


def assert_matches_peer(inputs, **kwargs):
    """Output and the gradient of every input (a fourth one is attn_mask)."""
    theirs = [x.detach().clone().requires_grad_() for x in inputs]
    got = sdpa(*inputs, **kwargs)
    expected = peer(*theirs, **kwargs)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    mine = torch.autograd.grad(got, inputs, grad)
    for a, b in zip(mine, torch.autograd.grad(expected, theirs, grad)):
        torch.testing.assert_close(a, b)


# the OpInfo's broadcast sample (a 3-D query against 4-D keys) and SDPA's other broadcasts
@pytest.mark.parametrize("shapes,gqa", [
    (((4, 3, 8), (4, 4, 6, 8), (4, 4, 6, 8)), False),
    (((1, 2, 3, 8), (3, 2, 6, 8), (3, 2, 6, 8)), False),
    (((3, 2, 3, 8), (1, 2, 6, 8), (3, 1, 6, 8)), False),
    (((4, 3, 3, 8), (6, 8), (6, 8)), False),
    (((2, 8, 3, 8), (2, 4, 6, 8), (2, 2, 6, 8)), True),  # key and value with different head counts
    (((6, 3, 8), (2, 6, 8), (3, 6, 8)), True),
], ids=["3d-query-4d-keys", "query-batch-1", "key-value-batch-1", "2d-keys", "gqa-k4-v2", "gqa-3d-k2-v3"])
def test_leading_dims_broadcast_as_sdpa_s(shapes, gqa):
    assert_matches_peer(leaves(*shapes), enable_gqa=gqa)


def test_refusals_are_runtime_errors_as_sdpa_s():
    """torch's failure-mode tests expect RuntimeError; portattn's ValueError/TypeError are that too."""
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(RuntimeError):
        sdpa(q, q.half(), q.half())
    with pytest.raises(RuntimeError):
        sdpa(torch.randn(4), torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(RuntimeError, match="Explicit attn_mask should not be set when is_causal=True"):
        sdpa(q, q, q, torch.ones(8, 8, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="attn_mask and is_causal"):  # still the ValueError it was
        sdpa(q, q, q, torch.ones(8, 8, dtype=torch.bool), is_causal=True)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        sdpa(q, q, q, is_causal=1)


@pytest.mark.parametrize("q_dtype,mask_dtype,accepted", [
    (torch.float32, torch.float64, False), (torch.float32, torch.float16, False), (torch.float32, torch.bfloat16, False),
    (torch.float64, torch.float32, True), (torch.float16, torch.float32, True), (torch.float16, torch.float16, True),
    (torch.float64, torch.bool, True),
])
def test_attn_mask_dtypes_are_sdpa_s(q_dtype, mask_dtype, accepted):
    q = torch.randn(1, 2, 5, 8).to(q_dtype)
    mask = torch.zeros(5, 5, dtype=mask_dtype)
    if accepted:
        sdpa(q, q, q, mask)
    else:
        with pytest.raises(RuntimeError, match="attn_mask has dtype"):
            sdpa(q, q, q, mask)


@pytest.mark.parametrize("shape_q,shape_kv,value_dim", [
    ((0, 2, 4, 8), (0, 2, 4, 8), 8), ((2, 0, 4, 8), (2, 0, 4, 8), 8), ((2, 2, 4, 8), (2, 2, 4, 8), 0),
    ((2, 2, 4, 0), (2, 2, 5, 0), 8),
], ids=["batch-0", "heads-0", "value-dim-0", "head-dim-0"])
def test_empty_inputs_give_sdpa_s_result(shape_q, shape_kv, value_dim):
    q, k, v = leaves(shape_q, shape_kv, (*shape_kv[:-1], value_dim))
    assert_matches_peer([q, k, v])


def test_dropout_p_of_one_gives_zeros_and_zero_gradients():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    out = sdpa(q, q, q, dropout_p=1.0)
    out.sum().backward()
    assert out.shape == q.shape and not out.any() and not q.grad.any()
    with pytest.raises(RuntimeError, match=r"dropout_p must be a probability in \[0, 1\]"):
        sdpa(q, q, q, dropout_p=1.5)


@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 3, 5, 7), (2, 1, 1, 7), (3, 5, 7), (1, 7)])
def test_a_float_mask_that_requires_grad_gets_sdpa_s_gradient(mask_shape):
    assert_matches_peer(leaves((2, 3, 5, 16), (2, 3, 7, 16), (2, 3, 7, 16), mask_shape))


def test_a_mask_gradient_with_dropout_is_refused_not_wrong():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="attn_mask requires grad and dropout_p > 0"):
        sdpa(q, q, q, torch.zeros(4, 4, requires_grad=True), dropout_p=0.1)


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_is_the_causal_flag_with_its_alignment(variant):
    """TestAttnBias: torch.nn.attention.bias.CausalBias as attn_mask (it was read as a dense mask)."""
    from torch.nn.attention import bias

    q, k, v = leaves((2, 2, 5, 8), (2, 2, 9, 8), (2, 2, 9, 8))
    made = getattr(bias, f"causal_{variant}")(5, 9)
    got = sdpa(q, k, v, attn_mask=made)
    torch.testing.assert_close(got, peer(q, k, v, attn_mask=made._materialize("cpu")))
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        sdpa(q, k, v, attn_mask=made, is_causal=True)


@pytest.mark.parametrize("head_dim,value_dim", [(8, 8), (6, 12)])
def test_head_dims_below_triton_s_smallest_run_padded(usable_backend, head_dim, value_dim):
    """torch's tests use head dims 6, 8 and 15; Triton's kernels take 16 and up, so SDPA pads to 16 (exact)."""
    usable_backend("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (x.to(device).detach().requires_grad_()
               for x in leaves((1, 2, 5, head_dim), (1, 2, 7, head_dim), (1, 2, 7, value_dim), dtype=torch.float32))
    got = portattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    expected = peer(*(x.double() for x in (q, k, v)), is_causal=True)
    torch.testing.assert_close(got, expected.float(), atol=2e-5, rtol=2e-5)
    got.sum().backward()
    assert q.grad.shape == q.shape and torch.isfinite(q.grad).all()
