"""The baseline for benchmarks/gaussian_grid.py: the same Gaussian grid, written the straightforward way.

One Python loop per seed and per generation; the training pool is concatenated every generation;
`np.cov` and `Generator.multivariate_normal`, as a first implementation would do. It computes the
same metrics as recipes/gaussian.py and writes the same tidy CSV, so the two are timed doing the same job.
"""

from __future__ import annotations

import argparse
import csv
import math

import numpy as np


def run(workflows, dims, sizes, generations, num_seeds, n_test, out_csv):
    rows = []
    for wf in workflows:
        for d in dims:
            for n in sizes:
                for s in range(num_seeds):
                    rng = np.random.default_rng([s, d, n])
                    real = rng.standard_normal((n, d))
                    test = rng.standard_normal((n_test, d))
                    synthetic = []
                    for t in range(generations):
                        if t == 0:
                            data = real
                        elif wf == "replace":
                            data = synthetic[-1]
                        else:
                            pool = np.concatenate([real] + synthetic)
                            data = pool if wf == "accumulate" else pool[rng.choice(len(pool), n, replace=False)]
                        mu = data.mean(axis=0)
                        cov = np.cov(data, rowvar=False, bias=True).reshape(d, d)
                        sign, logdet = np.linalg.slogdet(cov)
                        if sign > 0:
                            diff = test - mu
                            maha = np.einsum("ij,ij->i", diff @ np.linalg.inv(cov), diff)
                            nll = 0.5 * (d * math.log(2 * math.pi) + logdet + maha.mean())
                        else:
                            nll = math.inf
                        metrics = {
                            "mean_sq_error": float(mu @ mu),
                            "cov_det_ratio": float(np.linalg.det(cov)),
                            "cov_trace_ratio": float(np.trace(cov) / d),
                            "test_nll": nll,
                        }
                        for name, value in metrics.items():
                            rows.append([wf, d, n, s, t, name, value])
                        synthetic.append(rng.multivariate_normal(mu, cov, size=n))
    with open(out_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["workflow", "dim", "n_samples", "seed", "generation", "metric", "value"])
        writer.writerows(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workflow", nargs="+", default=["replace", "accumulate", "accumulate_subsample"])
    p.add_argument("--dim", nargs="+", type=int, required=True)
    p.add_argument("--n_samples", nargs="+", type=int, required=True)
    p.add_argument("--generations", type=int, required=True)
    p.add_argument("--num_seeds", type=int, required=True)
    p.add_argument("--n_test", type=int, default=500)
    p.add_argument("--out_csv", required=True)
    a = p.parse_args()
    run(a.workflow, a.dim, a.n_samples, a.generations, a.num_seeds, a.n_test, a.out_csv)


if __name__ == "__main__":
    main()
