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
    python -m recipes.report runs/vae_* --out runs/vae_report
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from collapse.atomic import atomic_write_json
from collapse.cli import run
from collapse.errors import ConfigError, UserError
from collapse.loop import LoopConfig, LoopResult, Modality, run_generations
from collapse.rundir import config_dict
from datamodules.mnist import MNISTDataConfig, MNISTDataModule
from lit_modules.vae import VAEConfig, VAEModule, image_grid

GPU_EPOCHS = 30
"""Epochs per generation on a GPU: the published MNIST VAE setting (Shumailov et al.)."""
CPU_EPOCHS = 15
"""Epochs per generation on CPU: 4 generations of accumulate (the costliest workflow) in about 4 minutes on 2 cores."""


@dataclass
class TrainerConfig:
    """Lightning Trainer settings (``--trainer.*``); the rest of the Trainer is set by the loop."""

    accelerator: str = "auto"
    """cpu, gpu, mps or auto (a GPU when there is one)."""
    devices: int | str = 1
    """Devices per node: 2 with --trainer.strategy ddp trains on two GPUs (or two CPU processes)."""
    strategy: str = "auto"
    """auto, ddp, fsdp, ...: how several devices share the work (ddp re-launches this command per device)."""
    num_nodes: int = 1
    """Machines (with torchrun or SLURM, which start the processes)."""
    precision: str | None = None
    """32-true, bf16-mixed, 16-mixed, ...; default: bf16-mixed on a GPU, 32-true otherwise."""
    max_epochs: int | None = None
    """Epochs per generation; default: 30 on a GPU (the published setting), 15 on CPU."""
    gradient_clip_val: float | None = None
    """Clip gradients to this norm."""

    def __post_init__(self) -> None:
        if isinstance(self.num_nodes, bool) or not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise ConfigError(f"--trainer.num_nodes must be an integer >= 1, got {self.num_nodes!r}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"--trainer.max_epochs must be >= 1, got {self.max_epochs}")


@dataclass
class QualityConfig:
    """The classifier-based quality signal of each synthetic set."""

    enabled: bool = True
    """Score each synthetic set with the digit classifier (sample_fid, sample_class_entropy, sample_confidence)."""
    classifier_epochs: int = 3
    """Epochs of the classifier, trained once on the real training digits and cached."""
    cache_dir: str | None = None
    """Where the trained classifier is cached; default: $MODEL_COLLAPSE_CACHE or ~/.cache/model-collapse."""
    grid_size: int = 64
    """Synthetic digits in each generation's samples.png."""

    def __post_init__(self) -> None:
        for flag in ("classifier_epochs", "grid_size"):
            value = getattr(self, flag)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--quality.{flag} must be an integer >= 1, got {value!r}")


@dataclass
class VAEModality(Modality):
    """MNIST digits (real) modelled by a convolutional VAE; see :mod:`lit_modules.vae`."""

    data: MNISTDataConfig = field(default_factory=MNISTDataConfig)
    model: VAEConfig = field(default_factory=VAEConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    name: str = "vae"

    def __post_init__(self) -> None:
        self._real: MNISTDataModule | None = None
        self._scorer: Any = None

    def real_datamodule(self) -> MNISTDataModule:
        if self._real is None:
            self._real = MNISTDataModule(self.data)
        return self._real

    def build_model(self, generation: int) -> VAEModule:
        return VAEModule(self.model)

    def trainer_kwargs(self, generation: int) -> dict[str, Any]:
        kwargs = {k: v for k, v in dataclasses.asdict(self.trainer).items() if v is not None}
        return {**kwargs, "num_sanity_val_steps": 0}

    def sampling_settings(self) -> dict[str, Any]:
        return {"sample_mode": self.model.sample_mode}

    def evaluate_samples(self, stage: Path, arrays: Mapping[str, np.ndarray], generation: int) -> dict[str, float]:
        images = arrays["images"]  # (n, 28, 28) uint8
        image_grid(np.asarray(images[: self.quality.grid_size]), stage / "samples.png")
        if not self.quality.enabled or len(images) == 0:
            return {}
        metrics, histogram = self._quality().evaluate_with_histogram(np.asarray(images))
        atomic_write_json(stage / "class_histogram.json", {"counts": [int(c) for c in histogram]})
        return {f"sample/{k}": v for k, v in metrics.items()}

    def _quality(self) -> Any:
        """The scorer: the classifier (trained once, cached) and the real test digits' features."""
        if self._scorer is None:
            from lit_modules.digit_classifier import SampleQuality, default_cache_dir, load_or_train_classifier

            real = self.real_datamodule()
            real.setup("fit")
            cache = self.quality.cache_dir or default_cache_dir()
            classifier = load_or_train_classifier(
                real.train_images, real.train_labels, cache, epochs=self.quality.classifier_epochs
            )
            self._scorer = SampleQuality(classifier, real.test_images)
        return self._scorer


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
    """Lightning Trainer settings: devices, strategy, precision, epochs."""
    quality: QualityConfig = field(default_factory=QualityConfig)
    """The classifier-based quality signal."""


def resolve_hardware(cfg: MNISTVAEConfig) -> MNISTVAEConfig:
    """Fill the hardware-dependent defaults (precision, epochs) so that config.yaml records what ran."""
    import torch

    accelerator = cfg.trainer.accelerator
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"--trainer.accelerator {accelerator}: no CUDA GPU is visible on this machine")
    trainer = dataclasses.replace(
        cfg.trainer,
        accelerator="gpu" if on_gpu else ("cpu" if accelerator == "auto" else accelerator),
        precision=cfg.trainer.precision or ("bf16-mixed" if on_gpu else "32-true"),
        max_epochs=(GPU_EPOCHS if on_gpu else CPU_EPOCHS) if cfg.trainer.max_epochs is None else cfg.trainer.max_epochs,
    )
    return dataclasses.replace(cfg, trainer=trainer)


def main(cfg: MNISTVAEConfig) -> LoopResult:
    """Run (or resume) the generations; return what the loop did."""
    cfg = resolve_hardware(cfg)
    modality = VAEModality(data=cfg.data, model=cfg.model, trainer=cfg.trainer, quality=cfg.quality)
    loop = LoopConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoopConfig)})
    return run_generations(modality, loop, recipe="mnist_vae", config=config_dict(cfg))


if __name__ == "__main__":
    run(main, MNISTVAEConfig)


__all__ = ["MNISTVAEConfig", "QualityConfig", "TrainerConfig", "VAEModality", "main", "resolve_hardware"]
