"""SentencePiece: training from an iterator, loading with special-id checks, encode/decode.

Every model we train or accept uses the ids of nmt/vocab.py (pad=0, unk=1, bos=2, eos=3).
The source side of every encoder input ends with EOS (`encode_source`); training batches and
the translator build it the same way.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from nmt.errors import NmtError
from nmt.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
SOURCE_END = EOS_ID  # appended to every source sentence the encoder sees
MIN_SAMPLE_SENTENCES = 100  # SentencePiece refuses input_sentence_size in 1..100


class Tokenizer:
    """A loaded SentencePiece model with our special ids."""

    def __init__(self, model_bytes: bytes, name: str = "<memory>"):
        self.name = name
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except (RuntimeError, TypeError):
            self.sp = None
        if self.sp is None or self.sp.get_piece_size() == 0:
            raise NmtError(f"{name}: not a SentencePiece model")
        self.model_bytes = model_bytes
        self.fingerprint = hashlib.sha256(model_bytes).hexdigest()
        self._special = frozenset(SPECIAL_IDS.values()) - {UNK_ID}

    @classmethod
    def load(cls, path: str | Path, key: str | None = None, missing_hint: str = "") -> Tokenizer:
        """Read a model file and check its special ids; `key` (a config key) prefixes errors and
        `missing_hint` is added to the error for a missing file (where the caller looked, and why)."""
        where = f"{key}: {path}" if key else str(path)
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise NmtError(f"{where}: SentencePiece model not found{missing_hint}") from None
        except OSError as e:
            raise NmtError(f"{where}: cannot read ({e.strerror})") from None
        tokenizer = cls(data, where)
        tokenizer.check_special_ids()
        return tokenizer

    def check_special_ids(self) -> None:
        """NmtError unless pad/unk/bos/eos have the ids of nmt/vocab.py."""
        sp = self.sp
        actual = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
        if actual != SPECIAL_IDS:
            want = ", ".join(f"{k}={v}" for k, v in SPECIAL_IDS.items())
            got = ", ".join(f"{k}={v}" for k, v in actual.items())
            raise NmtError(f"{self.name}: special token ids must be {want} (this model has {got}); "
                           f"retrain it with pad_id=0 unk_id=1 bos_id=2 eos_id=3")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Subword ids of one sentence, without BOS/EOS."""
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Subword ids of many sentences (SentencePiece's threaded batch encoder)."""
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pad/bos/eos are dropped, unknown pieces render as SentencePiece's ' ⁇ '."""
        return self.sp.decode([int(i) for i in ids if int(i) not in self._special])

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_bytes)


def encode_source(tokenizer: Tokenizer, text: str) -> list[int]:
    """What the encoder reads for `text`: its subword ids followed by EOS (never empty)."""
    return with_source_end(tokenizer.encode(text))


def with_source_end(ids: Sequence[int]) -> list[int]:
    """Source token ids -> encoder input (ids + EOS); used for stored data and fresh text alike."""
    return [*(int(i) for i in ids), SOURCE_END]


class _Guarded:
    """Wraps a line iterator handed to SentencePiece's C++ trainer: our NmtErrors would be flattened
    into a RuntimeError there, so the first error stops iteration and is re-raised afterwards."""

    def __init__(self, lines: Iterable[str]):
        self.lines = iter(lines)
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.lines
        except BaseException as e:  # re-raised by train_sentencepiece
            self.error = e


def train_sentencepiece(lines: Iterable[str], model_prefix: str | Path, vocab_size: int, model_type: str,
                        character_coverage: float = 1.0, sample_sentences: int = 1_000_000,
                        seed: int = 1) -> Path:
    """Train a SentencePiece model in-process on `lines`; writes and returns `{model_prefix}.model`.

    `vocab_size` is an upper bound (a small corpus yields fewer pieces rather than an error);
    at most `sample_sentences` lines, sampled uniformly, are used.
    """
    if sample_sentences <= MIN_SAMPLE_SENTENCES:
        raise NmtError(f"data.vocab.sample_sentences: must be > {MIN_SAMPLE_SENTENCES} (SentencePiece's "
                       f"minimum), got {sample_sentences}")
    guarded = _Guarded(lines)
    buffer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(guarded), model_writer=buffer, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            input_sentence_size=sample_sentences, shuffle_input_sentence=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            hard_vocab_limit=False, minloglevel=2, num_threads=min(16, os.cpu_count() or 1),
        )
    except RuntimeError as e:
        if guarded.error is not None:
            raise guarded.error from None
        raise NmtError(f"data.vocab: SentencePiece training failed: {_spm_reason(e)}") from None
    if guarded.error is not None:
        raise guarded.error
    path = Path(f"{model_prefix}.model")
    path.write_bytes(buffer.getvalue())
    return path


def _spm_reason(error: RuntimeError) -> str:
    """SentencePiece's message without its status code, source location and failed condition."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^(?:[A-Z_]+: )?(?:\S+\.cc\(\d+\) \[.*?\] )?", "", text) or text
