"""The conformer diffusion model (lit_modules.conformer_diffusion) on small RDKit-made molecules."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem
from torch.utils.data import DataLoader

from collapse.errors import ConfigError, UserError
from datamodules.mol_graph import BOND_CODES, HYBRID_CODES, MolGraph, collate_molecules
from lit_modules import conformer_diffusion
from lit_modules.conformer_diffusion import (
    GEODIFF_STEPS,
    ConformerDiffusionConfig,
    ConformerDiffusionModule,
    alpha_bar,
    atom_pairs,
    graphs_from_sample,
    reference_betas,
    remove_mean,
    respaced_timesteps,
)

SMILES = ("CCO", "c1ccccc1O", "CC(=O)N", "C#CC=O", "OCC1CC1")
TINY = {"hidden": 16, "num_layers": 2, "num_rbf": 8, "num_steps": 20, "eval_timesteps": 4, "warmup_steps": 0}


def mol_graph(smiles: str, mol_id: int = 0, seed: int = 0) -> MolGraph:
    """A :class:`MolGraph` of ``smiles`` with explicit hydrogens and one RDKit ETKDG conformer (fixed seed)."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise ValueError(f"RDKit could not embed {smiles}")
    feats = [
        [
            min(max(a.GetFormalCharge() + 2, 0), 4),
            HYBRID_CODES.get(str(a.GetHybridization()), 0),
            int(a.GetIsAromatic()),
            min(a.GetTotalNumHs(), 4),
            int(a.IsInRing()),
        ]
        for a in mol.GetAtoms()
    ]
    edges, types = [], []
    for bond in mol.GetBonds():
        i, j, code = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx(), BOND_CODES[str(bond.GetBondType())]
        edges += [(i, j), (j, i)]
        types += [code, code]
    graph = MolGraph(
        z=torch.tensor([a.GetAtomicNum() for a in mol.GetAtoms()]),
        atom_feat=torch.tensor(feats),
        edge_index=torch.tensor(edges).T.contiguous(),
        bond_type=torch.tensor(types),
        pos=torch.tensor(mol.GetConformer().GetPositions(), dtype=torch.float32),
        mol_id=mol_id,
        smiles=smiles,
    )
    graph.validate()
    return graph


@pytest.fixture(scope="module")
def graphs() -> list[MolGraph]:
    return [mol_graph(s, mol_id=10 + k) for k, s in enumerate(SMILES)]


def random_orthogonal(generator: torch.Generator, reflect: bool) -> torch.Tensor:
    """A random 3x3 orthogonal matrix (float64) with determinant -1 if ``reflect`` else +1."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


def per_molecule_com(pos: torch.Tensor, batch) -> torch.Tensor:
    """Centroid of each molecule of ``batch``: (B, 3)."""
    return torch.stack([p.mean(0) for p in batch.split_pos(pos)])


# ------------------------------------------------------------------------------------------ config, schedule


def test_config_checks_and_overrides():
    model = ConformerDiffusionModule(hidden=8, num_layers=1)
    assert model.hparams["hidden"] == 8 and model.config.num_steps == 100
    assert ConformerDiffusionConfig().schedule == "sigmoid"
    bad = [
        {"hidden": 0},
        {"cutoff": -1.0},
        {"schedule": "cosine"},
        {"on_broken": "ignore"},
        {"beta_start": 3e-3},
        {"sample_steps": 101},
        {"eval_timesteps": 0},
        {"max_resample": -1},
        {"weight_decay": float("nan")},
    ]
    for kwargs in bad:
        with pytest.raises(ConfigError, match="--model."):
            ConformerDiffusionConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown"):
        ConformerDiffusionModule(hiden=8)


def test_sigmoid_schedule_is_geodiffs_and_rescaled_keeps_total_noise():
    betas = reference_betas("sigmoid", 1e-7, 2e-3)  # GeoDiff: sigmoid(linspace(-6, 6, 5000)) (end - start) + start
    expected = 1 / (1 + np.exp(-np.linspace(-6, 6, GEODIFF_STEPS))) * (2e-3 - 1e-7) + 1e-7
    np.testing.assert_allclose(betas.numpy(), expected, rtol=1e-12)
    full = alpha_bar(GEODIFF_STEPS)
    np.testing.assert_allclose(full[1:].numpy(), np.cumprod(1 - expected), rtol=1e-10)
    short = alpha_bar(100)
    assert short[0] == 1 and math.isclose(short[-1], full[-1], rel_tol=1e-10)  # same total noise
    np.testing.assert_allclose(short.numpy(), full[::50].numpy(), rtol=1e-10)  # the 5000-step chain every 50 steps
    assert 0.005 < float(full[-1]) < 0.01  # ~exp(-5): GeoDiff's abar_T
    odd = alpha_bar(333)  # T not dividing 5000: log-linear interpolation, same end point
    assert math.isclose(odd[-1], full[-1], rel_tol=1e-10) and bool((odd[1:] < odd[:-1]).all())
    beta_t = ConformerDiffusionModule(num_steps=100).betas  # 1 - abar_t / abar_{t-1}
    assert beta_t.shape == (100,) and bool((beta_t > 0).all()) and bool((beta_t[1:] > beta_t[:-1]).all())
    # Sigmoid shape: half-way between the ends at the middle, flat tails (beta'' changes sign once).
    mid = (beta_t[0] + beta_t[-1]) / 2
    assert abs(float(beta_t[49] + beta_t[50]) / 2 - float(mid)) < 0.02 * float(beta_t[-1])
    assert float(beta_t[-1]) == pytest.approx(50 * 2e-3, rel=0.05)  # ~ 5000 / T times GeoDiff's last beta
    curvature = torch.sign(beta_t[2:] - 2 * beta_t[1:-1] + beta_t[:-2])
    assert (curvature[:40] > 0).all() and (curvature[-40:] < 0).all()
    assert respaced_timesteps(100, None) == list(range(101))
    assert respaced_timesteps(100, 3) == [0, 33, 67, 100]


def test_atom_pairs_match_brute_force(graphs):
    single = MolGraph(
        z=torch.tensor([17]),
        atom_feat=torch.zeros(1, 5, dtype=torch.long),
        edge_index=torch.zeros(2, 0, dtype=torch.long),
        bond_type=torch.zeros(0, dtype=torch.long),
        pos=torch.zeros(1, 3),
        mol_id=99,
    )
    batch = collate_molecules([graphs[0], single, graphs[1]])
    pairs = atom_pairs(batch)
    bonds = {(i, j): c for i, j, c in zip(*batch.edge_index.tolist(), batch.bond_type.tolist())}
    expected = [
        (i, j)
        for i in range(len(batch.batch))
        for j in range(len(batch.batch))
        if i != j and batch.batch[i] == batch.batch[j]
    ]
    got = list(zip(pairs.src.tolist(), pairs.dst.tolist()))
    assert sorted(got) == expected and len(set(got)) == len(got)
    assert [bonds.get(p, 0) for p in got] == pairs.bond.tolist()


# ------------------------------------------------------------------------------------------ symmetry


@pytest.mark.parametrize("reflect", [False, True])
def test_predicted_noise_is_e3_equivariant(graphs, reflect):
    torch.manual_seed(0)
    model = ConformerDiffusionModule(cutoff=3.0, **{k: v for k, v in TINY.items() if k != "hidden"}).double()
    batch = collate_molecules(graphs)
    gen = torch.Generator().manual_seed(1)
    # Noisy coordinates, so that some non-bonded pairs fall inside and some outside the cutoff.
    x = batch.pos.double() + 0.5 * torch.randn(batch.pos.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([3, 7, 11, 15, 19])
    q = random_orthogonal(gen, reflect)
    shift = 10 * torch.randn(3, generator=gen, dtype=torch.float64)
    eps = model(batch, x, t)  # (sumN, 3)
    eps_moved = model(batch, x @ q.T + shift, t)  # x -> Q x + b
    torch.testing.assert_close(eps_moved, eps @ q.T, rtol=1e-9, atol=1e-9)  # eps -> Q eps
    torch.testing.assert_close(model(batch, x + shift, t), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        per_molecule_com(eps, batch), torch.zeros(len(graphs), 3, dtype=torch.float64), atol=1e-12, rtol=0
    )
    assert eps.abs().sum() > 0


def test_all_pairs_give_the_noise_of_the_pairs_within_the_cutoff(graphs):
    # On a GPU every pair goes through the message passing (selecting the near ones would make the host wait for
    # the device); the pairs beyond the cutoff weigh 0, so the predicted noise is that of the CPU's selection.
    torch.manual_seed(0)
    model = ConformerDiffusionModule(cutoff=3.0, **TINY).double()
    batch = collate_molecules(graphs)
    gen = torch.Generator().manual_seed(1)
    x = batch.pos.double() + 0.5 * torch.randn(batch.pos.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([3, 7, 11, 15, 19])
    d = (x.index_select(0, atom_pairs(batch).src) - x.index_select(0, atom_pairs(batch).dst)).norm(dim=1)
    assert (d > 3.0).any() and (d < 3.0).any()  # some pairs on each side of the cutoff
    eps = {}
    for select in (True, False):
        model.denoiser.select_pairs = select
        eps[select] = model(batch, x, t)
    torch.testing.assert_close(eps[False], eps[True], rtol=1e-12, atol=1e-12)


def test_scatter_mean_counts_each_group_and_leaves_empty_groups_at_zero():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    means = conformer_diffusion.scatter_mean(values, torch.tensor([2, 0, 2]), 4)
    torch.testing.assert_close(means, torch.tensor([[3.0, 4.0], [0.0, 0.0], [3.0, 5.5], [0.0, 0.0]]))


def cutoff_crossing_change(model: ConformerDiffusionModule, graphs: list[MolGraph], delta: float) -> float:
    """Largest change of the predicted noise, relative to its largest entry, when one non-bonded atom pair
    of the phenol molecule goes from ``cutoff - delta`` to ``cutoff + delta`` apart (the other atoms fixed)."""
    batch = collate_molecules(graphs)
    pairs = atom_pairs(batch)
    x = batch.pos.double()
    cutoff = model.config.cutoff
    atoms = batch.batch == 1  # c1ccccc1O: several non-bonded pairs, room to put one at the cutoff

    def placed(i: int, j: int, distance: float) -> torch.Tensor:
        moved = x.clone()
        moved[i] = x[j] + distance * (x[i] - x[j]) / (x[i] - x[j]).norm()  # atom i slid along j -> i
        return moved

    def alone_at_cutoff(i: int, j: int) -> bool:
        # Only the pair (i, j) may lie near the cutoff, so that it is the one edge that enters or leaves the graph.
        gaps = ((placed(i, j, cutoff)[i] - x).norm(dim=1) - cutoff).abs()[atoms]
        return int((gaps < 0.05).sum()) == 1

    i, j = next(
        (int(a), int(b))
        for a, b, bond in zip(pairs.src, pairs.dst, pairs.bond)
        if bond == 0 and atoms[a] and alone_at_cutoff(int(a), int(b))
    )
    t = torch.tensor([3, 7, 11, 15, 19])
    with torch.no_grad():
        inside, outside = (model(batch, placed(i, j, cutoff + sign * delta), t) for sign in (-1, 1))
    return float((inside - outside).abs().max() / inside.abs().max())


def test_predicted_noise_is_continuous_across_the_cutoff(graphs, monkeypatch):
    torch.manual_seed(0)
    model = ConformerDiffusionModule(cutoff=5.0, **TINY).double()
    # The radius edge fades out: a pair 2e-4 Angstrom either side of the cutoff gives nearly the same noise.
    assert cutoff_crossing_change(model, graphs, 2e-4) < 1e-3
    # The same probe detects a hard cutoff (the edge switched on at full weight inside the radius).
    monkeypatch.setattr(conformer_diffusion, "cutoff_envelope", lambda dist, cutoff: (dist < cutoff).to(dist))
    assert cutoff_crossing_change(model, graphs, 2e-4) > 5e-3  # seen: 1.1e-4 smooth, 1.3e-2 hard


def test_losses_are_invariant_under_rigid_motion_of_data_and_noise(graphs):
    torch.manual_seed(0)
    model = ConformerDiffusionModule(**TINY).double()
    batch = collate_molecules(graphs)
    batch = batch.with_pos(batch.pos.double())
    gen = torch.Generator().manual_seed(2)
    q = random_orthogonal(gen, reflect=True)
    moved = batch.with_pos(batch.pos @ q.T + torch.tensor([3.0, -2.0, 5.0], dtype=torch.float64))
    t = torch.tensor([1, 5, 10, 15, 20])
    eps = model.zero_com_noise(batch, gen).double()
    torch.testing.assert_close(model.denoising_loss(moved, t, eps @ q.T), model.denoising_loss(batch, t, eps))
    # The fixed evaluation noise is not rotated with the data, but a translation leaves the test loss unchanged.
    shifted = batch.with_pos(batch.pos + 7.0)
    torch.testing.assert_close(model.eval_loss(shifted), model.eval_loss(batch))


def test_noising_and_every_sampling_step_stay_centred(graphs):
    torch.manual_seed(0)
    model = ConformerDiffusionModule(**TINY)
    batch = collate_molecules(graphs)
    eps = model.zero_com_noise(batch, torch.Generator().manual_seed(0))
    zeros = torch.zeros(len(graphs), 3)
    torch.testing.assert_close(per_molecule_com(eps, batch), zeros, atol=1e-6, rtol=0)
    x_t = model.noisy_coordinates(batch.with_pos(batch.pos + 4.0), torch.tensor([1, 5, 10, 15, 20]), eps)
    torch.testing.assert_close(per_molecule_com(x_t, batch), zeros, atol=1e-6, rtol=0)
    seen = []

    def check(t, x):
        seen.append(t)
        torch.testing.assert_close(per_molecule_com(x, batch), zeros, atol=1e-5, rtol=0)

    out = model.generate(batch, torch.Generator().manual_seed(0), callback=check)
    assert seen == list(range(19, -1, -1)) and out.dtype == torch.float32 and out.shape == batch.pos.shape
    seen.clear()
    model.generate(batch, torch.Generator().manual_seed(0), sample_steps=4, callback=check)
    assert seen == [15, 10, 5, 0]
    assert model.training  # the training flag is restored


# ------------------------------------------------------------------------------------------ evaluation loss


def test_test_loss_is_fixed_per_molecule_whatever_the_batching(graphs):
    torch.manual_seed(0)
    model = ConformerDiffusionModule(**TINY).eval()
    with torch.no_grad():
        together = model.eval_loss(collate_molecules(graphs))  # (5,)
        torch.manual_seed(123)  # the global RNG plays no part
        alone = torch.cat([model.eval_loss(collate_molecules([g])) for g in reversed(graphs)]).flip(0)
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)
    assert model.eval_timestep_values().tolist() == [3, 8, 13, 18]  # bin midpoints of 1..20

    # Through Lightning: the epoch mean weights batches by molecule count, so any batch size gives the exact mean.
    def test_loss(batch_size: int, order: list[int]) -> float:
        loader = DataLoader([graphs[k] for k in order], batch_size=batch_size, collate_fn=collate_molecules)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return trainer.test(model, loader, verbose=False)[0]["test_loss"]

    assert test_loss(2, [0, 1, 2, 3, 4]) == pytest.approx(float(together.mean()), rel=1e-5)
    assert test_loss(3, [4, 2, 0, 3, 1]) == pytest.approx(float(together.mean()), rel=1e-5)


# ------------------------------------------------------------------------------------------ sampling


def test_sample_shapes_padding_and_cycling(graphs):
    torch.manual_seed(0)
    model = ConformerDiffusionModule(**TINY, sample_steps=5, sample_batch_size=3)
    with pytest.raises(RuntimeError, match="configure_sampling"):
        model.sample(2, torch.Generator())
    chosen = graphs[:3]
    model.configure_sampling(chosen)
    out = model.sample(7, torch.Generator().manual_seed(0))
    max_atoms = max(g.num_atoms for g in chosen)
    assert out["pos"].shape == (7, max_atoms, 3) and out["pos"].dtype == np.float32
    assert out["mol_id"].dtype == np.int64 and out["mol_id"].tolist() == [10, 11, 12, 10, 11, 12, 10]
    assert out["num_atoms"].dtype == np.int32
    assert out["num_atoms"].tolist() == [chosen[i % 3].num_atoms for i in range(7)]
    assert out["resampled"].tolist() == [0] * 7 and not out["replaced_by_real"].any()
    for row, n in enumerate(out["num_atoms"]):
        assert (out["pos"][row, n:] == 0).all() and np.isfinite(out["pos"][row, :n]).all()
        np.testing.assert_allclose(out["pos"][row, :n].mean(0), 0, atol=1e-5)
    assert not np.allclose(out["pos"][0], out["pos"][3])  # a new conformer per row, not a copy
    again = model.sample(7, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(again["pos"], out["pos"])  # fixed seed and batch size: same conformers
    synthetic = graphs_from_sample(chosen, out)
    assert [g.mol_id for g in synthetic] == out["mol_id"].tolist()
    torch.testing.assert_close(synthetic[4].pos, torch.from_numpy(out["pos"][4, : chosen[1].num_atoms]))
    stored = np.concatenate([out["pos"][i, :n] for i, n in enumerate(out["num_atoms"])])  # as the store keeps it
    assert all(torch.equal(a.pos, b.pos) for a, b in zip(graphs_from_sample(chosen, {**out, "pos": stored}), synthetic))
    assert model.sample(0, torch.Generator())["pos"].shape == (0, max_atoms, 3)


def test_a_set_drawn_in_chunks_gives_every_graph_its_conformers(graphs, tmp_path):
    """Example i of the whole set is a conformation of graph i mod N, however the set is cut into chunks: the
    loop's chunks (of --sample_batch_size) each start where the one before ended, not at graph 0 again."""
    from callbacks.synthetic_data import SyntheticDataCallback
    from collapse.store import GenerationStore

    torch.manual_seed(0)
    model = ConformerDiffusionModule(**TINY, sample_steps=2, sample_batch_size=2)
    chosen = graphs[:5]
    model.configure_sampling(chosen)
    ids = [g.mol_id for g in chosen]
    part = model.sample_chunk(7, 4, torch.Generator().manual_seed(0))
    assert part["mol_id"].tolist() == [ids[(7 + i) % 5] for i in range(4)]
    assert part["num_atoms"].tolist() == [chosen[(7 + i) % 5].num_atoms for i in range(4)]
    store = GenerationStore(tmp_path / "run")
    SyntheticDataCallback(store, 0, num_samples=12, batch_size=3, seed=0).sample_into_store(model)  # 4 chunks
    mol_id = np.load(store.staging(0) / "mol_id.npy")
    num_atoms = np.load(store.staging(0) / "num_atoms.npy")
    assert mol_id.tolist() == [ids[i % 5] for i in range(12)]  # every graph, not graphs 0-2 four times
    assert num_atoms.tolist() == [chosen[i % 5].num_atoms for i in range(12)]
    with pytest.raises(ValueError, match="non-negative"):
        model.sample(2, torch.Generator(), start=-1)


class LazyGraphs:
    """A lazily indexed graph set, as the data module's training set: ``len``, ``[i]`` and a ``num_atoms`` array."""

    def __init__(self, graphs):
        self.graphs, self.built = graphs, []
        self.num_atoms = np.array([g.num_atoms for g in graphs], dtype=np.int64)

    def __len__(self):
        return len(self.graphs)

    def __getitem__(self, index):
        self.built.append(index)
        return self.graphs[index]


def test_a_lazily_indexed_graph_set_is_never_built_whole_and_samples_as_a_list(graphs):
    torch.manual_seed(0)
    model = ConformerDiffusionModule(**TINY, sample_steps=2, sample_batch_size=2)
    model.configure_sampling(list(graphs))
    listed = model.sample_chunk(3, 3, torch.Generator().manual_seed(5))
    lazy = LazyGraphs(list(graphs))
    model.configure_sampling(lazy)
    assert lazy.built == []  # nothing built when configured
    drawn = model.sample_chunk(3, 3, torch.Generator().manual_seed(5))
    assert sorted(lazy.built) == [0, 3, 4]  # only the graphs of the rows drawn, once each
    for key in listed:
        np.testing.assert_array_equal(drawn[key], listed[key])
    assert drawn["pos"].shape[1] == max(g.num_atoms for g in graphs)  # padded to the largest of the whole set


def test_broken_mask_flags_non_finite_and_exploded(graphs):
    model = ConformerDiffusionModule(**TINY, broken_threshold=50.0)
    batch = collate_molecules(graphs[:3])
    pos = batch.pos.clone() + 1000.0  # far away but intact: not broken (the check is after centring)
    assert model.broken_mask(pos, batch).tolist() == [False, False, False]
    parts = batch.split_pos(pos.clone())
    parts[0][1, 2] = float("nan")
    parts[2][0, 0] += 80.0
    assert model.broken_mask(torch.cat(parts), batch).tolist() == [True, False, True]


class FlakyGenerate:
    """Stands in for ``generate``: real coordinates plus a small offset, NaN for listed mol_ids.

    ``always`` stay broken on every draw, ``first`` only on their first draw (per row position).
    """

    def __init__(self, always: set[int], first: set[int]):
        self.always, self.first, self.calls = always, first, 0

    def __call__(self, batch, generator, sample_steps=None, callback=None):
        self.calls += 1
        pos = remove_mean(batch.pos, batch.batch, batch.num_graphs) + 0.01
        bad = set(self.always) | (set(self.first) if self.calls == 1 else set())
        rows = torch.tensor([m in bad for m in batch.mol_id.tolist()])[batch.batch]
        return torch.where(rows[:, None], torch.full_like(pos, float("nan")), pos)


@pytest.mark.parametrize("policy", ["resample", "real", "fail"])
def test_broken_conformer_policies(graphs, monkeypatch, policy):
    chosen = graphs[:3]  # mol_ids 10, 11, 12; rows 0..5 cycle through them
    model = ConformerDiffusionModule(**TINY, on_broken=policy, max_resample=2, sample_batch_size=6)
    model.configure_sampling(chosen)
    monkeypatch.setattr(model, "generate", FlakyGenerate(always={12}, first={11}))
    if policy == "fail":
        with pytest.raises(UserError, match="4 of 6 generated conformers were broken .* --model.on_broken resample"):
            model.sample(6, torch.Generator())
        assert model.last_sample_stats["broken_first_draw"] == 4
        return
    out = model.sample(6, torch.Generator())
    real_12 = (chosen[2].pos - chosen[2].pos.mean(0)).numpy()
    if policy == "resample":
        assert out["resampled"].tolist() == [0, 1, 2, 0, 1, 2]  # 11: redrawn once; 12: twice, then real
        assert out["replaced_by_real"].tolist() == [False, False, True] * 2
        assert model.last_sample_stats == {"broken_first_draw": 4, "resampled": 6, "replaced_by_real": 2}
        assert np.isfinite(out["pos"]).all()
    else:
        assert out["resampled"].tolist() == [0] * 6
        assert out["replaced_by_real"].tolist() == [False, True, True] * 2
        assert model.last_sample_stats == {"broken_first_draw": 4, "resampled": 0, "replaced_by_real": 4}
    np.testing.assert_allclose(out["pos"][2, : chosen[2].num_atoms], real_12, atol=1e-5)
    model.configure_sampling(chosen, real_pos_fallback=False)
    with pytest.raises(RuntimeError, match="real_pos_fallback=False"):
        model.sample(6, torch.Generator())


# ------------------------------------------------------------------------------------------ training


def test_tiny_overfit_lowers_the_loss(graphs):
    pl.seed_everything(0, verbose=False)
    chosen = graphs[:3]
    model = ConformerDiffusionModule(hidden=32, num_layers=2, num_steps=50, eval_timesteps=10, lr=5e-3, warmup_steps=10)
    batch = collate_molecules(chosen)
    with torch.no_grad():
        before = float(model.eval_loss(batch).mean())
    loader = DataLoader(chosen * 4, batch_size=12, collate_fn=collate_molecules)  # 3 molecules, one step per epoch
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=100,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():
        after = float(model.eval_loss(batch).mean())
    assert math.isfinite(trainer.callback_metrics["train_loss"].item())
    assert after < 0.7 * before, (before, after)  # seen: 1.28 -> 0.51
