"""The Lightning generation loop on its smallest model: a learnable 2-D Gaussian fitted by SGD.

The reference for the deep generative recipes: real data module + LightningModule + the shared loop
(``collapse/loop.py``). Each generation fits a fresh model (or, with ``--warm_start true``, the
previous one) by Adam on the negative log-likelihood, is scored on real held-out points
(``test_loss``, mean NLL in nats), and samples the next synthetic set into ``gen_XXX/samples.npy``.

    python recipes/toy_gaussian.py --workflow replace --generations 6 --out_dir runs/toy_replace
    python recipes/toy_gaussian.py --workflow accumulate --modality.max_epochs 20 --out_dir runs/toy_acc
    python -m recipes.report runs/toy_replace runs/toy_acc --out runs/toy_report
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from collapse.cli import run
from collapse.loop import LoopConfig, LoopResult, run_generations
from collapse.rundir import config_dict
from lit_modules.toy import GaussianModality


@dataclass
class ToyGaussianConfig(LoopConfig):
    """Refit a learnable Gaussian on its own samples with Lightning: replace vs accumulate and the rest."""

    out_dir: str = "runs/toy_gaussian"
    """Run directory: config.yaml, metrics.csv and one gen_XXX folder per finished generation."""
    modality: GaussianModality = field(default_factory=GaussianModality)
    """Real data (sizes, seed) and model/training settings of the toy modality."""


def main(cfg: ToyGaussianConfig) -> LoopResult:
    """Run (or resume) the generations; return what the loop did."""
    loop = LoopConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoopConfig)})
    return run_generations(cfg.modality, loop, recipe="toy_gaussian", config=config_dict(cfg))


if __name__ == "__main__":
    run(main, ToyGaussianConfig)
