"""Multi-head attention (scores, masked softmax, dropout, weighted values) as one compiled kernel each
way, for bf16 CPU training.

The explicit path of `nmt.models.multihead.attend` is two batched matmuls around a softmax and a
dropout, and the heads are copied into their own layout first: at NMT lengths (T, S of 10-40 tokens,
head size 64) the batched matmuls run at a few percent of the machine's matmul speed and the copies
and separate passes cost as much again. `nmt/csrc/attention.cpp` does all of it per sentence and head
with the small operands in L1: it reads Q, K, V in place from the projections' [B, len, heads, D] rows,
writes the context straight into the layout the output projection reads, and its backward writes the
gradients of Q, K and V into the projections' layouts (K and V into one buffer, or Q, K and V for
self-attention's joint projection, which `heads.split_heads` hands on without a copy). Same formula and
roundings as the explicit path (bf16 operands, fp32 sums and softmax); its dropout keeps each weight with
the same probability as `nmt.models.dropout` (8-bit lanes) from other random draws, seeded from torch's
generator. A row whose keys are all masked gets weights 0 (NaN from `torch.softmax`); no real query has one.
"""

from __future__ import annotations

from typing import Any

import torch

from nmt import cpu_kernels
from nmt.models import dropout as dropout_rule
from nmt.models import heads
from nmt.models.fused_dropout import draw_seed


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                causal: bool, scale: float, threshold: int, drop_scale: float) -> torch.Tensor:
        seed = draw_seed() if threshold else 0
        key_mask = None if key_mask is None else key_mask.contiguous()
        context, probs = cpu_kernels.extension().attention_forward(q, k, v, key_mask, causal, scale, threshold,
                                                                   drop_scale, seed)
        ctx.save_for_backward(q, k, v, probs)
        ctx.settings = (scale, threshold, drop_scale, seed)
        return context

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, probs = ctx.saved_tensors
        if heads.in_joint_layout((q, k, v)):  # self-attention's Q|K|V rows: their gradient in one buffer
            grad_q, grad_k, grad_v = heads.gradient_buffer(q, 3)
        else:  # the query projection's rows, and K|V side by side as the joint K|V projection has them
            grad_q, = heads.gradient_buffer(q, 1)
            grad_k, grad_v = heads.gradient_buffer(k, 2)
        if not _even_rows(grad):
            grad = grad.contiguous()
        cpu_kernels.extension().attention_backward(grad, q, k, v, probs, *ctx.settings, grad_q, grad_k, grad_v)
        return grad_q, grad_k, grad_v, None, None, None, None, None


def _even_rows(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and all(stride % 2 == 0 for stride in t.stride()[:-1])


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> bool:
    """Whether `fused_attention` runs for these [B, heads, len, D] tensors: bf16 on the CPU with the kernels
    available, a backward pass to come (training), an even head size, rows the kernel can read in place,
    and a dropout the kernel's 8-bit lanes represent (`dropout.byte_lane_rule`)."""
    if not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if dropout > 0 and dropout_rule.byte_lane_rule(dropout) is None:
        return False
    return q.size(-1) % 2 == 0 and all(map(_even_rows, (q, k, v))) and cpu_kernels.usable_on(q, k, v)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                    causal: bool, scale: float, dropout: float) -> torch.Tensor:
    """dropout(softmax(scale * q k^T + mask)) v per head -> context [B, heads, T, D] (a view of a
    [B, T, heads, D] tensor); q [B, heads, T, D], k/v [B, heads, S, D], key_mask [B, S] bool or None,
    causal as in `multihead.attend`; see `applies`."""
    threshold, drop_scale = dropout_rule.byte_lane_rule(dropout) if dropout > 0 else (0, 1.0)
    return _FusedAttention.apply(q, k, v, key_mask, causal, scale, threshold, drop_scale)
