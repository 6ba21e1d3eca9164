"""Token-budget batching, decoding batches, sharding, and collation into padded tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt.data.batching import (
    Batch,
    collate,
    padded_widths,
    padding_ratio,
    sentence_batches,
    token_batches,
)
from nmt.data.dataset import ParallelData
from nmt.vocab import BOS_ID, EOS_ID, PAD_ID


def random_lengths(n: int, seed: int = 0, high: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, high, n), rng.integers(0, high, n)


def assert_exact_cover(batches: list[np.ndarray], n: int) -> None:
    flat = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert sorted(flat.tolist()) == list(range(n))


def assert_within_budget(batches, src, tgt, budget) -> None:
    widths = padded_widths(src, tgt)
    for idx in batches:
        assert len(idx) == 1 or len(idx) * widths[idx].max() <= budget


def test_every_example_once_and_budget_respected():
    src, tgt = random_lengths(2000)
    batches = token_batches(src, tgt, batch_tokens=500, seed=1, epoch=0)
    assert_exact_cover(batches, 2000)
    assert_within_budget(batches, src, tgt, 500)
    assert np.mean([len(b) for b in batches]) > 10  # batches are really filled


def test_width_counts_bos_eos_and_the_longer_side():
    assert padded_widths(np.array([3, 0, 7]), np.array([5, 0, 2])).tolist() == [6, 1, 8]
    # five pairs of width 5 and a 20-token budget: four fit exactly, the fifth goes alone
    batches = token_batches(np.full(5, 4), np.full(5, 2), batch_tokens=20, seed=0, epoch=0)
    assert sorted(len(b) for b in batches) == [1, 4]


def test_greedy_packing_leaves_no_room_for_the_next_pair():
    src, tgt = random_lengths(500, seed=3)
    widths = padded_widths(src, tgt)
    batches = token_batches(src, tgt, batch_tokens=300, seed=0, epoch=0, shuffle=False)
    flat = np.concatenate(batches)
    assert (np.diff(widths[flat]) >= 0).all()  # without shuffling: sorted by width
    for current, following in zip(batches, batches[1:], strict=False):
        grown = np.append(current, following[0])
        assert len(grown) * widths[grown].max() > 300


def test_oversized_examples_form_their_own_batches():
    src = np.array([3, 100, 2, 250, 4])
    tgt = np.array([3, 5, 2, 1, 4])
    batches = token_batches(src, tgt, batch_tokens=50, seed=0, epoch=0)
    assert_exact_cover(batches, 5)
    singles = sorted(int(b[0]) for b in batches if len(b) == 1)
    assert 1 in singles and 3 in singles
    assert_within_budget(batches, src, tgt, 50)


def test_deterministic_per_seed_and_epoch_and_different_across_epochs():
    src, tgt = random_lengths(1000, high=12)  # many equal widths: the tie-break matters

    def run(seed, epoch):
        return [b.tolist() for b in token_batches(src, tgt, 200, seed=seed, epoch=epoch)]
    assert run(1, 0) == run(1, 0)
    assert run(1, 0) != run(1, 1)
    assert run(1, 0) != run(2, 0)
    def groups(batches):
        return sorted(sorted(b) for b in batches)

    assert groups(run(1, 0)) != groups(run(1, 1))  # not just reordered: regrouped


def test_unshuffled_batches_do_not_depend_on_seed_or_epoch():
    src, tgt = random_lengths(300)
    a = token_batches(src, tgt, 256, seed=1, epoch=0, shuffle=False)
    b = token_batches(src, tgt, 256, seed=9, epoch=4, shuffle=False)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_batch_order_is_shuffled():
    src, tgt = random_lengths(2000)
    widest = [int(padded_widths(src, tgt)[b].max()) for b in token_batches(src, tgt, 400, seed=1, epoch=0)]
    assert widest != sorted(widest) and widest != sorted(widest, reverse=True)


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_rank_shards_are_disjoint_and_cover_the_epoch(world_size):
    src, tgt = random_lengths(777, seed=5)
    full = token_batches(src, tgt, 300, seed=4, epoch=2)
    shards = [token_batches(src, tgt, 300, seed=4, epoch=2, rank=r, world_size=world_size)
              for r in range(world_size)]
    assert_exact_cover([b for shard in shards for b in shard], 777)
    assert sum(len(s) for s in shards) == len(full)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_invalid_arguments():
    src, tgt = random_lengths(10)
    with pytest.raises(ValueError, match="rank"):
        token_batches(src, tgt, 100, 0, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_tokens"):
        token_batches(src, tgt, 0, 0, 0)
    with pytest.raises(ValueError, match="equal in size"):
        token_batches(src, tgt[:5], 100, 0, 0)
    with pytest.raises(ValueError, match="batch_size"):
        sentence_batches(src, 0)


def test_empty_input_gives_no_batches():
    empty = np.array([], dtype=np.int64)
    assert token_batches(empty, empty, 100, 0, 0) == []
    assert sentence_batches(empty, 4) == []


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), max_size=300),
       budget=st.integers(1, 3000), seed=st.integers(-(2**40), 2**40), epoch=st.integers(0, 1000),
       shuffle=st.booleans(), world_size=st.integers(1, 4))
def test_property_exact_cover_and_budget(lengths, budget, seed, epoch, shuffle, world_size):
    src = np.array([s for s, _ in lengths], dtype=np.int64)
    tgt = np.array([t for _, t in lengths], dtype=np.int64)
    shards = [token_batches(src, tgt, budget, seed, epoch, shuffle=shuffle, rank=r, world_size=world_size)
              for r in range(world_size)]
    batches = [b for shard in shards for b in shard]
    assert all(len(b) > 0 for b in batches)
    assert_exact_cover(batches, len(lengths))
    assert_within_budget(batches, src, tgt, budget)


def test_sentence_batches_longest_first_fixed_size():
    lengths = np.array([3, 9, 1, 9, 5, 7, 2])
    batches = sentence_batches(lengths, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert_exact_cover(batches, 7)
    flat = np.concatenate(batches)
    assert lengths[flat].tolist() == sorted(lengths.tolist(), reverse=True)
    assert flat[:2].tolist() == [1, 3]  # ties keep input order


# ----------------------------------------------------------------------------------------------
# collate


def write_data_dir(folder: Path, split: str, src: list[list[int]], tgt: list[list[int]]) -> Path:
    """A minimal data directory in the layout of nmt/data/binarize.py."""
    folder.mkdir(parents=True, exist_ok=True)
    for side, sentences in (("src", src), ("tgt", tgt)):
        flat = np.array([i for s in sentences for i in s], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in sentences])]).astype(np.int64)
        np.save(folder / f"{split}.{side}.ids.npy", flat)
        np.save(folder / f"{split}.{side}.offsets.npy", offsets)
    (folder / "stats.json").write_text(json.dumps({}))
    return folder


SRC = [[10, 11, 12], [20], [], [30, 31, 32, 33, 34]]
TGT = [[40, 41], [50, 51, 52, 53], [60], []]


@pytest.fixture
def data(tmp_path):
    return ParallelData.open(write_data_dir(tmp_path / "d", "train", SRC, TGT), "train")


def test_collate_builds_eos_terminated_source_and_shifted_targets(data):
    batch = collate(data, np.array([0, 1, 2, 3]))
    P = PAD_ID
    assert batch.src.tolist() == [[10, 11, 12, EOS_ID, P, P], [20, EOS_ID, P, P, P, P],
                                  [EOS_ID, P, P, P, P, P], [30, 31, 32, 33, 34, EOS_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 40, 41, P, P], [BOS_ID, 50, 51, 52, 53], [BOS_ID, 60, P, P, P],
                                     [BOS_ID, P, P, P, P]]
    assert batch.tgt_out.tolist() == [[40, 41, EOS_ID, P, P], [50, 51, 52, 53, EOS_ID], [60, EOS_ID, P, P, P],
                                      [EOS_ID, P, P, P, P]]
    assert batch.src.dtype == batch.tgt_in.dtype == batch.tgt_out.dtype == torch.long
    assert batch.n_src_tokens == 9 + 4 == int((batch.src != PAD_ID).sum())
    assert batch.n_tgt_tokens == 7 + 4 == int((batch.tgt_out != PAD_ID).sum())
    assert len(batch) == 4 and batch.indices.tolist() == [0, 1, 2, 3]


def test_collate_follows_the_given_order(data):
    batch = collate(data, [3, 0])
    assert batch.src[:, 0].tolist() == [30, 10]
    assert batch.tgt_out[:, 0].tolist() == [EOS_ID, 40]
    assert batch.src.shape == (2, 6) and batch.tgt_in.shape == (2, 3)


def test_collate_source_matches_source_ids(data):
    batch = collate(data, [0, 1, 2, 3])
    for row, i in enumerate(range(4)):
        ids = data.source_ids(i)
        assert batch.src[row, : len(ids)].tolist() == ids


def test_padding_ratio_of_batches_matches_collated_tensors(data):
    batches = [np.array([0, 1]), np.array([2, 3])]
    collated = [collate(data, b) for b in batches]
    pads = sum(b.src.numel() + b.tgt_out.numel() - b.n_src_tokens - b.n_tgt_tokens for b in collated)
    cells = sum(b.src.numel() + b.tgt_out.numel() for b in collated)
    assert padding_ratio(batches, data.src_lengths, data.tgt_lengths) == pytest.approx(pads / cells)
    first = collated[0]  # src 2x4 with 4+2 real, tgt_out 2x5 with 3+5 real
    assert first.padding_ratio == pytest.approx(1 - 14 / 18)
    assert padding_ratio([], data.src_lengths, data.tgt_lengths) == 0.0


def test_batch_to_device_keeps_counts(data):
    batch = collate(data, [0, 1])
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved.n_tgt_tokens == batch.n_tgt_tokens
    assert torch.equal(moved.tgt_in, batch.tgt_in) and moved.src.device.type == "cpu"


def test_collate_rejects_an_empty_batch(data):
    with pytest.raises(ValueError, match="empty batch"):
        collate(data, [])


def test_token_batches_over_a_real_dataset_collate_within_budget(data):
    for idx in token_batches(data.src_lengths, data.tgt_lengths, batch_tokens=12, seed=0, epoch=0):
        batch = collate(data, idx)
        width = max(batch.src.shape[1], batch.tgt_in.shape[1])
        assert len(batch) == 1 or len(batch) * width <= 12
