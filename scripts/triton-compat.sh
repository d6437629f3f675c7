#!/usr/bin/env bash
# Runs the kernel tests (TRITON_INTERPRET=1, fp32/fp16) and the sm_80/sm_90 compile test under another Triton
# release than the venv's, installed on the side: by default the GPU box's 3.6, so that a kernel using a newer
# language feature fails here rather than on the GPU. Needs .venv (bash scripts/setup-venv.sh test).
#   bash scripts/triton-compat.sh [triton version, default 3.6.0]
# Triton 3.6's interpreter converts 1-element arrays to Python ints, which numpy >= 2.4 refuses; numpy 2.3 goes
# on the side too (compiled kernels on a GPU do not go through the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.6.0}
side=${TMPDIR:-/tmp}/glm-serve-triton-$version
if [ ! -d "$side/triton" ]; then
  .venv/bin/python -m pip install -q --no-deps --target "$side" "triton==$version" "numpy>=2.0,<2.4"
fi
PYTHONPATH="$side" .venv/bin/python -c "import triton, numpy; print('triton', triton.__version__, 'numpy', numpy.__version__)"
PYTHONPATH="$side" exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/kernels
