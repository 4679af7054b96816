"""Diversity of a synthetic story corpus against the real one, for any model of stories.

Collapse of a language model shows in its stories before it shows in its loss: repeated phrases and a
shrinking vocabulary, the rare words of the real corpus first. :class:`StorySampleEvaluator` measures,
for each generation's synthetic stories:

- ``distinct_1/2/3``: distinct word n-grams over all word n-grams of the corpus;
- ``word_types``: distinct words used;
- ``rare_word_coverage``: the fraction of the real training set's rare words (those in fewer than
  ``rare_doc_freq`` of its stories) that the synthetic corpus still uses;
- ``mean_tokens``, ``finished_fraction`` (stories that ended with EOT rather than at the length limit)
  and ``empty_stories``;

and writes the whole corpus as ``stories.txt`` (the TinyStories ``.txt`` format) and a few stories as
``samples.txt`` for reading.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from collapse.atomic import atomic_write_text
from collapse.errors import ConfigError
from collapse.progress import Progress
from datamodules.story_corpus import format_corpus, rare_words, tokenize_words
from datamodules.tokenizer import decode

log = logging.getLogger(__name__)

STORIES_FILE = "stories.txt"
"""A generation's whole synthetic corpus as text, in the TinyStories ``.txt`` format."""
SAMPLES_FILE = "samples.txt"
"""A few synthetic stories of a generation, for reading (and for W&B)."""


@dataclass
class DiversityConfig:
    """How each synthetic corpus is scored and shown (``--diversity.*``)."""

    rare_doc_freq: float = 0.005
    """A real training word is rare when it occurs in fewer than this fraction of the real training stories."""
    shown_stories: int = 8
    """Synthetic stories written to samples.txt (and logged to W&B) per generation."""

    def __post_init__(self) -> None:
        if not 0 < self.rare_doc_freq <= 1:
            raise ConfigError(f"--diversity.rare_doc_freq must be in (0, 1], got {self.rare_doc_freq!r}")
        if isinstance(self.shown_stories, bool) or not isinstance(self.shown_stories, int) or self.shown_stories < 0:
            raise ConfigError(f"--diversity.shown_stories must be an integer >= 0, got {self.shown_stories!r}")


def corpus_diversity(stories: list[str], rare: set[str]) -> dict[str, float]:
    """Distinct-1/2/3, word types and the coverage of ``rare`` (real rare words) of a list of stories.

    One pass, each story split into words once: the values of :func:`~datamodules.story_corpus.distinct_n` for
    n = 1, 2, 3 (n-grams within each story, pooled), a third of the time of three passes (a published-size
    synthetic set has millions of stories).
    """
    words_seen: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    triples: set[tuple[str, str, str]] = set()
    total = 0  # words; a story of k words has k - 1 pairs and k - 2 triples
    pair_total = triple_total = 0
    for story in stories:
        words = tokenize_words(story)
        k = len(words)
        total += k
        words_seen.update(words)
        if k >= 2:
            pair_total += k - 1
            pairs.update(zip(words, words[1:]))
        if k >= 3:
            triple_total += k - 2
            triples.update(zip(words, words[1:], words[2:]))
    return {
        "distinct_1": len(words_seen) / total if total else 0.0,
        "distinct_2": len(pairs) / pair_total if pair_total else 0.0,
        "distinct_3": len(triples) / triple_total if triple_total else 0.0,
        "word_types": float(len(words_seen)),
        "rare_word_coverage": len(rare & words_seen) / len(rare) if rare else 1.0,
    }


class StorySampleEvaluator:
    """Scores a generation's synthetic stories: the ``evaluate_samples`` of a story modality.

    Args:
        config: the ``--diversity.*`` settings.
        real: the real stories, read lazily: anything with ``setup("fit")``, ``train_texts()`` (the real
            training stories) and ``tokenizer`` (a TinyStories real data module).
    """

    def __init__(self, config: DiversityConfig, real: Any):
        self.config = config
        self.real = real
        self._rare: set[str] | None = None

    def __call__(self, stage: Path, arrays: Mapping[str, np.ndarray], generation: int) -> dict[str, float]:
        """Texts and metrics of the synthetic set (``tokens`` (n, L) with ``lengths`` (n,), optional ``finished``)."""
        if "tokens" not in arrays:  # no synthetic set (a one-generation run draws none)
            return {}
        tokens, lengths = arrays["tokens"], np.asarray(arrays["lengths"])
        stories = []
        with Progress(len(lengths), f"decoding gen {generation}", "stories") as progress:
            for i in range(len(lengths)):
                stories.append(decode(self.real.tokenizer, tokens[i, : lengths[i]]))
                progress.update()
        blank = sum(1 for s in stories if not s.strip())
        kept = [s.strip() for s in stories if s.strip()]
        atomic_write_text(Path(stage) / STORIES_FILE, format_corpus(kept))
        atomic_write_text(Path(stage) / SAMPLES_FILE, format_corpus(kept[: self.config.shown_stories]))
        metrics = {f"sample_{k}": v for k, v in corpus_diversity(kept, self.rare_words()).items()}
        metrics["sample_mean_tokens"] = float(lengths.mean()) if len(lengths) else 0.0
        if "finished" in arrays:
            finished = np.asarray(arrays["finished"])
            metrics["sample_finished_fraction"] = float(finished.mean()) if len(finished) else 0.0
        metrics["sample_empty_stories"] = float(blank)
        if blank:
            log.warning("generation %d: %d of %d synthetic stories are empty text", generation, blank, len(stories))
        return metrics

    def rare_words(self) -> set[str]:
        """The real training set's rare words (computed once)."""
        if self._rare is None:
            self.real.setup("fit")
            self._rare = rare_words(self.real.train_texts(), max_doc_freq=self.config.rare_doc_freq)
        return self._rare


__all__ = ["SAMPLES_FILE", "STORIES_FILE", "DiversityConfig", "StorySampleEvaluator", "corpus_diversity"]
