"""`nmt preprocess`: SentencePiece (trained or reused), encoding, filtering, binarized output.

Everything is written into a temporary directory next to `data.dir` and renamed into place at the
end, so a failure never leaves a half-written data directory. Corpora are streamed: memory holds
one chunk of sentences at a time (plus SentencePiece's training sample).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nmt import __version__
from nmt.config import Config, to_dict
from nmt.data.corpus import count_parallel, iter_lines, iter_parallel, parallel_files
from nmt.data.dataset import SIDES, STATS_FILE, ids_file, offsets_file, spm_file, text_file
from nmt.data.tokenizer import Tokenizer, train_sentencepiece
from nmt.errors import NmtError
from nmt.vocab import UNK_ID

CHUNK_LINES = 10_000
SPM_SEED = 1
FILTER_REASONS = ("empty", "too_long", "ratio")


@dataclass(frozen=True)
class PairFilter:
    """Training-pair filters, in the order they are checked (a dropped pair counts once)."""

    max_len: int
    max_len_ratio: float

    def reason(self, n_src: int, n_tgt: int) -> str | None:
        """Why a pair of these subword lengths is dropped, or None to keep it."""
        if n_src == 0 or n_tgt == 0:
            return "empty"
        if max(n_src, n_tgt) > self.max_len:
            return "too_long"
        if max(n_src, n_tgt) / min(n_src, n_tgt) > self.max_len_ratio:
            return "ratio"
        return None

    def describe(self) -> str:
        return (f"an empty side, more than data.max_len={self.max_len} subword tokens on a side, "
                f"or a length ratio above data.max_len_ratio={self.max_len_ratio}")


# ----------------------------------------------------------------------------------------------
# Streaming array output


class _ArrayWriter:
    """Appends chunks to a raw file; `finish` turns it into a .npy without holding it in memory."""

    def __init__(self, path: Path, dtype: Any):
        self.path, self.dtype = path, np.dtype(dtype)
        self.raw_path = path.with_name(path.name + ".raw")
        self.raw = open(self.raw_path, "wb")
        self.count = 0

    def write(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        values.tofile(self.raw)
        self.count += values.size

    def finish(self, block: int = 1 << 24) -> None:
        self.raw.close()
        out = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=(self.count,))
        if self.count:
            raw = np.memmap(self.raw_path, dtype=self.dtype, mode="r", shape=(self.count,))
            for start in range(0, self.count, block):
                out[start: start + block] = raw[start: start + block]
            del raw
        out.flush()
        del out
        self.raw_path.unlink()


class _SideWriter:
    """Flat ids + offsets of one side of one split."""

    def __init__(self, out_dir: Path, split: str, side: str):
        self.ids = _ArrayWriter(out_dir / ids_file(split, side), np.int32)
        self.offsets = _ArrayWriter(out_dir / offsets_file(split, side), np.int64)
        self.offsets.write(np.zeros(1))
        self.total = 0
        self.unk = 0
        self.max_len = 0

    def add(self, sentences: list[list[int]]) -> None:
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        flat = np.fromiter(itertools.chain.from_iterable(sentences), dtype=np.int32, count=int(lengths.sum()))
        self.ids.write(flat)
        self.offsets.write(self.total + np.cumsum(lengths))
        self.total += int(lengths.sum())
        self.unk += int(np.count_nonzero(flat == UNK_ID))
        self.max_len = max(self.max_len, int(lengths.max(initial=0)))

    def finish(self) -> dict[str, int]:
        self.ids.finish()
        self.offsets.finish()
        return {"tokens": self.total, "unk": self.unk, "max_len": self.max_len}


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# ----------------------------------------------------------------------------------------------
# Steps


def _check_config(cfg: Config) -> None:
    data = cfg.data
    required = {"train": "path prefix of the training corpus",
                "valid": "path prefix of the validation corpus", "dir": "output directory"}
    missing = [f"data.{key}: required ({what})" for key, what in required.items() if not getattr(data, key)]
    if data.vocab.joint and data.vocab.tgt_model:
        missing.append("data.vocab.tgt_model: only for separate vocabularies (data.vocab.joint: false); "
                       "a joint vocabulary reuses data.vocab.src_model for both sides")
    if missing:
        raise NmtError(missing[0] if len(missing) == 1 else f"{len(missing)} problems: " + "; ".join(missing))


def _check_output_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite anything unless --force, and even then only a previous preprocess output."""
    if out.exists() and not out.is_dir():
        raise NmtError(f"{out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise NmtError(f"{out}: output directory is not empty (use --force to overwrite)")
    if not (out / STATS_FILE).is_file():
        raise NmtError(f"{out}: --force only replaces a directory written by `nmt preprocess` "
                       f"(no {STATS_FILE} in it); choose another data.dir or empty it yourself")


def _corpus_files(cfg: Config) -> dict[str, tuple[Path, Path]]:
    """split -> (source file, target file), each pair checked for equal, non-zero line counts."""
    data = cfg.data
    prefixes = {"train": data.train, "valid": data.valid, "test": data.test}
    files = {}
    for split, prefix in prefixes.items():
        if not prefix:
            continue
        src_path, tgt_path = parallel_files(prefix, data.src_lang, data.tgt_lang)
        if count_parallel(src_path, tgt_path) == 0:
            raise NmtError(f"{src_path}: empty file (data.{split} needs at least one sentence pair)")
        files[split] = (src_path, tgt_path)
    return files


def _tokenizers(cfg: Config, train_files: tuple[Path, Path], out_dir: Path,
                say: Callable[[str], None]) -> tuple[dict[str, Tokenizer], dict[str, str]]:
    """Train or load the SentencePiece model(s); write spm.src.model and spm.tgt.model into `out_dir`.

    Returns the tokenizer per side and where each came from ("trained" or the reused file).
    """
    vocab = cfg.data.vocab
    lines = dict(zip(SIDES, train_files, strict=True))
    reused = {"src": vocab.src_model, "tgt": vocab.src_model if vocab.joint else vocab.tgt_model}

    def train(side_lines: Iterable[str], side: str, which: str) -> Tokenizer:
        say(f"training a {vocab.type} SentencePiece model of at most {vocab.size} pieces on {which}")
        path = train_sentencepiece(side_lines, out_dir / f"spm.{side}", vocab.size, vocab.type,
                                   vocab.character_coverage, vocab.sample_sentences, seed=SPM_SEED)
        return Tokenizer.load(path)

    if vocab.joint:
        if reused["src"]:
            shared = Tokenizer.load(reused["src"], key="data.vocab.src_model")
        else:
            both = itertools.chain(iter_lines(lines["src"]), iter_lines(lines["tgt"]))
            shared = train(both, "src", "both sides")
        tokenizers = {"src": shared, "tgt": shared}
    else:
        tokenizers = {side: Tokenizer.load(reused[side], key=f"data.vocab.{side}_model") if reused[side]
                      else train(iter_lines(lines[side]), side, f"the {side} side") for side in SIDES}
    for side, tokenizer in tokenizers.items():
        tokenizer.save(out_dir / spm_file(side))
    return tokenizers, {side: str(reused[side]) if reused[side] else "trained" for side in SIDES}


def _binarize_split(split: str, files: tuple[Path, Path], tokenizers: dict[str, Tokenizer], out_dir: Path,
                    pair_filter: PairFilter | None, keep_text: bool, quiet: bool) -> dict[str, Any]:
    """Encode one split into `out_dir`; returns its statistics."""
    writers = {side: _SideWriter(out_dir, split, side) for side in SIDES}
    filtered = dict.fromkeys(FILTER_REASONS, 0)
    read = 0
    with contextlib.ExitStack() as stack:
        texts = {side: stack.enter_context(open(out_dir / text_file(split, side), "w", encoding="utf-8",
                                                newline="\n")) for side in SIDES} if keep_text else {}
        bar = stack.enter_context(tqdm(desc=f"encoding {split}", unit=" pairs", disable=quiet,
                                       file=sys.stderr, leave=False))
        for chunk in _chunks(iter_parallel(*files), CHUNK_LINES):
            encoded = {side: tokenizers[side].encode_batch([pair[k] for pair in chunk])
                       for k, side in enumerate(SIDES)}
            keep = list(range(len(chunk)))
            if pair_filter is not None:
                pairs = zip(encoded["src"], encoded["tgt"], strict=True)
                reasons = [pair_filter.reason(len(s), len(t)) for s, t in pairs]
                for reason in filter(None, reasons):
                    filtered[reason] += 1
                keep = [i for i, reason in enumerate(reasons) if reason is None]
            for k, side in enumerate(SIDES):
                writers[side].add([encoded[side][i] for i in keep])
                if keep_text:
                    texts[side].write("".join(chunk[i][k] + "\n" for i in keep))
            read += len(chunk)
            bar.update(len(chunk))
    stats: dict[str, Any] = {"pairs_read": read, "pairs": read - sum(filtered.values())}
    if pair_filter is not None:
        stats["filtered"] = filtered
    for side, path in zip(SIDES, files, strict=True):
        stats[f"{side}_file"] = str(path)
        stats.update({f"{side}_{key}": value for key, value in writers[side].finish().items()})
    return stats


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` directory to `out`, replacing a previous `out` only now."""
    if out.is_dir():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------


def preprocess(cfg: Config, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Binarize `cfg.data` into `cfg.data.dir` (the `nmt preprocess` command); returns the statistics."""
    _check_config(cfg)
    data = cfg.data
    out = Path(data.dir)
    _check_output_dir(out, force)
    files = _corpus_files(cfg)

    def say(message: str) -> None:
        if not quiet:
            tqdm.write(message, file=sys.stderr)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
    except OSError as e:
        raise NmtError(f"{out}: cannot create the output directory ({e.strerror})") from None
    try:
        tokenizers, origin = _tokenizers(cfg, files["train"], tmp, say)
        pair_filter = PairFilter(data.max_len, data.max_len_ratio)
        splits = {split: _binarize_split(split, split_files, tokenizers, tmp,
                                         pair_filter if split == "train" else None, split != "train", quiet)
                  for split, split_files in files.items()}
        if splits["train"]["pairs"] == 0:
            raise NmtError(f"{files['train'][0]}: no training pairs left after filtering out pairs with "
                           f"{pair_filter.describe()}")
        stats = _stats(cfg, splits, tokenizers, origin, out)
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        _commit(tmp, out)
    except OSError as e:
        raise NmtError(f"{out}: cannot write the data directory ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {out}: " + ", ".join(f"{split} {s['pairs']:,} pairs" for split, s in splits.items()))
    return stats


def _stats(cfg: Config, splits: dict[str, Any], tokenizers: dict[str, Tokenizer], origin: dict[str, str],
           out: Path) -> dict[str, Any]:
    config = cfg.data.vocab
    vocab: dict[str, Any] = {"joint": config.joint, "type": config.type, "requested_size": config.size}
    for side in SIDES:
        vocab[side] = {"size": tokenizers[side].vocab_size, "fingerprint": tokenizers[side].fingerprint,
                       "model": origin[side]}
    summary = {"dir": str(out), **{f"{split}_pairs": s["pairs"] for split, s in splits.items()},
               "train_filtered": sum(splits["train"]["filtered"].values()),
               "src_vocab": vocab["src"]["size"], "tgt_vocab": vocab["tgt"]["size"]}
    return {"summary": summary, "splits": splits, "vocab": vocab, "config": {"data": to_dict(cfg.data)},
            "nmt_version": __version__}
