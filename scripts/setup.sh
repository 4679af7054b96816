#!/usr/bin/env bash
# Create .venv (if needed) and install the project with its test extras into it: bash scripts/setup.sh
# CPU machines get torch==2.13.0 (constraints/cpu.txt) from pip's usual sources: the local CPU build where one is
# configured (find-links), otherwise PyPI's Linux wheel, which is the CUDA build (several GB). To get the CPU
# build elsewhere, name PyTorch's CPU wheel index; torch alone is installed from it, everything else as usual:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# Machines with an NVIDIA GPU (nvidia-smi present) get whatever CUDA build their package index serves.
# pip's own PIP_INDEX_URL / PIP_EXTRA_INDEX_URL are honoured as always. PYTHON picks the interpreter (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraints=(-c constraints/cpu.txt)
fi
# The stamp names what was installed; a different torch index is a different install.
stamp=.venv/.installed-$(printf '%s' "$TORCH_INDEX_URL" | cat pyproject.toml constraints/cpu.txt - | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  if [ -n "$TORCH_INDEX_URL" ]; then
    # torch first, from that index only (its other wheels are not all there); the project install below then
    # finds torch already satisfied and keeps it.
    .venv/bin/python -m pip install --quiet "${constraints[@]}" --index-url "$TORCH_INDEX_URL" torch
  fi
  .venv/bin/python -m pip install --quiet "${constraints[@]}" -e ".[test]"
  touch "$stamp"
fi
