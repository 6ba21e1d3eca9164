"""The quickstart's toy corpus: English-like sentences and a rule-based pseudo-language.

Source grammar (80 words):  NP verb [NP] [prep NP] [adverb],  NP = determiner adjective{0,2} noun.
Target: every source word has exactly one target word (a fixed lexicon); only the order changes:
    adverb'  NP'(subject)  [NP'(prep object) prep']  [NP'(object)]  verb'
    NP' = noun' adjective'{reversed} determiner'     (the noun phrase mirrored)
so the verb moves to the end (SOV), the preposition becomes a postposition, a final adverb moves to
the front, and adjectives follow their noun. A translation model must reorder, hence attend.
"""

from __future__ import annotations

import random
from pathlib import Path

from nmt.io import write_atomic

DETERMINERS = ["the", "a", "this", "that", "every", "some", "my", "your", "two", "three"]
ADJECTIVES = ["big", "small", "red", "blue", "green", "old", "young", "happy", "sad", "quick", "slow",
              "tall", "short", "bright", "dark", "quiet"]
NOUNS = ["cat", "dog", "bird", "fish", "horse", "man", "woman", "child", "teacher", "doctor", "farmer",
         "king", "house", "tree", "river", "car", "boat", "book", "table", "garden", "city", "road",
         "apple", "flower"]
TRANSITIVE_VERBS = ["sees", "likes", "finds", "helps", "follows", "carries", "paints", "watches", "calls",
                    "pushes", "holds", "visits"]
INTRANSITIVE_VERBS = ["sleeps", "runs", "sings", "waits", "laughs", "swims"]
PREPOSITIONS = ["in", "on", "near", "under", "behind", "with"]
ADVERBS = ["today", "yesterday", "again", "often", "now", "slowly"]

SOURCE_WORDS = (DETERMINERS + ADJECTIVES + NOUNS + TRANSITIVE_VERBS + INTRANSITIVE_VERBS + PREPOSITIONS
                + ADVERBS)
MIN_WORDS, MAX_WORDS = 4, 15
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70


def _pseudo_word(i: int) -> str:
    """The i-th target word: two syllables, distinct for i < 70**2 (37 is coprime to 4900)."""
    first, second = divmod((i * 37 + 11) % len(SYLLABLES) ** 2, len(SYLLABLES))
    return SYLLABLES[first] + SYLLABLES[second]


LEXICON = {word: _pseudo_word(i) for i, word in enumerate(SOURCE_WORDS)}


def _noun_phrase(rng: random.Random) -> list[str]:
    n_adjectives = rng.choices((0, 1, 2), weights=(50, 35, 15))[0]
    return [rng.choice(DETERMINERS), *rng.sample(ADJECTIVES, n_adjectives), rng.choice(NOUNS)]


def _mirrored(noun_phrase: list[str]) -> list[str]:
    """Target noun phrase: noun' adjectives' (reversed) determiner'."""
    return [LEXICON[w] for w in reversed(noun_phrase)]


def toy_pair(rng: random.Random) -> tuple[str, str]:
    """One (source, target) sentence pair of MIN_WORDS..MAX_WORDS words."""
    while True:
        subject = _noun_phrase(rng)
        transitive = rng.random() < 0.7
        verb = rng.choice(TRANSITIVE_VERBS if transitive else INTRANSITIVE_VERBS)
        obj = _noun_phrase(rng) if transitive else []
        with_pp = rng.random() < 0.5
        prep, prep_object = (rng.choice(PREPOSITIONS), _noun_phrase(rng)) if with_pp else (None, [])
        adverb = [rng.choice(ADVERBS)] if rng.random() < 0.4 else []
        source = [*subject, verb, *obj, *([prep, *prep_object] if prep else []), *adverb]
        if MIN_WORDS <= len(source) <= MAX_WORDS:
            break
    target = [
        *(LEXICON[w] for w in adverb),
        *_mirrored(subject),
        *([*_mirrored(prep_object), LEXICON[prep]] if prep else []),
        *_mirrored(obj),
        LEXICON[verb],
    ]
    return " ".join(source), " ".join(target)


def toy_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` pairs with distinct source sentences, deterministic for `seed`."""
    rng = random.Random(seed)
    pairs: dict[str, str] = {}
    while len(pairs) < n:
        source, target = toy_pair(rng)
        pairs.setdefault(source, target)
    return list(pairs.items())


def write_toy_corpus(out_dir: str | Path, n_train: int = 20000, n_valid: int = 500, n_test: int = 500,
                     seed: int = 1) -> dict[str, Path]:
    """Write {train,valid,test}.{src,tgt} into `out_dir`; no source sentence occurs in two splits.

    Returns the written paths by file name ("train.src", ...).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = toy_pairs(n_valid + n_test + n_train, seed)
    held_out = n_valid + n_test
    splits = {"valid": pairs[:n_valid], "test": pairs[n_valid:held_out], "train": pairs[held_out:]}
    paths = {}
    for split, split_pairs in splits.items():
        for k, side in enumerate(("src", "tgt")):
            path = out_dir / f"{split}.{side}"
            write_atomic(path, "".join(pair[k] + "\n" for pair in split_pairs))
            paths[path.name] = path
    return paths
