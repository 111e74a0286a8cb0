"""PyTorch's own SDPA checks, replayed against ``portattn.scaled_dot_product_attention``.

Run::

    python benchmarks/sdpa_upstream.py                          # backends numba, opencl, triton, auto on the CPU
    python benchmarks/sdpa_upstream.py --backend triton --device cuda   # on a GPU (cupy likewise)
    python benchmarks/sdpa_upstream.py --backend numba -k mask -v       # only the checks whose name has "mask"

On a machine without CUDA, triton runs in its interpreter (``TRITON_INTERPRET=1`` is set here
before anything imports triton) and opencl on a CPU device such as PoCL: both get the small
shapes (``--small``, the default for them). Exit status 1 when any check fails. Correctness only:
nothing here is timed.

Every check calls ``torch.nn.functional.scaled_dot_product_attention`` with that name patched to
``functools.partial(portattn.scaled_dot_product_attention, backend=B)``, as a test suite written for
torch would, and compares with torch's own SDPA, math backend, in float64 (``torch_sdpa``). The
checks mirror, in their own words (no code of torch's is copied), these tests of torch 2.x:

* ``sample_inputs_scaled_dot_product_attention`` (``torch/testing/_internal/common_methods_invocations.py``,
  the OpInfo ``nn.functional.scaled_dot_product_attention``): each sample's output and q/k/v
  gradients; a dropout sample's reproducibility under a seed and its gradcheck (as the OpInfo's
  ``wrapper_set_seed``).
* ``test/test_transformers.py``:
  ``TestTransformers.test_scaled_dot_product_attention`` (3-D/4-D inputs, 2-D/3-D/4-D bool masks,
  causal, the attn_mask + is_causal error, gradcheck with dropout);
  ``TestSDPA.test_sdp_math_gradcheck``, ``test_scaled_dot_product_fused_attention_vs_math_cpu``,
  ``test_scaled_dot_product_fused_attention_mask_vs_math_cpu`` (their tolerances per dtype),
  ``test_scaled_dot_product_fused_attention_with_inf``,
  ``test_scaled_dot_product_attention_math_with_negative_scale``;
  ``TestSDPAFailureModes.test_invalid_inputs_different_datatypes`` and
  ``test_invalid_inputs_1_dimensional_inputs`` (RuntimeError);
  ``TestAttnBias.test_causal_variants``, ``test_is_causal_equals_upper_left``,
  ``test_is_causal_and_mask_fails`` (``torch.nn.attention.bias.CausalBias``).
* SDPA's documented semantics that those tests assume: GQA (``enable_gqa``, key and value head
  counts apart), broadcast leading dims, value head dim != query's, the attn_mask dtypes SDPA takes
  and refuses, empty inputs, ``dropout_p`` of 1, fully masked rows (zeros, as torch's CPU kernels),
  and the gradient of a float attn_mask that requires grad.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import traceback
from pathlib import Path

if __name__ == "__main__":  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import portattn  # noqa: E402
from portattn.backends import registry as backend_registry  # noqa: E402

TORCH_SDPA = F.scaled_dot_product_attention  # the original, kept before any patching
CHECKS = []
DEFAULT_BACKENDS = ("numba", "opencl", "triton", "auto")
EMULATED = ("triton", "opencl")  # on a CPU they run emulated: small shapes only


def check(fn):
    CHECKS.append(fn)
    return fn


def torch_sdpa(*args, **kwargs):
    """torch's SDPA, math backend: the reference."""
    with sdpa_kernel(SDPBackend.MATH):
        return TORCH_SDPA(*args, **kwargs)


class Env:
    """What a check needs: the device, whether to keep shapes small, the dtypes the backend takes, and
    ``wide``: float64 where the backend takes it (torch's tests compare in float64), else float32."""

    def __init__(self, device: str, small: bool, backend: str):
        self.device, self.small = device, small
        names = ({"float64", "float32", "float16", "bfloat16"} if backend == "auto"
                 else set(backend_registry()[backend].capabilities.dtypes))
        self.dtypes = tuple(getattr(torch, name) for name in ("float64", "float32", "bfloat16", "float16")
                            if name in names)
        self.wide = torch.float64 if torch.float64 in self.dtypes else torch.float32
        self.dropout = backend == "auto" or "dropout" in backend_registry()[backend].capabilities.features
        self.skipped = []

    def tol(self, tight: float) -> float:
        """A float64 check's tolerance, or float32's where the check runs in float32."""
        return tight if self.wide == torch.float64 else max(tight, 2e-5)

    def gradcheck(self, fn, inputs, what: str) -> None:
        """torch's gradcheck (float64 only: its finite differences need it), else noted as skipped."""
        if self.wide != torch.float64:
            self.skipped.append(f"gradcheck {what}: no float64")
            return
        assert torch.autograd.gradcheck(fn, inputs, atol=1e-5, rtol=1e-3, nondet_tol=0.0), what

    def randn(self, *shape, dtype=torch.float32, requires_grad=False):
        return torch.randn(*shape, dtype=dtype, device=self.device).requires_grad_(requires_grad)

    def size(self, full: int, small: int) -> int:
        return small if self.small else full


def clones(tensors, dtype=None):
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_(t.requires_grad) for t in tensors]


def assert_close(actual, expected, atol, rtol, what=""):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def tolerance(dtype):
    """Per-dtype tolerances, as test_transformers' CPU comparisons (fused vs math) use."""
    return {torch.float64: (1e-5, 5e-6), torch.float32: (1e-5, 5e-6), torch.bfloat16: (5e-2, 5e-2),
            torch.float16: (1e-2, 1e-2)}[dtype]


def compare_with_math(env, inputs, kwargs, atol, rtol, grads=True, what=""):
    """F.sdpa (patched: portattn) against torch's math SDPA in float64, output and every gradient.
    ``inputs`` is [q, k, v] or [q, k, v, attn_mask] (a mask to differentiate, also in ``kwargs``)."""
    refs = clones(inputs, torch.float64)
    ref_kwargs = dict(kwargs)
    mask = kwargs.get("attn_mask")
    if len(inputs) == 4:
        ref_kwargs["attn_mask"] = refs[3]
    elif mask is not None and mask.is_floating_point():
        ref_kwargs["attn_mask"] = mask.to(torch.float64)
    actual = F.scaled_dot_product_attention(*inputs[:3], **kwargs)
    expected = torch_sdpa(*refs[:3], **ref_kwargs)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == inputs[0].dtype, f"{what}: dtype {actual.dtype} != {inputs[0].dtype}"
    assert_close(actual, expected, atol, rtol, f"{what} output")
    if not grads or not any(t.requires_grad for t in inputs):
        return
    grad_out = torch.randn_like(expected)
    actual.backward(grad_out.to(actual.dtype))
    expected.backward(grad_out)
    for name, mine, theirs in zip("qkvm", inputs, refs):
        if mine.requires_grad:
            assert mine.grad is not None, f"{what}: no gradient for {name}"
            assert_close(mine.grad, theirs.grad, 4 * atol, 4 * rtol, f"{what} grad {name}")


def expect_error(kinds, fn, match=None, what=""):
    try:
        fn()
    except kinds as error:
        if match is not None and match not in str(error):
            raise AssertionError(f"{what}: raised {type(error).__name__} without {match!r}: {error}") from None
        return
    raise AssertionError(f"{what}: no {kinds} raised")


def with_seed(fn, *args, **kwargs):
    """The OpInfo's ``wrapper_set_seed``: one seed before every call, so dropout is the same each time."""
    torch.manual_seed(42)
    return fn(*args, **kwargs)


# ---- the OpInfo's sample inputs ------------------------------------------------------------------------

def opinfo_samples(env, dtype, requires_grad):
    """The OpInfo's samples, from torch when its test helpers import (they need ``expecttest``), else the
    same list spelled out here: (query, key, value, kwargs)."""
    try:
        from torch.testing._internal.common_methods_invocations import sample_inputs_scaled_dot_product_attention
    except ImportError:
        return _opinfo_samples_spelled_out(env, dtype, requires_grad)
    samples = sample_inputs_scaled_dot_product_attention(None, env.device, dtype, requires_grad)
    return [(s.input, *s.args, dict(s.kwargs)) for s in samples]


def _opinfo_samples_spelled_out(env, dtype, requires_grad):
    """As ``sample_inputs_scaled_dot_product_attention`` builds them: batch 4, 3 queries, 6 keys, 4 heads,
    head dim 8; 3-D, 4-D and a 3-D query broadcast against 4-D keys; causal or not, dropout 0 or 0.5 (each
    twice: its enable_gqa loop adds no argument); then one 4-D call with a (3, 6) float mask."""
    batch, seq_q, seq_kv, heads, head_dim = 4, 3, 6, 4, 8

    def make(*shape):  # make_tensor's range: uniform in [-9, 9)
        return (torch.rand(shape, dtype=dtype, device=env.device) * 18 - 9).requires_grad_(requires_grad)

    shapes = [((batch, seq_q, head_dim), (batch, seq_kv, head_dim)),
              ((batch, heads, seq_q, head_dim), (batch, heads, seq_kv, head_dim)),
              ((heads, seq_q, head_dim), (batch, heads, seq_kv, head_dim))]
    samples = [(make(*q), make(*kv), make(*kv), dict(is_causal=causal, dropout_p=p))
               for q, kv in shapes for causal in (True, False) for p in (0.0, 0.5) for _ in range(2)]
    samples.append((make(batch, heads, seq_q, head_dim), make(batch, heads, seq_kv, head_dim),
                    make(batch, heads, seq_kv, head_dim), dict(attn_mask=make(seq_q, seq_kv), is_causal=False,
                                                                dropout_p=0.0)))
    return samples


@check
def opinfo_samples_match_math(env):
    count = 0
    for dtype in (d for d in (torch.float64, torch.float32) if d in env.dtypes):
        atol, rtol = (1e-7, 1e-7) if dtype == torch.float64 else (2e-5, 2e-5)
        for i, (q, k, v, kwargs) in enumerate(opinfo_samples(env, dtype, requires_grad=True)):
            if kwargs.get("dropout_p", 0.0) > 0:
                continue
            inputs = [q, k, v]
            if kwargs.get("attn_mask") is not None:
                kwargs["attn_mask"] = kwargs["attn_mask"].detach().requires_grad_()
                inputs.append(kwargs["attn_mask"])
            compare_with_math(env, inputs, kwargs, atol, rtol, what=f"sample {i} {dtype}")
            count += 1
    return f"{count} samples"


@check
def opinfo_dropout_samples_are_seeded_and_differentiable(env):
    if not env.dropout:  # a refusal that says why is what SDPA's contract allows a backend without it
        q = env.randn(1, 2, 4, 16, dtype=env.wide)
        expect_error(RuntimeError, lambda: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5), "dropout",
                     "dropout on a backend without it")
        env.skipped.append("dropout: the backend refuses it (checked: a RuntimeError naming dropout)")
        return None
    count = 0
    for i, (q, k, v, kwargs) in enumerate(opinfo_samples(env, env.wide, requires_grad=True)):
        if kwargs.get("dropout_p", 0.0) == 0:
            continue
        inputs = (q, k, v)
        first = with_seed(F.scaled_dot_product_attention, *inputs, **kwargs)
        again = with_seed(F.scaled_dot_product_attention, *inputs, **kwargs)
        assert torch.equal(first, again), f"sample {i}: one seed gave two dropout masks"
        assert torch.isfinite(first).all()
        if count < (1 if env.small else 3):  # gradcheck is slow: a few samples
            small = [x[:1].detach().requires_grad_() for x in inputs]
            env.gradcheck(functools.partial(with_seed, F.scaled_dot_product_attention, **kwargs), small, f"sample {i}")
        count += 1
    return f"{count} samples"


# ---- test_transformers.py -------------------------------------------------------------------------------

@check
def transformers_test_scaled_dot_product_attention(env):
    """TestTransformers.test_scaled_dot_product_attention, dropout 0 (dropout is portattn's own generator,
    so its masks are not torch's: checked by seed and gradcheck instead)."""
    count = 0
    N, N_prime, L, S, E = 5, 2, 4, 3, 6
    cases = [(3, None, False), (3, 2, False), (3, 2, True), (3, 3, False), (3, 3, True),
             (4, None, False), (4, 2, False), (4, 2, True), (4, 4, False), (4, 4, True)]
    for dtype in (d for d in (torch.float64, torch.float32) if d in env.dtypes):
        tol = 1e-6 if dtype == torch.float64 else 1e-5  # float32: assertEqual's default atol
        for input_dim, mask_dim, is_causal in cases:
            lead = (N,) if input_dim == 3 else (N, N_prime)
            q, k, v = env.randn(*lead, L, E, dtype=dtype), env.randn(*lead, S, E, dtype=dtype), env.randn(*lead, S, E, dtype=dtype)
            mask = None
            if mask_dim is not None:
                shape = (L, S) if mask_dim == 2 else (*lead, L, S)
                ones = torch.ones(shape, dtype=torch.bool, device=env.device)
                mask = ones.tril() if is_causal else torch.randint(0, 2, shape, device=env.device).bool()
            what = f"{input_dim}D mask {mask_dim} causal {is_causal} {dtype}"
            if is_causal:
                compare_with_math(env, [q, k, v], dict(is_causal=True), tol, tol, what=what)
                expect_error(RuntimeError, lambda: F.scaled_dot_product_attention(q, k, v, mask, 0.0, True),
                             "Explicit attn_mask should not be set when is_causal=True", what)
            else:
                compare_with_math(env, [q, k, v], dict(attn_mask=mask), tol, tol, what=what)
            count += 1
    q, k, v = (env.randn(N, N_prime, n, E, dtype=env.wide, requires_grad=True) for n in (L, S, S))
    for dropout_p in (0.0, 0.2, 0.5) if env.dropout else (0.0,):
        env.gradcheck(functools.partial(with_seed, F.scaled_dot_product_attention), (q, k, v, None, dropout_p),
                      f"dropout {dropout_p}")
    return f"{count} cases, 3 gradchecks"


@check
def sdpa_math_gradcheck(env):
    """TestSDPA.test_sdp_math_gradcheck: packed qkv, contiguous or not, float64."""
    batch, seq, heads, head_dim = 4, 4, 2, 16
    for contiguous in (True, False):
        qkv = env.randn(batch, seq, 3 * heads * head_dim, dtype=env.wide, requires_grad=True)
        q, k, v = (x.view(batch, -1, heads, head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=-1))
        if contiguous:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        env.gradcheck(functools.partial(with_seed, F.scaled_dot_product_attention), (q, k, v, None, 0.0, False),
                      f"contiguous {contiguous}")


def packed_heads(x, batch, seq, heads, head_dim):
    return x.view(batch, seq, heads, head_dim).transpose(1, 2)


@check
def fused_attention_vs_math_cpu(env):
    """TestSDPA.test_scaled_dot_product_fused_attention_vs_math_cpu (its dtypes and tolerances; the
    sequence lengths trimmed for the emulated backends)."""
    count = 0
    seqs = (33,) if env.small else (267, 1030)
    for dtype in env.dtypes:
        atol, rtol = tolerance(dtype)
        for seq, heads, head_dim, causal in ((s, h, d, c) for s in seqs for h in (1, 3) for d in (8, 16)
                                              for c in (True, False)):
            if not env.small and seq > 300 and (heads, head_dim) != (3, 16):
                continue  # the longest sequence once: the rest of the grid adds nothing but time
            batch = 2
            x = env.randn(batch, seq, 3 * heads * head_dim, dtype=dtype, requires_grad=True)
            # strided views of one packed tensor, as the test has them (detached: leaves with their own .grad)
            q, k, v = (packed_heads(t, batch, seq, heads, head_dim).detach().requires_grad_()
                       for t in x.split(heads * head_dim, dim=2))
            what = f"{dtype} seq {seq} heads {heads} d {head_dim} causal {causal}"
            compare_with_math(env, [q, k, v], dict(is_causal=causal), atol, rtol, what=what)
            count += 1
    return f"{count} cases"


@check
def fused_attention_mask_vs_math_cpu(env):
    """TestSDPA.test_scaled_dot_product_fused_attention_mask_vs_math_cpu: every 2-D and 4-D broadcast mask
    shape, bool and float, with gradients."""
    count = 0
    batch, q_len, kv_len, heads, head_dim = 2, env.size(267, 19), env.size(514, 37), 3, 8
    shapes = [(a, b) for a in (q_len, 1) for b in (kv_len, 1)]
    shapes += [(w, x, y, z) for w in (batch, 1) for x in (heads, 1) for y in (q_len, 1) for z in (kv_len, 1)]
    for dtype in env.dtypes:
        atol, rtol = tolerance(dtype)
        for shape in shapes:
            for bool_mask in (False, True):
                q = env.randn(batch, heads, q_len, head_dim, dtype=dtype, requires_grad=True)
                k, v = (env.randn(batch, heads, kv_len, head_dim, dtype=dtype, requires_grad=True) for _ in "kv")
                if bool_mask:
                    mask = torch.randint(0, 2, shape, dtype=torch.bool, device=env.device)
                else:
                    mask = env.randn(*shape, dtype=dtype)
                what = f"{dtype} mask {shape} {'bool' if bool_mask else 'float'}"
                compare_with_math(env, [q, k, v], dict(attn_mask=mask), atol, rtol, what=what)
                count += 1
    return f"{count} cases"


@check
def fused_attention_with_inf(env):
    """TestSDPA.test_scaled_dot_product_fused_attention_with_inf: a band of -inf, rows of few keys."""
    n = env.size(600, 64)
    full = torch.full((n, n), float("-inf"), device=env.device)
    mask = torch.triu(full, diagonal=1) + torch.tril(full, diagonal=-10)
    q, k, v = (env.randn(1, n, 2, 8).transpose(1, 2) for _ in "qkv")
    compare_with_math(env, [q, k, v], dict(attn_mask=mask), 1e-5, 1.3e-6, what="band of -inf")


@check
def negative_scale(env):
    """TestSDPA.test_scaled_dot_product_attention_math_with_negative_scale."""
    x = env.randn(1, 3, env.size(64, 16), 64)
    expected = torch.matmul((torch.matmul(x, x.transpose(-1, -2)) / -0.0001).softmax(dim=-1), x)
    actual = F.scaled_dot_product_attention(x, x, x, scale=-1.0 / 0.0001)
    assert_close(actual, expected, 1e-5, 1.3e-6, "negative scale")


@check
def failure_modes(env):
    """TestSDPAFailureModes: different dtypes and 1-D inputs raise RuntimeError (as every SDPA backend)."""
    shape = (1, 4, 8, 16)
    q = env.randn(*shape)
    k = env.randn(*shape, dtype=torch.float16)
    expect_error(RuntimeError, lambda: F.scaled_dot_product_attention(q, k, k), what="different dtypes")
    one_d = env.randn(4, dtype=torch.float16)
    kv = env.randn(1, 4, dtype=torch.float16)
    expect_error(RuntimeError, lambda: F.scaled_dot_product_attention(one_d, kv, kv), what="1-D query")


@check
def attn_bias_causal_variants(env):
    """TestAttnBias.test_causal_variants / test_is_causal_equals_upper_left / test_is_causal_and_mask_fails."""
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    shapes = [(1, 1, 23, 56, 15), (2, 2, 19, 33, 16), (2, 2, 33, 19, 16)]
    if not env.small:
        shapes += [(16, 16, 128, 128, 16), (16, 16, 128, 256, 32), (16, 16, 256, 128, 32)]
    count = 0
    for batch, heads, q_len, kv_len, head_dim in shapes:
        for make_bias in (causal_upper_left, causal_lower_right):
            if make_bias is causal_lower_right and q_len > kv_len:
                continue  # torch skips it too: rows that see no key
            q = torch.rand(batch, heads, q_len, head_dim, device=env.device, dtype=torch.float16, requires_grad=True)
            k, v = (torch.rand(batch, heads, kv_len, head_dim, device=env.device, dtype=torch.float16,
                               requires_grad=True) for _ in "kv")
            bias = make_bias(q_len, kv_len)
            dense = bias._materialize(env.device)
            expected = torch_sdpa(*clones([q, k, v], torch.float64), attn_mask=dense)
            qc, kc, vc = clones([q, k, v])
            actual = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bias)
            assert_close(actual, expected, 1e-3, 1e-3, f"{make_bias.__name__} {q_len}x{kv_len}")
            actual.backward(torch.ones_like(actual))
            assert all(t.grad is not None for t in (qc, kc, vc))
            count += 1
        upper = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(q_len, kv_len))
        flag = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert_close(upper, flag, 1e-3, 1e-3, "upper left == is_causal")
    expect_error(ValueError, lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(q_len, kv_len),
                                                                     is_causal=True),
                 "CausalBias should not be used with causal=True", "CausalBias with is_causal")
    return f"{count} cases"


# ---- SDPA's documented semantics ------------------------------------------------------------------------

@check
def gqa_and_broadcast_shapes(env):
    """enable_gqa (key and value head counts apart too), broadcast leading dims, Ev != E, 2-D/5-D inputs."""
    cases = [
        ((2, 8, 5, 16), (2, 2, 7, 16), (2, 2, 7, 16), True),
        ((2, 8, 5, 16), (2, 4, 7, 16), (2, 2, 7, 16), True),
        ((2, 6, 5, 16), (2, 1, 7, 16), (2, 3, 7, 16), True),
        ((2, 3, 4, 5, 16), (2, 3, 2, 7, 16), (2, 3, 2, 7, 16), True),
        ((6, 5, 16), (2, 7, 16), (2, 7, 16), True),
        ((1, 2, 5, 16), (3, 2, 7, 16), (3, 2, 7, 16), False),
        ((3, 2, 5, 16), (1, 2, 7, 16), (3, 2, 7, 16), False),
        ((3, 1, 5, 16), (3, 2, 7, 16), (3, 2, 7, 16), False),
        ((2, 5, 16), (3, 2, 7, 16), (3, 2, 7, 16), False),
        ((4, 3, 5, 16), (7, 16), (7, 16), False),
        ((5, 16), (7, 16), (7, 16), False),
        ((2, 3, 5, 16), (2, 3, 7, 16), (2, 3, 7, 24), False),
        ((2, 3, 5, 24), (2, 3, 7, 24), (2, 3, 7, 8), False),
    ]
    for q_shape, k_shape, v_shape, gqa in cases:
        inputs = [env.randn(*s, dtype=env.wide, requires_grad=True) for s in (q_shape, k_shape, v_shape)]
        compare_with_math(env, inputs, dict(enable_gqa=gqa), env.tol(1e-7), env.tol(1e-7), what=f"{q_shape} {k_shape} {v_shape} gqa {gqa}")
    return f"{len(cases)} cases"


@check
def attn_mask_dtypes(env):
    """SDPA takes a bool mask, a float32 one or one of query's dtype, and refuses the others."""
    count = 0
    for q_dtype in env.dtypes:
        for mask_dtype in (torch.bool, torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64):
            q = env.randn(1, 2, 5, 8, dtype=q_dtype)
            mask = torch.zeros(5, 5, device=env.device).to(mask_dtype)
            torch_accepts = _accepts(lambda: TORCH_SDPA(q, q, q, mask))
            ours = _accepts(lambda: F.scaled_dot_product_attention(q, q, q, mask))
            assert ours == torch_accepts, f"q {q_dtype} mask {mask_dtype}: torch {torch_accepts} portattn {ours}"
            count += 1
    return f"{count} pairs"


def _accepts(fn) -> bool:
    """False where the call is refused for its attn_mask (not for what the backend cannot run)."""
    try:
        fn()
    except RuntimeError as error:
        return "attn_mask" not in str(error)
    return True


@check
def empty_and_degenerate(env):
    """Empty axes, dropout_p of 1, fully masked rows: what torch's CPU SDPA gives."""
    for shape_q, shape_kv in [((0, 2, 4, 8), (0, 2, 4, 8)), ((2, 0, 4, 8), (2, 0, 4, 8)),
                              ((2, 2, 0, 8), (2, 2, 4, 8)), ((2, 2, 4, 8), (2, 2, 0, 8))]:
        inputs = [env.randn(*s, dtype=env.wide, requires_grad=True) for s in (shape_q, shape_kv, shape_kv)]
        compare_with_math(env, inputs, {}, env.tol(1e-7), env.tol(1e-7), what=f"empty {shape_q} {shape_kv}")
    q = env.randn(1, 2, 4, 8, requires_grad=True)
    out = F.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    assert out.shape == q.shape and (out == 0).all(), "dropout_p=1 gives zeros"
    out.sum().backward()
    assert (q.grad == 0).all()
    mask = torch.ones(4, 4, dtype=torch.bool, device=env.device)
    mask[1] = False
    compare_with_math(env, [env.randn(1, 2, 4, 8, dtype=env.wide, requires_grad=True) for _ in "qkv"],
                      dict(attn_mask=mask), env.tol(1e-7), env.tol(1e-7), what="fully masked row")


@check
def float_mask_gradient(env):
    """A float attn_mask that requires grad gets SDPA's gradient, whatever its broadcast shape."""
    shapes = [(5, 7), (2, 3, 5, 7), (2, 1, 5, 7), (1, 3, 1, 7), (3, 5, 7)]
    for shape in shapes:
        q = env.randn(2, 3, 5, 16, dtype=env.wide, requires_grad=True)
        k, v = (env.randn(2, 3, 7, 16, dtype=env.wide, requires_grad=True) for _ in "kv")
        mask = env.randn(*shape, dtype=env.wide, requires_grad=True)
        compare_with_math(env, [q, k, v, mask], dict(attn_mask=mask), env.tol(1e-7), env.tol(1e-7),
                          what=f"mask grad {shape}")
    q, k, v = (env.randn(1, 2, 4, 8, dtype=env.wide, requires_grad=True) for _ in "qkv")
    mask = env.randn(4, 4, dtype=env.wide, requires_grad=True)
    env.gradcheck(F.scaled_dot_product_attention, (q, k, v, mask), "float mask")
    return f"{len(shapes)} shapes, 1 gradcheck"


# ---- the runner -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def patched_sdpa(backend: str):
    F.scaled_dot_product_attention = functools.partial(portattn.scaled_dot_product_attention, backend=backend)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = TORCH_SDPA


def run(backend: str, env: Env, selected, verbose: bool) -> tuple[int, int]:
    passed = failed = 0
    with patched_sdpa(backend):
        for fn in selected:
            torch.manual_seed(0)
            try:
                note = fn(env)
            except Exception as error:  # noqa: BLE001 -- every failure is reported, then the next check runs
                failed += 1
                print(f"  FAIL {backend:8} {fn.__name__}: {type(error).__name__}: {str(error)[:600]}")
                if verbose:
                    traceback.print_exc()
            else:
                passed += 1
                print(f"  ok   {backend:8} {fn.__name__}" + (f" ({note})" if note else ""))
            for skipped in env.skipped:
                print(f"       {backend:8} {fn.__name__}: skipped {skipped}")
            env.skipped.clear()
    return passed, failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", action="append", help=f"repeatable; default {', '.join(DEFAULT_BACKENDS)}")
    parser.add_argument("--device", default="cpu", help="where the inputs live: cpu or cuda")
    parser.add_argument("--small", action="store_true", help="small shapes for every backend (always for emulated ones)")
    parser.add_argument("-k", default="", help="only the checks whose name contains this")
    parser.add_argument("-v", action="store_true", help="tracebacks of failures")
    args = parser.parse_args(argv)
    selected = [fn for fn in CHECKS if args.k in fn.__name__]
    totals = {}
    for backend in args.backend or DEFAULT_BACKENDS:
        small = args.small or (backend in EMULATED and args.device == "cpu")
        totals[backend] = run(backend, Env(args.device, small, backend), selected, args.v)
    print("\nbackend   passed  failed")
    for backend, (passed, failed) in totals.items():
        print(f"{backend:8} {passed:7} {failed:7}")
    return 1 if any(failed for _, failed in totals.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
