"""Quality metrics and pictures for generated molecular conformations (GeoDiff / ConfGF protocol).

A conformation generator (e.g. GeoDiff) is given a molecular graph and samples 3-D coordinates.
It is scored against the molecule's real (reference) conformers with the RMSD after the best
rigid superposition, minimised over the molecule's symmetric atom relabellings:

    RMSD(C, C') = min_{pi in Aut(G)} min_{R in SO(3), t} sqrt( 1/n sum_i ||R c_pi(i) + t - c'_i||^2 )

computed by RDKit (``rdMolAlign.GetBestRMS`` and its all-pairs variant) on the atoms ``Chem.RemoveHs`` keeps
(heavy atoms, and the few hydrogens it keeps: isotopes, an imine H that fixes a C=N bond's stereo), as
GeoDiff does. From the RMSD matrix between generated conformers S_g and
reference conformers S_r of one molecule, with a threshold delta:

    COV-R = |{C in S_r : min_{C' in S_g} RMSD(C, C') <= delta}| / |S_r|     (recall coverage)
    MAT-R = 1/|S_r| sum_{C in S_r} min_{C' in S_g} RMSD(C, C')              (recall matching, Angstrom)
    COV-P, MAT-P: the same with the roles of S_g and S_r swapped          (precision versions)

Both are averaged over test molecules, and GeoDiff reports the mean and the median over molecules.
GeoDiff (after ConfGF) samples twice as many conformers as there are references for each molecule
(|S_g| = 2 |S_r|: 2 per QM9 molecule, which has one reference here); that choice is the caller's.
Thresholds are GeoDiff's: delta = 0.5 Angstrom on QM9, 1.25 Angstrom on GEOM-Drugs
(:data:`DEFAULT_THRESHOLDS`).

Broken samples never crash an evaluation: a generated conformer with a NaN or infinite coordinate
gets RMSD = inf (it covers nothing, and makes MAT-P infinite) and is counted.

Also here: the bond-length distribution distance between generated and real conformations
(exact 1-D Wasserstein-1, per bond type and per element pair), a plain Kabsch RMSD, and
:func:`draw_conformers`, a headless PNG of a few generated conformers over their real ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdMolAlign
from rdkit.Geometry import Point3D

from collapse.atomic import atomic_open

if TYPE_CHECKING:
    from datamodules.mol_graph import MolGraph

DEFAULT_THRESHOLDS = {"qm9": 0.5, "drugs": 1.25}
"""COV threshold delta (Angstrom) per data set, GeoDiff's."""
GEN_PER_REF = 2
"""GeoDiff / ConfGF generate this many conformers per reference conformer (a convention, not enforced)."""
DEFAULT_MAX_MATCHES = 10_000
"""Cap on the symmetric atom maps (graph automorphisms) RDKit tries per molecule.

``GetBestRMS`` enumerates every automorphism of the molecular graph (``SubstructMatch`` of the molecule
on itself, ``uniquify=False``) and aligns once per automorphism. Heavy-atom QM9 molecules have at
most a few dozen (neopentane: 4! = 24); drug-like ones usually hundreds (each tert-butyl x6, each
para-phenyl x2, each nitro/carboxylate x2); with hydrogens it explodes (neopentane: 24 * 6^4 = 31,104;
three tert-butyls: over 10^10). Each map costs about 2 microseconds per pair, so RDKit's own default of
1,000,000 means seconds per pair. Past the cap the result is the best RMSD over the first ``max_matches``
maps only: an upper bound of the true one, which can be far off (neopentane with H, two ETKDG conformers:
0.52 at the cap against 0.31 exact), so evaluate on heavy atoms. ``num_capped`` counts such molecules in
:func:`evaluate_conformers`."""

BOND_NAMES = {1: "single", 2: "double", 3: "triple", 4: "aromatic"}
"""Bond-type codes of :class:`~datamodules.mol_graph.MolGraph` and their names."""
BOND_SYMBOLS = {1: "-", 2: "=", 3: "#", 4: ":"}
"""SMILES bond symbols, used in element-pair keys (``C-H``, ``C=O``, ``C:C``)."""

_IDX_PROP = "_conformer_metrics_idx"
_PT = Chem.GetPeriodicTable()


# --------------------------------------------------------------------------------------------------
# Plain superposition
# --------------------------------------------------------------------------------------------------


def _as_array(pos: Any) -> np.ndarray:
    """Coordinates as a float64 [N, 3] array (numpy, lists or a torch tensor on any device)."""
    if hasattr(pos, "detach"):
        pos = pos.detach().cpu().numpy()
    arr = np.asarray(pos, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"coordinates must be [N, 3], got shape {arr.shape}")
    return arr


def kabsch_align(probe: Any, ref: Any) -> np.ndarray:
    """``probe`` [N, 3] rigidly moved onto ``ref`` [N, 3] (same atom order): the least-squares rotation and shift.

    Kabsch: centre both, H = P^T Q (3 x 3), H = U S V^T, R = V diag(1, 1, d) U^T with d = sign det(V U^T),
    so that R is a proper rotation (det +1; a reflection would turn a molecule into its mirror image).
    Returns R p_i + (mean q - R mean p), shape [N, 3]. Coordinates must be finite.
    """
    p, q = _as_array(probe), _as_array(ref)
    if p.shape != q.shape:
        raise ValueError(f"probe {p.shape} and reference {q.shape} coordinates differ in shape")
    pc, qc = p.mean(0), q.mean(0)
    h = (p - pc).T @ (q - qc)  # (3, 3)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T  # (3, 3), det +1
    return (p - pc) @ rot.T + qc


def kabsch_rmsd(probe: Any, ref: Any) -> float:
    """RMSD after the best rigid superposition, atoms paired by index (no symmetry): fast, an upper bound of
    :func:`conformer_rmsd`. Non-finite coordinates give ``inf``."""
    p, q = _as_array(probe), _as_array(ref)
    if not (np.isfinite(p).all() and np.isfinite(q).all()):
        return math.inf
    with np.errstate(over="ignore", invalid="ignore"):
        rmsd = float(np.sqrt(np.mean(np.sum((kabsch_align(p, q) - q) ** 2, axis=1))))
    return rmsd if math.isfinite(rmsd) else math.inf


# --------------------------------------------------------------------------------------------------
# Symmetry-aware RMSD (RDKit)
# --------------------------------------------------------------------------------------------------


def _template(mol: Chem.Mol, heavy_atoms_only: bool) -> tuple[Chem.Mol, np.ndarray]:
    """The molecule without conformers (hydrogens removed if asked) and the indices of its atoms in ``mol``.

    ``Chem.RemoveHs`` keeps the heavy atoms in their order, but it may keep some hydrogens (isotopes,
    H2, ...): each atom is tagged with its original index first, so the map is read back, not assumed.
    """
    base = Chem.Mol(mol)
    base.RemoveAllConformers()
    if not heavy_atoms_only:
        return base, np.arange(base.GetNumAtoms())
    for atom in base.GetAtoms():
        atom.SetIntProp(_IDX_PROP, atom.GetIdx())
    try:
        heavy = Chem.RemoveHs(base)
    except Exception:  # a molecule RDKit cannot sanitise: strip without sanitising
        heavy = Chem.RemoveHs(base, sanitize=False)
    keep = np.array([a.GetIntProp(_IDX_PROP) for a in heavy.GetAtoms()], dtype=np.int64)
    if keep.size == 0 or np.any(np.diff(keep) <= 0):
        raise ValueError("removing hydrogens did not keep the heavy atoms in order")
    return heavy, keep


def _with_conformers(template: Chem.Mol, pos_list: Sequence[np.ndarray]) -> Chem.Mol:
    """A copy of ``template`` holding one conformer per array, ids 0, 1, ..."""
    mol = Chem.Mol(template)
    for k, pos in enumerate(pos_list):
        conf = Chem.Conformer(mol.GetNumAtoms())
        if hasattr(conf, "SetPositions"):
            conf.SetPositions(np.ascontiguousarray(pos, dtype=np.float64))
        else:  # older RDKit
            for i, (x, y, z) in enumerate(np.asarray(pos, dtype=np.float64).tolist()):
                conf.SetAtomPosition(i, Point3D(x, y, z))
        conf.SetId(k)
        conf.Set3D(True)
        mol.AddConformer(conf, assignId=False)
    return mol


def _checked(mol: Chem.Mol, pos: Any, what: str) -> np.ndarray:
    arr = _as_array(pos)
    if arr.shape[0] != mol.GetNumAtoms():
        raise ValueError(f"{what} coordinates for {arr.shape[0]} atoms, the molecule has {mol.GetNumAtoms()}")
    return arr


def conformer_rmsd(
    mol: Chem.Mol,
    probe_pos: Any,
    ref_pos: Any,
    heavy_atoms_only: bool = True,
    max_matches: int = DEFAULT_MAX_MATCHES,
) -> float:
    """Best-alignment RMSD (Angstrom) between two conformations of ``mol``, minimised over its symmetric atom maps.

    ``probe_pos`` and ``ref_pos`` are [N, 3] in the atom order of ``mol`` (with its hydrogens); with
    ``heavy_atoms_only`` (GeoDiff's protocol) only the atoms ``Chem.RemoveHs`` keeps are compared.
    ``rdMolAlign.GetBestRMS`` runs on fresh copies (it moves the probe as a side effect), trying at most
    ``max_matches`` automorphisms (see :data:`DEFAULT_MAX_MATCHES`). No reflections: a mirror image
    scores > 0. A probe with a NaN / infinite coordinate gives ``inf``; a non-finite reference is an error.
    """
    probe, ref = _checked(mol, probe_pos, "probe"), _checked(mol, ref_pos, "reference")
    if not np.isfinite(ref).all():
        raise ValueError("reference coordinates must be finite")
    if not np.isfinite(probe).all():
        return math.inf
    template, keep = _template(mol, heavy_atoms_only)
    prb_mol, ref_mol = _with_conformers(template, [probe[keep]]), _with_conformers(template, [ref[keep]])
    rmsd = rdMolAlign.GetBestRMS(prb_mol, ref_mol, maxMatches=int(max_matches))
    return rmsd if math.isfinite(rmsd) else math.inf


def _count_matches(template: Chem.Mol, limit: int) -> int:
    return len(template.GetSubstructMatches(template, uniquify=False, useChirality=False, maxMatches=int(limit)))


def count_symmetries(mol: Chem.Mol, heavy_atoms_only: bool = True, limit: int = DEFAULT_MAX_MATCHES) -> int:
    """Number of automorphisms of the molecular graph (atom maps RDKit aligns over), counted up to ``limit``.

    Without RDKit's symmetrisation of conjugated terminal groups (nitro, carboxylate: their two oxygens
    are made equivalent), which can double the count per group: a lower bound of what ``GetBestRMS`` tries.
    """
    return _count_matches(_template(mol, heavy_atoms_only)[0], limit)


def _rmsd_matrix(
    mol: Chem.Mol, gen_pos_list: Sequence[Any], ref_pos_list: Sequence[Any], heavy_atoms_only: bool, max_matches: int
) -> tuple[np.ndarray, bool]:
    """:func:`rmsd_matrix` and whether the automorphism cap was reached."""
    gens = [_checked(mol, p, "generated") for p in gen_pos_list]
    refs = [_checked(mol, p, "reference") for p in ref_pos_list]
    if not refs:
        raise ValueError("no reference conformers")
    if not all(np.isfinite(r).all() for r in refs):
        raise ValueError("reference coordinates must be finite")
    template, keep = _template(mol, heavy_atoms_only)
    capped = _count_matches(template, max_matches) >= max_matches
    out = np.full((len(gens), len(refs)), np.inf)
    ok = [k for k, g in enumerate(gens) if np.isfinite(g).all()]
    if not ok:
        return out, capped
    prb_mol = _with_conformers(template, [gens[k][keep] for k in ok])
    ref_mol = _with_conformers(template, [r[keep] for r in refs])
    sub = None
    has_hydrogen = any(atom.GetAtomicNum() == 1 for atom in template.GetAtoms())
    if not has_hydrogen and not capped and hasattr(rdMolAlign, "GetAllConformerBestRMSToRef"):
        # All pairs in C++, automorphisms enumerated once. Its ``params`` argument does not accept
        # ``rdMolAlign.BestAlignmentParams`` objects (a binding bug, RDKit 2026.09), so it runs with the
        # defaults: maxMatches = 1e6, which is safe here as the molecule has fewer than ``max_matches``
        # automorphisms, and ignoreHs, which would drop the hydrogens ``Chem.RemoveHs`` keeps (an
        # isotope, an imine H that fixes a C=N bond's stereo) while ``GetBestRMS`` counts them: so only
        # templates without any hydrogen come here. Flat, reference-major: [(ref 0, gen 0), (ref 0, gen 1), ...].
        try:
            vals = rdMolAlign.GetAllConformerBestRMSToRef(prb_mol, ref_mol)
            sub = np.asarray(vals, dtype=np.float64).reshape(len(refs), len(ok)).T
        except (RuntimeError, TypeError, ValueError):
            sub = None
    if sub is None:
        # Pair by pair: GetBestRMS enumerates the automorphisms (at most ``max_matches``) on every call and
        # moves probe conformer g rigidly onto reference r, which leaves later RMSDs of g unchanged.
        sub = np.array(
            [
                [rdMolAlign.GetBestRMS(prb_mol, ref_mol, g, r, maxMatches=int(max_matches)) for r in range(len(refs))]
                for g in range(len(ok))
            ],
            dtype=np.float64,
        )
    out[ok] = np.where(np.isfinite(sub), sub, np.inf)
    return out, capped


def rmsd_matrix(
    mol: Chem.Mol,
    gen_pos_list: Sequence[Any],
    ref_pos_list: Sequence[Any],
    heavy_atoms_only: bool = True,
    max_matches: int = DEFAULT_MAX_MATCHES,
) -> np.ndarray:
    """Symmetry-aware RMSD between every generated and every reference conformer: shape [G, R], Angstrom.

    The numbers of :func:`conformer_rmsd` pair by pair (same atoms, same automorphisms, below the cap).
    Molecules left with no hydrogen atom (after ``Chem.RemoveHs`` when ``heavy_atoms_only``) and fewer
    than ``max_matches`` automorphisms go through ``rdMolAlign.GetAllConformerBestRMSToRef``
    (automorphisms enumerated once per molecule, about 2x faster on drug-sized molecules); the others,
    including those where ``RemoveHs`` keeps a hydrogen (that call would ignore it), pair by pair through
    ``GetBestRMS``. Rows of generated conformers with a non-finite coordinate are ``inf``.
    """
    return _rmsd_matrix(mol, gen_pos_list, ref_pos_list, heavy_atoms_only, max_matches)[0]


# --------------------------------------------------------------------------------------------------
# Coverage and matching
# --------------------------------------------------------------------------------------------------


def coverage_from_rmsd(rmsd: Any, threshold: float) -> dict[str, float]:
    """COV-R, MAT-R, COV-P, MAT-P of one molecule from its RMSD matrix [G generated, R reference].

    ``cov_r`` = fraction of references whose nearest generated conformer is within ``threshold``
    (``<=``, as GeoDiff), ``mat_r`` = mean over references of that nearest RMSD; ``cov_p`` / ``mat_p``
    the same over generated conformers (nearest reference). ``inf`` entries (broken samples) never
    count as covered; they make ``mat_p`` infinite, and ``mat_r`` too if every sample is broken.
    """
    d = np.asarray(rmsd, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] == 0 or d.shape[1] == 0:
        raise ValueError(f"an RMSD matrix [G >= 1, R >= 1] is needed, got shape {d.shape}")
    d = np.where(np.isnan(d), np.inf, d)
    ref_min, gen_min = d.min(axis=0), d.min(axis=1)  # (R,), (G,)
    return {
        "cov_r": float(np.mean(ref_min <= threshold)),
        "mat_r": float(np.mean(ref_min)),
        "cov_p": float(np.mean(gen_min <= threshold)),
        "mat_p": float(np.mean(gen_min)),
    }


def coverage_matching(
    mol: Chem.Mol,
    gen_pos_list: Sequence[Any],
    ref_pos_list: Sequence[Any],
    threshold: float,
    heavy_atoms_only: bool = True,
    max_matches: int = DEFAULT_MAX_MATCHES,
) -> dict[str, float]:
    """COV/MAT (recall and precision) of one molecule's generated conformers against its references.

    Returns :func:`coverage_from_rmsd` of :func:`rmsd_matrix`, plus ``num_generated``, ``num_references``,
    ``num_nonfinite`` (generated conformers with a NaN / infinite coordinate, scored RMSD = inf) and
    ``num_capped`` (1 if the molecule has at least ``max_matches`` automorphisms: RMSDs are upper bounds).
    ``threshold``: see :data:`DEFAULT_THRESHOLDS`.
    """
    if not gen_pos_list:
        raise ValueError("no generated conformers")
    d, capped = _rmsd_matrix(mol, gen_pos_list, ref_pos_list, heavy_atoms_only, max_matches)
    out: dict[str, float] = coverage_from_rmsd(d, threshold)
    out["num_generated"] = len(gen_pos_list)
    out["num_references"] = len(ref_pos_list)
    out["num_nonfinite"] = int(sum(not np.isfinite(_as_array(p)).all() for p in gen_pos_list))
    out["num_capped"] = int(capped)
    return out


def evaluate_conformers(
    items: Iterable[tuple[Chem.Mol, Sequence[Any], Sequence[Any]]],
    threshold: float = DEFAULT_THRESHOLDS["qm9"],
    heavy_atoms_only: bool = True,
    max_matches: int = DEFAULT_MAX_MATCHES,
) -> dict[str, float]:
    """COV/MAT over a test set: ``items`` yields ``(mol, generated pos list, reference pos list)`` per molecule.

    Returns the mean and the median over molecules of ``cov_r``, ``mat_r``, ``cov_p``, ``mat_p``
    (keys ``cov_r_mean``, ``cov_r_median``, ...), ``threshold``, and counts: ``num_molecules``,
    ``num_generated``, ``num_references``, ``num_nonfinite`` (broken generated conformers) and
    ``num_capped`` (molecules with at least ``max_matches`` automorphisms, whose RMSDs are upper bounds).
    GeoDiff's protocol: 2 generated conformers per reference (:data:`GEN_PER_REF`), heavy atoms only.
    """
    per_mol: dict[str, list[float]] = {"cov_r": [], "mat_r": [], "cov_p": [], "mat_p": []}
    counts = {"num_molecules": 0, "num_generated": 0, "num_references": 0, "num_nonfinite": 0, "num_capped": 0}
    for mol, gen_pos_list, ref_pos_list in items:
        res = coverage_matching(mol, gen_pos_list, ref_pos_list, threshold, heavy_atoms_only, max_matches)
        for key, values in per_mol.items():
            values.append(res[key])
        counts["num_molecules"] += 1
        for key in ("num_generated", "num_references", "num_nonfinite", "num_capped"):
            counts[key] += int(res[key])
    if not counts["num_molecules"]:
        raise ValueError("no molecules to evaluate")
    out: dict[str, float] = {"threshold": float(threshold)}
    for key, values in per_mol.items():
        arr = np.asarray(values)
        with np.errstate(invalid="ignore"):  # inf - inf inside the median of infinite values
            out[f"{key}_mean"] = float(np.mean(arr))
            out[f"{key}_median"] = float(np.median(arr))
    out.update(counts)
    return out


# --------------------------------------------------------------------------------------------------
# Bond lengths
# --------------------------------------------------------------------------------------------------


def wasserstein_1d(u: Any, v: Any) -> float:
    """Exact Wasserstein-1 distance between the empirical distributions of two 1-D samples (equal weights).

    W1 = integral |F_u(x) - F_v(x)| dx, evaluated exactly between consecutive points of the pooled sorted
    samples (the CDFs are step functions); for equal sizes it is mean |u_(i) - v_(i)| of the sorted samples.
    Same units as the samples; ``nan`` if either sample is empty.
    """
    u = np.sort(np.asarray(u, dtype=np.float64).ravel())
    v = np.sort(np.asarray(v, dtype=np.float64).ravel())
    if u.size == 0 or v.size == 0:
        return math.nan
    pooled = np.sort(np.concatenate([u, v]))
    widths = np.diff(pooled)  # (n + m - 1,)
    # Empirical CDFs on each interval [pooled_k, pooled_k+1).
    cdf_u = np.searchsorted(u, pooled[:-1], side="right") / u.size
    cdf_v = np.searchsorted(v, pooled[:-1], side="right") / v.size
    return float(np.sum(np.abs(cdf_u - cdf_v) * widths))


def _element_pair_key(za: int, zb: int, code: int) -> str:
    """``C-H``, ``C=O``, ``C:C``: heavy elements by atomic number, hydrogen last, SMILES bond symbol between."""
    a, b = sorted((int(za), int(zb)), key=lambda z: (z == 1, z))
    return f"{_PT.GetElementSymbol(a)}{BOND_SYMBOLS.get(int(code), '~')}{_PT.GetElementSymbol(b)}"


def _bond_table(
    graphs: Sequence[MolGraph], pos_list: Sequence[Any] | None
) -> tuple[np.ndarray, np.ndarray, dict[int, str], np.ndarray]:
    """Every bond of every graph once: (bond-type code [B], element-pair id [B], the ids' keys, length [B] in Angstrom).

    Bonds come from ``edge_index`` (each unordered pair once, whichever directions are stored), skipping
    code-0 edges (non-bonded edges a model may add), graph by graph and in (i, j) order within a graph.
    The element-pair key of an id is :func:`_element_pair_key`'s (``C-H``, ``C=O``). Lengths may be
    non-finite for broken coordinates. All graphs at once in NumPy (no Python work per bond): a
    published-size synthetic set has millions of bonds.
    """
    if pos_list is not None and len(pos_list) != len(graphs):
        raise ValueError(f"{len(pos_list)} coordinate arrays for {len(graphs)} graphs")
    zs, edges, types, coords = [], [], [], []
    offset = 0
    for k, g in enumerate(graphs):
        pos = _as_array(g.pos if pos_list is None else pos_list[k])
        n = g.num_atoms
        if pos.shape[0] != n:
            raise ValueError(f"molecule {k}: {pos.shape[0]} coordinates for {n} atoms")
        ei = np.asarray(g.edge_index, dtype=np.int64).reshape(2, -1)
        if ei.size and (ei.min() < 0 or ei.max() >= n):  # would point into the next graph's atoms once offset
            raise ValueError(f"molecule {k}: bond indices outside 0..{n - 1}")
        zs.append(np.asarray(g.z, dtype=np.int64).reshape(-1))
        edges.append(ei + offset)
        types.append(np.asarray(g.bond_type, dtype=np.int64).reshape(-1))
        coords.append(np.asarray(pos, dtype=np.float64).reshape(n, 3))
        offset += n
    if not zs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), {}, np.zeros(0)
    z, ei, bt, pos = np.concatenate(zs), np.concatenate(edges, axis=1), np.concatenate(types), np.concatenate(coords)
    low, high = ei.min(0), ei.max(0)  # (E,) each unordered pair as i <= j (atoms numbered across all graphs)
    # Each pair once: its first stored edge (a stable sort), in graph order and (i, j) order within a graph.
    _, first = np.unique(low * offset + high, return_index=True)
    i, j, bt = low[first], high[first], bt[first]
    keep = (bt != 0) & (i != j)
    i, j, bt = i[keep], j[keep], bt[keep]
    with np.errstate(over="ignore", invalid="ignore"):
        d = np.linalg.norm(pos[i] - pos[j], axis=1)  # (B,)
    za, zb = z[i], z[j]
    swap = ((za == 1) & (zb != 1)) | (((za == 1) == (zb == 1)) & (za > zb))  # heavy first, then by atomic number
    a, b = np.where(swap, zb, za), np.where(swap, za, zb)
    pair_id = (a * 256 + b) * 256 + bt
    names = {int(p): _element_pair_key(p // 65536, (p // 256) % 256, p % 256) for p in np.unique(pair_id)}
    return bt, pair_id, names, d


def _groups(codes: np.ndarray, pair_ids: np.ndarray, names: dict[int, str]) -> dict[str, np.ndarray]:
    """Boolean masks: ``all``, one per bond type present (``single`` ...), one per element-pair key."""
    groups = {"all": np.ones(codes.shape, bool)}
    for code, name in BOND_NAMES.items():
        if np.any(codes == code):
            groups[name] = codes == code
    by_key: dict[str, np.ndarray] = {}
    for pair, key in names.items():  # ids of bond codes without a symbol share the key "~"
        by_key[key] = by_key[key] | (pair_ids == pair) if key in by_key else pair_ids == pair
    for key in sorted(by_key):
        groups[key] = by_key[key]
    return groups


def bond_lengths(graphs: Sequence[MolGraph], pos_list: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
    """Bonded distances (Angstrom) of a set of conformations, grouped.

    ``graphs``: :class:`~datamodules.mol_graph.MolGraph` list; ``pos_list``: one [N, 3] array per graph
    (default: each graph's own ``pos``). Keys: ``all``; per bond type ``single``, ``double``, ``triple``,
    ``aromatic``; per element pair and type with SMILES bond symbols, heavy atoms first: ``C-H``, ``C-C``,
    ``C=O``, ``C:C``, ``N-H``, ``O-H`` ... Non-finite lengths (broken coordinates) are dropped.
    """
    codes, pair_ids, names, d = _bond_table(graphs, pos_list)
    finite = np.isfinite(d)
    return {key: d[mask & finite] for key, mask in _groups(codes, pair_ids, names).items()}


def bond_length_distance(
    graphs: Sequence[MolGraph],
    real_pos: Sequence[Any] | None,
    gen_pos: Sequence[Any],
    top_k: int = 6,
) -> dict[str, float]:
    """How far generated bond lengths are from real ones, overall, per bond type and per common element pair.

    ``gen_pos[k]`` is a generated conformation of ``graphs[k]`` and ``real_pos[k]`` its real one (``None``:
    the graphs' own ``pos``); repeat a graph once per generated conformer. Keys (Angstrom):

    - ``bond_w1/<group>``: exact Wasserstein-1 distance between the generated and the real bond-length
      distributions (:func:`wasserstein_1d`), for ``all``, each bond type present (``single`` ...) and
      the ``top_k`` element pairs most frequent among real bonds (``C-H``, ``C-C``, ...);
    - ``bond_mad/<group>``: mean |d_generated - d_real| over the same bonds, paired one to one. Always
      >= ``bond_w1`` of that group (the pairing is one coupling; W1 is the cheapest);
    - ``num_bonds`` (real bonds), ``num_bonds_nonfinite`` (generated lengths that are NaN / infinite,
      left out of both). A group whose generated lengths are all non-finite scores ``nan``.
    """
    if len(gen_pos) != len(graphs):
        raise ValueError(f"{len(gen_pos)} generated conformations for {len(graphs)} graphs")
    codes, pair_ids, names, d_real = _bond_table(graphs, real_pos)
    d_gen = _bond_table(graphs, gen_pos)[3]
    if not np.isfinite(d_real).all():
        raise ValueError("real coordinates must be finite")
    ok = np.isfinite(d_gen)
    groups = _groups(codes, pair_ids, names)
    pair_keys = [k for k in groups if k != "all" and k not in BOND_NAMES.values()]
    common = sorted(pair_keys, key=lambda k: (-int(groups[k].sum()), k))[: max(0, int(top_k))]
    out: dict[str, float] = {}
    for name in ["all", *[n for n in BOND_NAMES.values() if n in groups], *common]:
        mask = groups[name]
        both = mask & ok
        out[f"bond_w1/{name}"] = wasserstein_1d(d_real[mask], d_gen[both]) if both.any() else math.nan
        out[f"bond_mad/{name}"] = float(np.mean(np.abs(d_gen[both] - d_real[both]))) if both.any() else math.nan
    out["num_bonds"] = int(d_real.size)
    out["num_bonds_nonfinite"] = int((~ok).sum())
    return out


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------

# CPK-like colours (Jmol palette, softened); anything else is pink.
_CPK = {1: "#f2f2f2", 5: "#ffb5b5", 6: "#505050", 7: "#3050f8", 8: "#ff0d0d", 9: "#90e050", 15: "#ff8000",
        16: "#e6c200", 17: "#1ff01f", 35: "#a62929", 53: "#940094"}  # fmt: skip


def _mol_parts(m: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str, Chem.Mol | None]:
    """(atomic numbers [N], bonds [B, 2], own coordinates or None, SMILES, RDKit mol or None) of a mol or graph."""
    if isinstance(m, Chem.Mol):
        z = np.array([a.GetAtomicNum() for a in m.GetAtoms()], dtype=np.int64)
        bonds = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in m.GetBonds()], dtype=np.int64)
        own = m.GetConformer().GetPositions() if m.GetNumConformers() else None
        try:
            smiles = Chem.MolToSmiles(Chem.RemoveHs(m))
        except Exception:
            smiles = Chem.MolToSmiles(m)
        return z, bonds.reshape(-1, 2), own, smiles, m
    z = np.asarray(m.z, dtype=np.int64).reshape(-1)
    ei = np.asarray(m.edge_index, dtype=np.int64).reshape(2, -1)
    bonds = np.unique(np.stack([ei.min(0), ei.max(0)], axis=1), axis=0)
    return z, bonds, _as_array(m.pos), getattr(m, "smiles", ""), None


def _draw_panel(ax: Any, z: np.ndarray, bonds: np.ndarray, gen: np.ndarray, ref: np.ndarray | None) -> None:
    """Ball-and-stick of ``gen`` (CPK colours) over ``ref`` (grey), projected on the principal axes of the frame."""
    from matplotlib.collections import LineCollection

    frame = ref if ref is not None else gen
    centre = frame.mean(0)
    # Principal axes of the frame molecule, then tilted 30 degrees about the longest one: looking straight
    # down the thinnest axis would hide out-of-plane differences (a flipped ring pucker, a mirrored centre).
    _, _, vt = np.linalg.svd(frame - centre, full_matrices=False)
    axes3 = vt.T if vt.shape[0] == 3 else np.eye(3)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    view = axes3 @ np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])  # (3, 3)

    def project(x: np.ndarray) -> np.ndarray:
        return (x - centre) @ view  # (N, 3): x, y on screen, depth

    heavy = z != 1
    size = np.where(heavy, 90.0, 30.0)
    for coords, is_ref in ((ref, True), (gen, False)):
        if coords is None:
            continue
        xy = project(coords)
        segs = np.stack([xy[bonds[:, 0], :2], xy[bonds[:, 1], :2]], axis=1) if bonds.size else np.zeros((0, 2, 2))
        ax.add_collection(
            LineCollection(segs, colors="0.7" if is_ref else "0.25", linewidths=2.5 if is_ref else 1.6,
                           alpha=0.6 if is_ref else 1.0, zorder=1 if is_ref else 3)
        )  # fmt: skip
        order = np.argsort(xy[:, 2])  # far atoms first, near ones painted over them
        colours = ["0.75" if is_ref else _CPK.get(int(zz), "#ff69b4") for zz in z[order]]
        ax.scatter(xy[order, 0], xy[order, 1], s=size[order] * (1.3 if is_ref else 1.0), c=colours,
                   edgecolors="0.6" if is_ref else "0.15", linewidths=0.5, alpha=0.5 if is_ref else 1.0,
                   zorder=2 if is_ref else 4)  # fmt: skip
    ax.set_aspect("equal", adjustable="datalim")
    ax.autoscale_view()


def draw_conformers(
    mols: Sequence[Any],
    pos_lists: Sequence[Any],
    path: str | Path,
    titles: Sequence[str] | None = None,
    max_mols: int = 6,
    max_confs: int = 3,
    ref_pos: Sequence[Any] | None = None,
    overlay: bool = True,
) -> Path:
    """Write a PNG of generated conformers: one row per molecule (at most ``max_mols``), one panel per conformer.

    ``mols``: RDKit molecules (atoms in the coordinates' order) or :class:`~datamodules.mol_graph.MolGraph`;
    ``pos_lists[i]``: one [N, 3] array or a list of them (the first ``max_confs`` are drawn). Each panel is
    a ball-and-stick projection on the principal axes, atoms in CPK colours, hydrogens smaller; with
    ``overlay`` the real conformer (``ref_pos[i]``, default the molecule's own coordinates: conformer 0 of
    an RDKit mol, ``pos`` of a graph) is drawn in grey underneath, the generated one Kabsch-aligned onto it.
    Titles: ``titles[i]`` or the SMILES, and the RMSD to the real conformer (symmetry-aware heavy-atom
    :func:`conformer_rmsd` for RDKit mols, heavy-atom :func:`kabsch_rmsd` for graphs). Headless (Agg
    canvas, no pyplot) and atomic (:func:`collapse.atomic.atomic_open`). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_mols = min(len(mols), int(max_mols))
    if n_mols == 0:
        raise ValueError("no molecules to draw")
    # One [N, 3] array, or a list / [K, N, 3] stack of them, per molecule.
    confs = [([p] if getattr(p, "ndim", np.ndim(p)) == 2 else list(p))[: int(max_confs)] for p in pos_lists[:n_mols]]
    cols = max(1, max(len(c) for c in confs))
    # One conformer per molecule: molecules wrap into rows of up to 3 panels; else one row per molecule.
    wrap = min(3, n_mols) if cols == 1 else cols
    grid_rows = -(-n_mols // wrap) if cols == 1 else n_mols
    panel = 2.8  # inches
    fig = Figure(figsize=(panel * wrap, (panel + 0.25) * grid_rows), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.subplots(grid_rows, wrap, squeeze=False)
    if cols == 1:
        flat = list(grid.flat)
        for ax in flat[n_mols:]:
            ax.set_axis_off()
        axes = np.array(flat[:n_mols], dtype=object).reshape(n_mols, 1)
    else:
        axes = grid
    for i in range(n_mols):
        z, bonds, own, smiles, rd_mol = _mol_parts(mols[i])
        ref = _as_array(ref_pos[i]) if ref_pos is not None else own
        if not overlay or ref is None or not np.isfinite(ref).all():
            ref = None
        label = titles[i] if titles is not None else smiles
        for j in range(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(confs[i]):
                ax.set_axis_off()
                continue
            gen = _as_array(confs[i][j])
            head = f"{label}\n" if j == 0 and label else "\n"
            if gen.shape[0] != z.size:
                raise ValueError(f"molecule {i}: {gen.shape[0]} coordinates for {z.size} atoms")
            if not np.isfinite(gen).all():
                ax.text(0.5, 0.5, "non-finite\ncoordinates", ha="center", va="center", transform=ax.transAxes)
                ax.set_title(f"{head}conf {j}: broken", fontsize=8)
                continue
            if ref is not None:
                if rd_mol is not None:
                    rmsd, what = conformer_rmsd(rd_mol, gen, ref), "RMSD"
                else:
                    heavy = z != 1
                    rmsd, what = kabsch_rmsd(gen[heavy], ref[heavy]), "Kabsch RMSD"
                gen = kabsch_align(gen, ref)
                ax.set_title(f"{head}conf {j}: {what} {rmsd:.2f} \u00c5", fontsize=8)
            else:
                ax.set_title(f"{head}conf {j}", fontsize=8)
            _draw_panel(ax, z, bonds, gen, ref)
    height = (panel + 0.25) * grid_rows
    if overlay:
        fig.text(0.5, 0.1 / height, "coloured: generated (Kabsch-aligned); grey: real", ha="center", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.3 / height, top=1 - 0.45 / height, hspace=0.35)
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png")
    return path


__all__ = [
    "BOND_NAMES",
    "BOND_SYMBOLS",
    "DEFAULT_MAX_MATCHES",
    "DEFAULT_THRESHOLDS",
    "GEN_PER_REF",
    "bond_length_distance",
    "bond_lengths",
    "conformer_rmsd",
    "count_symmetries",
    "coverage_from_rmsd",
    "coverage_matching",
    "draw_conformers",
    "evaluate_conformers",
    "kabsch_align",
    "kabsch_rmsd",
    "rmsd_matrix",
    "wasserstein_1d",
]
