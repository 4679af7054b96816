#!/usr/bin/env bash
# The README's TinyStories-recipe figure: 3 workflows x 2 seeds x 4 generations of the recipe's CPU
# defaults on the offline stand-in corpus (NOT TinyStories), then the report. Resumable: re-run the
# same command after a stop. About 40 minutes on 2 CPU cores. On GPUs, pass e.g.
# --data.source hub --model.preset gpt2-9m --batch_size 32 for the published setting.
#   bash scripts/tinystories_figure.sh [OUT_DIR] [extra recipe flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/tinystories_figure}
shift || true
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true MPLBACKEND=Agg
py=.venv/bin/python
for seed in 0 1; do
  for wf in replace accumulate accumulate_subsample; do
    $py recipes/tinystories.py --workflow "$wf" --seed "$seed" --generations 4 --out_dir "$out/${wf}_s$seed" "$@"
  done
done
$py -m tooling.report "$out"/*_s* --out "$out/report"
echo "figure done: $out/report/report.md"
