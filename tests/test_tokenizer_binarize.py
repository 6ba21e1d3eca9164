"""SentencePiece wrapper, `nmt preprocess` (layout, filters, safety), and the memory-mapped dataset."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from nmt.config import from_dict
from nmt.data.binarize import PairFilter, preprocess
from nmt.data.corpus import iter_lines
from nmt.data.dataset import ParallelData, open_training_data, read_text
from nmt.data.tokenizer import Tokenizer, encode_source, train_sentencepiece
from nmt.errors import NmtError
from nmt.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

WORDS = "the a cat dog house tree runs sleeps sees big small red green river stone bird over under".split()
SPLITS = ("train", "valid", "test")


def sentence(rng: random.Random, n_min: int = 2, n_max: int = 9) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(n_min, n_max)))


def target_of(source: str) -> str:
    """A toy 'translation' with its own alphabet, so separate vocabularies really differ."""
    return " ".join(w[::-1].upper() for w in reversed(source.split()))


def write_corpus(folder: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, list[str]]:
    """train/valid/test .en/.de files; returns the source lines per split."""
    rng = random.Random(seed)
    sources = {}
    for split, n in (sizes or {"train": 300, "valid": 15, "test": 12}).items():
        sources[split] = [sentence(rng) for _ in range(n)]
        write_lines(folder / f"{split}.en", sources[split])
        write_lines(folder / f"{split}.de", [target_of(s) for s in sources[split]])
    return sources


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def make_config(folder: Path, out: str = "data", test: bool = True, **data):
    vocab = data.pop("vocab", {})
    section = {"src_lang": "en", "tgt_lang": "de", "train": str(folder / "train"),
               "valid": str(folder / "valid"), "test": str(folder / "test") if test else None,
               "dir": str(folder / out),
               "vocab": {"size": 60, **vocab}, **data}
    return from_dict({"data": section})


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One preprocessed corpus (joint unigram vocabulary) shared by the read-only tests."""
    folder = tmp_path_factory.mktemp("prepared")
    sources = write_corpus(folder)
    stats = preprocess(make_config(folder), quiet=True)
    return folder, folder / "data", sources, stats


# ----------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    lines = [sentence(random.Random(i)) for i in range(200)]
    return train_sentencepiece(iter(lines), folder / "m", 40, "unigram", 1.0, 1000), lines


def test_trained_model_has_our_special_ids_and_roundtrips(trained_model):
    path, lines = trained_model
    assert path.name == "m.model"
    tok = Tokenizer.load(path)
    sp = tok.sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert 4 < tok.vocab_size <= 40
    ids = tok.encode(lines[0])
    assert ids and all(i > EOS_ID for i in ids)
    assert tok.decode(ids) == lines[0]
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == lines[0]
    assert tok.encode_batch(lines[:3]) == [tok.encode(s) for s in lines[:3]]
    assert tok.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()


def test_unknown_characters_map_to_unk(trained_model):
    tok = Tokenizer.load(trained_model[0])
    assert UNK_ID in tok.encode("zebra §")


def test_encode_source_appends_eos_even_to_empty_text(trained_model):
    tok = Tokenizer.load(trained_model[0])
    assert encode_source(tok, "the cat") == [*tok.encode("the cat"), EOS_ID]
    assert encode_source(tok, "") == [EOS_ID]


def test_training_is_quiet_and_deterministic(tmp_path, capfd):
    lines = [sentence(random.Random(i)) for i in range(300)]
    a = train_sentencepiece(lines, tmp_path / "a", 50, "bpe", 1.0, 200, seed=3)
    b = train_sentencepiece(lines, tmp_path / "b", 50, "bpe", 1.0, 200, seed=3)
    assert a.read_bytes() == b.read_bytes()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_a_tiny_alphabet_does_not_fail_a_large_vocab_size(tmp_path):
    path = train_sentencepiece(["ab ba ab", "ba ab"] * 20, tmp_path / "t", 8000, "unigram", 1.0, 1000)
    assert Tokenizer.load(path).vocab_size < 100


def test_vocab_size_below_the_alphabet_is_an_nmt_error(tmp_path):
    with pytest.raises(NmtError, match=r"^data\.vocab: SentencePiece training failed: Vocabulary size is"):
        train_sentencepiece(["abcdefghijklmnop qrstuvwxyz"] * 5, tmp_path / "t", 8, "bpe", 1.0, 1000)


def test_too_few_sample_sentences_is_an_nmt_error(tmp_path):
    with pytest.raises(NmtError, match=r"^data\.vocab\.sample_sentences: must be > 100"):
        train_sentencepiece(["a b"] * 5, tmp_path / "t", 8, "bpe", 1.0, 50)


def test_errors_while_reading_training_text_keep_their_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nanother\n\xff\n")
    with pytest.raises(NmtError, match=rf"^{bad}:3: invalid UTF-8"):
        train_sentencepiece(iter_lines(bad), tmp_path / "t", 20, "unigram", 1.0, 1000)
    assert not (tmp_path / "t.model").exists()


def test_load_errors(tmp_path):
    with pytest.raises(NmtError, match=r"^data\.vocab\.src_model: .*nope\.model: SentencePiece model not"):
        Tokenizer.load(tmp_path / "nope.model", key="data.vocab.src_model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00 certainly not a protobuf")
    with pytest.raises(NmtError, match=rf"^{junk}: not a SentencePiece model"):
        Tokenizer.load(junk)
    junk.write_bytes(b"")
    with pytest.raises(NmtError, match=rf"^{junk}: not a SentencePiece model"):
        Tokenizer.load(junk)


def foreign_model(path: Path) -> Path:
    """A SentencePiece model with SentencePiece's default ids (unk=0, bos=1, eos=2, no pad)."""
    buffer = io.BytesIO()
    lines = [sentence(random.Random(i)) for i in range(100)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, vocab_size=30,
                                   minloglevel=2, hard_vocab_limit=False)
    path.write_bytes(buffer.getvalue())
    return path


def test_a_model_with_other_special_ids_is_rejected(tmp_path):
    model = foreign_model(tmp_path / "foreign.model")
    with pytest.raises(NmtError, match="special token ids must be pad=0, unk=1, bos=2, eos=3"):
        Tokenizer.load(model)


# ----------------------------------------------------------------------------------------------
# preprocess: layout and contents


@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("vocab_type", ["unigram", "bpe"])
def test_preprocess_writes_the_layout(tmp_path, joint, vocab_type):
    sources = write_corpus(tmp_path)
    stats = preprocess(make_config(tmp_path, vocab={"joint": joint, "type": vocab_type}), quiet=True)
    out = tmp_path / "data"
    expected = {"spm.src.model", "spm.tgt.model", "stats.json"}
    for split in SPLITS:
        for side in ("src", "tgt"):
            expected |= {f"{split}.{side}.ids.npy", f"{split}.{side}.offsets.npy"}
            if split != "train":
                expected.add(f"{split}.{side}.txt")
    assert set(os.listdir(out)) == expected
    assert json.loads((out / "stats.json").read_text()) == stats
    same = (out / "spm.src.model").read_bytes() == (out / "spm.tgt.model").read_bytes()
    assert same == joint
    assert stats["vocab"]["joint"] is joint and stats["vocab"]["type"] == vocab_type
    assert (stats["vocab"]["src"]["fingerprint"] == stats["vocab"]["tgt"]["fingerprint"]) == joint
    for split in SPLITS:
        assert stats["splits"][split]["pairs"] == len(sources[split])
        data = ParallelData.open(out, split)
        assert len(data) == len(sources[split])
        for side in ("src", "tgt"):
            ids = np.load(out / f"{split}.{side}.ids.npy")
            offsets = np.load(out / f"{split}.{side}.offsets.npy")
            assert ids.dtype == np.int32 and offsets.dtype == np.int64
            assert len(offsets) == len(sources[split]) + 1 and offsets[0] == 0 and offsets[-1] == len(ids)
            assert stats["splits"][split][f"{side}_tokens"] == len(ids)
    assert stats["summary"]["train_pairs"] == 300 and stats["summary"]["test_pairs"] == 12


def test_stored_ids_equal_the_tokenizer_output(prepared):
    folder, out, sources, _ = prepared
    src_tok, tgt_tok = Tokenizer.load(out / "spm.src.model"), Tokenizer.load(out / "spm.tgt.model")
    for split in SPLITS:
        data = ParallelData.open(out, split)
        for i in range(0, len(data), 7):
            assert data.src(i).dtype == np.int32
            assert data.src(i).tolist() == src_tok.encode(sources[split][i])
            assert data.tgt(i).tolist() == tgt_tok.encode(target_of(sources[split][i]))
            assert data.source_ids(i) == encode_source(src_tok, sources[split][i])
        assert data.src_lengths.tolist() == [len(src_tok.encode(s)) for s in sources[split]]
        assert data.tgt_lengths.tolist() == [len(tgt_tok.encode(target_of(s))) for s in sources[split]]


def test_arrays_are_memory_mapped(prepared):
    data = ParallelData.open(prepared[1], "train")
    assert isinstance(data.src_side.ids, np.memmap)


def test_reference_text_is_the_raw_lines(prepared):
    _, out, sources, _ = prepared
    for split in ("valid", "test"):
        assert read_text(out, split, "src") == sources[split]
        assert read_text(out, split, "tgt") == [target_of(s) for s in sources[split]]


def test_dataset_errors_name_what_is_missing(prepared, tmp_path):
    folder, out, _, _ = prepared
    with pytest.raises(NmtError, match="data directory not found"):
        ParallelData.open(tmp_path / "nowhere", "train")
    with pytest.raises(NmtError, match=r"not a preprocessed data directory \(no stats.json"):
        ParallelData.open(folder, "train")
    with pytest.raises(NmtError, match=r"dev\.src\.ids\.npy: missing"):
        ParallelData.open(out, "dev")
    with pytest.raises(NmtError, match=r"train\.src\.txt: missing"):
        read_text(out, "train", "src")


def test_corrupt_offsets_are_reported(tmp_path):
    write_corpus(tmp_path, {"train": 50, "valid": 5})
    preprocess(make_config(tmp_path, test=False), quiet=True)
    offsets = tmp_path / "data" / "valid.tgt.offsets.npy"
    np.save(offsets, np.array([0, 1, 2], dtype=np.int64))
    with pytest.raises(NmtError, match=rf"{offsets}: does not describe valid\.tgt\.ids\.npy"):
        ParallelData.open(tmp_path / "data", "valid")


def test_no_test_split_writes_none(tmp_path):
    write_corpus(tmp_path, {"train": 40, "valid": 4})
    stats = preprocess(make_config(tmp_path, test=False), quiet=True)
    assert set(stats["splits"]) == {"train", "valid"}
    assert not list((tmp_path / "data").glob("test.*"))


def test_gzip_and_crlf_inputs(tmp_path):
    import gzip

    write_corpus(tmp_path, {"valid": 5})
    with gzip.open(tmp_path / "train.en.gz", "wb") as f:
        f.write(b"the cat\r\nthe dog runs\r\na tree")
    (tmp_path / "train.de").write_bytes(b"TAC EHT\r\nSNUR GOD EHT\r\nEERT A")
    stats = preprocess(make_config(tmp_path, test=False), quiet=True)
    assert stats["splits"]["train"]["pairs"] == 3
    assert stats["splits"]["train"]["src_file"].endswith("train.en.gz")


def test_progress_goes_to_stderr_only_and_quiet_silences_it(tmp_path, capfd):
    write_corpus(tmp_path, {"train": 30, "valid": 3})
    preprocess(make_config(tmp_path, test=False), quiet=False)
    loud = capfd.readouterr()
    assert loud.out == "" and "training a unigram SentencePiece model" in loud.err
    preprocess(make_config(tmp_path, test=False, out="data2"), quiet=True)
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("copies", [0, 2])
def test_preprocess_is_deterministic(tmp_path, copies):
    write_corpus(tmp_path)
    preprocess(make_config(tmp_path, out="one", sampling={"copies": copies}), quiet=True)
    preprocess(make_config(tmp_path, out="two", sampling={"copies": copies}), quiet=True)
    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    one.pop("stats.json"), two.pop("stats.json")  # they name their own directory
    assert one == two


# ----------------------------------------------------------------------------------------------
# preprocess: filters


def test_pair_filter_reasons():
    f = PairFilter(max_len=10, max_len_ratio=2.0)
    assert f.reason(0, 3) == "empty" and f.reason(3, 0) == "empty"
    assert f.reason(11, 10) == "too_long" and f.reason(10, 11) == "too_long"
    assert f.reason(2, 5) == "ratio" and f.reason(5, 2) == "ratio"
    assert f.reason(10, 10) is None and f.reason(2, 4) is None and f.reason(1, 1) is None


def test_filters_apply_to_training_pairs_only(tmp_path):
    write_corpus(tmp_path, {"test": 3})
    long_line = " ".join(["river"] * 30)
    train_src = ["the cat", "", "the dog", long_line, "a", "big red tree", "   "]
    train_tgt = ["TAC EHT", "GOD", "", long_line.upper(), "A " * 10, "EERT DER GIB", "X"]
    write_lines(tmp_path / "train.en", train_src)
    write_lines(tmp_path / "train.de", train_tgt)
    valid_src, valid_tgt = ["", long_line, "a"], ["SOMETHING", "", "A " * 20]
    write_lines(tmp_path / "valid.en", valid_src)
    write_lines(tmp_path / "valid.de", valid_tgt)
    stats = preprocess(make_config(tmp_path, max_len=12, max_len_ratio=4.0), quiet=True)
    train = stats["splits"]["train"]
    assert train["pairs_read"] == 7 and train["pairs"] == 2
    assert train["filtered"] == {"empty": 3, "too_long": 1, "ratio": 1}
    assert stats["summary"]["train_filtered"] == 5
    assert stats["splits"]["valid"]["pairs"] == 3 and "filtered" not in stats["splits"]["valid"]
    out = tmp_path / "data"
    tok = Tokenizer.load(out / "spm.src.model")
    kept = ParallelData.open(out, "train")
    kept_src = [kept.src(i).tolist() for i in range(len(kept))]
    assert kept_src == [tok.encode("the cat"), tok.encode("big red tree")]
    assert read_text(out, "valid", "src") == valid_src and read_text(out, "valid", "tgt") == valid_tgt
    valid = ParallelData.open(out, "valid")
    assert valid.src_lengths[0] == 0 and valid.source_ids(0) == [EOS_ID]


def test_everything_filtered_is_an_error_naming_the_filters(tmp_path):
    write_corpus(tmp_path, {"valid": 3})
    write_lines(tmp_path / "train.en", ["the cat sees the dog"] * 5)
    write_lines(tmp_path / "train.de", ["GOD EHT SEES TAC EHT"] * 5)
    with pytest.raises(NmtError, match=r"no training pairs left after filtering.*max_len=2.*max_len_ratio"):
        preprocess(make_config(tmp_path, test=False, max_len=2), quiet=True)
    assert not (tmp_path / "data").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


# ----------------------------------------------------------------------------------------------
# preprocess: sampled segmentations of the training data (data.sampling)


@pytest.mark.parametrize("vocab_type", ["bpe", "unigram"])
def test_sampled_copies_segment_the_kept_pairs_anew(tmp_path, vocab_type):
    sources = write_corpus(tmp_path)
    write_lines(tmp_path / "train.en", [*sources["train"], " ".join(["river"] * 200)])  # dropped: too long
    write_lines(tmp_path / "train.de", [*map(target_of, sources["train"]), "REVIR"])
    cfg = make_config(tmp_path, max_len=150, max_len_ratio=10.0, vocab={"type": vocab_type},
                      sampling={"copies": 2, "alpha": 0.3})
    stats = preprocess(cfg, quiet=True)
    out = tmp_path / "data"
    train = stats["splits"]["train"]
    assert train["pairs"] == 300 and train["filtered"]["too_long"] == 1
    sets = open_training_data(out)
    assert [len(s) for s in sets] == [300, 300, 300]
    assert not list(out.glob("valid-*")) and not list(out.glob("test-*"))
    tokenizers = {"src": Tokenizer.load(out / "spm.src.model"), "tgt": Tokenizer.load(out / "spm.tgt.model")}
    plain = sets[0]
    for side, tok in tokenizers.items():
        lengths = [getattr(s, f"{side}_lengths") for s in sets]
        assert train["sampled"][f"{side}_tokens"] == [int(x.sum()) for x in lengths[1:]]
        assert all((x >= lengths[0]).all() for x in lengths[1:])  # sampling only splits more
        for copy in sets[1:]:
            read = getattr(copy, side)
            assert all(tok.decode(read(i)) == tok.decode(getattr(plain, side)(i)) for i in range(300))
            assert any(read(i).tolist() != getattr(plain, side)(i).tolist() for i in range(300))
        assert not np.array_equal(lengths[1], lengths[2])  # two different samples
    assert train["sampled"]["copies"] == 2 and train["sampled"]["alpha"] == 0.3


def test_without_sampling_there_is_one_training_set(prepared):
    _, out, sources, stats = prepared
    assert "sampled" not in stats["splits"]["train"]
    assert [len(s) for s in open_training_data(out)] == [len(sources["train"])]


# ----------------------------------------------------------------------------------------------
# preprocess: the output directory is never half-written or clobbered


def test_non_empty_output_dir_without_force_is_untouched(tmp_path):
    write_corpus(tmp_path)
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = tree(out)
    with pytest.raises(NmtError, match=rf"^{out}: output directory is not empty \(use --force to overwrite"):
        preprocess(make_config(tmp_path), quiet=True)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{s}.{lang}" for s in SPLITS for lang in ("en", "de")] + ["data"])


def test_force_replaces_a_previous_output(tmp_path):
    write_corpus(tmp_path)
    first = preprocess(make_config(tmp_path), quiet=True)
    with pytest.raises(NmtError, match="not empty"):
        preprocess(make_config(tmp_path, max_len=5), quiet=True)
    second = preprocess(make_config(tmp_path, max_len=5), force=True, quiet=True)
    assert second["splits"]["train"]["pairs"] < first["splits"]["train"]["pairs"]
    assert json.loads((tmp_path / "data" / "stats.json").read_text()) == second
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_force_refuses_to_delete_a_directory_preprocess_did_not_write(tmp_path):
    write_corpus(tmp_path)
    out = tmp_path / "data"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(NmtError, match="--force only replaces a directory written by `nmt preprocess`"):
        preprocess(make_config(tmp_path), force=True, quiet=True)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_an_empty_existing_output_dir_is_fine(tmp_path):
    write_corpus(tmp_path, {"train": 30, "valid": 3})
    (tmp_path / "data").mkdir()
    preprocess(make_config(tmp_path, test=False), quiet=True)
    assert (tmp_path / "data" / "stats.json").is_file()


def test_a_failure_half_way_leaves_nothing_behind(tmp_path):
    write_corpus(tmp_path)
    (tmp_path / "test.de").write_bytes(b"OK\n" * 11 + b"\xff\n")  # the last split read is broken
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(NmtError, match=r"test\.de:12: invalid UTF-8"):
        preprocess(make_config(tmp_path), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_failure_keeps_the_previous_output_with_force(tmp_path):
    write_corpus(tmp_path)
    preprocess(make_config(tmp_path), quiet=True)
    before = tree(tmp_path / "data")
    (tmp_path / "valid.en").write_bytes(b"bad \x00 line\n" * 15)
    with pytest.raises(NmtError, match="contains a NUL byte"):
        preprocess(make_config(tmp_path), force=True, quiet=True)
    assert tree(tmp_path / "data") == before


def test_output_path_that_is_a_file(tmp_path):
    write_corpus(tmp_path)
    (tmp_path / "data").write_text("x")
    with pytest.raises(NmtError, match="exists and is not a directory"):
        preprocess(make_config(tmp_path), force=True, quiet=True)


# ----------------------------------------------------------------------------------------------
# preprocess: input and config problems


def test_mismatched_line_counts_fail_before_any_work(tmp_path):
    write_corpus(tmp_path)
    write_lines(tmp_path / "valid.de", ["ONLY ONE"])
    with pytest.raises(NmtError, match=r"valid\.en has 15 lines but .*valid\.de has 1"):
        preprocess(make_config(tmp_path), quiet=True)
    assert not (tmp_path / "data").exists()


def test_empty_training_file(tmp_path):
    write_corpus(tmp_path, {"valid": 3})
    write_lines(tmp_path / "train.en", [])
    write_lines(tmp_path / "train.de", [])
    with pytest.raises(NmtError, match=r"train\.en: empty file \(data\.train needs at least one sentence"):
        preprocess(make_config(tmp_path, test=False), quiet=True)


def test_missing_corpus_names_both_candidates(tmp_path):
    write_corpus(tmp_path, {"train": 10, "valid": 3})
    with pytest.raises(NmtError, match=r"test\.en: file not found \(nor .*test\.en\.gz\)"):
        preprocess(make_config(tmp_path), quiet=True)


def test_required_keys(tmp_path):
    cfg = from_dict({"data": {"train": "x"}})
    with pytest.raises(NmtError, match=r"2 problems: data\.valid: required .*; data\.dir: required"):
        preprocess(cfg, quiet=True)


# ----------------------------------------------------------------------------------------------
# preprocess: reusing SentencePiece models


def test_reuse_a_joint_model(prepared, tmp_path):
    _, out, _, stats = prepared
    write_corpus(tmp_path, {"train": 40, "valid": 4}, seed=5)
    model = str(out / "spm.src.model")
    again = preprocess(make_config(tmp_path, test=False, vocab={"src_model": model}), quiet=True)
    assert again["vocab"]["src"]["fingerprint"] == stats["vocab"]["src"]["fingerprint"]
    assert again["vocab"]["tgt"]["fingerprint"] == stats["vocab"]["src"]["fingerprint"]
    assert again["vocab"]["src"]["model"] == model
    assert (tmp_path / "data" / "spm.tgt.model").read_bytes() == (out / "spm.src.model").read_bytes()


def test_reuse_separate_models_or_train_the_missing_side(prepared, tmp_path):
    _, out, _, stats = prepared
    write_corpus(tmp_path, {"train": 40, "valid": 4}, seed=5)
    model = str(out / "spm.src.model")
    both = preprocess(make_config(tmp_path, test=False, out="both",
                                  vocab={"joint": False, "src_model": model, "tgt_model": model}), quiet=True)
    assert both["vocab"]["src"]["model"] == both["vocab"]["tgt"]["model"] == model
    one = preprocess(make_config(tmp_path, test=False, out="one", vocab={"joint": False, "tgt_model": model}),
                     quiet=True)
    assert one["vocab"]["src"]["model"] == "trained"
    assert one["vocab"]["tgt"]["fingerprint"] == stats["vocab"]["tgt"]["fingerprint"]
    assert one["vocab"]["src"]["fingerprint"] != stats["vocab"]["src"]["fingerprint"]


def test_reused_model_with_wrong_special_ids_names_the_key(tmp_path):
    write_corpus(tmp_path, {"train": 20, "valid": 2})
    model = foreign_model(tmp_path / "foreign.model")
    cfg = make_config(tmp_path, test=False, vocab={"joint": False, "tgt_model": str(model)})
    with pytest.raises(NmtError, match=r"^data\.vocab\.tgt_model: .*foreign\.model: special token ids"):
        preprocess(cfg, quiet=True)
    assert not (tmp_path / "data").exists()


def test_joint_vocabulary_with_a_target_model_is_a_config_error(tmp_path):
    write_corpus(tmp_path, {"train": 20, "valid": 2})
    cfg = make_config(tmp_path, test=False, vocab={"tgt_model": "x.model"})
    with pytest.raises(NmtError, match=r"data\.vocab\.tgt_model: only for separate vocabularies"):
        preprocess(cfg, quiet=True)
