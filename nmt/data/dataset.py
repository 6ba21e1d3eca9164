"""A preprocessed data directory: its file layout, and memory-mapped access to one split.

Layout (written by nmt/data/binarize.py):
    spm.src.model, spm.tgt.model          SentencePiece models (identical copies when joint)
    {split}.{side}.ids.npy                flat int32 subword ids of all sentences, no BOS/EOS
    {split}.{side}.offsets.npy            int64, n+1 entries: sentence i is ids[offsets[i]:offsets[i+1]]
    {split}.{side}.txt                    raw lines (valid/test only: BLEU sources and references)
    stats.json                            counts, filters, vocabularies, the data config
    train-sampled{k}.{side}.*             with data.sampling.copies: copy k of the training pairs, segmented
                                          with subword sampling (same pairs, same order, same files as train)

A split of more than data.shard_size sentences is written in shards instead, each an ids/offsets pair
of its own for consecutive sentences: {split}.{side}.00000.ids.npy, {split}.{side}.00000.offsets.npy,
{split}.{side}.00001.ids.npy, ... Either way the arrays are memory-mapped, never read whole: what a
ParallelData holds in RAM is its length index (8 bytes per sentence and side); `gather` reads the
sentences of one batch.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from nmt.data.corpus import read_lines
from nmt.data.tokenizer import with_source_end
from nmt.errors import NmtError
from nmt.vocab import PAD_ID

SPLITS = ("train", "valid", "test")
SIDES = ("src", "tgt")
STATS_FILE = "stats.json"
READ_BLOCK = 1 << 20  # entries per read when computing lengths from offsets
RELEASE_ABOVE = 64 << 20  # bytes of mapped arrays above which a Side unmaps the pages of each batch read


def spm_file(side: str) -> str:
    return f"spm.{side}.model"


def ids_file(split: str, side: str, shard: int | None = None) -> str:
    """The ids file of a split's side, or of its shard `shard` when the split is sharded."""
    return f"{split}.{side}.ids.npy" if shard is None else f"{split}.{side}.{shard:05d}.ids.npy"


def offsets_file(split: str, side: str, shard: int | None = None) -> str:
    return f"{split}.{side}.offsets.npy" if shard is None else f"{split}.{side}.{shard:05d}.offsets.npy"


def text_file(split: str, side: str) -> str:
    return f"{split}.{side}.txt"


def sampled_split(copy: int) -> str:
    """The name of the training data's sampled segmentation `copy` (1-based; data.sampling.copies)."""
    return f"train-sampled{copy}"


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


def _diff(path: Path, offsets: np.memmap) -> np.ndarray:
    """np.diff(offsets), read block by block with read() rather than through the memory map: mapped
    pages that were touched would stay in this process's resident set."""
    n = len(offsets)
    out = np.empty(max(n - 1, 0), dtype=np.int64)
    with open(path, "rb") as f:
        for start in range(0, n - 1, READ_BLOCK):
            stop = min(n, start + READ_BLOCK + 1)
            f.seek(offsets.offset + start * offsets.itemsize)
            block = np.fromfile(f, dtype=offsets.dtype, count=stop - start)
            if len(block) != stop - start:
                raise NmtError(f"{path}: truncated array (corrupt data directory)")
            out[start: stop - 1] = np.diff(block)
    return out


def shard_numbers(data_dir: Path, split: str, side: str) -> list[int | None]:
    """[None] for a split stored whole (or missing: reading it reports that), else [0, 1, ..., n-1]."""
    if (data_dir / ids_file(split, side)).exists():
        return [None]
    found = sorted(p.name for p in data_dir.glob(f"{split}.{side}.*.ids.npy"))
    if not found:
        return [None]
    expected = [ids_file(split, side, k) for k in range(len(found))]
    if found != expected:
        raise NmtError(f"{data_dir}: the shards of {split}.{side} are not numbered 0 to {len(found) - 1} "
                       f"(found {', '.join(found[:5])}{', ...' if len(found) > 5 else ''}; corrupt data directory)")
    return list(range(len(found)))


def _advise(array: np.ndarray, advice: int | None) -> None:
    """madvise the memory map behind `array`, where the platform has it (a hint: failures are ignored)."""
    mapped: Any = getattr(array, "_mmap", None)
    if advice is None or mapped is None or not hasattr(mapped, "madvise"):
        return
    try:
        mapped.madvise(advice)
    except (OSError, ValueError):
        pass


class Side:
    """One side (src or tgt) of a split: flat ids + offsets per shard, memory-mapped; lengths in RAM.

    Batches read random sentences, so the maps are advised random access (no read-ahead). The kernel maps
    in pages around every sentence read (and counts them in this process's resident set) until told
    otherwise: above RELEASE_ABOVE bytes, `gather` hands them back after each batch -- the data stays in
    the page cache, shared by every process reading it -- so that resident memory stays at the length index
    however large the corpus is.
    """

    def __init__(self, data_dir: Path, split: str, side: str):
        self.shards: list[tuple[np.ndarray, np.ndarray]] = []
        lengths = []
        for shard in shard_numbers(data_dir, split, side):
            ids_path = data_dir / ids_file(split, side, shard)
            offsets_path = data_dir / offsets_file(split, side, shard)
            ids, offsets = _load(ids_path), _load(offsets_path)
            consistent = (ids.dtype == np.int32 and ids.ndim == 1 and offsets.dtype == np.int64
                          and offsets.ndim == 1 and len(offsets) > 0 and offsets[0] == 0
                          and offsets[-1] == len(ids))
            shard_lengths = _diff(offsets_path, offsets) if consistent else None
            if shard_lengths is None or not bool((shard_lengths >= 0).all()):
                raise NmtError(f"{offsets_path}: does not describe {ids_path.name} (expected int32 ids and int64 "
                               f"offsets from 0 to their count; corrupt data directory)")
            self.shards.append((ids, offsets))
            lengths.append(shard_lengths)
            for array in (ids, offsets):
                _advise(array, getattr(mmap, "MADV_RANDOM", None))
        self.release = sum(ids.nbytes + offsets.nbytes for ids, offsets in self.shards) > RELEASE_ABOVE
        self.lengths = lengths[0] if len(lengths) == 1 else np.concatenate(lengths)
        # sentence index where each shard starts, and the total
        self.starts = np.concatenate([[0], np.cumsum([len(x) for x in lengths])]).astype(np.int64)

    @property
    def ids(self) -> np.ndarray:
        """The flat ids of a split stored whole (a sharded split has one array per shard: `shards`)."""
        if len(self.shards) != 1:
            raise ValueError(f"this split has {len(self.shards)} shards: use Side.shards")
        return self.shards[0][0]

    @property
    def offsets(self) -> np.ndarray:
        if len(self.shards) != 1:
            raise ValueError(f"this split has {len(self.shards)} shards: use Side.shards")
        return self.shards[0][1]

    def __len__(self) -> int:
        return len(self.lengths)

    def _locate(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sentence {i} out of range for {len(self)} sentences")
        i = i % len(self)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        ids, offsets = self.shards[k]
        return ids, offsets, i - int(self.starts[k])

    def __getitem__(self, i: int) -> np.ndarray:
        ids, offsets, local = self._locate(int(i))
        return np.asarray(ids[offsets[local]: offsets[local + 1]], dtype=np.int32)

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sentences `indices` as a [B, max_len] int64 matrix (PAD_ID padded) and their lengths.

        Reads only those sentences from the memory maps (shard by shard when the split is sharded).
        """
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        columns = np.arange(int(lengths.max(initial=0)))
        real = columns[None, :] < lengths[:, None]
        body = np.full(real.shape, PAD_ID, dtype=np.int64)
        if len(self.shards) == 1:
            ids, offsets = self.shards[0]
            body[real] = ids[(offsets[indices][:, None] + columns[None, :])[real]]
            self._release([0])
            return body, lengths
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        used = np.unique(shard_of)
        for k in used:
            rows = np.flatnonzero(shard_of == k)
            ids, offsets = self.shards[k]
            local = indices[rows] - self.starts[k]
            rows_real = real[rows]
            block = body[rows]
            block[rows_real] = ids[(offsets[local][:, None] + columns[None, :])[rows_real]]
            body[rows] = block
        self._release(used)
        return body, lengths

    def _release(self, shards: Any) -> None:
        if self.release:
            for k in shards:
                for array in self.shards[k]:
                    _advise(array, getattr(mmap, "MADV_DONTNEED", None))


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


def open_training_data(data_dir: str | Path) -> list[ParallelData]:
    """The training pairs in each segmentation the data directory holds: the plain one, then the sampled
    copies `nmt preprocess` wrote for data.sampling (the same pairs in the same order, segmented anew)."""
    data_dir = check_data_dir(data_dir)
    try:
        stats = json.loads((data_dir / STATS_FILE).read_text(encoding="utf-8"))
        copies = int(stats["splits"]["train"].get("sampled", {}).get("copies", 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise NmtError(f"{data_dir / STATS_FILE}: unreadable statistics ({e}; corrupt data directory)") from None
    plain = ParallelData.open(data_dir, "train")
    sampled = [ParallelData.open(data_dir, sampled_split(k)) for k in range(1, copies + 1)]
    for data in sampled:
        if len(data) != len(plain):
            raise NmtError(f"{data.name}: {len(data)} pairs where train has {len(plain)} (corrupt data directory)")
    return [plain, *sampled]


def read_text(data_dir: str | Path, split: str, side: str) -> list[str]:
    """The raw lines of a valid/test side (the BLEU sources and references)."""
    path = check_data_dir(data_dir) / text_file(split, side)
    if not path.is_file():
        raise NmtError(f"{path}: missing from the data directory (was this split preprocessed?)")
    return read_lines(path)
