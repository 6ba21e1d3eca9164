"""Batches: token-budget batches of similar-length pairs for training, fixed-size ones for decoding,
and `collate`, which turns example indices into padded tensors.

A pair's padded width is max(src_len, tgt_len) + 1 (the source gains EOS, the target BOS or EOS).
A batch of n pairs costs n x (its widest pair's width) tokens; `token_batches` keeps that within
the budget. Every function here is deterministic for its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from nmt.data.dataset import ParallelData
from nmt.data.tokenizer import SOURCE_END
from nmt.vocab import BOS_ID, EOS_ID, PAD_ID


def padded_widths(src_lengths: np.ndarray, tgt_lengths: np.ndarray) -> np.ndarray:
    """Per pair: max(src, tgt) + 1, the width it pads a batch to."""
    src_lengths, tgt_lengths = np.asarray(src_lengths), np.asarray(tgt_lengths)
    if src_lengths.shape != tgt_lengths.shape or src_lengths.ndim != 1:
        raise ValueError(f"length arrays must be 1-d and equal in size, got {src_lengths.shape} and "
                         f"{tgt_lengths.shape}")
    return np.maximum(src_lengths, tgt_lengths).astype(np.int64) + 1


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, epoch % 2**63])


def _pack(widths: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Greedy [start, end) runs over ascending `widths` with widths[end-1] * (end-start) <= budget.

    A run's cost widths[end-1] * (end-start) never decreases as the run grows, so the longest run
    that fits is found by one searchsorted; a pair wider than the budget alone forms its own run.
    """
    bounds = []
    start, n = 0, len(widths)
    while start < n:
        horizon = min(n, start + max(1, budget // int(widths[start])))
        cost = widths[start:horizon] * np.arange(1, horizon - start + 1)
        count = max(1, int(np.searchsorted(cost, budget, side="right")))
        bounds.append((start, start + count))
        start += count
    return bounds


def token_batches(src_lengths: np.ndarray, tgt_lengths: np.ndarray, batch_tokens: int, seed: int, epoch: int,
                  shuffle: bool = True, rank: int = 0, world_size: int = 1, even: bool = False) -> list[np.ndarray]:
    """Example indices grouped into length-bucketed batches of at most `batch_tokens` padded tokens.

    Pairs are sorted by width (ties broken randomly per epoch when `shuffle`), packed greedily, and
    the batch order is shuffled from (seed, epoch). Every example appears exactly once per epoch.
    With `world_size > 1`, rank r gets batches r, r + world_size, ... of the same list: disjoint
    shards covering the epoch, whose counts differ by at most one. With `even`, the list is first cut to
    a multiple of `world_size` (dropping at most world_size - 1 batches, different ones every epoch), so
    that every rank gets the same number of batches -- what lock-step distributed training needs.
    """
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    widths = padded_widths(src_lengths, tgt_lengths)
    if shuffle:
        rng = _rng(seed, epoch)
        order = np.lexsort((rng.permutation(len(widths)), widths))
    else:
        order = np.argsort(widths, kind="stable")
    batches = [order[start:end] for start, end in _pack(widths[order], batch_tokens)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    if even:
        batches = batches[: len(batches) - len(batches) % world_size]
    return batches[rank::world_size]


def sentence_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices in batches of `batch_size` sentences of similar length, longest first (for decoding).

    Callers restore input order from the indices.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def _padding(real_tokens: int, cells: int) -> float:
    """Fraction of a batch's cells that are padding: 1 - real / cells."""
    return 1.0 - real_tokens / cells if cells else 0.0


def padding_ratio(batches: list[np.ndarray], src_lengths: np.ndarray, tgt_lengths: np.ndarray) -> float:
    """Padding fraction of `batches` as `collate` would build them (src + EOS, tgt + BOS/EOS)."""
    src_lengths, tgt_lengths = np.asarray(src_lengths), np.asarray(tgt_lengths)
    real = cells = 0
    for idx in batches:
        src, tgt = src_lengths[idx] + 1, tgt_lengths[idx] + 1
        real += int(src.sum() + tgt.sum())
        cells += len(idx) * int(src.max() + tgt.max())
    return _padding(real, cells)


Device = str | torch.device


@dataclass
class Batch:
    """Padded tensors of one batch (PAD_ID = 0 everywhere it is padded)."""

    src: torch.Tensor  # [B, S] long: source ids + EOS
    tgt_in: torch.Tensor  # [B, T] long: BOS + target ids (decoder input)
    tgt_out: torch.Tensor  # [B, T] long: target ids + EOS (what the decoder must predict)
    n_src_tokens: int  # non-pad cells of src
    n_tgt_tokens: int  # non-pad cells of tgt_out (the loss normalizer)
    indices: np.ndarray | None = None  # example indices within the split

    def __len__(self) -> int:
        return self.src.shape[0]

    @property
    def padding_ratio(self) -> float:
        """Fraction of src + tgt_out cells that are padding."""
        return _padding(self.n_src_tokens + self.n_tgt_tokens, self.src.numel() + self.tgt_out.numel())

    def to(self, device: Device) -> Batch:
        device = torch.device(device)
        move = {"non_blocking": device.type == "cuda"}
        return replace(self, src=self.src.to(device, **move), tgt_in=self.tgt_in.to(device, **move),
                       tgt_out=self.tgt_out.to(device, **move))


def _frame(body: np.ndarray, lengths: np.ndarray, start: int | None, end: int | None) -> np.ndarray:
    """Put `start` before and `end` after each row's real tokens; pad the rest with PAD_ID."""
    shift = int(start is not None)
    out = np.full((body.shape[0], body.shape[1] + shift + int(end is not None)), PAD_ID, dtype=np.int64)
    out[:, shift: shift + body.shape[1]] = body
    if start is not None:
        out[:, 0] = start
    if end is not None:
        out[np.arange(len(lengths)), shift + lengths] = end
    return out


def collate(data: ParallelData, indices: np.ndarray) -> Batch:
    """The padded Batch of pairs `indices` of `data`."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise ValueError("cannot collate an empty batch")
    src_body, src_lengths = data.src_side.gather(indices)
    tgt_body, tgt_lengths = data.tgt_side.gather(indices)
    return Batch(
        src=torch.from_numpy(_frame(src_body, src_lengths, None, SOURCE_END)),
        tgt_in=torch.from_numpy(_frame(tgt_body, tgt_lengths, BOS_ID, None)),
        tgt_out=torch.from_numpy(_frame(tgt_body, tgt_lengths, None, EOS_ID)),
        n_src_tokens=int(src_lengths.sum()) + len(indices),
        n_tgt_tokens=int(tgt_lengths.sum()) + len(indices),
        indices=indices,
    )
