"""Molecular graphs with 3-D coordinates: one example of the conformer-diffusion recipe, and batches of them.

A :class:`MolGraph` is one molecule with explicit hydrogens: per atom its element and a few RDKit
descriptors, per bond (stored in both directions) its type, and one conformation (``pos``, Angstrom).
The same graph with model-generated coordinates is a synthetic example, so real and synthetic
examples share one type and one collate function.

A :class:`MoleculeBatch` concatenates graphs the way graph libraries do: atoms of all molecules in
one array, ``batch[i]`` the molecule of atom ``i``, bond indices offset by the atoms before them.

Atom features (``atom_feat``, integer codes, one column each; sizes in :data:`ATOM_FEATURE_SIZES`):

==========  ==================================================================
column      code
==========  ==================================================================
charge      formal charge + 2, clipped to 0..4
hybrid      RDKit hybridisation: 0 other, 1 S, 2 SP, 3 SP2, 4 SP3, 5 SP3D, 6 SP3D2
aromatic    0 / 1
num_hs      total attached hydrogens, clipped to 0..4
in_ring     0 / 1
==========  ==================================================================

Bond types (``bond_type``): 1 single, 2 double, 3 triple, 4 aromatic. Code 0 is left free for
edges a model adds itself (radius edges between atoms that are not bonded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch

MAX_ATOMIC_NUMBER = 100
"""Atomic numbers are element codes directly: 1 (H) .. 100."""
ATOM_FEATURES = ("charge", "hybrid", "aromatic", "num_hs", "in_ring")
ATOM_FEATURE_SIZES = (5, 7, 2, 5, 2)
"""Number of codes of each column of ``atom_feat``."""
NUM_BOND_TYPES = 5
"""Bond-type codes 0..4 (0 reserved for non-bonded edges)."""
BOND_CODES = {"SINGLE": 1, "DOUBLE": 2, "TRIPLE": 3, "AROMATIC": 4}
HYBRID_CODES = {"S": 1, "SP": 2, "SP2": 3, "SP3": 4, "SP3D": 5, "SP3D2": 6}


@dataclasses.dataclass
class MolGraph:
    """One molecule: ``z`` [N] atomic numbers, ``atom_feat`` [N, 5], ``edge_index`` [2, E] (both directions),
    ``bond_type`` [E], ``pos`` [N, 3] float32 Angstrom, ``mol_id`` its index in the real training set
    (or test set) it came from, ``smiles`` for reports."""

    z: torch.Tensor
    atom_feat: torch.Tensor
    edge_index: torch.Tensor
    bond_type: torch.Tensor
    pos: torch.Tensor
    mol_id: int = -1
    smiles: str = ""

    @property
    def num_atoms(self) -> int:
        return int(self.z.shape[0])

    def with_pos(self, pos: torch.Tensor | np.ndarray) -> MolGraph:
        """The same graph with other coordinates (a generated conformation)."""
        pos = torch.from_numpy(np.array(pos, dtype=np.float32))  # a copy: stored sets are read-only memory maps
        if pos.shape != (self.num_atoms, 3):
            raise ValueError(f"coordinates of shape {tuple(pos.shape)} for a molecule of {self.num_atoms} atoms")
        return dataclasses.replace(self, pos=pos)

    def validate(self) -> None:
        """Raise ValueError if the arrays disagree (atom counts, edge indices out of range, non-finite coordinates)."""
        n = self.num_atoms
        if n == 0:
            raise ValueError("a molecule without atoms")
        if self.atom_feat.shape != (n, len(ATOM_FEATURES)):
            raise ValueError(f"atom_feat of shape {tuple(self.atom_feat.shape)} for {n} atoms")
        if self.pos.shape != (n, 3):
            raise ValueError(f"{tuple(self.pos.shape)} coordinates for {n} atoms")
        if self.edge_index.ndim != 2 or self.edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must be [2, E], got {tuple(self.edge_index.shape)}")
        if self.bond_type.shape != (self.edge_index.shape[1],):
            raise ValueError("one bond type per edge expected")
        if self.edge_index.numel() and (int(self.edge_index.min()) < 0 or int(self.edge_index.max()) >= n):
            raise ValueError("bond indices out of range")
        if not torch.isfinite(self.pos).all():
            raise ValueError("non-finite coordinates")


@dataclasses.dataclass
class MoleculeBatch:
    """Several :class:`MolGraph` concatenated; ``batch`` [sum N] maps atoms to molecules 0..B-1."""

    z: torch.Tensor
    atom_feat: torch.Tensor
    edge_index: torch.Tensor
    bond_type: torch.Tensor
    pos: torch.Tensor
    batch: torch.Tensor
    num_atoms: torch.Tensor
    mol_id: torch.Tensor

    @property
    def num_graphs(self) -> int:
        return int(self.num_atoms.shape[0])

    def to(self, device: torch.device | str) -> MoleculeBatch:
        """The batch on ``device``; page-locked tensors (:meth:`pin_memory`) are copied to a GPU without waiting."""
        cuda = torch.device(device).type == "cuda"
        return MoleculeBatch(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=cuda and getattr(self, f.name).is_pinned())
                for f in dataclasses.fields(self)
            }
        )

    def pin_memory(self) -> MoleculeBatch:
        """The batch in page-locked memory (a DataLoader with ``pin_memory=True`` calls it), so that :meth:`to` can
        copy it to a GPU asynchronously; Lightning moves a batch object with its own ``to``, without asking for
        a non-blocking copy."""
        return MoleculeBatch(**{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)})

    def with_pos(self, pos: torch.Tensor) -> MoleculeBatch:
        return dataclasses.replace(self, pos=pos)

    def split_pos(self, pos: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-molecule coordinate arrays of ``pos`` (default: the batch's own)."""
        pos = self.pos if pos is None else pos
        return list(torch.split(pos, self.num_atoms.tolist()))


def collate_molecules(graphs: Sequence[MolGraph]) -> MoleculeBatch:
    """Concatenate graphs into one :class:`MoleculeBatch` (bond indices offset per molecule)."""
    if not graphs:
        raise ValueError("cannot collate an empty list of molecules")
    counts = torch.tensor([g.num_atoms for g in graphs], dtype=torch.long)
    offsets = torch.cumsum(counts, 0) - counts
    return MoleculeBatch(
        z=torch.cat([g.z for g in graphs]).long(),
        atom_feat=torch.cat([g.atom_feat for g in graphs]).long(),
        edge_index=torch.cat([g.edge_index.long() + off for g, off in zip(graphs, offsets.tolist())], dim=1),
        bond_type=torch.cat([g.bond_type for g in graphs]).long(),
        pos=torch.cat([g.pos for g in graphs]).float(),
        batch=torch.repeat_interleave(torch.arange(len(graphs)), counts),
        num_atoms=counts,
        mol_id=torch.tensor([g.mol_id for g in graphs], dtype=torch.long),
    )


def conformer_rows(pos: np.ndarray, num_atoms: np.ndarray) -> Callable[[int], np.ndarray]:
    """Sample i's coordinates ``(num_atoms[i], 3)`` of a stored ``pos``: rows padded to the largest molecule
    (``(n, max_atoms, 3)``, as sampled) or the molecules back to back (``(sum(num_atoms), 3)``, as the store keeps
    them: ``ragged_samples``)."""
    counts = np.asarray(num_atoms, dtype=np.int64)
    if pos.ndim == 3:
        return lambda i: pos[i, : counts[i]]
    starts = np.cumsum(counts) - counts
    return lambda i: pos[starts[i] : starts[i] + counts[i]]


__all__ = [
    "ATOM_FEATURES",
    "ATOM_FEATURE_SIZES",
    "BOND_CODES",
    "HYBRID_CODES",
    "MAX_ATOMIC_NUMBER",
    "NUM_BOND_TYPES",
    "MolGraph",
    "MoleculeBatch",
    "collate_molecules",
    "conformer_rows",
]
