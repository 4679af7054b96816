"""Score a conformer generator on a fixed subset of the real test molecules after every test run.

At the end of ``trainer.test`` the callback generates conformations for the same test molecules
with the same noise every generation (a generator seeded by a constant), compares them with the
molecules' real conformers and logs, as ``test_<name>``:

* ``cov_r`` and ``mat_r`` (means over molecules; also ``cov_r_median`` / ``mat_r_median``):
  coverage and matching of the real conformers (GeoDiff's recall metrics), with RDKit's symmetry-aware
  best-alignment RMSD on heavy atoms and GeoDiff's threshold delta (0.5 Angstrom for QM9, 1.25 for
  GEOM-Drugs). Following GeoDiff, ``gen_per_ref`` (2) conformers are generated per real conformer;
* ``bond_w1``: the Wasserstein-1 distance (Angstrom) between the bond lengths of the generated and the
  real conformers of those molecules;
* ``broken_fraction``: generated conformers with non-finite or exploded coordinates (these count as
  not covered; exploded ones inflate ``mat_r``, so read it with its median).

Every process of a multi-device run computes the same numbers (same molecules, same noise); only the
logged values of global rank 0 count, so nothing is synchronised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from rdkit import Chem

from datamodules.mol_graph import MolGraph, collate_molecules
from evaluation.conformers import bond_length_distance, evaluate_conformers

QUALITY_SEED = 4_000_037
"""Seed of the generator noise of the quality molecules: the same in every generation and run."""


class ConformerQuality(pl.Callback):
    """Generate conformers for fixed test molecules at the end of each test run and log COV/MAT and bond lengths.

    Args:
        molecules: per test molecule, ``(rdkit_mol, graphs)``: the RDKit molecule (explicit H, the
            graphs' atom order) and its real conformers as :class:`MolGraph` (one per conformer); or a
            function returning them, called at the first test run (when the data is set up).
        threshold: delta of COV-R in Angstrom.
        gen_per_ref: generated conformers per real conformer.
        batch_size: molecules generated at once.
    """

    def __init__(
        self,
        molecules: Sequence[tuple[Chem.Mol, Sequence[MolGraph]]]
        | Callable[[], Sequence[tuple[Chem.Mol, Sequence[MolGraph]]]],
        threshold: float,
        gen_per_ref: int = 2,
        batch_size: int = 256,
    ):
        if gen_per_ref < 1:
            raise ValueError(f"gen_per_ref must be >= 1, got {gen_per_ref}")
        self._source = molecules
        self._molecules: list[tuple[Chem.Mol, list[MolGraph]]] | None = None
        self.threshold = float(threshold)
        self.gen_per_ref = int(gen_per_ref)
        self.batch_size = int(batch_size)

    @property
    def molecules(self) -> list[tuple[Chem.Mol, list[MolGraph]]]:
        if self._molecules is None:
            source = self._source() if callable(self._source) else self._source
            self._molecules = [(mol, list(graphs)) for mol, graphs in source]
            if not self._molecules:
                raise ValueError("ConformerQuality needs at least one test molecule")
        return self._molecules

    def generated(self, module: pl.LightningModule) -> tuple[list[list[np.ndarray]], int]:
        """Per molecule, its ``gen_per_ref x references`` generated conformers ``(N, 3)`` in a fixed order,
        and how many of all of them are broken (non-finite or exploded: ``module.broken_mask``)."""
        jobs = [
            (k, graphs[0])
            for k, (_, graphs) in enumerate(self.molecules)
            for _ in range(self.gen_per_ref * len(graphs))
        ]
        generator = torch.Generator().manual_seed(QUALITY_SEED)
        out: list[list[np.ndarray]] = [[] for _ in self.molecules]
        broken = 0
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            batch = collate_molecules([graph for _, graph in chunk])
            pos = module.generate(batch, generator).cpu()  # (sumN, 3)
            broken += int(module.broken_mask(pos, batch).sum())
            for (k, _), conf in zip(chunk, batch.split_pos(pos)):
                out[k].append(conf.numpy())
        return out, broken

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        generated, broken = self.generated(pl_module)
        items = [(mol, gen, [g.pos.numpy() for g in graphs]) for (mol, graphs), gen in zip(self.molecules, generated)]
        scores = evaluate_conformers(items, threshold=self.threshold)
        flat_graphs = [graphs[0] for (_, graphs), gen in zip(self.molecules, generated) for _ in gen]
        flat_gen = [conf for gen in generated for conf in gen]
        bonds = bond_length_distance(flat_graphs, None, flat_gen)
        total = max(1, sum(len(gen) for gen in generated))
        metrics = {
            "test_cov_r": scores["cov_r_mean"],
            "test_cov_r_median": scores["cov_r_median"],
            "test_mat_r": scores["mat_r_mean"],
            "test_mat_r_median": scores["mat_r_median"],
            "test_bond_w1": bonds["bond_w1/all"],
            "test_broken_fraction": broken / total,
        }
        for name, value in metrics.items():
            pl_module.log(name, float(value), sync_dist=False, rank_zero_only=True)


__all__ = ["QUALITY_SEED", "ConformerQuality"]
