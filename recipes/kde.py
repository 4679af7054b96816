"""Kernel density estimation under model collapse (Kazdan et al., "Collapse or Thrive?").

Each generation fits a Gaussian-kernel KDE to its training set (the KDE *is* its training points,
with an isotropic kernel of standard deviation h) and samples the next synthetic set from it: pick a
training point uniformly, add N(0, h^2 I). Metric ``test_nll``: mean negative log-likelihood (nats)
of ``n_test`` fresh real points (500 by default, the same points every generation):

    -log p(x) = -log( (1/M) sum_j N(x; c_j, h^2 I) )      over the M training points c_j

Bandwidths: a number (h itself), or ``scott`` / ``silverman`` computed from the training-set size M
and dimension D = 2 as scikit-learn's KernelDensity does, without rescaling by the data's spread:
scott h = M^(-1/(D+4)), silverman h = (M (D+2) / 4)^(-1/(D+4)). In two dimensions the two rules give
the same h. h is recomputed every generation, since M grows under accumulate.

Data sets (2-D, drawn independently for every seed): ``blobs`` (three isotropic Gaussian clusters of
standard deviation 1 at fixed centres), ``circles`` (two concentric circles, radii 1 and 0.5, noise
0.05), ``moons`` (two interleaving half circles, noise 0.05) and ``swiss_roll`` (the (x, z) plane of a
swiss roll, t ~ U[1.5 pi, 4.5 pi], radius t, noise 0.05, scaled by 1/10). Angles and positions along
each curve are uniform random, so each set is a proper distribution to draw fresh test points from.

    python recipes/kde.py --workflow '[replace, accumulate]' --dataset '[moons, circles]' \
        --bandwidth '[0.1, scott]' --n_samples '[10, 100]' --generations 100 --num_seeds 100 --out_dir runs/kde
"""

from __future__ import annotations

if __spec__ is None:  # run as `python recipes/x.py`: check this python has the project before importing it
    import _env_check  # noqa: F401  (next to this file; exits with one error line if the project is missing)

from dataclasses import dataclass, field
from functools import partial

import numpy as np

from collapse.cli import as_list, positive_ints, run
from collapse.errors import UserError
from datamodules.workflows import TrainingSet
from engine.analytic import AnalyticConfig, Cell, gather, launch

DATASETS = ("blobs", "circles", "moons", "swiss_roll")
RULES = ("scott", "silverman")
_BLOB_CENTRES = np.array([[-4.0, 0.0], [4.0, 1.5], [0.5, 5.0]])
_CHUNK = 1 << 22  # kernel evaluations per block, per seed batch: bounds memory at ~32 MB of float64


def make_points(name: str, rng: np.random.Generator, num_seeds: int, count: int) -> np.ndarray:
    """``count`` points of a 2-D toy distribution for each seed: (S, count, 2)."""
    shape = (num_seeds, count)
    if name == "blobs":
        centre = _BLOB_CENTRES[rng.integers(0, len(_BLOB_CENTRES), size=shape)]
        return centre + rng.standard_normal(shape + (2,))
    if name == "circles":
        angle = rng.uniform(0, 2 * np.pi, size=shape)
        radius = np.where(rng.random(shape) < 0.5, 1.0, 0.5)
        pts = radius[..., None] * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
        return pts + 0.05 * rng.standard_normal(shape + (2,))
    if name == "moons":
        angle = rng.uniform(0, np.pi, size=shape)
        upper = rng.random(shape) < 0.5
        x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
        y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
        return np.stack([x, y], axis=-1) + 0.05 * rng.standard_normal(shape + (2,))
    if name == "swiss_roll":
        t = rng.uniform(1.5 * np.pi, 4.5 * np.pi, size=shape)
        pts = np.stack([t * np.cos(t), t * np.sin(t)], axis=-1) / 10.0
        return pts + 0.05 * rng.standard_normal(shape + (2,))
    raise UserError(f"unknown --dataset {name!r}; valid: {', '.join(DATASETS)}")


def bandwidth_for(rule: float | str, count: int, dim: int = 2) -> float:
    """Kernel standard deviation h for a training set of ``count`` points."""
    if rule == "scott":
        return count ** (-1.0 / (dim + 4))
    if rule == "silverman":
        return (count * (dim + 2) / 4.0) ** (-1.0 / (dim + 4))
    return float(rule)


@dataclass
class KDEConfig(AnalyticConfig):
    """Refit a kernel density estimate on its own samples: replace vs accumulate vs accumulate-subsample."""

    out_dir: str = "runs/kde"
    """Run directory (created; re-running the same command resumes)."""
    dataset: str | list[str] = field(default_factory=lambda: list(DATASETS))
    """2-D data set(s): blobs, circles, moons, swiss_roll."""
    bandwidth: float | str | list[float | str] = field(default_factory=lambda: [0.1, 0.5, 1.0, "scott", "silverman"])
    """Kernel bandwidth(s): a positive number, scott or silverman."""
    n_samples: int | list[int] = field(default_factory=lambda: [10, 32, 100, 316, 1000])
    """Real sample size n (every synthetic set has n samples too, unless the workflow says otherwise)."""
    n_test: int = 500
    """Fresh real points on which test_nll is measured (the same points every generation)."""


@dataclass
class _KDE:
    parts: list[np.ndarray]  # training points, (S, len_i, 2) each; their union is the KDE's centres
    keys: list[tuple | None]  # the source each part is (None for a subsample)
    count: int
    h: float


class KDEProblem:
    """One (data set, bandwidth, n) cell for S seeds at once."""

    metrics = ("test_nll",)

    def __init__(self, dataset: str, bandwidth: float | str, num_seeds: int, n_test: int, rng: np.random.Generator):
        self.dataset, self.rule, self.S, self.rng = dataset, bandwidth, num_seeds, rng
        self.test = self.real(n_test)  # (S, n_test, 2)
        self.test32 = self.test.astype(np.float32)
        self._sums: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._cached_h: float | None = None

    def real(self, count: int) -> np.ndarray:
        return make_points(self.dataset, self.rng, self.S, count)

    def fit(self, ts: TrainingSet, parts: list[np.ndarray]) -> _KDE:
        if ts.subset is not None:
            parts = [gather(parts, ts.subset)[0]]
            keys: list[tuple | None] = [None]
        else:
            keys = list(ts.sources)
        return _KDE(list(parts), keys, ts.size, bandwidth_for(self.rule, ts.size))

    def _kernel_sums(self, centres: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
        """(max_j, sum_j exp(. - max)) of log k(x, c_j) = -|x - c_j|^2 / 2h^2 for every test x: (S, N) each."""
        x = self.test32
        S, N = x.shape[:2]
        scale = np.float32(-1.0 / (2.0 * h * h))
        run_max = np.full((S, N), -np.inf, dtype=np.float64)
        run_sum = np.zeros((S, N), dtype=np.float64)
        step = max(1, _CHUNK // (N * S))
        for start in range(0, centres.shape[1], step):
            c = centres[:, start : start + step].astype(np.float32)  # (S, B, 2)
            # Differences taken directly (not |x|^2 + |c|^2 - 2 x.c) so float32 loses nothing for near pairs.
            logk = x[:, :, None, 0] - c[:, None, :, 0]  # (S, N, B)
            dy = x[:, :, None, 1] - c[:, None, :, 1]
            logk *= logk
            dy *= dy
            logk += dy
            logk *= scale
            block_max = logk.max(axis=2)
            logk -= block_max[..., None]
            np.exp(logk, out=logk)
            new_max = np.maximum(run_max, block_max)
            run_sum = run_sum * np.exp(run_max - new_max) + logk.sum(axis=2) * np.exp(block_max - new_max)
            run_max = new_max
        return run_max, run_sum

    def evaluate(self, kde: _KDE) -> dict[str, np.ndarray]:
        # log p(x) = logsumexp_j(-|x - c_j|^2 / 2h^2) - log M - log(2 pi h^2), merged source by source.
        # With a fixed bandwidth a source's sums never change, so each source is summed once per cell.
        if self._cached_h != kde.h:
            self._sums, self._cached_h = {}, kde.h
        run_max = np.full(self.test.shape[:2], -np.inf)
        run_sum = np.zeros(self.test.shape[:2])
        live = {}
        for key, part in zip(kde.keys, kde.parts):
            piece = self._sums.get(key) if key is not None else None
            if piece is None:
                piece = self._kernel_sums(part, kde.h)
            if key is not None:
                live[key] = piece
            new_max = np.maximum(run_max, piece[0])
            run_sum = run_sum * np.exp(run_max - new_max) + piece[1] * np.exp(piece[0] - new_max)
            run_max = new_max
        self._sums = live
        log_p = run_max + np.log(run_sum) - np.log(kde.count) - np.log(2 * np.pi * kde.h**2)
        return {"test_nll": -log_p.mean(axis=1)}

    def sample(self, kde: _KDE, rng: np.random.Generator, count: int) -> np.ndarray:
        centre = rng.integers(0, kde.count, size=(self.S, count))  # a uniformly chosen training point
        picked, _ = gather(kde.parts, centre)
        return picked + kde.h * rng.standard_normal((self.S, count, 2))


BANDWIDTH_RANGE = (1e-12, 1e12)
"""Fixed bandwidths allowed (the data sets span a few units): beyond these the kernel's scale -1 / 2h^2, taken in
float32, or the normaliser log(2 pi h^2) overflows."""


def _bandwidths(values) -> list[float | str]:
    out = []
    low, high = BANDWIDTH_RANGE
    for v in as_list(values):
        if isinstance(v, str) and v in RULES:
            out.append(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            if not low <= v <= high:
                raise UserError(f"--bandwidth must be between {low:g} and {high:g} (or {' / '.join(RULES)}), got {v!r}")
            out.append(float(v))
        else:
            raise UserError(f"--bandwidth must be positive numbers or {' / '.join(RULES)}, got {v!r}")
    if not out:
        raise UserError(f"--bandwidth is empty; give at least one positive number or {' / '.join(RULES)}")
    return out


def make_problem(cell: Cell, rng: np.random.Generator, num_seeds: int, n_test: int) -> KDEProblem:
    """The problem of one grid cell (module level, so worker processes can unpickle it)."""
    return KDEProblem(cell.params["dataset"], cell.params["bandwidth"], num_seeds, n_test, rng)


def main(cfg: KDEConfig):
    """Run the grid; return the path of metrics.csv."""
    datasets = as_list(cfg.dataset)
    if not datasets:
        raise UserError(f"--dataset is empty; give at least one of {', '.join(DATASETS)}")
    for name in datasets:
        if name not in DATASETS:
            raise UserError(f"unknown --dataset {name!r}; valid: {', '.join(DATASETS)}")
    bandwidths = _bandwidths(cfg.bandwidth)
    sizes = positive_ints("n_samples", cfg.n_samples)
    positive_ints("n_test", cfg.n_test)

    axes = {"dataset": datasets, "bandwidth": bandwidths, "n_samples": sizes}
    make = partial(make_problem, num_seeds=cfg.num_seeds, n_test=cfg.n_test)
    return launch("kde", cfg, axes, make, lambda c: c.params["n_samples"])


if __name__ == "__main__":
    run(main, KDEConfig)
