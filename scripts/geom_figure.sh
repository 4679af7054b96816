#!/usr/bin/env bash
# The README's conformer-diffusion figure on QM9 (qm9pack), three ways over 3 seeds and 3 generations of the
# recipe's CPU defaults, then the report:
#   (a) epochs per generation (the published protocol): replace, accumulate, accumulate_subsample;
#   (b) fixed compute (--steps_per_generation first: every generation takes generation 0's optimizer steps):
#       accumulate, the one workflow whose training set grows;
#   (c) the real-only reference at the same steps: mix(real=N, synthetic=0), N real molecules every generation.
# Shrunk to fit about an hour on 2 CPU cores: 30 epochs per generation (the recipe's default is 50) on 500
# real molecules (the default is 1,000; REAL=N to change). Resumable: re-run the same command after a stop.
# Extra flags go to every run and come last, so --trainer.max_epochs 50 restores the default (e.g. GeoDiff's
# GEOM-Drugs setting on GPUs, see the README).
#   [REAL=N] bash scripts/geom_figure.sh [OUT_DIR] [extra recipe flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/geom_figure}
shift || true
n=${REAL:-500}
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true MPLBACKEND=Agg
py=.venv/bin/python
run() { $py recipes/geom_diffusion.py --real_size "$n" --trainer.max_epochs 30 "$@"; }
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
