"""A tiny generative model for the toy modality: a learnable full-covariance Gaussian.

The density is N(mu, Sigma) with the precision Sigma^{-1} = P P^T given by its Cholesky factor P
(lower triangular, positive diagonal ``P_ii = exp(r_ii)``), fitted by Adam with a cosine-decayed
learning rate on the mean negative log-likelihood (nats per point):

    -log p(x) = 1/2 ||P^T (x - mu)||^2 - sum_i log P_ii + D/2 log(2 pi).

Parametrising the precision rather than the covariance makes the loss a matrix product, with no
triangular solve in the backward pass (slow on CPU for tiny matrices); sampling solves
P^T (x - mu) = eps once per chunk, without gradients.

It is the smallest model with every hook the generation loop uses (a shared ``model_step`` for
train/val/test and ``sample(n, generator)``), and its collapse under ``replace`` is the textbook
one: the fitted covariance shrinks and drifts generation after generation. ``recipes/toy_gaussian.py``
pairs it with :class:`~datamodules.toy.GaussianPointsDataModule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from collapse.contract import SamplingModule
from collapse.errors import ConfigError


@dataclass
class GaussianModelConfig:
    """Settings of the Gaussian density model."""

    lr: float = 0.2
    """Initial Adam learning rate (cosine-decayed to 0 over the fit)."""
    init_scale: float = 1.0
    """Standard deviation of the random initial mean (the initial covariance is the identity)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--model.lr must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.init_scale) and 0 <= self.init_scale <= 1e6):
            raise ConfigError(f"--model.init_scale must be a number within 0 .. 1e6, got {self.init_scale!r}")


class GaussianDensity(SamplingModule):
    """A Gaussian N(mu, (P P^T)^{-1}) with learnable mean and precision Cholesky factor; see the module docstring."""

    def __init__(self, dim: int = 2, lr: float = 0.2, init_scale: float = 1.0):
        super().__init__()
        self.save_hyperparameters()
        self.mean = nn.Parameter(init_scale * torch.randn(dim))  # (D,)
        # Unconstrained factor: strictly lower part as is, diagonal through exp (so P = I at init).
        self.raw_precision_tril = nn.Parameter(torch.zeros(dim, dim))  # (D, D)
        # A fixed mask instead of torch.tril in every step: elementwise, and far cheaper on CPU for tiny D.
        self.register_buffer("strict_lower", torch.tril(torch.ones(dim, dim), diagonal=-1), persistent=False)

    @property
    def precision_tril(self) -> torch.Tensor:
        """P, lower triangular with a positive diagonal, P P^T = Sigma^{-1}: shape ``(D, D)``."""
        raw = self.raw_precision_tril
        return raw * self.strict_lower + torch.diag(torch.exp(torch.diagonal(raw)))

    @property
    def covariance(self) -> torch.Tensor:
        """Sigma = (P P^T)^{-1}, shape ``(D, D)``."""
        p = self.precision_tril
        return torch.linalg.inv(p @ p.T)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each row of ``x`` (B, D): shape ``(B,)``, in nats."""
        z = (x - self.mean) @ self.precision_tril  # (B, D), row b = (P^T (x_b - mu))^T
        log_det = torch.diagonal(self.raw_precision_tril).sum()  # sum_i log P_ii = 1/2 log det Sigma^{-1}
        dim = x.shape[-1]
        return 0.5 * (z**2).sum(-1) - log_det + 0.5 * dim * math.log(2 * math.pi)

    def model_step(self, batch: torch.Tensor, stage: str) -> torch.Tensor:
        """Mean NLL of a batch (B, D), logged as ``<stage>_loss`` (epoch mean, weighted by batch size)."""
        loss = self.nll(batch).mean()
        # With several processes each tests its own share of the set; the logged loss is over all, exactly.
        if stage == "train":
            self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=batch.shape[0], sync_dist=True)
        else:
            self.log_mean(f"{stage}_loss", loss, batch.shape[0])
        return loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "train")

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        # Cosine decay to 0 over the fit: the last epochs average out minibatch noise, so the fit
        # lands close to the maximum-likelihood estimate instead of jittering around it at lr.
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        epochs = self.trainer.max_epochs
        if epochs is None or epochs < 1:  # no fixed length (max_steps or unbounded): constant lr
            return {"optimizer": optimizer}
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> dict[str, np.ndarray]:
        """``n`` draws x = mu + P^{-T} eps, eps ~ N(0, I) from ``generator``: ``{"samples": float32 (n, D)}``.

        Cov(P^{-T} eps) = P^{-T} P^{-1} = (P P^T)^{-1} = Sigma.
        """
        # In float32 whatever the training precision (a bf16-true fit has bf16 parameters; the triangular
        # solve has no bf16 kernel, and samples are stored as float32 anyway).
        eps = torch.randn(self.mean.shape[0], n, generator=generator, device=self.mean.device)  # (D, n)
        tril = self.precision_tril.float()  # (D, D)
        offsets = torch.linalg.solve_triangular(tril.T, eps, upper=True)  # (D, n), P^T y = eps
        x = self.mean.float() + offsets.T  # (n, D)
        return {"samples": x.cpu().numpy()}


__all__ = ["GaussianDensity", "GaussianModelConfig"]
