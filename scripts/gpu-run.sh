#!/usr/bin/env bash
# Run on the GPU box (offline; torch/triton/transformers/pytest/pillow preinstalled): the GPU tests and the
# benchmarks, writing logs and results JSONs under $OUT (or benchmarks/results). Take
# ../shared/tools/gpu-wheels.sh's .whl/ along (the server's packages, bitsandbytes, xgrammar; for `serve`, add
# uvloop and httptools: `../shared/tools/gpu-wheels.sh uvloop httptools`, else uvicorn falls back to asyncio's
# loop and h11, and the event loop's CPU per token is not what a real install gets).
#
#   bash scripts/gpu-run.sh [first|tests|kernels|tune|offline|fp8|vision|overhead|serve|all]
#
# first: what one call within a 15-minute device budget can do (run it with timeout_s 600): the GPU tests, the
#   quick kernel benchmark, the fused-ops benchmark, the 9B-shaped offline benchmark and the engine overhead,
#   each under its own time limit so that the whole ends within about 9 minutes. The benchmarks write their
#   results file as they go: a step cut off at its limit still leaves what it measured. 7 files under $OUT
#   (the tool brings back 8).
# tune: the kernel launch-parameter sweep at the target points (with the quick sweep); not part of all.
# Each step says how it ended in $results/steps.log; a failing step does not stop the ones after it.
# The box gets a copy of the working tree without .git: run it as `GLM_SERVE_GIT_COMMIT=<sha> bash ...` (the
# sha of the tree sent, +"-dirty" if it has uncommitted changes) so that the results files name their commit.
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
results="${OUT:-benchmarks/results}"
mkdir -p "$results"
today=$(date +%F)
if [ -z "${GLM_SERVE_GIT_COMMIT:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  echo "gpu-run.sh: no git checkout here and no GLM_SERVE_GIT_COMMIT: the results files will name no commit"
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
export PYTHONUNBUFFERED=1

# The whole run's budget (seconds from the start, pip installs included): the steps' own limits add up to more
# than one call's 600 s (first: 970 s), so each step is also cut at what is left of it, and one with under 15 s
# left is not started: the script ends itself (each step's partial results saved) instead of being killed
# mid-step by the call's limit. GPU_RUN_BUDGET=0: no budget (default for `all`, longer than any call).
budget=${GPU_RUN_BUDGET:-$([ "$what" = all ] && echo 0 || echo 540)}
step() {  # step NAME SECONDS [--log FILE] CMD...: CMD under a time limit (SIGINT first), its output to FILE
  local name=$1 limit=$2 t0=$SECONDS rc  # when given; says how it ended; never fails
  shift 2
  if [ "$budget" -gt 0 ]; then
    local left=$((budget - SECONDS))
    if [ "$left" -lt 15 ]; then
      echo "gpu-run.sh: $name: NOT RUN, ${left} s left of the run's ${budget} s budget" | tee -a "$results/steps.log"
      return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  if [ "$1" = --log ]; then
    local log=$2
    shift 2
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$log" 2>&1
  else
    timeout --signal=INT --kill-after=20 "$limit" "$@"
  fi
  rc=$?
  local how="rc $rc"
  [ $rc = 124 ] && how="cut off at its ${limit} s limit"
  echo "gpu-run.sh: $name: $how, $((SECONDS - t0)) s" | tee -a "$results/steps.log"
}
missing() {  # missing LABEL MODULE...: status 0 (and says so) when this Python lacks any of the modules
  local label=$1 m gone=""
  shift
  for m in "$@"; do python3 -c "import $m" 2>/dev/null || gone="$gone $m"; done
  [ -n "$gone" ] || return 1
  echo "gpu-run.sh: $label: NOT RUN, missing:$gone (bring them in .whl/: ../shared/tools/gpu-wheels.sh NAME...)" \
    | tee -a "$results/steps.log"
}
checkpoint_9b() {  # the 9B-shaped random checkpoint, made on the GPU (never shipped: 18.8 GB)
  ckpt=/tmp/glm-4-9b-random
  [ -f "$ckpt/config.json" ] || step "make-tiny glm-4-9b" 300 glm-serve make-tiny "$ckpt" --preset glm-4-9b \
    --device cuda --shards 4
}

run_tests() {  # LIMIT_GPU LIMIT_KERNELS
  # tests/api and tests/batch hold no GPU test and import SDKs the box lacks (openai, zai-sdk, PyJWT,
  # jsonschema): collected, they would stop pytest before any test runs. Pillow: tests/test_image.py imports it.
  missing "GPU tests" pytest PIL && return
  step "GPU tests (-m gpu)" "$1" --log "$results/gpu_tests.log" \
    python3 -m pytest -q -m gpu tests/ --ignore=tests/api --ignore=tests/batch
  tail -15 "$results/gpu_tests.log"
  step "kernel tests (tests/kernels on CUDA)" "$2" --log "$results/kernel_tests.log" \
    python3 -m pytest -q tests/kernels
  tail -5 "$results/kernel_tests.log"
}
run_offline() {  # LIMIT NUM_PROMPTS [KV_CACHE_DTYPE]
  checkpoint_9b
  local kv=${3:-auto} suffix=""
  [ "$kv" = auto ] || suffix="_kv_$kv"
  step "offline benchmark (9B-shaped, KV cache $kv)" "$1" python3 benchmarks/offline_throughput.py --model "$ckpt" \
    --device cuda --num-prompts "$2" --input-len 128:1024 --output-len 64:512 --hf-batch-size 32 \
    --kv-cache-dtype "$kv" --out "$results/offline_cuda${suffix}_$today.json"
}

case "$what" in
  first)
    run_tests 150 150
    step "kernel benchmark (--quick)" 120 python3 benchmarks/kernels.py --quick --out "$results/kernels_quick_$today.json"
    step "fused ops benchmark" 45 python3 benchmarks/fused_ops.py --out "$results/fused_ops_cuda_$today.json"
    run_offline 160 128
    step "engine overhead (host CPU)" 45 python3 benchmarks/engine_overhead.py --repeats 1 \
      --out "$results/engine_overhead_overlap_gpuhost_$today.json"
    ;;
  tests) run_tests 400 400 ;;
  kernels) step "kernel benchmark" 520 python3 benchmarks/kernels.py --out "$results/kernels_$today.json"
    step "fused ops benchmark" 60 python3 benchmarks/fused_ops.py --out "$results/fused_ops_cuda_$today.json" ;;
  tune) step "kernel tune sweep" 580 python3 benchmarks/kernels.py --quick --tune --out "$results/kernels_tune_$today.json" ;;
  offline) run_offline 500 256 ;;
  fp8) run_offline 500 256 fp8 ;;  # the same with --kv-cache-dtype fp8 (its GPU kernel tests run in first/tests)
  overhead) step "engine overhead (host CPU)" 280 python3 benchmarks/engine_overhead.py \
      --out "$results/engine_overhead_overlap_gpuhost_$today.json"
    step "engine overhead, sampled (host CPU)" 280 python3 benchmarks/engine_overhead.py --sampled \
      --out "$results/engine_overhead_overlap_sampled_gpuhost_$today.json" ;;
  vision|serve|all) ;;
  *) echo "gpu-run.sh: unknown target $what" >&2; exit 2 ;;
esac

if [ "$what" = all ]; then
  run_tests 600 600
  step "kernel benchmark" 900 python3 benchmarks/kernels.py --out "$results/kernels_$today.json"
  step "fused ops benchmark" 60 python3 benchmarks/fused_ops.py --out "$results/fused_ops_cuda_$today.json"
fi
if { [ "$what" = vision ] || [ "$what" = all ]; } && ! missing "vision benchmark" PIL; then
  vckpt=/tmp/glm-4v-9b-random
  [ -f "$vckpt/config.json" ] || step "make-tiny glm-4v-9b" 300 glm-serve make-tiny "$vckpt" --vision \
    --preset glm-4-9b --device cuda
  step "GLM-4V time to first token" 300 python3 benchmarks/vision_ttft.py --model "$vckpt" --device cuda \
    --out "$results/vision_ttft_cuda_$today.json"
fi
if [ "$what" = all ]; then
  run_offline 900 256
  step "engine overhead (host CPU)" 300 python3 benchmarks/engine_overhead.py \
    --out "$results/engine_overhead_overlap_gpuhost_$today.json"
  step "engine overhead, sampled (host CPU)" 300 python3 benchmarks/engine_overhead.py --sampled \
    --out "$results/engine_overhead_overlap_sampled_gpuhost_$today.json"
fi
if [ "$what" = serve ] || [ "$what" = all ]; then  # the HTTP server on the 9B-shaped checkpoint, glm-serve bench
  checkpoint_9b
  # Twice: the engine on a thread of the server (the default), then in a process of its own (--engine-process).
  # At 256 (the default --max-num-seqs) the event loop's per-chunk work shares the GIL with the engine thread the
  # most; the results' "server" part says each one's CPU per token and the tokens per engine step.
  for mode in thread process; do
    flag=""
    [ "$mode" = process ] && flag="--engine-process"
    glm-serve serve --model "$ckpt" --port 8199 --max-model-len 8192 $flag > "$results/serve_$mode.log" 2>&1 &
    server=$!
    trap 'kill $server 2>/dev/null || true' EXIT
    python3 -c "
import time, httpx
for _ in range(180):
    try:
        if httpx.get('http://127.0.0.1:8199/v1/models', timeout=2).status_code == 200: break
    except httpx.HTTPError: pass
    time.sleep(1)"
    for c in 1 16 64 256; do
      [ "$mode" = process ] && [ "$c" -lt 64 ] && continue  # where the GIL can matter
      step "glm-serve bench ($mode engine), concurrency $c" 300 glm-serve bench --url http://127.0.0.1:8199 \
        --model "$ckpt" --num-prompts $((c >= 256 ? c * 2 : c * 4 > 16 ? c * 4 : 16)) --concurrency "$c" \
        --input-len 1024 --output-len 256 --out "$results/serve_bench_${mode}_c${c}_cuda_$today.json"
    done
    # SIGTERM: a graceful stop (a background job of a script ignores SIGINT); an engine process ends with it
    kill $server
    wait $server 2>/dev/null || true
  done
fi
exit 0
