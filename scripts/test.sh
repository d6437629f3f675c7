#!/usr/bin/env bash
# The README's test command: set up .venv with the test extras, then run the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh "[test]"
# The vendor's older SDK (zhipuai 2.x) pins PyJWT<2.9, which zai-sdk in .venv cannot live with: it gets a small
# side virtualenv of its own, driven as a subprocess by tests/api/test_zhipuai_sdk.py. zhipuai imports
# sniffio without declaring it (httpx 0.28 stopped bringing it along).
if [ ! -x .venv-zhipuai/bin/python ]; then
  python3 -m venv .venv-zhipuai
fi
.venv-zhipuai/bin/python -m pip install -q "zhipuai>=2.1,<3" sniffio 2>&1 | grep -v "^WARNING: Location" || true
python -m pytest -q "$@"
