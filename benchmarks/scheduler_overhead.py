"""Host cost of the scheduler: microseconds per step of schedule() + update() with N decoding sequences.

    python benchmarks/scheduler_overhead.py [--seqs 256] [--steps 400] [--repeats 5]

The model is not run: `sampled` is a prebuilt dict, so the numbers are the scheduler's own CPython cost,
including a new KV block every block_size steps and prefix-cache registration of each filled block.
Each repeat times `steps` consecutive steps; the best and the median repeat are printed (the best is the
least disturbed by other processes on the machine).
"""

from __future__ import annotations

import argparse
import random
import time

from glm_serve.engine.block_manager import BlockManager
from glm_serve.engine.scheduler import Scheduler, SchedulerConfig
from glm_serve.engine.sequence import Sequence


class _Params:
    max_tokens = None


def measure(num_seqs: int, steps: int, repeats: int, prompt_len: int, caching: bool) -> list[float]:
    """Microseconds per step of each repeat."""
    block_size = 16
    max_len = prompt_len + steps * repeats + 16
    num_blocks = num_seqs * (-(-max_len // block_size) + 1)
    cfg = SchedulerConfig(
        max_num_seqs=num_seqs,
        max_batch_tokens=max(2048, num_seqs),
        max_model_len=max_len,
        block_size=block_size,
        num_blocks=num_blocks,
        enable_prefix_caching=caching,
    )
    sched = Scheduler(cfg, BlockManager(num_blocks, block_size, caching))
    rng = random.Random(0)
    for i in range(num_seqs):
        sched.add(Sequence(i, f"r{i}", [rng.randrange(150000) for _ in range(prompt_len)], _Params()))
    sampled = {i: rng.randrange(150000) for i in range(num_seqs)}
    while any(s.num_computed_tokens < prompt_len for s in sched.running) or sched.num_waiting:
        sched.update(sched.schedule(), sampled)  # prefill, not timed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = sched.schedule()
            sched.update(out, sampled)
        times.append((time.perf_counter() - t0) / steps * 1e6)
        if len(out.scheduled) != num_seqs or out.num_batched_tokens != num_seqs:
            raise RuntimeError(f"expected {num_seqs} decodes per step, got {len(out.scheduled)}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=100)
    args = ap.parse_args()
    for caching in (True, False):
        times = sorted(measure(args.seqs, args.steps, args.repeats, args.prompt_len, caching))
        best, median = times[0], times[len(times) // 2]
        print(
            f"{args.seqs} decoding sequences, prefix caching {'on ' if caching else 'off'}: schedule() + update() "
            f"{best:6.1f} us/step best, {median:6.1f} median ({best / args.seqs * 1000:.0f} ns per sequence)"
        )


if __name__ == "__main__":
    main()
