"""One ``torch.autograd.Function`` over any backend: its forward kernel saves O and the LSE, and
its backward kernel recomputes the scores from them -- no N x N matrix is ever kept for autograd.

Imported only when a torch tensor that requires grad reaches ``attention``.
"""

from __future__ import annotations

import torch


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call, extras):
        out, lse = call.forward(q, k, v, extras)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.extras = extras  # masks, slopes and the dropout seed: inputs, never differentiated
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        # grad_lse is ignored: the LSE is returned for inspection and marked non-differentiable
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.call.backward(grad_out, q, k, v, out, lse, ctx.extras)
        return dq, dk, dv, None, None
