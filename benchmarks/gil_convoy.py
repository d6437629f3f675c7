"""How much a busy Python thread slows the engine thread, by the interpreter's switch interval.

The server is one process: its event loop (HTTP, SSE chunks, JSON) and the engine loop thread share one GIL.
Every PyTorch op the engine calls releases the GIL and takes it back; while another thread runs Python, taking
it back waits until that thread is made to drop it, which happens only after `sys.getswitchinterval()` (5 ms
by default). A step of a few hundred ops can then take far longer than its own work: the convoy effect.

Each configuration runs in a fresh process (the switch interval is process-wide): a tiny engine with 64
decoding sequences on the CPU, its steps timed alone and beside a thread running pure Python, either all the
time ("hog") or in 8 ms bursts with 8 ms pauses (about what an event loop does with 256 streams' chunks after
each step). Writes a results JSON.

    python benchmarks/gil_convoy.py [--steps 60] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_file import device_name, header, write  # noqa: E402

INTERVALS = (0.005, 0.001, 0.0005, 0.0002)
MODES = ("alone", "hog", "bursts")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, metavar=("INTERVAL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(float(args.child[0]), args.child[1], args.steps)))
        return 0
    rows = []
    for interval in INTERVALS:
        for mode in MODES:
            done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", str(interval), mode],
                                  capture_output=True, text=True, timeout=600, check=True)
            row = {"switch_interval_s": interval, "busy_thread": mode, **json.loads(done.stdout.splitlines()[-1])}
            rows.append(row)
            print(row, flush=True)
    record = {**header("gil_convoy", device_name("cpu"), argv), "steps": args.steps, "sequences": 64,
              "figures": rows}
    write(record, args.out, f"gil_convoy_cpu_{dt.date.today().isoformat()}.json")
    return 0


def _measure(interval: float, mode: str, steps: int) -> dict:
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415

    sys.setswitchinterval(interval)
    torch.set_num_threads(1)  # the engine's own work on one core; the busy thread gets the other
    from glm_serve.llm import LLM  # noqa: PLC0415
    from glm_serve.sampling_params import SamplingParams  # noqa: PLC0415
    from glm_serve.tiny import TinySpec, make_tiny  # noqa: PLC0415

    model = make_tiny(tempfile.mkdtemp(prefix="convoy-"), TinySpec(layout="hf", layers=2, hidden=64, heads=2,
                                                                  head_dim=32, ffn=128))
    eng = LLM(str(model), max_num_seqs=64, kv_cache_tokens=64 * (40 + steps + 40)).engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 20, ignore_eos=True)
    for i in range(64):
        eng.add_request(f"r{i}", [(7 * i + j) % 2000 for j in range(40)], params)
    for _ in range(10):  # prefill, first decode steps
        eng.step()
    stop = threading.Event()

    def busy() -> None:
        chunk = {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "word"}}]}
        while not stop.is_set():
            until = time.perf_counter() + 0.008
            while time.perf_counter() < until:
                json.dumps(chunk)
            if mode == "bursts":
                time.sleep(0.008)

    if mode != "alone":
        threading.Thread(target=busy, daemon=True).start()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        times.append((time.perf_counter() - t0) * 1e3)
    stop.set()
    return {"step_ms_median": round(statistics.median(times), 3), "step_ms_mean": round(statistics.fmean(times), 3)}


if __name__ == "__main__":
    sys.exit(main())
