"""The periodic stats line (--log-stats-interval): its figures from the running totals, silence when idle, and
a real server writing it while it works."""

from __future__ import annotations

import logging
import re
import time

import httpx
import pytest

from glm_serve.api import ServerSettings
from glm_serve.api.stats_log import Sample, stats_line


def test_the_line_says_the_intervals_rates_and_the_engines_state():
    before = Sample(at=10.0, prompt_tokens=100, generation_tokens=1000, prefix_queries=50, prefix_hits=10,
                    preemptions=2)
    now = Sample(at=12.0, prompt_tokens=300, generation_tokens=1500, prefix_queries=250, prefix_hits=160,
                 preemptions=3)
    stats = {"num_running": 7, "num_waiting": 1, "kv_cache_usage": 0.4567}
    assert stats_line(before, now, stats) == (
        "engine: 100.0 prompt tokens/s, 250.0 generated tokens/s; 7 running, 1 waiting; KV cache 45.7% used; "
        "prefix cache hits 75.0% of prompt tokens; 1 preemptions")
    idle = Sample(at=20.0, prompt_tokens=300, generation_tokens=1500, prefix_queries=250, prefix_hits=160,
                  preemptions=3)
    assert stats_line(now, idle, {"num_running": 0, "num_waiting": 0}) is None  # an idle server's log stays quiet
    assert "hits n/a" in stats_line(now, idle, {"num_running": 1, "num_waiting": 0})  # nothing looked up


def test_a_negative_interval_is_refused():
    with pytest.raises(ValueError, match="--log-stats-interval"):
        ServerSettings(log_stats_interval_s=-1)


def test_a_working_server_logs_the_line_and_an_idle_one_does_not(make_server, caplog):
    caplog.set_level(logging.INFO, logger="glm_serve.stats")
    srv = make_server(log_stats_interval_s=0.2)
    r = httpx.post(srv.openai_base + "/chat/completions", timeout=60, json={
        "model": "glm-4-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200
    # The line of an interval that saw the request's tokens. (Not necessarily the first line: an interval that ended
    # after the request reached the engine and before its first token has a line too, "1 running" at 0 tokens/s.)
    def rates() -> list[float]:
        lines = [x.getMessage() for x in caplog.records if x.name == "glm_serve.stats"]
        return [float(m.group(1)) for m in (re.search(r"([0-9.]+) generated tokens/s", line) for line in lines) if m]

    deadline = time.monotonic() + 30
    while not any(rate > 0 for rate in rates()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(rate > 0 for rate in rates()), [x.getMessage() for x in caplog.records]
    time.sleep(0.5)  # an interval with no work: no line for it
    caplog.clear()
    time.sleep(0.6)
    assert not [x for x in caplog.records if x.name == "glm_serve.stats"]
