"""Owns the start-up warm-up: a few short requests through the real step path before an engine serves.

Triton compiles each kernel on its first launch (seconds), which the first user request would otherwise wait for,
and a kernel that cannot compile or launch on this machine (no C compiler for Triton's launcher, say) must stop
the start-up with its cause rather than fail every request.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from glm_serve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from glm_serve.engine.engine import LLMEngine


def warm_up(engine: LLMEngine) -> float:
    """Prefill, then prefill over a cached prefix and decode at batch 2, through engine.step(). Leaves nothing
    behind: no request, no cached block, no hit or preemption counted. -> seconds taken. Raises RuntimeError with
    the first request's error when any fails."""
    t0 = time.monotonic()
    # Two full blocks (cacheable) and a bit, in whatever context window the KV cache leaves.
    length = max(1, min(2 * engine.config.block_size + 3, engine.max_model_len - 3))
    prompt = [i % engine.vocab_limit for i in range(1, length + 1)]
    params = SamplingParams(temperature=0.0, max_tokens=max(1, min(3, engine.max_model_len - length)),
                            ignore_eos=True)
    errors = []
    for round_ in (["warm-up-0"], ["warm-up-1", "warm-up-2"]):  # the second round finds the first's blocks
        for rid in round_:
            engine.add_request(rid, prompt, params)
        while engine.has_unfinished():
            errors += [o.error for out in engine.step() for o in out.outputs if o.error]
    if not errors:  # kernels the short requests above do not reach (the decode's split counts, for one)
        engine.model.backend.warm_up(engine.runner.kv_caches[0], engine.model_config.num_heads,
                                     engine.max_model_len, engine.dtype)
    bm = engine.block_manager
    bm.reset_prefix_cache()
    bm.num_query_tokens = bm.num_hit_tokens = 0
    engine.scheduler.num_preemptions = 0  # a small cache may preempt the second round: not a user's
    if errors:
        raise RuntimeError(f"the engine failed its warm-up on {engine.device}: {errors[0]} (with the triton attention "
                           "backend, Triton needs a C compiler and the Python headers at run time; "
                           "--attention-backend torch runs without it)")
    return time.monotonic() - t0
