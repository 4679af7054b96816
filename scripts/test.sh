#!/usr/bin/env bash
# Install (into .venv) and run the whole test suite, offline, on the CPU: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true MPLBACKEND=Agg
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest "$@"
