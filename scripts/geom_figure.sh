#!/usr/bin/env bash
# The README's conformer-diffusion figure on QM9 (qm9pack): the grid of scripts/figure_grid.sh (both protocols
# and the real-only reference, seeds 0-2) over 3 generations of the recipe's CPU defaults, then the report.
# Shrunk to 30 epochs per generation (the recipe's default is 50) on 500 real molecules (the default is 1,000;
# REAL=N to change): about 54 minutes on 2 CPU cores. Resumable: re-run the same command after a stop. Extra
# flags go to every run and come last, so --trainer.max_epochs 50 restores the default (e.g. GeoDiff's
# GEOM-Drugs setting on GPUs, see the README).
#   [REAL=N] bash scripts/geom_figure.sh [OUT_DIR] [extra recipe flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/geom_figure}
shift || true
recipe=geom_diffusion.py
n=${REAL:-500}
fixed=(--trainer.max_epochs 30)
source scripts/figure_grid.sh
