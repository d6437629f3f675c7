#!/usr/bin/env bash
# The README's test command: set up .venv with the test extras, then run the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh "[test]"
python -m pytest -q "$@"
