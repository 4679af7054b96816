"""The benchmarks run on CPU at tiny sizes and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KEYS = (
    "context", "train_seconds", "train_tokens_per_s", "test_seconds", "test_tokens_per_s", "sample_seconds",
    "sample_tokens_per_s", "projected_minutes_per_generation_published",
)  # fmt: skip


def test_tinystories_generation_benchmark_prints_each_phase_and_the_projection(tmp_path):
    env = {**os.environ, "MODEL_COLLAPSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tinystories_generation.py"), "--device", "cpu"]
    cmd += ["--preset", "gpt2-tiny", "--stories", "16", "--vocab_size", "320", "--batch_size", "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line and "  " not in line)
    for key in KEYS:
        assert key in values, proc.stdout
    assert values["context"] == "256"  # the laptop preset's context
    assert all(float(values[k]) > 0 for k in KEYS)
    assert proc.stdout.strip().splitlines()[-1].startswith("projected_minutes_per_generation_published: ")
    assert "backend: native" in proc.stdout
