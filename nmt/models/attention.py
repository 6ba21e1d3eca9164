"""The classic attentions: additive (Bahdanau), Luong dot / general / concat, and `none`.

Every one computes scores e [B, T, S] for a query s [B, T, Q] against encoder states h [B, S, H],
then shares one path: alpha = masked_softmax(e), c = alpha @ h (see `ScoredAttention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nmt.config import Component, opt
from nmt.errors import NmtError
from nmt.models.interfaces import Attention
from nmt.models.zoo import register_attention


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of scores [B, T, S] in fp32, with padded positions (mask [B, S]
    False) given exactly zero weight. Each row sums to 1; a row with no real position is all zero."""
    keep = mask.unsqueeze(1)  # [B, 1, S]
    scores = scores.float().masked_fill(~keep, torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=-1) * keep


class ScoredAttention(Attention):
    """alpha_{t,i} = softmax_i(score(s_t, k_i)) over real positions, c_t = sum_i alpha_{t,i} h_i.

    Subclasses define `score(query [B, T, Q], keys [B, S, K]) -> [B, T, S]` and may override
    `precompute(memory) -> keys` to do the per-sentence part of the score once.
    """

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights = masked_softmax(self.score(query, keys), mask).to(memory.dtype)  # [B, T, S]
        context = torch.bmm(weights, memory)  # [B, T, H]
        return context, weights


# ----------------------------------------------------------------------------------------------


@dataclass
class NoAttentionOptions(Component):
    """`type: none` has no options."""


@register_attention("none", NoAttentionOptions)
class NoAttention(Attention):
    """Placeholder for `type: none`: `zoo.build_attention` returns None and decoders run without
    attention, so this class is never instantiated."""


# ----------------------------------------------------------------------------------------------


@dataclass
class BahdanauOptions(Component):
    hidden_size: int | None = opt(None, gt=0, doc="size of the scoring layer (default: the query size)")


@register_attention("bahdanau", BahdanauOptions)
class AdditiveAttention(ScoredAttention):
    """Bahdanau et al. (2015): e_{t,i} = v^T tanh(W s_t + U h_i); U h_i is precomputed per sentence."""

    def __init__(self, options: BahdanauOptions, query_size: int, memory_size: int):
        super().__init__()
        hidden = options.hidden_size or query_size
        self.W = nn.Linear(query_size, hidden, bias=False)
        self.U = nn.Linear(memory_size, hidden, bias=False)
        self.v = nn.Linear(hidden, 1, bias=False)

    def precompute(self, memory: torch.Tensor) -> torch.Tensor:
        return self.U(memory)  # [B, S, A]

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        summed = self.W(query).unsqueeze(2) + keys.unsqueeze(1)  # [B, T, 1, A] + [B, 1, S, A]
        return self.v(torch.tanh(summed)).squeeze(-1)  # [B, T, S]


@dataclass
class LuongConcatOptions(Component):
    hidden_size: int | None = opt(None, gt=0, doc="size of the scoring layer (default: the query size)")


@register_attention("luong_concat", LuongConcatOptions)
class LuongConcatAttention(AdditiveAttention):
    """Luong et al. (2015) concat: e_{t,i} = v^T tanh(W [s_t; h_i]).

    Splitting W into its query and memory column blocks, W [s; h] = W_s s + W_h h: the additive form
    above, with W_h h_i precomputed once per sentence.
    """


# ----------------------------------------------------------------------------------------------


class DotScoredAttention(ScoredAttention):
    """Multiplicative scores e_{t,i} = s_t^T k_i, with k_i = h_i (dot) or W h_i (general)."""

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.bmm(query, keys.transpose(1, 2))  # [B, T, S]


@dataclass
class LuongDotOptions(Component):
    """`type: luong_dot` has no options; the query and memory sizes must match."""


@register_attention("luong_dot", LuongDotOptions)
class DotAttention(DotScoredAttention):
    """Luong et al. (2015) dot: e_{t,i} = s_t^T h_i."""

    def __init__(self, options: LuongDotOptions, query_size: int, memory_size: int):
        super().__init__()
        if query_size != memory_size:
            raise NmtError(
                f"model.attention.type: luong_dot needs the decoder query size ({query_size}) to equal "
                f"the encoder output size ({memory_size}); adjust the hidden sizes or use luong_general"
            )


@dataclass
class LuongGeneralOptions(Component):
    """`type: luong_general` has no options."""


@register_attention("luong_general", LuongGeneralOptions)
class GeneralAttention(DotScoredAttention):
    """Luong et al. (2015) general: e_{t,i} = s_t^T W h_i; W h_i is precomputed per sentence."""

    def __init__(self, options: LuongGeneralOptions, query_size: int, memory_size: int):
        super().__init__()
        self.W = nn.Linear(memory_size, query_size, bias=False)

    def precompute(self, memory: torch.Tensor) -> torch.Tensor:
        return self.W(memory)  # [B, S, Q]
