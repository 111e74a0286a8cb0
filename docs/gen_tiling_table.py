"""Print the markdown tables of tile plans in docs/tiling.md.

    PYTHONPATH=. python docs/gen_tiling_table.py            # the GPU/CPU rules
    PYTHONPATH=. python docs/gen_tiling_table.py --opencl   # the OpenCL rules on the same devices
"""

from __future__ import annotations

import dataclasses
import sys

from portattn.backends.opencl import plan as opencl_rules
from portattn.devices import CATALOG
from portattn.spec import AttentionSpec
from portattn.tiling import plan

BATCH, HEADS, SEQLEN = 4, 16, 4096  # B * H = 64


def main() -> None:
    print("| device | dtype | D | block_q x block_k | warps | stages | SRAM KiB | registers | work units | backward keys x queries, warps, stages |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, device in CATALOG.items():
        dtype = "float16" if device.kind == "gpu" else "float32"
        for head_dim in (64, 128):
            spec = AttentionSpec(batch=BATCH, heads=HEADS, seqlen_q=SEQLEN, seqlen_k=SEQLEN, head_dim=head_dim, dtype=dtype)
            try:
                p = plan(spec, device)
            except ValueError as error:
                print(f"| {key} | {dtype} | {head_dim} | no plan: {error} | | | | | | |")
                continue
            warps = p.warps if p.target == "gpu" else "-"
            regs = p.registers_per_thread if p.target == "gpu" else "-"
            print(
                f"| {key} | {dtype} | {head_dim} | {p.block_q} x {p.block_k} | {warps} | {p.stages} | "
                f"{p.sram_bytes / 1024:.0f} | {regs} | {p.work_units} | "
                f"{p.backward.block_k} x {p.backward.block_q}, {p.backward.warps}, {p.backward.stages} |"
            )


NVIDIA_OPENCL_LOCAL = 48 * 1024  # NVIDIA's OpenCL driver offers 48 KiB of local memory, not the opt-in CUDA limit


def opencl() -> None:
    """The OpenCL rules' plans: each catalog device as its OpenCL driver describes it (NVIDIA's: 48 KiB
    of local memory; the others' local memory is their LDS/SLM/threadgroup memory)."""
    print("| device | dtype | D | forward tile (q x k) | float width | K/V chunk | work-items | local KiB | backward keys x queries |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, device in CATALOG.items():
        if device.kind == "cpu":  # a CPU's OpenCL plan follows PoCL's probed description, not the catalog's caches
            continue
        if device.vendor == "nvidia":
            device = dataclasses.replace(device, sram_per_block=NVIDIA_OPENCL_LOCAL)
        dtype = "float16" if device.kind == "gpu" else "float32"
        for head_dim in (64, 128):
            spec = AttentionSpec(batch=BATCH, heads=HEADS, seqlen_q=SEQLEN, seqlen_k=SEQLEN, head_dim=head_dim, dtype=dtype)
            try:
                p = opencl_rules.plan(spec, device)
            except ValueError as error:
                print(f"| {key} | {dtype} | {head_dim} | no plan: {error} | | | | | |")
                continue
            print(f"| {key} | {dtype} | {head_dim} | {p.block_q} x {p.block_k} | {p.vector_width} | "
                  f"{p.head_dim_chunk or 'all'} | {p.threads} | {p.sram_bytes / 1024:.0f} | "
                  + (f"{p.backward.block_k} x {p.backward.block_q} |" if p.backward else "none fits |"))


if __name__ == "__main__":
    opencl() if "--opencl" in sys.argv[1:] else main()
