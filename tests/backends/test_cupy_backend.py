"""The cupy backend: its pure parts everywhere (accumulator-layout analysis, the W planner rules), and
on a CUDA GPU the things the conformance suite does not reach -- refusals with reasons, cupy arrays
in and out without copies, strided and misaligned inputs (the element-by-element load path), the
device's probed accumulator layout, and autograd against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

import portattn
from portattn import reference
from portattn.backends import registry
from portattn.backends.cupy import plan as wmma
from portattn.backends.cupy.build import SM80_ACCUMULATOR, AccumulatorLayout, accumulator_layout
from portattn.devices import catalog
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
    from portattn.backends.cupy import launch as cupy_launch

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
    from portattn.backends.cupy import launch as cupy_launch

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
