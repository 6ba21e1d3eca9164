"""Greedy and fully batched beam search over the model protocol of `EncoderDecoder`.

The model is used through four calls only: `encode(src)`, `init_state(enc)`,
`decode_step(prev_tokens, enc, state) -> (log_probs [R, V] fp32, state, attention)` and
`reorder_state(state, index)`; so every encoder/decoder pairing of the zoo is searched the same way.
The log-probabilities `decode_step` returns must be a fresh tensor: the search masks them in place.

Conventions (fairseq's):
- Output length. A sentence may produce at most `max_len` tokens (EOS not counted); at step `max_len`
  only EOS is allowed, so every hypothesis ends with EOS and is scored as a complete sentence.
  `max_output_lengths` computes `max_len = floor(a * src_len + b)` for every caller.
- Score. `score = log_prob / length ** lenpen` where `log_prob` is the sum of the token log-probs
  including EOS's and `length = len(tokens) + 1` counts EOS. lenpen 0 = raw log-prob (favours short
  outputs), 1 = per-token average, > 1 favours longer outputs still more.
- PAD and BOS are never generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmt.models.interfaces import DecoderState, EncoderOutput
from nmt.vocab import BOS_ID, EOS_ID, PAD_ID

NEG_INF = float("-inf")


@dataclass
class Hypothesis:
    """One output: target tokens without BOS/EOS, normalised score, summed log-prob (EOS included)."""

    tokens: list[int]
    score: float
    log_prob: float


def max_output_lengths(src_lengths: torch.Tensor, a: float, b: float, cap: int | None = None) -> torch.Tensor:
    """Per-sentence output limit `floor(a * src_len + b)` (EOS not counted), at least 1, at most `cap`.

    `src_len` is the length of the encoder input as given (our sources include their EOS).
    """
    limits = torch.floor(a * src_lengths.double() + b).long().clamp(min=1)
    return limits if cap is None else limits.clamp(max=max(cap, 1))


def length_normalised(log_prob: torch.Tensor | float, n_tokens: int, lenpen: float) -> torch.Tensor | float:
    """score = log_prob / (n_tokens + 1) ** lenpen; the +1 is EOS."""
    return log_prob / (n_tokens + 1) ** lenpen


def _next_log_probs(model, prev: torch.Tensor, enc: EncoderOutput, state: DecoderState, step: int,
                    limits: torch.Tensor, min_len: int = 0) -> tuple[torch.Tensor, DecoderState]:
    """One decoder step for R rows; PAD/BOS impossible, EOS impossible before `min_len` tokens, and only
    EOS possible in rows with limit <= step.

    The masking is done in place on the fresh log-probabilities `decode_step` returns, column- and
    row-wise: no [R, V] mask is built (at V = 8000 and R = 320 that was a third of beam search's time
    outside the model).
    """
    log_probs, state, _ = model.decode_step(prev, enc, state)
    log_probs = log_probs.float()
    log_probs.index_fill_(1, torch.tensor([PAD_ID, BOS_ID], device=log_probs.device), NEG_INF)
    at_limit = limits <= step  # [R]
    if step < min_len:
        log_probs[:, EOS_ID].masked_fill_(~at_limit, NEG_INF)
    if bool(at_limit.any()):  # only EOS possible in those rows
        rows = at_limit.nonzero().squeeze(1)
        eos = log_probs[rows, EOS_ID]
        log_probs.index_fill_(0, rows, NEG_INF)
        log_probs[rows, EOS_ID] = eos
    return log_probs, state


def _start(model, src: torch.Tensor, max_lens: torch.Tensor) -> tuple[torch.Tensor, int, EncoderOutput]:
    """What every search starts from: the length limits on src's device, the token buffer width
    (longest limit + EOS) and the encoded batch."""
    max_lens = max_lens.to(src.device)
    return max_lens, int(max_lens.max()) + 1, model.encode(src)


def _batch_rows(sentences: torch.Tensor, width: int) -> torch.Tensor:
    """Flat row ids of `width` consecutive rows per sentence: sentences [A] -> [A * width]."""
    return (sentences.unsqueeze(1) * width + torch.arange(width, device=sentences.device)).flatten()


def _check_sizes(beam: int, nbest: int) -> None:
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must be between 1 and beam ({beam}), got {nbest}")


# ----------------------------------------------------------------------------------------------
# Greedy


@torch.inference_mode()
def greedy_search(model, src: torch.Tensor, max_lens: torch.Tensor, lenpen: float = 1.0,
                  min_len: int = 0) -> list[Hypothesis]:
    """Batched greedy decoding of src [B, S]: the most probable token at every step.

    A sentence stops at EOS or after `max_lens[b]` tokens (then EOS is forced and scored); finished
    sentences leave the batch, and the loop ends when every sentence is finished. EOS cannot be chosen
    before `min_len` tokens (unless the length limit forces it); min_len = max_lens gives outputs of
    exactly that length (fixed-work speed measurements).
    """
    batch, device = src.size(0), src.device
    if batch == 0:
        return []
    max_lens, width, enc = _start(model, src, max_lens)
    state = model.init_state(enc)
    tokens = torch.full((batch, width), PAD_ID, dtype=torch.long, device=device)
    log_prob = torch.zeros(batch, device=device)
    n_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.arange(batch, device=device)  # original index of every row still decoding
    prev = torch.full((batch,), BOS_ID, dtype=torch.long, device=device)
    for step in range(width):
        row_limits = max_lens[active]
        log_probs, state = _next_log_probs(model, prev, enc, state, step, row_limits, min_len)
        best, token = log_probs.max(dim=-1)
        ended = (token == EOS_ID) | (row_limits <= step)
        log_prob[active] += best
        tokens[active, step] = token.masked_fill(ended, PAD_ID)
        n_tokens[active] = torch.where(ended, step, step + 1)
        keep = (~ended).nonzero().squeeze(1)  # the one host sync of the step
        if keep.numel() == 0:
            break
        if keep.numel() < active.numel():  # finished rows leave the batch
            active, token = active[keep], token[keep]
            enc, state = enc.index_select(keep), model.reorder_state(state, keep)
        prev = token
    return [
        Hypothesis(row[:n], float(length_normalised(lp, n, lenpen)), lp)
        for row, n, lp in zip(tokens.tolist(), n_tokens.tolist(), log_prob.tolist(), strict=True)
    ]


# ----------------------------------------------------------------------------------------------
# Beam search


class _FinishedPool:
    """Up to `size` finished hypotheses per sentence, the best by normalised score, as tensors."""

    def __init__(self, batch: int, size: int, width: int, device: torch.device):
        self.size = size
        self.score = torch.full((batch, size), NEG_INF, device=device)
        self.log_prob = torch.zeros(batch, size, device=device)
        self.n_tokens = torch.zeros(batch, size, dtype=torch.long, device=device)
        self.tokens = torch.full((batch, size, width), PAD_ID, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)

    def add(self, sentences: torch.Tensor, prefixes: torch.Tensor, log_prob: torch.Tensor,
            ended: torch.Tensor, step: int, lenpen: float) -> None:
        """Offer, for active sentences [A], C candidates each that end with EOS at `step`:
        prefixes [A, C, W] (tokens before EOS), log_prob [A, C] (EOS included), ended [A, C] (which
        candidates really ended). Keeps the `size` best by normalised score per sentence."""
        score = length_normalised(log_prob, step, lenpen).masked_fill(~ended, NEG_INF)
        all_score = torch.cat([self.score[sentences], score], dim=1)  # [A, size + C]
        best, pick = all_score.topk(self.size, dim=1)
        n_tokens = torch.full_like(log_prob, step, dtype=torch.long)
        all_tokens = torch.cat([self.tokens[sentences], prefixes], dim=1)
        self.score[sentences] = best
        self.log_prob[sentences] = torch.cat([self.log_prob[sentences], log_prob], dim=1).gather(1, pick)
        self.n_tokens[sentences] = torch.cat([self.n_tokens[sentences], n_tokens], dim=1).gather(1, pick)
        self.tokens[sentences] = all_tokens.gather(1, pick.unsqueeze(2).expand(-1, -1, all_tokens.size(2)))
        self.count[sentences] = (best > NEG_INF).sum(dim=1)

    def best(self, nbest: int) -> list[list[Hypothesis]]:
        """The `nbest` best finished hypotheses of every sentence, best first."""
        score, order = self.score.sort(dim=1, descending=True)
        order = order[:, :nbest]
        tokens = self.tokens.gather(1, order.unsqueeze(2).expand(-1, -1, self.tokens.size(2)))
        columns = (score[:, :nbest], self.log_prob.gather(1, order), self.n_tokens.gather(1, order), tokens)
        results = []
        for sentence in zip(*(c.tolist() for c in columns), strict=True):
            hyps = [Hypothesis(row[:n], s, lp)
                    for s, lp, n, row in zip(*sentence, strict=True) if s > NEG_INF]
            # Only a model that gives EOS zero probability at the length limit leaves no hypothesis.
            results.append(hyps or [Hypothesis([], NEG_INF, NEG_INF)])
        return results


@torch.inference_mode()
def beam_search(model, src: torch.Tensor, beam: int, max_lens: torch.Tensor, nbest: int = 1,
                lenpen: float = 1.0, min_len: int = 0) -> list[list[Hypothesis]]:
    """Beam search over src [B, S] with the B*K hypotheses as one batch; `nbest` per sentence, best first.

    Every step: one `decode_step` for all live rows; cumulative log-probs [A, K, V] -> top 2K over K*V
    per sentence (beams 1..K-1 start at -inf, so the first step expands beam 0 only and no duplicates
    arise); `index // V` is the source beam, `index % V` the token. EOS candidates ranked within the
    top K are finished: moved to the sentence's pool with `score = log_prob / len ** lenpen`. The best K
    non-EOS candidates (2K candidates always hold K of them) continue, and `reorder_state` is called
    once per step with the combined beam-reordering/batch-shrinking index.

    Stopping rule (fairseq's): a sentence is done once its pool holds K finished hypotheses, or when it
    has no live hypothesis left (the length limit forces EOS). Done sentences leave the batch at once,
    so a sentence's result never depends on the other sentences in the batch. With lenpen > 0 a live
    hypothesis could in theory still overtake the pool's best; like fairseq we do not wait for it.
    All bookkeeping is tensor ops; Python loops over sentences happen only when building the result.
    EOS cannot be chosen before `min_len` tokens (unless the length limit forces it), as in greedy_search.
    """
    _check_sizes(beam, nbest)
    batch, device = src.size(0), src.device
    if batch == 0:
        return []
    max_lens, width, enc = _start(model, src, max_lens)
    expand = torch.arange(batch, device=device).repeat_interleave(beam)  # sentence b -> rows b*K..b*K+K-1
    state = model.reorder_state(model.init_state(enc), expand)  # init once per sentence, then copy K times
    enc = enc.index_select(expand)
    pool = _FinishedPool(batch, beam, width, device)
    sentences = torch.arange(batch, device=device)  # original index of every live sentence
    prefixes = torch.full((batch, beam, width), PAD_ID, dtype=torch.long, device=device)
    scores = torch.full((batch, beam), NEG_INF, device=device)
    scores[:, 0] = 0.0
    prev = torch.full((batch * beam,), BOS_ID, dtype=torch.long, device=device)
    for step in range(width):
        live = sentences.numel()
        log_probs, state = _next_log_probs(model, prev, enc, state, step,
                                           max_lens[sentences].repeat_interleave(beam), min_len)
        vocab = log_probs.size(-1)
        totals = log_probs.view(live, beam, vocab).add_(scores.unsqueeze(2)).view(live, beam * vocab)
        cand_scores, cand_index = totals.topk(min(2 * beam, beam * vocab), dim=1)  # sorted, best first
        cand_beam = torch.div(cand_index, vocab, rounding_mode="floor")
        cand_token = cand_index % vocab
        possible = cand_scores > NEG_INF
        is_eos = (cand_token == EOS_ID) & possible

        finishing = is_eos[:, :beam]
        if bool(finishing.any()):
            source = cand_beam[:, :beam].unsqueeze(2).expand(-1, -1, width)
            pool.add(sentences, prefixes.gather(1, source), cand_scores[:, :beam], finishing, step, lenpen)

        continuing = cand_scores.masked_fill(is_eos | ~possible, NEG_INF)
        scores, pick = continuing.topk(beam, dim=1)
        next_beam, next_token = cand_beam.gather(1, pick), cand_token.gather(1, pick)
        done = (pool.count[sentences] >= beam) | (scores == NEG_INF).all(dim=1)
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        rows = (keep.unsqueeze(1) * beam + next_beam[keep]).flatten()  # row of every new hypothesis
        if keep.numel() < live:
            enc = enc.index_select(_batch_rows(keep, beam))
            sentences, scores, next_token = sentences[keep], scores[keep], next_token[keep]
        prefixes = prefixes.view(live * beam, width).index_select(0, rows).view(-1, beam, width)
        prefixes[:, :, step] = next_token
        state = model.reorder_state(state, rows)
        prev = next_token.flatten()
    return pool.best(nbest)
