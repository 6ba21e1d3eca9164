"""A preprocessed data directory: its file layout, and memory-mapped access to one split.

Layout (written by nmt/data/binarize.py):
    spm.src.model, spm.tgt.model          SentencePiece models (identical copies when joint)
    {split}.{side}.ids.npy                flat int32 subword ids of all sentences, no BOS/EOS
    {split}.{side}.offsets.npy            int64, n+1 entries: sentence i is ids[offsets[i]:offsets[i+1]]
    {split}.{side}.txt                    raw lines (valid/test only: BLEU sources and references)
    stats.json                            counts, filters, vocabularies, the data config
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nmt.data.corpus import read_lines
from nmt.data.tokenizer import with_source_end
from nmt.errors import NmtError

SPLITS = ("train", "valid", "test")
SIDES = ("src", "tgt")
STATS_FILE = "stats.json"


def spm_file(side: str) -> str:
    return f"spm.{side}.model"


def ids_file(split: str, side: str) -> str:
    return f"{split}.{side}.ids.npy"


def offsets_file(split: str, side: str) -> str:
    return f"{split}.{side}.offsets.npy"


def text_file(split: str, side: str) -> str:
    return f"{split}.{side}.txt"


def check_data_dir(data_dir: str | Path) -> Path:
    """`data_dir` as a Path, or an NmtError if it is not the output of `nmt preprocess`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise NmtError(f"{data_dir}: data directory not found (run `nmt preprocess` first)")
    if not (data_dir / STATS_FILE).is_file():
        raise NmtError(f"{data_dir}: not a preprocessed data directory (no {STATS_FILE}; "
                       f"run `nmt preprocess`)")
    return data_dir


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise NmtError(f"{path}: missing from the data directory (was this split preprocessed?)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise NmtError(f"{path}: unreadable array ({e})") from None


class Side:
    """One side (src or tgt) of a split: flat ids + offsets, memory-mapped."""

    def __init__(self, data_dir: Path, split: str, side: str):
        self.ids = _load(data_dir / ids_file(split, side))
        self.offsets = _load(data_dir / offsets_file(split, side))
        ids, offsets = self.ids, self.offsets
        self.lengths = np.diff(offsets) if offsets.ndim == 1 else offsets
        consistent = (ids.dtype == np.int32 and ids.ndim == 1 and offsets.dtype == np.int64
                      and offsets.ndim == 1 and len(offsets) > 0 and offsets[0] == 0
                      and offsets[-1] == len(ids) and bool((self.lengths >= 0).all()))
        if not consistent:
            raise NmtError(f"{data_dir / offsets_file(split, side)}: does not describe "
                           f"{ids_file(split, side)} (expected int32 ids and int64 offsets from 0 to their "
                           f"count; corrupt data directory)")

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.ids[self.offsets[i]: self.offsets[i + 1]], dtype=np.int32)


class ParallelData:
    """Sentence pairs of one split, read lazily from memory-mapped arrays."""

    def __init__(self, src: Side, tgt: Side, name: str):
        self._src, self._tgt, self.name = src, tgt, name

    @classmethod
    def open(cls, data_dir: str | Path, split: str) -> ParallelData:
        """Open `split` (train/valid/test) of a preprocessed data directory."""
        data_dir = check_data_dir(data_dir)
        src, tgt = Side(data_dir, split, "src"), Side(data_dir, split, "tgt")
        if len(src) != len(tgt):
            raise NmtError(f"{data_dir}: {split} has {len(src)} source but {len(tgt)} target sentences "
                           f"(corrupt data directory)")
        return cls(src, tgt, f"{data_dir}/{split}")

    def __len__(self) -> int:
        return len(self._src)

    @property
    def src_lengths(self) -> np.ndarray:
        """Source lengths in subword tokens (without EOS), int64 [n]."""
        return self._src.lengths

    @property
    def tgt_lengths(self) -> np.ndarray:
        """Target lengths in subword tokens (without BOS/EOS), int64 [n]."""
        return self._tgt.lengths

    @property
    def src_side(self) -> Side:
        return self._src

    @property
    def tgt_side(self) -> Side:
        return self._tgt

    def src(self, i: int) -> np.ndarray:
        """Source subword ids of pair `i` (int32, no EOS)."""
        return self._src[i]

    def tgt(self, i: int) -> np.ndarray:
        """Target subword ids of pair `i` (int32, no BOS/EOS)."""
        return self._tgt[i]

    def source_ids(self, i: int) -> list[int]:
        """The encoder input of pair `i`, exactly as `encode_source` builds it for new text."""
        return with_source_end(self._src[i])


def read_text(data_dir: str | Path, split: str, side: str) -> list[str]:
    """The raw lines of a valid/test side (the BLEU sources and references)."""
    path = check_data_dir(data_dir) / text_file(split, side)
    if not path.is_file():
        raise NmtError(f"{path}: missing from the data directory (was this split preprocessed?)")
    return read_lines(path)
