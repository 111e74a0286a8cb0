"""One conformance suite for every backend: output, LSE and dq/dk/dv against the float64 reference.

Parametrized over every registered backend; a backend not usable on this machine skips with its
own reasons, and a case a usable backend refuses must be refused with its declared reasons (the
refusal is checked, not skipped).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import portattn
from portattn import reference
from portattn.inputs import spec_from_arrays

from .cases import CASES, Case
from .checks import amax as _amax
from .checks import as64 as _as64
from .checks import check_close, check_lse, device_for
from .tolerances import BOUNDS, conditioning

torch = pytest.importorskip("torch", reason="the conformance suite builds its inputs and checks autograd with torch")


def make_inputs(case: Case, device: str, requires_grad: bool):
    """q, k, v and dO for a case, reproducible per case id."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    dtype = getattr(torch, case.dtype)

    def tensor(n: int, large: bool):
        x = torch.randn(case.batch, case.heads, n, case.head_dim, generator=gen, dtype=torch.float64)
        if large:  # integers |x| <= 255 are exact in every dtype, so only the backend's arithmetic errs
            x = (x * 60).round().clamp(-255, 255)
        return x.to(dtype).to(device).requires_grad_(requires_grad)

    large = case.magnitude == "large"
    q, k, v = tensor(case.seqlen_q, large), tensor(case.seqlen_k, large), tensor(case.seqlen_k, False)
    grad_out = tensor(case.seqlen_q, False).detach()
    return q, k, v, grad_out


def _max_abs_score(q, k, scale: float) -> float:
    if q.shape[2] == 0 or k.shape[2] == 0:
        return 0.0
    return float(np.abs(np.einsum("bhqd,bhkd->bhqk", _as64(q), _as64(k))).max() * scale)


def _refused(backend, case, q, k, v) -> bool:
    """True when the backend declares it cannot run the case; then the call must say so, in full."""
    reasons = backend.not_supported_reasons(spec_from_arrays(q, k, v, causal=case.causal))
    if not reasons:
        return False
    with pytest.raises(ValueError) as refusal:
        portattn.attention(q, k, v, causal=case.causal, backend=backend.name)
    for reason in reasons:
        assert reason in str(refusal.value)
    return True


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward(backend, case: Case):
    q, k, v, _ = make_inputs(case, device_for(backend), requires_grad=False)
    if _refused(backend, case, q, k, v):
        return
    out, lse = portattn.attention(q, k, v, causal=case.causal, backend=backend.name, return_lse=True)
    scale = case.head_dim**-0.5
    want_out, want_lse = reference.attention_forward(_as64(q), _as64(k), _as64(v), scale=scale, causal=case.causal)
    bound = BOUNDS[case.dtype]
    extra = conditioning(case.dtype, _max_abs_score(q, k, scale))
    assert out.dtype == q.dtype and out.device == q.device and lse.dtype == torch.float32
    check_close("out", out, want_out, bound.out + extra)
    check_lse(lse, want_lse, bound.lse + extra)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_backward(backend, case: Case):
    q, k, v, grad_out = make_inputs(case, device_for(backend), requires_grad=True)
    if _refused(backend, case, q, k, v):
        return
    out = portattn.attention(q, k, v, causal=case.causal, backend=backend.name)
    out.backward(grad_out)
    scale = case.head_dim**-0.5
    wanted = reference.attention_backward(_as64(grad_out), _as64(q), _as64(k), _as64(v), scale=scale, causal=case.causal)
    bound = BOUNDS[case.dtype].grad + conditioning(case.dtype, _max_abs_score(q, k, scale))
    # the size of the summands: dP = dO v^T entries, times K (for dq), Q (for dk); P dO for dv
    dp_size = _amax(grad_out) * _amax(v) * case.head_dim**0.5
    magnitudes = (scale * _amax(k) * dp_size, scale * _amax(q) * dp_size, _amax(grad_out))
    for name, tensor, want, magnitude in zip(("dq", "dk", "dv"), (q, k, v), wanted, magnitudes):
        assert tensor.grad is not None, f"{name} was not computed"
        assert tensor.grad.dtype == tensor.dtype
        check_close(name, tensor.grad, want, bound, magnitude)
