"""Closed-form expectations that the analytic recipes should reproduce, for plots and tests.

Indexing convention (used everywhere in this project): ``generation`` g is 0-based and generation 0
is the model fitted on real data. The papers' iteration count n (Gerstgrasser et al.) is g + 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from datamodules.workflows import Workflow


def harmonic2(g: np.ndarray) -> np.ndarray:
    """sum_{i=1}^{g+1} 1 / i^2 for each g (tends to pi^2 / 6)."""
    g = np.asarray(g, dtype=np.int64)
    partial = np.cumsum(1.0 / np.arange(1, int(g.max(initial=0)) + 2) ** 2)
    return partial[g]


def linear_regression_test_mse(workflow: Workflow, dim: int, n_samples: int, noise_var: float, generations):
    """E ||w_hat_g - w*||^2 for OLS on a fixed Gaussian design X in R^{T x d} (T = n_samples).

    E[(X^T X)^{-1}] = I / (T - d - 1), so one OLS fit on fresh noise adds sigma^2 d / (T - d - 1):
      replace:     sigma^2 d / (T - d - 1) * (g + 1)                (linear growth)
      accumulate:  sigma^2 d / (T - d - 1) * sum_{i=1}^{g+1} 1/i^2  (<= pi^2/6 times generation 0)
    ``replace`` with synthetic sets k times the design (k integer, rows repeated) fits later
    generations on k relabellings, dividing their added variance by k.
    """
    g = np.asarray(generations)
    T, d = n_samples, dim
    if T <= d + 1:
        return None
    unit = noise_var * d / (T - d - 1)
    mult = workflow.params.get("multiplier", 1.0)
    if workflow.name in ("replace", "replace_multiple") and float(mult).is_integer():
        return unit * (1.0 + g / mult)
    if workflow.name == "accumulate" and mult == 1.0:
        return unit * harmonic2(g)
    return None


def gaussian_mean_sq_error(workflow: Workflow, dim: int, n_samples: int, sigma2: float, generations):
    """E ||mu_hat_g - mu||^2 for the MLE of a d-dimensional Gaussian refitted on its own samples.

    replace (synthetic sets of m = n samples):  d sigma^2 (1 - ((n - 1) / n)^(g + 1))
    replace, m = k n:  d sigma^2 [1/n + (n-1)/(n m) sum_{j<g} ((m-1)/m)^j]
    accumulate:        d sigma^2 / n * sum_{k=0}^{g} 1 / (k + 1)^2

    The replace forms are exact for the biased MLE. The accumulate form treats every synthetic set's
    covariance as Sigma; the biased MLE's shrinks by (n-1)/n per fit, so a simulation sits slightly
    below it (about 2% at n = 20 after 15 generations, vanishing as n grows).
    """
    g = np.asarray(generations, dtype=float)
    n, d = n_samples, dim
    if workflow.name in ("replace", "replace_multiple"):
        m = workflow.synthetic_size(n)
        r = (m - 1) / m
        geometric = g if r == 1 else (1 - r**g) / (1 - r)
        return d * sigma2 * (1.0 / n + (n - 1) / (n * m) * geometric)
    if workflow.name == "accumulate" and workflow.params.get("multiplier", 1.0) == 1.0:
        return d * sigma2 / n * harmonic2(np.asarray(generations))
    return None


def gaussian_cov_trace_ratio(workflow: Workflow, dim: int, n_samples: int, generations):
    """E tr(Sigma_hat_g) / tr(Sigma_0) under replace: ((n-1)/n) ((m-1)/m)^g (biased MLE shrinks it)."""
    if workflow.name not in ("replace", "replace_multiple"):
        return None
    g = np.asarray(generations, dtype=float)
    m = workflow.synthetic_size(n_samples)
    return (n_samples - 1) / n_samples * ((m - 1) / m) ** g


def gaussian_cov_det_ratio(workflow: Workflow, dim: int, n_samples: int, generations):
    """E det(Sigma_hat_g) / det(Sigma_0) under replace (m = n): (prod_{i<d} (n-1-i)/n)^(g+1).

    From E det W = det(Sigma) prod_{i<d} (n - 1 - i) for W ~ Wishart_d(n - 1, Sigma).
    """
    if workflow.name != "replace" or workflow.params.get("multiplier", 1.0) != 1.0:
        return None
    g = np.asarray(generations, dtype=float)
    n, d = n_samples, dim
    per_step = np.prod([(n - 1 - i) / n for i in range(d)]) if n > d else 0.0
    return per_step ** (g + 1)


def theory_curve(recipe: str, metric: str, workflow: Workflow | str, params: Mapping[str, Any], generations):
    """The expected curve of ``metric`` for one grid cell, or None where no closed form is known."""
    wf = Workflow.parse(workflow) if isinstance(workflow, str) else workflow
    p = dict(params)
    if recipe == "linear_regression" and metric == "test_mse":
        return linear_regression_test_mse(wf, int(p["dim"]), int(p["n_samples"]), float(p["noise_var"]), generations)
    if recipe == "gaussian":
        d, n = int(p["dim"]), int(p["n_samples"])
        if metric == "mean_sq_error":
            return gaussian_mean_sq_error(wf, d, n, float(p.get("sigma2", 1.0)), generations)
        if metric == "cov_trace_ratio":
            return gaussian_cov_trace_ratio(wf, d, n, generations)
        if metric == "cov_det_ratio":
            return gaussian_cov_det_ratio(wf, d, n, generations)
    return None


# ---- the accumulate bound ----------------------------------------------------------------------

ACCUMULATE_BOUND = float(np.pi**2 / 6)
"""Dey & Donoho: under accumulate the test risk stays within pi^2/6 (about 1.645) of generation 0's risk."""

_RISK_METRICS: dict[str, tuple[str, float | None]] = {
    "linear_regression": ("test_mse", 0.0),  # ||w_hat - w*||^2 is already the excess risk
    "gaussian": ("mean_sq_error", 0.0),  # ||mu_hat - mu||^2 likewise
    "mnist_vae": ("test_loss", None),
    "tinystories": ("test_loss", None),
    "geom_diffusion": ("test_loss", None),
}


def risk_metric(recipe: str) -> tuple[str, float | None]:
    """``(metric, floor)`` the accumulate bound is checked on for ``recipe``.

    ``floor`` is the risk of the best model, known in closed form for the analytic recipes (their metric
    already measures the excess over it, so it is 0); None where it is unknown (the deep recipes' test
    losses contain the data's own entropy), so the bound is checked on the loss itself, a weaker check.
    Recipes not listed use ``test_loss`` without a floor.
    """
    return _RISK_METRICS.get(recipe, ("test_loss", None))
