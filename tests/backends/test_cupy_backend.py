"""The cupy backend: its pure parts everywhere (accumulator-layout analysis, the W planner rules), and
on a CUDA GPU the things the conformance suite does not reach -- refusals with reasons, cupy arrays
in and out without copies, strided and misaligned inputs (the element-by-element load path), the
device's probed accumulator layout, autograd against the float64 reference, and attn_mask /
key_padding_mask in every form the kernels read, on both softmax paths."""

from __future__ import annotations

import numpy as np
import pytest
from conformance.checks import check_close_finite as _close  # tests/ is on sys.path (pytest's rootdir)

import portattn
from portattn import reference
from portattn.backends import registry
from portattn.backends.cupy import launch as cupy_launch
from portattn.backends.cupy import plan as wmma
from portattn.backends.cupy.build import SM80_ACCUMULATOR, AccumulatorLayout, accumulator_layout
from portattn.devices import catalog
from portattn.extras import Extras
from portattn.inputs import extras_from_arguments, spec_from_arrays
from portattn.spec import AttentionSpec

# ---- pure: no GPU needed ---------------------------------------------------------------------------


def _sm80_layout():
    """Rows and columns of the PTX m16n8k16 accumulator layout, twice along n (what sm_80+ shows)."""
    rows = [[lane // 4 + 8 * ((e // 2) % 2) for e in range(8)] for lane in range(32)]
    cols = [[(lane % 4) * 2 + e % 2 + 8 * (e // 4) for e in range(8)] for lane in range(32)]
    return rows, cols


def test_accumulator_layout_of_the_sm80_fragment():
    assert accumulator_layout(*_sm80_layout()) == SM80_ACCUMULATOR


def test_accumulator_layout_rejects_layouts_without_the_structure():
    rows, cols = _sm80_layout()
    swapped = [list(lane) for lane in rows]
    swapped[0][0], swapped[1][2] = swapped[1][2], swapped[0][0]  # lane 0 and 1 no longer hold the same slots
    assert accumulator_layout(swapped, cols) is None
    assert accumulator_layout(rows[:31], cols[:31]) is None  # not a whole warp
    duplicated = [list(lane) for lane in cols]
    duplicated[5][3] = duplicated[5][2]  # one element held twice, another never
    assert accumulator_layout(rows, duplicated) is None


def test_accumulator_layout_defines_name_the_shuffles():
    defines = AccumulatorLayout(rows=2, slots=(0, 0, 1, 1, 0, 0, 1, 1), shuffles=(1, 2)).defines()
    assert defines == {"REGISTER_SOFTMAX": 1, "ACC_ROWS": 2, "ACC_SLOTS": "0,0,1,1,0,0,1,1", "ACC_SHUFFLES": "1,2",
                       "ACC_SHUFFLE_COUNT": 2}


def _spec(head_dim, n=4096, batch=8, heads=16, dtype="float16"):
    return AttentionSpec(batch=batch, heads=heads, seqlen_q=n, seqlen_k=n, head_dim=head_dim, dtype=dtype, causal=True,
                         device="cuda:0")


@pytest.mark.parametrize("device", ["v100", "t4", "a100", "h100"])
@pytest.mark.parametrize("head_dim", [16, 40, 64, 111, 128, 256])
def test_wmma_plans_fit_the_device(device, head_dim):
    spec, dev = _spec(head_dim), catalog.lookup(device)
    plan = wmma.plan(spec, dev)
    pad = wmma.padded_head_dim(head_dim)
    assert plan.head_dim_padded == pad and pad % 16 == 0 and pad >= head_dim
    assert plan.block_q == 16 * plan.warps and plan.block_k % 16 == 0
    assert plan.sram_bytes == wmma.forward_smem_bytes(pad, plan.warps, plan.block_k, plan.stages) <= dev.sram_per_block
    assert plan.stages in ((1, 2) if dev.has_async_copy else (1,))  # W6; W7 may trade a stage for residency
    assert plan.registers_per_thread <= wmma.MAX_REGISTERS
    if pad <= 128:  # W5: the backward fits registers up to head dim 128
        assert plan.backward is not None
        assert plan.backward.sram_bytes == wmma.backward_smem_bytes(pad, plan.backward.warps, plan.backward.block_q,
                                                                     plan.backward.stages) <= dev.sram_per_block
    else:
        assert plan.backward is None and "W4/W5 backward: no tiling" in plan.reasons[-1]


def test_wmma_plan_prefers_two_resident_four_warp_blocks_on_the_h100():
    plan = wmma.plan(_spec(128), catalog.lookup("h100"))
    assert (plan.block_q, plan.block_k, plan.warps, plan.stages) == (64, 64, 4, 2)
    assert 2 * plan.sram_bytes <= catalog.lookup("h100").sram_per_unit
    assert 2 * plan.backward.sram_bytes <= catalog.lookup("h100").sram_per_unit
    assert plan.backward.block_q == 32  # W7: 32 streamed rows above head dim 64


def test_autotuning_sweeps_only_tiles_the_kernels_can_run():
    from portattn import tuning

    backend = registry()["cupy"]
    plan = wmma.plan(_spec(64), catalog.lookup("h100"))
    forward = tuning.candidates(plan, tuning.FORWARD_SPACE, backend.retile)
    assert forward[0] is plan and len(forward) > 1
    for p in forward:  # W3, W6, and the derived figures recomputed (W4)
        assert p.block_q == 16 * p.warps and p.threads == 32 * p.warps and p.stages <= 2
        assert p.sram_bytes == wmma.forward_smem_bytes(p.head_dim_padded, p.warps, p.block_k, p.stages)
    for p in tuning.candidates(plan, tuning.BACKWARD_SPACE, backend.retile):
        assert p.backward.dq_separate and p.backward.block_k == 16 * p.backward.warps and p.backward.stages <= 2
        assert p.backward.sram_bytes == wmma.backward_smem_bytes(p.head_dim_padded, p.backward.warps,
                                                                 p.backward.block_q, p.backward.stages)
    assert backend.retile(plan, {"block_q": 128, "warps": 4}) is None  # 32 rows per warp: not these kernels


def test_padding_makes_operand_rows_an_odd_multiple_of_16_bytes():
    """W4's bank-conflict argument: 8 consecutive rows of a fragment load start in 8 different 16-B slots."""
    for head_dim in (16, 32, 48, 64, 128, 256):
        stride = (wmma.padded_head_dim(head_dim) + wmma.ROW_PAD) * 2
        assert stride % 16 == 0 and (stride // 16) % 2 == 1
        assert len({(row * stride // 16) % 8 for row in range(8)}) == 8


# ---- on a CUDA GPU ---------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def cupy_backend(usable_backend):
    return usable_backend("cupy")


def _inputs(b, h, nq, nk, d, dtype=torch.float16, kvh=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda heads, n: torch.randn(b, heads, n, d, generator=gen).to("cuda", dtype)  # noqa: E731
    return make(h, nq), make(kvh or h, nk), make(kvh or h, nk)


def _reference(q, k, v, causal):
    to64 = lambda x: x.detach().to("cpu", torch.float64).numpy()  # noqa: E731
    return reference.attention_forward(to64(q), to64(k), to64(v), scale=q.shape[-1] ** -0.5, causal=causal)[0]


def test_float32_is_refused_with_the_reason(cupy_backend):
    q, k, v = _inputs(1, 2, 64, 64, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype float32 is not supported; cupy takes bfloat16, float16"):
        portattn.attention(q, k, v, backend="cupy")


def test_backward_above_head_dim_128_is_refused_by_the_plan(cupy_backend):
    q, k, v = (x.requires_grad_() for x in _inputs(1, 2, 64, 64, 256))
    with pytest.raises(ValueError, match="no backward tiling fits: W4/W5 backward: no tiling"):
        portattn.attention(q, k, v, backend="cupy")
    q, k, v = (x.detach() for x in (q, k, v))  # the forward alone runs
    out = portattn.attention(q, k, v, backend="cupy")
    np.testing.assert_allclose(out.double().cpu().numpy(), _reference(q, k, v, False), atol=2e-3)


def test_unsupported_feature_is_refused_with_its_note(cupy_backend):
    q, k, v = _inputs(1, 2, 64, 64, 64)
    with pytest.raises(ValueError, match="cupy does not support softcap"):
        portattn.attention(q, k, v, backend="cupy", softcap=30.0)


def test_probed_accumulator_layout_on_this_gpu(cupy_backend):
    layout = cupy_launch.accumulator(torch.cuda.current_device())
    if torch.cuda.get_device_capability() >= (8, 0):
        assert layout == SM80_ACCUMULATOR


def test_cupy_arrays_in_and_out_without_copies(cupy_backend):
    cupy = pytest.importorskip("cupy")
    q, k, v = (cupy.from_dlpack(x) for x in _inputs(2, 3, 100, 130, 64))
    out = portattn.attention(q, k, v, causal=True, backend="cupy")
    assert isinstance(out, cupy.ndarray) and out.dtype == cupy.float16
    want = _reference(*(torch.from_dlpack(x) for x in (q, k, v)), True)
    np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float64), want, atol=2e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_strided_and_misaligned_inputs_take_the_element_path(cupy_backend, causal):
    """bshd views (row stride H*D) and an odd storage offset (no 16-byte alignment) give the same answer."""
    base = torch.randn(2 * 77 * 3 * 40 + 1, device="cuda", dtype=torch.float16)
    q = base[1:].view(2, 77, 3, 40).transpose(1, 2)  # misaligned by one element, (B, H, N, D) view of bshd
    k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q * 0.5, q.flip(2)))
    out = portattn.attention(q, k, v, causal=causal, backend="cupy")
    np.testing.assert_allclose(out.double().cpu().numpy(), _reference(q, k, v, causal), atol=2e-3)
    out_bshd = portattn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                  backend="cupy", layout="bnhd")
    torch.testing.assert_close(out_bshd.transpose(1, 2), out)


def test_gqa_gradients_against_the_reference(cupy_backend):
    q, k, v = (x.requires_grad_() for x in _inputs(2, 8, 150, 97, 64, kvh=2))
    out = portattn.attention(q, k, v, causal=True, backend="cupy")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = (q64 @ k64.repeat_interleave(4, 1).transpose(-1, -2)) * 64**-0.5
    s = s.masked_fill(torch.ones(150, 97, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    want = torch.autograd.grad(torch.softmax(s, -1) @ v64.repeat_interleave(4, 1), (q64, k64, v64), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=5e-3, rtol=2e-2)


@pytest.mark.parametrize("causal, window, d, kvh", [(False, None, 64, 4), (True, None, 111, 2), (True, (20, 0), 128, 4),
                                                    (False, (7, 30), 40, 1)])
def test_shared_memory_softmax_path_on_this_gpu(cupy_backend, monkeypatch, causal, window, d, kvh):
    """The path Volta and Turing take (scores staged in shared memory), forced here by hiding the
    probed accumulator layout: forward and gradients against the float64 reference."""
    monkeypatch.setattr(cupy_launch, "accumulator", lambda index: None)
    q, k, v = (x.requires_grad_() for x in _inputs(2, 4, 150, 97, d, kvh=kvh, seed=3))
    kwargs = {"window": window} if window else {}
    out = portattn.attention(q, k, v, causal=causal, backend="cupy", **kwargs)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    group = 4 // kvh
    s = (q64 @ k64.repeat_interleave(group, 1).transpose(-1, -2)) * d**-0.5
    rows, keys = torch.arange(150, device="cuda")[:, None], torch.arange(97, device="cuda")[None]
    hidden = torch.zeros(150, 97, dtype=torch.bool, device="cuda")
    if causal:
        hidden |= keys > rows
    if window:
        hidden |= (keys < rows - window[0]) | (keys > rows + window[1])
    p = torch.softmax(s.masked_fill(hidden, float("-inf")), -1).nan_to_num(0.0)
    want_out = p @ v64.repeat_interleave(group, 1)
    torch.testing.assert_close(out.double(), want_out, atol=2e-3, rtol=1e-2)
    want = torch.autograd.grad(want_out, (q64, k64, v64), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=5e-3, rtol=2e-2)


# ---- attn_mask and key_padding_mask ----------------------------------------------------------------
# On a GPU: every mask kind the API hands the kernels (bool and additive, in the inputs' dtype, float32
# with a transposed layout, float64 converted, a (B, 1, 1, Nk) view with stride 0 on the query axis, a
# Hugging Face style 0 / finfo.min padding mask), key padding with a batch of no real key, combined
# with causal, window, bottom-right and GQA, on both softmax paths (the probed register softmax of
# sm_80+, the shared-memory one of Volta/Turing): O, LSE, dQ, dK, dV against the float64 reference.


def test_score_masks_pass_broadcast_views_in_place():
    """No GPU: the kernels' mask arguments are the API's broadcast view itself (strides 0 on broadcast axes);
    only a mask in another float dtype is converted, over its stored elements alone."""
    pytest.importorskip("cupy")
    b, h, nq, nk = 2, 3, 5, 7
    spec = AttentionSpec(batch=b, heads=h, seqlen_q=nq, seqlen_k=nk, head_dim=16, dtype="float16", mask="bool",
                         key_padding=True, device="cuda:0", array_kind="torch")
    mask = torch.ones(b, 1, nq, nk, dtype=torch.bool).expand(b, h, nq, nk)
    padding = torch.ones(nk, b, dtype=torch.bool).t()  # a transposed (B, Nk) view
    args, float32 = cupy_launch.score_masks(spec, Extras(attn_mask=mask, key_padding_mask=padding), torch.float16)
    assert args[0] is mask and [int(x) for x in args[1:5]] == [nq * nk, 0, nk, 1] and not float32
    assert args[5] is padding and [int(x) for x in args[6:]] == [1, b]
    additive = spec.with_(mask="additive", key_padding=False)
    same = torch.zeros(nq, nk, dtype=torch.float16).expand(b, h, nq, nk)
    args, float32 = cupy_launch.score_masks(additive, Extras(attn_mask=same), torch.float16)
    assert args[0] is same and not float32  # read in the inputs' dtype
    wide = torch.randn(1, 1, 1, nk, dtype=torch.float64).expand(b, h, nq, nk)
    args, float32 = cupy_launch.score_masks(additive, Extras(attn_mask=wide), torch.float16)
    converted = args[0]
    assert float32 and converted.dtype == torch.float32 and converted.untyped_storage().nbytes() == nk * 4
    assert [int(x) for x in args[1:4]] == [0, 0, 0]
    torch.testing.assert_close(converted, wide.float())


def _mask_case(kind, b, h, nq, nk, dtype, gen):
    """The ``attention`` keywords of one mask kind (CPU tensors; moved to the GPU by the caller)."""
    if kind == "bool":
        mask = torch.rand(b, 1, nq, nk, generator=gen) < 0.7
        mask[:, :, 5] = False  # a row that sees no key
        return {"attn_mask": mask}
    if kind == "bool-per-head":
        return {"attn_mask": torch.rand(1, h, nq, nk, generator=gen) < 0.5}
    if kind == "additive":  # (Nq, Nk) in the inputs' dtype
        mask = (torch.randn(nq, nk, generator=gen) * 2).to(dtype)
        mask[7] = float("-inf")  # a row whose every score is -inf
        mask[:, 3] = float("-inf")
        return {"attn_mask": mask}
    if kind == "additive-f32-transposed":  # float32, keys the slow axis of its storage
        return {"attn_mask": torch.randn(b, h, nk, nq, generator=gen).transpose(-1, -2)}
    if kind == "additive-f64":
        return {"attn_mask": torch.randn(b, 1, nq, nk, generator=gen, dtype=torch.float64)}
    if kind == "padding":
        padding = torch.rand(b, nk, generator=gen) < 0.8
        padding[-1] = False  # a sequence with no real key: O = 0, LSE = -inf
        return {"key_padding_mask": padding}
    if kind == "bool+padding":
        padding = torch.ones(b, nk, dtype=torch.bool)
        padding[0, nk - nk // 3:] = False
        return {"attn_mask": torch.rand(b, h, nq, nk, generator=gen) < 0.6, "key_padding_mask": padding}
    if kind == "hf-causal-padding":
        # what a Hugging Face model passes: (B, 1, Nq, Nk) in its dtype, 0 or finfo(dtype).min, the causal
        # mask folded in. Right padding, so every row sees key 0 (a row that sees only finfo.min keys is held
        # to float32's rounding of s + finfo.min, as SDPA's math path is)
        padding = torch.ones(b, nk, dtype=torch.bool)
        padding[0, nk - nk // 4:] = False
        hidden = ~padding[:, None, None] | torch.ones(nq, nk, dtype=torch.bool).triu(1)
        return {"attn_mask": torch.zeros(b, 1, nq, nk, dtype=dtype).masked_fill(hidden, torch.finfo(dtype).min)}
    raise ValueError(kind)


# kind -> (b, h, kv heads, nq, nk, d, keywords): shapes with several query tiles, odd lengths, GQA
MASK_CASES = {
    "bool": ("bool", (2, 4, 2, 150, 201, 64), {}),
    "bool-causal": ("bool", (2, 4, 4, 150, 201, 40), {"causal": True}),
    "bool-per-head-window": ("bool-per-head", (2, 4, 1, 97, 130, 64), {"window": (37, 11)}),
    "additive": ("additive", (2, 4, 2, 150, 201, 64), {}),
    "additive-bottom-right": ("additive", (1, 4, 4, 77, 201, 128), {"causal": True, "align": "bottom-right"}),
    "additive-f32-transposed": ("additive-f32-transposed", (2, 2, 2, 113, 90, 40), {"causal": True}),
    "additive-f64": ("additive-f64", (2, 4, 2, 64, 129, 111), {}),
    "padding": ("padding", (2, 4, 2, 150, 201, 64), {}),
    "padding-causal-gqa": ("padding", (2, 8, 2, 201, 201, 128), {"causal": True}),
    "bool+padding": ("bool+padding", (2, 4, 4, 100, 157, 80), {"window": (50, None)}),
    "hf-causal-padding": ("hf-causal-padding", (2, 4, 4, 129, 129, 64), {}),
}
PATHS = ("probed", "shared")  # the device's own softmax path; the shared-memory one (Volta/Turing) forced


def _use_path(monkeypatch, path):
    if path == "shared":
        monkeypatch.setattr(cupy_launch, "accumulator", lambda index: None)


def _numpy_extras(extras):
    def to_numpy(x):  # numpy has no bfloat16: floats as float64
        if not isinstance(x, torch.Tensor):
            return np.asarray(x)
        return (x.cpu().double() if x.is_floating_point() else x.cpu()).numpy()

    return extras.map_arrays(to_numpy)


def _reference_all(q, k, v, grad, spec, extras):
    """The float64 reference's out, lse and (dq, dk, dv) for a spec and its (torch) extras."""
    to64 = lambda x: x.detach().to("cpu", torch.float64).numpy()  # noqa: E731
    arrays = [to64(x) for x in (q, k, v, grad)]
    extras = _numpy_extras(extras)
    out, lse = reference.attention_forward(*arrays[:3], scale=spec.softmax_scale, spec=spec, extras=extras)
    grads = reference.attention_backward(arrays[3], *arrays[:3], scale=spec.softmax_scale, spec=spec, extras=extras)
    return out, lse, grads




MASK_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _check_masked(q, k, v, grad, kwargs, dtype):
    out, lse = portattn.attention(q, k, v, backend="cupy", return_lse=True, **kwargs)
    out.backward(grad)
    spec = spec_from_arrays(q, k, v, **kwargs)
    extras = extras_from_arguments(spec, **{n: kwargs[n] for n in ("attn_mask", "key_padding_mask") if n in kwargs})
    want_out, want_lse, grads = _reference_all(q, k, v, grad, spec, extras)
    tol = MASK_TOL[dtype]
    _close("out", out, want_out, tol)
    _close("lse", lse, want_lse, 1e-3)
    for name, x, want in zip(("dq", "dk", "dv"), (q, k, v), grads):
        _close(name, x.grad, want, 4 * tol)
    return out, lse


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(MASK_CASES))
def test_masks_against_the_reference(cupy_backend, monkeypatch, name, path):
    _use_path(monkeypatch, path)
    kind, (b, h, kvh, nq, nk, d), options = MASK_CASES[name]
    gen = torch.Generator().manual_seed(11)
    q, k, v = (x.requires_grad_() for x in _inputs(b, h, nq, nk, d, kvh=kvh, seed=5))
    grad = torch.randn(b, h, nq, d, generator=gen).to("cuda", torch.float16)
    kwargs = {**options, **{n: x.to("cuda") for n, x in _mask_case(kind, b, h, nq, nk, torch.float16, gen).items()}}
    out, lse = _check_masked(q, k, v, grad, kwargs, torch.float16)
    if kind in ("bool", "additive"):  # the row that sees no key: O = 0, LSE = -inf
        row = 5 if kind == "bool" else 7
        assert (out[:, :, row] == 0).all() and torch.isneginf(lse[:, :, row]).all()


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_additive_mask_read_as_it_is(cupy_backend, monkeypatch, path):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bfloat16 needs compute capability 8.0+")
    _use_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (x.requires_grad_() for x in _inputs(2, 4, 150, 201, 64, dtype=torch.bfloat16, kvh=2, seed=7))
    grad = torch.randn(2, 4, 150, 64, generator=gen).to("cuda", torch.bfloat16)
    kwargs = {"causal": True, **{n: x.to("cuda") for n, x in _mask_case("additive", 2, 4, 150, 201, torch.bfloat16,
                                                                        gen).items()}}
    _check_masked(q, k, v, grad, kwargs, torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stored, kind", [((2, 1, 1, 201), "additive"), ((2, 1, 1, 201), "bool"),
                                          ((1, 1, 150, 1), "additive"), ((1, 1, 1, 1), "bool")])
def test_masks_broadcast_over_the_query_or_key_axis(cupy_backend, monkeypatch, stored, kind, path):
    """The kernels read the (B, H, Nq, Nk) view through all four strides, so a mask broadcast over the
    query axis (as (B, 1, 1, Nk)) or the key axis reads with stride 0 there too (called on the backend
    directly: which shapes the API accepts is its own business)."""
    _use_path(monkeypatch, path)
    b, h, nq, nk, d = 2, 4, 150, 201, 64
    gen = torch.Generator().manual_seed(17)
    mask = torch.randn(*stored, generator=gen) * 2 if kind == "additive" else torch.rand(*stored, generator=gen) < 0.6
    if kind == "additive":
        mask = mask.to(torch.float16)
    if kind == "bool" and stored[-1] > 1:
        mask[..., :3] = False
    view = mask.to("cuda").expand(b, h, nq, nk)
    spec = AttentionSpec(batch=b, heads=h, seqlen_q=nq, seqlen_k=nk, head_dim=d, dtype="float16", causal=True,
                         mask=kind, device="cuda:0", array_kind="torch", requires_grad=True)
    extras = Extras(attn_mask=view)
    q, k, v = _inputs(b, h, nq, nk, d, seed=9)
    grad = torch.randn(b, h, nq, d, generator=gen).to("cuda", torch.float16)
    plan = cupy_backend.plan(spec)
    out, lse = cupy_backend.forward(q, k, v, spec, plan, extras)
    grads = cupy_backend.backward(grad, q, k, v, out, lse, spec, plan, extras)
    want_out, want_lse, want_grads = _reference_all(q, k, v, grad, spec, extras)
    _close("out", out, want_out, MASK_TOL[torch.float16])
    _close("lse", lse, want_lse, 1e-3)
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
        _close(name, got, want, 4 * MASK_TOL[torch.float16])
