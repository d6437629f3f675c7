"""Small workloads shared by engine tests."""

from __future__ import annotations

import random

from glm_serve.sampling_params import SamplingParams


def random_prompts(k: int, seed: int, lo: int = 1, hi: int = 90) -> list[list[int]]:
    """k prompts of lo..hi-1 ordinary token ids (below the tiny checkpoint's specials)."""
    rng = random.Random(seed)
    return [[rng.randrange(0, 2000) for _ in range(rng.randrange(lo, hi))] for _ in range(k)]


def sharing_workload(seed: int, other_seed: int, other_lens: tuple[int, int], max_tokens: tuple[int, int],
                     **sampling) -> tuple[list[list[int]], list[SamplingParams]]:
    """Eight requests for preemption and sharing tests: every third prompt extends a common 16..59-token prefix (a
    prefix-cache hit), the others are random (other_lens: their length range); every other request has n = 2
    (siblings share their prompt's blocks); max_tokens drawn from the given range."""
    rng = random.Random(seed)
    base = [rng.randrange(100, 1000) for _ in range(60)]
    prompts = [base[:rng.randrange(16, 60)] + random_prompts(1, seed=i, lo=1, hi=20)[0] if i % 3 == 0
               else random_prompts(1, seed=other_seed + i, lo=other_lens[0], hi=other_lens[1])[0] for i in range(8)]
    params = [SamplingParams(max_tokens=rng.randrange(*max_tokens), n=1 + i % 2, **sampling) for i in range(8)]
    return prompts, params
