"""What every benchmark's results JSON starts with (what ran, where, on which commit) and how it is written."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def header(benchmark: str, device: str, argv: list[str] | None) -> dict:
    """benchmark, date (UTC), device, torch, git_commit ("-dirty" with uncommitted changes
    outside benchmarks/results), command."""
    return {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
    }


def device_name(device: str | torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return "cpu"


def git_commit() -> str | None:
    """HEAD (+ "-dirty"); outside a git checkout (the GPU box gets a copy of the working tree, not the
    repository) GLM_SERVE_GIT_COMMIT, which scripts/gpu-run.sh's caller sets; None when neither says."""
    repo = Path(__file__).parent
    given = os.environ.get("GLM_SERVE_GIT_COMMIT") or None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        # Results files written by an earlier run of the same code do not make the tree dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ":(top)", ":(top,exclude)benchmarks/results"],
                               cwd=repo, capture_output=True, text=True, timeout=10)
    except OSError:
        return given
    if head.returncode != 0:
        return given
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write(record: dict, out: str | Path | None, default_name: str) -> Path:
    """Write `record` to `out`, or to benchmarks/results/<default_name>; print and return the path."""
    path = Path(out) if out else RESULTS / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a run stopped mid-write leaves the last whole file, not half one
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path
