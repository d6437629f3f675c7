#!/usr/bin/env bash
# Create (or reuse) .venv and install glm-serve with the given extras. Sourced by serve.sh and test.sh.
# No GPU: pin the CPU build of torch (an unpinned `torch` pulls a multi-GB CUDA build). With a GPU the
# default PyPI build is the CUDA one, which is what we want there.
set -euo pipefail
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>/dev/null || true
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.4"
  else
    python -m pip install -q "torch==2.13.0"
  fi
fi
python -m pip install -q -e ".${extras}"
