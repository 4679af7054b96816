"""The generation data module: the workflow's real + synthetic mix, read lazily from the store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collapse.contract import RealDataModule
from collapse.errors import UserError
from collapse.seeding import derive_seed
from collapse.store import GenerationStore, StoreError
from datamodules.base import RealDataModuleBase
from datamodules.synthetic import ShuffledShardSampler, SyntheticAccumulatingDataModule, WorkflowDataset
from datamodules.toy import GaussianPointsDataModule, PointsDataset
from datamodules.workflows import REAL, Workflow, WorkflowError

N = 20  # real set size at generation 0
GENERATIONS = 3

# workflow -> (training-set size, real examples in it) at generations 0, 1, 2 for N = 20
EXPECTED = {
    "replace": ([20, 20, 20], [20, 0, 0]),
    "accumulate": ([20, 40, 60], [20, 20, 20]),
    "accumulate_subsample(size=20)": ([20, 20, 20], None),  # real share of g > 0 is a random draw
    "replace_multiple(multiplier=2)": ([20, 40, 40], [20, 0, 0]),
    "mix(real=10, synthetic=30)": ([10, 40, 40], [10, 10, 10]),
    "fresh_real(per_generation=10)": ([20, 50, 80], [20, 30, 40]),
}


def synthetic_rows(generation: int, n: int) -> np.ndarray:
    """Rows of synthetic set g that name themselves: (100 + g, row), far from any real point."""
    return np.stack([np.full(n, 100.0 + generation), np.arange(n, dtype=np.float64)], axis=1).astype(np.float32)


def make_store(root, workflow: Workflow, generations: int = GENERATIONS - 1) -> GenerationStore:
    """A store with synthetic sets 0 .. generations-1 of the workflow's size (no models needed)."""
    store = GenerationStore(root)
    size = workflow.synthetic_size(N)
    for g in range(generations):
        store.save_array(g, "samples", synthetic_rows(g, size))
        store.commit(g, num_samples=size, sampling={"test": True}, sample_arrays=["samples"])
    return store


@pytest.fixture(scope="module")
def real() -> GaussianPointsDataModule:
    dm = GaussianPointsDataModule(num_train=200, num_val=24, num_test=40, seed=3)
    dm.setup("fit")
    return dm


def identify(item: torch.Tensor, real_index: dict[tuple[float, float], int]) -> tuple[int, int]:
    """(source, row) of a training item: synthetic items carry it, real ones are looked up."""
    x, y = (float(v) for v in item)
    if x >= 100:
        return int(round(x - 100)), int(round(y))
    return REAL, real_index[(x, y)]


def real_index_of(real: GaussianPointsDataModule) -> dict[tuple[float, float], int]:
    points = real.train_dataset.points
    return {(float(a), float(b)): i for i, (a, b) in enumerate(points)}


@pytest.mark.parametrize("spec", list(EXPECTED))
def test_training_set_matches_the_workflow(tmp_path, real, spec):
    wf = Workflow.parse(spec)
    store = make_store(tmp_path, wf)
    sizes, reals = EXPECTED[spec]
    index = real_index_of(real)
    for g in range(GENERATIONS):
        dm = SyntheticAccumulatingDataModule(real, wf, store, g, real_size=N, seed=7, batch_size=8)
        dm.setup("fit")
        comp = dm.train_composition()
        assert comp["train_size"] == sizes[g] == len(dm.train_dataset)
        assert comp["train_real"] + comp["train_synthetic"] == comp["train_size"]
        if reals is not None:
            assert comp["train_real"] == reals[g]
        if g == 0:
            assert comp["train_synthetic"] == 0

        # Every item, read through the loader, comes from where the workflow says, each exactly once.
        seen = [identify(item, index) for batch in dm.train_dataloader() for item in batch]
        assert len(seen) == len(set(seen)) == sizes[g]
        counts: dict[int, int] = {}
        for source, _ in seen:
            counts[source] = counts.get(source, 0) + 1
        assert counts == {k: v for k, v in dm.training_set.counts().items() if v}
        assert counts.get(REAL, 0) == comp["train_real"]
        real_rows = sorted(row for source, row in seen if source == REAL)
        needed = max((stop for s, _, stop in dm.training_set.sources if s == REAL), default=0)
        assert set(real_rows) <= set(range(needed))  # the first real examples, never later ones
        assert all(source < g for source, _ in seen)  # only earlier generations' synthetic sets


def test_replace_and_accumulate_use_the_right_synthetic_sets(tmp_path, real):
    index = real_index_of(real)
    replace = make_store(tmp_path / "r", Workflow.parse("replace"))
    dm = SyntheticAccumulatingDataModule(real, "replace", replace, 2, real_size=N)
    assert {identify(dm.train_dataset[i], index)[0] for i in range(len(dm.train_dataset))} == {1}
    acc = make_store(tmp_path / "a", Workflow.parse("accumulate"))
    dm = SyntheticAccumulatingDataModule(real, "accumulate", acc, 2, real_size=N)
    assert {identify(dm.train_dataset[i], index)[0] for i in range(len(dm.train_dataset))} == {REAL, 0, 1}


def test_subsample_is_seeded_and_fresh_each_generation(tmp_path, real):
    wf = Workflow.parse("accumulate_subsample(size=20)")
    store = make_store(tmp_path, wf)
    index = real_index_of(real)

    def drawn(g: int, seed: int) -> list[tuple[int, int]]:
        dm = SyntheticAccumulatingDataModule(real, wf, store, g, real_size=N, seed=seed)
        return sorted(identify(dm.train_dataset[i], index) for i in range(len(dm.train_dataset)))

    assert drawn(2, seed=1) == drawn(2, seed=1)
    assert drawn(2, seed=1) != drawn(2, seed=2)
    assert drawn(1, seed=1) != drawn(2, seed=1)


def test_val_and_test_are_real_only(tmp_path, real):
    wf = Workflow.parse("replace")
    store = make_store(tmp_path, wf)
    dm = SyntheticAccumulatingDataModule(real, wf, store, 2, real_size=N, batch_size=7)
    dm.setup("fit")
    val = torch.cat(list(dm.val_dataloader()))
    test = torch.cat(list(dm.test_dataloader()))
    np.testing.assert_array_equal(val.numpy(), real.val_dataset.points)
    np.testing.assert_array_equal(test.numpy(), real.test_dataset.points)
    assert (val[:, 0] < 100).all() and (test[:, 0] < 100).all()


def test_eval_falls_back_to_the_real_modules_loaders(tmp_path, real):
    class LoadersOnly:
        """A real module that offers val/test loaders but no val/test datasets."""

        train_dataset = real.train_dataset

        def prepare_data(self):
            pass

        def setup(self, stage):
            pass

        def synthetic_dataset(self, arrays):
            return PointsDataset(arrays["samples"])

        def val_dataloader(self):
            return ["val-loader"]

        def test_dataloader(self):
            return ["test-loader"]

    store = make_store(tmp_path, Workflow.parse("accumulate"))
    dm = SyntheticAccumulatingDataModule(LoadersOnly(), "accumulate", store, 1, real_size=N)
    assert dm.val_dataloader() == ["val-loader"] and dm.test_dataloader() == ["test-loader"]
    assert len(dm.train_dataset) == 2 * N


def test_synthetic_rows_are_read_lazily_from_memmaps(tmp_path, real):
    wf = Workflow.parse("accumulate")
    store = make_store(tmp_path, wf)
    dm = SyntheticAccumulatingDataModule(real, wf, store, 2, real_size=N)
    dm.setup("fit")
    ds = dm.train_dataset
    assert isinstance(ds, WorkflowDataset)
    synthetic = [d for (source, _, _), d in zip(ds.training_set.sources, ds.datasets) if source != REAL]
    assert len(synthetic) == 2
    for d in synthetic:
        assert isinstance(d.points, np.memmap) and d.points.mode == "r" and not d.points.flags.writeable
    # A batched read (the loader's __getitems__ path) equals item-by-item reads.
    idx = [0, N + 3, 2 * N + 5, 1, 2 * N]
    batched = ds.__getitems__(idx)
    for i, item in zip(idx, batched):
        assert torch.equal(item, ds[i])
    assert ds.locate(N + 3) == (1, 3) and ds.locate(-1) == (2, N - 1)
    with pytest.raises(IndexError):
        ds[3 * N]


def test_not_enough_real_examples_is_a_clear_error(tmp_path):
    small = GaussianPointsDataModule(num_train=200, num_real=15)
    store = make_store(tmp_path, Workflow.parse("accumulate"))
    dm = SyntheticAccumulatingDataModule(small, "accumulate", store, 1, real_size=N)
    with pytest.raises(WorkflowError, match="needs 20 real examples.*only 15"):
        dm.setup("fit")
    fresh = GaussianPointsDataModule(num_train=35)
    wf = Workflow.parse("fresh_real(per_generation=10)")
    store = make_store(tmp_path / "fresh", wf)
    assert len(SyntheticAccumulatingDataModule(fresh, wf, store, 1, real_size=N).train_dataset) == 30 + 20
    with pytest.raises(WorkflowError, match="needs 40 real examples at generation 2"):
        SyntheticAccumulatingDataModule(fresh, wf, store, 2, real_size=N).setup("fit")


def test_real_size_defaults_to_the_whole_real_training_set(tmp_path):
    capped = GaussianPointsDataModule(num_train=200, num_real=N)
    store = make_store(tmp_path, Workflow.parse("accumulate"))
    dm = SyntheticAccumulatingDataModule(capped, "accumulate", store, 1)
    assert dm.real_size == N
    assert dm.train_composition() == {"train_size": 2 * N, "train_real": N, "train_synthetic": N}


def test_a_short_synthetic_set_is_refused(tmp_path, real):
    store = GenerationStore(tmp_path)
    store.save_array(0, "samples", synthetic_rows(0, N - 1))
    store.commit(0, num_samples=N - 1, sampling={})
    dm = SyntheticAccumulatingDataModule(real, "replace", store, 1, real_size=N)
    with pytest.raises(WorkflowError, match="20 rows of synthetic set 0, which has only 19"):
        dm.setup("fit")


def test_corrupt_synthetic_set_names_the_file(tmp_path, real):
    wf = Workflow.parse("accumulate")
    make_store(tmp_path, wf)
    path = tmp_path / "gen_000" / "samples.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    dm = SyntheticAccumulatingDataModule(real, wf, GenerationStore(tmp_path), 2, real_size=N)
    with pytest.raises(StoreError, match=r"gen_000/samples\.npy: sha256 mismatch"):
        dm.setup("fit")


def test_shuffling_depends_on_seed_generation_and_epoch_only(tmp_path, real):
    wf = Workflow.parse("accumulate")
    store = make_store(tmp_path, wf)

    def order(seed: int, g: int, epoch: int) -> list[float]:
        dm = SyntheticAccumulatingDataModule(real, wf, store, g, real_size=N, seed=seed, batch_size=5)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat(list(loader))[:, 1].tolist()

    assert order(0, 2, 0) == order(0, 2, 0)
    assert order(0, 2, 0) != order(0, 2, 1)
    assert order(0, 2, 0) != order(1, 2, 0)
    unshuffled = SyntheticAccumulatingDataModule(real, wf, store, 1, real_size=N, shuffle=False, batch_size=N)
    first = next(iter(unshuffled.train_dataloader()))
    np.testing.assert_array_equal(first.numpy(), real.train_dataset.points[:N])


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 1000])
@pytest.mark.parametrize("world", [1, 3, 8])
@pytest.mark.parametrize(("shuffle", "drop_last"), [(True, False), (False, False), (True, True)])
def test_the_compact_sampler_gives_torchs_order_on_every_rank(n, world, shuffle, drop_last, monkeypatch):
    from torch.utils.data.distributed import DistributedSampler

    monkeypatch.setattr(ShuffledShardSampler, "BLOCK", 4)  # several blocks per rank even at these sizes
    data = range(n)
    for rank in range(world):
        for epoch in (0, 3):
            ours = ShuffledShardSampler(data, world, rank, shuffle=shuffle, seed=11, drop_last=drop_last)
            theirs = DistributedSampler(data, world, rank, shuffle=shuffle, seed=11, drop_last=drop_last)
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            got = list(ours)
            assert got == list(theirs) and len(got) == len(ours)
            assert all(type(i) is int for i in got)  # indices as torch's are, not 0-d tensors


def test_derive_seed_separates_streams():
    seeds = {derive_seed(s, g, p) for s in range(3) for g in range(3) for p in ("init", "fit", "sample")}
    assert len(seeds) == 27
    assert derive_seed(0, 1, "fit") == derive_seed(0, 1, "fit")
    with pytest.raises(ValueError):
        derive_seed(-1, 0, "fit")


def test_toy_real_data_is_seeded_and_split_independently():
    a = GaussianPointsDataModule(num_train=100, num_val=10, num_test=10, seed=1)
    b = GaussianPointsDataModule(num_train=50, num_val=10, num_test=10, seed=1, num_real=30)
    np.testing.assert_array_equal(a.val_dataset.points, b.val_dataset.points)
    np.testing.assert_array_equal(a.test_dataset.points, b.test_dataset.points)
    np.testing.assert_array_equal(a.train_dataset.points[:30], b.train_dataset.points)
    assert len(b.train_dataset) == 30
    big = GaussianPointsDataModule(num_train=20000, seed=0).train_dataset.points
    np.testing.assert_allclose(big.mean(0), [1.0, -2.0], atol=0.05)
    np.testing.assert_allclose(np.cov(big.T), [[2.0, 0.6], [0.6, 0.5]], atol=0.08)
    with pytest.raises(ValueError, match="shape"):
        a.synthetic_dataset({"samples": np.zeros((4, 3), np.float32)})


class PointsWithoutValidation(RealDataModuleBase[PointsDataset]):
    """A minimal subclass of the base: ten training points, four test points, no validation set."""

    collate_fn = staticmethod(torch.stack)
    loads = 0

    def _load_datasets(self):
        self.loads += 1
        points = np.arange(28, dtype=np.float32).reshape(14, 2)
        return {"train": PointsDataset(points[:10]), "val": None, "test": PointsDataset(points[10:])}

    def synthetic_dataset(self, arrays):
        return PointsDataset(arrays["samples"])


def test_real_data_module_base_gives_the_datasets_and_loaders():
    dm = PointsWithoutValidation(batch_size=4)
    assert isinstance(dm, RealDataModule) and isinstance(GaussianPointsDataModule(), RealDataModule)
    assert dm.val_dataset is None and dm.val_dataloader() == []
    assert len(dm.train_dataset) == 10 and len(dm.test_dataset) == 4
    dm.setup("fit")
    dm.setup("test")
    assert dm.loads == 1  # built once, whatever the stage
    assert sorted(torch.cat(list(dm.train_dataloader()))[:, 0].tolist()) == list(range(0, 20, 2))
    (batch,) = list(dm.test_dataloader())
    np.testing.assert_array_equal(batch.numpy(), np.arange(20, 28, dtype=np.float32).reshape(4, 2))
    for bad in ({"batch_size": 0}, {"batch_size": 2.5}, {"batch_size": 4, "num_workers": -1}):
        with pytest.raises(UserError, match="batch size|num_workers"):
            PointsWithoutValidation(**bad)


@pytest.mark.parametrize(("device", "pinned"), [("cuda", True), ("cpu", False)])
def test_batches_bound_for_a_gpu_are_collated_into_page_locked_memory(tmp_path, real, device, pinned):
    # Pinned host memory lets Lightning's non_blocking copy to the GPU overlap the step; on a CPU it would be waste.
    from types import SimpleNamespace

    store = make_store(tmp_path, Workflow.parse("accumulate"))
    dm = SyntheticAccumulatingDataModule(real, "accumulate", store, 2, real_size=N, batch_size=7)
    assert not dm.train_dataloader().pin_memory  # no trainer: standalone use
    strategy = SimpleNamespace(root_device=torch.device(device))
    dm.trainer = SimpleNamespace(strategy=strategy, world_size=1, global_rank=0)
    assert dm.train_dataloader().pin_memory is pinned
    assert dm.test_dataloader().pin_memory is pinned
