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
# Fashion-MNIST (for the fashion-* scenarios and benchmarks) comes from Debian's dataset-fashion-mnist package.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${SAFEEDIT_FASHION_MNIST_DIR:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Fashion-MNIST (apt-get install dataset-fashion-mnist)" >&2
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) \
      || echo "[setup] Fashion-MNIST not installed; the digits scenarios work without it" >&2
  else
    echo "[setup] for the fashion-* scenarios: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, safeedit; print("safeedit", safeedit.__version__, "torch", torch.__version__)')" >&2
