"""The gradient of a float ``attn_mask`` that requires grad, for ``scaled_dot_product_attention``.

The backends' backward kernels give dq, dk and dv only. A mask added to the scores S gets
``dS = P * (dO v^T - rowsum(dO * O))`` (P the softmax of the scores), summed over the axes it was
broadcast along. That is one entry per score, as large as the mask gradient itself, so it is formed
here with torch on the saved inputs, in float32 (float64 for float64 inputs), when the backward
runs. The result passes through unchanged: its q, k and v gradients still come from the kernels.

Imported only when a mask that requires grad reaches SDPA, so torch is loaded.
"""

from __future__ import annotations

import torch


def with_mask_grad(out, attn_mask, query, key, value, scale: float):
    """``out`` (SDPA's result for these arguments, no causal flag, no dropout) connected to ``attn_mask``
    so that a backward gives it its gradient."""
    return MaskGrad.apply(out, attn_mask, query, key, value, scale)


class MaskGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, attn_mask, query, key, value, scale):
        ctx.save_for_backward(out, attn_mask, query, key, value)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        out, attn_mask, query, key, value = ctx.saved_tensors
        with torch.no_grad():
            grad_mask = mask_gradient(grad_out, out, attn_mask, query, key, value, ctx.scale)
        return grad_out, grad_mask, None, None, None, None


def mask_gradient(grad_out, out, attn_mask, query, key, value, scale: float):
    """dL/d(attn_mask) from the result's gradient, recomputing the softmax in torch (module docstring)."""
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v, o, d_out = (x.to(work) for x in (query, key, value, out, grad_out))
    k, v = _repeat_for_gqa(k, q), _repeat_for_gqa(v, q)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + attn_mask.to(work)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row has no weights, as SDPA's zeros
    d_scores = probs * (torch.matmul(d_out, v.transpose(-1, -2)) - (d_out * o).sum(-1, keepdim=True))
    return _sum_to(d_scores, attn_mask.shape).to(attn_mask.dtype)


def _repeat_for_gqa(x, q):
    """Key or value with query's head count (dim -3), as SDPA's ``enable_gqa`` repeats them."""
    if x.ndim >= 3 and q.ndim >= 3 and x.shape[-3] not in (1, q.shape[-3]):
        return x.repeat_interleave(q.shape[-3] // x.shape[-3], dim=-3)
    return x


def _sum_to(x, shape):
    """``x`` summed over the axes ``shape`` was broadcast along (the reverse of broadcasting)."""
    extra = x.ndim - len(shape)
    x = x.sum(dim=tuple(range(extra))) if extra > 0 else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(dim=axes, keepdim=True) if axes else x
