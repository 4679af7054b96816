"""Scoring a synthetic story corpus: word ids, n-gram counts, document frequencies and the evaluator's files."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest

import datamodules.story_corpus as sc
from collapse.errors import UserError
from datamodules.story_corpus import (
    EOT_SEPARATOR,
    NgramDiversity,
    WordIds,
    distinct_n,
    distinct_sorted,
    document_frequencies,
    generate_stories,
    read_corpus,
    tokenize_words,
    word_id_chunks,
)
from datamodules.tinystories import StoredStories
from datamodules.tokenizer import EOT_ID, decode, decode_rows, train_bpe
from evaluation.stories import DiversityConfig, StorySampleEvaluator, corpus_diversity

# Stories that try the word splitting: apostrophes, trailing 's, case, non-ASCII letters, the chunk break
# character inside a story, punctuation glued to words, empty and one-word stories.
AWKWARD = [
    "",
    "a",
    "a b",
    "The cat's hat. A dog!",
    "b a b a",
    "Tom's friend didn't go; it's Tom's.",
    "dog'\x00s bone\x00and\x00\x00more",
    "İstanbul ÉCOLE straße naïve",
    "   \n\t  ",
    "rock'n'roll o'clock 'quoted' words'",
    "UPPER lower MiXeD upper LOWER",
]


def _corpora() -> list[list[str]]:
    return [generate_stories(300, seed=3), AWKWARD, AWKWARD * 3 + generate_stories(50, seed=1), [], [""]]


@pytest.mark.parametrize("chunk", [1, 2, 7, None])
def test_word_id_chunks_split_words_as_tokenize_words(chunk):
    for corpus in _corpora():
        ids = WordIds()
        flat = np.concatenate([np.empty(0, dtype=np.int64), *word_id_chunks(corpus, ids, chunk)])
        assert int((flat == -1).sum()) == len(corpus)  # one break after each story
        stories, current = [], []
        for i in flat.tolist():
            if i < 0:
                stories.append(current)
                current = []
            else:
                current.append(ids.words[i])
        assert stories == [tokenize_words(s) for s in corpus]


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_ngram_counts_equal_distinct_n(monkeypatch, chunk):
    monkeypatch.setattr(sc, "STORIES_PER_CHUNK", chunk or sc.STORIES_PER_CHUNK)
    for corpus in _corpora():
        counts = NgramDiversity()
        counts.add(corpus[: len(corpus) // 2])  # fed in two parts, as the evaluator does chunk by chunk
        counts.add(corpus[len(corpus) // 2 :])
        assert [counts.distinct_ratio(n) for n in (1, 2, 3)] == [distinct_n(corpus, n) for n in (1, 2, 3)]
        assert counts.distinct(1) == len({w for s in corpus for w in tokenize_words(s)})


def test_ngram_counts_switch_to_sets_when_the_words_outgrow_the_keys(monkeypatch):
    """With 3-bit ids (8 words), the packed keys of the first chunks are unpacked into sets mid-corpus."""
    monkeypatch.setattr(sc, "WORD_ID_BITS", 3)
    monkeypatch.setattr(sc, "STORIES_PER_CHUNK", 2)
    corpus = ["a b c a b", "c a b d", "e f g h i j", "a b c", "k l a b c a b"]
    counts = NgramDiversity()
    counts.add(corpus[:2])
    assert counts._keys is not None  # 4 words so far: packed
    counts.add(corpus[2:])
    assert counts._keys is None  # 12 words: sets
    assert [counts.distinct_ratio(n) for n in (1, 2, 3)] == [distinct_n(corpus, n) for n in (1, 2, 3)]


def test_distinct_sorted_is_unique():
    rng = np.random.default_rng(0)
    for keys in (rng.integers(0, 2**62, 1000), rng.integers(0, 5, 1000), np.empty(0, dtype=np.int64), np.array([7])):
        assert np.array_equal(distinct_sorted(keys), np.unique(keys))


def test_document_frequencies_count_each_story_once(monkeypatch):
    monkeypatch.setattr(sc, "STORIES_PER_CHUNK", 3)
    for corpus in _corpora():
        expected: Counter = Counter()
        for story in corpus:
            expected.update(set(tokenize_words(story)))
        got, n = document_frequencies(iter(corpus))  # any iterable
        assert n == len(corpus) and got == expected


def test_corpus_diversity_takes_an_iterator():
    corpus = generate_stories(40, seed=2)
    rare = {"owl", "dragon", "the"}
    assert corpus_diversity(iter(corpus), rare) == corpus_diversity(corpus, rare)


class _Real:
    """What the evaluator reads of the real data: a tokenizer and the real training stories."""

    def __init__(self, tokenizer, stories):
        self.tokenizer, self.stories = tokenizer, stories

    def setup(self, stage):
        pass

    def iter_train_texts(self):
        return iter(self.stories)  # an iterator, as the data module streams them

    def num_train_texts(self):
        return len(self.stories)


@pytest.fixture(scope="module")
def real():
    stories = generate_stories(300, seed=0)
    return _Real(train_bpe(stories, vocab_size=600), stories)


def _rows(tokenizer, texts: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Token rows (EOT, the pieces' ordinary tokens, EOT), right-padded: each piece encoded on its own, so a
    piece such as "<|" stays ordinary bytes and never becomes the special token."""
    rows = [[EOT_ID, *[i for piece in pieces for i in tokenizer.encode(piece).ids], EOT_ID] for pieces in texts]
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), 1, dtype=np.uint16)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return tokens, np.array([len(r) for r in rows])


def _flat(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Padded rows as the store keeps a ragged array: the stories back to back, without padding."""
    return np.concatenate([np.empty(0, dtype=tokens.dtype), *(t[:n] for t, n in zip(tokens, lengths))])


def test_decode_rows_equals_decode_per_row(real):
    tokens, lengths = _rows(real.tokenizer, [[s] for s in real.stories[:20]] + [[""]])
    expected = [decode(real.tokenizer, t[:n]) for t, n in zip(tokens, lengths)]
    assert decode_rows(real.tokenizer, [t[:n] for t, n in zip(tokens, lengths)]) == expected


def test_stored_stories_read_padded_rows_and_back_to_back_alike():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 12, 30)
    tokens = np.full((30, 12), 1, dtype=np.uint16)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(2, 500, n)
    dense, flat = StoredStories(tokens, lengths), StoredStories(_flat(tokens, lengths), lengths)
    rows = np.array([5, 0, 29, 5, 17])
    for limit in (3, 12):
        for a, b in (
            (dense.rows(3, 20, limit), flat.rows(3, 20, limit)),
            (dense.gather(rows, limit), flat.gather(rows, limit)),
        ):
            assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert [len(x) for x in flat.rows(0, 30)] == lengths.tolist()
    assert flat.rows(7, 7) == [] and flat.gather(np.empty(0, dtype=np.int64), 5) == []
    with pytest.raises(UserError, match="lengths sum to"):
        StoredStories(_flat(tokens, lengths)[:-1], lengths)
    with pytest.raises(UserError, match="row width"):
        StoredStories(tokens[:, :5], lengths)


def test_evaluator_scores_stories_stored_back_to_back_as_rows(tmp_path, real):
    tokens, lengths = _rows(real.tokenizer, [[s] for s in generate_stories(12, seed=8)] + [[" "]])
    evaluator = StorySampleEvaluator(DiversityConfig(), real)
    rows = evaluator(tmp_path / "rows", {"tokens": tokens, "lengths": lengths}, 0)
    flat = evaluator(tmp_path / "flat", {"tokens": _flat(tokens, lengths), "lengths": lengths}, 0)
    assert rows == flat and rows["sample_empty_stories"] == 1.0
    assert (tmp_path / "rows" / "stories.txt").read_text() == (tmp_path / "flat" / "stories.txt").read_text()


def test_evaluator_writes_and_scores_in_chunks(tmp_path, real, monkeypatch, caplog):
    """Stories spelling out the separator are left out of stories.txt and counted, not a crash after sampling."""
    monkeypatch.setattr("evaluation.stories.STORIES_PER_CHUNK", 4)
    monkeypatch.setattr("collapse.progress._interval", 0.0)  # a progress line at every update
    texts = [[s] for s in generate_stories(9, seed=5)]
    texts[2] = ["Lily saw a dog. ", "<|", "endoftext", "|>", " The end."]
    texts[6] = ["   "]
    texts[7] = ["Tom ran.\n", "<|", "endoftext", "|>", "\nHe sat."]  # the separator on a line of its own
    tokens, lengths = _rows(real.tokenizer, texts)
    evaluator = StorySampleEvaluator(DiversityConfig(shown_stories=3), real)
    with caplog.at_level(logging.INFO, logger="collapse.progress"):
        metrics = evaluator(tmp_path, {"tokens": tokens, "lengths": lengths, "finished": np.ones(9, bool)}, 1)
    lines = [r.getMessage() for r in caplog.records if r.name == "collapse.progress"]
    assert "scoring gen 1: 4/9 stories (44%)" in "\n".join(lines)  # the long phases say how far they are
    assert any(line.startswith("scoring gen 1: done, 9 stories") for line in lines)
    assert any(line.startswith("finding the real training set's rare words: done, 300 stories") for line in lines)
    decoded = [decode(real.tokenizer, t[:n]).strip() for t, n in zip(tokens, lengths)]
    assert EOT_SEPARATOR in decoded[2] and EOT_SEPARATOR in decoded[7]
    written = [s for i, s in enumerate(decoded) if i not in (2, 6, 7)]
    assert read_corpus(tmp_path / "stories.txt") == written
    assert read_corpus(tmp_path / "samples.txt") == written[:3]
    assert metrics["sample_separator_stories"] == 2.0 and metrics["sample_empty_stories"] == 1.0
    scored = [s for s in decoded if s]  # every story with text is scored, the unwritable ones too
    rare = evaluator.rare_words()
    assert {k.removeprefix("sample_"): v for k, v in metrics.items() if "distinct" in k or "word" in k} == (
        corpus_diversity(scored, rare)
    )
