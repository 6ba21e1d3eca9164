"""The masked, scaled softmax of attention scores as one compiled kernel each way (bf16 CPU training).

The explicit attention path (`nmt.models.multihead.attend`) otherwise scales q, writes a masked copy of
the scores, takes an fp32 softmax and converts it back to bf16, and its backward undoes each step;
`nmt/csrc/attention.cpp` reads the bf16 scores once and writes bf16 weights (and the gradient likewise).
A row whose keys are all masked gets weights 0 here (NaN from `torch.softmax`); no real query has one.
"""

from __future__ import annotations

from typing import Any

import torch

from nmt import cpu_kernels


class _AttentionSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, key_mask: torch.Tensor | None, causal: bool,
                scale: float) -> torch.Tensor:
        key_mask = None if key_mask is None else key_mask.contiguous()
        weights = cpu_kernels.extension().attention_softmax_forward(scores.contiguous(), key_mask, causal, scale)
        ctx.save_for_backward(weights)
        ctx.scale = scale
        return weights

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (weights,) = ctx.saved_tensors
        grad_scores = cpu_kernels.extension().attention_softmax_backward(grad.contiguous(), weights, ctx.scale)
        return grad_scores, None, None, None


def applies(scores_dtype_of: torch.Tensor) -> bool:
    """Whether `attention_softmax` can run for scores computed from this tensor (bf16 on the CPU)."""
    return cpu_kernels.usable_on(scores_dtype_of)


def attention_softmax(scores: torch.Tensor, key_mask: torch.Tensor | None, causal: bool,
                      scale: float) -> torch.Tensor:
    """softmax(scale * scores) over the allowed keys, in the scores' dtype (bf16).

    scores [B, heads, T, S]; key_mask [B, S] bool (True = real key) or None; causal: query t sees keys up
    to S - T + t (the queries are the last T of the S positions)."""
    return _AttentionSoftmax.apply(scores, key_mask, causal, scale)
