"""decode_ids (order, batching, empty sources), the Translator (loading checks, text in/out),
format_output, and resolve_device."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt.config import from_dict, to_dict
from nmt.data.tokenizer import Tokenizer, train_sentencepiece
from nmt.device import resolve_device
from nmt.errors import NmtError
from nmt.inference.search import Hypothesis
from nmt.inference.translator import Translation, Translator, decode_ids, format_output
from nmt.models.zoo import build_model
from nmt.training.checkpoint import save_checkpoint
from tests.test_search import ENDLESS, LENGTHS, TRAP, TableModel, limits, search, sources

# -- decode_ids --------------------------------------------------------------------------------


class ModeRecordingModel(TableModel):
    """Also records whether it was in training mode when asked to encode."""

    def encode(self, src):
        self.training_during_encode = self.training
        return super().encode(src)


def test_decode_ids_keeps_input_order_and_handles_empty_sources():
    rows = [sources(t, length=n)[0].tolist() for t, n in [(TRAP, 2), (LENGTHS, 5), (ENDLESS, 1), (TRAP, 4),
                                                          (ENDLESS, 3), (LENGTHS, 1)]]
    inputs = [rows[0], [], rows[1], rows[2], [], rows[3], rows[4], rows[5]]
    for beam in (1, 3):
        model = ModeRecordingModel().train()
        results = decode_ids(model, inputs, beam=beam, nbest=1, max_len_a=1.0, max_len_b=1, batch_size=2)
        assert model.training and model.training_during_encode is False
        assert len(results) == len(inputs)
        for ids, hyps in zip(inputs, results, strict=True):
            if not ids:
                assert hyps == [Hypothesis([], 0.0, 0.0)]
                continue
            src, max_len = torch.tensor([ids]), limits(len(ids) + 1)  # 1.0 * len + 1
            (alone,) = search(TableModel(), src, max_len, beam)
            assert [h.tokens for h in hyps] == [h.tokens for h in alone]
            assert len(hyps[0].tokens) <= len(ids) + 1


@settings(max_examples=40, deadline=None)
@given(tables=st.lists(st.sampled_from([None, TRAP, LENGTHS, ENDLESS]), max_size=9),
       lengths=st.lists(st.integers(1, 6), min_size=9, max_size=9), batch_size=st.integers(1, 4),
       beam=st.sampled_from([1, 2, 3]))
def test_decode_ids_equals_one_sentence_at_a_time(tables, lengths, batch_size, beam):
    """Property: whatever the batch size and mix of lengths/empties, each source gets what it gets alone."""
    inputs = [[] if t is None else sources(t, length=n)[0].tolist()
              for t, n in zip(tables, lengths[: len(tables)], strict=True)]
    results = decode_ids(TableModel(), inputs, beam=beam, nbest=beam, max_len_a=0.5, max_len_b=2,
                         batch_size=batch_size)
    assert len(results) == len(inputs)
    for ids, hyps in zip(inputs, results, strict=True):
        alone = decode_ids(TableModel(), [ids], beam=beam, nbest=beam, max_len_a=0.5, max_len_b=2)[0]
        assert [(h.tokens, round(h.score, 5)) for h in hyps] == [(h.tokens, round(h.score, 5)) for h in alone]


def test_decode_ids_never_calls_the_model_for_empty_sources():
    model = TableModel()
    assert decode_ids(model, [[], [], []], beam=4) == [[Hypothesis([], 0.0, 0.0)]] * 3
    assert decode_ids(model, []) == []
    assert model.steps == 0


def test_decode_ids_returns_nbest_per_source():
    results = decode_ids(TableModel(), [sources(LENGTHS)[0].tolist(), []], beam=3, nbest=3, max_len_a=0,
                         max_len_b=3)
    assert [h.tokens for h in results[0]] == [[5], [4, 4, 4], []]
    assert len(results[1]) == 1


def test_decode_ids_rejects_bad_sizes():
    with pytest.raises(NmtError, match="nbest"):
        decode_ids(TableModel(), [[TRAP]], beam=2, nbest=3)
    with pytest.raises(NmtError, match="batch size"):
        decode_ids(TableModel(), [[TRAP]], batch_size=0)


# -- format_output ---------------------------------------------------------------------------


def test_format_output_nbest_lines_and_scores():
    results = [[Translation([4], -0.5, -1.0, "a b"), Translation([5], -0.75, -1.5, "c")],
               [Translation([], 0.0, 0.0, "")],
               [Translation([6], -1.0, -2.0, "two\nlines")]]
    assert format_output(results) == ["a b", "", "two lines"]
    assert format_output(results, nbest=2) == ["a b", "c", "", "", "two lines", ""]
    lines = format_output(results, nbest=2, scores=True)
    assert lines[:3] == ["-0.5000\ta b", "-0.7500\tc", "0.0000\t"]
    assert len(lines) == 6 and all(float(line.split("\t")[0]) <= 0 for line in lines)


# -- resolve_device --------------------------------------------------------------------------


def test_resolve_device(monkeypatch):
    cudnn_sdp = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", cudnn_sdp.append)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(NmtError, match="^--device cuda: CUDA is not available on this machine$"):
        resolve_device("cuda")
    with pytest.raises(NmtError, match="expected auto, cpu, cuda"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cudnn_sdp == []
    assert resolve_device("auto") == torch.device("cuda")
    assert cudnn_sdp == [False]  # cuDNN attention plans every new sequence length: left out on CUDA
    with pytest.raises(NmtError, match="1 CUDA device"):
        resolve_device("cuda:3")


# -- the Translator ----------------------------------------------------------------------------

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]
MODEL = {"encoder": {"type": "rnn", "cell": "gru", "hidden_size": 8},
         "decoder": {"type": "rnn", "cell": "gru", "hidden_size": 8}, "attention": {"type": "bahdanau"},
         "embeddings": {"src_dim": 8, "tgt_dim": 8, "dropout": 0.0}}


def make_tokenizer(tmp_path, name: str, seed: int) -> Tokenizer:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    return Tokenizer.load(train_sentencepiece(lines, tmp_path / name, 40, "unigram"))


def save_run(run, model_cfg: dict, src_tok: Tokenizer, tgt_tok: Tokenizer, name: str = "best.pt",
             weights_cfg: dict | None = None) -> None:
    """A run directory as the trainer leaves it; the saved weights are built from `weights_cfg`
    (default: `model_cfg`)."""
    run.mkdir(exist_ok=True)
    cfg = from_dict({"model": model_cfg})
    torch.manual_seed(0)
    weights = build_model(from_dict({"model": weights_cfg or model_cfg}).model, src_tok.vocab_size,
                          tgt_tok.vocab_size).state_dict()
    save_checkpoint(run / name, {"config": to_dict(cfg), "model": weights,
                                 "src_vocab_size": src_tok.vocab_size, "tgt_vocab_size": tgt_tok.vocab_size,
                                 "vocab": {"src": src_tok.fingerprint, "tgt": tgt_tok.fingerprint}})
    src_tok.save(run / "spm.src.model")
    tgt_tok.save(run / "spm.tgt.model")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    work = tmp_path_factory.mktemp("spm")
    return make_tokenizer(work, "src", 1), make_tokenizer(work, "tgt", 2), make_tokenizer(work, "other", 3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizers):
    run = tmp_path_factory.mktemp("run")
    save_run(run, MODEL, tokenizers[0], tokenizers[1])
    return run


def test_translate_keeps_count_order_and_empty_lines(run_dir, tokenizers):
    translator = Translator.load(run_dir)
    lines = ["alpha beta", "", "gamma delta eps zeta", "   ", "theta"]
    for beam in (1, 3):
        results = translator.translate(lines, beam=beam, batch_size=2, quiet=True)
        assert len(results) == len(lines)
        assert results[1] == results[3] == [Translation([], 0.0, 0.0, "")]
        for line, per_line in zip(lines, results, strict=True):
            (single,) = translator.translate([line], beam=beam, quiet=True)  # same result alone
            assert [t.tokens for t in per_line] == [t.tokens for t in single]
            (ids,) = translator.encode([line])
            for t in per_line:
                assert t.text == tokenizers[1].decode(t.tokens)
                assert len(t.tokens) <= 1.5 * len(ids) + 10  # the default length limit
    lines_out = format_output(translator.translate(lines, beam=3, nbest=2, quiet=True), nbest=2, scores=True)
    assert len(lines_out) == 2 * len(lines)


def test_load_accepts_a_checkpoint_file_and_falls_back_to_last(run_dir, tokenizers, tmp_path):
    reference = Translator.load(run_dir).translate(["alpha beta gamma"], beam=2, quiet=True)
    from_file = Translator.load(run_dir / "best.pt")
    assert from_file.translate(["alpha beta gamma"], beam=2, quiet=True) == reference
    only_last = tmp_path / "only_last"
    only_last.mkdir()
    for name in ("spm.src.model", "spm.tgt.model"):
        shutil.copy(run_dir / name, only_last / name)
    shutil.copy(run_dir / "best.pt", only_last / "last.pt")
    assert Translator.load(only_last).translate(["alpha beta gamma"], beam=2, quiet=True) == reference
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NmtError, match="no best.pt or last.pt"):
        Translator.load(empty)
    with pytest.raises(NmtError, match="model not found"):
        Translator.load(tmp_path / "nowhere")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(run_dir / "best.pt", elsewhere / "averaged.pt")  # e.g. `nmt average -o` outside the run
    with pytest.raises(NmtError) as error:
        Translator.load(elsewhere / "averaged.pt")
    assert str(error.value) == f"{elsewhere / 'spm.src.model'}: SentencePiece model not found (a checkpoint's " \
                               "tokenizers are read from its own directory: keep it in its run directory)"


def test_load_rejects_a_sentencepiece_model_of_another_vocabulary(tokenizers, tmp_path):
    save_run(tmp_path, MODEL, tokenizers[0], tokenizers[1])
    tokenizers[2].save(tmp_path / "spm.tgt.model")
    with pytest.raises(NmtError) as error:
        Translator.load(tmp_path)
    assert str(error.value) == f"{tmp_path / 'spm.tgt.model'}: SentencePiece model does not match the " \
                               "checkpoint's vocabulary"


def test_load_rejects_weights_that_do_not_fit_the_config(tokenizers, tmp_path):
    bigger = {**MODEL, "decoder": {**MODEL["decoder"], "hidden_size": 12}}
    save_run(tmp_path, MODEL, tokenizers[0], tokenizers[1], weights_cfg=bigger)
    with pytest.raises(NmtError, match="best.pt: the saved weights do not fit the model its config"):
        Translator.load(tmp_path)


def test_over_long_inputs_are_truncated_with_a_warning(run_dir, capsys):
    translator = Translator.load(run_dir)
    translator.max_input_tokens = 4
    line = "alpha beta gamma delta eps zeta eta theta"
    (ids,) = translator.encode([line])
    assert len(ids) == 4 and ids[-1] == translator.encode(["alpha"])[0][-1]  # EOS kept
    assert "line 1" in capsys.readouterr().err
    translator.translate([line], beam=2, quiet=True)
    assert capsys.readouterr().err == ""
