#!/usr/bin/env bash
# Set up safeedit in ./.venv: CPU PyTorch 2.13.0 (the locally cached build; no CUDA wheels), then the package.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0" >&2
  .venv/bin/pip install -q torch==2.13.0
fi
if ! .venv/bin/python -c "import safeedit, pytest, ruff" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.safeedit-installed ]; then
  echo "[setup] installing safeedit and its dependencies" >&2
  .venv/bin/pip install -q -e ".[test]"
  touch .venv/.safeedit-installed
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, safeedit; print("safeedit", safeedit.__version__, "torch", torch.__version__)')" >&2
