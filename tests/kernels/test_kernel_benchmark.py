"""benchmarks/kernels.py runs its whole sweep code on the CPU (--smoke: the Triton interpreter, tiny shapes), so
the GPU run finds a script whose calls into the kernels work and whose kernels agree with the baselines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_smoke_run(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "kernels.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--smoke", "--tune", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["complete"] is True and done.stdout.count(f"wrote {out}") > 1  # also written point by point
    figures = record["figures"]
    assert len(figures["decode"]) == 4 and len(figures["prefill"]) == 2 and len(figures["kv_store"]) == 2
    assert any(row["splits"] > 1 for row in figures["decode"])  # the split-K + reduce path ran
    assert all(row["triton_graph_ms"] is None for row in figures["decode"])  # CUDA graphs only on a GPU
    # the same decode over an fp8 cache: it ran, and is within fp8's rounding of the fp32 cache's output
    assert all(row["fp8_ms"] > 0 and 0 < row["fp8_max_abs_diff"] < 0.1 for row in figures["decode"])
    assert any(row["prefix"] > 0 for row in figures["prefill"])  # a chunk over a cached prefix ran
    tune = figures.pop("tune")  # the launch-parameter sweep: every config ran and agrees with the default's output
    assert [len(tune["decode"]), len(tune["prefill"])] == [2, 1]
    for point in tune["decode"] + tune["prefill"]:
        assert len(point["configs"]) == 2 and all(c["max_abs_diff"] < 1e-4 for c in point["configs"])
        assert point["best"] in point["configs"] and point["best_speedup_over_default"] >= 1.0
    for kind, rows in figures.items():
        for row in rows:
            assert row["triton_ms"] > 0
            assert row["max_abs_diff"] < 1e-4, (kind, row)  # fp32: the kernels agree with SDPA / the stored rows
    assert (record["git_commit"] or not (REPO / ".git").exists()) and "smoke" in record["device"]


def test_fused_ops_benchmark_smoke_run(tmp_path):
    """benchmarks/fused_ops.py on the CPU: every op timed both ways per size, the fused output equal to the
    eager one, the layer total summed from its ops."""
    pytest.importorskip("triton")
    out = tmp_path / "fused.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fused_ops.py"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = record["figures"]
    assert [(r["op"].split()[0], r["tokens"]) for r in rows] == [
        (op, t) for t in (1, 5) for op in ("add_rms_norm", "rope", "silu_mul", "layer")]
    for r in rows:
        assert r["eager_ms"] > 0 and r["triton_ms"] > 0
        if not r["op"].startswith("layer"):
            assert r["max_abs_diff"] < 1e-5, r  # fp32: the kernels compute what the eager ops do
    layer = rows[3]
    parts = {r["op"]: r["triton_ms"] for r in rows[:3]}
    assert layer["triton_ms"] == pytest.approx(2 * parts["add_rms_norm"] + parts["rope"] + parts["silu_mul"], abs=1e-3)
    assert (record["git_commit"] or not (REPO / ".git").exists()) and "smoke" in record["device"]


def test_results_name_the_commit_given_where_there_is_no_git_checkout(monkeypatch):
    """The GPU box gets a copy of the working tree, not the repository (and maybe no git): the commit then comes
    from GLM_SERVE_GIT_COMMIT (scripts/gpu-run.sh passes it on), never silently from nowhere."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("results_file_t", REPO / "benchmarks" / "results_file.py")
    results_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_file)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(results_file.subprocess, "run", no_git)
    monkeypatch.delenv("GLM_SERVE_GIT_COMMIT", raising=False)
    assert results_file.git_commit() is None
    monkeypatch.setenv("GLM_SERVE_GIT_COMMIT", "0123abc")
    assert results_file.git_commit() == "0123abc"
