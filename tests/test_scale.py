"""Large corpora: parallel encoding, sharded output, sampled SentencePiece training, and a dataset whose
resident memory is its length index, not its token arrays."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from nmt.data import binarize
from nmt.data.batching import collate, token_batches
from nmt.data.binarize import PairFilter, _sample_lines, preprocess
from nmt.data.dataset import ParallelData, sampled_split
from nmt.errors import NmtError
from tests.test_tokenizer_binarize import make_config, target_of, write_corpus, write_lines

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def two_ways(tmp_path_factory):
    """One corpus preprocessed in this process (plain layout) and by 2 workers in shards of 300, each with
    a sampled copy of the training data."""
    folder = tmp_path_factory.mktemp("scale")
    write_corpus(folder, {"train": 1000, "valid": 40, "test": 30})
    sampling = {"copies": 1, "alpha": 0.2}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(binarize, "CHUNK_LINES", 64)  # many chunks, so that the workers really share them
        plain = preprocess(make_config(folder, out="plain", workers=1, max_len=30, sampling=sampling), quiet=True)
        sharded = preprocess(make_config(folder, out="sharded", workers=2, shard_size=300, max_len=30,
                                         sampling=sampling), quiet=True)
    return folder, plain, sharded


def test_shards_and_workers_change_nothing_but_the_file_layout(two_ways):
    folder, plain, sharded = two_ways
    assert plain["splits"]["train"]["shards"] == 1
    train = sharded["splits"]["train"]
    assert train["pairs"] < train["pairs_read"] == 1000  # max_len=30 drops some pairs
    assert train["shards"] == -(-train["pairs"] // 300)
    names = {p.name for p in (folder / "sharded").iterdir()}
    for side in ("src", "tgt"):
        assert {f"train.{side}.{k:05d}.{kind}.npy" for k in range(train["shards"]) for kind in ("ids", "offsets")} \
            <= names
        assert f"train.{side}.ids.npy" not in names and f"valid.{side}.ids.npy" in names  # valid: one shard
    assert not [n for n in names if "partial" in n or n.startswith(".")]
    for key in ("splits", "vocab", "summary"):
        a, b = dict(plain[key]), dict(sharded[key])
        if key == "summary":
            a.pop("dir"), b.pop("dir")
        if key == "splits":
            a, b = {s: {**v, "shards": 0} for s, v in a.items()}, {s: {**v, "shards": 0} for s, v in b.items()}
        assert a == b, key


def test_sharded_data_reads_like_plain_data(two_ways):
    folder = two_ways[0]
    for split in (*SPLITS, sampled_split(1)):
        one, many = ParallelData.open(folder / "plain", split), ParallelData.open(folder / "sharded", split)
        assert len(one) == len(many)
        assert np.array_equal(one.src_lengths, many.src_lengths) and np.array_equal(one.tgt_lengths, many.tgt_lengths)
        for i in range(len(one)):
            assert one.src(i).tolist() == many.src(i).tolist() and one.tgt(i).tolist() == many.tgt(i).tolist()
        if split in ("valid", "test"):
            for side in ("src", "tgt"):
                name = f"{split}.{side}.txt"
                assert (folder / "plain" / name).read_text() == (folder / "sharded" / name).read_text()
    many = ParallelData.open(folder / "sharded", "train")
    assert len(many.src_side.shards) > 1 and all(isinstance(ids, np.memmap) for ids, _ in many.src_side.shards)
    one = ParallelData.open(folder / "plain", "train")
    for idx in token_batches(one.src_lengths, one.tgt_lengths, 200, seed=3, epoch=0):  # batches across shards
        a, b = collate(one, idx), collate(many, idx)
        assert a.src.equal(b.src) and a.tgt_in.equal(b.tgt_in) and a.tgt_out.equal(b.tgt_out)


def test_filters_in_workers_match_the_pair_filter(two_ways):
    folder, _, sharded = two_ways
    f = PairFilter(max_len=9, max_len_ratio=3.0)
    n_src, n_tgt = np.array([0, 3, 10, 2, 9, 1, 4]), np.array([2, 0, 3, 7, 9, 3, 4])
    expected = [0 if f.reason(a, b) is None else 1 + binarize.FILTER_REASONS.index(f.reason(a, b))
                for a, b in zip(n_src, n_tgt, strict=True)]
    assert f.codes(n_src, n_tgt).tolist() == expected == [1, 1, 2, 3, 0, 0, 0]
    assert sum(sharded["splits"]["train"]["filtered"].values()) == 1000 - sharded["splits"]["train"]["pairs"]


def test_missing_or_renumbered_shards_are_reported(two_ways, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(two_ways[0] / "sharded", data)
    (data / "train.tgt.00001.ids.npy").rename(data / "train.tgt.00007.ids.npy")
    with pytest.raises(NmtError, match=r"shards of train\.tgt are not numbered 0 to"):
        ParallelData.open(data, "train")
    (data / "train.tgt.00007.ids.npy").rename(data / "train.tgt.00001.ids.npy")
    (data / "train.src.00001.offsets.npy").unlink()
    with pytest.raises(NmtError, match=r"train\.src\.00001\.offsets\.npy: missing"):
        ParallelData.open(data, "train")


def test_errors_in_a_worker_name_file_and_line(tmp_path, monkeypatch):
    write_corpus(tmp_path, {"train": 300, "valid": 5})
    lines = (tmp_path / "train.de").read_bytes().splitlines(keepends=True)
    lines[250] = b"caf\xe9\n"
    (tmp_path / "train.de").write_bytes(b"".join(lines))
    monkeypatch.setattr(binarize, "CHUNK_LINES", 50)
    with pytest.raises(NmtError, match=r"train\.de:251: invalid UTF-8"):
        preprocess(make_config(tmp_path, test=False, workers=2, vocab={"src_model": None}), quiet=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sentencepiece_sees_a_sample_of_a_large_corpus(tmp_path):
    path = tmp_path / "big.txt"
    write_lines(path, [f"line {i}" for i in range(20000)])
    sample = list(_sample_lines([path], 20000, 2000))
    assert 1700 < len(sample) < 2300  # each line with probability 0.1
    assert sample == sorted(sample, key=lambda s: int(s.split()[1]))  # in corpus order, no duplicates
    assert len(set(sample)) == len(sample)
    assert sample == list(_sample_lines([path], 20000, 2000))  # deterministic
    assert list(_sample_lines([path], 20000, 50000)) == [f"line {i}" for i in range(20000)]


def test_preprocess_reports_the_sample(tmp_path, capfd):
    write_corpus(tmp_path, {"train": 300, "valid": 3})
    preprocess(make_config(tmp_path, test=False, vocab={"sample_sentences": 200}), quiet=False)
    assert "a sample of about 200 of 600 lines" in capfd.readouterr().err


def rss_kb(kind: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1])
    raise KeyError(kind)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_opening_a_large_split_costs_its_length_index_not_its_tokens(tmp_path):
    """1M sentences of 24 tokens: 96 MB of ids per side; opening the data set may cost ~8 MB per side."""
    n, width = 1_000_000, 24
    for side in ("src", "tgt"):
        np.save(tmp_path / f"train.{side}.ids.npy", np.arange(n * width, dtype=np.int64).astype(np.int32) % 500 + 4)
        np.save(tmp_path / f"train.{side}.offsets.npy", np.arange(0, n * width + 1, width, dtype=np.int64))
    (tmp_path / "stats.json").write_text(json.dumps({}))
    anon, files = rss_kb("RssAnon"), rss_kb("RssFile")
    data = ParallelData.open(tmp_path, "train")
    batches = token_batches(data.src_lengths, data.tgt_lengths, 2000, seed=1, epoch=0)
    for idx in batches[:20]:
        collate(data, idx)
    index_kb = 2 * n * 8 // 1024  # two int64 length arrays
    assert rss_kb("RssAnon") - anon < index_kb * 4 + 16_000  # lengths + batching's sort keys, not 192 MB of ids
    assert rss_kb("RssFile") - files < 16_000  # only the pages of the sentences collated were mapped in
    assert len(data) == n and data.src(123_456).tolist()[:2] == [(123_456 * width) % 500 + 4,
                                                                  (123_456 * width + 1) % 500 + 4]


def test_target_helper_is_what_the_corpus_uses():
    assert target_of("the cat") == "TAC EHT"
