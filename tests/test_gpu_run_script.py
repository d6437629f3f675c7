"""scripts/gpu-run.sh, driven with stand-ins for the box's commands on PATH (`python3`, `nvidia-smi`,
`glm-serve`; every call is logged): a step that fails or is missing a module is said in steps.log and the
steps after it still run, and `first` (one call in a 15-minute device budget) cuts a step off at its limit."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PYTHON = """#!/usr/bin/env bash
echo "python3 $*" >> "$FAKE_LOG"
case "$*" in
  "-c import pytest" | "-c import PIL") [ -n "$FAKE_NO_PYTEST" ] && exit 1; exit 0 ;;
  *offline_throughput.py*) exit 3 ;;  # a failing step
  *kernels.py*) [ -n "$FAKE_SLOW_KERNELS" ] && exec sleep 600 ;;  # a step that outlasts its limit
esac
exit 0
"""
_GLM_SERVE = """#!/usr/bin/env bash
echo "glm-serve $*" >> "$FAKE_LOG"
if [ "$1" = serve ]; then exec sleep 30; fi
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(tmp_path, target: str, script: Path = REPO / "scripts" / "gpu-run.sh",
         **env_extra) -> tuple[subprocess.CompletedProcess, str, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", _PYTHON), ("glm-serve", _GLM_SERVE), ("nvidia-smi", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log, out = tmp_path / "calls.log", tmp_path / "results"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "FAKE_LOG": str(log),
           **env_extra}
    done = subprocess.run(["bash", str(script), target], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done, log.read_text(), out


def test_missing_pytest_and_pillow_are_named_and_the_rest_runs(tmp_path):
    done, calls, out = _run(tmp_path, "all", FAKE_NO_PYTEST="1")
    assert "GPU tests: NOT RUN, missing: pytest PIL" in done.stdout
    assert "vision benchmark: NOT RUN, missing: PIL" in done.stdout
    assert "-m pytest" not in calls and "vision_ttft.py" not in calls
    for later_step in ("benchmarks/kernels.py", "benchmarks/fused_ops.py", "benchmarks/offline_throughput.py",
                       "benchmarks/engine_overhead.py", "glm-serve bench"):
        assert later_step in calls
    # the server benchmarked twice: the engine on a thread, then in its own process
    serves = [line for line in calls.splitlines() if line.startswith("glm-serve serve ")]
    assert len(serves) == 2 and "--engine-process" not in serves[0] and serves[1].endswith("--engine-process")
    steps = (out / "steps.log").read_text()
    assert "offline benchmark (9B-shaped, KV cache auto): rc 3" in steps  # failed, said, and the next steps ran


def test_first_cuts_a_step_off_at_its_limit_and_goes_on(tmp_path):
    script = (REPO / "scripts" / "gpu-run.sh").read_text()
    limit = 'step "kernel benchmark (--quick)" 120 '
    assert limit in script  # the limit this test shortens, in a copy of the script
    copy = tmp_path / "repo" / "scripts" / "gpu-run.sh"
    copy.parent.mkdir(parents=True)
    copy.write_text(script.replace(limit, limit.replace(" 120 ", " 2 ")))
    done, calls, out = _run(tmp_path, "first", script=copy, FAKE_SLOW_KERNELS="1")
    steps = (out / "steps.log").read_text().splitlines()
    assert [s.split(":")[1].strip() for s in steps] == [
        "GPU tests (-m gpu)", "kernel tests (tests/kernels on CUDA)", "kernel benchmark (--quick)",
        "fused ops benchmark", "make-tiny glm-4-9b", "offline benchmark (9B-shaped, KV cache auto)",
        "engine overhead (host CPU)"]
    assert "kernel benchmark (--quick): cut off at its 2 s limit" in steps[2]
    assert "--num-prompts 128" in calls and "engine_overhead.py --repeats 1" in calls


def test_a_run_ends_within_its_budget_whatever_the_steps_limits(tmp_path):
    """The steps' own limits add up to more than one 600 s call (first: 970 s): each step is also cut at what is
    left of the run's budget (GPU_RUN_BUDGET, default 540 s), and a step with too little left is not started
    (said in steps.log), so the script ends itself instead of being killed mid-step by the call's limit."""
    done, calls, out = _run(tmp_path, "first", FAKE_SLOW_KERNELS="1", GPU_RUN_BUDGET="25")
    steps = (out / "steps.log").read_text().splitlines()
    kernels = next(s for s in steps if "kernel benchmark (--quick)" in s)
    assert "cut off at its" in kernels and "120 s" not in kernels  # cut at the budget's rest, not its own limit
    assert int(kernels.rsplit(",", 1)[1].split()[0]) <= 25
    assert any("NOT RUN" in s and "budget" in s for s in steps)
    assert "offline_throughput.py" not in calls  # nothing started once the budget was spent


def test_fp8_runs_the_offline_benchmark_with_an_fp8_cache(tmp_path):
    done, calls, out = _run(tmp_path, "fp8")
    offline = [line for line in calls.splitlines() if "offline_throughput.py" in line]
    assert len(offline) == 1 and "--kv-cache-dtype fp8" in offline[0] and "offline_cuda_kv_fp8_" in offline[0]
