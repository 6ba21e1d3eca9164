"""The Transformer encoder and decoder (Vaswani et al. 2017), pre- or post-norm.

Each sublayer f (self-attention, cross-attention, feed-forward) is wrapped as
    pre-norm:  x = x + dropout(f(LayerNorm(x)))        (plus a final LayerNorm after the stack)
    post-norm: x = LayerNorm(x + dropout(f(x)))
The decoder decodes incrementally: its state caches every layer's self-attention K/V (growing by one
position per step) and the cross-attention K/V of the memory (computed once in `init_state`).

Under autocast the residual stream itself is in the autocast dtype (bf16): the input layer converts
its sum of embeddings and positions once, LayerNorm reads bf16 and computes its statistics in fp32,
and every dropout + residual addition is a bf16 op. An fp32 stream would cost a cast on each side of
every sublayer and twice the memory traffic of the elementwise work (about 5% of a training step of
the d_model 256 recipe on a 2-core CPU), for the same validation loss (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from nmt.config import Component, opt
from nmt.errors import NmtError
from nmt.models.dropout import Dropout, dropout_add, relu_dropout
from nmt.models.interfaces import Decoder, DecoderState, Encoder, EncoderOutput
from nmt.models.layer_norm import LayerNorm
from nmt.models.linear import linear
from nmt.models.multihead import MultiHeadAttention, check_divisible
from nmt.models.zoo import register_decoder, register_encoder

KeysValues = tuple[torch.Tensor, torch.Tensor]  # K, V [B, heads, positions, d_head]


@dataclass
class TransformerOptions(Component):
    layers: int = opt(3, gt=0)
    d_model: int = opt(256, gt=0, doc="width of every layer's input and output")
    heads: int = opt(4, gt=0, doc="attention heads; d_model must be divisible by heads")
    ff_size: int = opt(1024, gt=0, doc="inner size of the position-wise feed-forward")
    dropout: float = opt(0.1, ge=0, lt=1, doc="on embeddings + positions and on every sublayer output")
    attention_dropout: float = opt(0.0, ge=0, lt=1, doc="on the attention weights")
    activation_dropout: float = opt(0.0, ge=0, lt=1, doc="inside the feed-forward, after the activation")
    activation: Literal["relu", "gelu"] = "relu"
    norm: Literal["pre", "post"] = opt("pre", doc="LayerNorm before each sublayer or after each residual")
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    max_positions: int = opt(1024, gt=0, doc="longest sequence (learned positions; sinusoidal ones extend)")


@dataclass
class TransformerEncoderOptions(TransformerOptions):
    pass


@dataclass
class TransformerDecoderOptions(TransformerOptions):
    pass


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """[length, dim]: PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim))."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = position * inv_freq
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return table


class InputLayer(nn.Module):
    """Embedded tokens [B, T, E] -> dropout(project(x) + PE(position)) [B, T, d_model].

    The projection exists only when E != d_model.
    """

    def __init__(self, options: TransformerOptions, input_size: int, key: str):
        super().__init__()
        d = options.d_model
        self.key = key
        self.project = nn.Linear(input_size, d) if input_size != d else nn.Identity()
        self.learned = options.positions == "learned"
        if self.learned:
            self.table = nn.Parameter(torch.randn(options.max_positions, d) * d**-0.5)
        else:
            self.register_buffer("table", sinusoidal_table(options.max_positions, d), persistent=False)
        self.dropout = Dropout(options.dropout)

    def position_table(self, needed: int) -> torch.Tensor:
        """The table covering positions 0..needed-1 (sinusoidal tables grow on demand)."""
        if needed > self.table.size(0):
            if self.learned:
                raise NmtError(
                    f"{self.key}.max_positions: a sequence needs position {needed - 1} but learned positions "
                    f"stop at {self.table.size(0) - 1}; raise max_positions or use positions: sinusoidal"
                )
            self.table = sinusoidal_table(needed, self.table.size(1)).to(self.table.device)
        return self.table

    def forward(self, x: torch.Tensor, start: torch.Tensor | None = None, past: int = 0) -> torch.Tensor:
        """x [B, T, E]; start [B] = position of x[:, 0] (None = 0), at most `past` (bounds the table without
        reading `start` back from the device). The result is in the autocast dtype under autocast (the
        residual stream's dtype, see the module docstring), else in x's."""
        steps = torch.arange(x.size(1), device=x.device)
        positions = steps if start is None else start[:, None] + steps  # [T] or [B, T]
        table = self.position_table(past + x.size(1))
        x = linear(self.project, x) + table[positions].to(x.dtype)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return self.dropout(x)


class Residual(nn.Module):
    """The norm + residual wiring of one sublayer: `before` gives the sublayer input (and the residual stream
    to continue with: pre-norm blocks take x's two gradients in one pass, `LayerNorm.fork`), `after` the output.

    The residual stream keeps its dtype (the autocast dtype under autocast, see the module docstring); a
    sublayer output of another dtype is converted to it before the fused dropout + addition
    (`dropout_add`).
    """

    def __init__(self, d_model: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm = LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def before(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sublayer's input, the residual stream to hand to `after`)."""
        return self.norm.fork(x) if self.pre_norm else (x, x)

    def after(self, x: torch.Tensor, sublayer_out: torch.Tensor) -> torch.Tensor:
        y = dropout_add(x, sublayer_out, self.dropout.p, self.training)
        return y if self.pre_norm else self.norm(y)


class FeedForward(nn.Module):
    """FFN(x) = W_2 dropout(act(W_1 x + b_1)) + b_2."""

    def __init__(self, options: TransformerOptions):
        super().__init__()
        self.inner = nn.Linear(options.d_model, options.ff_size)
        self.outer = nn.Linear(options.ff_size, options.d_model)
        self.activation = F.gelu if options.activation == "gelu" else F.relu
        self.dropout = Dropout(options.activation_dropout)
        for layer in (self.inner, self.outer):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is F.relu:  # one pass for both where the fused kernel applies
            return linear(self.outer, relu_dropout(linear(self.inner, x), self.dropout.p, self.training))
        return linear(self.outer, self.dropout(self.activation(linear(self.inner, x))))


def _self_attention(options: TransformerOptions) -> MultiHeadAttention:
    d = options.d_model
    return MultiHeadAttention(d, d, d, options.heads, options.attention_dropout)


def _final_norm(options: TransformerOptions) -> nn.Module:
    return LayerNorm(options.d_model) if options.norm == "pre" else nn.Identity()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, S, H], mask [B, S] -> mean over the real positions [B, H]."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Encoder


class EncoderLayer(nn.Module):
    def __init__(self, options: TransformerOptions):
        super().__init__()
        pre = options.norm == "pre"
        self.self_attn = _self_attention(options)
        self.attn_residual = Residual(options.d_model, options.dropout, pre)
        self.ff = FeedForward(options)
        self.ff_residual = Residual(options.d_model, options.dropout, pre)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, x = self.attn_residual.before(x)
        q, k, v = self.self_attn.project_self(h)
        x = self.attn_residual.after(x, self.self_attn.attend_projected(q, k, v, key_mask=mask)[0])
        h, x = self.ff_residual.before(x)
        return self.ff_residual.after(x, self.ff(h))


@register_encoder("transformer", TransformerEncoderOptions)
class TransformerEncoder(Encoder):
    """Self-attention over the source; `final` is the mean of the real positions' states."""

    def __init__(self, options: TransformerEncoderOptions, input_size: int):
        super().__init__()
        check_divisible(options.d_model, options.heads, "model.encoder.d_model")
        self.input = InputLayer(options, input_size, "model.encoder")
        self.layers = nn.ModuleList(EncoderLayer(options) for _ in range(options.layers))
        self.final_norm = _final_norm(options)
        self.output_size = options.d_model

    def forward(self, src_emb: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        x = self.input(src_emb)
        for layer in self.layers:
            x = layer(x, src_mask)
        x = self.final_norm(x)
        return EncoderOutput(x, src_mask, masked_mean(x, src_mask))


# ----------------------------------------------------------------------------------------------
# Decoder


class DecoderLayer(nn.Module):
    def __init__(self, options: TransformerOptions, memory_size: int):
        super().__init__()
        d, pre = options.d_model, options.norm == "pre"
        self.self_attn = _self_attention(options)
        self.self_residual = Residual(d, options.dropout, pre)
        self.cross_attn = MultiHeadAttention(d, memory_size, d, options.heads, options.attention_dropout)
        self.cross_residual = Residual(d, options.dropout, pre)
        self.ff = FeedForward(options)
        self.ff_residual = Residual(d, options.dropout, pre)

    def forward(
        self, x: torch.Tensor, cache: KeysValues, memory_kv: KeysValues, memory_mask: torch.Tensor,
        need_weights: bool,
    ) -> tuple[torch.Tensor, KeysValues, torch.Tensor | None]:
        """x [B, T, d] (the T newest positions), cache = self-attention K/V of earlier positions ->
        (output, cache extended by T positions, cross-attention weights [B, heads, T, S] or None)."""
        h, x = self.self_residual.before(x)
        q, k_new, v_new = self.self_attn.project_self(h)
        k_cache, v_cache = cache
        if k_cache.size(2):
            k_new, v_new = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)
        x = self.self_residual.after(x, self.self_attn.attend_projected(q, k_new, v_new, causal=True)[0])
        h, x = self.cross_residual.before(x)
        context, weights = self.cross_attn(h, *memory_kv, key_mask=memory_mask, need_weights=need_weights)
        x = self.cross_residual.after(x, context)
        h, x = self.ff_residual.before(x)
        x = self.ff_residual.after(x, self.ff(h))
        return x, (k_new, v_new), weights


@register_decoder("transformer", TransformerDecoderOptions)
class TransformerDecoder(Decoder):
    """Masked self-attention over the target prefix + multi-head cross-attention over any encoder's memory.

    `model.attention` must be `none` or `multihead`: the cross-attention is built in and uses this
    decoder's own `heads` and `attention_dropout`. Cross-attention weights (last layer, averaged over
    heads) are returned only when `return_attention` is set (for alignments; off by default, since
    search does not use them and computing them keeps the last layer off the fused attention kernel)
    and the decoder is in eval mode.
    """

    def __init__(self, options: TransformerDecoderOptions, input_size: int, memory_size: int,
                 attention_options: Component):
        super().__init__()
        if attention_options.type not in ("none", "multihead"):
            raise NmtError(
                "model.attention.type: the transformer decoder has its own multi-head cross-attention; "
                "use 'none' or 'multihead'"
            )
        check_divisible(options.d_model, options.heads, "model.decoder.d_model")
        self.heads = options.heads
        self.d_head = options.d_model // options.heads
        self.input = InputLayer(options, input_size, "model.decoder")
        self.layers = nn.ModuleList(DecoderLayer(options, memory_size) for _ in range(options.layers))
        self.final_norm = _final_norm(options)
        self.output_size = options.d_model
        self.return_attention = False

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        """pos [B] = 0; per layer i: empty self-attention caches k{i}/v{i} [B, heads, 0, d_head] and the
        memory's cross-attention keys/values mk{i}/mv{i} [B, heads, S, d_head]; `group` [B] = which
        sentence's memory each row holds (see `reorder_state`)."""
        memory = enc.memory
        batch = memory.size(0)
        state: DecoderState = {"pos": torch.zeros(batch, dtype=torch.long, device=memory.device),
                               "group": torch.arange(batch, device=memory.device)}
        for i, layer in enumerate(self.layers):
            empty = memory.new_zeros(batch, self.heads, 0, self.d_head)
            state[f"k{i}"], state[f"v{i}"] = empty, empty
            mk, mv = layer.cross_attn.project_memory(memory)
            if not torch.is_grad_enabled():  # decoding: contiguous rows are selected faster
                mk, mv = mk.contiguous(), mv.contiguous()
            state[f"mk{i}"], state[f"mv{i}"] = mk, mv
        return state

    def reorder_state(self, state: DecoderState, index: torch.Tensor) -> DecoderState:
        """Select rows `index`; the memory keys/values are left as they are when every selected row holds
        the same sentence as before (beam search reordering hypotheses within their sentences: half of
        the copying per step at beam 5), as the `group` of each row tells."""
        group = state["group"].index_select(0, index)
        same_memory = group.shape == state["group"].shape and bool(torch.equal(group, state["group"]))
        memory_keys = {f"m{kv}{i}" for kv in "kv" for i in range(len(self.layers))}
        reordered = {}
        for key, value in state.items():
            if same_memory and key in memory_keys:
                reordered[key] = value
            else:
                reordered[key] = group if key == "group" else value.index_select(0, index)
        return reordered

    def forward(
        self, tgt_emb: torch.Tensor, enc: EncoderOutput, state: DecoderState
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """tgt_emb [B, T, E] (the T positions after those in `state`) -> (hidden [B, T, d_model], state,
        cross-attention weights [B, T, S] or None)."""
        x = self.input(tgt_emb, state["pos"], past=state["k0"].size(2))
        new_state: DecoderState = {"pos": state["pos"] + tgt_emb.size(1)}
        if "group" in state:
            new_state["group"] = state["group"]
        weights = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            need_weights = self.return_attention and not self.training and i == last
            cache, memory_kv = (state[f"k{i}"], state[f"v{i}"]), (state[f"mk{i}"], state[f"mv{i}"])
            x, (k, v), weights = layer(x, cache, memory_kv, enc.mask, need_weights)
            new_state.update({f"k{i}": k, f"v{i}": v, f"mk{i}": memory_kv[0], f"mv{i}": memory_kv[1]})
        attention = None if weights is None else weights.mean(dim=1).to(x.dtype)
        return self.final_norm(x), new_state, attention
