"""benchmarks/engine_overhead.py runs end to end on a small load (both modes), so its timers keep wrapping the
real engine methods and its async part keeps streaming every token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", [[], ["--no-overlap"], ["--final-only"], ["--stream-interval", "3"], ["--sampled"]])
def test_engine_overhead_benchmark_small_run(tmp_path, mode):
    out = tmp_path / "overhead.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "engine_overhead.py"), "--seqs", "8",
                           "--steps", "12", "--repeats", "1", "--out", str(out), *mode],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["overlap_scheduling"] is ("--no-overlap" not in mode) and record["running_sequences"] == 8
    assert record["final_only"] is ("--final-only" in mode) and record["complete"] is True
    assert record["stream_interval"] == (3 if "--stream-interval" in mode else 1)
    assert record["sampling"] == ("temperature 0.8, top_p 0.8" if "--sampled" in mode else "greedy")
    med = record["median_us_per_step"]
    for part in ("schedule", "prepare", "land", "emit"):
        assert 0 < med[part] < med["host_total"]
    for part in ("async_streams", "async_streams_engine_process"):
        assert record[part]["steps"] >= 12 and record[part]["tokens_per_s"] > 0


def test_the_stand_in_logits_live_on_the_engines_device(monkeypatch):
    """On the GPU box the engine runs on CUDA (its default there): logits made on the CPU would meet the step's
    device tensors (a CPU tensor indexed by CUDA rows, the first step that mixes prefill and decode) and the
    benchmark would stop there. Stand-in engine on the meta device: no CUDA needed to see where they go."""
    import importlib.util  # noqa: PLC0415
    import types  # noqa: PLC0415

    import torch  # noqa: PLC0415

    import glm_serve.engine.engine  # noqa: PLC0415
    import glm_serve.tiny  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("engine_overhead_bench", REPO / "benchmarks" / "engine_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class FakeEngine:
        def __init__(self, config):
            self.device = torch.device("meta")
            self.model_config = types.SimpleNamespace(vocab_size=50)
            self.runner = types.SimpleNamespace(execute=None)

    monkeypatch.setattr(glm_serve.engine.engine, "LLMEngine", FakeEngine)
    monkeypatch.setattr(glm_serve.tiny, "make_tiny", lambda path, spec: path)
    args = types.SimpleNamespace(seqs=4, steps=3, no_overlap=False, stream_interval=1)
    eng, fixed = bench._engine(args)
    assert fixed.device == eng.device and fixed.shape == (4, 50)
    # the engine the async parts use (on a thread, or built in the engine process) makes them the same way
    eng = bench.fixed_logits_engine(bench._engine_config(args), rows=4)
    logits = eng.runner.execute(types.SimpleNamespace(sample_seq_ids=[1, 2, 3]))
    assert logits.device == eng.device and logits.shape == (3, 50)
