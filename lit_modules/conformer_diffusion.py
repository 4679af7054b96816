"""A GeoDiff-style denoising diffusion model of molecular conformations (3-D atom coordinates given the graph).

Gerstgrasser et al. ran GeoDiff (Xu et al., ICLR 2022) on GEOM-Drugs in their model-collapse
experiments: a model that, given a molecular graph G, generates coordinates x (N, 3) by reversing a
diffusion. This module keeps GeoDiff's diffusion (DDPM with its sigmoid beta schedule, 5000 steps on
GEOM) and its conditioning on the graph, with a simpler denoiser:

* **What differs from GeoDiff.** GeoDiff's network predicts noise on *inter-atomic distances* with a
  graph field network and maps it to coordinates by the chain rule (an equivariant combination of
  relative vectors). Ours, :class:`EquivariantDenoiser`, is an EGNN-style (Satorras et al. 2021)
  coordinate-space noise predictor: message passing over the chemical bonds plus radius edges (all
  pairs of one molecule closer than ``cutoff`` in the current noisy coordinates, their messages scaled
  by a smooth envelope that vanishes at the cutoff, so the prediction is continuous in the coordinates),
  messages built from invariants only (distances, atom/bond/time embeddings), noise output a combination
  of relative vectors x_i - x_j. The output is therefore E(3)-equivariant (rotations, reflections) and translation
  invariant, like GeoDiff's, and it is trained with the plain DDPM noise-prediction loss in the
  zero-centre-of-mass subspace, as EDM (Hoogeboom et al. 2022) does.

* **Diffusion, in the zero-CoM subspace** (all noise is projected to zero mean per molecule):

      x_0 = real coordinates minus their centroid
      x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,    eps ~ N(0, I) projected to zero CoM,  t = 1..T
      loss = mean over molecules of 1/(3 N) sum_i ||eps_i - eps_theta(x_t, G, t)_i||^2   (t uniform per molecule)

  The per-molecule loss is a mean over its 3 N coordinates (so an untrained net predicting 0 scores
  about (N - 1) / N: the zero-CoM noise has 3 (N - 1) degrees of freedom).

* **Schedule.** GeoDiff's: beta_k = sigmoid(linspace(-6, 6, 5000))_k (beta_end - beta_start) + beta_start,
  abar_k = prod_{i <= k} (1 - beta_i) (beta 1e-7 .. 2e-3 on GEOM). With T != 5000 steps the chain is
  that 5000-step chain observed at T evenly spaced times: abar_t = abar^(5000)(t 5000 / T), with log abar
  interpolated linearly between integer steps when T does not divide 5000, and beta_t = 1 - abar_t / abar_{t-1}.
  So every T keeps GeoDiff's total noise (abar_T = abar^(5000)_5000 ~ 0.007) and its sigmoid shape;
  to first order this is "beta scaled by 5000 / T".

* **Sampling** (:meth:`ConformerDiffusionModule.generate`): ancestral DDPM from x_T ~ N(0, I) (zero CoM),

      x_{t-1} = 1 / sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, G, t)) + sigma_t z,
      sigma_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t)   (the posterior variance of q(x_{t-1} | x_t, x_0)),

  z ~ N(0, I) zero CoM. With ``sample_steps`` S < T it runs on the evenly spaced timesteps
  tau_k = round(k T / S), k = 1..S, with the respaced beta_k = 1 - abar_{tau_k} / abar_{tau_{k-1}}
  (abar_{tau_0} = 1) in the same update. x stays centred (re-projected after every step).

Synthetic data (:meth:`ConformerDiffusionModule.sample`) are new conformations of given training graphs,
as GeoDiff generated conformers for given molecules; broken (non-finite or exploded) conformers are
redrawn, replaced by the real ones or refused, per ``on_broken``.

The validation and test loss use fixed timesteps and noise that depends only on the molecule's
``mol_id`` (:meth:`ConformerDiffusionModule.eval_noise`), so one model gets the same loss whatever the
batch size, data order, global RNG state or number of processes, and every generation of a run is
scored on identical noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from collapse.contract import SamplingModule
from collapse.errors import ConfigError, UserError
from datamodules.mol_graph import (
    ATOM_FEATURE_SIZES,
    MAX_ATOMIC_NUMBER,
    NUM_BOND_TYPES,
    MoleculeBatch,
    MolGraph,
    collate_molecules,
    conformer_rows,
)
from lit_modules import config_with_overrides

GEODIFF_STEPS = 5000
"""Number of diffusion steps of GeoDiff's schedule; every T is a respacing of this chain."""
SCHEDULES = ("sigmoid", "linear")
"""Accepted values of :attr:`ConformerDiffusionConfig.schedule`."""
BROKEN_POLICIES = ("resample", "real", "fail")
"""Accepted values of :attr:`ConformerDiffusionConfig.on_broken`."""
EVAL_NOISE_SEED = 2_000_003
"""Seed of the evaluation-mode noise (see :meth:`ConformerDiffusionModule.eval_noise`)."""


@dataclass
class ConformerDiffusionConfig:
    """Settings of the conformer diffusion model (CPU-sized defaults; the GEOM recipe sets GeoDiff's)."""

    hidden: int = 64
    """Width of the atom features and messages of the denoiser."""
    num_layers: int = 4
    """Message-passing layers of the denoiser."""
    cutoff: float = 5.0
    """Radius (Angstrom) of the non-bonded edges: atom pairs of one molecule closer than this in the noisy
    coordinates exchange messages, weighted by a cosine envelope that falls to 0 at the cutoff (bonded
    pairs always do, at full weight). GeoDiff's global edges used 10; 5 keeps CPU runs fast and still
    covers nearly every pair of a QM9 molecule."""
    num_rbf: int = 16
    """Gaussian radial basis functions of the distance (centres evenly spaced on [0, cutoff])."""
    num_steps: int = 100
    """Diffusion steps T. GeoDiff used 5000; smaller T respaces that chain (same total noise, see the module doc)."""
    beta_start: float = 1e-7
    """beta of the first step of the 5000-step reference schedule (GeoDiff's GEOM value)."""
    beta_end: float = 2e-3
    """beta of the last step of the 5000-step reference schedule (GeoDiff's GEOM value)."""
    schedule: str = "sigmoid"
    """Shape of the reference betas: ``sigmoid`` (GeoDiff's, sigmoid(linspace(-6, 6))) or ``linear``."""
    lr: float = 5e-3
    """Peak AdamW learning rate, constant after warmup. GeoDiff used 1e-3 over millions of steps; the CPU default's
    fits are about a thousand steps, where 5e-3 gave a lower test loss (0.28 against 0.34 after 800 steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay (GeoDiff: 0)."""
    warmup_steps: int = 100
    """Optimizer steps of linear learning-rate warmup from lr / warmup_steps to lr."""
    sample_steps: int | None = None
    """Denoising steps of sampling: None runs all T; fewer run respaced ancestral sampling on an evenly
    spaced subsequence of the T timesteps."""
    eval_timesteps: int = 10
    """Fixed timesteps of the validation/test loss (midpoints of K equal bins of 1..T, K <= T)."""
    broken_threshold: float = 50.0
    """A generated conformer with any centred coordinate beyond this (Angstrom), or non-finite, is broken."""
    on_broken: str = "resample"
    """What sample() does with broken conformers: ``resample`` (redraw up to max_resample times, then use
    the real coordinates), ``real`` (use the real coordinates at once) or ``fail`` (raise)."""
    max_resample: int = 3
    """Redraws of a broken conformer under ``on_broken=resample`` before its real coordinates replace it."""
    sample_batch_size: int = 256
    """Molecules generated at once by sample()."""

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"--model.{name} must be an integer >= {minimum}, got {value!r}")

        def positive_float(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                raise ConfigError(
                    f"--model.{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}"
                )

        for name in ("hidden", "num_layers", "num_rbf", "num_steps", "eval_timesteps", "sample_batch_size"):
            positive_int(name)
        positive_int("warmup_steps", 0)
        positive_int("max_resample", 0)
        for name in ("cutoff", "lr", "broken_threshold", "beta_start", "beta_end"):
            positive_float(name)
        positive_float("weight_decay", allow_zero=True)
        if not self.beta_start < self.beta_end < 1:
            raise ConfigError(
                f"need 0 < --model.beta_start < --model.beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--model.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.on_broken not in BROKEN_POLICIES:
            raise ConfigError(f"--model.on_broken must be one of {BROKEN_POLICIES}, got {self.on_broken!r}")
        if self.sample_steps is not None:
            positive_int("sample_steps")
            if self.sample_steps > self.num_steps:
                raise ConfigError(
                    f"--model.sample_steps ({self.sample_steps}) must be at most --model.num_steps ({self.num_steps})"
                )
        if self.eval_timesteps > self.num_steps:
            raise ConfigError(
                f"--model.eval_timesteps ({self.eval_timesteps}) must be at most --model.num_steps ({self.num_steps})"
            )


# ------------------------------------------------------------------------------------------ schedule


def reference_betas(
    schedule: str = "sigmoid", beta_start: float = 1e-7, beta_end: float = 2e-3, steps: int = GEODIFF_STEPS
) -> torch.Tensor:
    """The betas of GeoDiff's ``steps``-step chain, float64 ``(steps,)``.

    sigmoid: beta_k = sigmoid(linspace(-6, 6, steps))_k (beta_end - beta_start) + beta_start;
    linear:  beta_k = linspace(beta_start, beta_end, steps)_k.
    """
    if schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def alpha_bar(
    num_steps: int, schedule: str = "sigmoid", beta_start: float = 1e-7, beta_end: float = 2e-3
) -> torch.Tensor:
    """abar_t for t = 0..T (abar_0 = 1), float64 ``(T + 1,)``: the 5000-step reference chain at T evenly spaced times.

    abar_t = abar^(5000)(s_t), s_t = t 5000 / T, with log abar^(5000) interpolated linearly between its
    integer steps (exact subsampling when T divides 5000; the reference itself when T = 5000).
    """
    log_ref = torch.cat(
        [
            torch.zeros(1, dtype=torch.float64),
            torch.cumsum(torch.log1p(-reference_betas(schedule, beta_start, beta_end)), 0),
        ]
    )  # (5001,)
    s = torch.arange(num_steps + 1, dtype=torch.float64) * (GEODIFF_STEPS / num_steps)  # (T + 1,) in [0, 5000]
    lo = s.floor().long().clamp(max=GEODIFF_STEPS - 1)
    frac = s - lo
    return torch.exp(log_ref[lo] * (1 - frac) + log_ref[lo + 1] * frac)


def respaced_timesteps(num_steps: int, sample_steps: int | None) -> list[int]:
    """The timesteps [tau_0 = 0, tau_1, ..., tau_S = T] that sampling visits (backwards), tau_k = round(k T / S)."""
    steps = num_steps if sample_steps is None else sample_steps
    if not 1 <= steps <= num_steps:
        raise ValueError(f"sample_steps must be in 1..{num_steps}, got {sample_steps}")
    return [round(k * num_steps / steps) for k in range(steps + 1)]


# ------------------------------------------------------------------------------------------ graph helpers


def scatter_mean(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of the rows of ``values`` (M, D) per group ``index`` (M,) in 0..size-1: shape ``(size, D)`` (0 if empty)."""
    total = values.new_zeros(size, values.shape[1]).index_add_(0, index, values)
    # Counted by adding ones, not torch.bincount, which on a GPU reads the largest index back to the host (the
    # host waits for the device at every call); sums of ones are exact in float32 in any order.
    ones = torch.ones(index.shape[0], dtype=torch.float32, device=index.device)
    count = torch.zeros(size, dtype=torch.float32, device=index.device).index_add_(0, index, ones)
    return total / count.clamp_min(1).to(values.dtype)[:, None]


def remove_mean(pos: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """``pos`` (sumN, 3) with each molecule's centroid subtracted: the projection to the zero-CoM subspace."""
    return pos - scatter_mean(pos, batch, num_graphs)[batch]


@dataclass
class AtomPairs:
    """All ordered pairs (i, j), i != j, of atoms of the same molecule, and the bond code of each (0: not bonded)."""

    src: torch.Tensor  # (P,) receiving atom i
    dst: torch.Tensor  # (P,) sending atom j
    bond: torch.Tensor  # (P,) bond code 1..4, 0 when i, j are not bonded


def atom_pairs(batch: MoleculeBatch) -> AtomPairs:
    """Every intra-molecular ordered atom pair of ``batch``: sum_m N_m (N_m - 1) pairs, built without an (sumN)^2 array.

    Atom i (local index a in a molecule of n atoms) owns the n - 1 consecutive pairs starting at
    row_start_i; its r-th pair goes to local atom b = r + [r >= a]. Hence bond (i, j) sits at pair
    row_start_i + b_j - [b_j > a_i], which labels the pairs with bond codes in O(E).
    """
    counts = batch.num_atoms.to(batch.batch.device)  # (B,)
    offsets = torch.cumsum(counts, 0) - counts  # (B,) first atom of each molecule
    n_atoms = batch.batch.shape[0]
    local = torch.arange(n_atoms, device=counts.device) - offsets[batch.batch]  # (sumN,) a_i
    degree = counts[batch.batch] - 1  # (sumN,) n - 1 partners per atom
    row_start = torch.cumsum(degree, 0) - degree  # (sumN,)
    src = torch.repeat_interleave(torch.arange(n_atoms, device=counts.device), degree)  # (P,)
    r = torch.arange(src.shape[0], device=counts.device) - row_start[src]  # (P,) 0..n-2
    dst = offsets[batch.batch[src]] + r + (r >= local[src]).long()  # (P,)
    bond = torch.zeros_like(src)
    if batch.edge_index.numel():
        i, j = batch.edge_index
        b_j = local[j]
        bond[row_start[i] + b_j - (b_j > local[i]).long()] = batch.bond_type.to(bond)
    return AtomPairs(src, dst, bond)


def sinusoidal_embedding(s: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style embedding of diffusion times s = t / T in (0, 1] (B,): ``(B, dim)``.

    emb = [sin(1000 s f_k), cos(1000 s f_k)], f_k = 10000^(-k / (dim/2)), k < dim/2: the DDPM embedding
    of an integer step on a 1000-step scale, so the same s gets the same embedding whatever T is.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=s.dtype, device=s.device) / max(half, 1))
    angles = 1000.0 * s[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return nn.functional.pad(emb, (0, dim - 2 * half))  # (B, dim)


# ------------------------------------------------------------------------------------------ network


def cutoff_envelope(dist: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Smooth cutoff weight of distances ``dist`` (any shape): 0.5 (cos(pi d / c) + 1) for d < c, else 0.

    It is 1 at d = 0 and falls to 0 with zero slope at d = c (the cosine cutoff of SchNet-style models),
    so messages scaled by it vanish continuously as a pair leaves the radius graph.
    """
    inside = dist < cutoff
    return torch.where(inside, 0.5 * (torch.cos(dist * (math.pi / cutoff)) + 1.0), torch.zeros_like(dist))


class InteractionLayer(nn.Module):
    """One EGNN-style layer on fixed coordinates: h_i += phi_h(h_i, W_m mean_j u_ij + b_m), u_ij = silu(pre_ij),

        pre_ij = W_r h_i + W_s h_j + e_ij,    mean_j u_ij = sum_j w_ij u_ij / max(1, sum_j w_ij),

    with e_ij this layer's linear map of the invariant edge features and w_ij in [0, 1] the edge's
    envelope weight (1 for bonds, :func:`cutoff_envelope` of the distance otherwise; both from the
    caller). The weighted mean makes the layer continuous as a pair crosses the cutoff (its weight goes
    to 0 there), where a plain mean over the neighbours would jump. Two rewrites keep the per-pair work
    small, without changing the function class: the node terms W_r h, W_s h are computed once per atom
    and gathered, and the message's last linear map W_m is applied after the (linear) mean.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.receiver = nn.Linear(hidden, hidden)
        self.sender = nn.Linear(hidden, hidden, bias=False)
        self.message = nn.Linear(hidden, hidden)
        self.update = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.norm = nn.LayerNorm(hidden)

    def forward(
        self,
        h: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
        edge: torch.Tensor,
        weight: torch.Tensor,
        inv_degree: torch.Tensor,
    ) -> torch.Tensor:
        """New atom features ``(sumN, H)`` from ``h`` (sumN, H), edges src <- dst, their edge terms ``(P', H)``
        and envelope weights ``(P',)``; ``inv_degree`` (sumN,) is 1 / max(1, sum of the weights at each atom)."""
        pre = self.receiver(h).index_select(0, src)  # (P', H); in-place adds below spare two (P', H) buffers
        pre = pre.add_(self.sender(h).index_select(0, dst)).add_(edge)
        u = nn.functional.silu(pre).to(h.dtype).mul_(weight.to(h.dtype)[:, None])  # (P', H) w_ij u_ij
        mean_u = h.new_zeros(h.shape).index_add_(0, src, u) * inv_degree[:, None]  # (sumN, H)
        return h + self.update(torch.cat([self.norm(h), self.message(mean_u)], dim=1))  # (sumN, H)


class EquivariantDenoiser(nn.Module):
    """E(3)-equivariant noise predictor eps_theta(x_t, G, t) over chemical bonds plus radius edges.

    Atom features h_i^0 = emb(z_i) + sum_c emb_c(atom_feat_ic) + MLP(sinusoidal(t / T))[molecule of i].
    Edges: every bond (type 1..4) and every same-molecule pair within ``cutoff`` in x_t (type 0). Edge
    features are invariant: RBF(d_ij), d_ij^2 / cutoff^2 (clipped at 4) and the one-hot edge type. Each
    edge carries a weight w_ij: 1 for a bond, the smooth envelope :func:`cutoff_envelope` of d_ij for a
    radius edge, which falls to 0 at the cutoff, so eps is continuous in x_t (a hard cutoff would make
    it jump whenever a pair crosses it). After ``num_layers`` :class:`InteractionLayer` updates, with
    a_ij = w^T silu(W_r h_i + W_s h_j + e_ij) a scalar per edge (phi_x) and s(h_i) a scalar per atom,

        eps_i = s(h_i) (x_i - xbar) + 1/deg_i sum_j w_ij (x_i - x_j) / (d_ij + 1) a_ij,   then eps -= mean_i eps_i,

    where deg_i = max(1, sum_j w_ij) and xbar is the molecule's centroid (itself the mean of the relative
    vectors x_i - x_j). Relative vectors times invariant scalars: rotating or reflecting x_t rotates eps,
    translating it changes nothing.
    """

    def __init__(self, hidden: int = 64, num_layers: int = 4, cutoff: float = 5.0, num_rbf: int = 16):
        super().__init__()
        self.cutoff = cutoff
        self.select_pairs: bool | None = None
        """Whether the pairs beyond the cutoff are dropped before the message passing (None: on a CPU only; the
        result is the same either way, as those pairs weigh 0)."""
        self.hidden = hidden
        self.num_layers = num_layers
        self.atom_emb = nn.Embedding(MAX_ATOMIC_NUMBER + 1, hidden)
        self.feat_emb = nn.ModuleList(nn.Embedding(size, hidden) for size in ATOM_FEATURE_SIZES)
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.register_buffer("rbf_centres", torch.linspace(0.0, cutoff, num_rbf), persistent=False)
        self.rbf_width = cutoff / num_rbf
        # One linear map of the edge features for all layers and the coordinate head at once (one matmul).
        self.edge_proj = nn.Linear(num_rbf + 1 + NUM_BOND_TYPES, hidden * (num_layers + 1), bias=False)
        self.layers = nn.ModuleList(InteractionLayer(hidden) for _ in range(num_layers))
        self.coord_receiver = nn.Linear(hidden, hidden)
        self.coord_sender = nn.Linear(hidden, hidden, bias=False)
        self.coord_out = nn.Linear(hidden, 1, bias=False)
        self.centre_head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 1))

    def forward(
        self, x: torch.Tensor, batch: MoleculeBatch, t_frac: torch.Tensor, pairs: AtomPairs | None = None
    ) -> torch.Tensor:
        """Predicted noise ``(sumN, 3)``, zero mean per molecule, of coordinates ``x`` (sumN, 3) at times
        ``t_frac`` = t / T (B,); ``pairs`` (from :func:`atom_pairs`) can be passed to reuse it across steps."""
        pairs = atom_pairs(batch) if pairs is None else pairs
        num_graphs = batch.num_graphs
        # Radius graph on the current coordinates: bonds always, other pairs when d_ij < cutoff.
        rel_all = x.index_select(0, pairs.src) - x.index_select(0, pairs.dst)  # (P, 3)
        d2_all = rel_all.square().sum(1)  # (P,)
        select = x.device.type == "cpu" if self.select_pairs is None else self.select_pairs
        if select:  # the pairs within reach: less work downstream
            keep = torch.nonzero((pairs.bond > 0) | (d2_all < self.cutoff**2))[:, 0]  # (P',)
            src, dst, bond_code = pairs.src[keep], pairs.dst[keep], pairs.bond[keep]
            rel, d2 = rel_all[keep], d2_all[keep]  # (P', 3), (P',)
        else:
            # Every pair: the ones beyond the cutoff weigh 0 below and add exact zeros, and selecting them would
            # make the host wait for the device (the size of a nonzero) at every step of training and sampling.
            src, dst, bond_code, rel, d2 = pairs.src, pairs.dst, pairs.bond, rel_all, d2_all
        dist = d2.clamp_min(0).sqrt()  # (P',)
        # w_ij: 1 on bonds, the cutoff envelope (-> 0 at the cutoff) on radius edges, so that a pair entering
        # or leaving the radius graph changes nothing and eps is a continuous function of x.
        weight = torch.where(bond_code > 0, torch.ones_like(dist), cutoff_envelope(dist, self.cutoff))  # (P',)
        rbf = torch.exp(-0.5 * ((dist[:, None] - self.rbf_centres.to(x)) / self.rbf_width).square())  # (P', R)
        bond = nn.functional.one_hot(bond_code, NUM_BOND_TYPES).to(x)  # (P', 5)
        features = torch.cat([rbf, (d2 / self.cutoff**2).clamp(max=4.0)[:, None], bond], dim=1)  # (P', R + 6)
        edge_terms = self.edge_proj(features).split(self.hidden, dim=1)  # num_layers + 1 of (P', H)
        # Soft degree sum_j w_ij, floored at 1: an atom whose only partners sit near the cutoff gets
        # vanishing messages rather than the full weight of a plain mean over them.
        inv_degree = 1.0 / x.new_zeros(x.shape[0]).index_add_(0, src, weight).clamp_min(1.0)  # (sumN,)

        h = self.atom_emb(batch.z) + sum(emb(batch.atom_feat[:, c]) for c, emb in enumerate(self.feat_emb))
        time = self.time_mlp(sinusoidal_embedding(t_frac.to(x), self.hidden))  # (B, H)
        h = h.to(x) + time.index_select(0, batch.batch)  # (sumN, H)
        for layer, edge in zip(self.layers, edge_terms):
            h = layer(h, src, dst, edge, weight, inv_degree)
        # a_ij = w^T silu(W_r h_i + W_s h_j + e_ij): the invariant weight of the relative vector x_i - x_j.
        pre = self.coord_receiver(h).index_select(0, src)  # (P', H)
        pre = pre.add_(self.coord_sender(h).index_select(0, dst)).add_(edge_terms[-1])
        coord_weight = self.coord_out(nn.functional.silu(pre))  # (P', 1)
        pair_term = rel * (coord_weight * (weight / (dist + 1.0))[:, None])  # (P', 3)
        # eps_i = s(h_i) (x_i - xbar) + sum_j w_ij (x_i - x_j) / (d_ij + 1) a_ij / max(1, sum_j w_ij)
        eps = x.new_zeros(x.shape).index_add_(0, src, pair_term) * inv_degree[:, None]
        eps = eps + self.centre_head(h) * remove_mean(x, batch.batch, num_graphs)  # (sumN, 3)
        return remove_mean(eps, batch.batch, num_graphs)  # (sumN, 3), zero CoM


# ------------------------------------------------------------------------------------------ Lightning


class ConformerDiffusionModule(SamplingModule):
    """Lightning wrapper of :class:`EquivariantDenoiser`: DDPM training, fixed-noise evaluation and sampling.

    Build it from a :class:`ConformerDiffusionConfig`, keyword overrides of its fields, or both. The
    resolved settings are the (flat) hyperparameters. Logged: ``train_loss``, ``val_loss``, ``test_loss``
    (noise-prediction MSE per coordinate, mean over molecules; epoch means weighted by molecules).

    Synthetic data: call :meth:`configure_sampling` with the training graphs, then ``sample(n, generator)``.
    """

    ragged_samples = {"pos": "num_atoms"}
    """The sampled coordinates are stored without the padding of their rows (room for the largest molecule)."""

    def __init__(self, config: ConformerDiffusionConfig | None = None, **overrides: Any):
        super().__init__()
        self.config = config_with_overrides(ConformerDiffusionConfig, config, overrides, "conformer diffusion")
        self.save_hyperparameters(asdict(self.config))
        cfg = self.config
        self.denoiser = EquivariantDenoiser(cfg.hidden, cfg.num_layers, cfg.cutoff, cfg.num_rbf)
        abar = alpha_bar(cfg.num_steps, cfg.schedule, cfg.beta_start, cfg.beta_end)  # (T + 1,) float64
        self.abar64 = abar  # CPU float64 copy: sampling coefficients are computed from it in double precision
        self.register_buffer("sqrt_abar", abar.sqrt().float(), persistent=False)  # (T + 1,)
        self.register_buffer("sqrt_one_minus_abar", (1 - abar).sqrt().float(), persistent=False)  # (T + 1,)
        self.sampling_graphs: Sequence[MolGraph] | None = None
        self._sampling_lazy = False
        self._sampling_max_atoms = 0
        self.real_pos_fallback = True
        self.last_sample_stats: dict[str, int] = {}

    # -- diffusion ---------------------------------------------------------------------------------

    @property
    def betas(self) -> torch.Tensor:
        """beta_t = 1 - abar_t / abar_{t-1} for t = 1..T, float64 ``(T,)``."""
        return 1 - self.abar64[1:] / self.abar64[:-1]

    def forward(
        self, batch: MoleculeBatch, x_t: torch.Tensor, t: torch.Tensor, pairs: AtomPairs | None = None
    ) -> torch.Tensor:
        """eps_theta(x_t, G, t): predicted noise ``(sumN, 3)`` of coordinates ``x_t`` at integer steps ``t`` (B,)."""
        return self.denoiser(x_t, batch, t.to(x_t) / self.config.num_steps, pairs)

    @staticmethod
    def zero_com_noise(batch: MoleculeBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """eps ~ N(0, I) on the atoms of ``batch``, projected to zero mean per molecule: ``(sumN, 3)`` float32.

        Drawn on the generator's device (the global RNG of the batch's device when None), returned on the batch's.
        """
        device = batch.batch.device if generator is None else generator.device
        eps = torch.randn(batch.batch.shape[0], 3, generator=generator, device=device).to(batch.batch.device)
        return remove_mean(eps, batch.batch, batch.num_graphs)

    def noisy_coordinates(self, batch: MoleculeBatch, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at steps ``t`` (B,), x_0 = ``batch.pos`` centred: (sumN, 3).

        With zero-CoM noise ``eps`` (sumN, 3), x_t has zero CoM too (a sum of two zero-CoM terms).
        """
        x0 = remove_mean(batch.pos, batch.batch, batch.num_graphs)  # (sumN, 3)
        per_atom_t = t[batch.batch]  # (sumN,)
        signal = self.sqrt_abar[per_atom_t].to(x0)[:, None]  # (sumN, 1) sqrt(abar_t)
        noise = self.sqrt_one_minus_abar[per_atom_t].to(x0)[:, None]  # (sumN, 1) sqrt(1 - abar_t)
        return signal * x0 + noise * eps.to(x0)  # (sumN, 3)

    def denoising_loss(self, batch: MoleculeBatch, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-molecule loss 1/(3 N) sum_i ||eps_i - eps_theta(x_t)_i||^2 at steps ``t`` (B,) and noise ``eps``
        (sumN, 3) (zero CoM), x_t from :meth:`noisy_coordinates`: shape ``(B,)``."""
        x_t = self.noisy_coordinates(batch, t, eps)  # (sumN, 3)
        err = (eps.to(x_t) - self(batch, x_t, t)).square().sum(1)  # (sumN,) ||eps_i - eps_hat_i||^2
        return scatter_mean(err[:, None], batch.batch, batch.num_graphs)[:, 0] / 3  # (B,)

    def eval_timestep_values(self) -> torch.Tensor:
        """The K fixed timesteps of the evaluation loss, t_k = ceil((k + 1/2) T / K), k = 0..K-1 (bin midpoints)."""
        k = torch.arange(self.config.eval_timesteps, dtype=torch.float64)
        return torch.ceil((k + 0.5) * self.config.num_steps / self.config.eval_timesteps).long()  # (K,)

    def eval_noise(self, batch: MoleculeBatch) -> torch.Tensor:
        """The fixed evaluation noise of ``batch``: ``(K, sumN, 3)``, zero CoM per molecule and timestep.

        Molecule m's noise (K, N_m, 3) is drawn by a CPU generator seeded with (EVAL_NOISE_SEED, mol_id_m), so
        the noise of (molecule, timestep index) is the same in any batch, order, process or global RNG state.
        """
        k = self.config.eval_timesteps
        generator = torch.Generator()
        draws = [
            torch.randn(k, n, 3, generator=generator.manual_seed((EVAL_NOISE_SEED << 32) + (mol_id & 0xFFFFFFFF)))
            for mol_id, n in zip(batch.mol_id.tolist(), batch.num_atoms.tolist())
        ]
        eps = torch.cat(draws, dim=1).to(batch.batch.device)  # (K, sumN, 3)
        return torch.stack([remove_mean(e, batch.batch, batch.num_graphs) for e in eps])

    def eval_loss(self, batch: MoleculeBatch) -> torch.Tensor:
        """Deterministic per-molecule loss ``(B,)``: the mean of :meth:`denoising_loss` over the K fixed timesteps
        with the fixed :meth:`eval_noise` (a midpoint-rule estimate of the training objective)."""
        noise = self.eval_noise(batch)  # (K, sumN, 3)
        losses = [
            self.denoising_loss(batch, torch.full_like(batch.num_atoms, int(t), device=batch.batch.device), eps)
            for t, eps in zip(self.eval_timestep_values().tolist(), noise)
        ]
        return torch.stack(losses).mean(0)  # (B,)

    def model_step(self, batch: MoleculeBatch, stage: str) -> torch.Tensor:
        """Mean per-molecule loss of a batch, logged as ``<stage>_loss``: random t and eps in training, else fixed."""
        if stage == "train":
            t = torch.randint(1, self.config.num_steps + 1, (batch.num_graphs,), device=batch.batch.device)
            per_molecule = self.denoising_loss(batch, t, self.zero_com_noise(batch))
        else:
            per_molecule = self.eval_loss(batch)
        loss = per_molecule.mean()
        if stage == "train":
            self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=batch.num_graphs, sync_dist=True)
        else:  # exact over the disjoint shares of the processes
            self.log_mean(f"{stage}_loss", loss, batch.num_graphs)
        return loss

    def training_step(self, batch: MoleculeBatch, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "train")

    def validation_step(self, batch: MoleculeBatch, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "val")

    def test_step(self, batch: MoleculeBatch, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        # AdamW, linear warmup lr (step + 1) / warmup_steps, then constant.
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        warmup = self.config.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup, 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- generation --------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        batch: MoleculeBatch,
        generator: torch.Generator,
        sample_steps: int | None = None,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """New conformations of the graphs of ``batch`` by ancestral sampling: ``(sumN, 3)`` float32, centred.

        ``batch.pos`` is not used. ``sample_steps`` (default: the config's, None = all T) respaces the chain
        (module docstring). All noise comes from ``generator``; ``callback(t, x)`` (if given) sees the
        coordinates x_t after each step, down to t = 0.
        """
        was_training = self.training
        self.eval()
        try:
            batch = batch.to(self.device)
            dtype = next(self.parameters()).dtype
            steps = self.config.sample_steps if sample_steps is None else sample_steps
            taus = respaced_timesteps(self.config.num_steps, steps)
            pairs = atom_pairs(batch)
            x = self.zero_com_noise(batch, generator).to(dtype)  # x_T ~ N(0, I), zero CoM
            for k in range(len(taus) - 1, 0, -1):
                t, s = taus[k], taus[k - 1]
                abar_t, abar_s = float(self.abar64[t]), float(self.abar64[s])
                alpha = abar_t / abar_s  # respaced alpha_k = abar_t / abar_s; beta_k = 1 - alpha_k
                beta = 1.0 - alpha
                eps = self(batch, x, torch.full_like(batch.num_atoms, t), pairs)  # (sumN, 3)
                # x_s = 1/sqrt(alpha) (x_t - beta / sqrt(1 - abar_t) eps) + sigma z
                x = (x - beta / math.sqrt(1.0 - abar_t) * eps) / math.sqrt(alpha)
                if s > 0:
                    # sigma^2 = beta (1 - abar_s) / (1 - abar_t): the posterior variance of q(x_s | x_t, x_0)
                    sigma = math.sqrt(beta * (1.0 - abar_s) / (1.0 - abar_t))
                    x = x + sigma * self.zero_com_noise(batch, generator).to(dtype)
                x = remove_mean(x, batch.batch, batch.num_graphs)  # stay in the zero-CoM subspace (round-off)
                if callback is not None:
                    callback(s, x)
            return x.float()
        finally:
            self.train(was_training)

    def broken_mask(self, pos: torch.Tensor, batch: MoleculeBatch) -> torch.Tensor:
        """Which molecules of ``batch`` have broken coordinates ``pos`` (sumN, 3): bool ``(B,)``.

        Broken: any non-finite coordinate, or any centred coordinate with |x| > ``broken_threshold``.
        """
        index = batch.batch.to(pos.device)
        finite = torch.isfinite(pos).all(1)  # (sumN,)
        clean = torch.where(finite[:, None], pos, torch.zeros_like(pos))
        spread = remove_mean(clean, index, batch.num_graphs).abs().amax(1)  # (sumN,)
        bad_atom = (~finite) | (spread > self.config.broken_threshold)
        bad_count = torch.zeros(batch.num_graphs, dtype=torch.long, device=pos.device)
        bad_count.index_add_(0, index, bad_atom.long())
        return bad_count > 0  # (B,)

    def configure_sampling(self, graphs: Sequence[MolGraph], real_pos_fallback: bool = True) -> None:
        """Set the graphs :meth:`sample` draws conformers for (usually the generation's real training graphs).

        ``graphs``: a list of graphs (each checked here), or a lazily indexed set with a ``num_atoms`` array (the
        data module's training set: ``len``, ``graphs[i]``), which is never built whole: each draw builds and
        checks the graphs it uses (a published-size set is 200k graphs, about 1.3 GB as objects).
        ``real_pos_fallback``: whether a graph's own ``pos`` may stand in for a broken conformer
        (``on_broken`` = ``real``, or ``resample`` after ``max_resample`` redraws); when False (e.g. the
        graphs carry synthetic coordinates) those cases raise RuntimeError instead.
        """
        counts = getattr(graphs, "num_atoms", None)
        lazy = isinstance(counts, np.ndarray) and counts.shape == (len(graphs),)
        if not lazy:
            graphs = list(graphs)
            for graph in graphs:
                graph.validate()
            counts = np.array([g.num_atoms for g in graphs], dtype=np.int64)
        if len(graphs) == 0:
            raise ValueError("configure_sampling needs at least one molecular graph")
        self.sampling_graphs = graphs
        self._sampling_lazy = lazy
        self._sampling_max_atoms = int(np.max(counts))
        self.real_pos_fallback = bool(real_pos_fallback)

    def sample_chunk(self, start: int, n: int, generator: torch.Generator) -> dict[str, np.ndarray]:
        """Examples ``start .. start + n - 1`` of a synthetic set drawn chunk by chunk: :meth:`sample` from ``start``,
        so that the chunks together give every configured graph its conformers (each chunk starting again at
        graph 0 would leave all graphs past the first chunk's without any)."""
        return self.sample(n, generator, start=start)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, start: int = 0) -> dict[str, np.ndarray]:
        """``n`` generated conformers; example i is a new conformation of ``graphs[(start + i) % len(graphs)]``.

        Returns ``mol_id`` int64 (n,), ``num_atoms`` int32 (n,), ``pos`` float32 (n, max_atoms, 3) centred and
        zero-padded (max_atoms over all configured graphs), ``resampled`` int32 (n,) redraws of that row,
        ``replaced_by_real`` bool (n,). Molecules are generated ``sample_batch_size`` at a time. Broken ones
        (:meth:`broken_mask`): ``resample`` redraws them (fresh noise) up to ``max_resample`` times, then puts
        in the graph's real coordinates, centred; ``real`` puts those in at once; ``fail`` draws all n, then
        raises RuntimeError naming the count. The counts also go to ``self.last_sample_stats``
        (``broken_first_draw``, ``resampled`` = total redraws, ``replaced_by_real``). All noise comes from
        ``generator``: a fixed seed, ``sample_batch_size`` and device give the same conformers (other batch
        sizes give other, equally distributed draws).
        """
        if n < 0 or start < 0:
            raise ValueError(f"n and start must be non-negative, got {n} and {start}")
        if self.sampling_graphs is None:
            raise RuntimeError("call configure_sampling(graphs) before sample()")
        cfg = self.config
        graphs = self.sampling_graphs
        max_atoms = self._sampling_max_atoms
        mol_id = np.zeros(n, dtype=np.int64)
        num_atoms = np.zeros(n, dtype=np.int32)
        pos = np.zeros((n, max_atoms, 3), dtype=np.float32)
        resampled = np.zeros(n, dtype=np.int32)
        replaced = np.zeros(n, dtype=bool)
        broken_first = 0
        failed: list[int] = []
        for first in range(0, n, cfg.sample_batch_size):
            rows = list(range(first, min(n, first + cfg.sample_batch_size)))  # rows of this call
            chosen = {row: graphs[(start + row) % len(graphs)] for row in rows}  # built once per row
            for row, graph in chosen.items():
                if self._sampling_lazy:  # a lazily read set: its graphs are checked as they are built
                    graph.validate()
                mol_id[row], num_atoms[row] = graph.mol_id, graph.num_atoms
            todo = rows
            attempt = 0
            while todo:
                batch = collate_molecules([chosen[row] for row in todo])
                out = self.generate(batch, generator).cpu()
                broken = self.broken_mask(out, batch).cpu().tolist()
                for row, coords, bad in zip(todo, batch.split_pos(out), broken):
                    if not bad:
                        pos[row, : coords.shape[0]] = coords.numpy()
                todo = [row for row, bad in zip(todo, broken) if bad]
                if attempt == 0:
                    broken_first += len(todo)
                if todo and cfg.on_broken == "resample" and attempt < cfg.max_resample:
                    attempt += 1
                    resampled[todo] += 1
                    continue
                if todo and cfg.on_broken == "fail":
                    failed.extend(todo)
                elif todo and self.real_pos_fallback:
                    for row in todo:
                        real = chosen[row].pos.double()
                        pos[row, : real.shape[0]] = (real - real.mean(0)).float().numpy()
                        replaced[row] = True
                elif todo:
                    failed.extend(todo)
                break
        self.last_sample_stats = {
            "broken_first_draw": broken_first,
            "resampled": int(resampled.sum()),
            "replaced_by_real": int(replaced.sum()),
        }
        if failed:
            message = (
                f"{len(failed)} of {n} generated conformers were broken (non-finite or beyond "
                f"{cfg.broken_threshold} Angstrom) with on_broken={cfg.on_broken!r}"
            )
            if not self.real_pos_fallback:
                raise RuntimeError(message + " and real_pos_fallback=False")
            raise UserError(  # asked for (--model.on_broken fail): one line that says how to go on, no traceback
                message + "; this generation's model cannot be sampled so: start again in a new --out_dir with "
                "--model.on_broken resample or real (the generations before this one are complete)"
            )
        return {
            "mol_id": mol_id,
            "num_atoms": num_atoms,
            "pos": pos,
            "resampled": resampled,
            "replaced_by_real": replaced,
        }


def graphs_from_sample(graphs: Sequence[MolGraph], arrays: dict[str, np.ndarray]) -> list[MolGraph]:
    """The synthetic examples of a :meth:`ConformerDiffusionModule.sample` result from ``start`` 0 (or of a whole
    stored set, its coordinates back to back, drawn chunk by chunk with :meth:`~ConformerDiffusionModule.sample_chunk`)
    as graphs: row i is ``graphs[i % len(graphs)]`` with the generated coordinates (the same ``graphs`` sample()
    was configured with)."""
    row = conformer_rows(arrays["pos"], arrays["num_atoms"])
    out = []
    for i, (mol_id, n) in enumerate(zip(arrays["mol_id"].tolist(), arrays["num_atoms"].tolist())):
        graph = graphs[i % len(graphs)]
        if graph.mol_id != mol_id or graph.num_atoms != n:
            raise ValueError(
                f"sample row {i} (mol_id {mol_id}, {n} atoms) does not match graph {i % len(graphs)} "
                f"(mol_id {graph.mol_id}, {graph.num_atoms} atoms)"
            )
        out.append(graph.with_pos(np.asarray(row(i))))
    return out


__all__ = [
    "BROKEN_POLICIES",
    "EVAL_NOISE_SEED",
    "GEODIFF_STEPS",
    "SCHEDULES",
    "AtomPairs",
    "ConformerDiffusionConfig",
    "ConformerDiffusionModule",
    "EquivariantDenoiser",
    "InteractionLayer",
    "alpha_bar",
    "atom_pairs",
    "cutoff_envelope",
    "graphs_from_sample",
    "reference_betas",
    "remove_mean",
    "respaced_timesteps",
    "scatter_mean",
    "sinusoidal_embedding",
]
