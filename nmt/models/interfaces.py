"""The two contracts every encoder and decoder in the zoo honours, so any pair works together
and with the same search code.

Conventions: batch is dim 0 everywhere; masks are bool with True = a real (non-pad) position.
A decoder's incremental state is a dict of tensors whose dim 0 is the batch, so search can expand
and reorder it generically (see `Decoder.reorder_state`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DecoderState = dict[str, torch.Tensor]


@dataclass
class EncoderOutput:
    """What an encoder hands to a decoder."""

    memory: torch.Tensor  # [B, S, H] encoder states h_1..h_S
    mask: torch.Tensor  # [B, S] bool, True = real source token
    final: torch.Tensor | None  # [B, H] summary state h_N (last real position), or None

    def index_select(self, index: torch.Tensor) -> EncoderOutput:
        """Rows `index` of the batch (beam search expands each sentence to K rows this way)."""
        final = None if self.final is None else self.final.index_select(0, index)
        return EncoderOutput(self.memory.index_select(0, index), self.mask.index_select(0, index), final)


class Encoder(nn.Module):
    """Embedded source [B, S, E] + mask [B, S] -> EncoderOutput.

    Set `output_size` (H); `EncoderOutput.final`, when given, has that size too.
    """

    output_size: int

    def forward(self, src_emb: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:  # pragma: no cover
        raise NotImplementedError


class Decoder(nn.Module):
    """Embedded target prefix -> hidden states for the output layer.

    `forward` serves both teacher forcing (T = whole target, fresh state) and incremental decoding
    (T = 1, state from the previous call): the same code path, so the two agree.
    Set `output_size` (the size of the returned hidden vectors).
    """

    output_size: int

    def init_state(self, enc: EncoderOutput) -> DecoderState:  # pragma: no cover
        """The state before the first target token (e.g. bridge from enc.final, empty caches)."""
        raise NotImplementedError

    def forward(
        self, tgt_emb: torch.Tensor, enc: EncoderOutput, state: DecoderState
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:  # pragma: no cover
        """tgt_emb [B, T, E] -> (hidden [B, T, output_size], new state, attention [B, T, S] or None)."""
        raise NotImplementedError

    def reorder_state(self, state: DecoderState, index: torch.Tensor) -> DecoderState:
        """Select batch rows `index` of every state tensor (beam search reordering)."""
        return {k: v.index_select(0, index) for k, v in state.items()}


class Attention(nn.Module):
    """Scores a decoder query against encoder memory: alpha = softmax(masked e), c = alpha @ memory.

    `precompute(memory)` may return a projection of the memory computed once per sentence
    (e.g. U h_i for Bahdanau); its result is passed back as `keys` on every call.
    """

    def precompute(self, memory: torch.Tensor) -> torch.Tensor:
        return memory

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """query [B, T, Q], keys [B, S, K], memory [B, S, H], mask [B, S] ->
        (context [B, T, H], weights [B, T, S]; padded positions get exactly zero weight)."""
        raise NotImplementedError
