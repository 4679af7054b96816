"""The offline stand-in story corpus: determinism, shape, vocabulary tail, dialogue, file format."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datamodules import story_corpus as sc

REPO = Path(__file__).resolve().parents[1]

# Thresholds below were set from measurements on seeds 0 and 1 (20,000 stories: ~2,540 word types,
# top-10 share 0.23, ~1,350 words in < 0.5% of stories, log-spaced rank-frequency slope -1.09), with margin.


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """20,000 stories of seed 0 (about 1.5 s), shared by the statistical tests."""
    return sc.generate_stories(20_000, seed=0)


@pytest.fixture(scope="module")
def counts(corpus: list[str]) -> Counter:
    """Token counts of the shared corpus."""
    return sc.word_frequencies(corpus)


def test_label_says_stand_in_not_tinystories():
    """The corpus is labelled as a synthetic stand-in everywhere it is named."""
    assert sc.STAND_IN_LABEL == "synthetic simple-English stories (offline stand-in, not TinyStories)"
    assert "NOT TinyStories" in sc.__doc__
    assert "stand-in" in sc.__doc__


def test_deterministic():
    """The same (n, seed) gives the same stories, call after call."""
    assert sc.generate_stories(60, seed=3) == sc.generate_stories(60, seed=3)


def test_prefix_stable():
    """The first k stories of n are the k-story corpus; any story can be made on its own."""
    long = sc.generate_stories(300, seed=5)
    assert sc.generate_stories(37, seed=5) == long[:37]
    assert sc.generate_stories(0, seed=5) == []
    assert sc.generate_story(211, seed=5) == long[211]
    assert list(sc.iter_stories(50, seed=5, start=100)) == long[100:150]


def test_different_seeds_and_exponents_differ():
    """Another seed, or another Zipf exponent, gives other stories at the same positions."""
    a = sc.generate_stories(200, seed=0)
    b = sc.generate_stories(200, seed=1)
    assert sum(x == y for x, y in zip(a, b)) == 0
    assert len(set(a) & set(b)) == 0
    c = sc.generate_stories(200, seed=0, zipf_a=1.6)
    assert sum(x == y for x, y in zip(a, c)) < 20


def test_shape_lengths_ascii_normalised():
    """Stories are non-empty, ASCII, one line with single spaces, within the length bounds, varied."""
    stories = sc.generate_stories(3_000, seed=11)
    lengths = np.array([len(x.split()) for x in stories])
    assert lengths.min() >= sc.MIN_WORDS
    assert lengths.max() <= sc.MAX_WORDS
    assert lengths.std() > 15  # variable length, not one fixed size
    assert 100 < lengths.mean() < 200
    for story in stories:
        assert story.isascii()
        assert story == story.strip() and "\n" not in story and "  " not in story
        assert "{" not in story and "}" not in story  # every slot was filled
        assert story[0].isupper()
        assert story[-1] in '.!?"'
        assert story.count('"') % 2 == 0  # quotes are balanced
        assert sc.EOT_SEPARATOR not in story


def test_sentences_start_upper_and_articles_agree():
    """Sentence starts are capitalised and "a"/"an" agree with the next word."""
    text = " ".join(sc.generate_stories(2_000, seed=2))
    assert not re.search(r"[.!?] [a-z]", text)
    assert not re.search(r"\b[Aa] [aeio]\w", text)  # "a apple" would be an unfixed article
    assert not re.search(r"\b[Aa]n [b-df-hj-np-tv-z]", text)


def test_at_least_1000_word_types(corpus: list[str], counts: Counter):
    """Over 20,000 stories the corpus uses well over 1,000 distinct word types, and more as it grows."""
    assert len(counts) >= 2_000
    small = sc.word_frequencies(corpus[:1_000])
    assert 1_000 <= len(small) < len(counts)


def test_every_word_is_in_the_vocabulary(counts: Counter):
    """vocabulary() covers every token a story contains (so it is the generator's true word set)."""
    vocab = sc.vocabulary()
    missing = [w for w in counts if w not in vocab]
    assert missing == []
    assert len(vocab) >= len(counts)


def test_heavy_tailed_frequencies(corpus: list[str], counts: Counter):
    """A few words dominate, hundreds are rare, and rank-frequency is Zipf-like."""
    assert sc.top_k_share(counts, 10) < 0.30
    assert sc.top_k_share(counts, 10) > 0.10
    rare = sc.rare_words(corpus, max_doc_freq=0.005)
    # 1,351 measured; uniform slot fillers (zipf_a=0) give ~900 and zipf_a=0.6 ~1,070, so this floor
    # fails if the Zipf weighting of the fillers breaks.
    assert len(rare) >= 1_150
    df, n = sc.document_frequencies(corpus)
    assert all(1 <= df[w] < 0.005 * n for w in rare)
    slope = sc.rank_frequency_slope(counts)
    assert -1.4 < slope < -0.8


def test_slot_fillers_follow_their_zipf_rank(counts: Counter):
    """Within a word list, rank 1 is drawn hundreds of times as often as the tail ranks.

    Names occur only as characters, so their counts show the filler distribution directly; the
    log-log slope of the whole corpus does not (it is set mostly by the templates' function words).
    """
    girls = [counts[name.lower()] for name in sc.GIRL_NAMES]
    assert girls[0] > 50 * np.median(girls[-50:])  # measured ~230x; uniform fillers give ~1x
    assert sum(girls[:10]) > 0.4 * sum(girls)  # measured 0.58; uniform gives ~0.06
    assert min(girls) >= 1  # the tail is rare but present


def test_larger_zipf_exponent_thins_the_tail():
    """A steeper Zipf exponent makes rare words rarer: fewer word types in the same number of stories."""
    base = sc.word_frequencies(sc.generate_stories(1_500, seed=4))
    steep = sc.word_frequencies(sc.generate_stories(1_500, seed=4, zipf_a=2.0))
    assert len(steep) < 0.8 * len(base)
    assert sc.rank_frequency_slope(steep) < sc.rank_frequency_slope(base)


def test_dialogue_in_most_stories(corpus: list[str]):
    """Nearly every story quotes someone speaking."""
    quoted = re.compile(r'"[A-Z][^"]*[,.!?]"')
    with_dialogue = sum(1 for story in corpus[:5_000] if quoted.search(story))
    assert with_dialogue >= 0.95 * 5_000


def test_character_names_recur_within_a_story(corpus: list[str]):
    """The hero's name comes back again and again: a model can lower its loss by tracking it."""
    names = set(sc.GIRL_NAMES) | set(sc.BOY_NAMES) | set(sc.PET_NAMES)
    recurring = 0
    for story in corpus[:5_000]:
        found = Counter(w for w in re.findall(r"\b[A-Z][a-z]+\b", story) if w in names)
        recurring += bool(found) and max(found.values()) >= 3
    assert recurring >= 0.98 * 5_000


def test_near_unique(corpus: list[str]):
    """Stories are almost all distinct."""
    assert len(set(corpus[:5_000])) > 0.99 * 5_000


def test_word_lists_are_clean():
    """Word lists are non-empty ASCII without duplicates; name lists do not overlap."""
    for name, items in sc.WORD_LISTS.items():
        assert len(items) > 0, name
        assert len(set(items)) == len(items), name
        for item in items:
            for text in [item] if isinstance(item, str) else item:
                assert text and text.isascii() and text == text.strip(), (name, item)
    assert not set(sc.GIRL_NAMES) & set(sc.BOY_NAMES)
    assert not set(sc.PET_NAMES) & (set(sc.GIRL_NAMES) | set(sc.BOY_NAMES))


def test_words_file_loads_into_the_module_lists(tmp_path: Path):
    """The data file next to the module: every list non-empty and without duplicates, loaded as is, in order."""
    path = Path(sc.__file__).with_name("story_corpus_words.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    lists = {name: value for name, value in data.items() if not name.startswith("_") and name != "TEMPLATES"}
    groups = {f"TEMPLATES[{key!r}]": value for key, value in data["TEMPLATES"].items()}
    assert len(lists) >= 40 and len(groups) >= 100
    for name, items in {**lists, **groups}.items():
        entries = [tuple(x) if isinstance(x, list) else x for x in items]
        assert entries, name
        assert len(set(entries)) == len(entries), name
        assert all(isinstance(x, str) or all(isinstance(f, str) for f in x) for x in entries), name
        if name in lists:
            assert getattr(sc, name) == tuple(entries), name  # same names, types and order (the Zipf rank)
    assert sc.TEMPLATES == {key: tuple(value) for key, value in data["TEMPLATES"].items()}
    assert list(sc.TEMPLATES) == list(data["TEMPLATES"])
    # A repeated entry would silently hold two Zipf ranks, so loading refuses it.
    bad = tmp_path / "words.json"
    bad.write_text(json.dumps({"_comment": ["x"], "COLORS": ["red", "blue", "red"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="COLORS"):
        sc._load_words(bad)


def test_tokenizer():
    """Lower-case words; contractions stay whole; a trailing 's is dropped."""
    assert sc.tokenize_words("Tom's dog didn't run, I'm sure. It's RED!") == [
        "tom",
        "dog",
        "didn't",
        "run",
        "i'm",
        "sure",
        "it",
        "red",
    ]


def test_rare_words_and_coverage_on_a_known_corpus():
    """rare_words keeps words under the document-frequency limit; coverage is the fraction seen."""
    stories = ["the cat sat"] * 90 + ["the dog sat"] * 9 + ["the newt ran"]
    assert sc.rare_words(stories, max_doc_freq=0.05) == {"newt", "ran"}
    assert sc.rare_words(stories, max_doc_freq=0.10) == {"newt", "ran", "dog"}
    assert sc.rare_words(stories, max_doc_freq=0.05, min_docs=2) == set()
    assert sc.rare_words([], max_doc_freq=0.5) == set()
    assert sc.vocabulary_coverage({"newt", "dog", "yak", "emu"}, ["a newt", "the dog"]) == 0.5
    assert sc.vocabulary_coverage(set(), ["anything"]) == 1.0


def test_rank_frequency_slope_on_known_distributions():
    """Exact Zipf counts give slope -1; equal counts give 0."""
    zipf = {f"w{r}": 1e6 / r for r in range(1, 3_001)}
    assert sc.rank_frequency_slope(zipf) == pytest.approx(-1.0, abs=0.01)
    flat = {f"w{r}": 7 for r in range(1, 500)}
    assert sc.rank_frequency_slope(flat) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        sc.rank_frequency_slope({"only": 3})


def test_write_and_read_corpus_round_trip(tmp_path: Path):
    """The <|endoftext|> file splits back into exactly the generated stories."""
    path = sc.write_corpus(tmp_path / "sub" / "stories.txt", n=250, seed=9, chunk=64)
    stories = sc.generate_stories(250, seed=9)
    assert sc.read_corpus(path) == stories
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    assert sum(line == sc.EOT_SEPARATOR for line in lines) == 250
    # The plain split a TinyStories loader does gives the same stories.
    parts = [p.strip() for p in text.split(sc.EOT_SEPARATOR) if p.strip()]
    assert parts == stories
    assert [p.name for p in path.parent.iterdir()] == ["stories.txt"]  # no temporary file left behind


def test_read_corpus_accepts_tinystories_layout(tmp_path: Path):
    """Multi-paragraph stories, blank lines and a missing final separator read as real TinyStories do."""
    path = tmp_path / "real_like.txt"
    path.write_text(
        "One day, a cat sat.\n\nIt was happy.\n<|endoftext|>\n\n<|endoftext|>\nA dog ran.\n",
        encoding="utf-8",
    )
    assert sc.read_corpus(path) == ["One day, a cat sat.\n\nIt was happy.", "A dog ran."]


def test_format_corpus_rejects_bad_stories():
    """An empty story, or one holding the separator, cannot be written."""
    with pytest.raises(ValueError):
        sc.format_corpus(["fine story", "   "])
    with pytest.raises(ValueError):
        sc.format_corpus([f"a story {sc.EOT_SEPARATOR} inside"])


def test_invalid_arguments():
    """Negative sizes, seeds, indices and exponents are refused."""
    with pytest.raises(ValueError):
        sc.generate_stories(-1)
    with pytest.raises(ValueError):
        sc.generate_stories(3, seed=-2)
    with pytest.raises(ValueError):
        sc.generate_story(-1)
    with pytest.raises(ValueError):
        sc.generate_stories(3, zipf_a=-0.5)


def test_corpus_stats_summary():
    """corpus_stats reports the numbers the README and reports quote."""
    stats = sc.corpus_stats(sc.generate_stories(500, seed=1))
    assert stats["stories"] == 500
    assert sc.MIN_WORDS <= stats["min_words"] <= stats["mean_words"] <= stats["max_words"] <= sc.MAX_WORDS
    assert stats["word_types"] > 1_000
    assert 0 < stats["top10_share"] < 0.3
    assert stats["rank_frequency_slope"] < 0


def test_module_does_not_import_torch():
    """Data code stays NumPy-only: importing the corpus module loads no torch."""
    code = "import sys, datamodules.story_corpus; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
