#!/usr/bin/env bash
# The README's MNIST VAE figure: the grid of scripts/figure_grid.sh (both protocols and the real-only reference,
# seeds 0-2) over 6 generations of the recipe's defaults on the embedded digits, then the report (curves side
# by side per protocol, the accumulate bound, sample grids). Shrunk to 1,000 real training digits (REAL=N to
# change) instead of the 4,000 of the embedded set: about 23 minutes on 2 CPU cores. Resumable: re-run the
# same command after a stop. On a GPU pass trainer flags, e.g. --trainer.accelerator gpu.
#   [REAL=N] bash scripts/mnist_vae_figure.sh [OUT_DIR] [extra recipe flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/mnist_vae_figure}
shift || true
recipe=mnist_vae.py
n=${REAL:-1000}
fixed=(--generations 6)
source scripts/figure_grid.sh
