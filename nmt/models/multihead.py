"""Multi-head scaled dot-product attention: one core for the Transformer's self- and cross-attention,
also registered as the zoo's `multihead` attention (usable by the RNN decoder).

    head_j = softmax(Q_j K_j^T / sqrt(d_head) + mask) V_j,   out = [head_1; ...; head_h] W_o

Tensors inside are split per head as [B, heads, T, d_head]; masks are bool with True = may attend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nmt.config import Component, opt
from nmt.errors import NmtError
from nmt.models import fused_attention
from nmt.models.dropout import dropout as fast_dropout
from nmt.models.heads import split_heads
from nmt.models.interfaces import Attention
from nmt.models.linear import linear, linear_with
from nmt.models.zoo import register_attention


def causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """[T, S] bool: query t (the last T of S positions) may attend to keys 0..S-T+t."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


def _allowed(key_mask: torch.Tensor | None, causal: bool, queries: int, keys: int,
             device: torch.device) -> torch.Tensor | None:
    """The combined mask broadcastable to [B, heads, T, S] (None = everything allowed)."""
    allowed = None if key_mask is None else key_mask[:, None, None, :]
    if causal and queries > 1:
        future = causal_mask(queries, keys, device)
        allowed = future if allowed is None else allowed & future
    return allowed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
           causal: bool = False, dropout: float = 0.0, need_weights: bool = False,
           use_sdpa: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T / sqrt(d) + mask) v per head.

    q [B, h, T, d], k/v [B, h, S, d], key_mask [B, S] (True = real key), causal: query t sees keys up to
    its own position (queries are the last T of the S positions). Returns (context [B, h, T, d],
    weights [B, h, T, S] in fp32 when `need_weights`, else None).

    Two implementations of the same formula: `scaled_dot_product_attention` (fused kernels), and an
    explicit matmul + fp32 softmax. SDPA is the default except on the CPU for bf16/fp16 tensors that
    need a backward pass (the autocast training path: at NMT lengths, B x T = 1-2k tokens and 4 heads of
    64, its CPU backward measured 2-6x slower than the explicit path in bf16, while in fp32 it was
    1.3-2x faster) and for fp32 single-query decoding steps (torch 2.13, 2-core Sapphire Rapids; see
    `_sdpa_is_faster_on_cpu`). `use_sdpa` forces one (None = choose so); the explicit path also serves
    every call that needs the weights, which SDPA does not return. bf16 CPU training without the weights
    takes the explicit path's formula as one compiled kernel each way (`fused_attention`).
    """
    if use_sdpa is None:
        use_sdpa = q.is_cuda or _sdpa_is_faster_on_cpu(q, k, v)
    queries, keys = q.size(-2), k.size(-2)
    if use_sdpa and not need_weights:
        if causal and key_mask is None and queries == keys:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True), None
        allowed = _allowed(key_mask, causal, queries, keys, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout), None
    scale = 1.0 / math.sqrt(q.size(-1))
    if not need_weights and fused_attention.applies(q, k, v, dropout):  # bf16 CPU training
        return fused_attention.fused_attention(q, k, v, key_mask, causal, scale, dropout), None
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    allowed = _allowed(key_mask, causal, queries, keys, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)  # fp32 softmax of bf16 scores, no copy
    dropped = weights.to(v.dtype)  # dropout in the matmul's dtype: half the memory traffic under bf16
    if dropout > 0:
        dropped = fast_dropout(dropped, dropout)
    context = torch.matmul(dropped, v)
    return context, (weights if need_weights else None)


def _sdpa_is_faster_on_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Measured on a 2-core Sapphire Rapids, torch 2.13: with a backward pass to come, SDPA wins in fp32
    and loses 2-6x in bf16; without (decoding), SDPA wins in bf16 (1.3-1.8x) and loses by ~15% in fp32
    for one query per row (incremental decoding)."""
    fp32 = q.dtype == torch.float32
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return fp32
    return not fp32 or q.size(-2) > 1


def check_divisible(size: int, heads: int, key: str) -> int:
    """d_head = size / heads, or an NmtError naming the config key `key`."""
    if size % heads:
        raise NmtError(f"{key}: size {size} is not divisible by heads {heads}")
    return size // heads


class MultiHeadAttention(nn.Module):
    """Queries of size `query_size` attend over memory of size `memory_size`.

    K and V come from one projection of the memory (`project_memory`), so callers can compute them once
    (cross-attention over a source sentence) or incrementally (self-attention caches).
    """

    def __init__(self, query_size: int, memory_size: int, hidden_size: int, heads: int,
                 dropout: float = 0.0, output_size: int | None = None):
        super().__init__()
        self.heads = heads
        self.d_head = hidden_size // heads
        self.dropout = dropout
        self.q_proj = nn.Linear(query_size, hidden_size)
        self.kv_proj = nn.Linear(memory_size, 2 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, output_size or hidden_size)
        for layer in (self.q_proj, self.kv_proj, self.out_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def split_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, 2 * hidden] (K|V) -> K, V each [B, heads, S, d_head] (views of kv)."""
        return split_heads(kv, 2, self.heads)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory [B, S, memory_size] -> K, V each [B, heads, S, d_head]."""
        return self.split_kv(linear(self.kv_proj, memory))

    def project_query(self, query: torch.Tensor) -> torch.Tensor:
        """query [B, T, query_size] -> Q [B, heads, T, d_head]."""
        b, t, _ = query.shape
        return linear(self.q_proj, query).view(b, t, self.heads, self.d_head).transpose(1, 2)

    def project_self(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention's Q, K, V [B, heads, T, d_head] of x [B, T, size]. In training, from one product with
        the query and key/value weights side by side (Q|K|V rows: one larger matmul each way instead of two,
        and x's gradient from one product instead of a sum of two); else from the two projections."""
        joint = (torch.is_grad_enabled() and type(self.q_proj) is nn.Linear and type(self.kv_proj) is nn.Linear
                 and self.q_proj.in_features == self.kv_proj.in_features and self.q_proj.bias is not None)
        if not joint:
            return (self.project_query(x), *self.project_memory(x))
        weight = torch.cat([self.q_proj.weight, self.kv_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.kv_proj.bias])
        return split_heads(linear_with(weight, bias, x), 3, self.heads)

    def attend_projected(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
               causal: bool = False, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected Q [B, heads, T, d_head] over K/V [B, heads, S, d_head] -> (output [B, T, output_size],
        weights [B, heads, T, S] or None); see the module-level `attend`."""
        b, _, t, _ = q.shape
        dropout = self.dropout if self.training else 0.0
        context, weights = attend(q, k, v, key_mask, causal, dropout, need_weights)
        return linear(self.out_proj, context.transpose(1, 2).reshape(b, t, -1)), weights

    def forward(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_mask: torch.Tensor | None = None, causal: bool = False,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query [B, T, query_size] over K/V [B, heads, S, d_head] ->
        (output [B, T, output_size], weights [B, heads, T, S] or None); see `attend`."""
        return self.attend_projected(self.project_query(query), k, v, key_mask, causal, need_weights)


@dataclass
class MultiHeadOptions(Component):
    heads: int = opt(4, gt=0)
    dropout: float = opt(0.0, ge=0, lt=1, doc="dropout on the attention weights")
    hidden_size: int | None = opt(None, gt=0, doc="projected query/key/value size; default: the query size")


@register_attention("multihead", MultiHeadOptions)
class MultiHead(Attention):
    """MultiHeadAttention behind the zoo's Attention interface; context has the memory's size."""

    def __init__(self, options: MultiHeadOptions, query_size: int, memory_size: int):
        super().__init__()
        hidden = options.hidden_size or query_size
        check_divisible(hidden, options.heads, "model.attention.hidden_size (default: the query size)")
        self.core = MultiHeadAttention(query_size, memory_size, hidden, options.heads, options.dropout,
                                       output_size=memory_size)

    def precompute(self, memory: torch.Tensor) -> torch.Tensor:
        """memory [B, S, H] -> projected K|V [B, S, 2 * hidden], once per sentence."""
        return linear(self.core.kv_proj, memory)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [B, T, Q] -> (context [B, T, H], weights averaged over heads [B, T, S])."""
        k, v = self.core.split_kv(keys)
        context, weights = self.core(query, k, v, key_mask=mask, need_weights=True)
        return context, weights.mean(dim=1).to(context.dtype)
