"""Greedy and beam search against a fake model with hand-set next-token probabilities, and against
tiny random real models (batching invariance, scores equal to teacher-forced log-probs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nmt.inference.search import (
    Hypothesis,
    beam_search,
    greedy_search,
    length_normalised,
    max_output_lengths,
)
from nmt.models.interfaces import EncoderOutput
from nmt.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

A, B, C, D = 4, 5, 6, 7
VOCAB = 8
TINY = 1e-4  # probability of every token a table row does not list

# Each table: target prefix (without BOS) -> next-token probabilities; unlisted prefixes -> UNK forever.
# TRAP: greedy takes A (0.5) first; the best sentence starts with B: P(B C) = .4*.9*.9 > P(A C) = .5*.36*.9
TRAP = 10
LENGTHS = 20  # short [] vs medium [B] vs long [A A A]: lenpen 0, 1, 2 each prefer another (max length 3)
ENDLESS = 30  # never ends by itself (EOS only at TINY probability)
TABLES = {
    TRAP: {(): {A: 0.5, B: 0.4, EOS_ID: 0.1}, (A,): {C: 0.36, D: 0.34, UNK_ID: 0.3},
           (A, C): {EOS_ID: 0.9, D: 0.1}, (B,): {C: 0.9, EOS_ID: 0.1}, (B, C): {EOS_ID: 0.9, D: 0.1}},
    LENGTHS: {(): {EOS_ID: 0.4066, B: 0.304, A: 0.2894}, (B,): {EOS_ID: 0.99, C: 0.01},
              (A,): {A: 0.52, D: 0.48}, (A, A): {A: 0.52, D: 0.48}, (A, A, A): {EOS_ID: 0.8, C: 0.2}},
    ENDLESS: {(): {A: 0.6, B: 0.4}, (A,): {B: 0.7, A: 0.3}},
}
ALWAYS_UNK = {UNK_ID: 1.0}


class TableModel(nn.Module):
    """The search protocol of EncoderDecoder, with probabilities looked up in TABLES[src[b, 0]] by prefix.

    The state carries each row's table id and target prefix, so a wrong `reorder_state` index or a
    mixed-up row gives wrong probabilities. `steps` counts decode_step calls."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def encode(self, src: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(src.unsqueeze(2).float(), src != PAD_ID, None)

    def init_state(self, enc: EncoderOutput) -> dict[str, torch.Tensor]:
        table = enc.memory[:, 0, 0].long()
        return {"table": table, "prefix": table.new_zeros(table.size(0), 0)}

    def reorder_state(self, state: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.index_select(0, index) for k, v in state.items()}

    def decode_step(self, prev: torch.Tensor, enc: EncoderOutput, state: dict[str, torch.Tensor]):
        self.steps += 1
        assert enc.memory.size(0) == prev.size(0) == state["table"].size(0)
        prefix = torch.cat([state["prefix"], prev.unsqueeze(1)], dim=1)
        assert bool((prefix[:, 0] == BOS_ID).all())
        rows = [next_log_probs(table, tuple(p[1:]))
                for table, p in zip(state["table"].tolist(), prefix.tolist(), strict=True)]
        return torch.stack(rows), {"table": state["table"], "prefix": prefix}, None


def next_log_probs(table: int, prefix: tuple[int, ...]) -> torch.Tensor:
    probs = torch.full((VOCAB,), TINY, dtype=torch.float64)
    for token, p in TABLES[table].get(prefix, ALWAYS_UNK).items():
        probs[token] = p
    return (probs / probs.sum()).log().float()


def sequence_log_prob(table: int, tokens: list[int]) -> float:
    """log P(tokens + EOS) under the fake model, computed directly from the tables."""
    targets = [*tokens, EOS_ID]
    return sum(float(next_log_probs(table, tuple(targets[:i]))[t]) for i, t in enumerate(targets))


def sources(*tables: int, length: int = 3) -> torch.Tensor:
    return torch.tensor([[t] + [A] * (length - 1) for t in tables])


def limits(*values: int) -> torch.Tensor:
    return torch.tensor(values)


def search(model, src: torch.Tensor, max_lens: torch.Tensor, beam: int, nbest: int = 1,
           lenpen: float = 1.0) -> list[list[Hypothesis]]:
    """Greedy for beam 1 (as decode_ids does), else beam search; per sentence a list of hypotheses."""
    if beam == 1:
        return [[h] for h in greedy_search(model, src, max_lens, lenpen=lenpen)]
    return beam_search(model, src, beam, max_lens, nbest=nbest, lenpen=lenpen)


def assert_consistent(hyp: Hypothesis, table: int, lenpen: float) -> None:
    """The hypothesis' log-prob is the fake model's, and its score the documented normalisation."""
    assert hyp.log_prob == pytest.approx(sequence_log_prob(table, hyp.tokens), abs=1e-5)
    assert hyp.score == pytest.approx(hyp.log_prob / (len(hyp.tokens) + 1) ** lenpen, abs=1e-5)


# -- the fake model ------------------------------------------------------------------------------


def test_greedy_takes_the_locally_best_token_beam_finds_the_better_sentence():
    src = sources(TRAP)
    (greedy,) = greedy_search(TableModel(), src, limits(10))
    assert greedy.tokens == [A, C]
    assert_consistent(greedy, TRAP, 1.0)
    for beam in (2, 3, 5):
        (hyps,) = beam_search(TableModel(), src, beam, limits(10))
        assert hyps[0].tokens == [B, C], beam
        assert hyps[0].log_prob == pytest.approx(math.log(0.4 * 0.9 * 0.9), abs=5e-3)  # TINY mass aside
        assert_consistent(hyps[0], TRAP, 1.0)


@pytest.mark.parametrize("table", [TRAP, LENGTHS, ENDLESS])
@pytest.mark.parametrize("lenpen", [0.0, 1.0, 2.0])
def test_beam_one_is_greedy(table, lenpen):
    src = sources(table)
    (greedy,) = greedy_search(TableModel(), src, limits(4), lenpen=lenpen)
    ((beam,),) = beam_search(TableModel(), src, 1, limits(4), lenpen=lenpen)
    assert beam.tokens == greedy.tokens
    assert beam.log_prob == pytest.approx(greedy.log_prob, abs=1e-6)
    assert beam.score == pytest.approx(greedy.score, abs=1e-6)


@pytest.mark.parametrize("lenpen, expected", [(0.0, []), (1.0, [B]), (2.0, [A, A, A])])
def test_length_penalty_chooses_between_short_and_long(lenpen, expected):
    # log P: [] -0.90, [B] -1.20, [A A A] -2.77  -> lenpen 0: raw; 1: /len (-0.90, -0.60, -0.69);
    # 2: /len^2 (-0.90, -0.30, -0.17); len counts EOS.
    (hyps,) = beam_search(TableModel(), sources(LENGTHS), 3, limits(3), nbest=3, lenpen=lenpen)
    assert hyps[0].tokens == expected
    assert [B] in [h.tokens for h in hyps] and [A, A, A] in [h.tokens for h in hyps]  # found every time
    for hyp in hyps:
        assert_consistent(hyp, LENGTHS, lenpen)


def test_nbest_is_distinct_and_sorted():
    (hyps,) = beam_search(TableModel(), sources(LENGTHS), 3, limits(3), nbest=3, lenpen=1.0)
    assert [h.tokens for h in hyps] == [[B], [A, A, A], []]
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    (two,) = beam_search(TableModel(), sources(TRAP), 4, limits(5), nbest=2)
    assert len(two) == 2 and two[0].tokens != two[1].tokens and two[0].score >= two[1].score


def test_max_length_is_respected_and_eos_is_forced_and_scored():
    src = sources(ENDLESS, ENDLESS, ENDLESS)
    lens = limits(2, 5, 1)
    for beam in (1, 3):
        hyps = [per_sentence[0] for per_sentence in search(TableModel(), src, lens, beam)]
        assert [len(h.tokens) for h in hyps] == [2, 5, 1]
        for hyp in hyps:
            assert_consistent(hyp, ENDLESS, 1.0)  # includes log P(EOS) at the limit
    (greedy,) = greedy_search(TableModel(), sources(ENDLESS), limits(3))
    assert greedy.tokens == [A, B, UNK_ID]


def test_search_stops_when_every_sentence_is_finished():
    model = TableModel()
    greedy_search(model, sources(TRAP, TRAP), limits(50, 50))
    assert model.steps == 3  # A C EOS, not 51 steps
    model = TableModel()
    beam_search(model, sources(TRAP), 2, limits(50))
    assert model.steps == 3


@pytest.mark.parametrize("beam", [1, 3])
def test_results_do_not_depend_on_the_batch(beam):
    tables = [TRAP, ENDLESS, LENGTHS, TRAP, ENDLESS]
    lens = [6, 4, 3, 2, 5]
    alone = [search(TableModel(), sources(t, length=1 + i), limits(n), beam, nbest=beam)[0]
             for i, (t, n) in enumerate(zip(tables, lens, strict=True))]
    src = torch.zeros(len(tables), len(tables), dtype=torch.long)  # padded: row i has 1 + i tokens
    for i, t in enumerate(tables):
        src[i, : 1 + i] = sources(t, length=1 + i)[0]
    together = search(TableModel(), src, limits(*lens), beam, nbest=beam)
    reverse = search(TableModel(), src.flip(0), limits(*lens[::-1]), beam, nbest=beam)[::-1]
    for one, *others in zip(alone, together, reverse, strict=True):
        for other in others:
            assert [h.tokens for h in other] == [h.tokens for h in one]
            assert [h.score for h in other] == pytest.approx([h.score for h in one], abs=1e-6)


def test_max_output_lengths_follows_a_times_source_plus_b():
    src_lengths = torch.tensor([1, 4, 10])
    assert max_output_lengths(src_lengths, 1.5, 10).tolist() == [11, 16, 25]
    assert max_output_lengths(src_lengths, 0.0, 200).tolist() == [200, 200, 200]
    assert max_output_lengths(src_lengths, 1.5, 10, cap=20).tolist() == [11, 16, 20]
    assert max_output_lengths(src_lengths, 0.0, 0).tolist() == [1, 1, 1]  # at least one token


def test_length_normalisation_counts_eos():
    assert length_normalised(-6.0, 2, 1.0) == pytest.approx(-2.0)
    assert length_normalised(-6.0, 2, 0.0) == pytest.approx(-6.0)
    assert length_normalised(-6.0, 1, 2.0) == pytest.approx(-1.5)


def test_bad_beam_arguments():
    with pytest.raises(ValueError):
        beam_search(TableModel(), sources(TRAP), 2, limits(3), nbest=3)
    with pytest.raises(ValueError):
        beam_search(TableModel(), sources(TRAP), 0, limits(3))


# -- tiny random real models ---------------------------------------------------------------------

SRC_VOCAB, TGT_VOCAB = 13, 11
ARCHITECTURES = {
    "rnn": {"encoder": {"type": "rnn", "cell": "gru", "hidden_size": 16},
            "decoder": {"type": "rnn", "cell": "gru", "hidden_size": 16}, "attention": {"type": "bahdanau"}},
    "transformer": {"encoder": {"type": "transformer", "layers": 2, "d_model": 16, "heads": 2, "ff_size": 32},
                    "decoder": {"type": "transformer", "layers": 2, "d_model": 16, "heads": 2, "ff_size": 32},
                    "attention": {"type": "none"}},
}


def real_model(name: str) -> nn.Module:
    """A random tiny EncoderDecoder with peaky outputs whose greedy and beam outputs end at varied
    lengths on `random_sources(7)` (the first seed that gives that, so the test does not hinge on one
    random initialisation)."""
    pytest.importorskip(f"nmt.models.{name}")
    from nmt.config import from_dict
    from nmt.models.zoo import build_model

    embeddings = {"src_dim": 16, "tgt_dim": 16, "dropout": 0.0}
    cfg = from_dict({"model": {**ARCHITECTURES[name], "embeddings": embeddings}})
    rows = random_sources(7)
    max_lens = max_output_lengths(torch.tensor([len(r) for r in rows]), 1.0, 3)
    for seed in range(100):
        torch.manual_seed(seed)
        model = build_model(cfg.model, SRC_VOCAB, TGT_VOCAB).eval()
        with torch.no_grad():
            model.output_layer.weight.mul_(4.0)  # peaky distributions: fewer near-ties
        if all(len({len(h[0].tokens) for h in search(model, padded(rows), max_lens, beam, 1, 1.0)}) > 1
               for beam in (1, 4)):
            return model
    raise AssertionError("no seed gives varied output lengths")


def random_sources(n: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (n,), generator=gen).tolist()
    return [[*torch.randint(4, SRC_VOCAB, (k,), generator=gen).tolist(), EOS_ID] for k in lengths]


def padded(rows: list[list[int]]) -> torch.Tensor:
    src = torch.full((len(rows), max(map(len, rows))), PAD_ID)
    for i, row in enumerate(rows):
        src[i, : len(row)] = torch.tensor(row)
    return src


def teacher_forced_log_prob(model, source: list[int], tokens: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([source]), torch.tensor([[BOS_ID, *tokens]]))
        log_probs = torch.log_softmax(logits.float(), dim=-1)[0]
    return float(log_probs.gather(1, torch.tensor([[*tokens, EOS_ID]]).T).sum())


@pytest.mark.parametrize("name", ["rnn", "transformer"])
def test_real_model_batching_invariance_and_teacher_forced_scores(name):
    model = real_model(name)
    rows = random_sources(7)
    max_lens = max_output_lengths(torch.tensor([len(r) for r in rows]), 1.0, 3)
    for beam, nbest, lenpen in [(1, 1, 1.0), (4, 2, 0.6)]:
        together = search(model, padded(rows), max_lens, beam, nbest, lenpen)
        lengths = {len(hyps[0].tokens) for hyps in together}
        assert len(lengths) > 1, "the test model should end sentences at different lengths"
        for i, row in enumerate(rows):
            (alone,) = search(model, padded([row]), max_lens[i : i + 1], beam, nbest, lenpen)
            assert [h.tokens for h in alone] == [h.tokens for h in together[i]]
            assert [h.score for h in alone] == pytest.approx([h.score for h in together[i]], abs=1e-4)
            for hyp in together[i]:
                assert len(hyp.tokens) <= int(max_lens[i])
                expected = teacher_forced_log_prob(model, row, hyp.tokens)
                assert hyp.log_prob == pytest.approx(expected, abs=1e-4)
                assert hyp.score == pytest.approx(hyp.log_prob / (len(hyp.tokens) + 1) ** lenpen, abs=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("name", ["rnn", "transformer"])
def test_min_len_gives_outputs_of_exactly_the_fixed_length(name, beam):
    """min_len = max_len (the benchmarks' fixed-length mode): every hypothesis has exactly that many
    tokens, whatever the model prefers, and its score is still the teacher-forced log-prob."""
    model = real_model(name)
    rows = random_sources(5)
    max_lens = torch.full((len(rows),), 6)
    for i, hyps in enumerate(search_min_len(model, padded(rows), max_lens, beam, min_len=6)):
        for hyp in hyps:
            assert len(hyp.tokens) == 6 and EOS_ID not in hyp.tokens
            assert hyp.log_prob == pytest.approx(teacher_forced_log_prob(model, rows[i], hyp.tokens), abs=1e-4)


def test_min_len_longer_than_the_limit_yields_to_the_limit():
    for hyps in search_min_len(TableModel(), sources(TRAP, LENGTHS), limits(2, 2), 2, min_len=5):
        assert all(len(h.tokens) == 2 for h in hyps)


def test_min_len_zero_changes_nothing():
    src = sources(TRAP, LENGTHS, ENDLESS)
    for beam in (1, 3):
        plain = search(TableModel(), src, limits(3, 3, 3), beam, nbest=beam)
        zero = search_min_len(TableModel(), src, limits(3, 3, 3), beam, min_len=0)
        assert [[h.tokens for h in hs] for hs in plain] == [[h.tokens for h in hs] for hs in zero]


def search_min_len(model, src, max_lens, beam, min_len):
    if beam == 1:
        return [[h] for h in greedy_search(model, src, max_lens, min_len=min_len)]
    return beam_search(model, src, beam, max_lens, nbest=beam, min_len=min_len)
