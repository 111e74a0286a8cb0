"""One ``torch.autograd.Function`` over any backend: its forward kernel saves O and the LSE, and
its backward kernel recomputes the scores from them -- no N x N matrix is ever kept for autograd.

Imported only when a torch tensor that requires grad reaches ``attention``. The backward kernels
have no backward of their own: differentiating a gradient (``create_graph=True``, then backward
through the result) raises ``NOT_TWICE`` rather than giving a silently wrong or missing result.
"""

from __future__ import annotations

import torch

NOT_TWICE = ("portattn's backward is not differentiable twice: its gradients come from backward kernels that have "
             "no backward (double backward, gradient penalties and Hessian-vector products through attention need "
             "a differentiable implementation such as torch.nn.functional.scaled_dot_product_attention)")


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
        with torch.no_grad():
            dq, dk, dv = ctx.call.backward(grad_out, q, k, v, out, lse, ctx.extras)
        dq, dk, dv = not_twice((dq, dk, dv), (grad_out, q, k, v))
        return dq, dk, dv, None, None


def not_twice(grads: tuple, inputs: tuple) -> tuple:
    """``grads`` (dq, dk, dv) as they are, or -- when the backward runs with create_graph=True, so that they
    could be differentiated again -- connected to ``inputs`` through ``NotTwice``, whose backward raises."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return NotTwice.apply(*grads, *inputs)
    return grads


class NotTwice(torch.autograd.Function):
    """``(dq, dk, dv, *inputs) -> (dq, dk, dv)`` with a backward that raises ``NOT_TWICE``: the gradients
    stay connected to what they were computed from, so differentiating them reaches the error."""

    @staticmethod
    def forward(ctx, dq, dk, dv, *inputs):
        return dq.view_as(dq), dk.view_as(dk), dv.view_as(dv)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(NOT_TWICE)
