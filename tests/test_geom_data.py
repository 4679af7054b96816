"""The molecule data module: featurisation, the qm9pack default, every source format on small local files,
the split policy, the handling of bad input, synthetic conformers and collation.

Everything runs offline on the CPU: the GEOM, GeoDiff and SDF files are written by the tests from a few
molecules embedded with RDKit's ETKDG (fixed seeds); the qm9pack tests read a few dozen rows of the
package's CSVs (the row index of the 226 MB files is built once per process, under a second).
"""

from __future__ import annotations

import builtins
import collections
import csv
import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem
from torch.utils.data import DataLoader

import datamodules.geom as geom
from collapse.contract import RealDataModule
from collapse.errors import ConfigError, UserError
from datamodules.geom import (
    SKIP_REASONS,
    GeomDataConfig,
    GeomDataModule,
    UnusableMolecule,
    featurize,
    molecule_key,
)
from datamodules.mol_graph import MoleculeBatch, MolGraph

SMALL = ["CCO", "CC(=O)O", "c1ccccc1", "CCN", "OCCO", "CC#N", "C1CC1", "CCOC", "NC=O", "CC(C)O"]
"""Small molecules (each a distinct graph) for the hand-written source files."""


# ---- helpers ----------------------------------------------------------------------------------------------------
def embed(smiles: str, seed: int = 0, n_confs: int = 1) -> Chem.Mol:
    """``smiles`` with explicit hydrogens and ``n_confs`` ETKDG conformers (seeded)."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    if n_confs == 1:
        assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    else:
        assert len(AllChem.EmbedMultipleConfs(mol, numConfs=n_confs, randomSeed=seed)) == n_confs
    return mol


def one_conformer(mol: Chem.Mol, conf_id: int) -> Chem.Mol:
    """A copy of ``mol`` holding only conformer ``conf_id``."""
    return Chem.Mol(mol, confId=conf_id)


def config(tmp_path: Path, **kwargs) -> GeomDataConfig:
    """A small test config with its cache under tmp_path."""
    kwargs = {"cache_dir": str(tmp_path / "cache"), "num_real": 4, "num_test": 2, **kwargs}
    return GeomDataConfig(**kwargs)


def prepared(cfg: GeomDataConfig, batch_size: int = 4) -> GeomDataModule:
    dm = GeomDataModule(cfg, batch_size=batch_size)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def split_keys(dm: GeomDataModule, split: str) -> list[str]:
    dataset = {"train": dm.train_dataset, "val": dm.val_dataset, "test": dm.test_dataset}[split]
    return list(dataset.molecule_smiles)


def assert_one_line_user_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert excinfo.type is UserError or issubclass(excinfo.type, UserError)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def write_sdf(path: Path, mols: list[Chem.Mol], extra_blocks: tuple[str, ...] = ()) -> Path:
    """Every conformer of every molecule as one record, then ``extra_blocks`` (raw records) appended."""
    with Chem.SDWriter(str(path)) as writer:
        for mol in mols:
            for conf in mol.GetConformers():
                writer.write(mol, confId=conf.GetId())
    if extra_blocks:
        with open(path, "a") as fh:
            for block in extra_blocks:
                fh.write(block.rstrip("\n") + "\n$$$$\n")
    return path


class Payload:
    """Calls ``func(*args)`` when unpickled: what a hostile data file does to a reader that allows every class."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


HOSTILE = ("os.system", "builtins.exec", "subprocess.call")
"""Callables a hostile pickle may name (the parameters of the refusal tests)."""


def payload(kind: str, marker: Path) -> tuple[str, Payload]:
    """``(module.name a pickle stores, payload)``: a pickled ``kind`` call (one of HOSTILE) creating ``marker``."""
    if kind == "os.system":  # stored under the module that defines it: posix.system on Linux
        return f"{os.system.__module__}.system", Payload(os.system, f"touch {marker}")
    if kind == "builtins.exec":
        return kind, Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    return kind, Payload(subprocess.call, ["touch", str(marker)])


def bond_lengths(graph: MolGraph) -> np.ndarray:
    src, dst = graph.edge_index
    return (graph.pos[src] - graph.pos[dst]).norm(dim=1).numpy()


# ---- featurisation --------------------------------------------------------------------------------------------------
def test_featurize_ethanol_counts_and_both_edge_directions():
    mol = embed("CCO", seed=1)
    graph = featurize(mol)
    graph.validate()
    assert graph.num_atoms == 9 and graph.z.tolist() == [6, 6, 8] + [1] * 6
    assert graph.edge_index.shape == (2, 16)  # 8 bonds, each stored twice
    edges = set(map(tuple, graph.edge_index.t().tolist()))
    assert all((j, i) in edges for i, j in edges)
    assert graph.bond_type.tolist() == [1] * 16
    assert graph.pos.dtype == torch.float32
    np.testing.assert_allclose(graph.pos.numpy(), mol.GetConformer().GetPositions(), atol=1e-5)
    # charge + 2, hybrid, aromatic, hydrogens, ring: the oxygen is neutral sp3 with one H, not in a ring.
    assert graph.atom_feat[2].tolist() == [2, 4, 0, 1, 0]
    assert graph.atom_feat[0].tolist() == [2, 4, 0, 3, 0]  # CH3
    assert graph.smiles == "CCO" and graph.mol_id == -1


def test_featurize_benzene_is_aromatic():
    graph = featurize(embed("c1ccccc1", seed=2))
    assert graph.num_atoms == 12 and graph.edge_index.shape[1] == 24
    carbons = graph.z == 6
    assert graph.atom_feat[carbons, 2].tolist() == [1] * 6  # aromatic
    assert graph.atom_feat[carbons, 4].tolist() == [1] * 6  # in a ring
    assert graph.atom_feat[carbons, 1].tolist() == [3] * 6  # sp2
    assert graph.atom_feat[~carbons, 2].tolist() == [0] * 6
    ring = carbons[graph.edge_index[0]] & carbons[graph.edge_index[1]]
    assert graph.bond_type[ring].tolist() == [4] * 12
    assert graph.bond_type[~ring].tolist() == [1] * 12
    assert ((bond_lengths(graph) > 0.9) & (bond_lengths(graph) < 1.6)).all()


def test_featurize_zwitterion_charges():
    graph = featurize(embed("[NH3+]CC(=O)[O-]", seed=3))  # glycine zwitterion
    charges = {int(z): [] for z in graph.z.unique()}
    for z, code in zip(graph.z.tolist(), graph.atom_feat[:, 0].tolist()):
        charges[z].append(code - 2)
    assert charges[7] == [1]
    assert sorted(charges[8]) == [-1, 0]
    assert set(charges[6]) == {0} and set(charges[1]) == {0}
    nitrogen = int((graph.z == 7).nonzero()[0])
    assert graph.atom_feat[nitrogen, 3] == 3  # NH3+: three hydrogen atoms as neighbours


def test_featurize_refuses_bad_molecules():
    flat = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.Compute2DCoords(flat)
    with pytest.raises(UnusableMolecule) as excinfo:
        featurize(flat)
    assert excinfo.value.reason == "not_3d" and isinstance(excinfo.value, ValueError)
    with pytest.raises(UnusableMolecule, match="not_3d"):
        featurize(Chem.AddHs(Chem.MolFromSmiles("CCO")))  # no conformer
    heavy = Chem.RemoveHs(embed("CCO", seed=4))  # coordinates for the heavy atoms only
    with pytest.raises(UnusableMolecule, match="implicit_hydrogens"):
        featurize(heavy)
    broken = embed("CCO", seed=4)
    broken.GetConformer().SetAtomPosition(0, (float("nan"), 0.0, 0.0))
    with pytest.raises(UnusableMolecule, match="non_finite_coordinates"):
        featurize(broken)
    # A linear molecule lying in the z = 0 plane is 3-D data all the same (QM9 has two such).
    acetylene = embed("C#C", seed=5)
    conf = acetylene.GetConformer()
    for i, x in enumerate([-1.66, -0.6, 0.6, 1.66]):
        conf.SetAtomPosition(i, (x, 0.0, 0.0))
    assert featurize(acetylene).num_atoms == 4
    # ... but sp3 carbons with all z = 0 are a 2-D drawing, whatever the flag says.
    squashed = embed("CCO", seed=6)
    conf = squashed.GetConformer()
    for i in range(squashed.GetNumAtoms()):
        p = conf.GetAtomPosition(i)
        conf.SetAtomPosition(i, (p.x, p.y, 0.0))
    with pytest.raises(UnusableMolecule, match="not_3d"):
        featurize(squashed)
    assert set(SKIP_REASONS) >= {"not_3d", "implicit_hydrogens", "non_finite_coordinates", "unparsable"}


# ---- qm9pack (the default source) ------------------------------------------------------------------------------------
def test_qm9pack_default_loads_consistent_graphs(tmp_path):
    dm = prepared(config(tmp_path, num_real=20, num_test=5))
    assert isinstance(dm, RealDataModule)
    assert len(dm.train_dataset) == 20 and len(dm.test_dataset) == 5 and dm.val_dataset is None
    assert dm.label == "QM9 (qm9pack)" and "\n" not in dm.describe()
    stats = dm.data_stats
    assert stats["train_molecules"] == 20 and stats["test_molecules"] == 5
    assert stats["records_read"] == stats["molecules_read"] == 25 + sum(stats["skipped"].values())
    assert stats["bonds_from_xyz"] + stats.get("bonds_from_smiles", 0) >= 25
    for i, graph in enumerate(dm.train_graphs()):
        graph.validate()
        assert graph.mol_id == i
        lengths = bond_lengths(graph)
        assert ((lengths > 0.9) & (lengths < 1.8)).all(), (graph.smiles, lengths)
        assert (graph.z == 1).any()  # explicit hydrogens
        # The RDKit molecule of the metrics: same atoms, same order, same coordinates, same molecule.
        mol = dm.rdkit_molecule("train", i)
        assert [a.GetAtomicNum() for a in mol.GetAtoms()] == graph.z.tolist()
        np.testing.assert_allclose(mol.GetConformer().GetPositions(), graph.pos.numpy(), atol=1e-5)
        assert molecule_key(mol) == graph.smiles
        assert dm.train_dataset.source_ids[i].startswith("qm9:")
    setup_again = dm.train_dataset
    dm.setup("test")  # idempotent
    assert dm.train_dataset is setup_again


def test_qm9pack_split_is_by_molecule_deterministic_and_prefix_stable(tmp_path):
    first = prepared(config(tmp_path / "a", num_real=12, num_val=3, num_test=4))
    again = prepared(config(tmp_path / "b", num_real=12, num_val=3, num_test=4))
    smaller = prepared(config(tmp_path / "c", num_real=6, num_val=3, num_test=4))
    other_seed = prepared(config(tmp_path / "d", num_real=12, num_val=3, num_test=4, split_seed=1))
    train, val, test = (split_keys(first, s) for s in ("train", "val", "test"))
    assert not (set(train) & set(test)) and not (set(train) & set(val)) and not (set(val) & set(test))
    assert len(set(train)) == 12
    for split in ("train", "val", "test"):
        assert split_keys(again, split) == split_keys(first, split)
    assert split_keys(smaller, "train") == train[:6] and split_keys(smaller, "test") == test
    assert split_keys(other_seed, "train") != train
    a, b = first.train_dataset[5], again.train_dataset[5]
    assert torch.equal(a.pos, b.pos) and torch.equal(a.edge_index, b.edge_index)


def write_qm9_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    header = ["XYZ_file", "Index", "SMILES", "InChi", "N_atoms", "Elements", "XYZ_Ang", "HOMO_au"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, quoting=csv.QUOTE_NONNUMERIC)
        writer.writeheader()
        for row in rows:
            writer.writerow({"XYZ_file": f"x_{row['Index']}.xyz", "InChi": "", "HOMO_au": -0.2, **row})
    return path


def qm9_row(index: int, smiles: str, seed: int = 0, **overrides) -> dict[str, str]:
    """A qm9pack-format row of ``smiles`` embedded by RDKit (elements and coordinates in RDKit's atom order)."""
    mol = embed(smiles, seed=seed)
    symbols = [a.GetSymbol() for a in mol.GetAtoms()]
    xyz = mol.GetConformer().GetPositions()
    row = {
        "Index": index,
        "SMILES": smiles,
        "N_atoms": len(symbols),
        "Elements": "[" + ",".join(f"'{s}'" for s in symbols) + "]",
        "XYZ_Ang": "[" + ",".join("[" + ",".join(f"{v:.6f}" for v in p) + "]" for p in xyz) + "]",
    }
    row.update(overrides)
    return row


def test_qm9_format_csv_counts_bad_rows(tmp_path):
    rows = [qm9_row(i + 1, s, seed=i) for i, s in enumerate(SMALL[:6])]
    rows.append(qm9_row(101, "CCCO", N_atoms=99))  # N_atoms disagrees with the coordinates
    rows.append(qm9_row(102, "CCCC", SMILES="C1CC(C1"))  # unparsable SMILES
    rows.append(qm9_row(103, "CCCN", SMILES="CCCO"))  # coordinates of another molecule
    rows.append(qm9_row(104, "OCCO", seed=9))  # the same molecule again
    write_qm9_csv(tmp_path / "qm9_part1.csv", rows)
    dm = prepared(config(tmp_path, path=str(tmp_path), num_real=4, num_test=2))
    skipped = dm.data_stats["skipped"]
    assert skipped == {"atom_count_mismatch": 1, "unparsable": 1, "graph_mismatch": 1, "duplicate_molecule": 1}
    assert dm.data_stats["records_read"] == 10
    keys = split_keys(dm, "train") + split_keys(dm, "test")
    assert sorted(keys) == sorted(molecule_key(Chem.MolFromSmiles(s)) for s in SMALL[:6])
    assert dm.label.startswith("QM9 (qm9pack format")
    # A file without the qm9pack columns is refused by name.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError) as excinfo:
        prepared(config(tmp_path / "c2", path=str(tmp_path / "bad")))
    assert_one_line_user_error(excinfo, "other.csv", "not a qm9pack CSV")


# ---- rdkit_folder (GEOM) ----------------------------------------------------------------------------------------
def write_rdkit_folder(root: Path, smiles_list: list[str], n_confs: int = 3) -> dict[str, list[float]]:
    """GEOM's layout: summary_drugs.json and drugs/<i>.pickle with n_confs conformers each; returns the weights."""
    (root / "drugs").mkdir(parents=True)
    summary, weights = {}, {}
    for i, smiles in enumerate(smiles_list):
        mol = embed(smiles, seed=10 + i, n_confs=n_confs)
        w = list(np.random.default_rng(i).dirichlet(np.ones(n_confs)))
        conformers = [
            {"rd_mol": one_conformer(mol, c.GetId()), "boltzmannweight": w[k], "totalenergy": -10.0 - k}
            for k, c in enumerate(mol.GetConformers())
        ]
        rel = f"drugs/{i}.pickle"
        with open(root / rel, "wb") as fh:
            pickle.dump({"conformers": conformers, "smiles": smiles}, fh)
        summary[smiles] = {"pickle_path": rel, "uniqueconfs": n_confs}
        weights[smiles] = w
    summary["CCCCCC"] = {"pickle_path": "drugs/missing.pickle"}  # listed but absent
    (root / "summary_drugs.json").write_text(json.dumps(summary))
    return weights


def test_rdkit_folder_takes_top_conformers_by_weight(tmp_path):
    root = tmp_path / "rdkit_folder"
    weights = write_rdkit_folder(root, SMALL[:6])
    dm = prepared(config(tmp_path, source="rdkit_folder", path=str(root), conformers_per_molecule=2))
    train = dm.train_dataset
    assert train.num_molecules == 4 and len(train) == 8 and dm.test_dataset.num_molecules == 2
    assert dm.label.startswith("GEOM-Drugs (rdkit_folder")
    assert dm.data_stats["skipped"].get("missing_file", 0) <= 1
    assert np.array_equal(train.molecule, np.repeat(np.arange(4), 2))
    for i in range(len(train)):
        source, conformer = train.source_ids[i].split("#")
        smiles = SMALL[int(source.removeprefix("drugs/").removesuffix(".pickle"))]
        rank = int(i % 2)  # first the heaviest conformer, then the next one
        assert int(conformer) == int(np.argsort(-np.asarray(weights[smiles]), kind="stable")[rank])
        with open(root / source, "rb") as fh:
            expected = pickle.load(fh)["conformers"][int(conformer)]["rd_mol"].GetConformer().GetPositions()
        np.testing.assert_allclose(train[i].pos.numpy(), expected, atol=1e-5)
        assert train[i].mol_id == i
    # The summary file itself is accepted as the path.
    dm2 = prepared(config(tmp_path / "again", source="rdkit_folder", path=str(root / "summary_drugs.json")))
    assert split_keys(dm2, "test") == split_keys(dm, "test")


@pytest.mark.parametrize("kind", HOSTILE)
def test_rdkit_folder_pickle_naming_a_foreign_callable_is_refused_unrun(tmp_path, kind):
    root = tmp_path / "rdkit_folder"
    write_rdkit_folder(root, SMALL[:6])
    marker = tmp_path / "marker"
    name, hostile = payload(kind, marker)
    with open(root / "drugs" / "3.pickle", "wb") as fh:  # a conformer whose rd_mol runs a command
        pickle.dump({"conformers": [{"rd_mol": hostile, "boltzmannweight": 1.0}]}, fh)
    with pytest.raises(UserError) as excinfo:  # all six molecules are needed: the file is read
        prepared(config(tmp_path, source="rdkit_folder", path=str(root), num_real=4, num_test=2))
    assert_one_line_user_error(excinfo, "3.pickle", f"refusing to unpickle {name} (", "trusted data")
    assert not marker.exists()


@pytest.mark.parametrize("where", ["parent", "absolute", "link"])
def test_rdkit_folder_pickle_path_outside_the_folder_is_refused(tmp_path, where):
    root = tmp_path / "rdkit_folder"
    write_rdkit_folder(root, SMALL[:6])
    outside = tmp_path / "outside.pickle"  # a well-formed pickle of a seventh molecule
    mol = embed("CCCO", seed=7)
    with open(outside, "wb") as fh:
        pickle.dump({"conformers": [{"rd_mol": mol, "boltzmannweight": 1.0}]}, fh)
    rel = {"parent": "../outside.pickle", "absolute": str(outside), "link": "drugs/link.pickle"}[where]
    if where == "link":
        (root / "drugs" / "link.pickle").symlink_to(outside)
    summary = json.loads((root / "summary_drugs.json").read_text())
    summary["CCCO"] = {"pickle_path": rel}
    (root / "summary_drugs.json").write_text(json.dumps(summary))
    with pytest.raises(UserError) as excinfo:  # seven molecules: only the outside entry can give the seventh
        prepared(config(tmp_path, source="rdkit_folder", path=str(root), num_real=5, num_test=2))
    assert_one_line_user_error(excinfo, "'CCCO'", repr(rel), "outside", "--data.path")


# ---- geodiff pickles -----------------------------------------------------------------------------------------
class _FakePyg:
    """Registers a stand-in ``torch_geometric`` in sys.modules while GeoDiff-style pickles are written."""

    def __enter__(self):
        class Data:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)

        class GlobalStorage:
            def __init__(self, mapping):
                self._mapping = dict(mapping)
                self._parent = None

        class Data2:  # torch_geometric 2.x keeps the attributes in _store, which points back to its Data
            def __init__(self, **kwargs):
                self._store = GlobalStorage(kwargs)
                self._store._parent = self

        self.names = [
            "torch_geometric",
            "torch_geometric.data",
            "torch_geometric.data.data",
            "torch_geometric.data.storage",
        ]
        modules = {name: types.ModuleType(name) for name in self.names}
        for cls, module, name in (
            (Data, "data", "Data"),
            (Data2, "data", "DataEdgeAttr"),
            (GlobalStorage, "storage", "GlobalStorage"),
        ):
            cls.__module__, cls.__qualname__, cls.__name__ = f"torch_geometric.data.{module}", name, name
            setattr(modules[f"torch_geometric.data.{module}"], name, cls)
        sys.modules.update(modules)
        self.Data, self.Data2 = Data, Data2
        return self

    def __exit__(self, *exc):
        for name in self.names:
            sys.modules.pop(name, None)


def geodiff_records(pyg: _FakePyg, smiles_list: list[str], n_confs: int = 2, v2: bool = False) -> list:
    out = []
    for i, smiles in enumerate(smiles_list):
        mol = embed(smiles, seed=20 + i, n_confs=n_confs)
        for c in mol.GetConformers():
            rdmol = one_conformer(mol, c.GetId())
            pos = torch.tensor(rdmol.GetConformer().GetPositions(), dtype=torch.float32)
            cls = pyg.Data2 if v2 else pyg.Data
            out.append(
                cls(
                    rdmol=rdmol,
                    smiles=smiles,
                    pos=pos,
                    atom_type=torch.tensor([a.GetAtomicNum() for a in rdmol.GetAtoms()]),
                )
            )
    return out


def test_geodiff_folder_keeps_its_split_and_reads_both_layouts(tmp_path):
    folder = tmp_path / "geodiff"
    folder.mkdir()
    with _FakePyg() as pyg:
        train = geodiff_records(pyg, SMALL[:6] + ["CCCO"])  # CCCO is also a test molecule: never a training one
        bad = geodiff_records(pyg, ["CCCl"], n_confs=1)[0]
        bad.pos = bad.pos[:-1]  # one atom short
        with open(folder / "train_data_40k.pkl", "wb") as fh:
            pickle.dump(train + [bad], fh)
        with open(folder / "val_data_5k.pkl", "wb") as fh:
            pickle.dump(geodiff_records(pyg, ["CCCC", "CCCCO"], v2=True), fh)
        with open(folder / "test_data_1k.pkl", "wb") as fh:
            pickle.dump(geodiff_records(pyg, ["CCCO", "CCCN"], n_confs=3), fh)
    assert "torch_geometric.data.data" not in sys.modules  # read back without it
    dm = prepared(
        config(tmp_path, source="geodiff", path=str(folder), num_real=6, num_val=2, conformers_per_molecule=2)
    )
    assert sorted(split_keys(dm, "test")) == ["CCCN", "CCCO"]
    assert sorted(split_keys(dm, "val")) == ["CCCC", "CCCCO"]
    assert len(dm.test_dataset) == 4 and len(dm.val_dataset) == 4 and len(dm.train_dataset) == 12
    assert "CCCO" not in split_keys(dm, "train")
    stats = dm.data_stats
    assert stats["skipped"]["atom_count_mismatch"] == 1  # the short record, counted whether or not it is reached
    assert stats["skipped"].get("duplicate_molecule", 0) <= 1  # CCCO, when the shuffle reaches it
    assert all(s.startswith("train_data_40k.pkl#") for s in dm.train_dataset.source_ids)
    # Held-out molecules may keep more reference conformers than training ones.
    more = prepared(
        config(
            tmp_path / "more",
            source="geodiff",
            path=str(folder),
            num_real=6,
            conformers_per_molecule=2,
            test_conformers_per_molecule=5,
        )
    )
    assert len(more.test_dataset) == 6 and len(more.train_dataset) == 12
    assert more.test_dataset.molecule.tolist() == [0, 0, 0, 1, 1, 1]
    assert "x up to 5 conformers" in more.describe()
    # A single file is split like any pool; too many molecules asked for names the flag.
    with pytest.raises(UserError) as excinfo:
        prepared(config(tmp_path / "one", source="geodiff", path=str(folder / "test_data_1k.pkl"), num_real=4))
    assert_one_line_user_error(excinfo, "only 2 usable molecules", "--data.num_real")


@pytest.mark.parametrize("kind", HOSTILE)
def test_geodiff_pickle_naming_a_foreign_callable_is_refused_unrun(tmp_path, kind):
    marker = tmp_path / "marker"
    name, hostile = payload(kind, marker)
    path = tmp_path / "train_data_1k.pkl"
    with _FakePyg() as pyg:
        records = geodiff_records(pyg, SMALL[:3])
        with open(path, "wb") as fh:
            pickle.dump(records + [hostile], fh)
    with pytest.raises(UserError) as excinfo:
        prepared(config(tmp_path, source="geodiff", path=str(path), num_real=2, num_test=1))
    assert_one_line_user_error(excinfo, str(path), f"refusing to unpickle {name} (", "trusted data")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's weights-only loader on foreign bytes
@pytest.mark.parametrize("inner", ["plain", "legacy", "legacy_weights_only"])
def test_geodiff_tensor_storage_cannot_smuggle_a_pickle(tmp_path, monkeypatch, inner):
    # torch's own storage helper unpickles the bytes it is given with every class allowed: a pickle can
    # name that helper with a hostile pickle as its bytes. Bytes that start like torch's legacy format go
    # through the allow-list, any others (and all under TORCH_FORCE_WEIGHTS_ONLY_LOAD) through torch's
    # weights-only loader.
    if inner == "legacy_weights_only":
        monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    hostile = pickle.dumps(Payload(os.system, f"touch {marker}"), protocol=2)
    if inner != "plain":
        hostile = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2) + hostile
    path = tmp_path / "data.pkl"
    with open(path, "wb") as fh:
        pickle.dump([Payload(torch.storage._load_from_bytes, hostile)], fh)
    with pytest.raises(UserError) as excinfo:
        prepared(config(tmp_path, source="geodiff", path=str(path), num_real=2, num_test=1))
    refused = f"{os.system.__module__}.system (" if inner == "legacy" else "a tensor storage"
    assert_one_line_user_error(excinfo, str(path), f"refusing to unpickle {refused}")
    assert not marker.exists()


@pytest.mark.parametrize("weights_only", [False, True])
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_allow_list_reads_molecules_arrays_and_tensors_of_every_protocol(tmp_path, monkeypatch, protocol, weights_only):
    if weights_only:  # tensor storages then go through torch's weights-only loader
        monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    mol = embed("CCO", seed=8)
    data = {
        "rd_mol": mol,
        "rw_mol": Chem.RWMol(mol),
        "weights": [np.float64(0.25), np.float32(0.5), np.int64(3), np.bool_(True)],
        "array": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # non-contiguous
        "record": np.zeros(2, dtype=[("a", "<f4"), ("b", "<i8")]),
        "tensors": (torch.arange(4), torch.ones(2, 3)[:, 1:], torch.tensor([True, False])),
        "ordered": collections.OrderedDict(a=1),
        "other": [set([1]), frozenset([2]), b"bytes", b"", bytearray(b"xy"), 1 + 2j, "text", None, 1.5],
    }
    path = tmp_path / "mixed.pickle"
    with open(path, "wb") as fh:
        pickle.dump(data, fh, protocol=protocol)
    back = geom._unpickle(path)
    assert Chem.MolToSmiles(back["rd_mol"]) == Chem.MolToSmiles(mol)
    np.testing.assert_allclose(back["rd_mol"].GetConformer().GetPositions(), mol.GetConformer().GetPositions())
    assert isinstance(back["rw_mol"], Chem.RWMol)
    assert back["weights"] == data["weights"] and back["other"] == data["other"]
    np.testing.assert_array_equal(back["array"], data["array"])
    assert back["record"].dtype == data["record"].dtype
    for got, want in zip(back["tensors"], data["tensors"]):
        assert torch.equal(got, want) and not got.requires_grad
    assert back["ordered"] == data["ordered"]


# ---- sdf ---------------------------------------------------------------------------------------------------
def test_sdf_groups_conformers_and_counts_bad_records(tmp_path):
    mols = [embed(s, seed=30 + i, n_confs=2) for i, s in enumerate(SMALL[:6])]
    flat = Chem.AddHs(Chem.MolFromSmiles("CCCF"))
    AllChem.Compute2DCoords(flat)
    no_h = Chem.RemoveHs(embed("CCCBr", seed=1))
    blocks = ("garbage that is not a mol block", Chem.MolToMolBlock(flat), Chem.MolToMolBlock(no_h))
    path = write_sdf(tmp_path / "mols.sdf", mols, extra_blocks=blocks)
    dm = prepared(config(tmp_path, source="sdf", path=str(path), conformers_per_molecule=2, num_val=0))
    assert dm.data_stats["skipped"] == {"unparsable": 1, "not_3d": 1, "implicit_hydrogens": 1}
    assert dm.data_stats["records_read"] == 15
    assert len(dm.train_dataset) == 8 and len(dm.test_dataset) == 4
    for split in ("train", "test"):
        dataset = getattr(dm, f"{split}_dataset")
        for i in range(len(dataset)):
            graph = dataset[i]
            mol = dm.rdkit_molecule(split, i)
            assert molecule_key(mol) == graph.smiles
            np.testing.assert_allclose(mol.GetConformer().GetPositions(), graph.pos.numpy(), atol=1e-4)
    # The two conformers of a molecule are different coordinates of one graph.
    a, b = dm.train_dataset[0], dm.train_dataset[1]
    assert a.smiles == b.smiles and torch.equal(a.z, b.z) and not torch.allclose(a.pos, b.pos)
    # A folder of SDF files reads the same records.
    folder = tmp_path / "folder"
    folder.mkdir()
    write_sdf(folder / "a.sdf", mols[:3])
    write_sdf(folder / "b.sdf", mols[3:])
    dm2 = prepared(config(tmp_path / "f", source="sdf", path=str(folder), conformers_per_molecule=2))
    assert sorted(split_keys(dm2, "train") + split_keys(dm2, "test")) == sorted(
        split_keys(dm, "train") + split_keys(dm, "test")
    )


def test_too_many_atoms_and_too_few_molecules(tmp_path):
    mols = [embed(s, seed=40 + i) for i, s in enumerate(["CCO", "CCCCCCCC", "c1ccccc1", "CCN"])]
    path = write_sdf(tmp_path / "m.sdf", mols)
    dm = prepared(config(tmp_path, source="sdf", path=str(path), num_real=2, num_test=1, max_atoms=12))
    assert dm.data_stats["skipped"] == {"too_many_atoms": 1}  # octane has 26 atoms
    with pytest.raises(UserError) as excinfo:
        prepared(config(tmp_path / "b", source="sdf", path=str(path), num_real=5, num_test=1, max_atoms=12))
    assert_one_line_user_error(excinfo, "only 3 usable molecules", "lower --data.num_real", "--data.max_atoms")


def test_reading_a_source_shows_progress_with_what_was_kept(tmp_path, caplog, monkeypatch):
    from collapse import progress

    monkeypatch.setattr(progress, "_interval", 0.0)  # as --progress_every 0: a line per molecule read
    mols = [embed(s, seed=40 + i) for i, s in enumerate(["CCO", "CCCCCCCC", "c1ccccc1", "CCN"])]
    path = write_sdf(tmp_path / "m.sdf", mols)
    with caplog.at_level("INFO", logger="collapse.progress"):
        prepared(config(tmp_path, source="sdf", path=str(path), num_real=2, num_test=1, max_atoms=12))
    lines = [r.getMessage() for r in caplog.records if r.name == "collapse.progress"]
    head = f"reading --data.path {path}: "
    assert any(line.startswith(head + "1 molecules") and "kept test 0/1, train 0/2" in line for line in lines)
    assert any(line.startswith(head) and "kept test 1/1, train 1/2" in line for line in lines), lines
    assert any(re.match(re.escape(head) + r"done, [34] molecules in ", line) for line in lines), lines


def test_bad_paths_and_flags(tmp_path):
    with pytest.raises(UserError) as excinfo:
        GeomDataModule(config(tmp_path, source="sdf", path=str(tmp_path / "nowhere.sdf"))).prepare_data()
    assert_one_line_user_error(excinfo, "nowhere.sdf", "no such file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as excinfo:
        GeomDataModule(config(tmp_path, source="rdkit_folder", path=str(tmp_path / "empty"))).prepare_data()
    assert_one_line_user_error(excinfo, "summary_drugs.json")
    with pytest.raises(ConfigError, match="--data.path"):
        GeomDataConfig(source="geodiff")
    with pytest.raises(ConfigError, match="--data.num_real"):
        GeomDataConfig(num_real=0)
    with pytest.raises(ConfigError, match="--data.source"):
        GeomDataConfig(source="xyz")
    with pytest.raises(UserError, match="prepare_data"):
        GeomDataModule(config(tmp_path, source="sdf", path=str(write_sdf(tmp_path / "x.sdf", [])))).setup("fit")


# ---- synthetic conformers and collation ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdf_module(tmp_path_factory) -> GeomDataModule:
    tmp_path = tmp_path_factory.mktemp("sdf_module")
    mols = [embed(s, seed=50 + i) for i, s in enumerate(SMALL[:8])]
    path = write_sdf(tmp_path / "m.sdf", mols)
    return prepared(config(tmp_path, source="sdf", path=str(path), num_real=6, num_test=2), batch_size=3)


def test_synthetic_dataset_round_trip_and_mismatch(sdf_module):
    dm = sdf_module
    train = dm.train_dataset
    ids = np.array([3, 0, 3, 5], dtype=np.int64)
    counts = train.num_atoms[ids]
    width = 16
    pos = np.zeros((len(ids), width, 3), dtype=np.float32)
    rng = np.random.default_rng(0)
    for row, n in enumerate(counts):
        pos[row, :n] = rng.normal(size=(n, 3))
    synthetic = dm.synthetic_dataset({"mol_id": ids, "num_atoms": counts, "pos": pos})
    assert len(synthetic) == 4
    for row, i in enumerate(ids):
        item, real = synthetic[row], train[int(i)]
        assert item.mol_id == int(i) and item.smiles == real.smiles
        assert torch.equal(item.z, real.z) and torch.equal(item.edge_index, real.edge_index)
        np.testing.assert_array_equal(item.pos.numpy(), pos[row, : counts[row]])
    batch = dm.collate_fn([synthetic[0], train[1]])  # real and synthetic items collate together
    assert isinstance(batch, MoleculeBatch) and batch.num_graphs == 2
    # As the store keeps them: the molecules' coordinates back to back, without the padding.
    flat = np.concatenate([pos[row, :n] for row, n in enumerate(counts)])
    stored = dm.synthetic_dataset({"mol_id": ids, "num_atoms": counts, "pos": flat})
    assert all(torch.equal(stored[row].pos, synthetic[row].pos) for row in range(4))
    with pytest.raises(ValueError, match="atoms back to back, but num_atoms sum to"):
        dm.synthetic_dataset({"mol_id": ids, "num_atoms": counts, "pos": flat[:-1]})
    wrong = counts.copy()
    wrong[2] += 1
    with pytest.raises(ValueError, match="synthetic sample 2: num_atoms"):
        dm.synthetic_dataset({"mol_id": ids, "num_atoms": wrong, "pos": pos})
    with pytest.raises(ValueError, match="mol_id must be in 0..5"):
        dm.synthetic_dataset({"mol_id": ids + 3, "num_atoms": counts, "pos": pos})
    with pytest.raises(ValueError, match="missing"):
        dm.synthetic_dataset({"mol_id": ids, "pos": pos})


def test_collate_of_the_module_items(sdf_module):
    dm = sdf_module
    loader = DataLoader(dm.train_dataset, batch_size=3, collate_fn=dm.collate_fn)
    batches = list(loader)
    assert [b.num_graphs for b in batches] == [3, 3]
    batch = batches[0]
    graphs = [dm.train_dataset[i] for i in range(3)]
    assert batch.num_atoms.tolist() == [g.num_atoms for g in graphs]
    assert batch.pos.shape == (sum(g.num_atoms for g in graphs), 3)
    assert batch.mol_id.tolist() == [0, 1, 2]
    assert int(batch.edge_index.max()) < batch.pos.shape[0]
    for k, pos in enumerate(batch.split_pos()):
        assert torch.equal(pos, graphs[k].pos)
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch.mol_id.tolist() == [0, 1]
    assert dm.val_dataloader() == []


def test_a_pinning_loader_pins_every_tensor_of_a_molecule_batch(sdf_module, monkeypatch):
    # A DataLoader with pin_memory=True (on a GPU) pins a batch object through its pin_memory(); without one, a
    # MoleculeBatch stayed in pageable memory and every copy to the GPU made the host wait.
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = next(iter(DataLoader(sdf_module.train_dataset, batch_size=3, collate_fn=sdf_module.collate_fn)))
    pinned = []

    def fake_pin(self, *args, **kwargs):  # this machine may have no GPU to pin for
        pinned.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = pin_memory(batch)
    assert isinstance(out, MoleculeBatch) and out is not batch
    assert len(pinned) == len(dataclasses.fields(MoleculeBatch))
    assert all(torch.equal(getattr(out, f.name), getattr(batch, f.name)) for f in dataclasses.fields(MoleculeBatch))
    moved = out.to("cpu")  # pageable or not, a copy to the CPU blocks
    assert torch.equal(moved.pos, batch.pos) and moved.num_graphs == 3


def test_second_run_reads_the_cache_and_a_damaged_cache_is_refused(tmp_path, monkeypatch):
    path = write_sdf(tmp_path / "m.sdf", [embed(s, seed=60 + i) for i, s in enumerate(SMALL[:4])])
    cfg = config(tmp_path, source="sdf", path=str(path), num_real=3, num_test=1)
    first = prepared(cfg)

    def never(*args, **kwargs):
        raise AssertionError("the source was parsed again")

    monkeypatch.setattr(geom, "_fill", never)
    again = prepared(cfg)
    assert again.data_stats == first.data_stats
    assert split_keys(again, "train") == split_keys(first, "train")
    (first.cache_entry / geom.DATA_FILE).write_bytes(b"not a pickle")
    with pytest.raises(UserError) as excinfo:
        prepared(cfg)
    assert_one_line_user_error(excinfo, "damaged cache", str(first.cache_entry))


def test_cache_holds_no_pickle_and_a_planted_one_never_runs(tmp_path):
    path = write_sdf(tmp_path / "m.sdf", [embed(s, seed=60 + i) for i, s in enumerate(SMALL[:4])])
    cfg = config(tmp_path, source="sdf", path=str(path), num_real=3, num_test=1)
    first = prepared(cfg)
    entry = first.cache_entry
    assert json.loads((entry / "identity.json").read_text())["version"] == geom.CACHE_VERSION
    with np.load(entry / geom.DATA_FILE, allow_pickle=False) as npz:  # numeric arrays only
        assert all(npz[name].dtype != object for name in npz.files)
    marker = tmp_path / "marker"
    # An old-style data.pkl planted in the entry is not read at all.
    (entry / "data.pkl").write_bytes(pickle.dumps(Payload(os.system, f"touch {marker}")))
    again = prepared(cfg)
    assert split_keys(again, "train") == split_keys(first, "train")
    assert again.rdkit_molecule("train", 0).GetNumAtoms() == first.train_dataset[0].num_atoms
    # A pickle in place of data.npz, or an npz whose array needs unpickling, is refused, never run.
    good = (entry / geom.DATA_FILE).read_bytes()
    (entry / geom.DATA_FILE).write_bytes(pickle.dumps(Payload(os.system, f"touch {marker}")))
    with pytest.raises(UserError) as excinfo:
        prepared(cfg)
    assert_one_line_user_error(excinfo, "damaged cache", str(entry))
    (entry / geom.DATA_FILE).write_bytes(good)
    with np.load(entry / geom.DATA_FILE) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["z"] = np.array([Payload(os.system, f"touch {marker}")], dtype=object)
    np.savez(entry / geom.DATA_FILE, **arrays)
    with pytest.raises(UserError) as excinfo:
        prepared(cfg)
    assert_one_line_user_error(excinfo, "damaged cache", str(entry))
    assert not marker.exists()
