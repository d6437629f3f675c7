"""Prometheus metrics: requests by route and status, choices by finish reason, prompt/generation token counters,
time-to-first-token, inter-token and end-to-end latency histograms, and engine gauges and counters
(running/waiting requests, KV-cache use, prefix-cache queries and hits, preemptions) read from `LLMEngine.stats()`
at scrape time; the engine's steps and the CPU time of its thread and of the event loop's (is the host the
bottleneck?), and the process's own CPU and memory.

Each app has its own registry, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time

from prometheus_client import CollectorRegistry, Counter, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)


class _EngineCollector:
    def __init__(self, engine):
        self._engine = engine  # LLMEngine; its stats() reads plain counters, safe from the event loop thread

    def collect(self):
        s = self._engine.stats()
        for name, key, doc in (
            ("glm_serve_num_requests_running", "num_running", "Sequences in the running batch"),
            ("glm_serve_num_requests_waiting", "num_waiting", "Sequences waiting for admission"),
            ("glm_serve_kv_cache_usage_ratio", "kv_cache_usage", "Fraction of KV-cache blocks in use (0..1)"),
            ("glm_serve_prefix_cache_hit_rate", "prefix_cache_hit_rate",
             "Prompt tokens served from the prefix cache / prompt tokens looked up"),
            ("glm_serve_kv_cache_capacity_tokens", "kv_capacity_tokens", "KV-cache capacity in tokens"),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(s.get(key, 0)))
            yield g
        # Running totals: counters (exposed as ..._total), so that rate() and restarts read right. The hit rate
        # gauge above is a lifetime ratio that hardly moves after a while; the recent one is
        # rate(hits) / rate(queries).
        for name, key, doc in (
            ("glm_serve_num_preemptions", "num_preemptions", "Sequences preempted (their blocks freed, recomputed)"),
            ("glm_serve_prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
            ("glm_serve_prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache"),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(s.get(key, 0)))
            yield c


class _HostCollector:
    """Where the host's CPU goes, for telling a host-bound server from a device-bound one: the engine loop's and
    the event loop thread's CPU seconds (on a thread the engine shares one GIL with the event loop: at hundreds of
    streams the event loop's per-chunk work can hold back the engine's next step; with --engine-process the
    engine's figure is its whole process), where the engine runs, and its steps."""

    def __init__(self, async_engine):
        self._engine = async_engine  # AsyncEngine or ProcessEngine: its loop's CPU seconds and step_count

    def collect(self):
        c = CounterMetricFamily("glm_serve_thread_cpu_seconds", "CPU seconds of the server's threads: the engine "
                                "loop (scheduling, launches, outputs; with --engine-process its whole process) and "
                                "the HTTP event loop (in glm-serve serve the main thread, its start-up and model load "
                                "included)", labels=["thread"])
        engine_cpu = self._engine.engine_cpu_seconds()  # None once the engine loop has ended
        if engine_cpu is not None:
            c.add_metric(["engine"], engine_cpu)
        # The collector runs where /metrics is served: on the event loop's thread (it renders in the route).
        c.add_metric(["event_loop"], time.thread_time())
        yield c
        own = GaugeMetricFamily("glm_serve_engine_in_own_process", "1 when the engine loop runs in a process of its "
                                "own (--engine-process), 0 when it runs on a thread of the server")
        own.add_metric([], float(self._engine.in_own_process))
        yield own
        steps = CounterMetricFamily("glm_serve_engine_steps", "Engine steps run (each one batch on the device)")
        steps.add_metric([], float(self._engine.step_count))
        yield steps


class _LoopHistogram:
    """A histogram observed on the event loop only, so without a lock: prometheus_client's Histogram takes two
    per observation and scans its buckets, for every streamed token. n equal observations are one call.
    Exposed by _LoopCollector."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name, self.doc = name, doc
        self.bounds = [*buckets, math.inf]
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n  # the first bound >= value: le semantics
        self.sum += value * n

    def family(self) -> HistogramMetricFamily:
        cumulative = itertools.accumulate(self.counts)
        return HistogramMetricFamily(self.name, self.doc, sum_value=self.sum,
                                     buckets=[(floatToGoString(b), c) for b, c in zip(self.bounds, cumulative)])


class _LoopCollector:
    """The per-token figures (latency histograms, generated tokens), kept as plain numbers on the event loop."""

    def __init__(self, metrics: Metrics):
        self._m = metrics

    def collect(self):
        m = self._m
        for h in (m.ttft, m.itl, m.e2e):
            yield h.family()
        c = CounterMetricFamily("glm_serve_generation_tokens", "Tokens generated")
        c.add_metric([], float(m.num_generation_tokens))
        yield c


class Metrics:
    def __init__(self, engine, async_engine=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("glm_serve_requests", "Finished HTTP requests", ["route", "status"], registry=r)
        # A stream's HTTP status is sent before its outcome is known (200, then maybe an error event or a client
        # that leaves): how generations end is counted here, per choice. reason: the engine's stop, length,
        # error, or abort (also every choice of a request that ended unfinished: client gone, cancelled, shutdown).
        self.finished = Counter("glm_serve_finished_choices", "Generated choices ended, by finish reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("glm_serve_prompt_tokens", "Prompt tokens processed", registry=r)
        # --blocked-words: requests refused for their input (stage "input"), choices cut before a term ("output";
        # also in finished_choices as reason content_filter)
        self.content_filtered = Counter("glm_serve_content_filtered", "Requests refused (input) and choices cut "
                                        "(output) by the content filter (--blocked-words)", ["stage"], registry=r)
        # Per api key (its id, the part before the dot; a raw key's digest): what each caller used. Labels come
        # from the configured keys only, so their number is bounded. Requests: those admitted (chat, completions,
        # responses, async tasks); tokens: theirs and their batch lines', counted as each generation ends.
        self.key_requests = Counter("glm_serve_key_requests", "Requests admitted, per api key", ["key"], registry=r)
        self.key_refused = Counter("glm_serve_key_refused_requests", "Requests refused by a limit (429), per api key "
                                   "and error code (1302 concurrency, 1303 rate, 1305 queue)", ["key", "code"],
                                   registry=r)
        self.key_prompt_tokens = Counter("glm_serve_key_prompt_tokens", "Prompt tokens processed, per api key",
                                         ["key"], registry=r)
        self.key_generation_tokens = Counter("glm_serve_key_generation_tokens", "Tokens generated, per api key",
                                             ["key"], registry=r)
        self.num_prompt_tokens = 0  # the same, as a plain number (stats_log reads it)
        # Updated for every streamed token, on the event loop only (RequestTimer): plain numbers (_LoopCollector).
        self.num_generation_tokens = 0
        self.ttft = _LoopHistogram("glm_serve_time_to_first_token_seconds", "Arrival to first generated token",
                                   _LATENCY_BUCKETS)
        self.itl = _LoopHistogram("glm_serve_inter_token_latency_seconds", "Time between consecutive tokens of a "
                                  "request", _ITL_BUCKETS)
        self.e2e = _LoopHistogram("glm_serve_e2e_request_latency_seconds", "Arrival to last token", _LATENCY_BUCKETS)
        r.register(_LoopCollector(self))
        r.register(_EngineCollector(engine))
        if async_engine is not None:
            r.register(_HostCollector(async_engine))
        ProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory, open files (Linux)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request_done(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()


class RequestTimer:
    """Latency and outcome bookkeeping of one generation request (all its `n` choices). owner: the api key id it
    is counted for (None: no keys)."""

    def __init__(self, metrics: Metrics, n: int = 1, owner: str | None = None):
        self.metrics = metrics
        self.owner = owner
        self._generated = 0  # tokens, all choices
        self.start = time.monotonic()
        self._last: float | None = None
        self._finished = False
        self._n = n
        self._ended: set[int] = set()  # indices of the choices whose finish reason was counted
        self._prompt_counted = False
        self._over = False  # on_end ran

    def on_output(self, out) -> None:
        """One RequestOutput from the engine: each choice gets at most one token per step, so the longest
        choice delta is the number of steps it spans (more than one when the caller lagged, see on_tokens)."""
        for o in out.outputs:
            if o.finish_reason is not None and o.index not in self._ended:
                self._ended.add(o.index)
                self.metrics.finished.labels(reason=o.finish_reason).inc()
                if o.finish_reason == "content_filter":
                    self.metrics.content_filtered.labels(stage="output").inc()
        if self._last is None and any(o.token_ids for o in out.outputs):
            self._count_prompt(out.prompt_tokens)  # its first tokens: the prompt has been computed by now
        self.on_tokens(sum(len(o.token_ids) for o in out.outputs),
                       steps=max((len(o.token_ids) for o in out.outputs), default=0))

    def on_tokens(self, num_tokens: int, steps: int = 1) -> None:
        """`num_tokens` arrived now, made by `steps` engine steps (one token per running choice each): more
        than one when the caller lagged and the engine merged its outputs. The time since the last arrival is
        spread evenly over those steps, one inter-token latency each."""
        if num_tokens <= 0:
            return
        now = time.monotonic()
        if self._last is None:
            self.metrics.ttft.observe(now - self.start)
            self._last = now
            steps -= 1  # the first step made the first token; any others came with it
        if steps > 0:
            self.metrics.itl.observe((now - self._last) / steps, steps)
        self._last = now
        self.metrics.num_generation_tokens += num_tokens
        self._generated += num_tokens

    def _count_prompt(self, prompt_tokens: int) -> None:
        """Once, when the prompt has been computed (first tokens; or the end, for a request that generates none):
        throughput figures (the stats line, rates over glm_serve_prompt_tokens_total) see prefill as it happens,
        not when a long answer ends."""
        if self._prompt_counted:
            return
        self._prompt_counted = True
        m = self.metrics
        m.prompt_tokens.inc(prompt_tokens)
        m.num_prompt_tokens += prompt_tokens
        if self.owner is not None:
            m.key_prompt_tokens.labels(key=self.owner).inc(prompt_tokens)

    def on_finish(self, prompt_tokens: int) -> None:
        if self._finished:
            return
        self._finished = True
        self._count_prompt(prompt_tokens)
        self.metrics.e2e.observe(time.monotonic() - self.start)

    def on_end(self, prompt_tokens: int) -> None:
        """The request is over, finished or not (client gone, cancelled, failed): one that got as far as a first
        token has had its prompt computed, so its prompt and its end-to-end time count like a finished one's
        (and every time to first token has its end-to-end time). Once per request, whichever comes first.
        Its choices that never finished count as aborted."""
        if self._last is not None:
            self.on_finish(prompt_tokens)
        if not self._over:
            self._over = True
            if self.owner is not None:
                self.metrics.key_generation_tokens.labels(key=self.owner).inc(self._generated)
            if self._n > len(self._ended):
                self.metrics.finished.labels(reason="abort").inc(self._n - len(self._ended))
