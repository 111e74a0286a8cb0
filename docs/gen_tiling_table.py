"""Print the markdown table of tile plans in docs/tiling.md.

    PYTHONPATH=. python docs/gen_tiling_table.py
"""

from __future__ import annotations

from portattn.spec import AttentionSpec
from portattn.tiling import CATALOG, plan

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
                f"{p.backward_block_k} x {p.backward_block_q}, {p.backward_warps}, {p.backward_stages} |"
            )


if __name__ == "__main__":
    main()
