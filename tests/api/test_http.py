"""Raw HTTP behaviour: client disconnects abort and free, duplicate request ids, a failing request mid-stream
(network_error) or before it (500), unexpected bugs answered 500 without killing the server, /tokenizer,
/metrics, /health."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from glm_serve.chat import encode_chat

from .conftest import frozen_engine, held_grammar_compiles, wait_idle

USER = [{"role": "user", "content": "hello"}]


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.split()[-1])
    return 0.0


def _wait_admission_empty(server, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while server.app.state.ctx.admission.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.app.state.ctx.admission.in_flight == 0


def test_stream_disconnect_aborts_and_frees(server):
    before = _metric(server, "glm_serve_generation_tokens_total")
    with frozen_engine(server.engine):
        with httpx.Client(timeout=10) as client:
            body = {"model": "glm-4-plus", "messages": USER, "stream": True, "max_tokens": 1500, "ignore_eos": True}
            with client.stream("POST", server.openai_base + "/chat/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
        # The server notices the disconnect while the engine is held: its slot is given back only after the
        # request's abort went to the engine. (A fixed 0.2 s here let a loaded machine release the engine first,
        # and the stream then ran on until the server noticed.)
        _wait_admission_empty(server)
    wait_idle(server.engine)
    _wait_admission_empty(server)
    assert _metric(server, "glm_serve_generation_tokens_total") - before < 50  # aborted, not run to 1500


@pytest.mark.parametrize("prompt", ["hello", ["hello", "world"]])  # one prompt (read directly) or several (merged)
def test_completions_stream_disconnect_aborts_and_frees(server, prompt):
    before = _metric(server, "glm_serve_generation_tokens_total")
    held, entered = frozen_engine(server.engine), False
    try:
        with httpx.Client(timeout=10) as client:
            body = {"model": "glm-4-plus", "prompt": prompt, "stream": True, "max_tokens": 1500, "ignore_eos": True}
            with client.stream("POST", server.openai_base + "/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ") and next(lines) == ""
                assert next(lines).startswith("data: ")  # running: now hold the engine and leave
                entered = held.__enter__()
        # The engine makes no more steps until the server has noticed (its slot is given back after the aborts
        # went to the engine): how many tokens run before then no longer depends on the machine's load.
        _wait_admission_empty(server)
    finally:
        if entered:
            held.__exit__(None, None, None)
    wait_idle(server.engine)  # the server noticed and aborted every prompt's request
    _wait_admission_empty(server)
    prompts = 1 if isinstance(prompt, str) else len(prompt)
    assert _metric(server, "glm_serve_generation_tokens_total") - before < 250 * prompts  # not run to 1500 each


def test_a_stream_left_after_its_first_tokens_counts_its_prompt_and_e2e(server):
    names = ("glm_serve_prompt_tokens_total", "glm_serve_time_to_first_token_seconds_count",
             "glm_serve_e2e_request_latency_seconds_count", "glm_serve_generation_tokens_total")
    counts = [_metric(server, name) for name in names]
    body = {"model": "glm-4-plus", "messages": USER, "stream": True, "max_tokens": 1500, "ignore_eos": True}
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", server.openai_base + "/chat/completions", json=body) as r:
            tokens = 0
            for line in r.iter_lines():
                tokens += '"content":' in line and '"content":""' not in line
                if tokens >= 3:
                    break
    wait_idle(server.engine)
    _wait_admission_empty(server)
    # Its prompt was computed and its first tokens sent: the prompt and an end-to-end time count, as they do for
    # a finished request (every time to first token has its end-to-end time).
    prompt, ttft, e2e, generated = (_metric(server, name) - c for name, c in zip(names, counts))
    assert prompt > 0 and ttft == e2e == 1 and 3 <= generated < 1500


def _requests(server, status: str) -> float:
    route = 'route="/v1/chat/completions"'
    return sum(float(line.split()[-1]) for line in httpx.get(server.url + "/metrics").text.splitlines()
               if line.startswith("glm_serve_requests_total{") and route in line and f'status="{status}"' in line)


def test_non_stream_disconnect_aborts_and_frees(server):
    before = _metric(server, "glm_serve_generation_tokens_total")
    errors, left = _requests(server, "500"), _requests(server, "499")
    with frozen_engine(server.engine):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.openai_base + "/chat/completions", timeout=0.5,
                       json={"model": "glm-4-plus", "messages": USER, "max_tokens": 1500, "ignore_eos": True})
        # The server notices the disconnect while the engine is held (the 499 is counted after the abort went to
        # the engine); a fixed 0.2 s here let a loaded machine release the engine first.
        deadline = time.monotonic() + 30
        while _requests(server, "499") < left + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    wait_idle(server.engine)
    _wait_admission_empty(server)
    assert _metric(server, "glm_serve_generation_tokens_total") - before < 50
    # counted as a client that left (499), not as a server error
    assert _requests(server, "499") == left + 1 and _requests(server, "500") == errors


def test_duplicate_request_id_in_flight(server):
    body = {"model": "glm-4-plus", "messages": USER, "max_tokens": 3, "request_id": "same-id"}
    results = []
    with frozen_engine(server.engine):
        t = threading.Thread(target=lambda: results.append(httpx.post(server.vendor_base + "chat/completions",
                                                                      json=body, timeout=30)))
        t.start()
        deadline = time.monotonic() + 30
        while (None, "same-id") not in server.app.state.ctx.active_request_ids and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(server.vendor_base + "chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "1231"
    t.join()
    assert results[0].status_code == 200 and results[0].json()["request_id"] == "same-id"
    assert httpx.post(server.vendor_base + "chat/completions", json=body).status_code == 200  # free again


class _FailingConstraint:
    """Allows every token, then fails on the third one: an engine-side failure of this request alone."""

    def __init__(self):
        self.n = 0

    def fill_bitmask(self, bitmask, row):
        pass  # the row stays all-ones: everything allowed

    def accept(self, token_id):
        self.n += 1
        if self.n == 3:
            raise RuntimeError("constraint blew up")

    def is_terminated(self):
        return False


class _FailingFactory:
    def json_object(self):
        return _FailingConstraint()


def test_generation_failure_mid_stream_and_before(server, monkeypatch):
    ctx = server.app.state.ctx
    monkeypatch.setattr(ctx, "constraint_factory", lambda: _FailingFactory())
    body = {"model": "glm-4-plus", "messages": USER, "max_tokens": 20, "response_format": {"type": "json_object"}}
    r = httpx.post(server.vendor_base + "chat/completions", json={**body, "stream": True})
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert '"finish_reason":"network_error"' in events[-2]
    r = httpx.post(server.vendor_base + "chat/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["code"] == "500"
    r = httpx.post(server.openai_base + "/chat/completions", json={**body, "stream": True})
    assert '"error"' in r.text and r.text.rstrip().endswith("}")  # an error event ends the stream
    monkeypatch.undo()
    assert httpx.post(server.vendor_base + "chat/completions", json={**body, "response_format": None}).status_code == 200
    wait_idle(server.engine)


def test_a_slow_grammar_compile_does_not_stall_other_requests(server, monkeypatch):
    # A new schema's grammar compiles in the request (a string with maxLength 2000 takes ~1 s); on the event loop
    # that froze every other request and stream for as long. Here each compile is held until /health has answered:
    # on the event loop, /health could not answer before the compile ended (a ReadTimeout). (It used to time
    # /health against 0.8 s while a 1.5 s compile ran: a bound a loaded machine could miss on its own.)
    compiles = held_grammar_compiles(server.app.state.ctx, monkeypatch)
    body = {"model": "glm-4-plus", "messages": USER, "max_tokens": 3, "response_format": {"type": "json_object"}}
    answers = []
    for url in (server.vendor_base + "chat/completions", server.openai_base + "/chat/completions",
                server.vendor_base + "async/chat/completions"):
        slow = threading.Thread(target=lambda u=url: answers.append(httpx.post(u, json=body, timeout=60)))
        slow.start()
        go = compiles.next_compile()  # the slow request is compiling now, and stays so
        try:
            assert httpx.get(server.url + "/health", timeout=20).status_code == 200, url
            assert not go.is_set()  # answered while the compile was still running
        finally:
            go.set()
        slow.join()
    assert [r.status_code for r in answers] == [200, 200, 200]
    # in the preparation pool of its own, not asyncio's default one (file reads, image decoding)
    threads = compiles.threads
    assert threads and all(name.startswith("glm-prepare") for name in threads), threads
    wait_idle(server.engine)


def test_unexpected_bug_is_a_500_and_the_server_lives(server, monkeypatch):
    from glm_serve.api import common

    def broken(*a, **k):
        raise RuntimeError("a bug")

    def errors():  # an earlier test's 500 already created the label: count this one, not the label
        label = 'glm_serve_requests_total{route="/api/paas/v4/chat/completions",status="500"}'
        lines = httpx.get(server.url + "/metrics").text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(label))

    monkeypatch.setattr(common, "prepare_chat", broken)
    before = errors()
    r = httpx.post(server.vendor_base + "chat/completions", json={"model": "glm-4-plus", "messages": USER})
    assert r.status_code == 500 and r.json() == {"error": {"code": "500", "message": "internal error: RuntimeError"}}
    assert errors() == before + 1
    monkeypatch.undo()
    assert httpx.post(server.vendor_base + "chat/completions",
                      json={"model": "glm-4-plus", "messages": USER, "max_tokens": 2}).status_code == 200


def test_tokenizer_route(server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = httpx.post(server.vendor_base + "tokenizer", json={"model": "glm-4-plus", "messages": USER, "tools": tools})
    tok = server.engine.engine.tokenizer
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == len(encode_chat(tok, USER, tools, chat_template=tok.chat_template))
    r = httpx.post(server.vendor_base + "tokenizer", json={"model": "glm-4-plus", "messages": [{"role": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "1214"


def test_metrics_and_health(server):
    httpx.post(server.vendor_base + "chat/completions", json={"model": "glm-4-plus", "messages": USER,
                                                                "max_tokens": 3})
    text = httpx.get(server.url + "/metrics").text
    for name in ("glm_serve_requests_total", "glm_serve_prompt_tokens_total", "glm_serve_generation_tokens_total",
                 "glm_serve_time_to_first_token_seconds_count", "glm_serve_inter_token_latency_seconds_count",
                 "glm_serve_e2e_request_latency_seconds_count", "glm_serve_num_requests_running",
                 "glm_serve_num_requests_waiting", "glm_serve_kv_cache_usage_ratio",
                 "glm_serve_prefix_cache_hit_rate"):
        assert name in text, name
    assert 'route="/api/paas/v4/chat/completions",status="200"' in text
    assert _metric(server, "glm_serve_prompt_tokens_total") > 0
    assert _metric(server, "glm_serve_time_to_first_token_seconds_count") > 0
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_metrics_show_the_engine_steps_and_where_the_host_cpu_goes(server):
    def read() -> dict[str, float]:
        text = httpx.get(server.url + "/metrics").text
        return {k: float(line.split()[-1]) for line in text.splitlines() for k in
                ('thread="engine"', 'thread="event_loop"', "glm_serve_engine_steps_total", "process_cpu_seconds_total")
                if k in line and not line.startswith("#")}

    before = read()
    assert set(before) == {'thread="engine"', 'thread="event_loop"', "glm_serve_engine_steps_total",
                           "process_cpu_seconds_total"}, before
    r = httpx.post(server.vendor_base + "chat/completions", json={"model": "glm-4-plus", "messages": USER,
                                                                    "max_tokens": 6, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 6
    after = read()
    assert after["glm_serve_engine_steps_total"] - before["glm_serve_engine_steps_total"] >= 6  # a token a step
    assert after['thread="engine"'] > before['thread="engine"']
    assert after['thread="event_loop"'] > before['thread="event_loop"']
    assert after["process_cpu_seconds_total"] >= before["process_cpu_seconds_total"]


def _finished(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("glm_serve_finished_choices_total{"):
            out[line.split('reason="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def test_metrics_count_how_each_choice_ended(server, monkeypatch):
    """Streams are a 200 before their outcome is known: how they end (finished, failed, client gone) is counted
    per choice. Before: only the HTTP status, 200 for all of them."""
    wait_idle(server.engine)
    before = _finished(server)
    long_ignore = {"model": "glm-4-plus", "messages": USER, "ignore_eos": True}
    r = httpx.post(server.openai_base + "/chat/completions", json={**long_ignore, "max_tokens": 3, "n": 2})
    assert r.status_code == 200
    r = httpx.post(server.openai_base + "/completions", json={"model": "glm-4-plus", "prompt": ["a b", "c"], "n": 2,
                                                               "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200
    with httpx.Client(timeout=10) as client:  # the client leaves after its first tokens
        with client.stream("POST", server.openai_base + "/chat/completions",
                           json={**long_ignore, "max_tokens": 1500, "stream": True}) as s:
            for i, _ in enumerate(s.iter_lines()):
                if i >= 3:
                    break
    monkeypatch.setattr(server.app.state.ctx, "constraint_factory", lambda: _FailingFactory())
    r = httpx.post(server.vendor_base + "chat/completions", json={"model": "glm-4-plus", "messages": USER,
                   "max_tokens": 20, "stream": True, "response_format": {"type": "json_object"}})
    assert r.status_code == 200 and "network_error" in r.text  # failed mid-stream, after its 200
    monkeypatch.undo()
    wait_idle(server.engine)
    _wait_admission_empty(server)
    after = _finished(server)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert {k: v for k, v in delta.items() if v} == {"length": 6, "abort": 1, "error": 1}


def test_metrics_count_prefix_cache_queries_and_hits(server):
    """Prompt tokens looked up in and found in the prefix cache are counters, so a recent hit rate can be had
    (before: only a lifetime ratio gauge)."""
    wait_idle(server.engine)
    # The same long prompt twice, one after the other: the second finds the first's full blocks in the cache.
    queries, hits = (_metric(server, f"glm_serve_prefix_cache_{k}_total") for k in ("queries", "hits"))
    body = {"model": "glm-4-plus", "messages": [{"role": "user", "content": "hello there " * 40}], "max_tokens": 1}
    prompt = [httpx.post(server.vendor_base + "chat/completions", json=body).json()["usage"]["prompt_tokens"]
              for _ in range(2)][0]
    q, h = (_metric(server, f"glm_serve_prefix_cache_{k}_total") - v
            for k, v in (("queries", queries), ("hits", hits)))
    block = server.engine.engine.config.block_size
    assert prompt > 3 * block and q == 2 * prompt and (prompt - 1) // block * block <= h < prompt


def test_requests_are_counted_by_route_template_not_by_path(server):
    # Before: a hard-coded list of paths; every other route (a batch, a file, its content, a cancel) was counted
    # as "other", with the scanners' 404s.
    def count(route: str, status: str) -> float:
        label = f'glm_serve_requests_total{{route="{route}",status="{status}"}}'
        return sum(float(line.split()[-1]) for line in httpx.get(server.url + "/metrics").text.splitlines()
                   if line.startswith(label))

    cases = [("/api/paas/v4/batches/batch-nope", "/api/paas/v4/batches/{batch_id}", "404"),
             ("/api/paas/v4/files/file-nope/content", "/api/paas/v4/files/{file_id}/content", "404"),
             ("/v1/batches/batch-nope", "/v1/batches/{batch_id}", "404"),  # OpenAI's batches: a label of their own
             ("/api/paas/v4/async-result/task-nope", "/api/paas/v4/async-result/{task_id}", "404"),
             ("/v1/chat/completions", "/v1/chat/completions", "405"),  # GET: the route is right, the method not
             ("/no/such/route/123", "other", "404")]
    before = [count(route, status) for _, route, status in cases]
    for (path, _, status), b in zip(cases, before):
        assert httpx.get(server.url + path).status_code == int(status), path
    assert [count(route, status) for _, route, status in cases] == [b + 1 for b in before]
    assert "/no/such/route/123" not in httpx.get(server.url + "/metrics").text
