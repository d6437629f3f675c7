"""benchmarks/engine_overhead.py runs end to end on a small load (both modes), so its timers keep wrapping the
real engine methods and its async part keeps streaming every token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", [[], ["--no-overlap"], ["--final-only"], ["--stream-interval", "3"]])
def test_engine_overhead_benchmark_small_run(tmp_path, mode):
    out = tmp_path / "overhead.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "engine_overhead.py"), "--seqs", "8",
                           "--steps", "12", "--repeats", "1", "--out", str(out), *mode],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["overlap_scheduling"] is ("--no-overlap" not in mode) and record["running_sequences"] == 8
    assert record["final_only"] is ("--final-only" in mode)
    assert record["stream_interval"] == (3 if "--stream-interval" in mode else 1)
    med = record["median_us_per_step"]
    for part in ("schedule", "prepare", "land", "emit"):
        assert 0 < med[part] < med["host_total"]
    assert record["async_streams"]["steps"] >= 12 and record["async_streams"]["tokens_per_s"] > 0
