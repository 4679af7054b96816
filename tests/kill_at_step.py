"""A recipe's command line that SIGKILLs itself at an optimizer step of generation 1, for the resume tests.

:func:`kill_at_step_script` writes a script that runs recipe ``recipes.<recipe>`` as its command line does, its
modality's Trainers given one more callback: with ``KILL=S`` in the environment, the process SIGKILLs itself as
optimizer step S of generation 1 starts (after whatever checkpoint step S - 1 wrote). :func:`recipe_runner` runs
it with given flags.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TEMPLATE = """
import os, signal, sys
sys.path[:0] = [{root!r}]
import lightning.pytorch as pl
from recipes import {recipe} as recipe

class KillAtStep(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == int(os.environ["KILL"]):
            os.kill(os.getpid(), signal.SIGKILL)

trainer_kwargs = recipe.{modality}.trainer_kwargs
def with_kill(self, generation):
    kwargs = dict(trainer_kwargs(self, generation))
    if generation == 1 and os.environ.get("KILL"):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), KillAtStep()]
    return kwargs
recipe.{modality}.trainer_kwargs = with_kill
from collapse.cli import run
run(recipe.main, recipe.{config})
"""


def kill_at_step_script(folder: Path, recipe: str, modality: str, config: str) -> Path:
    """Write the script into ``folder`` and return its path (run it with the recipe's flags)."""
    path = folder / f"{recipe}_kill_at_step.py"
    path.write_text(TEMPLATE.format(root=str(ROOT), recipe=recipe, modality=modality, config=config))
    return path


def recipe_runner(
    folder: Path, recipe: str, modality: str, config: str, flags: Sequence[str]
) -> Callable[..., subprocess.CompletedProcess]:
    """``run(out_dir, **env)``: the recipe with ``flags`` and ``--out_dir out_dir`` (W&B off, one thread), in a
    process of its own with ``env`` added to its environment (``KILL="17"``), to its end."""
    script = kill_at_step_script(folder, recipe, modality, config)
    base = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}

    def run(out: Path, **env: str) -> subprocess.CompletedProcess:
        args = [sys.executable, str(script), *flags, "--out_dir", str(out)]
        return subprocess.run(args, env={**base, **env}, capture_output=True, text=True, timeout=400)

    return run
