"""A convolutional VAE on MNIST, refitted generation after generation on its own digits.

Generation 0 trains on real digits; every later generation trains on the workflow's mix of real
digits and the synthetic digits of earlier generations (decoder means by default, stored as uint8).
Each generation is scored on real held-out digits (``test_loss``: the negative ELBO, nats per image),
and its synthetic set by a digit classifier trained once on real digits: a Fréchet distance on the
classifier's features (``sample_fid``) and the entropy of the predicted labels
(``sample_class_entropy``, log 10 = 2.303 when every digit is equally common). A grid of 64
synthetic digits is saved as ``gen_XXX/samples.png``.

    python recipes/mnist_vae.py --workflow replace --out_dir runs/vae_replace
    python recipes/mnist_vae.py --workflow accumulate --trainer.devices 2 --trainer.strategy ddp
    python -m tooling.report runs/vae_* --out runs/vae_report
"""

from __future__ import annotations

if __spec__ is None:  # run as `python recipes/x.py`: check this python has the project before importing it
    import _env_check  # noqa: F401  (next to this file; exits with one error line if the project is missing)

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from collapse.atomic import check_writable_folder
from collapse.cli import run
from collapse.contract import Modality
from datamodules.mnist import MNISTDataConfig, MNISTDataModule
from engine.loop import LoopConfig, LoopResult, run_generations
from engine.trainer import TrainerConfig, resolve_trainer
from evaluation.digits import DigitQualityConfig, DigitSampleEvaluator, default_cache_dir
from lit_modules.vae import VAEConfig, VAEModule

GPU_EPOCHS = 30
"""Epochs per generation on a GPU: the published MNIST VAE setting (Shumailov et al.)."""
CPU_EPOCHS = 15
"""Epochs per generation on CPU: 4 generations of accumulate (the costliest workflow) in about 4 minutes on 2 cores."""


@dataclass
class MNISTVAEConfig(LoopConfig):
    """Refit a convolutional VAE on MNIST digits, generation after generation, under a data workflow."""

    out_dir: str = "runs/mnist_vae"
    """Run directory: config.yaml, metrics.csv and one gen_XXX folder per finished generation."""
    generations: int = 4
    """Number of generations; generation 0 trains on real digits only."""
    batch_size: int = 64
    """Training batch size per device (also the test batch size)."""
    sample_batch_size: int = 500
    """Digits per sampling call (part of the sampling seed)."""
    data: MNISTDataConfig = field(default_factory=MNISTDataConfig)
    """Real MNIST: source (embedded, hub, idx, torchvision), sizes."""
    model: VAEConfig = field(default_factory=VAEConfig)
    """The VAE: latent size, widths, learning rate, how synthetic digits are drawn."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning Trainer settings: devices, strategy, precision (default: bf16-mixed on a GPU, else 32-true),
    epochs per generation (defaults: at the top of --help)."""
    quality: DigitQualityConfig = field(default_factory=DigitQualityConfig)
    """The classifier-based quality signal."""


# The hardware-dependent epochs join the description --help opens with, quoted from the constants that main()
# applies (field docstrings are read from the source text, so they cannot quote them).
MNISTVAEConfig.__doc__ = (
    f"{MNISTVAEConfig.__doc__} Default epochs per generation: {GPU_EPOCHS} on a GPU (the published setting), "
    f"{CPU_EPOCHS} on CPU."
)


class VAEModality(Modality):
    """MNIST digits (real) modelled by a convolutional VAE (:mod:`lit_modules.vae`), scored as digits."""

    name = "vae"

    def __init__(self, cfg: MNISTVAEConfig):
        self.cfg = cfg
        self.real = MNISTDataModule(cfg.data)
        self.evaluator = DigitSampleEvaluator(cfg.quality, self.real)

    def real_datamodule(self) -> MNISTDataModule:
        return self.real

    def build_model(self, generation: int) -> VAEModule:
        return VAEModule(self.cfg.model)

    def trainer_kwargs(self, generation: int) -> dict[str, Any]:
        return self.cfg.trainer.lightning_kwargs()

    def sampling_settings(self) -> dict[str, Any]:
        return {"sample_mode": self.cfg.model.sample_mode}

    def evaluate_samples(self, stage: Path, arrays: Mapping[str, np.ndarray], generation: int) -> dict[str, float]:
        return self.evaluator(stage, arrays)


def main(cfg: MNISTVAEConfig) -> LoopResult:
    """Run (or resume) the generations; return what the loop did.

    The hardware-dependent Trainer defaults (accelerator, precision, epochs) are filled first, so config.yaml
    records what ran.
    """
    cfg = dataclasses.replace(cfg, trainer=resolve_trainer(cfg.trainer, gpu_epochs=GPU_EPOCHS, cpu_epochs=CPU_EPOCHS))
    if cfg.quality.enabled:  # the classifier is cached after generation 0 trained: refuse a bad folder before
        if cfg.quality.cache_dir:
            check_writable_folder(Path(cfg.quality.cache_dir).expanduser(), "--quality.cache_dir")
        else:
            check_writable_folder(default_cache_dir(), "the cache folder ($MODEL_COLLAPSE_CACHE or ~/.cache)")
    return run_generations(VAEModality(cfg), cfg, recipe="mnist_vae")


if __name__ == "__main__":
    run(main, MNISTVAEConfig)


__all__ = ["MNISTVAEConfig", "VAEModality", "main"]
