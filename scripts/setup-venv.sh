#!/usr/bin/env bash
# Create (or reuse) .venv and install glm-serve with the given extras. Sourced by serve.sh and test.sh.
# No GPU: pin the CPU build of torch (PyPI's Linux `torch`, pinned or not, is a multi-GB CUDA build). With a GPU the
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
  elif [ "$(uname -s)" = Linux ]; then
    # PyPI's Linux torch is the CUDA build (several GB): take the CPU build, from a local wheel where the machine
    # has one (this project's CI), else from PyTorch's CPU index. Its dependencies come with the install below.
    python -m pip install -q --no-index --no-deps "torch==2.13.0+cpu" 2>/dev/null \
      || python -m pip install -q --no-deps "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
  else
    python -m pip install -q "torch==2.13.0"  # macOS: PyPI's build is the CPU one
  fi
fi
python -m pip install -q -e ".${extras}"
