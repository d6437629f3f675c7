"""The engine's own per-step overhead with 256 running decoding sequences: scheduler, batch building (runner
prepare + sampling batch), landing the tokens (stop ids, length) and output processing (detokenize, stop
strings, outputs), timed inside the real LLMEngine.step. The model's forward is replaced by fixed logits and
the sampler's tensor ops are timed apart (device work on a GPU), so only host work is counted.

With overlap scheduling (the default) all of it runs while the device computes the next step: the GPU never
waits for the engine as long as a step takes longer than `host_total`. Without it (--no-overlap) the device
waits for `serial` (schedule + prepare + sampling batch + land) between two steps.

Then the same decode runs through AsyncEngine, the server's path: the engine thread plus one asyncio task
reading each stream, all under one GIL. Its wall time per step counts the readers' work too. And once more
through ProcessEngine (serve --engine-process): the engine loop in a spawned process, the readers in this one.

With --sampled the requests sample (temperature 0.8, top-p 0.8: GLM-4-9B-chat's generation_config, so what API
requests that leave sampling unset get) instead of taking the argmax.

With --final-only the requests want their result only (LLM.generate, non-streaming API calls): after the first
tokens the engine holds each delta for the final output instead of building and delivering one per token.

    python benchmarks/engine_overhead.py [--seqs 256] [--steps 200] [--no-overlap] [--sampled] [--final-only]
                                         [--stream-interval N] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_file import device_name, header, write  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3, help="whole measurements (this VM's speed drifts between them)")
    p.add_argument("--no-overlap", action="store_true", help="measure with --no-overlap-scheduling")
    p.add_argument("--stream-interval", type=int, default=1, help="the engine's stream_interval (streamed requests)")
    p.add_argument("--final-only", action="store_true",
                   help="requests that want the result only (LLM.generate, non-streaming API calls): no per-token "
                        "outputs after the first")
    p.add_argument("--sampled", action="store_true",
                   help="sampled requests (temperature 0.8, top-p 0.8) instead of greedy ones")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    mode = (("sync" if args.no_overlap else "overlap") + ("_sampled" if args.sampled else "")
            + ("_final" if args.final_only else "")
            + (f"_interval{args.stream_interval}" if args.stream_interval > 1 else ""))
    name = f"engine_overhead_{mode}_cpu_{dt.date.today().isoformat()}.json"
    result = {
        **header("engine_overhead", device_name("cpu"), argv),
        # The engine's default device: on a GPU host its batches and the sampler's ops are on the GPU.
        "engine_device": "cuda" if torch.cuda.is_available() else "cpu",
        "running_sequences": args.seqs, "overlap_scheduling": not args.no_overlap, "final_only": args.final_only,
        "sampling": "temperature 0.8, top_p 0.8" if args.sampled else "greedy",
        "stream_interval": args.stream_interval,
        "device_waits_for": ("nothing while a device step takes longer than host_total" if not args.no_overlap
                             else "serial (schedule + prepare + sampling_batch + land) between two steps"),
        # This machine's single-core Python speed (best of 5), to compare the figures with another host's.
        "python_sum_range_1000_us": _python_speed(),
        "complete": False,  # written after each part: a run cut off (gpu-run.sh's step limits) keeps what it measured
    }
    runs = [_measure(args) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    for k, v in med.items():
        spread = ", ".join(f"{r[k]:.0f}" for r in runs)
        print(f"{k:>26}: {v:8.1f} us/step (median of {args.repeats} runs: {spread})")
    result.update(median_us_per_step=med, runs=runs)
    write(result, args.out, name)
    # The same decode through AsyncEngine (the server's path): its loop thread plus one asyncio consumer per
    # sequence on the main thread, sharing the GIL; the wall time per step includes the consumers' work. Then
    # through ProcessEngine (serve --engine-process): the engine loop in a spawned process, the consumers in this
    # one, the outputs over a pipe.
    for key, label, what, engine_process in (
            ("async_streams", "async streams",
             "wall time per engine step, whole run (prefill included), consumers included", False),
            ("async_streams_engine_process", "async streams, engine process",
             "as async_streams, the engine loop in its own process", True)):
        streams = [_measure_async(args, engine_process) for _ in range(args.repeats)]
        streamed = {k: statistics.median(r[k] for r in streams) for k in streams[0]}
        print(f"{label:>26}: {streamed['wall_us_per_step']:8.1f} us/step wall, "
              f"{streamed['tokens_per_s']:.0f} tokens/s (median of {args.repeats} runs)")
        result[key] = {"what": what, **streamed, "runs": streams}
        write(result, args.out, name)
    result["complete"] = True
    write(result, args.out, name)
    return 0


def _engine_config(args):
    from glm_serve.engine.config import EngineConfig  # noqa: PLC0415
    from glm_serve.tiny import TinySpec, make_tiny  # noqa: PLC0415

    model = make_tiny(tempfile.mkdtemp(prefix="overhead-"), TinySpec(layout="hf", layers=1, hidden=64, heads=2,
                                                                    head_dim=32, ffn=128))
    return EngineConfig(model=str(model), kv_cache_tokens=args.seqs * (64 + args.steps + 32), max_num_seqs=args.seqs,
                        max_batch_tokens=max(2048, args.seqs), overlap_scheduling=not args.no_overlap,
                        stream_interval=args.stream_interval)


def fixed_logits_engine(config, rows: int):
    """An LLMEngine whose forward is a copy of fixed logits (rows x vocab on its device): host work only. Top
    level, so that ProcessEngine can build it in the engine process."""
    from glm_serve.engine.engine import LLMEngine  # noqa: PLC0415

    eng = LLMEngine(config)
    fixed = torch.randn(rows, eng.model_config.vocab_size, device=eng.device)
    eng.runner.execute = lambda batch, mm=None: fixed[: len(batch.sample_seq_ids)].clone()
    return eng


def _engine(args):
    """A fresh engine on a one-layer tiny checkpoint, and the fixed logits that stand in for its forward."""
    from glm_serve.engine.engine import LLMEngine  # noqa: PLC0415

    eng = LLMEngine(_engine_config(args))
    # On the engine's device (CUDA where there is one): CPU logits would meet the step's device tensors.
    return eng, torch.randn(args.seqs, eng.model_config.vocab_size, device=eng.device)


def _measure(args) -> dict:
    """One measurement: a fresh engine, 256 prefilled sequences, then `args.steps` timed decode steps."""


    eng, fixed = _engine(args)
    params = _params(args, args.steps + 10)
    for i in range(args.seqs):
        eng.add_request(f"r{i}", [(7 * i + j) % 2000 for j in range(40)], params, final_only=args.final_only)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()  # prefill everything first: the measured steps are pure decode
    eng.step()

    parts = {"schedule": [], "prepare": [], "sampling_batch": [], "land": [], "emit": [], "device": []}
    timed = _Timers(parts)
    eng.scheduler.schedule = timed("schedule", eng.scheduler.schedule)
    eng.runner.prepare = timed("prepare", eng.runner.prepare)
    eng.build_sampling_batch = timed("sampling_batch", eng.build_sampling_batch)
    eng._land_inflight = timed("land", eng._land_inflight)
    eng._emit = timed("emit", eng._emit)
    # Device work on a GPU: the forward (here a copy of fixed logits) and the sampler's tensor ops.
    eng.runner.execute = timed("device", lambda batch, mm=None: fixed[: len(batch.sample_seq_ids)].clone())
    eng.sampler = timed("device", eng.sampler)
    rows = {k: [] for k in ("schedule", "prepare", "sampling_batch", "land", "emit", "host_total", "serial",
                            "device_work (logits copy + sampler)")}
    for _ in range(args.steps):
        timed.reset()
        t0 = time.perf_counter()
        eng.step()
        wall = time.perf_counter() - t0
        assert len(eng.scheduler.running) == args.seqs
        got = {k: sum(v) for k, v in timed.step.items()}
        for k in ("schedule", "prepare", "sampling_batch", "land", "emit"):
            rows[k].append(got[k] * 1e6)
        rows["host_total"].append((wall - got["device"]) * 1e6)
        rows["serial"].append((got["schedule"] + got["prepare"] + got["sampling_batch"] + got["land"]) * 1e6)
        rows["device_work (logits copy + sampler)"].append(got["device"] * 1e6)
    med = {k: statistics.median(v) for k, v in rows.items()}  # median over the steps
    med["host_total_mean"] = statistics.fmean(rows["host_total"])  # with the rare long steps (GC) averaged in
    return med


def _params(args, max_tokens: int):
    from glm_serve.sampling_params import SamplingParams  # noqa: PLC0415

    sampling = dict(temperature=0.8, top_p=0.8) if args.sampled else dict(temperature=0.0)
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, stop=["never-here"], **sampling)


def _python_speed() -> float:
    return min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6


def _measure_async(args, engine_process: bool = False) -> dict:
    """`args.seqs` requests streamed through AsyncEngine (engine_process: ProcessEngine) at once, each read by its
    own asyncio task."""
    import asyncio  # noqa: PLC0415
    import functools  # noqa: PLC0415

    from glm_serve.engine.async_engine import AsyncEngine  # noqa: PLC0415
    from glm_serve.engine.process import ProcessEngine  # noqa: PLC0415

    config = _engine_config(args)
    factory = functools.partial(fixed_logits_engine, rows=args.seqs)
    params = _params(args, args.steps)
    server = ProcessEngine(config, factory) if engine_process else AsyncEngine(factory(config))

    async def stream(i: int) -> int:
        n = 0
        async for out in server.generate(f"r{i}", [(7 * i + j) % 2000 for j in range(40)], params,
                                         final_only=args.final_only):
            n += sum(len(o.token_ids) for o in out.outputs)
        return n

    async def run() -> tuple[int, float]:
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(stream(i) for i in range(args.seqs)))
        return sum(tokens), time.perf_counter() - t0

    try:
        steps0 = server.step_count
        tokens, wall = asyncio.run(run())
        steps = server.step_count - steps0
    finally:
        server.shutdown()
    assert tokens == args.seqs * args.steps
    return {"wall_us_per_step": wall / steps * 1e6, "tokens_per_s": tokens / wall, "steps": steps}


class _Timers:
    """Wraps callables so each step records the seconds spent in each named part."""

    def __init__(self, parts: dict) -> None:
        self.step = {k: [] for k in parts}

    def reset(self) -> None:
        for v in self.step.values():
            v.clear()

    def __call__(self, name: str, fn):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.step[name].append(time.perf_counter() - t0)

        return wrapper


if __name__ == "__main__":
    sys.exit(main())
