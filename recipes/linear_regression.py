"""Linear regression under model collapse (Gerstgrasser et al., after Dohmatob et al.).

A fixed design X in R^{T x d} (rows ~ N(0, I_d), drawn once per seed; T = ``n_samples``) is
relabelled every generation: real labels are y = X w* + eps, synthetic set g is y = X w_g + eps with
fresh noise eps ~ N(0, noise_var I), and every model is ordinary least squares on its training set.
Example i of any set (real or synthetic) sits on design row i mod T, so synthetic sets larger than
T (``replace_multiple``) repeat the design with independent noise.

Where a subsample happens to cover fewer than d distinct design rows, OLS has no unique solution
and the minimum-norm least-squares solution is used; workflows whose training sets are always
smaller than d are refused.

Metric ``test_mse`` = E_x (x^T w_hat - x^T w*)^2 for a fresh test point x ~ N(0, I_d), i.e. the
squared error against noiseless targets, computed exactly as ||w_hat - w*||^2.

Indexing: generation g here is the paper's iteration n = g + 1 (n = 1 is the fit on real data):
    replace:     E test_mse = noise_var d / (T - d - 1) * (g + 1)
    accumulate:  E test_mse = noise_var d / (T - d - 1) * sum_{i=1}^{g+1} 1/i^2   (<= pi^2/6 x gen 0)

    python recipes/linear_regression.py --workflow '[replace, accumulate]' --dim 32 \
        --n_samples '[100, 1000]' --noise_var 100 --generations 50 --num_seeds 1000 --out_dir runs/lr
"""

from __future__ import annotations

if __spec__ is None:  # run as `python recipes/x.py`: check this python has the project before importing it
    import _env_check  # noqa: F401  (next to this file; exits with one error line if the project is missing)

from dataclasses import dataclass, field
from functools import partial

import numpy as np

from collapse.cli import as_list, positive_floats, positive_ints, run
from collapse.errors import UserError
from datamodules.workflows import TrainingSet, Workflow
from engine.analytic import AnalyticConfig, Cell, PrefixCache, gather, launch


@dataclass
class LinearRegressionConfig(AnalyticConfig):
    """OLS refitted on its own relabelled predictions: replace vs accumulate (and any other workflow)."""

    out_dir: str = "runs/linear_regression"
    """Run directory (created; re-running the same command resumes)."""
    dim: int | list[int] = 32
    """Number of features d, or a list (grid axis)."""
    n_samples: int | list[int] = field(default_factory=lambda: [100, 1000])
    """Rows T of the fixed design (the real set's size); needs T >= d + 2. One value or a list."""
    noise_var: float | list[float] = 100.0
    """Label noise variance sigma^2, or a list."""
    generations: int = 50
    """Number of generations, counting generation 0 (fitted on real data)."""
    num_seeds: int = 1000
    """Independent repetitions (each with its own design X and w*), computed at once."""


class LinearRegressionProblem:
    """One (d, T, sigma^2) cell for S seeds at once."""

    metrics = ("test_mse",)

    def __init__(self, dim: int, rows: int, noise_var: float, num_seeds: int, rng: np.random.Generator):
        self.d, self.T, self.noise_var, self.S = dim, rows, noise_var, num_seeds
        self.rng = rng
        self.X = rng.standard_normal((num_seeds, rows, dim))  # (S, T, d) fixed design
        self.w_star = rng.standard_normal((num_seeds, dim)) / np.sqrt(dim)  # (S, d)
        self._gram = np.matmul(self.X.transpose(0, 2, 1), self.X)  # (S, d, d) X^T X, shared by whole sets
        self._cache = PrefixCache(self._normal_equations, lambda a, b: (a[0] + b[0], a[1] + b[1]))

    def _blocks(self, count: int):
        """Split examples 0..count-1 into design blocks: (slice of examples, rows used of X)."""
        for start in range(0, count, self.T):
            stop = min(start + self.T, count)
            yield slice(start, stop), stop - start

    def _labels(self, w: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """y = X w + eps for examples 0..count-1: (S, count)."""
        clean = np.matmul(self.X, w[..., None])[..., 0]  # (S, T)
        reps = -(-count // self.T)
        clean = np.tile(clean, (1, reps))[:, :count] if reps > 1 else clean[:, :count]
        return clean + np.sqrt(self.noise_var) * rng.standard_normal((self.S, count))

    def real(self, count: int) -> np.ndarray:
        return self._labels(self.w_star, count, self.rng)

    def _normal_equations(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(X^T X (S, d, d), X^T y (S, d)) of a whole source whose example i sits on design row i mod T."""
        A = np.zeros((self.S, self.d, self.d))
        b = np.zeros((self.S, self.d))
        for examples, used in self._blocks(y.shape[1]):
            Xb = self.X[:, :used]  # a view: no copy of the design
            A += self._gram if used == self.T else np.matmul(Xb.transpose(0, 2, 1), Xb)
            b += np.matmul(Xb.transpose(0, 2, 1), y[:, examples, None])[..., 0]
        return A, b

    def fit(self, ts: TrainingSet, parts: list[np.ndarray]) -> np.ndarray:
        if ts.subset is None:
            A, b = self._cache(ts, parts)
        else:
            y, row = gather(parts, ts.subset)  # labels and their example index inside their source
            # Selected examples land on design rows; with c_r the count and s_r the label sum of row r:
            # X_sel^T X_sel = X^T diag(c) X and X_sel^T y_sel = X^T s, without copying design rows.
            flat = (np.arange(self.S)[:, None] * self.T + row % self.T).ravel()
            c = np.bincount(flat, minlength=self.S * self.T).reshape(self.S, self.T)
            s = np.bincount(flat, weights=y.ravel(), minlength=self.S * self.T).reshape(self.S, self.T)
            Xt = self.X.transpose(0, 2, 1)  # (S, d, T)
            A, b = np.matmul(Xt * c[:, None, :], self.X), np.matmul(Xt, s[..., None])[..., 0]
        try:
            return np.linalg.solve(A, b[..., None])[..., 0]  # OLS: w = (X^T X)^{-1} X^T y, (S, d)
        except np.linalg.LinAlgError:
            # Some seed's training rows span fewer than d directions (a subsample can repeat design
            # rows): least squares has no unique solution there; take the minimum-norm one, w = A^+ b.
            return np.matmul(np.linalg.pinv(A, hermitian=True), b[..., None])[..., 0]

    def evaluate(self, w: np.ndarray) -> dict[str, np.ndarray]:
        return {"test_mse": ((w - self.w_star) ** 2).sum(axis=1)}

    def sample(self, w: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
        return self._labels(w, count, rng)


def _check_training_sizes(wf: Workflow, d: int, T: int) -> None:
    """Refuse workflows whose training sets have fewer than d examples: OLS would be undetermined."""
    smallest = wf.smallest_training_set(T)
    if smallest is None:
        return  # every training set holds the whole real set, T >= d + 2 rows
    what, size = smallest
    if size < d:
        raise UserError(f"workflow {wf.label}: its {what} ({size} examples) is smaller than --dim {d}; OLS needs >= d")


def make_problem(cell: Cell, rng: np.random.Generator, num_seeds: int) -> LinearRegressionProblem:
    """The problem of one grid cell (module level, so worker processes can unpickle it)."""
    p = cell.params
    return LinearRegressionProblem(p["dim"], p["n_samples"], p["noise_var"], num_seeds, rng)


def main(cfg: LinearRegressionConfig):
    """Run the grid; return the path of metrics.csv."""
    dims = positive_ints("dim", cfg.dim)
    rows = positive_ints("n_samples", cfg.n_samples)
    noise = positive_floats("noise_var", cfg.noise_var)
    for d in dims:
        for T in rows:
            if T < d + 2:
                raise UserError(f"--n_samples {T} is too small for --dim {d}: OLS here needs T >= d + 2 = {d + 2}")
            for spec in as_list(cfg.workflow):
                _check_training_sizes(Workflow.parse(spec), d, T)

    axes = {"dim": dims, "n_samples": rows, "noise_var": noise}
    make = partial(make_problem, num_seeds=cfg.num_seeds)
    return launch("linear_regression", cfg, axes, make, lambda c: c.params["n_samples"])


if __name__ == "__main__":
    run(main, LinearRegressionConfig)
