#!/usr/bin/env python
"""Decoding-speed benchmark: greedy and beam-5 translation of a test set with a trained model.

    .venv/bin/python scripts/bench_translate.py -m runs/multi30k/transformer_en_de [--fixed-len 20]

For each mode -- greedy and beam 5, each with free output length (EOS ends a hypothesis; limit
1.5 x source + 10 as `nmt translate`) and, with --fixed-len N (default 20, 0 = off), with every
hypothesis exactly N tokens long (EOS banned before N tokens and forced after; the JoeyNMT harness's
FIXED_LEN, for comparing speed at equal work whatever the model's quality) -- prints

- sentences/s and target tokens/s (output tokens + EOS, per second of decoding),
- time per decoding step (one `decode_step` of the whole batch), split into the model (encoder, decoder
  state init, decoder step incl. output layer and log-softmax) and search overhead (everything else:
  top-k, bookkeeping, finished pools, reordering the decoder state), with the reordering also on its own;
  converting the model (bf16 copy, int8 quantization) is in the total time but in neither part,
- BLEU (sacreBLEU) of the translation against --ref, so a faster path that translates worse shows.

Decoding goes through `nmt.inference.search` with the same batching as `nmt translate` (sentences
sorted longest first, --batch-size per batch); tokenization and detokenization are not timed.
Prints one JSON object (stdout) and a summary line per mode (stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nmt.allocator import tune_allocator  # noqa: E402
from nmt.data.corpus import read_lines  # noqa: E402
from nmt.errors import run_reporting_errors  # noqa: E402
from nmt.evaluation import score  # noqa: E402
from nmt.inference.numerics import QUANTIZE_CHOICES, decoding_model  # noqa: E402
from nmt.inference.search import beam_search, greedy_search, max_output_lengths  # noqa: E402
from nmt.inference.translator import DEFAULT_MAX_LEN_A, DEFAULT_MAX_LEN_B, Translator, pad_sources  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "multi30k"


def _existing(path: Path) -> Path:
    if path.exists():
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.exists() else path


class TimedModel:
    """The model protocol of `nmt.inference.search`, with the time spent in each call recorded."""

    def __init__(self, model):
        self.model = model
        self.seconds = {"encode": 0.0, "init_state": 0.0, "decode_step": 0.0, "reorder_state": 0.0}
        self.steps = 0

    def _timed(self, name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[name] += time.perf_counter() - t0
        return out

    def encode(self, src):
        return self._timed("encode", self.model.encode, src)

    def init_state(self, enc):
        return self._timed("init_state", self.model.init_state, enc)

    def decode_step(self, prev, enc, state):
        self.steps += 1
        return self._timed("decode_step", self.model.decode_step, prev, enc, state)

    def reorder_state(self, state, index):
        return self._timed("reorder_state", self.model.reorder_state, state, index)


def decode(translator: Translator, sources: list[list[int]], beam: int, batch_size: int,
           fixed_len: int, precision: str = "fp32", quantize: str = "none") -> tuple[list[list[int]], dict[str, Any]]:
    """Token ids of the best hypothesis per source (input order) and the timings (converting the model
    for bf16 or int8, once per call as in `nmt translate`, included)."""
    device = translator.device
    order = sorted((i for i, ids in enumerate(sources) if ids), key=lambda i: -len(sources[i]))
    outputs: list[list[int]] = [[] for _ in sources]
    t0 = time.perf_counter()
    with torch.inference_mode(), decoding_model(translator.model, precision, device, quantize) as model:
        convert = time.perf_counter() - t0
        timed = TimedModel(model)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            src, lengths = pad_sources([sources[i] for i in batch], device)
            if fixed_len:
                max_lens = torch.full_like(lengths, fixed_len)
            else:
                max_lens = max_output_lengths(lengths, DEFAULT_MAX_LEN_A, DEFAULT_MAX_LEN_B,
                                              translator.max_output_tokens)
            if beam == 1:
                found = [[h] for h in greedy_search(timed, src, max_lens, min_len=fixed_len)]
            else:
                found = beam_search(timed, src, beam, max_lens, nbest=1, min_len=fixed_len)
            for i, hyps in zip(batch, found, strict=True):
                outputs[i] = hyps[0].tokens
    total = time.perf_counter() - t0
    in_model = timed.seconds["encode"] + timed.seconds["init_state"] + timed.seconds["decode_step"]
    search = total - convert - in_model
    steps = max(timed.steps, 1)
    return outputs, {
        "seconds": total, "decode_steps": timed.steps, "convert_seconds": convert, "model_seconds": in_model,
        "search_overhead_seconds": search, "reorder_seconds": timed.seconds["reorder_state"],
        "encode_seconds": timed.seconds["encode"] + timed.seconds["init_state"],
        "ms_per_step": 1000 * total / steps, "model_ms_per_step": 1000 * in_model / steps,
        "search_ms_per_step": 1000 * search / steps,
        "search_overhead_share": search / total,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    translator = Translator.load(args.model, device=args.device)
    lines = read_lines(args.src)
    refs = read_lines(args.ref) if args.ref else None
    sources = translator.encode(lines, quiet=True)
    modes = [(f"{'greedy' if beam == 1 else f'beam{beam}'}{f'_fixed{n}' if n else ''}", beam, n)
             for n in ([0, args.fixed_len] if args.fixed_len else [0]) for beam in (1, args.beam)]
    results: dict[str, Any] = {"model": str(args.model), "src": str(args.src), "sentences": len(lines),
                               "batch_size": args.batch_size, "precision": args.precision,
                               "quantize": args.quantize,
                               "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "modes": {}}
    for name, beam, fixed in modes:
        if args.warmup:
            decode(translator, sources[: args.batch_size], beam, args.batch_size, fixed, args.precision,
                   args.quantize)
        outputs, timing = decode(translator, sources, beam, args.batch_size, fixed, args.precision,
                                 args.quantize)
        out_tokens = sum(len(o) + 1 for o in outputs)  # + EOS
        texts = [translator.tgt_tokenizer.decode(o) for o in outputs]
        entry = {"beam": beam, "fixed_len": fixed, **timing,
                 "sentences_per_s": len(lines) / timing["seconds"], "tgt_tokens_per_s": out_tokens / timing["seconds"],
                 "output_tokens": out_tokens}
        if refs is not None:
            entry["bleu"] = score(texts, [refs], ["bleu"])["bleu"]
        results["modes"][name] = entry
        print(f"[bench_translate] {name}: {entry['sentences_per_s']:.1f} sent/s, "
              f"{entry['tgt_tokens_per_s']:.0f} tgt tok/s, "
              f"{entry['ms_per_step']:.2f} ms/step = model {entry['model_ms_per_step']:.2f} + search "
              f"{entry['search_ms_per_step']:.2f} ({entry['search_overhead_share']:.0%} overhead, reorder "
              f"{1000 * entry['reorder_seconds'] / max(entry['decode_steps'], 1):.2f} ms/step), "
              f"BLEU {entry.get('bleu', float('nan')):.2f}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", required=True, help="run directory (best.pt, else last.pt) or checkpoint")
    parser.add_argument("--src", type=Path, default=_existing(DEFAULT_DATA / "test_2016_flickr.en"))
    parser.add_argument("--ref", type=Path, default=None,
                        help="reference translations (default: --src with .en -> .de when that file exists)")
    parser.add_argument("--fixed-len", type=int, default=20, help="also decode with every output N tokens (0 = off)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch (as the JoeyNMT harness)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="as nmt translate --precision: bf16 = a bf16-weights copy of the model")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES, help="as nmt translate --quantize")
    parser.add_argument("--warmup", type=int, default=1, help="decode one batch first (not timed); 0 = off")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="keep glibc's malloc settings (nmt's CLI tunes them: nmt/allocator.py)")
    args = parser.parse_args(argv)
    if args.ref is None:
        name = args.src.name.replace(".en", ".de", 1)
        candidate = args.src.with_name(name)
        args.ref = candidate if candidate != args.src and candidate.exists() else None
    tuned = not args.malloc_defaults and tune_allocator()
    print(json.dumps({**run(args), "allocator_tuned": tuned}))


if __name__ == "__main__":
    run_reporting_errors(main)
