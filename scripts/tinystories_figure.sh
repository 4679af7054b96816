#!/usr/bin/env bash
# The README's TinyStories-recipe figure on the offline stand-in corpus (NOT TinyStories): the grid of
# scripts/figure_grid.sh (both protocols and the real-only reference, seeds 0-2) over 3 generations of the
# recipe's CPU defaults, then the report. Shrunk to 500 real stories (the recipe's default is 1,000; REAL=N to
# change): about 52 minutes on 2 CPU cores. Resumable: re-run the same command after a stop. On GPUs, pass
# e.g. --data.source hub --model.preset gpt2-9m --batch_size 32 for the published setting.
#   [REAL=N] bash scripts/tinystories_figure.sh [OUT_DIR] [extra recipe flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/tinystories_figure}
shift || true
recipe=tinystories.py
n=${REAL:-500}
fixed=(--generations 3)
source scripts/figure_grid.sh
