"""Is decoding independent of batch composition? Translate each sentence alone and in shuffled batches.

    python scripts/batch_consistency.py -m RUN_DIR_OR_CHECKPOINT [--src FILE] [--beam 5] [--batch-size 64]

Every sentence is translated one at a time (batch of 1), then all of them in a shuffled order in
batches of --batch-size. Prints one JSON object:

    {"n": ..., "identical": ..., "identical_rate": ..., "max_score_diff_identical": ...,
     "differing": [{"line", "source", "alone", "batched", "alone_score", "batched_score",
                    "top2_gap", "near_tie"}, ...], ...}

Padding and a different batch shape change the floating-point rounding of the model's sums (another
GEMM kernel, another reduction order), so scores differ in the last digits; a translation can only
change where two hypotheses are nearly tied. Each differing line is explained by `top2_gap`: the
score gap between the two best hypotheses when it is translated alone (beam max(2, --beam), 2-best);
`near_tie` is true when that gap, or the gap between the alone and batched scores, is below
--near-tie. A differing line that is not a near tie points at a real bug (e.g. padding that leaks
into the encoder or attention).

--src defaults to ../shared/data/multi30k/test_2016_flickr.en (or .en.gz) next to the repository.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nmt.data.corpus import find_corpus_file, read_lines  # noqa: E402
from nmt.errors import NmtError  # noqa: E402

DEFAULT_SRC = ROOT.parent / "shared" / "data" / "multi30k" / "test_2016_flickr"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True, help="run directory or checkpoint file")
    parser.add_argument("--src", help=f"source sentences (default: {DEFAULT_SRC}.en[.gz])")
    parser.add_argument("--beam", type=int, default=5, help="beam size; 1 = greedy (default 5)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per shuffled batch (default 64)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N sentences (0 = all)")
    parser.add_argument("--seed", type=int, default=1, help="shuffling seed")
    parser.add_argument("--near-tie", type=float, default=0.01, help="score gap counted as a near tie")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(check(args), ensure_ascii=False, indent=1))
    except NmtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def check(args: argparse.Namespace) -> dict:
    from nmt.inference.translator import Translator

    src = Path(args.src) if args.src else find_corpus_file(DEFAULT_SRC, "en")
    lines = read_lines(src)
    if args.limit > 0:
        lines = lines[: args.limit]
    if not lines:
        raise NmtError(f"{src}: empty file (nothing to translate)")
    translator = Translator.load(args.model, device=args.device)
    options = {"beam": args.beam, "quiet": True}

    start = time.perf_counter()
    alone = [translator.translate([line], batch_size=1, **options)[0][0] for line in lines]
    alone_seconds = time.perf_counter() - start

    order = list(range(len(lines)))
    random.Random(args.seed).shuffle(order)
    start = time.perf_counter()
    shuffled = translator.translate([lines[i] for i in order], batch_size=args.batch_size, **options)
    batched_seconds = time.perf_counter() - start
    batched = [None] * len(lines)
    for position, i in enumerate(order):
        batched[i] = shuffled[position][0]

    differing, max_diff = [], 0.0
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        if a.tokens == b.tokens:
            max_diff = max(max_diff, abs(a.score - b.score))
            continue
        two = translator.translate([lines[i]], beam=max(2, args.beam), nbest=2, batch_size=1, quiet=True)[0]
        gap = two[0].score - two[1].score if len(two) > 1 else None
        near = (gap is not None and gap < args.near_tie) or abs(a.score - b.score) < args.near_tie
        differing.append({"line": i + 1, "source": lines[i], "alone": a.text, "batched": b.text,
                          "alone_score": round(a.score, 6), "batched_score": round(b.score, 6),
                          "top2_gap": None if gap is None else round(gap, 6), "near_tie": near})
    n = len(lines)
    return {"model": str(args.model), "src": str(src), "device": str(translator.device), "beam": args.beam,
            "batch_size": args.batch_size, "n": n, "identical": n - len(differing),
            "identical_rate": round((n - len(differing)) / n, 6), "max_score_diff_identical": max_diff,
            "near_ties": sum(d["near_tie"] for d in differing),
            "seconds": {"alone": round(alone_seconds, 2), "batched": round(batched_seconds, 2)},
            "differing": differing}


if __name__ == "__main__":
    sys.exit(main())
