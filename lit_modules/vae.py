"""A convolutional variational autoencoder for 28x28 grayscale digits (the MNIST modality).

The model follows the MNIST VAE of the model-collapse experiments of Shumailov et al.: a small
convolutional encoder q(z | x) = N(mu(x), diag(sigma^2(x))), a standard normal prior p(z) = N(0, I)
on a 20-dimensional latent, and a mirrored transposed-convolution decoder giving per-pixel Bernoulli
logits, trained with Adam (lr 1e-3) on the negative evidence lower bound (nats per image):

    -ELBO(x) = E_q[-log p(x | z)] + KL(q(z | x) || p(z))
             ~ sum_{i=1}^{784} BCE(logit_i(z), x_i) + 1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1),

with one reparameterised draw z = mu + sigma * eps, eps ~ N(0, I), per image. The targets are the
grayscale pixels x_i in [0, 1] (MNIST pixel / 255, not binarised), the standard practice for
grayscale MNIST. For such non-binary targets the reconstruction term is a cross-entropy
-[x log p + (1 - x) log(1 - p)], not the log-likelihood of a distribution over grayscale images:
the loss is "nats per image under the Bernoulli decoder", comparable between models on the same
data, and bounded below by the pixels' binary entropies sum_i H(x_i) rather than by 0.

Synthetic images (:meth:`VAEModule.sample`) decode z ~ N(0, I); with ``sample_mode="mean"`` (the
default, as in the published VAE experiments) an image is the decoder mean sigmoid(logits)
quantised to uint8, with ``"bernoulli"`` every pixel is drawn from the Bernoulli likelihood
(binary 0/255 images).

In evaluation mode (validation, test) the latent noise of each image is a fixed function of that
image (:meth:`VAEModule.eval_noise`), so one model always gets the same test loss, per image and in
total, whatever the global random state, batch size, data order or number of DDP processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from collapse.contract import SamplingModule
from collapse.errors import ConfigError
from lit_modules import config_with_overrides

IMAGE_SIZE = 28
"""Height and width of the images (pixels)."""
SAMPLE_MODES = ("mean", "bernoulli")
"""Accepted values of :attr:`VAEConfig.sample_mode`."""
EVAL_NOISE_SEED = 1_000_003
"""Seed of the evaluation-mode latent noise (see :meth:`VAEModule.eval_noise`)."""
DECODE_CHUNK = 4096
"""Images decoded at once by :meth:`VAEModule.sample` (bounds its memory; does not change the images)."""


@dataclass
class VAEConfig:
    """Settings of the convolutional VAE."""

    latent_dim: int = 20
    """Dimension of the latent z (20 in the published MNIST VAE)."""
    channels: tuple[int, int] = (32, 64)
    """Channels of the two stride-2 convolutions of the encoder (28 -> 14 -> 7); the decoder mirrors them."""
    hidden: int = 256
    """Width of the fully connected layer between the convolutions and the latent, in both directions."""
    lr: float = 1e-3
    """Adam learning rate (constant)."""
    sample_mode: str = "mean"
    """How sample() turns decoded logits into images: ``mean`` (uint8 sigmoid(logits), the published
    setting) or ``bernoulli`` (pixels drawn from the Bernoulli likelihood: binary 0/255 images)."""

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        if len(self.channels) != 2 or any(int(c) != c or c < 1 for c in self.channels):
            raise ConfigError(f"--model.channels must be two positive integers, got {self.channels!r}")
        if int(self.latent_dim) != self.latent_dim or self.latent_dim < 1:
            raise ConfigError(f"--model.latent_dim must be a positive integer, got {self.latent_dim!r}")
        if int(self.hidden) != self.hidden or self.hidden < 1:
            raise ConfigError(f"--model.hidden must be a positive integer, got {self.hidden!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--model.lr must be a positive number, got {self.lr!r}")
        if self.sample_mode not in SAMPLE_MODES:
            raise ConfigError(f"--model.sample_mode must be one of {SAMPLE_MODES}, got {self.sample_mode!r}")


class ConvVAE(nn.Module):
    """Encoder q(z | x) and decoder logits(z) of the VAE; see the module docstring.

    Encoder: conv 1 -> c1 (k4 s2 p1, 28 -> 14), conv c1 -> c2 (14 -> 7), fc c2*49 -> hidden -> 2 * latent.
    Decoder: fc latent -> hidden -> c2*49, transposed conv c2 -> c1 (7 -> 14), transposed conv c1 -> 1 (14 -> 28).
    """

    def __init__(self, latent_dim: int = 20, channels: Sequence[int] = (32, 64), hidden: int = 256):
        super().__init__()
        c1, c2 = channels
        self.latent_dim = latent_dim
        flat = c2 * 7 * 7
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1),  # (B, c1, 14, 14)
            nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # (B, c2, 7, 7)
            nn.ReLU(),
            nn.Flatten(),  # (B, c2 * 49)
            nn.Linear(flat, hidden),  # (B, hidden)
            nn.ReLU(),
            nn.Linear(hidden, 2 * latent_dim),  # (B, 2 L): mu and log sigma^2
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden),  # (B, hidden)
            nn.ReLU(),
            nn.Linear(hidden, flat),  # (B, c2 * 49)
            nn.ReLU(),
            nn.Unflatten(1, (c2, 7, 7)),  # (B, c2, 7, 7)
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),  # (B, c1, 14, 14)
            nn.ReLU(),
            nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1),  # (B, 1, 28, 28) logits
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters of images ``x`` (B, 1, 28, 28) in [0, 1]: ``(mu, logvar)``, each ``(B, L)``."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # (B, L), (B, L)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of the pixels given latents ``z`` (B, L): shape ``(B, 1, 28, 28)``."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode, reparameterise z = mu + exp(logvar / 2) * eps and decode: ``(logits, mu, logvar)``.

        ``eps`` (B, L) is the standard normal noise; drawn from the global RNG when not given. The
        reparameterisation runs in float32 whatever the precision (under bf16 autocast ``mu`` comes out in
        bf16, which would round the noise and the KL term's inputs); ``mu`` and ``logvar`` are returned in
        float32 (float64 stays float64) and ``z`` goes to the decoder in the encoder's output dtype.
        """
        mu, logvar = self.encode(x)  # (B, L), (B, L)
        dtype = mu.dtype
        mu, logvar = at_least_float32(mu), at_least_float32(logvar)
        if eps is None:
            eps = torch.randn_like(mu)  # (B, L)
        z = mu + torch.exp(0.5 * logvar) * eps.to(mu)  # (B, L) float32 (or float64)
        return self.decode(z.to(dtype)), mu, logvar


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is half precision (bf16, fp16), else unchanged (float32, float64)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def elbo_terms(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the single-sample negative ELBO of each image, in nats: ``(recon, kl)``, each ``(B,)``.

    recon = sum over pixels of BCE-with-logits(logits, x) (a cross-entropy for grayscale targets x in
    [0, 1]); kl = 1/2 sum_j (mu_j^2 + exp(logvar_j) - logvar_j - 1) = KL(N(mu, sigma^2) || N(0, 1)). Both are
    summed in float32 when the inputs are half precision (float64 stays float64).
    """
    logits, x, mu, logvar = (at_least_float32(t) for t in (logits, x, mu, logvar))
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)  # (B,)
    kl = 0.5 * (mu.square() + logvar.exp() - logvar - 1).sum(1)  # (B,)
    return recon, kl


def batch_images(batch: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The images of a batch: the batch itself (B, 1, 28, 28), or the first element of a tuple/list batch."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.shape[1] != 1:
        got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"expected an image batch of shape (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), got {got}")
    return batch


class VAEModule(SamplingModule):
    """Lightning wrapper of :class:`ConvVAE`: negative-ELBO training, logging and ``sample(n, generator)``.

    Build it from a :class:`VAEConfig`, keyword overrides of its fields, or both:
    ``VAEModule(VAEConfig(latent_dim=8))``, ``VAEModule(latent_dim=8)``. The resolved settings are the
    hyperparameters (flat, so ``load_from_checkpoint`` rebuilds the same model).

    Logged per stage (epoch means weighted by batch size, reduced over DDP ranks): ``<stage>_loss``
    (negative ELBO, nats per image under the Bernoulli decoder), ``<stage>_recon`` and ``<stage>_kl``.
    """

    def __init__(self, config: VAEConfig | None = None, **overrides: Any):
        super().__init__()
        self.config = config_with_overrides(VAEConfig, config, overrides, "VAE")  # runs VAEConfig's checks
        self.save_hyperparameters(asdict(self.config))
        self.vae = ConvVAE(self.config.latent_dim, self.config.channels, self.config.hidden)

    def eval_noise(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation-mode latent noise eps of images ``x`` (B, 1, 28, 28): shape ``(B, L)``, N(0, I) draws.

        Row i depends on image i alone: its pixels, quantised to 0..255, are hashed into a seed,
        k_i = sum_p w_p round(255 x_ip) with fixed pseudo-random integer weights w_p (exact in int64,
        so equal on every device), and eps_i is drawn by a CPU generator seeded with k_i. Hence the
        single-sample ELBO estimate of an image is the same in any batch, order, process count or
        global RNG state, while distinct images still get independent-looking noise (so the test-set
        mean stays an unbiased ELBO estimate rather than one shared draw).
        """
        pixels = torch.round(x.detach().flatten(1).clamp(0, 1) * 255).to(torch.int64)  # (B, P), 0..255
        weights = torch.randint(
            1, 2**31, (pixels.shape[1],), generator=torch.Generator().manual_seed(EVAL_NOISE_SEED)
        )  # (P,)
        keys = (pixels * weights.to(pixels.device)).sum(1).tolist()  # B ints < 255 * P * 2^31 < 2^63
        generator = torch.Generator()
        rows = [torch.randn(self.config.latent_dim, generator=generator.manual_seed(k)) for k in keys]
        if not rows:
            return torch.zeros(0, self.config.latent_dim, device=x.device)
        return torch.stack(rows).to(x.device)  # (B, L)

    def loss_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, recon, kl)`` of each image of ``x`` (B, 1, 28, 28), in nats, each ``(B,)``; loss = recon + kl.

        The latent noise comes from the global RNG in training mode and from :meth:`eval_noise` in
        evaluation mode (``not self.training``: validation, test), where the result is deterministic.
        """
        eps = None if self.training else self.eval_noise(x)
        logits, mu, logvar = self.vae(x, eps)  # (B, 1, 28, 28), (B, L), (B, L)
        recon, kl = elbo_terms(logits, x, mu, logvar)
        return recon + kl, recon, kl

    def negative_elbo(self, batch: torch.Tensor | Sequence[torch.Tensor], batch_idx: int | None = None) -> torch.Tensor:
        """Single-sample negative ELBO of each image of a batch, nats per image: shape ``(B,)``.

        ``batch_idx`` is accepted for symmetry with the step methods and unused: the noise is per image.
        """
        return self.loss_terms(batch_images(batch))[0]

    def model_step(self, batch: torch.Tensor | Sequence[torch.Tensor], stage: str) -> torch.Tensor:
        """Mean negative ELBO of a batch, logged with its terms: ``<stage>_loss``, ``<stage>_recon``, ``<stage>_kl``."""
        x = batch_images(batch)  # (B, 1, 28, 28)
        loss, recon, kl = (t.mean() for t in self.loss_terms(x))  # batch means, nats per image
        size = x.shape[0]
        for name, value in (("loss", loss), ("recon", recon), ("kl", kl)):
            if stage == "train":
                self.log(f"train_{name}", value, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
            else:  # exact over the disjoint shares of the processes
                self.log_mean(f"{stage}_{name}", value, size)
        return loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "train")

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.config.lr)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> dict[str, np.ndarray]:
        """``n`` synthetic images decoded from z ~ N(0, I) drawn from ``generator``: ``{"images": uint8 (n, 28, 28)}``.

        ``mean``: pixel = round(255 * sigmoid(logit)); ``bernoulli``: pixel = 255 * [u < sigmoid(logit)],
        u ~ U(0, 1) from ``generator``, i.e. a Bernoulli draw. All randomness comes from ``generator``
        (in a fixed order), so a given generator seed gives the same images; the model is put in
        evaluation mode for the call and its training flag restored afterwards.
        """
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        was_training = self.training
        self.eval()
        try:
            gen_device = generator.device
            z = torch.randn(n, self.config.latent_dim, generator=generator, device=gen_device)  # (n, L)
            chunks = []
            for start in range(0, n, DECODE_CHUNK):
                # In the weights' dtype: a bf16-true or 16-true fit leaves them in half precision (no autocast here).
                latent = z[start : start + DECODE_CHUNK].to(self.device, next(self.parameters()).dtype)
                logits = self.vae.decode(latent)  # (b, 1, 28, 28)
                p = torch.sigmoid(logits.float())[:, 0]  # (b, 28, 28)
                if self.config.sample_mode == "mean":
                    pixels = torch.round(p * 255)
                else:
                    u = torch.rand(p.shape, generator=generator, device=gen_device).to(p.device)  # (b, 28, 28)
                    pixels = (u < p).float() * 255
                chunks.append(pixels.to(torch.uint8).cpu())
            images = torch.cat(chunks) if chunks else torch.zeros(0, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
            return {"images": images.numpy()}
        finally:
            self.train(was_training)


__all__ = [
    "EVAL_NOISE_SEED",
    "SAMPLE_MODES",
    "ConvVAE",
    "VAEConfig",
    "VAEModule",
    "batch_images",
    "elbo_terms",
]
