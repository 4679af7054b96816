"""The Lightning generation loop on its smallest model: a learnable 2-D Gaussian fitted by Adam.

The template of the deep generative recipes, in the same shape (``--data.*``, ``--model.*``, ``--trainer.*``;
the modality contract is ``collapse/contract.py``, walked through in ``docs/modality.md``). Each generation
fits a fresh model (or, with ``--warm_start true``, the previous one) by Adam on the negative log-likelihood,
is scored on real held-out points (``test_loss``, mean NLL in nats), and samples the next synthetic set into
``gen_XXX/samples.npy``.

    python recipes/toy_gaussian.py --workflow replace --generations 6 --out_dir runs/toy_replace
    python recipes/toy_gaussian.py --workflow accumulate --trainer.max_epochs 20 --out_dir runs/toy_acc
    python -m tooling.report runs/toy_replace runs/toy_acc --out runs/toy_report
"""

from __future__ import annotations

if __spec__ is None:  # run as `python recipes/x.py`: check this python has the project before importing it
    import _env_check  # noqa: F401  (next to this file; exits with one error line if the project is missing)

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from collapse.cli import run
from collapse.contract import Modality
from datamodules.toy import GaussianPointsConfig, GaussianPointsDataModule
from engine.loop import LoopConfig, LoopResult, run_generations
from engine.trainer import TrainerConfig, resolve_trainer
from lit_modules.toy import GaussianDensity, GaussianModelConfig

EPOCHS = 20
"""Epochs per generation: with the cosine-decayed learning rate the fit of 1,024 points settles at the maximum
likelihood within 20 (a 2-D Gaussian gains nothing from a GPU: the default accelerator is the CPU)."""


@dataclass
class ToyGaussianConfig(LoopConfig):
    """Refit a learnable Gaussian on its own samples with Lightning: replace vs accumulate and the rest."""

    out_dir: str = "runs/toy_gaussian"
    """Run directory: config.yaml, metrics.csv and one gen_XXX folder per finished generation."""
    data: GaussianPointsConfig = field(default_factory=GaussianPointsConfig)
    """Real points: sizes, seed, the true mean and covariance."""
    model: GaussianModelConfig = field(default_factory=GaussianModelConfig)
    """The Gaussian density model: learning rate, initial mean scale."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(accelerator="cpu"))
    """Lightning Trainer settings (default: on the CPU, 20 epochs per generation)."""


class GaussianModality(Modality):
    """Real points from a fixed 2-D Gaussian, modelled by :class:`~lit_modules.toy.GaussianDensity`."""

    name = "toy"

    def __init__(self, cfg: ToyGaussianConfig):
        self.cfg = cfg

    def real_datamodule(self) -> GaussianPointsDataModule:
        return GaussianPointsDataModule(**dataclasses.asdict(self.cfg.data))

    def build_model(self, generation: int) -> GaussianDensity:
        model = self.cfg.model
        return GaussianDensity(dim=len(self.cfg.data.mean), lr=model.lr, init_scale=model.init_scale)

    def trainer_kwargs(self, generation: int) -> dict[str, Any]:
        return self.cfg.trainer.lightning_kwargs()


def main(cfg: ToyGaussianConfig) -> LoopResult:
    """Run (or resume) the generations; return what the loop did.

    The hardware-dependent Trainer defaults (accelerator, precision, epochs) are filled first, so config.yaml
    records what ran.
    """
    cfg = dataclasses.replace(cfg, trainer=resolve_trainer(cfg.trainer, gpu_epochs=EPOCHS, cpu_epochs=EPOCHS))
    return run_generations(GaussianModality(cfg), cfg, recipe="toy_gaussian")


if __name__ == "__main__":
    run(main, ToyGaussianConfig)


__all__ = ["GaussianModality", "ToyGaussianConfig", "main"]
