"""Multivariate Gaussian fitting under model collapse (Kazdan et al., "Collapse or Thrive?").

Each generation fits a d-dimensional Gaussian by maximum likelihood (sample mean, *biased* sample
covariance) to its training set and draws the next synthetic set from the fit. Real data come from
N(0, sigma^2 I). Metrics per generation, each seed separately:

* ``mean_sq_error``    ||mu_hat - mu||^2
* ``cov_det_ratio``    det(Sigma_hat) / det(Sigma_0)
* ``cov_trace_ratio``  tr(Sigma_hat) / tr(Sigma_0)
* ``test_nll``         mean negative log-likelihood (nats) of ``n_test`` fresh real points, the same
                       points every generation; ``inf`` when Sigma_hat is singular (n <= d).

Expected under replace: E||mu_hat_g - mu||^2 = d sigma^2 (1 - ((n-1)/n)^(g+1)); under accumulate:
d sigma^2 / n * sum_{k<=g} 1/(k+1)^2 (see ``tooling/theory.py``).

    python recipes/gaussian.py --workflow '[replace, accumulate, accumulate_subsample]' \
        --dim '[1, 10, 31]' --n_samples '[10, 100, 1000]' --generations 50 --num_seeds 40 --out_dir runs/g
"""

from __future__ import annotations

if __spec__ is None:  # run as `python recipes/x.py`: check this python has the project before importing it
    import _env_check  # noqa: F401  (next to this file; exits with one error line if the project is missing)

from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import numpy as np

from collapse.cli import positive_floats, positive_ints, run
from collapse.errors import UserError
from datamodules.workflows import TrainingSet
from engine.analytic import AnalyticConfig, Cell, PrefixCache, gather, launch

LOG_2PI = float(np.log(2 * np.pi))


@dataclass
class GaussianConfig(AnalyticConfig):
    """Fit a Gaussian by MLE, sample from it, refit: replace vs accumulate vs accumulate-subsample."""

    out_dir: str = "runs/gaussian"
    """Run directory (created; re-running the same command resumes)."""
    dim: int | list[int] = field(default_factory=lambda: [1, 3, 10, 31, 100])
    """Dimension d, or a list of them (a grid axis)."""
    n_samples: int | list[int] = field(default_factory=lambda: [10, 32, 100, 316, 1000])
    """Real sample size n (every synthetic set has n samples too, unless the workflow says otherwise)."""
    sigma2: float = 1.0
    """Variance of the real data: Sigma_0 = sigma2 * I, mu = 0."""
    n_test: int = 500
    """Fresh real points on which test_nll is measured (the same points every generation)."""


class Moments(NamedTuple):
    """Sufficient statistics of a set of points: count, mean (S, d), centred scatter (S, d, d)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.mean.nbytes + self.m2.nbytes


@dataclass
class _Fit:
    count: int
    mean: np.ndarray  # (S, d)
    cov: np.ndarray  # (S, d, d) biased MLE covariance
    chol: np.ndarray | None  # (S, d, d) F with F F^T = cov (Cholesky; eigenbasis where it failed); None if M <= d
    rows: np.ndarray | None  # (S, M, d) the training rows, kept when M <= d to sample a singular fit exactly
    singular: np.ndarray  # (S,) bool: the seed's cov is (numerically) singular


class GaussianProblem:
    """One (d, n) cell for S seeds at once."""

    metrics = ("mean_sq_error", "cov_det_ratio", "cov_trace_ratio", "test_nll")

    def __init__(self, dim: int, num_seeds: int, sigma2: float, n_test: int, rng: np.random.Generator):
        self.d, self.S, self.sigma2 = dim, num_seeds, sigma2
        self.rng = rng
        test = self.real(n_test)  # (S, n_test, d) fresh real points, never trained on
        self.test_mean = test.mean(axis=1)  # (S, d)
        centred = test - self.test_mean[:, None, :]
        self.test_cov = np.matmul(centred.transpose(0, 2, 1), centred) / n_test  # (S, d, d)
        self._cache = PrefixCache(self._moments, self._merge)

    def real(self, count: int) -> np.ndarray:
        return np.sqrt(self.sigma2) * self.rng.standard_normal((self.S, count, self.d))  # (S, count, d)

    @staticmethod
    def _moments(x: np.ndarray | Moments) -> Moments:
        """(count, mean (S, d), centred scatter sum_i (x_i - mean)(x_i - mean)^T (S, d, d))."""
        if isinstance(x, Moments):
            return x
        x = x.astype(np.float64, copy=False)
        mean = x.mean(axis=1)
        xc = x - mean[:, None, :]
        return Moments(x.shape[1], mean, np.matmul(xc.transpose(0, 2, 1), xc))

    @staticmethod
    def _merge(a: Moments, b: Moments) -> Moments:
        """Chan et al.'s pairwise update: M2 = M2_a + M2_b + delta delta^T n_a n_b / n (stable, exact)."""
        (na, ma, m2a), (nb, mb, m2b) = a, b
        n = na + nb
        delta = mb - ma
        return Moments(n, ma + delta * (nb / n), m2a + m2b + np.einsum("si,sj->sij", delta, delta) * (na * nb / n))

    def fit(self, ts: TrainingSet, parts: list[np.ndarray]) -> _Fit:
        rows = None
        if ts.subset is not None:
            rows, _ = gather(parts, ts.subset)  # (S, m, d)
            n, mean, m2 = self._moments(rows)
        else:
            n, mean, m2 = self._cache(ts, parts)
            if n <= self.d:
                rows = np.concatenate(parts, axis=1)
        cov = m2 / n
        if n <= self.d:  # rank <= M - 1 < d for every seed
            return _Fit(n, mean, cov, None, rows, np.ones(self.S, dtype=bool))
        chol, failed = _cholesky(cov)
        if failed.any():  # factor those seeds through their eigenbasis instead, to sample from them
            lam, vec = np.linalg.eigh(cov[failed])
            chol[failed] = vec * np.sqrt(np.clip(lam, 0.0, None))[:, None, :]
        # A rank-deficient cov can also factor with round-off pivots; call it singular then.
        pivots = np.abs(np.diagonal(chol, axis1=1, axis2=2))
        singular = failed | (pivots.min(axis=1) <= 1e-7 * pivots.max(axis=1))
        return _Fit(n, mean, cov, chol, None, singular)

    def evaluate(self, fit: _Fit) -> dict[str, np.ndarray]:
        d, s2 = self.d, self.sigma2
        singular = fit.singular
        det_ratio = np.zeros(self.S)
        if fit.chol is not None and not singular.all():
            # -log N(x; mu, Sigma) = (d log 2pi + log det Sigma + (x - mu)^T Sigma^{-1} (x - mu)) / 2. Averaged
            # over the test points, the quadratic term is tr(Sigma^{-1} C) + |L^{-1}(xbar - mu)|^2 with the
            # test points' mean xbar and biased covariance C: O(d^3) per generation, whatever n_test is.
            chol = np.where(singular[:, None, None], np.eye(d), fit.chol)  # singular seeds: inf below
            l_inv = np.linalg.inv(chol)  # (S, d, d)
            precision = np.matmul(l_inv.transpose(0, 2, 1), l_inv)
            z = np.matmul(l_inv, (self.test_mean - fit.mean)[..., None])[..., 0]  # (S, d)
            quad = (precision * self.test_cov).sum(axis=(1, 2)) + (z**2).sum(axis=1)
            logdet_cov = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
            nll = 0.5 * (d * LOG_2PI + logdet_cov + quad)
            det_ratio = np.exp(np.minimum(logdet_cov - d * np.log(s2), 700.0))  # log det = 2 sum log L_ii
        else:
            nll = np.empty(self.S)
        nll[singular] = np.inf  # real points fall off a singular Gaussian's support
        det_ratio[singular] = 0.0
        return {
            "mean_sq_error": (fit.mean**2).sum(axis=1),
            "cov_det_ratio": det_ratio,
            "cov_trace_ratio": np.trace(fit.cov, axis1=1, axis2=2) / (d * s2),
            "test_nll": nll,
        }

    def sample(self, fit: _Fit, rng: np.random.Generator, count: int) -> np.ndarray:
        if fit.rows is not None:
            # Sigma_hat has rank < d. mu + M^{-1/2} sum_i g_i (x_i - mu), g ~ N(0, 1), is exactly
            # N(mu, Sigma_hat): its covariance is (1/M) sum_i (x_i - mu)(x_i - mu)^T.
            centred = fit.rows - fit.mean[:, None, :]  # (S, M, d)
            g = rng.standard_normal((self.S, count, centred.shape[1]))
            return fit.mean[:, None, :] + np.matmul(g, centred) / np.sqrt(centred.shape[1])
        z = rng.standard_normal((self.S, count, self.d))
        return fit.mean[:, None, :] + np.matmul(z, fit.chol.transpose(0, 2, 1))  # x = mu + L z

    def sample_summary(self, fit: _Fit, rng: np.random.Generator, count: int) -> np.ndarray | Moments:
        """The sufficient statistics of ``count`` samples, drawn directly (exact in distribution).

        For m iid points of N(mu, Sigma) = N(mu, F F^T), the sample mean and the centred scatter are
        independent: mean ~ N(mu, Sigma / m) and scatter ~ Wishart_d(m - 1, Sigma) = F A A^T F^T, with
        A lower triangular, A_ii ~ sqrt(chi^2_{m-1-i}), A_ij ~ N(0, 1) below the diagonal (Bartlett).
        That costs d (d + 1) / 2 draws instead of m d. It needs m > d and a full-rank fit; otherwise
        the points themselves are drawn.
        """
        if count <= self.d or fit.rows is not None:
            return self.sample(fit, rng, count)
        F = fit.chol
        S, d = self.S, self.d
        A = np.tril(rng.standard_normal((S, d, d)), k=-1)
        diag = np.sqrt(rng.chisquare(count - 1 - np.arange(d), size=(S, d)))  # dof m-1, m-2, ..., m-d
        A[:, np.arange(d), np.arange(d)] = diag
        FA = np.matmul(F, A)
        mean = fit.mean + np.matmul(F, rng.standard_normal((S, d, 1)))[..., 0] / np.sqrt(count)
        return Moments(count, mean, np.matmul(FA, FA.transpose(0, 2, 1)))


def _cholesky(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower Cholesky factors of (S, d, d) covariances and a (S,) mask of the seeds where it failed.

    One batched call normally; if any seed is not positive definite, each seed is factored on its
    own so that one degenerate seed does not take the others down with it.
    """
    try:
        return np.linalg.cholesky(cov), np.zeros(len(cov), dtype=bool)
    except np.linalg.LinAlgError:
        chol = np.zeros_like(cov)
        failed = np.zeros(len(cov), dtype=bool)
        for s, c in enumerate(cov):  # rare fallback, only for a generation with a degenerate seed
            try:
                chol[s] = np.linalg.cholesky(c)
            except np.linalg.LinAlgError:
                failed[s] = True
        return chol, failed


SIGMA2_RANGE = (1e-100, 1e100)
"""``--sigma2`` allowed: within it the float64 sums of squares of the data stay finite and normal."""


def make_problem(cell: Cell, rng: np.random.Generator, num_seeds: int, sigma2: float, n_test: int) -> GaussianProblem:
    """The problem of one grid cell (module level, so worker processes can unpickle it)."""
    return GaussianProblem(cell.params["dim"], num_seeds, sigma2, n_test, rng)


def main(cfg: GaussianConfig):
    """Run the grid; return the path of metrics.csv."""
    dims = positive_ints("dim", cfg.dim)
    sizes = positive_ints("n_samples", cfg.n_samples)
    (sigma2,) = positive_floats("sigma2", cfg.sigma2)
    if not SIGMA2_RANGE[0] <= sigma2 <= SIGMA2_RANGE[1]:
        raise UserError(
            f"--sigma2 must be between {SIGMA2_RANGE[0]:g} and {SIGMA2_RANGE[1]:g} (beyond it the data's sums of "
            f"squares overflow or underflow float64), got {sigma2!r}"
        )
    positive_ints("n_test", cfg.n_test)

    make = partial(make_problem, num_seeds=cfg.num_seeds, sigma2=sigma2, n_test=cfg.n_test)
    return launch("gaussian", cfg, {"dim": dims, "n_samples": sizes}, make, lambda c: c.params["n_samples"])


if __name__ == "__main__":
    run(main, GaussianConfig)
