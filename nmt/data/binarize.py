"""`nmt preprocess`: SentencePiece (trained or reused), encoding, filtering, binarized output.

Everything is written into a temporary directory next to `data.dir` and renamed into place at the
end, so a failure never leaves a half-written data directory. Corpora are streamed, so memory does
not grow with the corpus: SentencePiece trains on a sample of at most data.vocab.sample_sentences
lines; encoding and filtering run in data.workers processes on chunks of CHUNK_LINES pairs, with a
bounded number of chunks in flight, and come back in order; arrays are appended to disk as they
arrive, in shards of data.shard_size sentences (see nmt/data/dataset.py).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import multiprocessing
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
import sentencepiece as spm
from tqdm import tqdm

from nmt import __version__
from nmt.config import Config, SamplingConfig, to_dict
from nmt.data.corpus import count_parallel, decode_line, iter_lines, mismatch_error, parallel_files, reading
from nmt.data.dataset import SIDES, STATS_FILE, ids_file, offsets_file, sampled_split, spm_file, text_file
from nmt.data.tokenizer import Tokenizer, train_sentencepiece
from nmt.errors import NmtError
from nmt.vocab import UNK_ID

CHUNK_LINES = 10_000
SPM_SEED = 1
FILTER_REASONS = ("empty", "too_long", "ratio")
DEFAULT_MAX_WORKERS = 4
IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker: enough to keep it busy, bounded memory


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

    def codes(self, n_src: np.ndarray, n_tgt: np.ndarray) -> np.ndarray:
        """`reason` for many pairs at once: 0 = keep, k = FILTER_REASONS[k - 1]."""
        longer, shorter = np.maximum(n_src, n_tgt), np.minimum(n_src, n_tgt)
        codes = np.zeros(len(longer), dtype=np.int8)
        with np.errstate(divide="ignore", invalid="ignore"):
            codes[longer / shorter > self.max_len_ratio] = 3
        codes[longer > self.max_len] = 2
        codes[shorter == 0] = 1
        return codes


# ----------------------------------------------------------------------------------------------
# Streaming array output


class _NpyWriter:
    """Appends values to a 1-d .npy file whose header (fixed size) is written last, when the count is known."""

    HEADER_BYTES = 128  # magic (6) + version (2) + header length (2) + the header dict, space-padded

    def __init__(self, path: Path, dtype: Any):
        self.path, self.dtype = path, np.dtype(dtype)
        self.file = open(path, "wb")
        self.file.write(b"\0" * self.HEADER_BYTES)
        self.count = 0

    def write(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        values.tofile(self.file)
        self.count += values.size

    def finish(self) -> None:
        header = (f"{{'descr': {np.lib.format.dtype_to_descr(self.dtype)!r}, 'fortran_order': False, "
                  f"'shape': ({self.count},), }}")
        body = header.ljust(self.HEADER_BYTES - 10 - 1) + "\n"
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1"))
        self.file.close()


class _SideWriter:
    """Flat ids + offsets of one side of one split, in shards of `shard_size` sentences.

    A split that fits one shard gets the plain names ({split}.{side}.ids.npy); otherwise shard k is
    {split}.{side}.{k:05d}.ids.npy (names are settled in `finish`).
    """

    def __init__(self, out_dir: Path, split: str, side: str, shard_size: int):
        self.out_dir, self.split, self.side, self.shard_size = out_dir, split, side, shard_size
        self.shards: list[tuple[_NpyWriter, _NpyWriter]] = []
        self.in_shard = 0  # sentences in the current shard
        self.shard_tokens = 0  # tokens in the current shard
        self.total = 0
        self.unk = 0
        self.max_len = 0

    def _open_shard(self) -> None:
        k = len(self.shards)
        ids = _NpyWriter(self.out_dir / f".{self.split}.{self.side}.{k}.ids.partial", np.int32)
        offsets = _NpyWriter(self.out_dir / f".{self.split}.{self.side}.{k}.offsets.partial", np.int64)
        offsets.write(np.zeros(1))
        self.shards.append((ids, offsets))
        self.in_shard = self.shard_tokens = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append sentences given as their concatenated ids and their lengths."""
        self.total += len(flat)
        self.unk += int(np.count_nonzero(flat == UNK_ID))
        self.max_len = max(self.max_len, int(lengths.max(initial=0)))
        sentence = token = 0
        while sentence < len(lengths):
            if not self.shards or self.in_shard >= self.shard_size:
                self._open_shard()
            ids, offsets = self.shards[-1]
            part = lengths[sentence: sentence + self.shard_size - self.in_shard]
            ends = np.cumsum(part)
            n_tokens = int(ends[-1])
            ids.write(flat[token: token + n_tokens])
            offsets.write(self.shard_tokens + ends)
            self.in_shard += len(part)
            self.shard_tokens += n_tokens
            sentence += len(part)
            token += n_tokens

    def finish(self) -> dict[str, int]:
        if not self.shards:
            self._open_shard()
        single = len(self.shards) == 1
        for k, (ids, offsets) in enumerate(self.shards):
            shard = None if single else k
            for writer, name in ((ids, ids_file(self.split, self.side, shard)),
                                 (offsets, offsets_file(self.split, self.side, shard))):
                writer.finish()
                os.replace(writer.path, self.out_dir / name)
        return {"tokens": self.total, "unk": self.unk, "max_len": self.max_len, "shards": len(self.shards)}


# ----------------------------------------------------------------------------------------------
# Encoding, in this process or in worker processes


@dataclass(frozen=True)
class _Chunk:
    """Consecutive raw lines (bytes, line breaks included) of both sides, from line `first` on.

    Lines travel undecoded: decoding and checking them is part of the work the workers share.
    """

    names: tuple[str, str]
    first: int
    raw: tuple[list[bytes], list[bytes]]

    def __len__(self) -> int:
        return len(self.raw[0])


def _raw_chunks(files: tuple[Path, Path], size: int) -> Iterator[_Chunk]:
    """The parallel corpus `files` in chunks of `size` raw line pairs."""
    names = (str(files[0]), str(files[1]))
    with reading(files[0]) as src, reading(files[1]) as tgt:
        first = 1
        while True:
            raw = (list(itertools.islice(src, size)), list(itertools.islice(tgt, size)))
            if len(raw[0]) != len(raw[1]):  # counted equal before; the files changed since
                n = first - 1
                raise mismatch_error(files[0], n + len(raw[0]), files[1], n + len(raw[1]))
            if not raw[0]:
                return
            yield _Chunk(names, first, raw)
            first += len(raw[0])


Flat = tuple[np.ndarray, np.ndarray]  # the concatenated ids of some sentences, and their lengths


def _lengths(sentences: list[list[int]]) -> np.ndarray:
    return np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))


def _flatten(sentences: list[list[int]], lengths: np.ndarray) -> np.ndarray:
    """The concatenated ids of `sentences`, whose `lengths` are known."""
    return np.fromiter(itertools.chain.from_iterable(sentences), dtype=np.int32, count=int(lengths.sum()))


def _flat(sentences: list[list[int]]) -> Flat:
    lengths = _lengths(sentences)
    return _flatten(sentences, lengths), lengths


@dataclass
class _Encoded:
    """One chunk, encoded and filtered: per side the concatenated ids and lengths of the kept pairs."""

    flat: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    filtered: dict[str, int]
    texts: dict[str, list[str]] | None  # the kept lines, when asked for (valid/test)
    samples: list[dict[str, Flat]]  # per sampled copy, per side: the kept pairs' sampled segmentation


def _sampling_seed(first_line: int, copy: int, side: int) -> int:
    """SentencePiece's sampling seed for one side of copy `copy` of the chunk starting at `first_line`:
    a function of these only, so the sampled copies do not depend on the number of workers."""
    return int(np.random.SeedSequence([SPM_SEED, first_line, copy, side]).generate_state(1)[0])


def _sample(tokenizer: Tokenizer, texts: list[str], alpha: float, seed: int) -> list[list[int]]:
    """A sampled segmentation of `texts` (BPE-dropout for a bpe model, subword regularization for a unigram
    one), reproducible from `seed` (one thread: SentencePiece's threads would draw in any order)."""
    spm.set_random_generator_seed(seed)
    return tokenizer.sp.encode(texts, enable_sampling=True, alpha=alpha, nbest_size=-1, num_threads=1)


def _encode_chunk(tokenizers: dict[str, Tokenizer], chunk: _Chunk, pair_filter: PairFilter | None,
                  keep_text: bool, threads: int, sampling: SamplingConfig | None = None) -> _Encoded:
    texts = {side: [decode_line(raw, chunk.names[k], chunk.first + i) for i, raw in enumerate(chunk.raw[k])]
             for k, side in enumerate(SIDES)}
    encoded = {side: tokenizers[side].sp.encode(texts[side], num_threads=threads) for side in SIDES}
    lengths = {side: _lengths(encoded[side]) for side in SIDES}
    keep, filtered = None, {}
    if pair_filter is not None:
        codes = pair_filter.codes(lengths["src"], lengths["tgt"])
        counts = np.bincount(codes, minlength=len(FILTER_REASONS) + 1)
        filtered = {reason: int(counts[k + 1]) for k, reason in enumerate(FILTER_REASONS)}
        if counts[0] != len(chunk):
            keep = np.flatnonzero(codes == 0)
    flat = {}
    for side in SIDES:
        if keep is not None:
            encoded[side] = [encoded[side][i] for i in keep]
            texts[side] = [texts[side][i] for i in keep]
            lengths[side] = lengths[side][keep]
        flat[side] = _flatten(encoded[side], lengths[side])
    samples = []  # the filter's decisions hold for every copy: it judged the plain segmentation
    for copy in range(1, (sampling.copies if sampling is not None else 0) + 1):
        samples.append({side: _flat(_sample(tokenizers[side], texts[side], sampling.alpha,
                                               _sampling_seed(chunk.first, copy, k)))
                        for k, side in enumerate(SIDES)})
    return _Encoded(flat, lengths, filtered, texts if keep_text else None, samples)


_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}


def _worker_init(models: dict[str, bytes]) -> None:
    loaded: dict[bytes, Tokenizer] = {}
    for side, model in models.items():
        _WORKER_TOKENIZERS[side] = loaded.setdefault(model, Tokenizer(model, f"spm.{side}.model"))


def _worker_encode(chunk: _Chunk, pair_filter: PairFilter | None, keep_text: bool,
                   sampling: SamplingConfig | None) -> _Encoded:
    return _encode_chunk(_WORKER_TOKENIZERS, chunk, pair_filter, keep_text, threads=1, sampling=sampling)


def _start_method() -> Any:
    """fork where it is safe (Linux): workers only run SentencePiece and NumPy, never touching what other
    threads of the caller (torch, tqdm) hold, and fork needs no `if __name__ == "__main__":` guard in the
    caller's script, as spawn does (macOS, Windows)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") and "fork" in methods
                                       else "spawn")


def default_workers() -> int:
    """min(DEFAULT_MAX_WORKERS, the CPUs this process may run on)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(DEFAULT_MAX_WORKERS, cpus))


class _Encoder:
    """Encodes a stream of chunks in order, in `workers` processes (started on first need) or in this one.

    At most IN_FLIGHT_PER_WORKER chunks per worker are queued, so memory does not grow with the corpus
    when reading is faster than encoding.
    """

    def __init__(self, tokenizers: dict[str, Tokenizer], workers: int):
        self.tokenizers, self.workers = tokenizers, workers
        self.pool: Any = None

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def map(self, chunks: Iterable[_Chunk], pair_filter: PairFilter | None, keep_text: bool,
            n_chunks: int, sampling: SamplingConfig | None = None) -> Iterator[tuple[_Chunk, _Encoded]]:
        if self.workers <= 1 or n_chunks <= 1:  # SentencePiece's own threads still encode each chunk
            for chunk in chunks:
                yield chunk, _encode_chunk(self.tokenizers, chunk, pair_filter, keep_text, threads=-1,
                                           sampling=sampling)
            return
        if self.pool is None:
            models = {side: tok.model_bytes for side, tok in self.tokenizers.items()}
            self.pool = _start_method().Pool(self.workers, _worker_init, (models,))
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append((chunk, self.pool.apply_async(_worker_encode, (chunk, pair_filter, keep_text,
                                                                          sampling))))
            if len(pending) >= self.workers * IN_FLIGHT_PER_WORKER:
                chunk, result = pending.popleft()
                yield chunk, result.get()
        while pending:
            chunk, result = pending.popleft()
            yield chunk, result.get()


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


def _corpus_files(cfg: Config) -> tuple[dict[str, tuple[Path, Path]], dict[str, int]]:
    """split -> (source file, target file), each pair checked for equal, non-zero line counts; and
    split -> its line count."""
    data = cfg.data
    prefixes = {"train": data.train, "valid": data.valid, "test": data.test}
    files, counts = {}, {}
    for split, prefix in prefixes.items():
        if not prefix:
            continue
        src_path, tgt_path = parallel_files(prefix, data.src_lang, data.tgt_lang)
        counts[split] = count_parallel(src_path, tgt_path)
        if counts[split] == 0:
            raise NmtError(f"{src_path}: empty file (data.{split} needs at least one sentence pair)")
        files[split] = (src_path, tgt_path)
    return files, counts


def _sample_lines(paths: list[Path], total: int, sample: int, seed: int = SPM_SEED) -> Iterator[str]:
    """The lines of `paths` (`total` of them), or when there are more than `sample`, each with probability
    sample / total -- decided on the raw bytes, so that only the sampled lines are decoded and handed to
    SentencePiece (which keeps at most `sample` of what it is given)."""
    if total <= sample:
        for path in paths:
            yield from iter_lines(path)
        return
    rng = np.random.default_rng(seed)
    keep = sample / total
    for path in paths:
        with reading(path) as f:
            before = 0
            while block := list(itertools.islice(f, 1 << 16)):
                for i in np.flatnonzero(rng.random(len(block)) < keep):
                    yield decode_line(block[i], str(path), before + int(i) + 1)
                before += len(block)


def _tokenizers(cfg: Config, train_files: tuple[Path, Path], n_train: int, out_dir: Path,
                say: Callable[[str], None]) -> tuple[dict[str, Tokenizer], dict[str, str]]:
    """Train or load the SentencePiece model(s); write spm.src.model and spm.tgt.model into `out_dir`.

    Returns the tokenizer per side and where each came from ("trained" or the reused file).
    """
    vocab = cfg.data.vocab
    lines = dict(zip(SIDES, train_files, strict=True))
    reused = {"src": vocab.src_model, "tgt": vocab.src_model if vocab.joint else vocab.tgt_model}

    def train(side_lines: Iterable[str], side: str, which: str) -> Tokenizer:
        total = n_train * (2 if vocab.joint else 1)
        if total > vocab.sample_sentences:
            which += f" (a sample of about {vocab.sample_sentences:,} of {total:,} lines)"
        say(f"training a {vocab.type} SentencePiece model of at most {vocab.size} pieces on {which}")
        path = train_sentencepiece(side_lines, out_dir / f"spm.{side}", vocab.size, vocab.type,
                                   vocab.character_coverage, vocab.sample_sentences, seed=SPM_SEED)
        return Tokenizer.load(path)

    if vocab.joint:
        if reused["src"]:
            shared = Tokenizer.load(reused["src"], key="data.vocab.src_model")
        else:
            both = _sample_lines([lines["src"], lines["tgt"]], 2 * n_train, vocab.sample_sentences)
            shared = train(both, "src", "both sides")
        tokenizers = {"src": shared, "tgt": shared}
    else:
        tokenizers = {side: Tokenizer.load(reused[side], key=f"data.vocab.{side}_model") if reused[side]
                      else train(_sample_lines([lines[side]], n_train, vocab.sample_sentences), side,
                                 f"the {side} side") for side in SIDES}
    for side, tokenizer in tokenizers.items():
        tokenizer.save(out_dir / spm_file(side))
    return tokenizers, {side: str(reused[side]) if reused[side] else "trained" for side in SIDES}


def _binarize_split(split: str, files: tuple[Path, Path], n_pairs: int, encoder: _Encoder, out_dir: Path,
                    pair_filter: PairFilter | None, keep_text: bool, shard_size: int, quiet: bool,
                    sampling: SamplingConfig | None = None) -> dict[str, Any]:
    """Encode one split into `out_dir` (and, with `sampling`, its sampled copies); returns its statistics."""
    writers = {side: _SideWriter(out_dir, split, side, shard_size) for side in SIDES}
    copies = sampling.copies if sampling is not None else 0
    sampled = [{side: _SideWriter(out_dir, sampled_split(k), side, shard_size) for side in SIDES}
               for k in range(1, copies + 1)]
    filtered = dict.fromkeys(FILTER_REASONS, 0)
    read = 0
    with contextlib.ExitStack() as stack:
        texts = {side: stack.enter_context(open(out_dir / text_file(split, side), "w", encoding="utf-8",
                                                newline="\n")) for side in SIDES} if keep_text else {}
        bar = stack.enter_context(tqdm(desc=f"encoding {split}", unit=" pairs", disable=quiet, total=n_pairs,
                                       file=sys.stderr, leave=False))
        chunks = _raw_chunks(files, CHUNK_LINES)
        for chunk, encoded in encoder.map(chunks, pair_filter, keep_text, n_chunks=-(-n_pairs // CHUNK_LINES),
                                          sampling=sampling):
            for reason, count in encoded.filtered.items():
                filtered[reason] += count
            for copy_writers, sample in zip(sampled, encoded.samples, strict=True):
                for side in SIDES:
                    copy_writers[side].add(*sample[side])
            for side in SIDES:
                writers[side].add(encoded.flat[side], encoded.lengths[side])
                if keep_text:
                    texts[side].write("".join(line + "\n" for line in encoded.texts[side]))
            read += len(chunk)
            bar.update(len(chunk))
    stats: dict[str, Any] = {"pairs_read": read, "pairs": read - sum(filtered.values())}
    if pair_filter is not None:
        stats["filtered"] = filtered
    for side, path in zip(SIDES, files, strict=True):
        stats[f"{side}_file"] = str(path)
        side_stats = writers[side].finish()
        stats["shards"] = side_stats.pop("shards")
        stats.update({f"{side}_{key}": value for key, value in side_stats.items()})
    if copies:
        stats["sampled"] = {"copies": copies, "alpha": sampling.alpha}
        for side in SIDES:
            stats["sampled"][f"{side}_tokens"] = [copy_writers[side].finish()["tokens"] for copy_writers in sampled]
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
    files, counts = _corpus_files(cfg)

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
        tokenizers, origin = _tokenizers(cfg, files["train"], counts["train"], tmp, say)
        pair_filter = PairFilter(data.max_len, data.max_len_ratio)
        with _Encoder(tokenizers, data.workers or default_workers()) as encoder:
            splits = {split: _binarize_split(split, split_files, counts[split], encoder, tmp,
                                             pair_filter if split == "train" else None, split != "train",
                                             data.shard_size, quiet, data.sampling if split == "train" else None)
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
    sampled = f" (+{data.sampling.copies} sampled segmentations)" if data.sampling.copies else ""
    say(f"wrote {out}: " + ", ".join(f"{split} {s['pairs']:,} pairs{sampled if split == 'train' else ''}"
                                     for split, s in splits.items()))
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
