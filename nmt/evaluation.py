"""Corpus-level scoring with sacreBLEU (BLEU, chrF, TER) and reproducible signatures."""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF, TER

from nmt.errors import NmtError

METRICS = {"bleu": BLEU, "chrf": CHRF, "ter": TER}


def parse_metrics(spec: str) -> list[str]:
    """'bleu,chrf' -> ['bleu', 'chrf']; unknown names are an NmtError."""
    names = [m.strip().lower() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise NmtError(f"--metrics: unknown metric {', '.join(unknown) or spec!r}; choose from bleu, chrf, ter")
    return names


def score(hyps: Sequence[str], refs: Sequence[Sequence[str]], metrics: Sequence[str] = ("bleu",)) -> dict:
    """Score hypotheses against one or more reference streams.

    Returns {"bleu": 34.1, "chrf": ..., "signature": {"bleu": "nrefs:1|case:mixed|...", ...}}.
    """
    for i, ref in enumerate(refs):
        if len(ref) != len(hyps):
            raise NmtError(f"reference {i + 1} has {len(ref)} lines but the hypotheses have {len(hyps)}")
    result: dict = {"signature": {}}
    for name in metrics:
        metric = METRICS[name]()
        result[name] = round(metric.corpus_score(list(hyps), [list(r) for r in refs]).score, 2)
        result["signature"][name] = str(metric.get_signature())
    return result


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU against a single reference stream (validation during training)."""
    return score(hyps, [refs], ("bleu",))["bleu"]
