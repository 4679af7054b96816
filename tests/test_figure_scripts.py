"""The README's figure scripts: their grid of runs and every command line's flags, parsed without running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"mnist_vae": "mnist_vae.py", "tinystories": "tinystories.py", "geom": "geom_diffusion.py"}


def dry_run(script: str, *args: str, real: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FIGURE_DRY": "1", "PYTHON": sys.executable}
    env.pop("REAL", None)
    if real is not None:
        env["REAL"] = real
    cmd = ["bash", str(ROOT / "scripts" / f"{script}_figure.sh"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_figure_script_runs_both_protocols_and_the_real_only_reference_over_three_seeds(script, tmp_path):
    proc = dry_run(script, str(tmp_path / "fig"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert all(line.endswith(": flags ok") for line in lines)
    names = [line.split(":")[0] for line in lines]
    expected = [
        f"{name}_s{seed}"
        for seed in range(3)
        for name in ("replace", "accumulate", "accumulate_subsample", "accumulate_fixed", "real_only")
    ]
    assert names == expected
    assert not (tmp_path / "fig").exists()  # the dry mode writes nothing


def test_figure_script_passes_extra_flags_to_every_run_and_rejects_unknown_ones(tmp_path):
    proc = dry_run("tinystories", str(tmp_path / "fig"), "--no_such_flag", "1", real="40")
    assert proc.returncode == 1
    failed = [line for line in proc.stdout.splitlines() if "flags FAILED" in line]
    assert len(failed) == 15 and all("--no_such_flag" in line for line in failed)
    # REAL sets the real-only reference's mixture as well as --real_size.
    real_only = [line for line in failed if line.startswith("real_only_s")]
    assert real_only and all("--real_size 40" in line and r"mix\(real=40\," in line for line in real_only)
