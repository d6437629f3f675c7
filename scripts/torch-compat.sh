#!/usr/bin/env bash
# Runs the whole test suite on the CPU under the GPU box's stack, in a side virtualenv: torch 2.11 by default,
# which brings its own Triton (3.6 for 2.11), so that an API newer than the box's fails here rather than in
# the little GPU time we get. PyPI's torch for Linux is the CUDA build (several GB, downloaded once); it runs
# on the CPU. numpy stays below 2.4 for Triton 3.6's interpreter (see scripts/triton-compat.sh). transformers is
# the box's too (5.17; TRANSFORMERS=version to change it): the model tests' oracle and the offline benchmark's
# HF `generate` side run on it there.
#   [TRANSFORMERS=5.17.0] bash scripts/torch-compat.sh [torch version, default 2.11.0] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.11.0}
shift || true
side=${TMPDIR:-/tmp}/glm-serve-torch-$version
if [ ! -x "$side/bin/python" ]; then
  python3 -m venv "$side"
fi
if ! "$side/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
  "$side/bin/python" -m pip install -q "torch==$version"
fi
"$side/bin/python" -m pip install -q -e ".[test]" "numpy>=2.0,<2.4" "torch==$version" \
  "transformers==${TRANSFORMERS:-5.17.0}"
"$side/bin/python" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
exec "$side/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
