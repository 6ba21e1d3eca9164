"""The quickstart's toy corpus: deterministic, disjoint splits, a fixed lexicon and reordering rules."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from nmt.data.toy import (
    ADVERBS,
    DETERMINERS,
    INTRANSITIVE_VERBS,
    LEXICON,
    MAX_WORDS,
    MIN_WORDS,
    NOUNS,
    PREPOSITIONS,
    SOURCE_WORDS,
    TRANSITIVE_VERBS,
    toy_pair,
    toy_pairs,
    write_toy_corpus,
)

VERBS = set(TRANSITIVE_VERBS + INTRANSITIVE_VERBS)
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def pairs():
    return toy_pairs(3000, seed=7)


def test_lexicon_is_one_to_one_and_small():
    assert len(SOURCE_WORDS) == len(set(SOURCE_WORDS)) == len(LEXICON)
    assert 60 <= len(SOURCE_WORDS) <= 100
    assert len(set(LEXICON.values())) == len(LEXICON)
    assert not set(LEXICON.values()) & set(SOURCE_WORDS)


def test_sentence_lengths_and_vocabulary(pairs):
    for source, target in pairs:
        words = source.split()
        assert MIN_WORDS <= len(words) <= MAX_WORDS
        assert set(words) <= set(SOURCE_WORDS)
        assert len(target.split()) == len(words)
    used = {w for source, _ in pairs for w in source.split()}
    assert used == set(SOURCE_WORDS)  # 3000 sentences exercise the whole vocabulary


def test_each_target_word_comes_from_one_source_word(pairs):
    for source, target in pairs:
        assert Counter(target.split()) == Counter(LEXICON[w] for w in source.split())


def test_word_order_changes(pairs):
    changed = 0
    for source, target in pairs:
        words, out = source.split(), target.split()
        verb = next(w for w in words if w in VERBS)
        assert out[-1] == LEXICON[verb]  # verb-final
        if words[-1] in ADVERBS:
            assert out[0] == LEXICON[words[-1]]  # the adverb moves to the front
        else:
            assert out[0] == LEXICON[next(w for w in words if w in NOUNS)]  # the subject's noun
        for i, w in enumerate(words):
            if w in PREPOSITIONS:  # preposition -> postposition after its mirrored noun phrase
                determiner = LEXICON[words[i + 1]]
                assert out[out.index(LEXICON[w]) - 1] == determiner
        changed += out != [LEXICON[w] for w in words]
    assert changed == len(pairs)


def test_noun_phrase_is_mirrored():
    rng = random.Random(3)
    for _ in range(200):
        source, target = toy_pair(rng)
        words, out = source.split(), target.split()
        end = next(i for i, w in enumerate(words) if w in NOUNS)  # the subject noun phrase ends here
        subject = words[: end + 1]
        start = 1 if words[-1] in ADVERBS else 0
        assert out[start: start + len(subject)] == [LEXICON[w] for w in reversed(subject)]
        assert subject[0] in DETERMINERS


def test_pairs_are_deterministic_and_seed_dependent():
    assert toy_pairs(50, seed=1) == toy_pairs(50, seed=1)
    assert toy_pairs(50, seed=1) != toy_pairs(50, seed=2)
    sources = [s for s, _ in toy_pairs(500, seed=1)]
    assert len(set(sources)) == 500


def test_write_toy_corpus_splits_are_disjoint_and_deterministic(tmp_path):
    paths = write_toy_corpus(tmp_path / "a", n_train=400, n_valid=50, n_test=60, seed=4)
    again = write_toy_corpus(tmp_path / "b", n_train=400, n_valid=50, n_test=60, seed=4)
    assert sorted(paths) == sorted(f"{s}.{side}" for s in SPLITS for side in ("src", "tgt"))
    for name, path in paths.items():
        assert path == tmp_path / "a" / name
        assert path.read_bytes() == again[name].read_bytes()
    lines = {name: path.read_text(encoding="utf-8").splitlines() for name, path in paths.items()}
    assert [len(lines[f"{s}.src"]) for s in SPLITS] == [400, 50, 60]
    assert all(len(lines[f"{s}.src"]) == len(lines[f"{s}.tgt"]) for s in SPLITS)
    train, valid, test = (set(lines[f"{s}.src"]) for s in SPLITS)
    assert not train & valid and not train & test and not valid & test
    other_seed = write_toy_corpus(tmp_path / "c", n_train=400, n_valid=50, n_test=60, seed=5)
    assert other_seed["train.src"].read_bytes() != paths["train.src"].read_bytes()
