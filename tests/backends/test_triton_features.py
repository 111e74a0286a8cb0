"""Quick checks of the triton backend's features (small shapes, TRITON_INTERPRET=1 on CPUs):
forward (O, LSE) and backward against the float64 reference, dropout through the backend's own
mask, varlen, the fused atomic dQ, and that skipped tiles are never read (NaN planted in them)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from conformance.checks import check_close_finite as _close  # tests/ is on sys.path (pytest's rootdir)

import portattn
from portattn import api, inputs, reference
from portattn import extras as extras_mod
from portattn.inputs import spec_from_arrays

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def triton_backend(usable_backend):
    return usable_backend("triton")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, h, kvh, nq, nk, d, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=gen, dtype=torch.float64) * scale
    k = torch.randn(b, kvh, nk, d, generator=gen, dtype=torch.float64) * scale
    v = torch.randn(b, kvh, nk, d, generator=gen, dtype=torch.float64)
    do = torch.randn(b, h, nq, d, generator=gen, dtype=torch.float64)
    return q, k, v, do


def _to(x, dtype, grad=True):
    return x.to(dtype).to(_device()).requires_grad_(grad)


def _on_device(kwargs):
    """The feature tensors of a call on the device the inputs live on."""
    return {name: x.to(_device()) if isinstance(x, torch.Tensor) else x for name, x in kwargs.items()}


def _numpy_extras(extras):
    return extras.map_arrays(lambda x: x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))


def _expected(q, k, v, do, causal, kwargs, keep_from=None, varlen=None):
    """The reference's out, lse, dq, dk, dv (float64) for the same call."""
    layout = "bnhd" if varlen else "bhnd"
    kwargs = {name: x.to(q.device) if isinstance(x, torch.Tensor) else x for name, x in kwargs.items()}
    spec = spec_from_arrays(q, k, v, causal=causal, layout=layout, **kwargs)
    cu = {}
    if varlen is not None:
        spec, cu = inputs.varlen_spec(spec, *varlen)
    extras = _numpy_extras(inputs.extras_from_arguments(spec, **{n: kwargs.get(n) for n in inputs.EXTRA_ARRAYS}, **cu))
    keep = keep_from.dropout_keep(spec, extras) if spec.dropout_p > 0 else None
    arrays = [x.detach().cpu().double().numpy() for x in (q, k, v, do)]
    if varlen:  # (1, total, H, D) -> (1, H, total, D)
        arrays = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in arrays]
    qs, ks, vs, dos = arrays
    out, lse = reference.attention_forward(qs, ks, vs, scale=spec.softmax_scale, spec=spec, extras=extras, keep=keep)
    grads = reference.attention_backward(dos, qs, ks, vs, scale=spec.softmax_scale, spec=spec, extras=extras, keep=keep)
    return out, lse, grads




TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _check(backend, shape, causal, kwargs, dtype=torch.float32, scale=1.0):
    b, h, kvh, nq, nk, d = shape
    q64, k64, v64, do64 = _inputs(b, h, kvh, nq, nk, d, scale=scale)
    q, k, v = (_to(x, dtype) for x in (q64, k64, v64))
    out, lse = portattn.attention(q, k, v, causal=causal, backend="triton", return_lse=True, **_on_device(kwargs))
    out.backward(do64.to(dtype).to(_device()))
    want_out, want_lse, grads = _expected(q, k, v, do64.to(dtype), causal, kwargs, keep_from=backend)
    tol = TOL[dtype]
    _close("out", out, want_out, tol)
    _close("lse", lse, want_lse, 2e-5 if dtype == torch.float32 else 1e-3)
    for name, x, want in zip(("dq", "dk", "dv"), (q, k, v), grads):
        _close(name, x.grad, want, 4 * tol)


def _masks(b=2, h=4, nq=37, nk=53):
    gen = torch.Generator().manual_seed(7)
    additive = torch.randn(1, h, nq, nk, generator=gen)
    additive[0, 1, 3, :] = float("-inf")  # a row that sees nothing
    additive[0, 2, :, 5] = float("-inf")
    padding = torch.rand(b, nk, generator=gen) > 0.3
    padding[1] = False  # a batch with no real key
    return dict(
        bool=torch.rand(b, 1, nq, nk, generator=gen) > 0.3,
        additive=additive,
        padding=padding,
        blocks=torch.rand(b, 1, 3, 4, generator=gen) > 0.5,
    )


M = _masks()
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])
SHAPE = (2, 4, 4, 37, 53, 32)  # b, h, h_kv, nq, nk, d
CASES = {
    "gqa": (dict(), (2, 4, 2, 37, 53, 32)),
    "mqa-causal": (dict(), (2, 4, 1, 37, 53, 32)),
    "bottom-right": (dict(align="bottom-right"), (2, 4, 4, 60, 40, 32)),
    "window": (dict(window=(7, 3)), SHAPE),
    "window-left": (dict(window=(5, None), align="bottom-right"), SHAPE),
    "window-right": (dict(window=(None, 4)), SHAPE),
    "bool-mask": (dict(attn_mask=M["bool"]), SHAPE),
    "additive-mask": (dict(attn_mask=M["additive"]), SHAPE),
    "alibi": (dict(alibi_slopes=SLOPES, align="bottom-right"), SHAPE),
    "softcap": (dict(softcap=2.0), SHAPE),
    "block-sparse": (dict(block_mask=M["blocks"], block_size=16), SHAPE),
    "key-padding": (dict(key_padding_mask=M["padding"]), SHAPE),
    "everything": (dict(align="bottom-right", window=(20, 6), attn_mask=M["additive"], alibi_slopes=SLOPES, softcap=3.0,
                        block_mask=M["blocks"], block_size=16, key_padding_mask=M["padding"]), (2, 4, 2, 37, 53, 40)),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", list(CASES))
def test_feature(triton_backend, name, causal):
    kwargs, shape = CASES[name]
    _check(triton_backend, shape, causal, kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_combination(triton_backend, dtype):
    kwargs = dict(window=(30, None), alibi_slopes=SLOPES, softcap=5.0, attn_mask=M["bool"][:, :, :, :53])
    _check(triton_backend, (2, 4, 2, 37, 53, 64), True, kwargs, dtype=dtype)


def test_decoding_splits_with_features(triton_backend):
    """Nq = 3 against 2000 keys: the plan splits the key loop; every feature narrows each split."""
    q = torch.empty(1, 4, 3, 32, device=_device())
    k = torch.empty(1, 2, 2000, 32, device=_device())
    assert api.prepare(q, k, k, backend="triton").plan.key_splits > 1
    blocks = torch.rand(1, 4, 1, 16, generator=torch.Generator().manual_seed(1)) > 0.5
    kwargs = dict(align="bottom-right", window=(700, None), alibi_slopes=SLOPES, block_mask=blocks, block_size=(16, 128))
    _check(triton_backend, (1, 4, 2, 3, 2000, 32), True, kwargs)


def test_softcap_saturates(triton_backend):
    """|scores| ~ 1e4 through softcap 20: tanh saturates to +-1 (no overflow, no NaN)."""
    _check(triton_backend, (1, 2, 2, 17, 29, 16), False, dict(softcap=20.0), scale=30.0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout(triton_backend, causal):
    kwargs = dict(dropout_p=0.3, dropout_seed=1234, window=(25, None), softcap=4.0)
    _check(triton_backend, (2, 4, 2, 37, 53, 32), causal, kwargs)


def test_dropout_is_reproducible_and_keyed_by_seed(triton_backend):
    q, k, v, _ = _inputs(2, 2, 2, 33, 70, 16)
    q, k, v = (_to(x, torch.float32, grad=False) for x in (q, k, v))
    run = lambda seed: portattn.attention(q, k, v, backend="triton", dropout_p=0.4, dropout_seed=seed)  # noqa: E731
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    spec = spec_from_arrays(q, k, v, dropout_p=0.4)
    keep = triton_backend.dropout_keep(spec, inputs.extras_from_arguments(spec, dropout_seed=5))
    assert keep.shape == (2, 2, 33, 70) and keep.dtype == bool
    assert abs(keep.mean() - 0.6) < 0.03
    # the counter is (key j, query i, head h, batch b): a larger problem extends the same mask
    bigger = triton_backend.dropout_keep(spec.with_(batch=3, seqlen_q=40, seqlen_k=90), extras_mod.Extras(dropout_seed=5))
    assert np.array_equal(bigger[:2, :, :33, :70], keep)


def _varlen_inputs(lengths, h, kvh, d, dtype):
    gen = torch.Generator().manual_seed(3)
    total_q, total_k = sum(a for a, _ in lengths), sum(b for _, b in lengths)
    q, k, v = (torch.randn(n, heads, d, generator=gen, dtype=torch.float64).to(dtype).to(_device()).requires_grad_(True)
               for n, heads in ((total_q, h), (total_k, kvh), (total_k, kvh)))
    do = torch.randn(total_q, h, d, generator=gen, dtype=torch.float64).to(dtype).to(_device())

    def offsets(xs):
        return torch.tensor(np.concatenate([[0], np.cumsum(xs)]), dtype=torch.int32, device=_device())

    cu = (offsets([a for a, _ in lengths]), offsets([b for _, b in lengths]),
          max(a for a, _ in lengths), max(b for _, b in lengths))
    return q, k, v, do, cu


@pytest.mark.parametrize("kwargs", [
    dict(causal=True, align="bottom-right", alibi_slopes=SLOPES),
    dict(window=(6, 2), softcap=3.0),
    dict(causal=True, dropout_p=0.25, dropout_seed=9),
], ids=["causal-br-alibi", "window-softcap", "dropout"])
def test_varlen(triton_backend, kwargs):
    lengths = ((5, 9), (0, 4), (1, 1), (40, 33), (17, 0), (64, 70))
    q, k, v, do, cu = _varlen_inputs(lengths, 4, 2, 40, torch.float32)
    out, lse = portattn.attention_varlen(q, k, v, *cu, backend="triton", return_lse=True, **_on_device(kwargs))
    out.backward(do)
    causal = kwargs.pop("causal", False)
    want_out, want_lse, grads = _expected(q[None], k[None], v[None], do[None], causal, kwargs, keep_from=triton_backend,
                                          varlen=cu)
    _close("out", out, want_out[0].transpose(1, 0, 2), 2e-5)
    _close("lse", lse, want_lse[0], 2e-5)
    for name, x, want in zip(("dq", "dk", "dv"), (q, k, v), grads):
        _close(name, x.grad, want[0].transpose(1, 0, 2), 1e-4)


@pytest.mark.parametrize("kwargs", [dict(causal=True, window=(9, 2)), dict(block_mask=M["blocks"], block_size=16),
                                    dict(attn_mask=M["additive"], causal=True)], ids=["causal-window", "sparse", "mask"])
def test_fused_atomic_dq(triton_backend, kwargs):
    """The plan's other backward form (dQ summed by atomic adds in the dK/dV pass) with features."""
    q64, k64, v64, do64 = _inputs(2, 4, 2, 37, 53, 32)
    q, k, v = (_to(x, torch.float32, grad=False) for x in (q64, k64, v64))
    kwargs = dict(kwargs)
    causal = kwargs.pop("causal", False)
    call, extras = api._prepare(q, k, v, causal=causal, backend="triton", **_on_device(kwargs))
    plan = call.plan.with_changes({"backward.dq_separate": False})
    out, lse = triton_backend.forward(q, k, v, call.spec, plan, extras)
    grads = triton_backend.backward(do64.float().to(_device()), q, k, v, out, lse, call.spec, plan, extras)
    _, _, want = _expected(q, k, v, do64.float(), causal, kwargs)
    for name, got, w in zip(("dq", "dk", "dv"), grads, want):
        _close(name, got, w, 1e-4)


def test_skipped_tiles_are_never_read(triton_backend):
    """NaN in keys/values no query may see: outside every query's window, and in sparse blocks that
    are empty for every query block. A kernel that loaded them (even masked) would return NaN."""
    q64, k64, v64, do64 = _inputs(1, 2, 2, 3, 1200, 32)
    k64[:, :, :1000] = float("nan")  # bottom-right window (50, 0): the 3 queries see keys >= 1147
    v64[:, :, :1000] = float("nan")
    q, k, v = (_to(x, torch.float32) for x in (q64, k64, v64))
    out = portattn.attention(q, k, v, backend="triton", causal=True, align="bottom-right", window=(50, 0))
    out.backward(do64.float().to(_device()))
    assert not any(torch.isnan(x).any() for x in (out, q.grad, k.grad[:, :, 1000:], v.grad[:, :, 1000:]))

    q64, k64, v64, do64 = _inputs(1, 2, 2, 64, 64, 32)
    blocks = torch.ones(4, 4, dtype=torch.bool)
    blocks[:, 2] = False  # key block 2 (keys 32..47) is empty for every query block
    k64[:, :, 32:48] = float("nan")
    v64[:, :, 32:48] = float("nan")
    q, k, v = (_to(x, torch.float32) for x in (q64, k64, v64))
    out = portattn.attention(q, k, v, backend="triton", block_mask=blocks.to(_device()), block_size=16)
    out.backward(do64.float().to(_device()))
    assert not any(torch.isnan(x).any() for x in (out, q.grad))
    clean = [x.clone() for x in (q64, k64, v64)]
    for x in clean[1:]:
        x[:, :, 32:48] = 0.0
    want_out, _, grads = _expected(*(x.float() for x in clean), do64.float(), False, dict(block_mask=blocks, block_size=16))
    _close("out", out, want_out, 2e-5)
    _close("dq", q.grad, grads[0], 1e-4)


def test_capabilities_declare_every_feature(triton_backend):
    from portattn.spec import FEATURES

    caps = triton_backend.capabilities
    assert caps.features == frozenset(FEATURES)
    assert set(caps.feature_notes) == set(FEATURES)
    module = importlib.import_module("portattn.backends.triton.launch")
    assert module.features.__doc__


def test_repeated_calls_relaunch_with_each_layout(triton_backend):
    """Repeat calls take ``launch.run``'s direct relaunch on a GPU: every change Triton specializes on
    (strides, a 16-byte-misaligned view) must get its own kernel, and each result must stay right."""
    q, k, v, do = (x.to(torch.float32) for x in _inputs(1, 4, 2, 37, 53, 32))
    want_out, _, (want_dq, want_dk, want_dv) = _expected(q, k, v, do, True, {})
    storage = torch.empty(q.numel() + 1, dtype=torch.float32, device=_device())
    layouts = {
        "contiguous": lambda x: x.to(_device()),
        "misaligned": lambda x: storage[1:].view(x.shape).copy_(x),  # data_ptr % 16 == 4
        "transposed": lambda x: x.to(_device()).transpose(1, 2).contiguous().transpose(1, 2),
    }
    for name in ("contiguous", "misaligned", "contiguous", "transposed", "transposed", "contiguous"):
        qd = layouts[name](q).detach().requires_grad_(True)  # a leaf that keeps the layout
        kd, vd = (x.to(_device()).clone().requires_grad_(True) for x in (k, v))  # fresh leaves: no grads carried over
        out = portattn.attention(qd, kd, vd, causal=True, backend="triton")
        out.backward(do.to(_device()))
        _close(f"{name} out", out, want_out, TOL[torch.float32])
        for what, x, want in (("dq", qd, want_dq), ("dk", kd, want_dk), ("dv", vd, want_dv)):
            _close(f"{name} {what}", x.grad, want, 4 * TOL[torch.float32])


class _FakeCompiled:
    """Stands for Triton's CompiledKernel: records the launches ``launch.run`` makes directly."""

    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class _FakeKernel:
    """Stands for a JITFunction: ``kernel[grid](*args, **meta)`` compiles (counted) and launches."""

    arg_names = ["X", "n", "BLOCK", "FLAG"]

    def __init__(self, compiled_type=_FakeCompiled):
        self.compiles, self.compiled, self.compiled_type = 0, [], compiled_type

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.compiles += 1
            self.compiled.append(self.compiled_type())
            return self.compiled[-1]
        return launch


class _FakeDriver:
    class active:
        get_current_stream = staticmethod(lambda index: f"stream{index}")


def _direct_launches(monkeypatch):
    """``launch.run`` as on a GPU without launch hooks, with fake drivers and an empty kernel cache."""
    from portattn.backends.triton import launch

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "_launch_hooks", lambda: False)
    monkeypatch.setattr(launch, "_driver", lambda: _FakeDriver)
    monkeypatch.setattr(launch, "_COMPILED", {})
    monkeypatch.setattr(launch, "_BY_SIGNATURE", {})
    monkeypatch.setattr(launch, "_DIRECT", True)
    return launch


def test_run_relaunches_compiled_kernels_by_layout(monkeypatch):
    """``launch.run``'s bookkeeping, without a GPU: a repeat with the same spec, plan, strides and
    alignment launches the compiled kernel directly (constexprs appended in parameter order); a new
    stride or alignment goes through the JIT again; a new spec or plan whose arguments Triton would
    specialize alike reuses the compiled kernel; launch hooks always take the JIT."""
    launch = _direct_launches(monkeypatch)
    kernel, spec, plan = _FakeKernel(), object(), object()
    x = torch.zeros(4, 8)

    def call(tensor, spec=spec, plan=plan, n=7):
        launch.run(kernel, (3, 2), ((tensor, tensor.stride()), n), dict(BLOCK=16, FLAG=True, num_warps=4),
                   (spec, plan, (tensor,)))

    call(x)
    call(x)
    assert kernel.compiles == 1
    assert kernel.compiled[0].launches == [(3, 2, 1, "stream-1", "function", "metadata", None, None, None,
                                            (x, x.stride()), 7, 16, True)]
    call(x.t())  # new strides: (1, 8) specializes differently from (8, 1)
    call(torch.zeros(33)[1:].view(4, 8))  # 4 bytes past a 16-byte boundary
    assert kernel.compiles == 3
    call(x, spec=object(), n=9)  # a decoding step's new spec, with an integer Triton treats as 7
    call(x, plan=object())
    assert kernel.compiles == 3 and kernel.compiled[0].launches[-2][-3] == 9
    call(x, spec=object(), n=32)  # a multiple of 16: another specialization
    call(x, spec=object(), n=1)  # 1: another again
    assert kernel.compiles == 5
    monkeypatch.setattr(launch, "_launch_hooks", lambda: True)
    call(x)
    assert kernel.compiles == 6


@pytest.mark.parametrize("n_q, n_k, align", [(37, 37, "bottom-right"), (37, 300, "top-left"), (130, 4100, "top-left"),
                                             (1, 300, "bottom-right"), (3, 5000, "bottom-right")])
def test_output_alone_skips_the_lse_and_is_the_same(triton_backend, n_q, n_k, align):
    """A call that needs no LSE (no return_lse, nothing to differentiate) runs the forward that does not write
    it -- where one key split writes O directly; key splits need their LSEs to merge -- and gets exactly the
    output of the call that does; so do the decode kernel's few-query calls, one split (a short cache, the
    decode plan's D6) or several. A causal bottom-right call with as many queries as keys (a model's prefill)
    has no bottom-right flag: it compiles as top-left does (the featureless kernel, without GQA)."""
    from portattn.backends.triton import launch

    q, k, v, _ = (_to(x, torch.float32, grad=False) for x in _inputs(1, 4, 2, n_q, n_k, 32))
    alone = portattn.attention(q, k, v, causal=True, align=align, backend="triton")
    out, lse = portattn.attention(q, k, v, causal=True, align=align, backend="triton", return_lse=True)
    torch.testing.assert_close(alone, out, rtol=0, atol=0)
    assert torch.isfinite(lse).all()
    call = api.prepare(q, k, v, causal=True, align=align, backend="triton")
    steps = call.backend.forward_decode_plan(call.spec)
    if n_q <= 16:  # the decode kernel
        assert steps is not None and steps.key_splits == (1 if n_k < 1000 else steps.key_splits) and (
            n_k < 1000 or steps.key_splits > 1)
        return
    fixed = launch.forward_launch(call.spec, call.plan, False)
    assert fixed.meta["STORE_LSE"] == (fixed.splits > 1)
    assert launch.forward_launch(call.spec, call.plan, True).meta["STORE_LSE"]
    assert fixed.meta.get("BOTTOM_RIGHT", False) == (align == "bottom-right" and n_q != n_k)


def test_direct_launcher_calls_the_c_launch_as_tritons_wrapper_does(monkeypatch):
    """Where this Triton's launcher wrapper is one ``launch.direct_launcher`` calls past (it only allocates scratch
    memory), calling its C entry directly passes exactly what the wrapper would, for a kernel without scratch;
    a kernel with scratch memory, or a wrapper not known, goes through the wrapper."""
    from triton.backends.nvidia.driver import CudaLauncher

    from portattn.backends.triton import launch

    if launch._wrapper_source(CudaLauncher) not in launch._PASS_THROUGH_WRAPPERS:
        pytest.skip("this Triton's launcher wrapper is not one portattn calls past: every launch goes through it "
                    "(triton 3.6, the GPU machine's, is)")
    monkeypatch.setattr(launch, "_driver", lambda: _FakeDriver)
    calls = []
    launcher = object.__new__(CudaLauncher)
    vars(launcher).update(launch=lambda *args: calls.append(args), num_ctas=1, global_scratch_size=0,
                          global_scratch_align=1, profile_scratch_size=0, profile_scratch_align=1,
                          launch_cooperative_grid=False, launch_pdl=True)
    compiled = type("Compiled", (), dict(run=launcher, function="function", packed_metadata="metadata"))()
    x = torch.zeros(4)
    args = ((x, (4, 1)), 7, 0.5)
    launcher(3, 2, 1, "stream0", "function", "metadata", None, None, None, *args, 16, True)  # as CompiledKernel does
    launch.direct_launcher(compiled, (16, True))(3, 2, 1, 0, args)
    assert len(calls) == 2 and calls[0] == calls[1]
    launcher.global_scratch_size = 64  # needs scratch: the wrapper allocates it
    assert not launch._pass_through(launcher)


def test_signature_is_what_triton_specializes_on():
    """Arguments alike for Triton get one signature; each difference Triton compiles apart does not."""
    from portattn.backends.triton.launch import signature

    x = torch.zeros(64)
    same = [(x, 7, 0.5, None, True), (torch.ones(64), 9, 2.0, None, False), (x[4:], 3, 1.0, None, True)]
    assert len({signature(args) for args in same}) == 1
    different = [(x[1:], 7, 0.5, None, True), (x.half(), 7, 0.5, None, True), (x, 1, 0.5, None, True),
                 (x, 16, 0.5, None, True), (x, 2**31 + 1, 0.5, None, True), (x, 2**63 + 1, 0.5, None, True),
                 (x, 7, 1, None, True), (x, 7, 0.5, x, True), (x, 7, 0.5, None, 3)]
    assert len({signature(args) for args in [same[0], *different]}) == 1 + len(different)
    assert signature(((x, (8, 1)), 5)) == signature(((x, (24, 1)), 3)) != signature(((x, (8, 2)), 5))
    assert signature((x, object())) is None


def test_a_refused_direct_relaunch_falls_back_to_the_jit(monkeypatch):
    """A Triton whose launcher takes other arguments refuses the direct relaunch before launching anything:
    that launch and every later one go through ``kernel[grid]`` (a warning says so), never a failed call."""
    class Refusing(_FakeCompiled):
        def run(self, *args):
            raise TypeError("function takes exactly 12 arguments")

    launch = _direct_launches(monkeypatch)
    kernel, spec, plan, x = _FakeKernel(Refusing), object(), object(), torch.zeros(4, 8)
    run = lambda: launch.run(kernel, (3,), ((x, x.stride()), 7), dict(BLOCK=16, FLAG=True), (spec, plan, (x,)))  # noqa: E731
    run()
    with pytest.warns(RuntimeWarning, match="refused a direct relaunch"):
        run()
    assert kernel.compiles == 2 and launch._DIRECT is False
    run()
    assert kernel.compiles == 3  # the JIT's path from now on


def test_repeat_launches_take_every_kernel_parameter(triton_backend, monkeypatch, split_decoding):
    """``launch.run`` relaunches a compiled kernel with the positional arguments and then the constexprs
    of ``meta`` in the kernel's parameter order (Triton's launcher takes every parameter): each launch
    that asks for that reuse must name every later parameter in ``meta``. The interpreter never takes the
    direct route, so this checks what a GPU relies on, for forward, backward (fused and separate dQ) and
    decoding (contiguous and paged, with key splits)."""
    from portattn.backends.triton import launch

    checked = []
    original = launch.run

    def checking_run(kernel, grid, args, meta, reuse=None):
        if reuse is not None:
            names = kernel.arg_names
            missing = [name for name in names[len(args):] if name not in meta]
            assert len(args) <= len(names) and not missing, (kernel.fn.__name__, missing)
            assert all(hasattr(t, "stride") for t in reuse[2]), "reuse keys on the caller's tensors"
            checked.append(kernel.fn.__name__)
        return original(kernel, grid, args, meta, reuse)

    monkeypatch.setattr(launch, "run", checking_run)
    for kv_heads, causal, kwargs in ((4, False, {}), (2, True, {"softcap": 20.0, "window": (9, 3)})):
        q, k, v, do = _inputs(1, 4, kv_heads, 37, 45, 32)
        qt, kt, vt = (_to(x, torch.float32) for x in (q, k, v))
        portattn.attention(qt, kt, vt, causal=causal, backend="triton", **kwargs).backward(do.float().to(_device()))
    rng = np.random.default_rng(0)
    qd = torch.from_numpy(rng.standard_normal((2, 1, 4, 32)).astype(np.float32)).to(_device())
    cache = torch.from_numpy(rng.standard_normal((2, 300, 2, 32)).astype(np.float32)).to(_device())
    seqlens = torch.tensor([300, 123], dtype=torch.int32, device=_device())
    table = torch.arange(2 * 300 // 16 + 2, dtype=torch.int32, device=_device())[:2 * 19].reshape(2, 19)
    pages = torch.zeros((table.numel(), 16, 2, 32), device=_device())
    portattn.attention_with_kvcache(qd, cache, cache, seqlens, backend="triton")
    portattn.attention_with_kvcache(qd, pages, pages, seqlens, table, causal=True, backend="triton")
    assert {"attention_forward", "attention_forward_features", "attention_backward_dkdv", "decode_kvcache",
            "decode_merge"} <= set(checked), checked


def test_launch_hooks_are_seen_only_when_set(triton_backend):
    """Triton 3.5+ keeps launch hooks in a HookChain that is never None: an empty chain is no hook (else every
    launch would take the JIT's slow path), one with a profiler's hook in it is."""
    import triton

    from portattn.backends.triton import launch

    assert not launch._launch_hooks()
    hook = lambda metadata: None  # noqa: E731
    chain = triton.knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            assert launch._launch_hooks()
        finally:
            chain.remove(hook)
        assert not launch._launch_hooks()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the direct relaunch is taken on a GPU only (the "
                    "interpreter runs every launch through the JIT); test_run_relaunches_* cover its logic here")
def test_repeated_calls_skip_the_jit_on_a_gpu(triton_backend, monkeypatch):
    """After its first call, a repeated forward and a repeated decode step launch the compiled kernels
    without Triton's JITFunction.run (which binds and specializes every argument on each launch); so do
    decoding steps through ``attention`` whose cache grows by one key each step (Hugging Face's
    DynamicCache), once their specializations have been met, and each result is right."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    from triton.runtime.jit import JITFunction

    q = torch.randn(1, 8, 128, 64, device="cuda", dtype=torch.float16)
    qd = torch.randn(2, 1, 8, 64, device="cuda", dtype=torch.float16)
    cache = torch.randn(2, 4096, 2, 64, device="cuda", dtype=torch.float16)
    seqlens = torch.tensor([4096, 1000], dtype=torch.int32, device="cuda")
    calls = [lambda: portattn.attention(q, q, q, causal=True, backend="triton"),
             lambda: portattn.attention_with_kvcache(qd, cache, cache, seqlens, backend="triton")]
    want = [call() for call in calls]
    step_q = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.float16)
    keys = torch.randn(1, 2, 2100, 64, device="cuda", dtype=torch.float16)

    def step(n):  # a fresh (1, 2, n, 64) cache, as torch.cat makes each step
        k = keys[:, :, :n].clone()
        return portattn.attention(step_q, k, k, causal=True, align="bottom-right", backend="triton"), k

    for n in range(2000, 2040):  # the first pass compiles what these lengths need (both integer specializations,
        step(n)                  # the key splits they get)
    api._PREPARED.clear()  # the same shapes again are new specs, as new lengths are: launch.run's signature lookup
    jitted = []
    original = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *args, **kwargs: jitted.append(self.fn.__name__) or original(
        self, *args, **kwargs))
    for call, expected in zip(calls, want):
        torch.testing.assert_close(call(), expected, rtol=0, atol=0)
    for n in range(2000, 2040):
        out, k = step(n)
        torch.testing.assert_close(out, sdpa(step_q, k, k, enable_gqa=True), rtol=2e-3, atol=2e-3)
    assert jitted == [], f"these launches went through Triton's JIT again: {jitted}"


def _left_padding(n_k: int):
    """(2, n_k) key padding: sequence 1 left-padded by 9 keys, both with a few holes (True = a real key)."""
    padding = torch.rand(2, n_k, generator=torch.Generator().manual_seed(3)) > 0.1
    padding[1, :9] = False
    padding[:, -1] = True
    return padding


@pytest.mark.parametrize("n_q, n_k, kv_heads, causal, kwargs", [
    (1, 301, 2, True, {}), (3, 77, 4, True, {"softcap": 10.0}), (16, 130, 1, True, {"window": (7, 0)}),
    (5, 53, 2, False, {}), (1, 90, 2, True, {"key_padding_mask": _left_padding(90)}),
    (4, 700, 1, True, {"key_padding_mask": _left_padding(700)}),
])
def test_few_query_calls_run_the_decode_kernel_forward_and_backward(triton_backend, monkeypatch, n_q, n_k, kv_heads,
                                                                    causal, kwargs):
    """``attention`` with at most 16 queries per sequence (a decoding step through a model's own cache) runs
    the decode kernel, GQA packed, bottom-right aligned; its output and LSE serve the usual backward."""
    from portattn.backends.triton import decode

    ran = []
    original = decode.attention
    monkeypatch.setattr(decode, "attention", lambda *args: ran.append(1) or original(*args))
    q, k, v, do = _inputs(2, 4, kv_heads, n_q, n_k, 32)
    want_out, want_lse, grads = _expected(q, k, v, do, causal, {"align": "bottom-right", **kwargs})
    qt, kt, vt = (_to(x, torch.float32) for x in (q, k, v))
    out, lse = portattn.attention(qt, kt, vt, causal=causal, align="bottom-right", backend="triton", return_lse=True,
                                  **_on_device(kwargs))
    assert ran and out.is_contiguous()
    _close("out", out, want_out, TOL[torch.float32])
    _close("lse", lse, want_lse, TOL[torch.float32])
    out.backward(do.float().to(_device()))
    for what, x, want in (("dq", qt, grads[0]), ("dk", kt, grads[1]), ("dv", vt, grads[2])):
        _close(what, x.grad, want, 4 * TOL[torch.float32])
