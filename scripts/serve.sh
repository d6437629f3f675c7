#!/usr/bin/env bash
# The README's first command: set up .venv (CPU torch when there is no GPU) and start the server.
# With no --model it serves the embedded demo: a tiny RANDOM-weight checkpoint (its text is noise).
# Real weights: bash scripts/serve.sh --model /path/to/glm-4-9b-chat-hf   (or a hub id, e.g. THUDM/glm-4-9b-chat)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh "[quant,structured]"
exec glm-serve serve "$@"
