#!/usr/bin/env bash
# The README's MNIST VAE figure: 3 workflows x 3 seeds x 6 generations of the recipe's defaults on the
# embedded digits, then the report (curves + sample grids). Resumable: re-run the same command after a
# stop. About 40 minutes on 2 CPU cores; on a GPU pass trainer flags, e.g. --trainer.accelerator gpu.
#   bash scripts/mnist_vae_figure.sh [OUT_DIR] [extra recipe flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/mnist_vae_figure}
shift || true
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true MPLBACKEND=Agg
py=.venv/bin/python
for seed in 0 1 2; do
  for wf in replace accumulate accumulate_subsample; do
    $py recipes/mnist_vae.py --workflow "$wf" --seed "$seed" --generations 6 --out_dir "$out/${wf}_s$seed" "$@"
  done
done
$py -m tooling.report "$out"/*_s* --out "$out/report"
echo "figure done: $out/report/report.md"
