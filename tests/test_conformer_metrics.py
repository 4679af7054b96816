"""Conformer metrics: symmetry-aware RMSD, COV/MAT, bond-length distances and the conformer picture."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from rdkit import Chem
from rdkit.Chem import AllChem, rdMolAlign

from datamodules.mol_graph import BOND_CODES, MolGraph
from evaluation.conformers import (
    DEFAULT_THRESHOLDS,
    bond_length_distance,
    bond_lengths,
    conformer_rmsd,
    count_symmetries,
    coverage_from_rmsd,
    coverage_matching,
    draw_conformers,
    evaluate_conformers,
    kabsch_align,
    kabsch_rmsd,
    rmsd_matrix,
    wasserstein_1d,
)


def embed(smiles: str, n: int, seed: int = 42) -> Chem.Mol:
    """``smiles`` with explicit H and ``n`` ETKDGv3 conformers (seed 0 would give n identical ones)."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    assert len(AllChem.EmbedMultipleConfs(mol, n, params)) == n
    return mol


def positions(mol: Chem.Mol) -> list[np.ndarray]:
    return [conf.GetPositions() for conf in mol.GetConformers()]


def rigid_motion(pos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``pos`` rotated by a random proper rotation and shifted."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return pos @ q.T + rng.normal(scale=5.0, size=3)


def to_graph(mol: Chem.Mol, conf_id: int = 0) -> MolGraph:
    """A minimal MolGraph of an RDKit molecule (atom features left zero: the metrics never read them)."""
    src, dst, codes = [], [], []
    for bond in mol.GetBonds():
        i, j, code = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx(), BOND_CODES[str(bond.GetBondType())]
        src += [i, j]
        dst += [j, i]
        codes += [code, code]
    return MolGraph(
        z=torch.tensor([a.GetAtomicNum() for a in mol.GetAtoms()]),
        atom_feat=torch.zeros(mol.GetNumAtoms(), 5, dtype=torch.long),
        edge_index=torch.tensor([src, dst]),
        bond_type=torch.tensor(codes),
        pos=torch.tensor(mol.GetConformer(conf_id).GetPositions(), dtype=torch.float32),
        smiles=Chem.MolToSmiles(Chem.RemoveHs(mol)),
    )


@pytest.fixture(scope="module")
def qm9_mol() -> Chem.Mol:
    """A QM9-size molecule (8 heavy atoms, a ring, a carbonyl): 4 conformers."""
    return embed("CC1(O)CC(=O)NC1", 4)


# --------------------------------------------------------------------------------------------------
# RMSD
# --------------------------------------------------------------------------------------------------


def test_rmsd_of_a_conformer_to_its_rigidly_moved_self_is_zero(qm9_mol):
    rng = np.random.default_rng(0)
    ref = positions(qm9_mol)[0]
    moved = rigid_motion(ref, rng)
    for heavy in (True, False):
        assert conformer_rmsd(qm9_mol, moved, ref, heavy_atoms_only=heavy) == pytest.approx(0.0, abs=1e-4)
    assert kabsch_rmsd(moved, ref) == pytest.approx(0.0, abs=1e-4)
    assert np.allclose(kabsch_align(moved, ref), ref, atol=1e-6)
    # A torch tensor is accepted too.
    assert conformer_rmsd(qm9_mol, torch.tensor(moved), ref) == pytest.approx(0.0, abs=1e-4)


def test_kabsch_never_reflects():
    # A chiral (non-planar) point set and its mirror image: no proper rotation superimposes them.
    p = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [0.0, 1.2, 0.0], [0.0, 0.0, 0.9], [0.4, 0.3, 0.2]])
    assert kabsch_rmsd(p * np.array([1.0, 1.0, -1.0]), p) > 0.1
    assert kabsch_rmsd(np.vstack([p[:, 1], p[:, 2], p[:, 0]]).T, p) == pytest.approx(0.0, abs=1e-6)  # det +1


def test_symmetric_relabelling_scores_zero_only_with_symmetry():
    # Isopropanol: swapping the labels of the two methyl carbons turns the labelled heavy-atom geometry into
    # its mirror image, which no rotation undoes (Kabsch > 0) but an automorphism does.
    mol = embed("CC(C)O", 1)
    ref = positions(mol)[0]
    heavy = np.array([a.GetAtomicNum() != 1 for a in mol.GetAtoms()])
    perm = np.arange(mol.GetNumAtoms())
    perm[[0, 2]] = [2, 0]
    swapped = ref[perm]
    assert conformer_rmsd(mol, swapped, ref) == pytest.approx(0.0, abs=1e-4)
    assert kabsch_rmsd(swapped[heavy], ref[heavy]) > 0.1
    # With hydrogens: swapping two H of ethanol's methyl group.
    eth = embed("CCO", 1)
    ref = positions(eth)[0]
    methyl_h = [n.GetIdx() for n in eth.GetAtomWithIdx(0).GetNeighbors() if n.GetAtomicNum() == 1]
    perm = np.arange(eth.GetNumAtoms())
    perm[methyl_h[:2]] = methyl_h[1::-1]
    swapped = ref[perm]
    assert conformer_rmsd(eth, swapped, ref, heavy_atoms_only=False) == pytest.approx(0.0, abs=1e-4)
    assert kabsch_rmsd(swapped, ref) > 0.1


def test_kabsch_matches_rdkit_without_symmetry():
    mol = embed("OCC(=O)N(C)C#N", 3)  # heavy-atom graph without automorphisms
    assert count_symmetries(mol) == 1
    heavy = np.array([a.GetAtomicNum() != 1 for a in mol.GetAtoms()])
    p0, p1, p2 = positions(mol)
    noisy = p2 + np.random.default_rng(5).normal(scale=0.2, size=p2.shape)
    for probe, ref in ((p0, p1), (noisy, p0)):
        expected = conformer_rmsd(mol, probe, ref)
        assert expected > 0.01
        assert kabsch_rmsd(probe[heavy], ref[heavy]) == pytest.approx(expected, abs=1e-5)
    # All atoms, no symmetry used: RDKit's AlignMol with the identity map is Kabsch.
    prb, ref_mol = Chem.Mol(mol, confId=0), Chem.Mol(mol, confId=1)
    identity = list(zip(range(mol.GetNumAtoms()), range(mol.GetNumAtoms())))
    assert kabsch_rmsd(p0, p1) == pytest.approx(rdMolAlign.AlignMol(prb, ref_mol, atomMap=identity), abs=1e-5)


@pytest.mark.parametrize("smiles", ["CC(=O)[O-]", "CC1(O)CC(=O)NC1", "CC(C)(C)c1ccccc1"])
def test_rmsd_matrix_matches_pairwise_get_best_rms(smiles):
    mol = embed(smiles, 4)
    pos = positions(mol)
    gen, ref = pos[:3], pos[3:] + pos[:1]
    for heavy in (True, False):
        mat = rmsd_matrix(mol, gen, ref, heavy_atoms_only=heavy)
        pairwise = np.array([[conformer_rmsd(mol, g, r, heavy_atoms_only=heavy) for r in ref] for g in gen])
        assert mat.shape == (3, 2)
        np.testing.assert_allclose(mat, pairwise, atol=1e-5)
    # Past the automorphism cap (tert-butyl: 6 maps) the RMSD can only get worse: an upper bound.
    capped = rmsd_matrix(mol, gen, ref, max_matches=1)
    assert np.all(capped >= rmsd_matrix(mol, gen, ref) - 1e-6)


def molecule_keeping_a_hydrogen(smiles: str) -> Chem.Mol:
    """``smiles`` embedded (3 conformers) with stereo read from the 3-D coordinates, as molecules read from
    GEOM's SDF records are: an imine C=N-H then keeps its H in ``Chem.RemoveHs`` (it fixes the bond's stereo)."""
    mol = embed(smiles, 3)
    Chem.AssignStereochemistryFrom3D(mol)
    assert any(a.GetAtomicNum() == 1 for a in Chem.RemoveHs(mol).GetAtoms())
    return mol


@pytest.mark.parametrize("smiles", ["CC(=N)CO", "CC(=N)C(C)C", "[2H]OC(C)C"])
def test_rmsd_matrix_counts_the_hydrogens_remove_hs_keeps(smiles):
    mol = molecule_keeping_a_hydrogen(smiles)  # an imine H with stereo; a deuterium beside two symmetric methyls
    rng = np.random.default_rng(3)
    ref = positions(mol)
    gen = [p + rng.normal(scale=0.2, size=p.shape) for p in ref] + ref[:1]

    def placed(xyz: np.ndarray, strip=Chem.RemoveHs) -> Chem.Mol:
        out = Chem.Mol(mol, confId=0)
        out.GetConformer().SetPositions(np.ascontiguousarray(xyz))
        return strip(out)

    # The definition, computed independently: GetBestRMS on RemoveHs copies holding the two conformations.
    expected = np.array([[rdMolAlign.GetBestRMS(placed(g), placed(r)) for r in ref] for g in gen])
    np.testing.assert_allclose(rmsd_matrix(mol, gen, ref), expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        coverage_matching(mol, gen, ref, threshold=0.5)["mat_r"], expected.min(0).mean(), atol=1e-6, rtol=0
    )
    # The kept hydrogen matters: without it (every H removed) the numbers differ.
    no_h = np.array(
        [[rdMolAlign.GetBestRMS(placed(g, Chem.RemoveAllHs), placed(r, Chem.RemoveAllHs)) for r in ref] for g in gen]
    )
    assert np.abs(no_h - expected).max() > 1e-3


def test_non_finite_probe_is_inf_and_counted(qm9_mol):
    ref = positions(qm9_mol)[0]
    for bad in (np.nan, np.inf):
        probe = ref.copy()
        probe[3, 1] = bad
        assert conformer_rmsd(qm9_mol, probe, ref) == math.inf
        assert kabsch_rmsd(probe, ref) == math.inf
    broken = ref.copy()
    broken[0, 0] = np.nan
    res = coverage_matching(qm9_mol, [broken, ref + 1.0], [ref], threshold=0.5)
    assert res["num_nonfinite"] == 1 and res["cov_r"] == 1.0 and res["mat_r"] == pytest.approx(0.0, abs=1e-4)
    assert res["cov_p"] == 0.5 and res["mat_p"] == math.inf
    only_broken = coverage_matching(qm9_mol, [broken], [ref], threshold=0.5)
    assert only_broken["cov_r"] == 0.0 and only_broken["mat_r"] == math.inf
    with pytest.raises(ValueError, match="finite"):
        conformer_rmsd(qm9_mol, ref, broken)
    with pytest.raises(ValueError, match="atoms"):
        conformer_rmsd(qm9_mol, ref[:-1], ref)


# --------------------------------------------------------------------------------------------------
# Coverage and matching
# --------------------------------------------------------------------------------------------------


def test_coverage_from_a_hand_made_rmsd_matrix():
    d = np.array([[0.1, 0.9, 2.0], [0.7, 0.5, 0.4]])  # 2 generated x 3 references
    res = coverage_from_rmsd(d, threshold=0.5)
    # Nearest generated per reference: 0.1, 0.5 (on the threshold: covered), 0.4.
    assert res["cov_r"] == 1.0 and res["mat_r"] == pytest.approx(1.0 / 3)
    # Nearest reference per generated: 0.1, 0.4.
    assert res["cov_p"] == 1.0 and res["mat_p"] == pytest.approx(0.25)
    res = coverage_from_rmsd(d, threshold=0.45)
    assert res["cov_r"] == pytest.approx(2 / 3)
    assert coverage_from_rmsd([[np.nan, 0.2]], 0.5) == {"cov_r": 0.5, "mat_r": math.inf, "cov_p": 1.0, "mat_p": 0.2}


def test_coverage_with_perturbed_references():
    # Four references of a flexible QM9-size molecule, pairwise > 1 Angstrom apart (greedy pick).
    mol = embed("CCCCCCCO", 20)
    pos = positions(mol)
    d = rmsd_matrix(mol, pos, pos)
    chosen = [0]
    for k in range(1, len(pos)):
        if all(d[k, c] > 1.0 for c in chosen):
            chosen.append(k)
    assert len(chosen) >= 4
    refs = [pos[k] for k in chosen[:4]]
    rng = np.random.default_rng(1)
    delta = DEFAULT_THRESHOLDS["qm9"]
    # Small noise (0.05 Angstrom per coordinate) keeps a copy within delta, large noise (1.5) does not.
    small = [rigid_motion(r + rng.normal(scale=0.05, size=r.shape), rng) for r in refs[:2]]
    large = [r + rng.normal(scale=1.5, size=r.shape) for r in refs[2:]]
    res = coverage_matching(mol, small + large, refs, threshold=delta)
    assert res["cov_r"] == 0.5 and res["cov_p"] == 0.5
    mat = rmsd_matrix(mol, small + large, refs)
    assert res["mat_r"] == pytest.approx(mat.min(0).mean()) and res["mat_p"] == pytest.approx(mat.min(1).mean())
    assert np.all(mat.min(0)[:2] < 0.15)
    # Generated == references (rigidly moved): full coverage, zero matching error.
    exact = coverage_matching(mol, [rigid_motion(r, rng) for r in refs], refs, threshold=delta)
    assert exact["cov_r"] == 1.0 and exact["cov_p"] == 1.0
    assert exact["mat_r"] == pytest.approx(0.0, abs=1e-4)
    # Random coordinates cover nothing.
    noise = [rng.normal(scale=2.0, size=refs[0].shape) for _ in range(8)]
    assert coverage_matching(mol, noise, refs, threshold=delta)["cov_r"] < exact["cov_r"]


def test_evaluate_conformers_aggregates_over_molecules(qm9_mol):
    ethanol = embed("CCO", 2)
    q, e = positions(qm9_mol), positions(ethanol)
    rng = np.random.default_rng(2)
    broken = np.full_like(e[0], np.nan)
    items = [
        (qm9_mol, [q[0], rigid_motion(q[0], rng)], [q[0]]),  # covered: COV-R 1, MAT-R 0
        (ethanol, [rng.normal(scale=3.0, size=e[0].shape), broken], [e[0]]),  # missed: COV-R 0
    ]
    res = evaluate_conformers(items, threshold=0.5)
    assert res["cov_r_mean"] == 0.5 and res["cov_r_median"] == 0.5
    assert res["num_molecules"] == 2 and res["num_generated"] == 4 and res["num_references"] == 2
    assert res["num_nonfinite"] == 1 and res["num_capped"] == 0 and res["threshold"] == 0.5
    assert res["mat_p_mean"] == math.inf  # the broken conformer
    with pytest.raises(ValueError):
        evaluate_conformers([])


# --------------------------------------------------------------------------------------------------
# Bond lengths
# --------------------------------------------------------------------------------------------------


def test_wasserstein_1d_hand_computed_cases():
    rng = np.random.default_rng(3)
    u = rng.normal(size=40)
    assert wasserstein_1d(u, u + 0.3) == pytest.approx(0.3)
    assert wasserstein_1d(u, rng.permutation(u)) == pytest.approx(0.0)
    assert wasserstein_1d([0.0], [1.0, 3.0]) == pytest.approx(2.0)  # mean |0 - v|
    assert wasserstein_1d([0.0, 1.0], [0.0, 0.0, 1.0, 1.0]) == pytest.approx(0.0)  # same distribution
    assert wasserstein_1d([0.0, 1.0, 2.0], [1.0]) == pytest.approx(2.0 / 3)
    v = rng.normal(loc=1.0, size=25)
    assert wasserstein_1d(u, v) == pytest.approx(wasserstein_1d(v, u))
    # Equal sizes: the mean gap of the sorted samples.
    w = rng.normal(size=40)
    assert wasserstein_1d(u, w) == pytest.approx(np.mean(np.abs(np.sort(u) - np.sort(w))))
    assert math.isnan(wasserstein_1d([], [1.0]))


def test_bond_lengths_of_an_embedded_molecule_are_plausible():
    mol = embed("CC(O)C(=O)c1ccccc1", 1)
    assert AllChem.MMFFOptimizeMolecule(mol) == 0  # ETKDG alone leaves bonds a few hundredths off
    lengths = bond_lengths([to_graph(mol)])
    assert lengths["all"].size == mol.GetNumBonds()
    assert 1.05 < lengths["C-H"].mean() < 1.13
    assert 1.45 < lengths["C-C"].mean() < 1.58
    assert 1.18 < lengths["C=O"].mean() < 1.26
    assert 1.36 < lengths["C:C"].mean() < 1.42
    assert 0.92 < lengths["O-H"].mean() < 1.0
    assert lengths["aromatic"].size == 6 and lengths["double"].size == 1
    assert "H-C" not in lengths  # heavy atom first


def test_bond_lengths_match_a_bond_by_bond_count_on_awkward_edge_lists():
    """Each unordered bonded pair once (its first stored edge's type), whichever directions are stored; code-0
    edges and self-loops left out; element pairs keyed heavy atom first; several graphs at once."""
    from evaluation.conformers import _element_pair_key

    rng = np.random.default_rng(3)
    graphs, expected = [], {}
    for n in (4, 1, 6, 3):
        z = rng.choice([1, 6, 7, 8, 16], size=n)
        pos = rng.normal(size=(n, 3))
        pairs = [(int(a), int(b)) for a, b in rng.integers(0, n, size=(3 * n, 2))]  # repeats, both ways, loops
        codes = [int(c) for c in rng.integers(0, 5, size=len(pairs))]
        seen = set()
        for (a, b), code in zip(pairs, codes):
            key = (min(a, b), max(a, b))
            if key in seen:
                continue
            seen.add(key)
            if code != 0 and a != b:
                name = _element_pair_key(z[a], z[b], code)
                expected.setdefault(name, []).append(float(np.linalg.norm(pos[a] - pos[b])))
        edge_index = torch.tensor(pairs, dtype=torch.long).T.reshape(2, -1)
        graphs.append(
            MolGraph(
                z=torch.tensor(z), atom_feat=torch.zeros(n, 5, dtype=torch.long), edge_index=edge_index,
                bond_type=torch.tensor(codes, dtype=torch.long), pos=torch.tensor(pos, dtype=torch.float32),
            )
        )  # fmt: skip
    got = bond_lengths(graphs)
    pair_keys = {k: v for k, v in got.items() if k != "all" and k not in ("single", "double", "triple", "aromatic")}
    assert sorted(pair_keys) == sorted(expected)
    for key, lengths in expected.items():
        np.testing.assert_allclose(np.sort(pair_keys[key]), np.sort(lengths), rtol=1e-6)
    assert got["all"].size == sum(len(v) for v in expected.values())
    assert not any(k.startswith("H") and not k.endswith("H") for k in pair_keys)  # hydrogen last
    bad = graphs[0]
    bad = MolGraph(z=bad.z, atom_feat=bad.atom_feat, edge_index=torch.tensor([[0], [bad.num_atoms]]),
                   bond_type=torch.tensor([1]), pos=bad.pos)  # fmt: skip
    with pytest.raises(ValueError, match="molecule 0: bond indices outside"):
        bond_lengths([bad, *graphs])  # never a bond into the next molecule's atoms


def test_bond_length_distance(qm9_mol):
    graph = to_graph(qm9_mol)
    real = [p for p in positions(qm9_mol)]
    graphs = [graph] * len(real)
    same = bond_length_distance(graphs, real, real)
    assert same["bond_w1/all"] == pytest.approx(0.0) and same["bond_mad/all"] == pytest.approx(0.0)
    # Scaling a conformation scales every bond: W1 = MAD = 0.1 * mean real length.
    scaled = bond_length_distance(graphs, None, [1.1 * graph.pos.numpy()] * len(real))
    d_real = bond_lengths(graphs)["all"]
    assert scaled["bond_w1/all"] == pytest.approx(0.1 * d_real.mean(), rel=1e-4)
    assert scaled["bond_mad/all"] == pytest.approx(scaled["bond_w1/all"], rel=1e-6)
    assert {"bond_w1/C-H", "bond_w1/C-C", "bond_w1/single", "bond_w1/double"} <= set(scaled)
    # Noise: the paired MAD bounds W1; a broken conformation is counted, not fatal.
    rng = np.random.default_rng(4)
    broken = real[0].copy()
    broken[0] = np.nan
    noisy = [p + rng.normal(scale=0.1, size=p.shape) for p in real[1:]] + [broken]
    res = bond_length_distance(graphs, real, noisy, top_k=3)
    assert res["num_bonds"] == 4 * qm9_mol.GetNumBonds()
    assert res["num_bonds_nonfinite"] == qm9_mol.GetAtomWithIdx(0).GetDegree()
    assert 0 < res["bond_w1/all"] <= res["bond_mad/all"] + 1e-12
    assert len([k for k in res if k.startswith("bond_w1/") and k[8].isupper()]) == 3


# --------------------------------------------------------------------------------------------------
# Picture
# --------------------------------------------------------------------------------------------------


def test_draw_conformers_writes_a_png_atomically(tmp_path, qm9_mol):
    eth = embed("CCO", 2)
    q = positions(qm9_mol)
    broken = np.full_like(q[0], np.nan)
    path = tmp_path / "pics" / "conformers.png"
    out = draw_conformers([qm9_mol, to_graph(eth)], [[q[1], q[2], broken], positions(eth)[1]], path)
    assert out == path and path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    assert os.listdir(path.parent) == ["conformers.png"]
    # A failing drawing leaves the previous picture intact and no temporary file behind.
    before = path.read_bytes()
    with pytest.raises(ValueError):
        draw_conformers([qm9_mol], [q[0][:-1]], path)
    assert path.read_bytes() == before and os.listdir(path.parent) == ["conformers.png"]
    # Without a real conformer to overlay, and with titles.
    draw_conformers([qm9_mol], [q[0]], tmp_path / "plain.png", titles=["mine"], overlay=False)
    with Image.open(tmp_path / "plain.png") as im:
        assert im.format == "PNG"
