"""Diversity of a synthetic story corpus against the real one, for any model of stories.

Collapse of a language model shows in its stories before it shows in its loss: repeated phrases and a
shrinking vocabulary, the rare words of the real corpus first. :class:`StorySampleEvaluator` measures,
for each generation's synthetic stories:

- ``distinct_1/2/3``: distinct word n-grams over all word n-grams of the corpus;
- ``word_types``: distinct words used;
- ``rare_word_coverage``: the fraction of the real training set's rare words (those in fewer than
  ``rare_doc_freq`` of its stories) that the synthetic corpus still uses;
- ``mean_tokens``, ``finished_fraction`` (stories that ended with EOT rather than at the length limit),
  ``empty_stories`` and ``separator_stories`` (stories left out of ``stories.txt``, whose format cannot hold them);

and writes the whole corpus as ``stories.txt`` (the TinyStories ``.txt`` format) and a few stories as
``samples.txt`` for reading.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from collapse.atomic import atomic_open, atomic_write_text
from collapse.errors import ConfigError
from collapse.progress import Progress
from datamodules.story_corpus import EOT_SEPARATOR, STORIES_PER_CHUNK, NgramDiversity, format_corpus, rare_words
from datamodules.tinystories import StoredStories
from datamodules.tokenizer import decode_rows

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


def corpus_diversity(stories: Iterable[str], rare: set[str]) -> dict[str, float]:
    """Distinct-1/2/3, word types and the coverage of ``rare`` (real rare words) of a corpus of stories.

    The values of :func:`~datamodules.story_corpus.distinct_n` for n = 1, 2, 3 (n-grams within each story,
    pooled), counted on word ids (:class:`~datamodules.story_corpus.NgramDiversity`).
    """
    counts = NgramDiversity()
    counts.add(stories)
    return diversity_metrics(counts, rare)


def diversity_metrics(counts: NgramDiversity, rare: set[str]) -> dict[str, float]:
    """:func:`corpus_diversity`'s values from the n-gram counts of a corpus."""
    return {
        "distinct_1": counts.distinct_ratio(1),
        "distinct_2": counts.distinct_ratio(2),
        "distinct_3": counts.distinct_ratio(3),
        "word_types": float(counts.distinct(1)),
        "rare_word_coverage": len(rare.intersection(counts.ids.words)) / len(rare) if rare else 1.0,
    }


class StorySampleEvaluator:
    """Scores a generation's synthetic stories: the ``evaluate_samples`` of a story modality.

    Args:
        config: the ``--diversity.*`` settings.
        real: the real stories, read lazily: anything with ``setup("fit")``, ``iter_train_texts()`` and
            ``num_train_texts()`` (the real training stories, streamed) and ``tokenizer`` (a TinyStories real
            data module).
    """

    def __init__(self, config: DiversityConfig, real: Any):
        self.config = config
        self.real = real
        self._rare: set[str] | None = None

    def __call__(self, stage: Path, arrays: Mapping[str, np.ndarray], generation: int) -> dict[str, float]:
        """Texts and metrics of the synthetic set: ``tokens`` and ``lengths`` (n,) (:class:`StoredStories`: rows
        padded to L, or the stories back to back as the store keeps them), optional ``finished`` (n,).

        Chunk by chunk (:data:`~datamodules.story_corpus.STORIES_PER_CHUNK` stories): decode, count, append to
        ``stories.txt``. A story whose text holds the separator ``<|endoftext|>`` (the model spelled it out
        in ordinary tokens) cannot be written in that format: it is left out of the files, counted
        (``sample_separator_stories``) and scored with the others.
        """
        if "tokens" not in arrays:  # no synthetic set (a one-generation run draws none)
            return {}
        stored = StoredStories(arrays["tokens"], arrays["lengths"])  # padded rows or back to back (as stored)
        lengths = stored.lengths
        counts = NgramDiversity()
        shown: list[str] = []
        blank = unwritable = 0
        with (
            atomic_open(Path(stage) / STORIES_FILE, "w") as out,
            Progress(len(lengths), f"scoring gen {generation}", "stories") as progress,
        ):
            for start in range(0, len(lengths), STORIES_PER_CHUNK):
                stop = min(start + STORIES_PER_CHUNK, len(lengths))
                kept = [s.strip() for s in decode_rows(self.real.tokenizer, stored.rows(start, stop))]
                blank += kept.count("")
                kept = [s for s in kept if s]
                counts.add(kept)
                written = [s for s in kept if EOT_SEPARATOR not in s]
                unwritable += len(kept) - len(written)
                out.write(format_corpus(written))
                shown.extend(written[: self.config.shown_stories - len(shown)])
                progress.update(stop - start)
        atomic_write_text(Path(stage) / SAMPLES_FILE, format_corpus(shown))
        metrics = {f"sample_{k}": v for k, v in diversity_metrics(counts, self.rare_words()).items()}
        metrics["sample_mean_tokens"] = float(lengths.mean()) if len(lengths) else 0.0
        if "finished" in arrays:
            finished = np.asarray(arrays["finished"])
            metrics["sample_finished_fraction"] = float(finished.mean()) if len(finished) else 0.0
        metrics["sample_empty_stories"] = float(blank)
        metrics["sample_separator_stories"] = float(unwritable)
        if blank:
            log.warning("generation %d: %d of %d synthetic stories are empty text", generation, blank, len(lengths))
        if unwritable:
            log.warning(
                "generation %d: %d synthetic stories hold the text %s and are left out of %s (scored, and kept "
                "as tokens)", generation, unwritable, EOT_SEPARATOR, STORIES_FILE,
            )  # fmt: skip
        return metrics

    def rare_words(self) -> set[str]:
        """The real training set's rare words (computed once)."""
        if self._rare is None:
            self.real.setup("fit")
            # Once per run, but minutes for a published-size real set (2.12M stories): a progress line says so.
            # The stories are streamed from the cache, never held as one list.
            total = self.real.num_train_texts()
            with Progress(total, "finding the real training set's rare words", "stories") as progress:

                def counted() -> Iterator[str]:
                    for text in self.real.iter_train_texts():
                        yield text
                        progress.update()

                self._rare = rare_words(counted(), max_doc_freq=self.config.rare_doc_freq)
        return self._rare


__all__ = ["SAMPLES_FILE", "STORIES_FILE", "DiversityConfig", "StorySampleEvaluator", "corpus_diversity"]
