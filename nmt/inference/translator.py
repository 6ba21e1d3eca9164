"""Decoding many sentences in length-sorted batches, keeping input order; the text-in/text-out Translator.

Output length limit defaults (fairseq's `max_len_a * src_len + max_len_b`): a = 1.5, b = 10, where
src_len counts the source's subwords and its EOS. Translations are rarely 1.5x longer (in subwords)
than their source; the constant lets short inputs produce short outputs without being cut off, while
a degenerate model that never emits EOS stops soon.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nmt.config import Component, from_dict
from nmt.data.tokenizer import Tokenizer, encode_source
from nmt.device import resolve_device
from nmt.errors import NmtError
from nmt.inference import DEFAULT_BATCH_SIZE
from nmt.inference.numerics import check_quantize, decoding_model
from nmt.inference.search import Hypothesis, beam_search, greedy_search, max_output_lengths
from nmt.models.zoo import build_model
from nmt.training.checkpoint import load_checkpoint
from nmt.training.precision import resolve_precision
from nmt.vocab import PAD_ID

DEFAULT_MAX_LEN_A = 1.5
DEFAULT_MAX_LEN_B = 10
DEFAULT_MAX_INPUT_TOKENS = 1024  # longer inputs are truncated (with a warning); EOS included
CHECKPOINT_NAMES = ("best.pt", "last.pt")  # what a run directory is searched for, in this order
SPM_SRC, SPM_TGT = "spm.src.model", "spm.tgt.model"
REQUIRED_KEYS = ("config", "model", "src_vocab_size", "tgt_vocab_size", "vocab")


def decode_ids(model, sources: Sequence[Sequence[int]], *, beam: int = 5, nbest: int = 1, lenpen: float = 1.0,
               max_len_a: float = DEFAULT_MAX_LEN_A, max_len_b: float = DEFAULT_MAX_LEN_B,
               max_len_cap: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
               device: torch.device | str | None = None, progress: bool = False, precision: str = "fp32",
               quantize: str = "none") -> list[list[Hypothesis]]:
    """Translate encoder inputs (token ids, EOS included) -> per source its `nbest` hypotheses, best first,
    in input order.

    Sources are sorted by length (longest first, so memory peaks early) and cut into batches of
    `batch_size` sentences; beam 1 is greedy search. An empty source gives one empty hypothesis
    (score 0) without calling the model. Runs in eval mode under `torch.inference_mode()` and puts
    the model back in the mode it was in. `precision` and `quantize` choose how the model computes
    (`nmt.inference.numerics`: bf16 or int8 decode with a converted copy); scores stay fp32.
    """
    if beam < 1 or batch_size < 1:
        raise NmtError(f"beam ({beam}) and batch size ({batch_size}) must be at least 1")
    if not 1 <= nbest <= beam:
        raise NmtError(f"--nbest {nbest} must be between 1 and --beam {beam}")
    device = _model_device(model) if device is None else torch.device(device)
    results: list[list[Hypothesis]] = [[Hypothesis([], 0.0, 0.0)] for _ in sources]
    order = sorted((i for i, ids in enumerate(sources) if len(ids) > 0), key=lambda i: -len(sources[i]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), decoding_model(model, precision, device, quantize) as decoder:
            bar = tqdm(batches, disable=not progress or None, file=sys.stderr, unit="batch", leave=False)
            for batch in bar:
                src, lengths = pad_sources([sources[i] for i in batch], device)
                max_lens = max_output_lengths(lengths, max_len_a, max_len_b, max_len_cap)
                if beam == 1:
                    found = [[hyp] for hyp in greedy_search(decoder, src, max_lens, lenpen=lenpen)]
                else:
                    found = beam_search(decoder, src, beam, max_lens, nbest=nbest, lenpen=lenpen)
                for i, hyps in zip(batch, found, strict=True):
                    results[i] = hyps
    finally:
        model.train(was_training)
    return results


def pad_sources(sources: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists with PAD -> (src [B, S] long, lengths [B] long), both on `device`."""
    lengths = torch.tensor([len(ids) for ids in sources], dtype=torch.long)
    src = torch.full((len(sources), int(lengths.max()) if len(sources) else 0), PAD_ID, dtype=torch.long)
    for row, ids in enumerate(sources):
        src[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return src.to(device), lengths.to(device)


def _model_device(model) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Text in, text out


@dataclass
class Translation(Hypothesis):
    """A hypothesis with its detokenized text."""

    text: str = ""


class Translator:
    """A trained model with its SentencePiece models: lines of text -> translations, in input order."""

    def __init__(self, model, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer, device: torch.device,
                 max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS, max_output_tokens: int | None = None):
        self.model = model.to(device).eval()
        self.src_tokenizer = src_tokenizer
        self.tgt_tokenizer = tgt_tokenizer
        self.device = device
        self.max_input_tokens = max(max_input_tokens, 2)  # room for one token + EOS
        self.max_output_tokens = max_output_tokens

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Translator:
        """From a run directory (best.pt, else last.pt) or a checkpoint file; the SentencePiece models
        are read from the checkpoint's directory and must be the ones it was trained with."""
        device = resolve_device(device)
        checkpoint_path = find_checkpoint(Path(path))
        ckpt = load_checkpoint(checkpoint_path, map_location="cpu")
        missing = [key for key in REQUIRED_KEYS if key not in ckpt]
        if missing:
            raise NmtError(f"{checkpoint_path}: not a model checkpoint (missing {', '.join(missing)})")
        cfg = from_dict(ckpt["config"], source=f"{checkpoint_path} (saved config)")
        run_dir = checkpoint_path.parent
        src_tok = _matching_tokenizer(run_dir / SPM_SRC, ckpt["vocab"].get("src"))
        tgt_tok = _matching_tokenizer(run_dir / SPM_TGT, ckpt["vocab"].get("tgt"))
        model = build_model(cfg.model, ckpt["src_vocab_size"], ckpt["tgt_vocab_size"])
        try:
            model.load_state_dict(ckpt["model"])
        except (RuntimeError, TypeError, AttributeError, KeyError) as e:
            detail = " ".join(str(e).split())[:300]
            raise NmtError(f"{checkpoint_path}: the saved weights do not fit the model its config describes "
                           f"({detail})") from None
        encoder_limit = learned_position_limit(cfg.model.encoder)
        decoder_limit = learned_position_limit(cfg.model.decoder)
        return cls(model, src_tok, tgt_tok, device,
                   max_input_tokens=min(DEFAULT_MAX_INPUT_TOKENS, encoder_limit or DEFAULT_MAX_INPUT_TOKENS),
                   max_output_tokens=None if decoder_limit is None else decoder_limit - 1)  # BOS takes one

    def encode(self, lines: Sequence[str], quiet: bool = False) -> list[list[int]]:
        """Encoder inputs of `lines` ([] for empty or whitespace-only lines); over-long ones are truncated
        to `max_input_tokens` (EOS kept) with a warning on stderr unless `quiet`."""
        sources = []
        for number, line in enumerate(lines, start=1):
            ids = encode_source(self.src_tokenizer, line) if line.strip() else []
            if len(ids) > self.max_input_tokens:
                if not quiet:
                    print(f"warning: line {number}: {len(ids)} source tokens, truncated to the first "
                          f"{self.max_input_tokens}", file=sys.stderr)
                ids = ids[: self.max_input_tokens - 1] + ids[-1:]
            sources.append(ids)
        return sources

    def translate(self, lines: Sequence[str], *, beam: int = 5, nbest: int = 1, lenpen: float = 1.0,
                  max_len_a: float = DEFAULT_MAX_LEN_A, max_len_b: float = DEFAULT_MAX_LEN_B,
                  batch_size: int = DEFAULT_BATCH_SIZE, quiet: bool = False, precision: str = "fp32",
                  quantize: str = "none") -> list[list[Translation]]:
        """Per input line its `nbest` translations, best first, in input order (see `decode_ids`);
        empty or whitespace-only lines give one empty translation."""
        precision = resolve_precision(precision, self.device, key="--precision")
        check_quantize(quantize, precision, self.device)  # before any work
        hyps = decode_ids(self.model, self.encode(lines, quiet), beam=beam, nbest=nbest, lenpen=lenpen,
                          max_len_a=max_len_a, max_len_b=max_len_b, max_len_cap=self.max_output_tokens,
                          batch_size=batch_size, device=self.device, progress=not quiet,
                          precision=precision, quantize=quantize)
        detokenize = self.tgt_tokenizer.decode
        return [[Translation(h.tokens, h.score, h.log_prob, detokenize(h.tokens)) for h in per_line]
                for per_line in hyps]


def find_checkpoint(path: Path) -> Path:
    """`path` itself if it is a file, else the first of best.pt, last.pt in that run directory."""
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise NmtError(f"{path}: no {' or '.join(CHECKPOINT_NAMES)} in this run directory")
    if not path.exists():
        raise NmtError(f"{path}: model not found (give a run directory or a .pt checkpoint)")
    return path


def _matching_tokenizer(path: Path, fingerprint: str | None) -> Tokenizer:
    tokenizer = Tokenizer.load(path, missing_hint=" (a checkpoint's tokenizers are read from its own "
                                                  "directory: keep it in its run directory)")
    if tokenizer.fingerprint != fingerprint:
        raise NmtError(f"{path}: SentencePiece model does not match the checkpoint's vocabulary")
    return tokenizer


def learned_position_limit(options: Component) -> int | None:
    """Longest sequence a component can read when its positions are a learned table (else None)."""
    if getattr(options, "positions", None) == "learned":
        return getattr(options, "max_positions", None)
    return None


def format_output(results: Sequence[Sequence[Translation]], nbest: int = 1,
                  scores: bool = False) -> list[str]:
    """The CLI's lines: exactly `nbest` consecutive lines per input (missing hypotheses -> empty lines),
    each `text` or, with `scores`, `score<TAB>text` (score to 4 decimals)."""
    lines = []
    for per_input in results:
        chosen = list(per_input[:nbest])
        chosen += [Translation([], float("-inf"), float("-inf"), "")] * (nbest - len(chosen))
        for hyp in chosen:
            text = " ".join(hyp.text.splitlines())  # one output line per hypothesis, always
            lines.append(f"{hyp.score:.4f}\t{text}" if scores else text)
    return lines
