"""The server with its engine in a process of its own (`glm-serve serve --engine-process`) answers exactly as the
server with the engine on a thread does (both schemas, streams, forced tool calls, echo with prompt logprobs),
reports the engine process in /metrics, and when that process dies says so on /health and answers requests with
an error in the API's format instead of hanging."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import openai
import pytest
from close_enough import assert_same  # tests/ is on sys.path

from glm_serve.api import ServerSettings
from glm_serve.engine.config import EngineConfig
from glm_serve.engine.process import ProcessEngine

from .conftest import ALIASES, MODEL, start_server
from .test_vendor_sdk import TIME, WEATHER

# The same engine settings as the `engine` fixture (conftest), so both servers give the same tokens.
CONFIG = dict(kv_cache_tokens=8192, max_batch_tokens=512, max_num_seqs=32, max_model_len=2048)
USER = [{"role": "user", "content": "tell me about GLM"}]


@pytest.fixture(scope="module")
def proc_server(tiny_hf):
    eng = ProcessEngine(EngineConfig(model=str(tiny_hf), **CONFIG))
    srv, server, thread = start_server(eng, ServerSettings(served_model_names=ALIASES))
    yield srv
    server.should_exit = True
    thread.join(timeout=10)
    eng.shutdown()


def _both(server, proc_server, fn):
    return fn(server), fn(proc_server)


def _vendor_chat(srv):
    r = httpx.post(srv.vendor_base + "chat/completions", timeout=60,
                   json={"model": MODEL, "messages": USER, "do_sample": False, "max_tokens": 40})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"], body["usage"]


def _openai_stream(srv):
    client = openai.OpenAI(api_key="unused", base_url=srv.openai_base, max_retries=0)
    chunks = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True}, logprobs=True, top_logprobs=2)
    text, lps, usage = "", [], None
    for c in chunks:
        if c.usage:
            usage = c.usage.model_dump()
        for ch in c.choices:
            text += ch.delta.content or ""
            if ch.logprobs and ch.logprobs.content:
                lps += [(t.token, t.logprob) for t in ch.logprobs.content]
    return text, lps, usage


def _forced_tool_call(srv):
    client = openai.OpenAI(api_key="unused", base_url=srv.openai_base, max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice="required",
                                       n=2, temperature=0.9, seed=5, max_tokens=80)
    return [(c.finish_reason, c.message.tool_calls[0].function.name if c.message.tool_calls else None,
             c.message.tool_calls[0].function.arguments if c.message.tool_calls else c.message.content)
            for c in r.choices]


def _echo_logprobs(srv):
    client = openai.OpenAI(api_key="unused", base_url=srv.openai_base, max_retries=0)
    r = client.completions.create(model=MODEL, prompt=[[40, 41, 42], [5, 77, 1203, 9]], echo=True, logprobs=1,
                                  max_tokens=3, temperature=0)
    return [(c.text, c.logprobs.tokens, c.logprobs.token_logprobs)
            for c in r.choices]


def _guided_and_biased(srv):
    """Grammars of each guided kind (pickled to the engine process), a logit_bias, a continued answer, a call
    held to a strict tool's schema."""
    client = openai.OpenAI(api_key="unused", base_url=srv.openai_base, max_retries=0)
    out = []
    for extra in ({"guided_choice": ["yes", "no", "maybe"]}, {"guided_regex": "[a-z]{3}-[0-9]{2}"},
                  {"guided_json": {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"],
                                   "additionalProperties": False}}):
        r = client.completions.create(model=MODEL, prompt="x", max_tokens=60, temperature=0.9, seed=4, n=2,
                                      extra_body=extra)
        out.append([c.text for c in r.choices])
    r = client.chat.completions.create(model=MODEL, messages=USER + [{"role": "assistant", "content": "So"}],
                                       temperature=0, max_tokens=6, logit_bias={"77": 5.0},
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    # tool_choice auto with strict tools: its constraint (a grammar inside) crosses to the engine process too
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in (WEATHER, TIME)]
    get = srv.app.state.ctx.tokenizer.encode("get", allow_special=False)[0]
    call = client.chat.completions.create(model=MODEL, messages=USER, tools=strict, temperature=0, max_tokens=60,
                                          logit_bias={str(get): 30}).choices[0].message.tool_calls[0].function
    return out, r.choices[0].message.content, (call.name, call.arguments)


@pytest.mark.parametrize("call", [_vendor_chat, _openai_stream, _forced_tool_call, _echo_logprobs, _guided_and_biased])
def test_answers_match_the_thread_engine(server, proc_server, call):
    if call in (_forced_tool_call, _guided_and_biased):
        pytest.importorskip("xgrammar")
    want, got = _both(server, proc_server, call)
    assert_same(got, want)  # (the two echoed prompts can arrive in one step or two: logprobs may differ in last bits)


def test_forced_tool_call_arguments_parse(proc_server):
    pytest.importorskip("xgrammar")
    for reason, name, args in _forced_tool_call(proc_server):
        if reason == "tool_calls":
            assert name in ("get_weather", "get_time") and isinstance(json.loads(args), dict)


def test_metrics_show_the_engine_process(proc_server):
    _vendor_chat(proc_server)
    deadline = time.monotonic() + 30
    while True:  # the engine's figures come with its messages: the last step's, or a heartbeat's
        text = httpx.get(proc_server.url + "/metrics").text
        samples = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
                   if line and not line.startswith("#")}
        if samples.get("glm_serve_num_requests_running", 1) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert samples['glm_serve_thread_cpu_seconds_total{thread="engine"}'] > 0
    assert samples["glm_serve_engine_steps_total"] > 0
    assert samples["glm_serve_kv_cache_capacity_tokens"] == 8192
    assert samples["glm_serve_num_requests_running"] == 0
    assert samples["glm_serve_engine_in_own_process"] == 1


def test_a_dead_engine_process_is_reported_not_hung(tiny_hf):
    eng = ProcessEngine(EngineConfig(model=str(tiny_hf), **CONFIG))
    srv, server, thread = start_server(eng, ServerSettings(served_model_names=ALIASES))
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        body = {"model": MODEL, "messages": USER, "max_tokens": 1500, "ignore_eos": True, "stream": True}
        pending = concurrent.futures.ThreadPoolExecutor(1).submit(  # a non-streamed request in flight too
            httpx.post, srv.vendor_base + "chat/completions", timeout=60,
            json={"model": MODEL, "messages": USER, "max_tokens": 1500, "ignore_eos": True})
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", srv.openai_base + "/chat/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")  # running
                os.kill(eng.pid, signal.SIGKILL)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert '"error"' in rest[-2] and "engine process has stopped" in rest[-2]  # in-band: headers were sent
        r = pending.result()  # as for a request sent after the engine stopped, not a 500
        assert r.status_code == 503 and "engine process has stopped" in r.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while eng.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(srv.url + "/health").status_code == 503
        r = httpx.post(srv.vendor_base + "chat/completions", timeout=30,
                       json={"model": MODEL, "messages": USER, "max_tokens": 5})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "500" and "engine process has stopped" in r.json()["error"]["message"]
        r = httpx.post(srv.openai_base + "/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": USER, "max_tokens": 5, "stream": True})
        assert r.status_code == 503 and "engine process has stopped" in r.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        eng.shutdown()
