"""GPU check of the triton backend: correctness vs the float64 reference on CUDA, then forward (and
backward) timings against torch SDPA's FlashAttention backend, in one process. Writes JSON to $OUT."""

import json
import os
import sys
import time
import traceback

import numpy as np
import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from portattn import reference
from portattn.backends.triton_gpu import TritonBackend
from portattn.spec import spec_from_arrays

be = TritonBackend()
results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "unavailable": be.unavailable_reasons(), "correctness": [], "timing": []}
out_dir = os.environ.get("OUT", "/tmp")


def save():
    with open(os.path.join(out_dir, "triton_check.json"), "w") as f:
        json.dump(results, f, indent=1)


def rel(got, want):
    got = got.detach().double().cpu().numpy()
    if want.size == 0:
        return 0.0
    if np.isnan(got).any():
        return float("nan")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def check(B, H, Nq, Nk, D, causal, dtype, layout="bhnd"):
    g = torch.Generator().manual_seed(1)
    dt = getattr(torch, dtype)

    def mk(n):
        x = torch.randn(B, H, n, D, generator=g, dtype=torch.float64).to(dt).cuda()
        return x.transpose(1, 2).contiguous().transpose(1, 2) if layout == "bnhd" else x

    q, k, v, do = mk(Nq), mk(Nk), mk(Nk), mk(Nq)
    spec = spec_from_arrays(q, k, v, causal=causal)
    plan = be.plan(spec)
    out, lse = be.forward(q, k, v, spec, plan)
    dq, dk, dv = be.backward(do, q, k, v, out, lse, spec, plan)
    torch.cuda.synchronize()
    f = lambda x: x.double().cpu().numpy()
    s = spec.softmax_scale
    wo, wl = reference.attention_forward(f(q), f(k), f(v), scale=s, causal=causal)
    wq, wk, wv = reference.attention_backward(f(do), f(q), f(k), f(v), scale=s, causal=causal)
    gl = lse.double().cpu().numpy()
    fin = ~np.isneginf(wl)
    row = dict(case=f"{dtype} {layout} {'causal' if causal else 'full'} {B}x{H}x{Nq}q{Nk}k d{D}", plan=plan.summary(),
               out=rel(out, wo), lse_inf_match=bool(np.array_equal(np.isneginf(gl), np.isneginf(wl))),
               lse=float((np.abs(gl - wl)[fin] / np.maximum(1, np.abs(wl[fin]))).max()) if fin.any() else 0.0,
               dq=rel(dq, wq), dk=rel(dk, wk), dv=rel(dv, wv))
    print(row, flush=True)
    results["correctness"].append(row)


for case in [(2, 3, 17, 17, 64, False, "float16"), (2, 3, 113, 113, 64, True, "float16"), (2, 3, 17, 113, 64, True, "bfloat16"),
             (2, 3, 113, 17, 64, False, "bfloat16"), (1, 2, 113, 77, 40, True, "float16"), (1, 2, 113, 77, 111, False, "bfloat16"),
             (1, 2, 113, 77, 256, True, "float16"), (1, 2, 113, 77, 256, False, "bfloat16"), (2, 3, 113, 113, 64, True, "float32"),
             (1, 2, 1000, 1000, 128, True, "float16"), (1, 2, 1000, 113, 96, False, "bfloat16"), (1, 2, 33, 0, 64, True, "float16"),
             (2, 3, 113, 77, 64, True, "float16", "bnhd"), (2, 3, 113, 77, 128, False, "bfloat16", "bnhd")]:
    try:
        check(*case)
    except Exception:
        results["correctness"].append({"case": str(case), "error": traceback.format_exc()[-2000:]})
        print(traceback.format_exc(), flush=True)
save()

for D in (64, 128):
    for N in (1024, 4096):
        for causal in (False, True):
            B, H = 16384 // N, 2048 // D
            try:
                q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.float16) for _ in range(4))
                spec = spec_from_arrays(q, k, v, causal=causal)
                plan = be.plan(spec)
                fwd = lambda: be.forward(q, k, v, spec, plan)
                o, lse = fwd()
                ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                err = float((o.float() - ref.float()).abs().max())
                t_ours = triton.testing.do_bench(fwd)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    t_sdpa = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
                bwd = lambda: be.backward(do, q, k, v, o, lse, spec, plan)
                t_bwd = triton.testing.do_bench(bwd)
                qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    og = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
                    t_sdpa_bwd = triton.testing.do_bench(lambda: torch.autograd.grad(og, (qg, kg, vg), do, retain_graph=True))
                fl = spec.flops_forward
                row = dict(B=B, H=H, N=N, D=D, causal=causal, plan=plan.summary(), max_abs_vs_sdpa=err,
                           fwd_ms=t_ours, sdpa_fwd_ms=t_sdpa, fwd_tflops=fl / t_ours * 1e-9, sdpa_fwd_tflops=fl / t_sdpa * 1e-9,
                           bwd_ms=t_bwd, sdpa_bwd_ms=t_sdpa_bwd, bwd_tflops=2.5 * fl / t_bwd * 1e-9, sdpa_bwd_tflops=2.5 * fl / t_sdpa_bwd * 1e-9)
            except Exception:
                row = dict(B=B, H=H, N=N, D=D, causal=causal, error=traceback.format_exc()[-2000:])
            print(row, flush=True)
            results["timing"].append(row)
            save()
