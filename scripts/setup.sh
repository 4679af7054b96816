#!/usr/bin/env bash
# Create .venv (if needed) and install the project with its test extras into it.
# CPU machines get the local CPU build of torch (constraints/cpu.txt); machines with an NVIDIA GPU
# (nvidia-smi present) get whatever CUDA build their package index serves.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraints=(-c constraints/cpu.txt)
fi
stamp=.venv/.installed-$(cat pyproject.toml constraints/cpu.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install --quiet "${constraints[@]}" -e ".[test]"
  touch "$stamp"
fi
