"""Benchmark: the vectorised Gaussian recipe against a straightforward per-seed loop, same grid.

Both run as fresh processes, so interpreter start-up and imports are included. Each is run
``--repeats`` times, side by side, and the medians are compared. The recipe is timed as it runs by
default (grid cells spread over every core) and with ``--workers 1`` (one process, like the loop).
The last line compares the default call:

    speedup_vectorised_vs_per_seed_loop: X

    python benchmarks/gaussian_grid.py                       # default grid (a couple of minutes)
    python benchmarks/gaussian_grid.py --dim 1 3 10 31 100 --n_samples 10 32 100 316 1000 \
        --generations 100 --num_seeds 100                    # Kazdan et al.'s full grid (the loop takes hours)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workflow", nargs="+", default=["replace", "accumulate", "accumulate_subsample"])
    p.add_argument("--dim", nargs="+", type=int, default=[1, 3, 10, 31])
    p.add_argument("--n_samples", nargs="+", type=int, default=[10, 32, 100, 316])
    p.add_argument("--generations", type=int, default=100)
    p.add_argument("--num_seeds", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    def flag(values) -> str:
        return "[" + ", ".join(str(v) for v in values) + "]"

    with tempfile.TemporaryDirectory() as tmp:
        vectorised = [
            sys.executable, "recipes/gaussian.py", "--overwrite", "true", "--out_dir", f"{tmp}/vec",
            "--workflow", flag(a.workflow), "--dim", flag(a.dim), "--n_samples", flag(a.n_samples),
            "--generations", str(a.generations), "--num_seeds", str(a.num_seeds),
            "--wandb.mode", "disabled", "--report", "false", "--log_every", str(10**6),
        ]  # fmt: skip
        loop = [
            sys.executable, "benchmarks/gaussian_per_seed_baseline.py", "--workflow", *a.workflow,
            "--dim", *map(str, a.dim), "--n_samples", *map(str, a.n_samples), "--generations", str(a.generations),
            "--num_seeds", str(a.num_seeds), "--out_csv", f"{tmp}/loop.csv",
        ]  # fmt: skip
        cells = len(a.workflow) * len(a.dim) * len(a.n_samples)
        print(f"grid: {cells} cells x {a.num_seeds} seeds x {a.generations} generations")
        single = vectorised + ["--workers", "1"]
        t_vec, t_one, t_loop = [], [], []
        for i in range(a.repeats):
            # A fresh run directory each time, so the recipe recomputes instead of resuming.
            vectorised[vectorised.index("--out_dir") + 1] = f"{tmp}/vec{i}"
            single[single.index("--out_dir") + 1] = f"{tmp}/one{i}"
            t_vec.append(timed(vectorised))
            t_one.append(timed(single))
            t_loop.append(timed(loop))
            print(
                f"repeat {i + 1}: vectorised {t_vec[-1]:.2f}s (one process {t_one[-1]:.2f}s), "
                f"per-seed loop {t_loop[-1]:.2f}s",
                flush=True,
            )
    vec, one, base = statistics.median(t_vec), statistics.median(t_one), statistics.median(t_loop)
    print(
        f"vectorised median (cells on every core, the default): {vec:.2f}s "
        f"(min {min(t_vec):.2f}s, max {max(t_vec):.2f}s)"
    )
    print(f"vectorised median (--workers 1, one process): {one:.2f}s (min {min(t_one):.2f}s, max {max(t_one):.2f}s)")
    print(f"per-seed loop median (one process): {base:.2f}s (min {min(t_loop):.2f}s, max {max(t_loop):.2f}s)")
    print(f"speedup_one_process_vs_per_seed_loop: {base / one:.1f}")
    print(f"speedup_vectorised_vs_per_seed_loop: {base / vec:.1f}")


if __name__ == "__main__":
    main()
