"""Quality of a generation's synthetic conformers, for any model that generates conformations of real graphs.

A synthetic example of the conformer recipes is a real training molecule (``mol_id``, its ``num_atoms``)
with generated coordinates (``pos``), plus the sampler's record of broken draws (``resampled``,
``replaced_by_real``). :class:`ConformerSampleEvaluator` scores a synthetic set against the real
training conformers of the same graphs and draws a few of them; the per-generation COV/MAT on real
test molecules is :class:`callbacks.conformer_quality.ConformerQuality`, configured by the same
:class:`ConformerQualityConfig`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from collapse.errors import ConfigError
from datamodules.mol_graph import conformer_rows
from evaluation.conformers import bond_length_distance, draw_conformers

log = logging.getLogger(__name__)

SAMPLES_PICTURE = "samples.png"
"""A few molecules of a generation with their generated conformers over the real ones."""


@dataclass
class ConformerQualityConfig:
    """The conformer-quality scores of each generation (``--quality.*``)."""

    num_molecules: int = 50
    """Test molecules scored by COV/MAT every generation (the first of the test split; 0: no COV/MAT)."""
    gen_per_ref: int = 2
    """Generated conformers per real conformer (GeoDiff: 2)."""
    threshold: float | None = None
    """COV-R threshold delta in Angstrom; default: GeoDiff's 0.5 for QM9 (qm9pack), 1.25 for the other sources."""
    shown_molecules: int = 6
    """Molecules drawn in each generation's samples.png."""

    def __post_init__(self) -> None:
        for flag in ("num_molecules", "shown_molecules"):
            value = getattr(self, flag)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"--quality.{flag} must be an integer >= 0, got {value!r}")
        if isinstance(self.gen_per_ref, bool) or not isinstance(self.gen_per_ref, int) or self.gen_per_ref < 1:
            raise ConfigError(f"--quality.gen_per_ref must be an integer >= 1, got {self.gen_per_ref!r}")
        if self.threshold is not None and not self.threshold > 0:
            raise ConfigError(f"--quality.threshold must be > 0, got {self.threshold!r}")

    def delta(self, source: str) -> float:
        """The COV threshold for data from ``source`` (``--data.source``)."""
        return self.threshold if self.threshold is not None else (0.5 if source == "qm9pack" else 1.25)


class ConformerSampleEvaluator:
    """Scores a generation's synthetic conformers: the ``evaluate_samples`` of a conformer modality.

    Returns ``sample_bond_w1`` (bond-length Wasserstein-1 against the real conformers of the same graphs),
    ``sample_broken_first_draw`` (fraction broken at the first draw), ``sample_resampled`` and
    ``sample_replaced_by_real`` (counts), and draws ``samples.png``.

    Args:
        config: the ``--quality.*`` settings.
        real: the real molecules, read lazily: anything with ``train_graphs()`` (the real training
            :class:`~datamodules.mol_graph.MolGraph` list that ``mol_id`` indexes).
    """

    def __init__(self, config: ConformerQualityConfig, real: Any):
        self.config = config
        self.real = real

    def __call__(self, stage: Path, arrays: Mapping[str, np.ndarray], generation: int) -> dict[str, float]:
        """Metrics and the picture of the synthetic set ``arrays`` (``mol_id``, ``num_atoms``, ``pos``, ...)."""
        if "pos" not in arrays:  # no synthetic set (a one-generation run draws none)
            return {}
        graphs = self.real.train_graphs()
        mol_id, num_atoms, pos = np.asarray(arrays["mol_id"]), np.asarray(arrays["num_atoms"]), arrays["pos"]
        chosen = [graphs[int(i)] for i in mol_id]
        row = conformer_rows(pos, num_atoms)  # padded rows, or back to back as the store keeps them
        generated = [np.asarray(row(k)) for k in range(len(mol_id))]
        bonds = bond_length_distance(chosen, None, generated)
        shown = list(range(min(self.config.shown_molecules, len(chosen))))
        if shown:
            draw_conformers(
                [chosen[k] for k in shown],
                [[generated[k]] for k in shown],
                Path(stage) / SAMPLES_PICTURE,
                ref_pos=[chosen[k].pos.numpy() for k in shown],
            )
        n = max(1, len(mol_id))
        metrics = {"sample_bond_w1": bonds["bond_w1/all"]}
        none = np.zeros(len(mol_id), dtype=np.int64)  # a set drawn without these counts
        resampled = np.asarray(arrays.get("resampled", none))
        replaced = np.asarray(arrays.get("replaced_by_real", none), dtype=bool)
        metrics["sample_broken_first_draw"] = float((resampled > 0).sum() + (replaced & (resampled == 0)).sum()) / n
        metrics["sample_resampled"] = float((resampled > 0).sum())
        metrics["sample_replaced_by_real"] = float(replaced.sum())
        if replaced.any():
            log.warning(
                "generation %d: %d of %d generated conformers stayed broken and were replaced by the real ones",
                generation,
                int(replaced.sum()),
                len(mol_id),
            )
        return metrics


__all__ = ["SAMPLES_PICTURE", "ConformerQualityConfig", "ConformerSampleEvaluator"]
