#!/usr/bin/env bash
# The README's MNIST VAE figure, three ways over 3 seeds and 6 generations of the recipe's defaults on the
# embedded digits, then the report (curves side by side per protocol, the accumulate bound, sample grids):
#   (a) epochs per generation (the published protocol): replace, accumulate, accumulate_subsample;
#   (b) fixed compute (--steps_per_generation first: every generation takes generation 0's optimizer steps):
#       accumulate, the one workflow whose training set grows (replace's and accumulate_subsample's sets keep
#       generation 0's size, so both protocols train them alike);
#   (c) the real-only reference at the same steps: mix(real=N, synthetic=0), N real digits every generation.
# Shrunk to fit about an hour on 2 CPU cores: 1,000 real training digits (REAL=N to change) instead of the
# 4,000 of the embedded set. Estimated (not timed) at about 30 minutes there. Resumable: re-run the same
# command after a stop. On a GPU pass trainer flags, e.g. --trainer.accelerator gpu.
#   [REAL=N] bash scripts/mnist_vae_figure.sh [OUT_DIR] [extra recipe flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/mnist_vae_figure}
shift || true
n=${REAL:-1000}
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true MPLBACKEND=Agg
py=.venv/bin/python
run() { $py recipes/mnist_vae.py --real_size "$n" --generations 6 "$@"; }
for seed in 0 1 2; do
  for wf in replace accumulate accumulate_subsample; do
    run --workflow "$wf" --seed "$seed" --out_dir "$out/${wf}_s$seed" "${@}"
  done
  run --workflow accumulate --steps_per_generation first --seed "$seed" --out_dir "$out/accumulate_fixed_s$seed" "${@}"
  run --workflow "mix(real=$n, synthetic=0)" --steps_per_generation first --seed "$seed" \
    --out_dir "$out/real_only_s$seed" "${@}"
done
$py -m tooling.report "$out"/*_s* --out "$out/report"
echo "figure done: $out/report/report.md"
