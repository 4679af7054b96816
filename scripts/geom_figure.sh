#!/usr/bin/env bash
# The README's conformer-diffusion figure: 3 workflows x 2 seeds x 3 generations of the recipe's CPU defaults
# on QM9 (qm9pack), then the report. Resumable: re-run the same command after a stop. About 25 minutes on
# 2 CPU cores. Extra flags go to every run (e.g. GeoDiff's GEOM-Drugs setting on GPUs, see the README).
#   bash scripts/geom_figure.sh [OUT_DIR] [extra recipe flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/geom_figure}
shift || true
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true MPLBACKEND=Agg
py=.venv/bin/python
for seed in 0 1; do
  for wf in replace accumulate accumulate_subsample; do
    $py recipes/geom_diffusion.py --workflow "$wf" --seed "$seed" --out_dir "$out/${wf}_s$seed" "$@"
  done
done
$py -m tooling.report "$out"/*_s* --out "$out/report"
echo "figure done: $out/report/report.md"
