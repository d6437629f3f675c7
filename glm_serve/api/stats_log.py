"""Owns the server's periodic one-line summary in its log (`--log-stats-interval`), for operators who read logs
rather than scrape /metrics:

    engine: 812.4 prompt tokens/s, 1904.0 generated tokens/s; 37 running, 2 waiting; KV cache 41.3% used;
    prefix cache hits 62.5% of prompt tokens; 0 preemptions

Throughputs are over the interval just ended (a request's prompt tokens count when its first tokens come, its
prompt computed, as in glm_serve_prompt_tokens_total); the hit rate is over the prompt tokens the interval looked
up. A line is written only for an interval with work in it (tokens made, or requests running or waiting), so an
idle server's log stays quiet."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("glm_serve.stats")


@dataclass
class Sample:
    """Running totals at one moment."""

    at: float  # time.monotonic()
    prompt_tokens: int
    generation_tokens: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int
    preemptions: int


def sample(metrics, stats: dict) -> Sample:
    return Sample(time.monotonic(), metrics.num_prompt_tokens, metrics.num_generation_tokens,
                  stats.get("prefix_cache_queries", 0), stats.get("prefix_cache_hits", 0),
                  stats.get("num_preemptions", 0))


def stats_line(before: Sample, now: Sample, stats: dict) -> str | None:
    """The line for the interval from `before` to `now` (stats: the engine's, at `now`); None when idle."""
    running, waiting = stats.get("num_running", 0), stats.get("num_waiting", 0)
    prompt = now.prompt_tokens - before.prompt_tokens
    generated = now.generation_tokens - before.generation_tokens
    if not (prompt or generated or running or waiting):
        return None
    dt = max(now.at - before.at, 1e-9)
    queried = now.prefix_queries - before.prefix_queries
    hits = f"{100 * (now.prefix_hits - before.prefix_hits) / queried:.1f}%" if queried else "n/a"
    return (f"engine: {prompt / dt:.1f} prompt tokens/s, {generated / dt:.1f} generated tokens/s; "
            f"{running} running, {waiting} waiting; KV cache {100 * stats.get('kv_cache_usage', 0.0):.1f}% used; "
            f"prefix cache hits {hits} of prompt tokens; {now.preemptions - before.preemptions} preemptions")


async def log_stats(ctx, interval_s: float) -> None:
    """Every interval_s, the line for the interval just ended (until cancelled)."""
    before = sample(ctx.metrics, ctx.core.stats())
    while True:
        await asyncio.sleep(interval_s)
        stats = ctx.core.stats()
        now = sample(ctx.metrics, stats)
        line = stats_line(before, now, stats)
        if line is not None:
            log.info("%s", line)
        before = now
