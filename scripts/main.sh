#!/usr/bin/env bash
# The main job: install (into .venv), then run the three analytic recipes and the MNIST VAE recipe on
# their built-in, offline data, plus the TinyStories recipe on its offline stand-in corpus and the conformer
# diffusion recipe on QM9 (qm9pack), and write one report: bash scripts/main.sh [OUT_DIR] (default runs/main;
# 26 to 50 minutes on 2 CPU cores from a fresh clone, install included)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/main}
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true MPLBACKEND=Agg
py=.venv/bin/python
# Gerstgrasser et al.'s check values: d = 32, sigma^2 = 100, T in {100, 1000}.
$py recipes/linear_regression.py --out_dir "$out/linear_regression" --workflow '[replace, accumulate, accumulate_subsample]' \
  --dim 32 --n_samples '[100, 1000]' --noise_var 100 --generations 50 --num_seeds 1000 --report false
# Kazdan et al.'s Gaussian, d = 10, three sample sizes, paper-scale seeds and generations.
$py recipes/gaussian.py --out_dir "$out/gaussian" --workflow '[replace, accumulate, accumulate_subsample]' \
  --dim 10 --n_samples '[10, 100, 1000]' --generations 100 --num_seeds 100 --report false
# Kazdan et al.'s KDE on two-moons, small n where replace collapses fastest.
$py recipes/kde.py --out_dir "$out/kde" --workflow '[replace, accumulate, accumulate_subsample]' \
  --dataset moons --bandwidth '[0.1, scott]' --n_samples '[10, 32]' --generations 50 --num_seeds 50 --report false
# The MNIST VAE at its defaults (4 generations, embedded digits), one run per workflow.
for wf in replace accumulate accumulate_subsample; do
  $py recipes/mnist_vae.py --workflow "$wf" --out_dir "$out/mnist_vae/$wf"
done
# The TinyStories recipe at its CPU defaults on the offline stand-in corpus (not TinyStories), replace vs accumulate.
for wf in replace accumulate; do
  $py recipes/tinystories.py --workflow "$wf" --out_dir "$out/tinystories/$wf"
done
# The conformer diffusion recipe at its CPU defaults on QM9 molecules (qm9pack), replace vs accumulate.
for wf in replace accumulate; do
  $py recipes/geom_diffusion.py --workflow "$wf" --out_dir "$out/geom_diffusion/$wf"
done
$py -m tooling.report "$out/linear_regression" "$out/gaussian" "$out/kde" "$out"/mnist_vae/* "$out"/tinystories/* \
  "$out"/geom_diffusion/* \
  --out "$out/report"
echo "main job done: $out/report/report.md"
