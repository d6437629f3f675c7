#!/usr/bin/env bash
# Run on the GPU box (offline; torch/triton/transformers preinstalled): the GPU tests and the benchmarks,
# writing results JSONs under $OUT (or benchmarks/results). Take ../shared/tools/gpu-wheels.sh's .whl/ along;
# pytest and Pillow are not among the box's packages (docs/gpu.md), and the tests and the vision benchmark need
# them: make .whl/ with `../shared/tools/gpu-wheels.sh pytest iniconfig pluggy pygments pillow`.
#   bash scripts/gpu-run.sh [tests|kernels|tune|offline|vision|overhead|serve|all]
# (tune: the kernel launch-parameter sweep at the target points, with the quick sweep; not part of all)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
results="${OUT:-benchmarks/results}"
mkdir -p "$results"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

missing() {  # missing LABEL MODULE...: says once which modules this Python lacks (status 0 when any is)
  local label=$1 m gone=""
  shift
  for m in "$@"; do python3 -c "import $m" 2>/dev/null || gone="$gone $m"; done
  [ -n "$gone" ] || return 1
  echo "gpu-run.sh: $label NOT RUN, missing:$gone (see the wheels line at the top of this script)"
}
# Without pytest nothing runs; without Pillow two test files fail to import and stop pytest's collection.
if { [ "$what" = tests ] || [ "$what" = all ]; } && missing "GPU tests" pytest PIL > "$results/gpu_tests.log"; then
  cat "$results/gpu_tests.log"
elif [ "$what" = tests ] || [ "$what" = all ]; then
  # tests/api and tests/batch hold no GPU test and import SDKs the GPU image lacks (openai, zai-sdk, PyJWT,
  # jsonschema): collected, they stop pytest before any test runs. A failing test is reported in the log
  # under $results and does not stop the benchmarks below (set -e with pipefail would end the script here).
  python3 -m pytest -q -m gpu tests/ --ignore=tests/api --ignore=tests/batch 2>&1 | tee "$results/gpu_tests.log" | tail -20 \
    || echo "gpu-run.sh: GPU tests FAILED (rc ${PIPESTATUS[0]}), see $results/gpu_tests.log"
  python3 -m pytest -q tests/kernels 2>&1 | tee "$results/kernel_tests.log" | tail -5 \
    || echo "gpu-run.sh: kernel tests FAILED (rc ${PIPESTATUS[0]}), see $results/kernel_tests.log"
fi
if [ "$what" = kernels ] || [ "$what" = all ]; then
  python3 benchmarks/kernels.py --out "$results/kernels_$(date +%F).json"
fi
if [ "$what" = tune ]; then
  python3 benchmarks/kernels.py --quick --tune --out "$results/kernels_tune_$(date +%F).json"
fi
# Under set -e the vision benchmark's ImportError would end `all` before offline, overhead and serve.
if { [ "$what" = vision ] || [ "$what" = all ]; } && missing "vision benchmark" PIL; then
  :
elif [ "$what" = vision ] || [ "$what" = all ]; then
  vckpt=/tmp/glm-4v-9b-random
  [ -f "$vckpt/config.json" ] || glm-serve make-tiny "$vckpt" --vision --preset glm-4-9b --device cuda
  python3 benchmarks/vision_ttft.py --model "$vckpt" --device cuda --out "$results/vision_ttft_cuda_$(date +%F).json"
fi
if [ "$what" = offline ] || [ "$what" = all ]; then
  ckpt=/tmp/glm-4-9b-random
  [ -f "$ckpt/config.json" ] || glm-serve make-tiny "$ckpt" --preset glm-4-9b --device cuda --shards 4
  python3 benchmarks/offline_throughput.py --model "$ckpt" --device cuda --num-prompts 256 \
    --input-len 128:1024 --output-len 64:512 --hf-batch-size 32 --out "$results/offline_cuda_$(date +%F).json"
fi
if [ "$what" = overhead ] || [ "$what" = all ]; then  # the engine's host work on this box's CPU
  python3 benchmarks/engine_overhead.py --out "$results/engine_overhead_overlap_gpuhost_$(date +%F).json"
fi
if [ "$what" = serve ] || [ "$what" = all ]; then  # the HTTP server on the 9B-shaped checkpoint, glm-serve bench
  ckpt=/tmp/glm-4-9b-random
  [ -f "$ckpt/config.json" ] || glm-serve make-tiny "$ckpt" --preset glm-4-9b --device cuda --shards 4
  glm-serve serve --model "$ckpt" --port 8199 --max-model-len 8192 > /tmp/serve.log 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  python3 -c "
import time, httpx
for _ in range(180):
    try:
        if httpx.get('http://127.0.0.1:8199/v1/models', timeout=2).status_code == 200: break
    except httpx.HTTPError: pass
    time.sleep(1)"
  for c in 1 16 64; do
    glm-serve bench --url http://127.0.0.1:8199 --model "$ckpt" --num-prompts $((c * 4 > 16 ? c * 4 : 16)) \
      --concurrency "$c" --input-len 1024 --output-len 256 --out "$results/serve_bench_c${c}_cuda_$(date +%F).json"
  done
  kill $server
fi
