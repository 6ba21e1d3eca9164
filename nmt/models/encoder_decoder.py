"""EncoderDecoder: embeddings + any registered encoder + any registered decoder + output layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from nmt.config import ModelConfig
from nmt.errors import NmtError
from nmt.models import zoo
from nmt.models.interfaces import DecoderState, EncoderOutput
from nmt.vocab import PAD_ID


class EncoderDecoder(nn.Module):
    """One nn.Module for every pairing; the search code talks only to this class."""

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int):
        super().__init__()
        emb = cfg.embeddings
        self.src_embed = nn.Embedding(src_vocab_size, emb.src_dim, padding_idx=PAD_ID)
        if emb.share_src_tgt:
            if src_vocab_size != tgt_vocab_size or emb.src_dim != emb.tgt_dim:
                raise NmtError(
                    "model.embeddings.share_src_tgt: needs a joint vocabulary (data.vocab.joint: true) "
                    "and src_dim == tgt_dim"
                )
            self.tgt_embed = self.src_embed
        else:
            self.tgt_embed = nn.Embedding(tgt_vocab_size, emb.tgt_dim, padding_idx=PAD_ID)
        self.src_scale = math.sqrt(emb.src_dim) if emb.scale else 1.0
        self.tgt_scale = math.sqrt(emb.tgt_dim) if emb.scale else 1.0
        self.embed_dropout = nn.Dropout(emb.dropout)
        self.encoder = zoo.build_encoder(cfg.encoder, emb.src_dim)
        self.decoder = zoo.build_decoder(cfg.decoder, emb.tgt_dim, self.encoder.output_size, cfg.attention)
        hidden = self.decoder.output_size
        self.pre_output: nn.Module | None = None
        if emb.tie_output and hidden != emb.tgt_dim:
            self.pre_output = nn.Linear(hidden, emb.tgt_dim, bias=False)
            hidden = emb.tgt_dim
        self.output_layer = nn.Linear(hidden, tgt_vocab_size, bias=not emb.tie_output)
        if emb.tie_output:
            self.output_layer.weight = self.tgt_embed.weight
        if emb.scale or emb.tie_output:
            # N(0, 1/dim): scaled by sqrt(dim) the inputs have unit size, and as the output matrix it
            # starts with logits of unit scale instead of sqrt(dim) (a loss of ~100 at step 1).
            for table in {id(t): t for t in (self.src_embed, self.tgt_embed)}.values():
                _init_embedding(table)
        self.src_vocab_size = src_vocab_size
        self.tgt_vocab_size = tgt_vocab_size

    # -- building blocks -----------------------------------------------------------------------

    def encode(self, src: torch.Tensor) -> EncoderOutput:
        """src [B, S] token ids (PAD_ID padded) -> EncoderOutput."""
        mask = src != PAD_ID
        emb = self.embed_dropout(self.src_embed(src) * self.src_scale)
        return self.encoder(emb, mask)

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        return self.decoder.init_state(enc)

    def reorder_state(self, state: DecoderState, index: torch.Tensor) -> DecoderState:
        return self.decoder.reorder_state(state, index)

    def decode(
        self, tgt_in: torch.Tensor, enc: EncoderOutput, state: DecoderState
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """tgt_in [B, T] ids -> (logits [B, T, V], new state, attention [B, T, S] or None)."""
        hidden, state, attn = self.decoder(self.embed_target(tgt_in), enc, state)
        return self.logits(hidden), state, attn

    def embed_target(self, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.embed_dropout(self.tgt_embed(tgt_in) * self.tgt_scale)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.pre_output is not None:
            hidden = self.pre_output(hidden)
        return self.output_layer(hidden)

    # -- the two uses ------------------------------------------------------------------------

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        """Teacher forcing: src [B, S], tgt_in [B, T] (BOS + y) -> logits [B, T, V]; with `features_only`
        the output layer's input [B, T, E] instead (for nmt.training.loss.output_label_smoothed_nll)."""
        enc = self.encode(src)
        hidden, _, _ = self.decoder(self.embed_target(tgt_in), enc, self.init_state(enc))
        if features_only:
            return hidden if self.pre_output is None else self.pre_output(hidden)
        return self.logits(hidden)

    def decode_step(
        self, prev_tokens: torch.Tensor, enc: EncoderOutput, state: DecoderState
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """One incremental step: prev_tokens [B] -> (log-probs [B, V] in fp32, state, attention [B, S])."""
        logits, state, attn = self.decode(prev_tokens.unsqueeze(1), enc, state)
        log_probs = torch.log_softmax(logits[:, -1], dim=-1, dtype=torch.float32)  # bf16 read, fp32 written
        return log_probs, state, None if attn is None else attn[:, -1]

    def parameter_summary(self) -> dict[str, int]:
        """Parameter count per component (shared tensors counted once, under their first owner)."""
        seen: set[int] = set()
        counts: dict[str, int] = {}
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            part = name.split(".")[0]
            counts[part] = counts.get(part, 0) + p.numel()
        counts["total"] = sum(counts.values())
        return counts


def _init_embedding(table: nn.Embedding) -> None:
    nn.init.normal_(table.weight, mean=0.0, std=table.embedding_dim ** -0.5)
    with torch.no_grad():
        table.weight[PAD_ID].zero_()
