"""The engine's own per-step overhead with 256 running decoding sequences: scheduler, batch building (runner
prepare + sampling batch), and output processing (detokenize, stop checks, outputs), timed apart from the
model's forward. The forward is replaced by fixed logits so only host work is measured.

    python benchmarks/engine_overhead.py [--seqs 256] [--steps 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from offline_throughput import _cpu_name, _git_commit  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3, help="whole measurements (this VM's speed drifts between them)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    runs = [_measure(args) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    for k, v in med.items():
        spread = ", ".join(f"{r[k]:.0f}" for r in runs)
        print(f"{k:>26}: {v:8.1f} us/step (median of {args.repeats} runs: {spread})")
    result = {
        "benchmark": "engine_overhead", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _cpu_name(), "torch": torch.__version__, "git_commit": _git_commit(),
        "command": " ".join(["engine_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "running_sequences": args.seqs, "median_us_per_step": med, "runs": runs,
    }
    out_path = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        f"engine_overhead_cpu_{dt.date.today().isoformat()}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


def _measure(args) -> dict:
    """One measurement: a fresh engine, 256 prefilled sequences, then `args.steps` timed decode steps."""

    from glm_serve.llm import LLM  # noqa: PLC0415
    from glm_serve.sampling_params import SamplingParams  # noqa: PLC0415
    from glm_serve.tiny import TinySpec, make_tiny  # noqa: PLC0415

    model = make_tiny(tempfile.mkdtemp(prefix="overhead-"), TinySpec(layout="hf", layers=1, hidden=64, heads=2,
                                                                    head_dim=32, ffn=128))
    llm = LLM(str(model), kv_cache_tokens=args.seqs * (64 + args.steps + 32), max_num_seqs=args.seqs,
              max_batch_tokens=max(2048, args.seqs))
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 10, ignore_eos=True, stop=["never-here"])
    for i in range(args.seqs):
        eng.add_request(f"r{i}", [(7 * i + j) % 2000 for j in range(40)], params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()  # prefill everything first: the measured steps are pure decode
    eng.step()  # and settle/emit the last prefill step, so the timed loop starts clean
    eng._emit(eng._pending)
    eng._pending = None

    vocab = eng.model_config.vocab_size
    fixed = torch.randn(args.seqs, vocab)
    # Host work the engine adds to every step; the sampler's tensor ops are device work (async on a GPU) and
    # are timed separately so that a loaded CPU does not pass for engine overhead.
    times = {"schedule": [], "prepare": [], "sampling_batch": [], "settle": [], "emit (overlapped)": [],
             "engine_overhead": [], "not_overlapped": [], "sampler_ops (device work)": []}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        out = eng.scheduler.schedule()
        t1 = time.perf_counter()
        batch = eng.runner.prepare(out)
        t2 = time.perf_counter()
        sb = _sampling_batch(eng, batch)
        t3 = time.perf_counter()
        ids = eng.sampler(fixed.clone(), sb).token_ids.tolist()
        t4 = time.perf_counter()
        pending = eng._settle(out, {sid: (ids[r], None) for r, sid in enumerate(batch.sample_seq_ids)})
        t5a = time.perf_counter()
        eng._emit(pending)  # on a GPU this part runs while the device computes the next step
        t5 = time.perf_counter()
        assert len(out.scheduled) == args.seqs
        host = (t1 - t0) + (t2 - t1) + (t3 - t2) + (t5 - t4)
        serial = host - (t5 - t5a)  # what the device waits for between two steps
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t5a - t4, t5 - t5a, host, serial, t4 - t3)):
            times[k].append(v * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}  # median over the steps


def _sampling_batch(eng, batch):
    """The engine's own SamplingBatch construction for the step's rows."""
    return eng.build_sampling_batch(batch.sample_seq_ids, eng.model_config.vocab_size)


if __name__ == "__main__":
    sys.exit(main())
