"""Real molecules with 3-D conformations for the GeoDiff-style conformer diffusion recipe.

Follows the real data module contract of :mod:`datamodules.synthetic`. Every example is a
:class:`~datamodules.mol_graph.MolGraph`: one conformer of one molecule, explicit hydrogens (as
GeoDiff uses them), atoms in the order of the source's coordinates, coordinates in Angstrom. A
synthetic example is the same graph with generated coordinates (:meth:`GeomDataModule.synthetic_dataset`).

Sources (``--data.source``)
---------------------------
``qm9pack`` (the default, offline)
    The 130,831 QM9 molecules that the ``qm9pack`` package ships as ``qm9pack/data/qm9_part{1,2,3}.csv``
    (found without importing ``qm9pack``, whose ``__init__`` needs ``pkg_resources``), or CSV files in
    the same format given by ``--data.path`` (a file, or a folder whose ``qm9_part*.csv`` files, else
    ``*.csv`` files, are read in name order). Columns used: ``Index`` (kept as the identifier
    ``qm9:<Index>``), ``SMILES``, ``N_atoms``, ``Elements`` and ``XYZ_Ang`` (the DFT-relaxed geometry,
    one conformer per molecule, so ``conformers_per_molecule`` does not apply). The CSV gives no bonds:
    they are perceived from the coordinates (RDKit's ``DetermineBonds``, the xyz2mol algorithm, with
    the SMILES's total charge) and must give the SMILES's molecule (canonical SMILES without stereo).
    When they do not (about 7% of QM9: strained cages where the covalent-radius rule adds a bond, and
    charge-separated forms), the SMILES's own graph is mapped onto the coordinates instead: it is kept
    if every one of its bonds joins two atoms closer than 1.3 x the sum of their covalent radii (a
    substructure match of the SMILES graph, with hydrogens, into the distance graph). A molecule that
    passes neither check is skipped as ``graph_mismatch``. Only the rows needed are parsed: the row
    order is shuffled with ``split_seed`` first, then rows are read (seek + parse one line) until the
    splits are full, so the default (1,200 molecules) parses about 1% of the rows (the files are only
    scanned for line starts, once per process, in under a second).
``rdkit_folder``
    GEOM's official ``rdkit_folder`` layout: ``--data.path`` is the folder holding ``summary_drugs.json``
    or ``summary_qm9.json`` (or that JSON file itself). The summary maps SMILES -> a dict with a
    ``pickle_path`` relative to the folder (``drugs/<name>.pickle``); each pickle is a dict whose
    ``conformers`` list holds dicts with ``rd_mol`` (an RDKit Mol with explicit hydrogens and one 3-D
    conformer) and ``boltzmannweight``. A training molecule contributes its ``conformers_per_molecule``
    usable conformers of largest Boltzmann weight (GeoDiff, after ConfGF, trained on 40,000 molecules
    with their 5 most likely conformers each, for GEOM-Drugs and GEOM-QM9 alike: pass
    ``--data.conformers_per_molecule 5``), a held-out one its ``test_conformers_per_molecule`` (GeoDiff
    scored its 200 test molecules against all their conformers: pass a large number). Pickles are opened
    lazily, in the seeded shuffled order of the summary's SMILES, until the splits are full. GEOM-Drugs
    molecules are large (up to 181 atoms with H, 44 on average): raise ``--data.max_atoms``. A
    ``pickle_path`` must resolve (symbolic links followed) inside the summary's folder: an absolute path
    or one that climbs out with ``..`` is refused (UserError naming the entry). The pickles are read
    through the allow-list below.
``geodiff``
    GeoDiff's preprocessed pickles: ``--data.path`` is one ``.pkl`` file or a folder with
    ``train_data*.pkl``, ``val_data*.pkl`` and ``test_data*.pkl``. Each holds a list of torch_geometric
    ``Data`` objects, one conformer each, with ``rdmol`` (RDKit Mol with H), ``pos``, ``smiles``, ...
    torch_geometric is not needed: its classes unpickle into a stand-in that keeps the attribute dict
    (both the 1.x layout and the 2.x ``_store`` layout). Coordinates are ``pos`` (checked against the
    ``rdmol``'s atom count), else the ``rdmol``'s conformer; without ``rdmol`` the graph is
    ``AddHs(smiles)`` in RDKit's order, kept only if every bond has a plausible length. A folder with
    a train and a test file keeps GeoDiff's split: test molecules come from the test file, validation
    molecules from the val file (or, without one, from the training file) and real training molecules
    from the training file; a training molecule that also occurs in a held-out file is dropped
    (``duplicate_molecule``). A single file is split like the other sources. Records of one molecule
    (same canonical SMILES) are its conformers, largest ``boltzmannweight`` first when every record has one.
    Read through the allow-list below.
``sdf``
    One ``.sdf`` file or a folder of them (name order), read with explicit hydrogens
    (``removeHs=False``); records of the same molecule (same canonical SMILES without stereo) are
    conformers of one molecule, in file order.

Pickles
-------
``rdkit_folder`` and ``geodiff`` files are pickles, and a pickle can name any importable callable to
run while it loads. Both are read by one unpickler that resolves only an allow-list (see
:func:`_allowed_globals`): RDKit's ``Mol`` / ``RWMol``, numpy arrays, scalars and dtypes, torch tensors
and storages (a storage's bytes, a small ``torch.save`` file, are read through the same allow-list, not
by torch's own helper, which would unpickle them unrestricted), ``collections.OrderedDict``, the
builtin containers and numbers, and every ``torch_geometric`` class, which becomes the inert
:class:`PygStandIn`. Any other name (``os.system``, ``builtins.exec``, ...) stops the run with a
one-line UserError naming the file and the refused ``module.name``. This closes the ways a pickle runs
code, not every risk of a hostile file (RDKit still parses the molecules' binary form, and a file can
ask for a lot of memory): read data you trust.

Split policy
------------
Molecules, not conformers, are split, so no molecule (identified by its canonical SMILES without
stereo and without hydrogens) has conformers in two splits. Candidates are visited in an order
shuffled with ``split_seed`` (fixed across run seeds): the first ``num_test`` usable molecules are
the test set, the next ``num_val`` the validation set and the next ``num_real`` the real training
set. The same config therefore gives the same real set in every run and generation; a smaller
``num_real`` gives a prefix of a larger one's molecules and leaves the test set alone. Each split
holds the kept conformers of its molecules (up to ``conformers_per_molecule`` for training, up to
``test_conformers_per_molecule`` for validation and test), molecule by molecule; an example's
``mol_id`` is its index in its split (``MolGraphSet.molecule`` maps it to its molecule). A molecule
seen again later (a second QM9 row or GEOM entry with the same graph, e.g. a stereoisomer) is
skipped as ``duplicate_molecule``.

Bad input
---------
A record (QM9 row, GEOM conformer, GeoDiff object, SDF record) is skipped and counted under one of
:data:`SKIP_REASONS` when RDKit cannot parse or sanitize it, its file is missing, it has no 3-D
coordinates (no conformer, a conformer RDKit marks 2-D, or all z = 0 in a molecule that cannot be
flat, i.e. with an sp3 atom of 3 or more neighbours: linear and planar molecules lying in the
xy-plane, like two of QM9's, are kept), hydrogens without coordinates, an atom count that disagrees
with the coordinates, non-finite coordinates, an element outside 1..100, a bond that is not single,
double, triple or aromatic, more than ``max_atoms`` atoms (hydrogens included), or a graph that is
not its molecule's. The counts are in :attr:`GeomDataModule.data_stats` (``skipped``: records per
reason; ``duplicate_molecule`` counts molecules). Refused with a one-line
:class:`~collapse.errors.UserError`: a missing or unreadable path, a file without the expected
columns or keys, and fewer usable molecules than ``num_test + num_val + num_real`` (the message names
the flag to lower). :class:`~collapse.errors.ConfigError` for flag values out of range.

Cache (``--data.cache_dir``, default ``$MODEL_COLLAPSE_CACHE/geom`` or ``~/.cache/model-collapse/geom``)::

    <cache_dir>/<source>-<key>/      one entry per data identity (key: sha256 of identity.json)
        identity.json                source, resolved path, size and mtime of the files read (the CSVs,
                                     the summary JSON, the pickles or SDF files), split sizes, seed,
                                     max_atoms, conformers_per_molecule, cache version
        data.npz                     the featurised splits as flat numeric arrays, the three splits back
                                     to back in each: atoms and bonds of all examples with ``atom_ptr``
                                     / ``edge_ptr`` offsets, and the RDKit binary form of each distinct
                                     molecule graph (without conformers) in ``mols_data`` with
                                     ``mols_ptr`` offsets
        strings.json                 per split: ``source_ids`` (per example) and ``smiles`` (per
                                     molecule); ``sizes``: each array's length in each split
        stats.json                   the counts of data_stats (written last: the entry is complete)

Nothing in an entry is a pickle: ``data.npz`` is read with ``allow_pickle=False`` and the rest is JSON,
so a cache folder that others can write cannot make a run execute code; a damaged or foreign entry is
refused with a UserError that names it. Files are written atomically, so a killed preparation is
redone, never half-read. The source is parsed once per entry; later runs (and other ranks) only read
``data.npz`` and ``strings.json``.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import csv
import functools
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import os
import pickle
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rdkit import Chem
from rdkit.Chem import rdDetermineBonds
from rdkit.Geometry import Point3D
from rdkit.rdBase import BlockLogs
from torch.utils.data import Dataset

from collapse.atomic import atomic_open, atomic_write_json, check_writable_folder, entry_lock, make_folder
from collapse.errors import ConfigError, UserError
from collapse.progress import Progress
from datamodules.base import RealDataModuleBase, first_line
from datamodules.mol_graph import (
    ATOM_FEATURES,
    BOND_CODES,
    HYBRID_CODES,
    MAX_ATOMIC_NUMBER,
    MolGraph,
    collate_molecules,
    conformer_rows,
)

log = logging.getLogger(__name__)

SOURCES = ("qm9pack", "rdkit_folder", "geodiff", "sdf")
"""Valid values of ``--data.source``."""
SPLITS = ("train", "val", "test")
"""The splits of a cache entry."""
SKIP_REASONS = (
    "unparsable",
    "missing_file",
    "not_3d",
    "implicit_hydrogens",
    "atom_count_mismatch",
    "non_finite_coordinates",
    "unsupported_atom",
    "unsupported_bond",
    "too_many_atoms",
    "graph_mismatch",
    "duplicate_molecule",
)
"""Why a record (or, for ``duplicate_molecule``, a molecule) is skipped; the keys of ``data_stats["skipped"]``."""
DEFAULT_MAX_ATOMS = 32
"""Default ``--data.max_atoms``: every QM9 molecule (at most 29 atoms with H) fits."""
QM9_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
"""The CSV files of the qm9pack package (``qm9pack/data/``)."""
QM9_COLUMNS = ("Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang")
"""Columns of the qm9pack CSVs that are read."""
CACHE_ENV = "MODEL_COLLAPSE_CACHE"
"""Environment variable naming the project's cache folder (default ``~/.cache/model-collapse``)."""
CACHE_VERSION = 2
"""Part of every cache key: bump it when the featurisation, the checks or the cache format change."""
STATS_FILE = "stats.json"
DATA_FILE = "data.npz"
STRINGS_FILE = "strings.json"
_ARRAY_KEYS = (
    "atom_ptr",
    "edge_ptr",
    "z",
    "atom_feat",
    "pos",
    "edge_index",
    "bond_type",
    "molecule",
    "mol_ref",
    "mols_data",
    "mols_ptr",
)  # the numeric arrays of a split, stored in DATA_FILE
_STRING_KEYS = ("source_ids", "smiles")  # the string lists of a split, stored in STRINGS_FILE
_CONCAT_AXIS = {"edge_index": 1}  # the axis along which a key's splits are stored back to back (default 0)

_COVALENT_FACTOR = 1.3  # a bond is plausible up to 1.3 x the sum of covalent radii (RDKit's DetermineConnectivity)
_SCAN_BLOCK = 16 << 20  # bytes of a CSV scanned at a time for line starts
_PERIODIC_TABLE = Chem.GetPeriodicTable()
_REMOVE_HS = Chem.RemoveHsParameters()
_REMOVE_HS.removeDefiningBondStereo = True  # else an imine's H stays in the key ("[H]N=C...")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GeomDataConfig:
    """Where the molecules come from and how many of them the runs use (``--data.*``)."""

    source: str = "qm9pack"
    """Data source: qm9pack (QM9 shipped by the qm9pack package, offline), rdkit_folder (GEOM's rdkit_folder),
    geodiff (GeoDiff's train/val/test_data*.pkl) or sdf. rdkit_folder and geodiff files are pickles, read through
    an allow-list (RDKit molecules, numpy arrays, torch tensors, plain containers: any other class stops the run);
    use data you trust."""
    path: str | None = None
    """qm9pack: CSVs in the qm9pack format, a file or a folder (default: the package's own); rdkit_folder: the
    folder with summary_drugs.json / summary_qm9.json, or that file; geodiff: a .pkl file or a folder with
    train_data*.pkl, val_data*.pkl, test_data*.pkl; sdf: an .sdf file or a folder of them (required but for qm9pack)."""
    num_real: int = 1000
    """Real training molecules: the first num_real of the seeded shuffled pool after the test and validation ones."""
    num_val: int = 0
    """Validation molecules (0: no validation set)."""
    num_test: int = 200
    """Test molecules, the first of the seeded shuffled pool (geodiff folders: of the test file)."""
    split_seed: int = 0
    """Seed of the molecule shuffle; fixed across run seeds so every run sees the same real set."""
    max_atoms: int = DEFAULT_MAX_ATOMS
    """Molecules with more atoms (hydrogens included) are skipped and counted; QM9 has at most 29, GEOM-Drugs up
    to 181 (GeoDiff kept all of them)."""
    conformers_per_molecule: int = 1
    """Multi-conformer sources (rdkit_folder, geodiff, sdf): conformers of each molecule kept as examples, the
    highest Boltzmann weight first (GeoDiff: up to 5 for GEOM-Drugs and GEOM-QM9); qm9pack has one per molecule."""
    test_conformers_per_molecule: int | None = None
    """Conformers kept per validation and test molecule, the references of coverage / matching metrics (default:
    conformers_per_molecule; GeoDiff used all of them: pass a large number)."""
    cache_dir: str | None = None
    """Folder of the featurised-molecule cache (default: $MODEL_COLLAPSE_CACHE/geom or ~/.cache/model-collapse/geom)."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"--data.source must be one of {SOURCES}, got {self.source!r}")
        if self.path is not None and not (isinstance(self.path, str) and self.path.strip()):
            raise ConfigError(f"--data.path must be a non-empty string or None, got {self.path!r}")
        if self.source != "qm9pack" and self.path is None:
            raise ConfigError(f"--data.source {self.source} needs --data.path: the file or folder to read")
        for flag in ("num_real", "num_test", "max_atoms", "conformers_per_molecule"):
            value = getattr(self, flag)
            if not (_is_int(value) and value > 0):
                raise ConfigError(f"--data.{flag} must be a positive integer, got {value!r}")
        if self.test_conformers_per_molecule is not None and not (
            _is_int(self.test_conformers_per_molecule) and self.test_conformers_per_molecule > 0
        ):
            raise ConfigError(
                "--data.test_conformers_per_molecule must be a positive integer or None, "
                f"got {self.test_conformers_per_molecule!r}"
            )
        for flag in ("num_val", "split_seed"):
            value = getattr(self, flag)
            if not (_is_int(value) and value >= 0):
                raise ConfigError(f"--data.{flag} must be an integer >= 0, got {value!r}")
        if self.cache_dir is not None and not (isinstance(self.cache_dir, str) and self.cache_dir.strip()):
            raise ConfigError(f"--data.cache_dir must be a non-empty string or None, got {self.cache_dir!r}")

    @property
    def num_molecules(self) -> int:
        """Molecules the splits need: ``num_test + num_val + num_real``."""
        return self.num_test + self.num_val + self.num_real

    def conformers(self, split: str) -> int:
        """Conformers kept per molecule of ``split``."""
        if split == "train" or self.test_conformers_per_molecule is None:
            return self.conformers_per_molecule
        return self.test_conformers_per_molecule


def default_cache_dir() -> Path:
    """The molecule cache: ``$MODEL_COLLAPSE_CACHE/geom``, else ``~/.cache/model-collapse/geom``."""
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "model-collapse"
    return root / "geom"


# ---- featurisation ----------------------------------------------------------------------------------------------
class UnusableMolecule(ValueError):
    """A record that cannot be an example; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _can_be_flat(mol: Chem.Mol) -> bool:
    # A tetrahedral or pyramidal centre (sp3 with >= 3 neighbours) cannot lie in a plane in a real 3-D structure.
    return not any(a.GetDegree() >= 3 and a.GetHybridization() == Chem.HybridizationType.SP3 for a in mol.GetAtoms())


def checked_molecule(mol: Chem.Mol | None, conf_id: int = -1) -> Chem.Mol:
    """A sanitized copy of ``mol`` with only conformer ``conf_id``, or :class:`UnusableMolecule` saying why not.

    Applies the bad-input rules of the module docstring that concern one record (all but ``too_many_atoms``,
    ``graph_mismatch`` and ``duplicate_molecule``, which depend on the config or on other records).
    """
    if not isinstance(mol, Chem.Mol):
        raise UnusableMolecule("unparsable", "RDKit could not read the record")
    if mol.GetNumConformers() == 0:
        raise UnusableMolecule("not_3d", "no conformer")
    try:
        conf = Chem.Conformer(mol.GetConformer(conf_id))
    except ValueError as exc:  # a conformer id the molecule does not have
        raise UnusableMolecule("not_3d", first_line(exc)) from None
    out = Chem.Mol(mol)
    out.RemoveAllConformers()
    conf.SetId(0)
    out.AddConformer(conf, assignId=False)
    try:
        Chem.SanitizeMol(out)
    except Exception as exc:  # RDKit raises several types (MolSanitizeException, KekulizeException, ...)
        raise UnusableMolecule("unparsable", f"RDKit cannot sanitize it ({first_line(exc)})") from None
    n = out.GetNumAtoms()
    if n == 0:
        raise UnusableMolecule("unparsable", "no atoms")
    pos = conf.GetPositions()  # (n, 3) float64
    if pos.shape != (n, 3):
        raise UnusableMolecule("atom_count_mismatch", f"{pos.shape[0]} coordinates for {n} atoms")
    if not np.isfinite(pos).all():
        raise UnusableMolecule("non_finite_coordinates")
    if not conf.Is3D():
        raise UnusableMolecule("not_3d", "a 2-D conformer")
    if n > 2 and np.all(pos[:, 2] == 0) and not _can_be_flat(out):
        raise UnusableMolecule("not_3d", "all z coordinates are 0")
    for atom in out.GetAtoms():
        z = atom.GetAtomicNum()
        if not 1 <= z <= MAX_ATOMIC_NUMBER:
            raise UnusableMolecule("unsupported_atom", f"atomic number {z}")
        # Hydrogens that are counts on a heavy atom, not atoms, have no coordinates.
        if atom.GetTotalNumHs(includeNeighbors=False) > 0:
            raise UnusableMolecule("implicit_hydrogens", f"atom {atom.GetIdx()} has hydrogens without coordinates")
    for bond in out.GetBonds():
        if str(bond.GetBondType()) not in BOND_CODES:
            raise UnusableMolecule("unsupported_bond", f"a {bond.GetBondType()} bond")
    return out


def molecule_key(mol: Chem.Mol) -> str:
    """A molecule's identity: canonical SMILES without stereo and without hydrogens (the split unit)."""
    heavy = Chem.RemoveHs(mol, _REMOVE_HS, sanitize=False)
    return Chem.MolToSmiles(heavy, isomericSmiles=False)


def _graph_arrays(mol: Chem.Mol) -> dict[str, np.ndarray]:
    """The MolGraph arrays of a checked molecule (see :mod:`datamodules.mol_graph` for the codes)."""
    atoms = list(mol.GetAtoms())
    z = np.array([a.GetAtomicNum() for a in atoms], dtype=np.int64)  # (N,)
    feat = np.array(
        [
            [
                min(max(a.GetFormalCharge() + 2, 0), 4),
                HYBRID_CODES.get(str(a.GetHybridization()), 0),
                int(a.GetIsAromatic()),
                min(a.GetTotalNumHs(includeNeighbors=True), 4),  # explicit H atoms are neighbours
                int(a.IsInRing()),
            ]
            for a in atoms
        ],
        dtype=np.int64,
    ).reshape(len(atoms), len(ATOM_FEATURES))  # (N, 5)
    bonds = list(mol.GetBonds())
    # Bond k is edges 2k (begin -> end) and 2k + 1 (end -> begin).
    edge_index = np.zeros((2, 2 * len(bonds)), dtype=np.int64)  # (2, E)
    bond_type = np.zeros(2 * len(bonds), dtype=np.int64)  # (E,)
    for k, b in enumerate(bonds):
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        edge_index[:, 2 * k] = (i, j)
        edge_index[:, 2 * k + 1] = (j, i)
        bond_type[2 * k : 2 * k + 2] = BOND_CODES[str(b.GetBondType())]
    pos = mol.GetConformer().GetPositions().astype(np.float32)  # (N, 3) Angstrom
    return {"z": z, "atom_feat": feat, "edge_index": edge_index, "bond_type": bond_type, "pos": pos}


def featurize(mol: Chem.Mol, conf_id: int = -1) -> MolGraph:
    """The :class:`MolGraph` of ``mol`` (explicit hydrogens) with the coordinates of conformer ``conf_id``.

    Raises :class:`UnusableMolecule` (a ValueError; ``.reason`` in :data:`SKIP_REASONS`) for a molecule
    the bad-input rules of the module docstring refuse. ``smiles`` is :func:`molecule_key`, ``mol_id`` -1.
    """
    checked = checked_molecule(mol, conf_id)
    arrays = _graph_arrays(checked)
    return MolGraph(**{k: torch.from_numpy(v) for k, v in arrays.items()}, smiles=molecule_key(checked))


def _set_positions(mol: Chem.Mol, pos: np.ndarray) -> Chem.Mol:
    """A copy of ``mol`` whose only conformer holds ``pos`` ``(N, 3)`` (UnusableMolecule if N disagrees)."""
    pos = np.asarray(pos, dtype=np.float64)
    n = mol.GetNumAtoms()
    if pos.ndim != 2 or pos.shape != (n, 3):
        raise UnusableMolecule("atom_count_mismatch", f"coordinates of shape {pos.shape} for {n} atoms")
    out = Chem.Mol(mol)
    out.RemoveAllConformers()
    conf = Chem.Conformer(n)
    conf.Set3D(True)
    for i, (x, y, z) in enumerate(pos.tolist()):
        conf.SetAtomPosition(i, Point3D(x, y, z))
    out.AddConformer(conf, assignId=True)
    return out


def _bonds_plausible(mol: Chem.Mol) -> bool:
    """Every bond of ``mol`` joins atoms closer than 1.3 x the sum of their covalent radii (and not overlapping)."""
    pos = mol.GetConformer().GetPositions()
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        limit = _COVALENT_FACTOR * sum(
            _PERIODIC_TABLE.GetRcovalent(mol.GetAtomWithIdx(k).GetAtomicNum()) for k in (i, j)
        )
        if not 0.1 < float(np.linalg.norm(pos[i] - pos[j])) <= limit:
            return False
    return True


# ---- QM9 rows: a graph for coordinates without bonds -----------------------------------------------------------------
def _template_onto_xyz(bare: Chem.Mol, ref: Chem.Mol) -> Chem.Mol | None:
    """``ref``'s graph (with H) in ``bare``'s atom order, if it maps onto bonds of plausible length; else None.

    ``bare``: atoms and one conformer, no bonds. The SMILES graph, stripped to elements and single
    bonds, is matched as a substructure of the distance graph (every pair closer than 1.3 x the
    covalent radii): a match is an atom mapping under which every SMILES bond is geometrically
    plausible. Charges and (Kekule) bond orders are then copied from ``ref`` and the result sanitized.
    """
    ref_h = Chem.AddHs(ref)
    n = bare.GetNumAtoms()
    if ref_h.GetNumAtoms() != n:
        return None
    Chem.Kekulize(ref_h, clearAromaticFlags=True)
    pattern = Chem.RWMol(ref_h)
    for atom in pattern.GetAtoms():
        atom.SetFormalCharge(0)  # only elements must match: charges are in ref, not in bare
        atom.SetNoImplicit(True)
        atom.SetNumExplicitHs(0)
        atom.SetIsAromatic(False)
    for bond in pattern.GetBonds():
        bond.SetBondType(Chem.BondType.SINGLE)  # DetermineConnectivity makes single bonds
        bond.SetIsAromatic(False)
    target = Chem.RWMol(bare)
    rdDetermineBonds.DetermineConnectivity(target)
    pattern.UpdatePropertyCache(strict=False)
    target.UpdatePropertyCache(strict=False)
    match = target.GetSubstructMatch(pattern)  # match[i]: the xyz atom of SMILES atom i
    if len(match) != n:
        return None
    ref_of = [0] * n
    for i, j in enumerate(match):
        ref_of[j] = i
    out = Chem.RWMol()
    for j in range(n):
        src = ref_h.GetAtomWithIdx(ref_of[j])
        atom = Chem.Atom(src.GetAtomicNum())
        atom.SetFormalCharge(src.GetFormalCharge())
        atom.SetNoImplicit(True)
        out.AddAtom(atom)
    for bond in ref_h.GetBonds():
        out.AddBond(match[bond.GetBeginAtomIdx()], match[bond.GetEndAtomIdx()], bond.GetBondType())
    out.AddConformer(Chem.Conformer(bare.GetConformer()), assignId=True)
    try:
        Chem.SanitizeMol(out)
    except Exception:  # RDKit's sanitization errors have several types
        return None
    return out.GetMol()


def qm9_molecule(symbols: Sequence[str], xyz: np.ndarray, smiles: str, stats: dict[str, Any] | None = None) -> Chem.Mol:
    """The molecule of a QM9 row: ``symbols`` [N] and ``xyz`` [N, 3] Angstrom, checked against ``smiles``.

    Bonds come from the coordinates (``DetermineBonds``) when that gives the SMILES's molecule, else
    from the SMILES mapped onto the coordinates (:func:`_template_onto_xyz`); UnusableMolecule
    (``unparsable``, ``atom_count_mismatch``, ``graph_mismatch``) otherwise. ``stats`` (optional)
    counts which way was taken, under ``bonds_from_xyz`` / ``bonds_from_smiles``.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape != (len(symbols), 3):
        raise UnusableMolecule("atom_count_mismatch", f"{len(symbols)} elements but coordinates of shape {xyz.shape}")
    if not np.isfinite(xyz).all():
        raise UnusableMolecule("non_finite_coordinates")
    ref = Chem.MolFromSmiles(smiles)
    if ref is None:
        raise UnusableMolecule("unparsable", f"SMILES {smiles!r}")
    bare = Chem.RWMol()
    try:
        for symbol in symbols:
            bare.AddAtom(Chem.Atom(symbol))
    except RuntimeError:  # an unknown element symbol
        raise UnusableMolecule("unparsable", f"elements {list(symbols)}") from None
    bare = _set_positions(bare.GetMol(), xyz)
    want = molecule_key(ref)
    mol = Chem.Mol(bare)
    try:
        rdDetermineBonds.DetermineBonds(mol, charge=Chem.GetFormalCharge(ref))
        if molecule_key(mol) == want:
            if stats is not None:
                stats["bonds_from_xyz"] = stats.get("bonds_from_xyz", 0) + 1
            return mol
    except (ValueError, RuntimeError):  # no valid bond orders for that connectivity (e.g. an extra cage bond)
        pass
    mapped = _template_onto_xyz(bare, ref)
    if mapped is None:
        raise UnusableMolecule("graph_mismatch", f"the coordinates do not fit SMILES {smiles!r}")
    if stats is not None:
        stats["bonds_from_smiles"] = stats.get("bonds_from_smiles", 0) + 1
    return mapped


# ---- reading the sources: candidate molecules, each with lazily loaded conformer records -----------------------------
Loader = Callable[[], Chem.Mol]
"""Returns one record's raw molecule (any conformer count; the first is used) or raises UnusableMolecule."""


@dataclass
class _Candidate:
    """One molecule of a source: its records (conformers) in order of preference, produced lazily."""

    records: Callable[[], Iterator[tuple[str, Loader]]]  # (record id, loader)
    key: str | None = None  # the molecule's key when known before loading (grouped sources)


@dataclass
class _Pool:
    """Candidates in the shuffled order and the splits they fill, in order, e.g. [("test", 200), ("train", 1000)]."""

    candidates: Iterable[_Candidate]
    quotas: list[tuple[str, int]]
    where: str


@dataclass
class _Counts:
    records_read: int = 0
    molecules_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    extra: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


def _shuffled(items: Sequence[Any], seed: int) -> Iterator[Any]:
    for i in np.random.default_rng(seed).permutation(len(items)).tolist():
        yield items[i]


def _one(record_id: str, loader: Loader) -> Callable[[], Iterator[tuple[str, Loader]]]:
    return lambda: iter([(record_id, loader)])


# qm9pack -------------------------------------------------------------------------------------------------------------
_LINE_INDEX: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}  # (path, size, mtime) -> row spans


def _line_spans(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, stops)`` byte offsets of the non-empty lines of ``path`` (header included), cached per process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _LINE_INDEX:
        newlines = []
        with open(path, "rb") as fh:
            offset = 0
            while block := fh.read(_SCAN_BLOCK):
                newlines.append(np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10) + offset)
                offset += len(block)
        ends = np.concatenate([*newlines, np.array([st.st_size], dtype=np.int64)]).astype(np.int64)
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        keep = ends - starts > 1  # drop empty lines (and the empty tail after a final newline)
        _LINE_INDEX[key] = (starts[keep], ends[keep])
    return _LINE_INDEX[key]


def _qm9_files(cfg: GeomDataConfig) -> list[Path]:
    if cfg.path is None:
        try:
            spec = importlib.util.find_spec("qm9pack")  # locates the package without running its __init__
        except (ImportError, ValueError):
            spec = None
        for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
            files = [Path(folder) / "data" / name for name in QM9_FILES]
            if all(f.is_file() for f in files):
                return files
        raise UserError(
            "--data.source qm9pack reads the QM9 CSVs that the qm9pack package ships, but it is not installed "
            "(or lacks data/qm9_part*.csv): pip install qm9pack, or pass --data.path to CSVs in its format"
        )
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return [path.resolve()]
    if not path.is_dir():
        raise UserError(f"--data.path {cfg.path}: no such file or directory")
    files = sorted(path.glob("qm9_part*.csv")) or sorted(path.glob("*.csv"))
    if not files:
        raise UserError(f"--data.path {cfg.path}: no .csv file in the folder (qm9pack format expected)")
    return [f.resolve() for f in files]


def _parse_elements(text: str) -> list[str]:
    return [s.strip().strip("'\"") for s in text.strip().strip("[]").split(",") if s.strip()]


def _parse_xyz(text: str) -> np.ndarray:
    # Not JSON: numbers like "0." and "1." occur; flatten the nested list and reshape.
    values = [float(v) for v in text.replace("[", " ").replace("]", " ").split(",") if v.strip()]
    return np.asarray(values, dtype=np.float64).reshape(-1, 3)


def _qm9_candidates(files: Sequence[Path], seed: int, counts: _Counts) -> Iterator[_Candidate]:
    """The rows of ``files`` in seeded shuffled order, each parsed only when reached."""
    spans, columns = [], []
    for path in files:
        starts, stops = _line_spans(path)
        with open(path, "rb") as fh:
            header = next(csv.reader([fh.readline().decode("utf-8", "replace")]), [])
        missing = [c for c in QM9_COLUMNS if c not in header]
        if missing or len(starts) == 0:
            raise UserError(f"{path}: not a qm9pack CSV (no column {', '.join(missing) or 'rows'})")
        columns.append({c: header.index(c) for c in QM9_COLUMNS})
        spans.append((starts[1:], stops[1:]))  # rows after the header
    sizes = [len(s[0]) for s in spans]
    offsets = np.cumsum([0, *sizes])  # global row r is row r - offsets[f] of file f
    handles = [open(path, "rb") for path in files]  # closed in the finally below
    try:
        for row in np.random.default_rng(seed).permutation(int(offsets[-1])).tolist():
            f = int(np.searchsorted(offsets, row, side="right")) - 1
            start, stop = int(spans[f][0][row - offsets[f]]), int(spans[f][1][row - offsets[f]])
            handles[f].seek(start)
            line = handles[f].read(stop - start).decode("utf-8", "replace")
            counts.records_read += 1
            yield _qm9_candidate(line, columns[f], f"{files[f].name}:{row - offsets[f] + 2}", counts)
    finally:
        for fh in handles:
            fh.close()


def _qm9_candidate(line: str, col: Mapping[str, int], where: str, counts: _Counts) -> _Candidate:
    record = next(csv.reader([line]), [])
    index = record[col["Index"]] if len(record) > col["Index"] else where

    def load() -> Chem.Mol:
        try:
            symbols = _parse_elements(record[col["Elements"]])
            xyz = _parse_xyz(record[col["XYZ_Ang"]])
            n_atoms = int(record[col["N_atoms"]])
            smiles = record[col["SMILES"]]
        except (IndexError, ValueError) as exc:
            raise UnusableMolecule("unparsable", f"{where}: {first_line(exc)}") from None
        if not (n_atoms == len(symbols) == len(xyz)):
            raise UnusableMolecule(
                "atom_count_mismatch", f"{where}: N_atoms {n_atoms}, {len(symbols)} elements, {len(xyz)} positions"
            )
        return qm9_molecule(symbols, xyz, smiles, counts.extra)

    return _Candidate(_one(f"qm9:{index}", load))


# rdkit_folder --------------------------------------------------------------------------------------------------------
def _summary_file(cfg: GeomDataConfig) -> Path:
    assert cfg.path is not None
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return path.resolve()
    if not path.is_dir():
        raise UserError(f"--data.path {cfg.path}: no such file or directory")
    found = [path / name for name in ("summary_drugs.json", "summary_qm9.json") if (path / name).is_file()]
    if len(found) != 1:
        what = "both summary_drugs.json and summary_qm9.json" if found else "no summary_drugs.json or summary_qm9.json"
        raise UserError(f"--data.path {cfg.path}: {what} in the folder; pass the summary file to use as --data.path")
    return found[0].resolve()


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable JSON summary ({first_line(exc)})") from None
    if not isinstance(summary, dict) or not summary:
        raise UserError(f"{path}: expected a JSON object mapping SMILES to entries with a pickle_path")
    return summary


def _pickle_file(summary_path: Path, smiles: str, rel: Any) -> Path | None:
    """The pickle of a summary entry, None when the entry names none that exists.

    The path must stay inside the summary's folder once resolved: a summary is data, and a crafted
    entry (absolute, ``../``, or through a link) must not make the run read files elsewhere.
    """
    root = summary_path.parent  # resolved by _summary_file
    if not isinstance(rel, str) or not rel:
        return None
    try:
        target = (root / rel).resolve()
    except (OSError, ValueError):  # a NUL byte, a link loop: not a usable file name
        return None
    if not target.is_relative_to(root):
        raise UserError(
            f"{summary_path}: entry {smiles!r} has pickle_path {rel!r}, which resolves outside {root}; "
            "pickle paths must stay inside --data.path's folder"
        )
    return target if target.is_file() else None


def _geom_candidates(summary_path: Path, seed: int, counts: _Counts) -> Iterator[_Candidate]:
    summary = _read_summary(summary_path)
    root = summary_path.parent
    for smiles in _shuffled(sorted(summary), seed):
        entry = summary[smiles]
        rel = entry.get("pickle_path") if isinstance(entry, dict) else None

        def records(rel: Any = rel, smiles: str = smiles) -> Iterator[tuple[str, Loader]]:
            path = _pickle_file(summary_path, smiles, rel)
            if path is None:
                counts.records_read += 1
                yield f"{smiles}", _raise("missing_file", f"{smiles}: pickle {rel!r} not found under {root}")
                return
            try:
                conformers = list(_unpickle(path)["conformers"])
            except UserError:  # a refused class: the file is hostile or foreign, not merely damaged
                raise
            except Exception as exc:  # a damaged pickle can raise nearly anything
                counts.records_read += 1
                yield rel, _raise("unparsable", f"{rel}: cannot read it ({first_line(exc)})")
                return
            if not conformers:
                counts.records_read += 1
                yield rel, _raise("not_3d", f"{rel}: no conformers")
                return
            weights = [_weight(c) for c in conformers]
            order = sorted(range(len(conformers)), key=lambda i: -weights[i])  # stable: file order among ties
            for i in order:
                counts.records_read += 1
                conformer = conformers[i]
                mol = conformer.get("rd_mol") if isinstance(conformer, dict) else None
                yield f"{rel}#{i}", (lambda mol=mol: mol)

        yield _Candidate(records)


def _weight(conformer: Any) -> float:
    try:
        value = float(conformer.get("boltzmannweight", 0.0))
    except (AttributeError, TypeError, ValueError):
        return 0.0
    return value if np.isfinite(value) else 0.0


def _raise(reason: str, detail: str) -> Loader:
    def load() -> Chem.Mol:
        raise UnusableMolecule(reason, detail)

    return load


# geodiff -------------------------------------------------------------------------------------------------------------
class PygStandIn:
    """What a torch_geometric object unpickles into here: its pickled attribute dict, nothing else.

    GeoDiff's pickles hold ``torch_geometric.data.Data`` objects; torch_geometric is not a dependency,
    so :class:`_DataUnpickler` maps every class of its modules to this one (nothing of the class runs).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self.__dict__["_state"] = dict(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # (dict, slots) from objects with __slots__
            merged: dict[str, Any] = {}
            for part in state:
                merged.update(part or {})
            state = merged
        self.__dict__["_state"] = dict(state or {})

    def attributes(self) -> dict[str, Any]:
        """The Data attributes: the 1.x layout keeps them in ``__dict__``, the 2.x one in ``_store._mapping``."""
        state = self.__dict__["_state"]
        store = state.get("_store")
        if isinstance(store, PygStandIn):
            inner = store.__dict__["_state"]
            return dict(inner.get("_mapping", inner))
        if isinstance(store, Mapping):
            return dict(store)
        return dict(state)


class _Refused(Exception):
    """Something a pickle asked for that :class:`_DataUnpickler` does not build; ``what`` names it."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _numpy_module(name: str) -> Any:
    """``numpy._core.<name>`` (numpy 2), else ``numpy.core.<name>`` (numpy 1)."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` restricted to what protocol 0-2 pickles use it for: bytes written as latin-1 text."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with codec {encoding!r} (only latin1 bytes are read)")
    return text.encode("latin1")


def _rebuild_tensor(
    storage: Any,
    storage_offset: int,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    metadata: Any = None,
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` for a plain storage: no backward hooks (callables), no gradient."""
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise _Refused(f"a tensor over a {type(storage).__name__}, not a storage")
    if backward_hooks or not (metadata is None or isinstance(metadata, dict)):
        raise _Refused("a tensor with backward hooks or foreign metadata")
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, size, stride, False, collections.OrderedDict(), metadata
    )


def _storage_from_bytes(data: Any) -> Any:
    """``torch.storage._load_from_bytes`` through the allow-list: torch's own helper allows every class.

    torch's helper runs ``torch.load(..., weights_only=False)`` on bytes that the pickle supplies. What
    torch writes there is a legacy ``torch.save`` of one storage: a stream of small pickles that starts
    with torch's magic number. Such bytes are read by ``torch.load`` with :class:`_DataUnpickler` as its
    unpickler; with that prefix and from memory, ``torch.load`` takes its plain legacy reader (not the zip
    reader, which would hand a TorchScript archive to ``torch.jit.load``, nor the tar reader, which needs a
    real file). Any other bytes, and every storage where ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` is set (torch
    then refuses a custom unpickler), go to torch's weights-only loader: as safe, about twice as slow.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise _Refused(f"a tensor storage from a {type(data).__name__}, not bytes")
    forced = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true")
    if bytes(data[: len(_LEGACY_MAGIC)]) == _LEGACY_MAGIC and not forced:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _Refused("a tensor storage whose bytes hold more than tensor data") from None


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """``(module, name)`` -> what a pickle of molecules, arrays and tensors may build (besides torch_geometric)."""
    multiarray, numeric = _numpy_module("multiarray"), _numpy_module("numeric")
    allowed: dict[tuple[str, str], Any] = {
        ("rdkit.Chem.rdchem", "Mol"): Chem.Mol,
        ("rdkit.Chem.rdchem", "RWMol"): Chem.RWMol,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("torch", "Size"): torch.Size,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
        ("torch.storage", "TypedStorage"): torch.storage.TypedStorage,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
    }
    for name in dir(torch):  # torch.FloatStorage & co: a storage pickle names its type (only its dtype is used)
        value = getattr(torch, name, None)
        if name.endswith("Storage") and isinstance(value, type) and issubclass(value, torch.storage.TypedStorage):
            allowed[("torch", name)] = value
    for core in ("numpy.core", "numpy._core"):  # pickles name the numpy of the writer: 1.x or 2.x
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    for name in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float", "complex"):
        allowed[("builtins", name)] = getattr(builtins, name)
    allowed[("builtins", "bool")] = builtins.bool
    return allowed


class _DataUnpickler(pickle.Unpickler):
    """The reader of every external pickle (GEOM's rdkit_folder files, GeoDiff's files): an allow-list.

    ``find_class`` is where a pickle gets its callables; only :func:`_allowed_globals` and the
    torch_geometric stand-in are handed out, so a pickle that names ``os.system`` or ``builtins.exec``
    fails (raising :class:`_Refused`) before anything runs. It also reads the bytes of each tensor
    storage, for ``torch.load`` (see :func:`_storage_from_bytes`).
    """

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (__builtin__, copy_reg) as the base class would map them; the allow-list uses Python 3's.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module == "torch_geometric" or module.startswith("torch_geometric."):
            return PygStandIn
        found = _allowed_globals().get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name} (not a molecule, array or tensor class)")
        return found


def _load_with_allow_list(file: Any, **kwargs: Any) -> Any:
    """``pickle.load`` through :class:`_DataUnpickler`."""
    return _DataUnpickler(file, **kwargs).load()


_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)  # how a legacy torch.save file starts
# What torch.load takes as its pickle_module (it reads ``__name__``, ``Unpickler`` and ``load``).
_PICKLE_MODULE = types.ModuleType(f"{__name__}.allow_list_pickle")
_PICKLE_MODULE.Unpickler = _DataUnpickler  # type: ignore[attr-defined]
_PICKLE_MODULE.load = _load_with_allow_list  # type: ignore[attr-defined]


def _unpickle(path: Path) -> Any:
    """The object pickled in ``path``, read through :class:`_DataUnpickler`; UserError for a refused class."""
    try:
        with open(path, "rb") as fh:
            return _DataUnpickler(fh).load()
    except _Refused as exc:
        raise UserError(f"{path}: refusing to unpickle {exc.what}; this source must be trusted data") from None


def _geodiff_files(cfg: GeomDataConfig) -> dict[str, Path]:
    """``{"pool": file}`` for a single file, else the folder's ``{"train", "val", "test"}`` files."""
    assert cfg.path is not None
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return {"pool": path.resolve()}
    if not path.is_dir():
        raise UserError(f"--data.path {cfg.path}: no such file or directory")
    found: dict[str, Path] = {}
    for split in SPLITS:
        matches = sorted(path.glob(f"{split}_data*.pkl"))
        if len(matches) > 1:
            names = ", ".join(p.name for p in matches)
            raise UserError(f"--data.path {cfg.path}: several {split}_data*.pkl files ({names}); keep one")
        if matches:
            found[split] = matches[0].resolve()
    if "train" in found and "test" in found:
        return found
    pickles = sorted(path.glob("*.pkl"))
    if len(pickles) == 1:
        return {"pool": pickles[0].resolve()}
    raise UserError(
        f"--data.path {cfg.path}: expected train_data*.pkl and test_data*.pkl (GeoDiff's layout) or a single .pkl file"
    )


def _load_geodiff(path: Path) -> list[Any]:
    try:
        data = _unpickle(path)
    except UserError:  # a refused class: the file is hostile or foreign, not merely damaged
        raise
    except Exception as exc:  # a damaged pickle can raise nearly anything
        raise UserError(f"{path}: not a readable GeoDiff pickle ({first_line(exc)})") from None
    if not isinstance(data, (list, tuple)):
        raise UserError(f"{path}: expected a pickled list of torch_geometric Data objects, got {type(data).__name__}")
    return list(data)


def _geodiff_record(obj: Any) -> Chem.Mol:
    """The molecule of one GeoDiff Data object (its ``rdmol`` with ``pos``; else ``smiles`` with ``pos``)."""
    if isinstance(obj, PygStandIn):
        attrs = obj.attributes()
    elif isinstance(obj, Mapping):
        attrs = dict(obj)
    else:
        attrs = dict(getattr(obj, "__dict__", {}))
    rdmol, pos, smiles = attrs.get("rdmol"), attrs.get("pos"), attrs.get("smiles")
    if isinstance(rdmol, Chem.Mol):
        return rdmol if pos is None else _set_positions(rdmol, _as_array(pos))
    if isinstance(smiles, str) and pos is not None:
        ref = Chem.MolFromSmiles(smiles)
        if ref is None:
            raise UnusableMolecule("unparsable", f"SMILES {smiles!r}")
        mol = _set_positions(Chem.AddHs(ref), _as_array(pos))
        if not _bonds_plausible(mol):  # pos is assumed to follow AddHs's atom order: check it does
            raise UnusableMolecule("graph_mismatch", f"pos does not fit AddHs({smiles!r})")
        return mol
    raise UnusableMolecule("unparsable", "a record without rdmol, or without smiles and pos")


def _as_array(value: Any) -> np.ndarray:
    try:
        return np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UnusableMolecule("unparsable", f"coordinates ({first_line(exc)})") from None


# grouped sources (geodiff, sdf): every record is read, then grouped by molecule ---------------------------------------
def _group(
    records: Iterable[tuple[str, Loader, float | None]], cfg: GeomDataConfig, counts: _Counts
) -> list[_Candidate]:
    """Check every record and group the usable ones by :func:`molecule_key`; candidates sorted by key."""
    groups: dict[str, list[tuple[str, Chem.Mol, float | None]]] = {}
    for record_id, load, weight in records:
        counts.records_read += 1
        try:
            mol = checked_molecule(load())
            if mol.GetNumAtoms() > cfg.max_atoms:
                raise UnusableMolecule("too_many_atoms")
        except UnusableMolecule as exc:
            counts.skip(exc.reason)
            continue
        groups.setdefault(molecule_key(mol), []).append((record_id, mol, weight))
    candidates = []
    for key in sorted(groups):  # sorted: the shuffle then depends on the content, not on the file order
        members = groups[key]
        if all(w is not None for _, _, w in members):
            members = sorted(members, key=lambda m: -float(m[2]))  # type: ignore[arg-type]
        candidates.append(_Candidate(lambda members=members: ((rid, lambda m=m: m) for rid, m, _ in members), key=key))
    return candidates


def _geodiff_records(path: Path) -> Iterator[tuple[str, Loader, float | None]]:
    for i, obj in enumerate(_load_geodiff(path)):
        weight = None
        attrs = obj.attributes() if isinstance(obj, PygStandIn) else {}
        if "boltzmannweight" in attrs:
            try:
                weight = float(_as_array(attrs["boltzmannweight"]).reshape(-1)[0])
            except (UnusableMolecule, IndexError):
                weight = None
        yield f"{path.name}#{i}", (lambda obj=obj: _geodiff_record(obj)), weight


def _sdf_files(cfg: GeomDataConfig) -> list[Path]:
    assert cfg.path is not None
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return [path.resolve()]
    if not path.is_dir():
        raise UserError(f"--data.path {cfg.path}: no such file or directory")
    files = sorted(path.glob("*.sdf"))
    if not files:
        raise UserError(f"--data.path {cfg.path}: no .sdf file in the folder")
    return [f.resolve() for f in files]


def _sdf_records(path: Path) -> Iterator[tuple[str, Loader, float | None]]:
    # sanitize=False: checked_molecule sanitizes, so a record that fails is counted, not silently None.
    if path.stat().st_size == 0:
        raise UserError(f"--data.path: {path} is empty (an SDF file holds one or more molecule records)")
    try:
        supplier = Chem.SDMolSupplier(str(path), removeHs=False, sanitize=False)
    except OSError as exc:  # RDKit's "File error: Invalid input file"
        raise UserError(f"--data.path: {path} cannot be read as an SDF file ({exc})") from None
    if len(supplier) == 0:
        raise UserError(f"--data.path: {path} holds no SDF record (a molecule block with its atom and bond lines)")
    for i in range(len(supplier)):
        mol = supplier[i]
        yield f"{path.name}#{i}", (lambda mol=mol: mol), None


# ---- filling the splits --------------------------------------------------------------------------------------------
@dataclass
class _SplitBuilder:
    """Examples of one split as they are collected (converted to :class:`MolGraphSet` arrays at the end)."""

    graphs: list[dict[str, np.ndarray]] = field(default_factory=list)
    molecule: list[int] = field(default_factory=list)  # example -> molecule index in the split
    mol_ref: list[int] = field(default_factory=list)  # example -> index into mols
    source_ids: list[str] = field(default_factory=list)
    smiles: list[str] = field(default_factory=list)  # per molecule
    mols: list[bytes] = field(default_factory=list)  # distinct RDKit graphs, without conformers

    @property
    def num_molecules(self) -> int:
        return len(self.smiles)

    def add(self, key: str, conformers: list[tuple[str, Chem.Mol, dict[str, np.ndarray]]]) -> None:
        m = len(self.smiles)
        self.smiles.append(key)
        known: list[tuple[dict[str, np.ndarray], int]] = []  # distinct graphs of this molecule
        for record_id, mol, arrays in conformers:
            ref = next((r for g, r in known if _same_graph(g, arrays)), None)
            if ref is None:  # conformers of one molecule usually share one atom order: store that graph once
                bare = Chem.Mol(mol)
                bare.RemoveAllConformers()
                ref = len(self.mols)
                self.mols.append(bare.ToBinary())
                known.append((arrays, ref))
            self.graphs.append(arrays)
            self.molecule.append(m)
            self.mol_ref.append(ref)
            self.source_ids.append(record_id)

    def arrays(self) -> dict[str, Any]:
        atoms = np.array([len(g["z"]) for g in self.graphs], dtype=np.int64)
        edges = np.array([g["bond_type"].shape[0] for g in self.graphs], dtype=np.int64)

        def cat(name: str, dtype: Any, axis: int = 0, empty: tuple[int, ...] = (0,)) -> np.ndarray:
            parts = [g[name].astype(dtype) for g in self.graphs]
            return np.concatenate(parts, axis=axis) if parts else np.zeros(empty, dtype=dtype)

        mol_sizes = np.array([len(m) for m in self.mols], dtype=np.int64)
        return {
            "atom_ptr": np.concatenate([[0], np.cumsum(atoms)]).astype(np.int64),
            "edge_ptr": np.concatenate([[0], np.cumsum(edges)]).astype(np.int64),
            "z": cat("z", np.uint8),
            "atom_feat": cat("atom_feat", np.uint8, empty=(0, len(ATOM_FEATURES))),
            "pos": cat("pos", np.float32, empty=(0, 3)),
            "edge_index": cat("edge_index", np.int32, axis=1, empty=(2, 0)),
            "bond_type": cat("bond_type", np.uint8),
            "molecule": np.array(self.molecule, dtype=np.int64),
            "mol_ref": np.array(self.mol_ref, dtype=np.int64),
            "mols_data": np.frombuffer(b"".join(self.mols), dtype=np.uint8).copy(),
            "mols_ptr": np.concatenate([[0], np.cumsum(mol_sizes)]).astype(np.int64),
            "source_ids": list(self.source_ids),
            "smiles": list(self.smiles),
        }


def _same_graph(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in ("z", "atom_feat", "edge_index", "bond_type"))


def _fill(pools: Sequence[_Pool], cfg: GeomDataConfig, counts: _Counts) -> dict[str, _SplitBuilder]:
    """Visit each pool's candidates in order, keeping usable, new molecules until its quotas are met."""
    splits = {s: _SplitBuilder() for s in SPLITS}
    seen: set[str] = set()
    for pool in pools:
        quotas = [(s, n) for s, n in pool.quotas if n > 0]
        total = len(pool.candidates) if isinstance(pool.candidates, Sized) else None

        def kept_so_far(pool: _Pool = pool) -> str:
            return "kept " + ", ".join(f"{s} {splits[s].num_molecules}/{n}" for s, n in pool.quotas if n > 0)

        # Parsing a whole source (QM9: 134k molecules) takes minutes; a line every --progress_every seconds.
        with Progress(total, f"reading {pool.where}", "molecules") as progress:
            for candidate in pool.candidates if quotas else ():
                split, quota = quotas[0]
                counts.molecules_read += 1
                progress.update(extra=kept_so_far)
                key, kept = candidate.key, []
                if key is not None and key in seen:
                    counts.skip("duplicate_molecule")
                    continue
                for record_id, load in candidate.records():
                    try:
                        mol = checked_molecule(load())
                        if mol.GetNumAtoms() > cfg.max_atoms:
                            raise UnusableMolecule("too_many_atoms", f"{mol.GetNumAtoms()} atoms")
                        this = molecule_key(mol)
                        if key is not None and this != key:
                            raise UnusableMolecule("graph_mismatch", f"{this} in a record of {key}")
                    except UnusableMolecule as exc:
                        counts.skip(exc.reason)
                        if exc.reason == "too_many_atoms":
                            break  # the other conformers have the same atoms
                        continue
                    if key is None:
                        key = this
                        if key in seen:
                            break
                    kept.append((record_id, mol, _graph_arrays(mol)))
                    if len(kept) == cfg.conformers(split):
                        break
                if not kept:
                    if key is not None and key in seen:
                        counts.skip("duplicate_molecule")
                    continue
                assert key is not None
                seen.add(key)
                splits[split].add(key, kept)
                if splits[split].num_molecules == quota:
                    quotas.pop(0)
                    if not quotas:
                        break
        close = getattr(pool.candidates, "close", None)
        if close is not None:  # a lazy reader stopped early: release its open files now
            close()
        if quotas:
            have = sum(splits[s].num_molecules for s, _ in pool.quotas)
            need = sum(n for _, n in pool.quotas)
            flags = " + ".join(f"--data.num_{'real' if s == 'train' else s}" for s, n in pool.quotas if n > 0)
            flag = "--data.num_real" if any(s == "train" for s, _ in quotas) else f"--data.num_{quotas[0][0]}"
            skipped = ", ".join(f"{r} {n}" for r, n in sorted(counts.skipped.items(), key=lambda kv: -kv[1]))
            raise UserError(
                f"{pool.where}: only {have} usable molecules, but {flags} = {need} are needed "
                f"(skipped so far: {skipped or 'none'}); lower {flag}"
                + (" or raise --data.max_atoms" if counts.skipped.get("too_many_atoms") else "")
            )
    return splits


# ---- datasets -----------------------------------------------------------------------------------------------------
class MolGraphSet(Dataset):
    """The examples of one split: item ``i`` is a :class:`MolGraph` with ``mol_id = i``.

    Holds the split's concatenated arrays (atoms of all examples back to back, ``atom_ptr`` / ``edge_ptr``
    offsets) and builds each graph on access. ``molecule[i]`` is the molecule (index among the split's
    molecules) of example ``i``; ``source_ids[i]`` names the record it came from (``qm9:<Index>``,
    ``<pickle>#<conformer>``, ``<file>#<record>``).
    """

    def __init__(self, arrays: Mapping[str, Any]):
        self._a = dict(arrays)
        self.molecule: np.ndarray = self._a["molecule"]
        self.source_ids: list[str] = self._a["source_ids"]
        self.molecule_smiles: list[str] = self._a["smiles"]
        ptr = self._a["atom_ptr"]
        self.num_atoms: np.ndarray = (ptr[1:] - ptr[:-1]).astype(np.int64)
        """Atoms of every example, int64 ``(n,)``."""

    def __len__(self) -> int:
        return int(self.molecule.shape[0])

    @property
    def num_molecules(self) -> int:
        """Distinct molecules of the split (examples are their conformers)."""
        return len(self.molecule_smiles)

    def _index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        return index % n

    def __getitem__(self, index: int) -> MolGraph:
        i = self._index(int(index))
        a = self._a
        lo, hi = int(a["atom_ptr"][i]), int(a["atom_ptr"][i + 1])
        elo, ehi = int(a["edge_ptr"][i]), int(a["edge_ptr"][i + 1])
        return MolGraph(
            z=torch.from_numpy(a["z"][lo:hi].astype(np.int64)),
            atom_feat=torch.from_numpy(a["atom_feat"][lo:hi].astype(np.int64)),
            edge_index=torch.from_numpy(a["edge_index"][:, elo:ehi].astype(np.int64)),
            bond_type=torch.from_numpy(a["bond_type"][elo:ehi].astype(np.int64)),
            pos=torch.from_numpy(a["pos"][lo:hi].copy()),
            mol_id=i,
            smiles=self.molecule_smiles[int(self.molecule[i])],
        )

    def rdkit_molecule(self, index: int) -> Chem.Mol:
        """Example ``index`` as an RDKit molecule: explicit H, the MolGraph's atom order, one conformer (its pos)."""
        i = self._index(int(index))
        ref = int(self._a["mol_ref"][i])
        start, stop = int(self._a["mols_ptr"][ref]), int(self._a["mols_ptr"][ref + 1])
        mol = Chem.Mol(self._a["mols_data"][start:stop].tobytes())  # RDKit's binary form of the graph
        Chem.SanitizeMol(mol)  # recompute ring info and other derived properties the binary form leaves out
        lo, hi = int(self._a["atom_ptr"][i]), int(self._a["atom_ptr"][i + 1])
        return _set_positions(mol, self._a["pos"][lo:hi])


class SyntheticConformers(Dataset):
    """Generated conformations of training graphs: item ``i`` is ``train[mol_id[i]]`` with sample i's coordinates
    (:func:`conformer_rows`).

    ``mol_id`` and ``num_atoms`` (small) are checked when the dataset is made; ``pos`` (possibly a
    memory map) is read one row at a time.
    """

    def __init__(self, train: MolGraphSet, mol_id: np.ndarray, num_atoms: np.ndarray, pos: np.ndarray):
        self.train = train
        self.mol_id = mol_id
        self.num_atoms = num_atoms
        self.pos = pos
        self._row = conformer_rows(pos, num_atoms)

    def __len__(self) -> int:
        return int(self.mol_id.shape[0])

    def __getitem__(self, index: int) -> MolGraph:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} synthetic conformers")
        graph = self.train[int(self.mol_id[index])]
        count = int(self.num_atoms[index])
        if count != graph.num_atoms:
            raise ValueError(
                f"synthetic sample {index}: num_atoms {count} but training molecule {graph.mol_id} "
                f"has {graph.num_atoms}"
            )
        return graph.with_pos(np.asarray(self._row(index % n), dtype=np.float32))


# ---- the cache entry's files ---------------------------------------------------------------------------------------
def _write_cache(entry: Path, arrays: Mapping[str, Mapping[str, Any]]) -> None:
    """The splits as flat arrays (``data.npz``) and string lists (``strings.json``): formats that only hold data.

    Each array is stored once, its splits back to back (``strings.json`` keeps their lengths): an npz member
    costs about a millisecond to open, so eleven members load several times faster than one per split.
    """
    flat, sizes = {}, {}
    for key in _ARRAY_KEYS:
        axis = _CONCAT_AXIS.get(key, 0)
        parts = [np.asarray(arrays[split][key]) for split in SPLITS]
        flat[key] = np.concatenate(parts, axis=axis)
        sizes[key] = [int(part.shape[axis]) for part in parts]
    with atomic_open(entry / DATA_FILE, "wb") as fh:
        np.savez(fh, **flat)
    strings: dict[str, Any] = {split: {key: list(arrays[split][key]) for key in _STRING_KEYS} for split in SPLITS}
    strings["sizes"] = sizes
    with atomic_open(entry / STRINGS_FILE, "w") as fh:
        json.dump(strings, fh, separators=(",", ":"))


def _read_cache(entry: Path) -> dict[str, dict[str, Any]]:
    """What :func:`_write_cache` wrote; ValueError (or another read error) for a file that is not that."""
    with np.load(entry / DATA_FILE, allow_pickle=False) as npz:  # no object arrays: nothing to unpickle
        flat = {key: npz[key] for key in _ARRAY_KEYS}
    strings = json.loads((entry / STRINGS_FILE).read_text())
    out: dict[str, dict[str, Any]] = {split: {} for split in SPLITS}
    for key in _ARRAY_KEYS:
        axis, sizes = _CONCAT_AXIS.get(key, 0), strings["sizes"][key]
        if not (len(sizes) == len(SPLITS) and all(_is_int(n) and n >= 0 for n in sizes)):
            raise ValueError(f"{STRINGS_FILE}: sizes of {key} are not {len(SPLITS)} counts")
        if sum(sizes) != flat[key].shape[axis]:
            raise ValueError(f"{key}: {flat[key].shape[axis]} entries, but the splits' sizes add up to {sum(sizes)}")
        bounds = np.cumsum([0, *sizes]).tolist()
        for i, split in enumerate(SPLITS):
            where = [slice(None)] * flat[key].ndim
            where[axis] = slice(bounds[i], bounds[i + 1])
            out[split][key] = flat[key][tuple(where)]  # a view: no copy
    for split in SPLITS:
        part = out[split]
        for key in _STRING_KEYS:
            values = strings[split][key]
            if not (isinstance(values, list) and all(isinstance(v, str) for v in values)):
                raise ValueError(f"{STRINGS_FILE}: {split}.{key} is not a list of strings")
            part[key] = values
        examples, molecules = len(part["molecule"]), len(part["smiles"])
        if not (len(part["atom_ptr"]) == len(part["edge_ptr"]) == examples + 1 == len(part["source_ids"]) + 1):
            raise ValueError(f"{split}: the example counts of the arrays and strings disagree")
        if examples and (part["molecule"].min() < 0 or part["molecule"].max() >= molecules):
            raise ValueError(f"{split}: molecule indices out of range")
    return out


# ---- the data module -------------------------------------------------------------------------------------------------
class GeomDataModule(RealDataModuleBase[MolGraphSet]):
    """Molecules with conformations: real training set, optional validation set, test set (real data module).

    See the module docstring for the sources, the split policy, the bad-input rule and the cache.
    :meth:`prepare_data` parses and featurises the source into the cache (once per data identity);
    :meth:`setup` loads the cache entry on any process after one prepared it. ``train_dataset`` holds
    the conformers of the ``num_real`` training molecules, ``val_dataset`` is None when ``num_val`` is 0;
    in every split an example's ``mol_id`` is its index in that split. The loaders batch with
    :attr:`collate_fn` (:class:`~datamodules.base.RealDataModuleBase`).

    Args:
        config: the data settings (``--data.*``); default: 1,000 + 200 QM9 molecules from qm9pack.
        batch_size: batch size of this module's own loaders (standalone use).
        num_workers: worker processes of this module's own loaders.
    """

    collate_fn = staticmethod(collate_molecules)
    """The collate function of every molecule loader: :func:`~datamodules.mol_graph.collate_molecules`."""

    def __init__(self, config: GeomDataConfig | None = None, batch_size: int = 32, num_workers: int = 0):
        super().__init__(batch_size, num_workers)
        self.config = config if config is not None else GeomDataConfig()
        self.data_stats: dict[str, Any] = {}
        """Counts for the recipe to log and write: records read, skips per reason, molecules and examples per split."""
        self._files: list[Path] | None = None
        self._entry: Path | None = None
        self._identity: dict[str, Any] = {}

    # ---- identity and cache ----------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """How reports name the data, e.g. ``QM9 (qm9pack)``."""
        cfg = self.config
        if cfg.source == "qm9pack":
            return "QM9 (qm9pack)" if cfg.path is None else f"QM9 (qm9pack format, {cfg.path})"
        if cfg.source == "rdkit_folder":
            path = Path(cfg.path or "").expanduser()
            # The summary file says which GEOM set it is (a cheap look, no read).
            name = path.name if path.is_file() else " ".join(p.name for p in path.glob("summary_*.json"))
            kind = "GEOM-Drugs" if "drugs" in name else "GEOM-QM9" if "qm9" in name else "GEOM"
            return f"{kind} (rdkit_folder, {cfg.path})"
        if cfg.source == "geodiff":
            return f"GEOM (GeoDiff pickles, {cfg.path})"
        return f"SDF molecules ({cfg.path})"

    @property
    def cache_root(self) -> Path:
        """The cache folder (``--data.cache_dir`` or :func:`default_cache_dir`)."""
        if self.config.cache_dir:
            return check_writable_folder(Path(self.config.cache_dir).expanduser(), "--data.cache_dir")
        return check_writable_folder(default_cache_dir(), f"the cache folder (${CACHE_ENV} or ~/.cache)")

    def _source_files(self) -> list[Path]:
        """The files whose size and mtime enter the cache key (UserError for a missing path)."""
        if self._files is None:
            cfg = self.config
            if cfg.source == "qm9pack":
                self._files = _qm9_files(cfg)
            elif cfg.source == "rdkit_folder":
                self._files = [_summary_file(cfg)]
            elif cfg.source == "geodiff":
                self._files = list(_geodiff_files(cfg).values())
            else:
                self._files = _sdf_files(cfg)
        return self._files

    @property
    def cache_entry(self) -> Path:
        """This data identity's folder in the cache (resolving the source; UserError for missing files)."""
        if self._entry is None:
            cfg = self.config
            files = []
            for path in self._source_files():
                st = path.stat()
                files.append([str(path), st.st_size, st.st_mtime_ns])
            identity = {
                "version": CACHE_VERSION,
                "source": cfg.source,
                "path": cfg.path and str(Path(cfg.path).expanduser().resolve()),
                "files": files,
                "num_real": cfg.num_real,
                "num_val": cfg.num_val,
                "num_test": cfg.num_test,
                "split_seed": cfg.split_seed,
                "max_atoms": cfg.max_atoms,
                "conformers_per_molecule": cfg.conformers_per_molecule,
                "test_conformers_per_molecule": cfg.conformers("test"),
            }
            canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
            self._identity = identity
            self._entry = self.cache_root / f"{cfg.source}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"
        return self._entry

    def describe(self) -> str:
        """One line for a dry run, from the config alone (nothing is read)."""
        cfg = self.config
        train_k, test_k = cfg.conformers("train"), cfg.conformers("test")
        conformers = f" x up to {train_k} conformers" if train_k > 1 else ""
        held_out = f" (x up to {test_k} conformers)" if test_k > 1 else ""
        return (
            f"{self.label}: {cfg.num_real} real training molecules{conformers}, {cfg.num_val} validation, "
            f"{cfg.num_test} test{held_out}; at most {cfg.max_atoms} atoms with H; split seed {cfg.split_seed}; "
            f"cache {self.cache_root}"
        )

    # ---- Lightning hooks ---------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Parse, check, split and featurise the source into the cache entry (only once per entry)."""
        entry = self.cache_entry
        with entry_lock(entry, "this molecule cache entry"):  # another run on this machine may be building it
            if not (entry / STATS_FILE).is_file():
                start = time.perf_counter()
                counts = _Counts()
                # RDKit warns once per odd record; the skips are counted instead. BlockLogs restores the state on exit.
                blocker = BlockLogs()
                try:
                    splits = _fill(self._pools(counts), self.config, counts)
                finally:
                    del blocker
                arrays = {s: b.arrays() for s, b in splits.items()}
                stats = self._stats(arrays, counts, time.perf_counter() - start)
                make_folder(entry, "the data cache folder")
                atomic_write_json(entry / "identity.json", self._identity)
                _write_cache(entry, arrays)
                atomic_write_json(entry / STATS_FILE, stats)
                log.info(
                    "%s: %d train / %d val / %d test molecules from %d read (skipped %s) in %.1f s, cached in %s",
                    self.label,
                    stats["train_molecules"],
                    stats["val_molecules"],
                    stats["test_molecules"],
                    stats["molecules_read"],
                    stats["skipped"] or "none",
                    stats["prepare_seconds"],
                    entry,
                )
        self.data_stats = json.loads((entry / STATS_FILE).read_text())

    def _load_datasets(self) -> dict[str, MolGraphSet | None]:
        """Load the prepared splits and their counts (:attr:`data_stats`) from the cache entry."""
        entry = self.cache_entry
        if not (entry / STATS_FILE).is_file():
            raise UserError(f"{entry}: the data is not prepared; call prepare_data() first (on one process)")
        try:
            arrays = _read_cache(entry)
            datasets = {s: MolGraphSet(arrays[s]) for s in SPLITS}
        except Exception as exc:  # a truncated or foreign file can raise nearly anything
            raise UserError(f"{entry / DATA_FILE}: a damaged cache file ({first_line(exc)}); delete {entry}") from None
        self.data_stats = json.loads((entry / STATS_FILE).read_text())
        return {**datasets, "val": datasets["val"] if self.config.num_val else None}

    # ---- preparation -------------------------------------------------------------------------------------------------
    def _pools(self, counts: _Counts) -> list[_Pool]:
        cfg = self.config
        seed = cfg.split_seed
        standard = [("test", cfg.num_test), ("val", cfg.num_val), ("train", cfg.num_real)]
        if cfg.source == "qm9pack":
            files = self._source_files()
            where = "QM9 (qm9pack)" if cfg.path is None else f"--data.path {cfg.path}"
            return [_Pool(_qm9_candidates(files, seed, counts), standard, where)]
        if cfg.source == "rdkit_folder":
            summary = self._source_files()[0]
            return [_Pool(_geom_candidates(summary, seed, counts), standard, f"--data.path {cfg.path}")]
        if cfg.source == "sdf":
            records = (r for f in self._source_files() for r in _sdf_records(f))
            candidates = _group(records, cfg, counts)
            return [_Pool(_shuffled(candidates, seed), standard, f"--data.path {cfg.path}")]
        files = _geodiff_files(cfg)
        if "pool" in files:
            candidates = _group(_geodiff_records(files["pool"]), cfg, counts)
            return [_Pool(_shuffled(candidates, seed), standard, str(files["pool"]))]
        # GeoDiff's own split: held-out files first, so that their molecules are taken out of the training file.
        pools = [
            _Pool(
                _shuffled(_group(_geodiff_records(files["test"]), cfg, counts), seed), [standard[0]], str(files["test"])
            )
        ]
        train_quotas = [("train", cfg.num_real)]
        if "val" in files and cfg.num_val:
            val = _group(_geodiff_records(files["val"]), cfg, counts)
            pools.append(_Pool(_shuffled(val, seed), [standard[1]], str(files["val"])))
        else:
            train_quotas.insert(0, standard[1])
        train = _group(_geodiff_records(files["train"]), cfg, counts)
        pools.append(_Pool(_shuffled(train, seed), train_quotas, str(files["train"])))
        return pools

    def _stats(self, arrays: Mapping[str, Mapping[str, Any]], counts: _Counts, seconds: float) -> dict[str, Any]:
        cfg = self.config
        stats: dict[str, Any] = {
            "label": self.label,
            "source": cfg.source,
            "path": cfg.path,
            "records_read": counts.records_read,
            "molecules_read": counts.molecules_read,
            "skipped": dict(sorted(counts.skipped.items())),
            **counts.extra,
        }
        for split in SPLITS:
            a = arrays[split]
            atoms = a["atom_ptr"][1:] - a["atom_ptr"][:-1]
            stats[f"{split}_molecules"] = len(a["smiles"])
            stats[f"{split}_examples"] = int(atoms.shape[0])
            stats[f"{split}_atoms_mean"] = round(float(atoms.mean()), 3) if atoms.size else 0.0
            stats[f"{split}_atoms_max"] = int(atoms.max()) if atoms.size else 0
        stats.update(
            max_atoms=cfg.max_atoms,
            conformers_per_molecule=cfg.conformers_per_molecule,
            test_conformers_per_molecule=cfg.conformers("test"),
            split_seed=cfg.split_seed,
            prepare_seconds=round(seconds, 3),
        )
        return stats

    # ---- datasets ----------------------------------------------------------------------------------------------------
    def train_graphs(self) -> MolGraphSet:
        """The real training examples as :class:`MolGraph` items, in order: the lazily indexed training set itself
        (``len``, ``[i]``, iteration, and its ``num_atoms`` array), never a list of every graph (a published-size
        set is 200k graphs, about 1.3 GB as objects, on every rank)."""
        return self.train_dataset

    def rdkit_molecule(self, split: str, index: int) -> Chem.Mol:
        """Example ``index`` of ``split`` (train / val / test) as an RDKit molecule with its real coordinates.

        Explicit hydrogens, atoms in the order of the :class:`MolGraph`, one conformer; for quality metrics.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        dataset = self._dataset(split)
        if dataset is None:
            raise ValueError(f"no {split} set (--data.num_val is 0)")
        return dataset.rdkit_molecule(index)

    def synthetic_dataset(self, arrays: Mapping[str, np.ndarray]) -> SyntheticConformers:
        """A stored synthetic set as items like the real ones (rows read lazily).

        ``arrays``: ``mol_id`` (integer ``(n,)``, index into :attr:`train_dataset`), ``num_atoms`` (integer
        ``(n,)``, each equal to its molecule's atom count) and ``pos`` (float, Angstrom: ``(n, max_atoms, 3)``
        zero-padded beyond ``num_atoms``, or ``(sum(num_atoms), 3)``, the molecules back to back as the store keeps
        them). Item ``i`` is ``train_dataset[mol_id[i]].with_pos(...)`` of sample i's coordinates. Raises ValueError
        for missing arrays, wrong shapes, ``mol_id`` out of range or atom counts that differ.
        """
        missing = [k for k in ("mol_id", "num_atoms", "pos") if k not in arrays]
        if missing:
            raise ValueError(f"a synthetic conformer set needs mol_id, num_atoms and pos arrays; missing {missing}")
        mol_id, num_atoms, pos = arrays["mol_id"], arrays["num_atoms"], arrays["pos"]
        n = mol_id.shape[0] if mol_id.ndim == 1 else -1
        if n < 0 or mol_id.dtype.kind not in "iu":
            raise ValueError(f"synthetic mol_id must be integers of shape (n,), got {mol_id.dtype} {mol_id.shape}")
        if num_atoms.shape != (n,) or num_atoms.dtype.kind not in "iu":
            raise ValueError(
                f"synthetic num_atoms must be integers of shape ({n},), got {num_atoms.dtype} {num_atoms.shape}"
            )
        padded = pos.ndim == 3 and pos.shape[0] == n
        if not (padded or pos.ndim == 2) or pos.shape[-1] != 3 or pos.dtype.kind != "f":
            raise ValueError(
                f"synthetic pos must be floats of shape ({n}, max_atoms, 3) or (sum(num_atoms), 3), "
                f"got {pos.dtype} {pos.shape}"
            )
        train = self.train_dataset
        ids = np.asarray(mol_id, dtype=np.int64)  # (n,) small next to pos
        if n and (ids.min() < 0 or ids.max() >= len(train)):
            raise ValueError(
                f"synthetic mol_id must be in 0..{len(train) - 1} (training examples), got {ids.min()}..{ids.max()}"
            )
        counts = np.asarray(num_atoms, dtype=np.int64)
        wrong = np.flatnonzero(counts != train.num_atoms[ids]) if n else np.zeros(0, dtype=np.int64)
        if wrong.size:
            i = int(wrong[0])
            raise ValueError(
                f"synthetic sample {i}: num_atoms {counts[i]} but training molecule {ids[i]} has "
                f"{train.num_atoms[ids[i]]} atoms ({wrong.size} samples disagree)"
            )
        if padded and n and counts.max() > pos.shape[1]:
            raise ValueError(f"synthetic pos has room for {pos.shape[1]} atoms, but num_atoms reaches {counts.max()}")
        if not padded and int(counts.sum()) != pos.shape[0]:
            raise ValueError(
                f"synthetic pos holds {pos.shape[0]} atoms back to back, but num_atoms sum to {counts.sum()}"
            )
        return SyntheticConformers(train, mol_id, num_atoms, pos)


__all__ = [
    "CACHE_VERSION",
    "DEFAULT_MAX_ATOMS",
    "QM9_COLUMNS",
    "QM9_FILES",
    "SKIP_REASONS",
    "SOURCES",
    "SPLITS",
    "GeomDataConfig",
    "GeomDataModule",
    "MolGraphSet",
    "PygStandIn",
    "SyntheticConformers",
    "UnusableMolecule",
    "checked_molecule",
    "default_cache_dir",
    "featurize",
    "molecule_key",
    "qm9_molecule",
]
