"""The features of ``portattn.spec.FEATURES`` on every backend: output, LSE and gradients against the
float64 reference, or a refusal that carries the backend's declared reason.

Dropout is compared through the mask the backend itself draws (``backend.dropout_keep``), fed to
the reference; a seed must reproduce its result exactly, and another seed must change it.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest

import portattn
from portattn import arrays, inputs, reference
from portattn.extras import Extras
from portattn.inputs import spec_from_arrays
from portattn.spec import FEATURES

from .checks import amax, as64, check_close, check_lse, device_for
from .features import DTYPES, FEATURE_CASES, VARLEN_CASES, VARLEN_LENGTHS, FeatureCase, feature_kwargs
from .tolerances import BOUNDS, conditioning

torch = pytest.importorskip("torch", reason="the conformance suite builds its inputs and checks autograd with torch")


def make_call(case: FeatureCase, device: str, requires_grad: bool):
    """q, k, v, dO and the feature keywords of a case, reproducible per case id."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    dtype = getattr(torch, case.dtype)

    def tensor(heads: int, n: int, magnitude: float = 1.0):
        x = torch.randn(case.batch, heads, n, case.head_dim, generator=gen, dtype=torch.float64) * magnitude
        return x.to(dtype).to(device).requires_grad_(requires_grad)

    q, k = tensor(case.heads, case.seqlen_q, case.magnitude), tensor(case.kv_heads, case.seqlen_k, case.magnitude)
    v = tensor(case.kv_heads, case.seqlen_k)
    grad_out = tensor(case.heads, case.seqlen_q).detach()
    return q, k, v, grad_out, feature_kwargs(case, torch, device, gen)


def spec_and_extras(q, k, v, causal: bool, kwargs: dict, varlen=None):
    """What ``attention`` validates a call into, without choosing a backend."""
    spec = spec_from_arrays(q, k, v, causal=causal, layout="bnhd" if varlen else "bhnd", **kwargs)
    cu = {}
    if varlen is not None:
        spec, cu = inputs.varlen_spec(spec, *varlen)
    arrays = {name: kwargs.get(name) for name in inputs.EXTRA_ARRAYS}
    return spec, inputs.extras_from_arguments(spec, **arrays, **cu)


def _numpy_extras(extras: Extras) -> Extras:
    return extras.map_arrays(lambda x: arrays.to_numpy(x.cpu() if isinstance(x, torch.Tensor) else x))


def expected(backend, q, k, v, causal: bool, kwargs: dict, grad_out=None):
    """The reference's (out, lse) -- or (dq, dk, dv) with ``grad_out`` -- for the same call, the
    conditioning term of its scores, and the spec."""
    spec, extras = spec_and_extras(q, k, v, causal, kwargs)
    extras = _numpy_extras(extras)
    keep = backend.dropout_keep(spec, extras) if spec.dropout_p > 0 else None
    scale = spec.softmax_scale
    q64, k64, v64 = as64(q), as64(k), as64(v)
    repeated = np.repeat(k64, spec.group_size, axis=1)
    scores = reference.scores(q64, repeated, spec, extras, scale)[1] if spec.seqlen_k else np.zeros(0)
    finite = np.abs(scores[np.isfinite(scores)])
    extra = conditioning(spec.dtype, float(finite.max()) if finite.size else 0.0)
    if grad_out is None:
        return reference.attention_forward(q64, k64, v64, scale=scale, spec=spec, extras=extras, keep=keep), extra, spec
    grads = reference.attention_backward(as64(grad_out), q64, k64, v64, scale=scale, spec=spec, extras=extras, keep=keep)
    return grads, extra, spec


def refused(backend, q, k, v, causal: bool, kwargs: dict) -> bool:
    """True when the backend declares it cannot run the call; then ``attention`` must say why, in full."""
    spec = spec_and_extras(q, k, v, causal, kwargs)[0]
    reasons = backend.not_supported_reasons(spec)
    if not reasons:
        return False
    with pytest.raises(ValueError) as refusal:
        portattn.attention(q, k, v, causal=causal, backend=backend.name, **kwargs)
    for reason in reasons:
        assert reason in str(refusal.value)
    # a refusal names a feature of the call, or holds for the same call without features (a dtype the backend never takes)
    plain = backend.not_supported_reasons(_without_features(spec))
    assert all(reason in plain or any(feature in reason for feature in spec.features) for reason in reasons), reasons
    return True


def _without_features(spec):
    return dataclasses.replace(spec, kv_heads=spec.heads, align="top-left", window=None, mask=None, alibi=False, softcap=None,
                               block_size=None, key_padding=False, varlen=False, dropout_p=0.0)


def test_every_feature_has_cases():
    covered = {case.feature for case in FEATURE_CASES} | {"varlen"}
    assert set(FEATURES) <= covered | {"all"}, set(FEATURES) - covered


@pytest.mark.parametrize("case", FEATURE_CASES, ids=lambda c: c.id)
def test_feature_forward(backend, case: FeatureCase):
    q, k, v, _, kwargs = make_call(case, device_for(backend), requires_grad=False)
    if refused(backend, q, k, v, case.causal, kwargs):
        return
    out, lse = portattn.attention(q, k, v, causal=case.causal, backend=backend.name, return_lse=True, **kwargs)
    (want_out, want_lse), extra, _ = expected(backend, q, k, v, case.causal, kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    bound = BOUNDS[case.dtype]
    check_close("out", out, want_out, bound.out + extra)
    check_lse(lse, want_lse, bound.lse + extra)


@pytest.mark.parametrize("case", FEATURE_CASES, ids=lambda c: c.id)
def test_feature_backward(backend, case: FeatureCase):
    q, k, v, grad_out, kwargs = make_call(case, device_for(backend), requires_grad=True)
    if refused(backend, q, k, v, case.causal, kwargs):
        return
    portattn.attention(q, k, v, causal=case.causal, backend=backend.name, **kwargs).backward(grad_out)
    wanted, extra, spec = expected(backend, q, k, v, case.causal, kwargs, grad_out)
    bound = BOUNDS[case.dtype].grad + extra
    # the size of the summands (as in test_conformance), times the group for dK, dV under GQA
    dp_size = amax(grad_out) * amax(v) * case.head_dim**0.5 / (1 - spec.dropout_p)
    scale = spec.softmax_scale
    magnitudes = (scale * amax(k) * dp_size, spec.group_size * scale * amax(q) * dp_size,
                  spec.group_size * amax(grad_out) / (1 - spec.dropout_p))
    for name, tensor, want, magnitude in zip(("dq", "dk", "dv"), (q, k, v), wanted, magnitudes):
        assert tensor.grad is not None and tensor.grad.shape == tensor.shape, f"{name} was not computed"
        check_close(name, tensor.grad, want, bound, magnitude)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_is_reproducible_per_seed(backend, dtype):
    case = FeatureCase("dropout", True, dtype)
    q, k, v, _, kwargs = make_call(case, device_for(backend), requires_grad=False)
    if refused(backend, q, k, v, case.causal, kwargs):
        return
    run = lambda **kw: portattn.attention(q, k, v, causal=True, backend=backend.name, **{**kwargs, **kw})  # noqa: E731
    first = run()
    assert torch.equal(first, run()), "the same seed must give the same result"
    assert not torch.equal(first, run(dropout_seed=4321)), "another seed must drop other weights"
    spec, extras = spec_and_extras(q, k, v, True, kwargs)
    kept = backend.dropout_keep(spec, _numpy_extras(extras)).mean()
    assert abs(kept - (1 - spec.dropout_p)) < 0.02, f"kept {kept:.3f} of the weights for dropout_p = {spec.dropout_p}"


def make_varlen(dtype: str, device: str, requires_grad: bool, heads: int = 4, kv_heads: int = 2, head_dim: int = 40):
    gen = torch.Generator().manual_seed(zlib.crc32(f"varlen-{dtype}".encode()))
    total_q = sum(nq for nq, _ in VARLEN_LENGTHS)
    total_k = sum(nk for _, nk in VARLEN_LENGTHS)

    def tensor(n: int, h: int):
        x = torch.randn(n, h, head_dim, generator=gen, dtype=torch.float64)
        return x.to(getattr(torch, dtype)).to(device).requires_grad_(requires_grad)

    def offsets(lengths):
        return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)

    cu_q = offsets([nq for nq, _ in VARLEN_LENGTHS])
    cu_k = offsets([nk for _, nk in VARLEN_LENGTHS])
    longest = (max(nq for nq, _ in VARLEN_LENGTHS), max(nk for _, nk in VARLEN_LENGTHS))
    q, k, v = tensor(total_q, heads), tensor(total_k, kv_heads), tensor(total_k, kv_heads)
    grad_out = tensor(total_q, heads).detach()
    return q, k, v, grad_out, (cu_q, cu_k, *longest)


@pytest.mark.parametrize("causal, dtype, align", VARLEN_CASES, ids=lambda x: str(x))
def test_varlen(backend, causal, dtype, align):
    """Packed sequences (one empty, one of a single query) with GQA and ALiBi, forward and backward."""
    device = device_for(backend)
    q, k, v, grad_out, lengths = make_varlen(dtype, device, requires_grad=True)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    kwargs = dict(causal=causal, align=align, alibi_slopes=slopes)
    packed = [x[None] for x in (q, k, v)]
    spec = spec_and_extras(*packed, causal, dict(align=align, alibi_slopes=slopes), varlen=lengths)[0]
    reasons = backend.not_supported_reasons(spec)
    if reasons:
        with pytest.raises(ValueError, match="varlen"):
            portattn.attention_varlen(q, k, v, *lengths, backend=backend.name, **kwargs)
        return
    out, lse = portattn.attention_varlen(q, k, v, *lengths, backend=backend.name, return_lse=True, **kwargs)
    want, want_lse = portattn.attention_varlen(*(as64_tensor(x) for x in (q, k, v)), *(cpu(x) for x in lengths),
                                               backend="reference", return_lse=True, causal=causal, align=align,
                                               alibi_slopes=slopes.cpu())
    bound = BOUNDS[dtype]
    extra = conditioning(dtype, 64.0)  # |scores| stay below ~64 here (N(0, 1) inputs, slopes <= 0.5, N <= 129)
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    check_close("out", out, as64(want), bound.out + extra)
    check_lse(lse, as64(want_lse), bound.lse + extra)
    out.backward(grad_out)
    ref = [as64_tensor(x).requires_grad_(True) for x in (q, k, v)]
    portattn.attention_varlen(*ref, *(cpu(x) for x in lengths), backend="reference", causal=causal, align=align,
                              alibi_slopes=slopes.cpu()).backward(as64_tensor(grad_out))
    size = amax(grad_out) * amax(v) * q.shape[-1] ** 0.5
    for name, tensor, want_grad in zip(("dq", "dk", "dv"), (q, k, v), ref):
        check_close(name, tensor.grad, as64(want_grad.grad), BOUNDS[dtype].grad + extra, 2 * size)


def as64_tensor(x):
    return x.detach().to("cpu", torch.float64)


def cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x
