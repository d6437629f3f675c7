"""scripts/gpu-run.sh on a box whose Python lacks pytest and Pillow (neither is among the GPU box's packages,
docs/gpu.md): it says which steps it skipped and why, and `all` still reaches the benchmarks after vision.

The box's commands are stand-ins on PATH: `python3` fails to import pytest and PIL (and the vision benchmark
fails as it would without Pillow), `nvidia-smi` and `glm-serve` do nothing; every call is logged."""

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
  "-c import pytest" | "-c import PIL") exit 1 ;;
  "-m pytest"*) echo "No module named pytest" >&2; exit 1 ;;
  *vision_ttft.py*) echo "ModuleNotFoundError: No module named 'PIL'" >&2; exit 1 ;;
esac
exit 0
"""
_GLM_SERVE = """#!/usr/bin/env bash
echo "glm-serve $*" >> "$FAKE_LOG"
if [ "$1" = serve ]; then exec sleep 30; fi
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_missing_pytest_and_pillow_are_named_and_the_rest_runs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", _PYTHON), ("glm-serve", _GLM_SERVE), ("nvidia-smi", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log, out = tmp_path / "calls.log", tmp_path / "results"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "FAKE_LOG": str(log)}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu-run.sh"), "all"], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GPU tests NOT RUN, missing: pytest PIL" in done.stdout
    assert "vision benchmark NOT RUN, missing: PIL" in done.stdout
    assert "missing: pytest PIL" in (out / "gpu_tests.log").read_text()
    calls = log.read_text()
    assert "-m pytest" not in calls and "vision_ttft.py" not in calls
    for later_step in ("benchmarks/offline_throughput.py", "benchmarks/engine_overhead.py", "glm-serve bench"):
        assert later_step in calls
