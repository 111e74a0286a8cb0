"""Test-session setup shared by every suite.

Without a CUDA device, Triton's kernels run in its CPU interpreter, so the conformance suite checks
them on every push. ``triton.jit`` reads ``TRITON_INTERPRET`` when the kernels are defined, so it is
set here, before any test imports them; a GPU machine leaves it unset and runs them natively.
"""

from __future__ import annotations

import os


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
