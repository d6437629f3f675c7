"""Bad requests, keys and limits through the vendor SDK (and raw HTTP where the SDK cannot send the mistake):
every error has the API's body and code, 400s are not retried, the server keeps serving."""

from __future__ import annotations

import json
import threading
import time

import httpx
import jwt
import pytest
from zai import ZhipuAiClient
from zai.core._errors import APIAuthenticationError, APIReachLimitError, APIRequestFailedError

from glm_serve.api import ServerSettings
from glm_serve.engine.async_engine import AsyncEngine
from glm_serve.engine.config import EngineConfig
from glm_serve.engine.engine import LLMEngine

from .conftest import KEY_A, KEY_B, frozen_engine, start_server, wait_idle

USER = [{"role": "user", "content": "hi"}]


def _code(exc_info) -> str:
    return exc_info.value.response.json()["error"]["code"]


@pytest.fixture(scope="module")
def client(server):
    return ZhipuAiClient(api_key="anyid.anysecret", base_url=server.vendor_base)  # default retries on


def _requests_400(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    line = [ln for ln in text.splitlines()
            if ln.startswith('glm_serve_requests_total{route="/api/paas/v4/chat/completions",status="400"}')]
    return float(line[0].split()[-1]) if line else 0.0


@pytest.mark.parametrize("kwargs, code", [
    (dict(model="gpt-5", messages=USER), "1211"),
    (dict(model="glm-4-plus", messages=[]), "1214"),
    (dict(model="glm-4-plus", messages=[{"role": "wizard", "content": "x"}]), "1214"),
    (dict(model="glm-4-plus", messages=[{"role": "user", "content": 5}]), "1214"),
    (dict(model="glm-4-plus", messages=USER, extra_body={"temperature": 3}), "1210"),
    (dict(model="glm-4-plus", messages=USER, extra_body={"top_p": 0}), "1210"),
    (dict(model="glm-4-plus", messages=USER, max_tokens=10**9), "1210"),
    (dict(model="glm-4-plus", messages=USER, max_tokens=-1), "1210"),
    (dict(model="glm-4-plus", messages=USER, extra_body={"n": 10**6}), "1210"),
    (dict(model="glm-4-plus", messages=USER, seed="abc"), "1210"),
    (dict(model="glm-4-plus", messages=USER, tools=[{"type": "web_search", "web_search": {"enable": True}}]),
     "1214"),
    (dict(model="glm-4-plus", messages=USER, tools=[{"type": "retrieval", "retrieval": {"knowledge_id": "1"}}]),
     "1214"),
    (dict(model="glm-4-plus", messages=USER, tool_choice="required"), "1214"),
    (dict(model="glm-4-plus", messages=USER, response_format={"type": "xml"}), "1214"),
    (dict(model="glm-4-plus", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="}}]}]),
     "1214"),
    (dict(model="glm-4-plus", messages=[{"role": "user", "content": "长" * 4000}]), "1261"),
    (dict(model="glm-4-plus", messages=[{"role": "user"}]), "1213"),
])
def test_bad_requests_get_their_code_and_are_not_retried(client, server, kwargs, code):
    before = _requests_400(server)
    with pytest.raises(APIRequestFailedError) as e:
        client.chat.completions.create(**kwargs)
    assert e.value.status_code == 400 and _code(e) == code
    assert e.value.response.headers["x-should-retry"] == "false"
    assert _requests_400(server) == before + 1  # one request: the SDK obeyed x-should-retry


def test_image_to_text_model_says_so(client):
    with pytest.raises(APIRequestFailedError) as e:
        client.chat.completions.create(model="glm-4-plus", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert "image" in e.value.response.json()["error"]["message"]


def test_raw_http_mistakes(server):
    url = server.vendor_base + "chat/completions"
    cases = [
        (b"{not json", "1210"), (b"[1, 2]", "1210"), (b'{"model": "glm-4-plus"}', "1213"),
        (b'{"messages": []}', "1213"), (b'{"model": 5, "messages": []}', "1210"),
        (b'{"model": "glm-4-plus", "messages": "hi"}', "1210"),
        (b'{"model": "glm-4-plus", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "1210"),
        (b'{"model": "glm-4-plus", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "1210"),
        (b"\xff\xfe", "1210"), (b"[" * 100000, "1210"),
    ]
    for body, code in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert (r.status_code, r.json()["error"]["code"]) == (400, code), body[:40]
    r = httpx.get(url)
    assert r.status_code == 405 and r.json()["error"]["code"] == "1212"
    r = httpx.post(url, content=b"x" * (server.app.state.ctx.settings.max_body_bytes + 1))
    assert r.status_code == 413 and r.json()["error"]["code"] == "1210"
    r = httpx.get(server.vendor_base + "async-result/nope")
    assert r.status_code == 404
    # nulls (as the SDKs send them) and unknown fields are accepted
    r = httpx.post(url, json={"model": "glm-4-plus", "messages": USER, "response_format": None, "thinking": None,
                              "temperature": None, "tools": None, "whatever": {"x": 1}, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def keyed(make_server):
    return make_server(api_keys=[KEY_A, KEY_B], max_concurrency_per_key=1)


def _sdk(srv, key, **kw):
    return ZhipuAiClient(api_key=key, base_url=srv.vendor_base, max_retries=0, **kw)


def test_keys_raw_and_sdk_jwt(keyed):
    for key in (KEY_A, KEY_B):
        for cache in (True, False):  # disable_token_cache=False: the SDK sends an HS256 JWT, exp in ms
            r = _sdk(keyed, key, disable_token_cache=cache).chat.completions.create(
                model="glm-4-plus", messages=USER, max_tokens=2)
            assert r.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(keyed.url + "/health").status_code == 200  # no key needed


def test_bad_credentials(keyed):
    for key, cache, code in [("testida.wrong-secret-wrong-secret-wrong-secret", False, "1004"),
                             ("testida.wrong-secret", True, "1000"),
                             ("nobody.secret-secret-secret-secret-secret", False, "1002")]:
        with pytest.raises(APIAuthenticationError) as e:
            _sdk(keyed, key, disable_token_cache=cache).chat.completions.create(model="glm-4-plus", messages=USER)
        assert _code(e) == code
    kid, secret = KEY_A.split(".")
    now = int(time.time() * 1000)
    expired = jwt.encode({"api_key": kid, "exp": now - 1000, "timestamp": now - 300_000}, secret,
                         algorithm="HS256", headers={"alg": "HS256", "sign_type": "SIGN"})
    url = keyed.vendor_base + "chat/completions"
    body = {"model": "glm-4-plus", "messages": USER, "max_tokens": 1}
    for headers, code in [({"Authorization": f"Bearer {expired}"}, "1003"), ({}, "1001")]:
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == code
        assert r.headers["x-should-retry"] == "false"
    r = httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_no_route_but_health_answers_without_a_key(keyed):
    # Before: FastAPI's own /docs, /redoc and /openapi.json answered 200 with no key (README: every route but
    # /health needs one).
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert httpx.get(keyed.url + path).status_code in (401, 404), path
    for path in ("/metrics", "/v1/models", "/v1/models/glm-4-plus", "/api/paas/v4/files", "/api/paas/v4/batches",
                 "/v1/files", "/v1/batches"):
        assert httpx.get(keyed.url + path).status_code == 401, path
    for path in ("/tokenize", "/detokenize"):
        assert httpx.post(keyed.url + path, json={"prompt": "a", "tokens": [1]}).status_code == 401, path


def _hold_stream(srv, key):
    """A streaming request kept open (not read) by the caller; run it inside frozen_engine."""
    client = httpx.Client(timeout=30)
    body = {"model": "glm-4-plus", "messages": USER, "stream": True, "max_tokens": 50}
    cm = client.stream("POST", srv.openai_base + "/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {key}"})
    response = cm.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    next(lines)
    client.held_lines = lines  # dropping the iterator would close the connection (a disconnect)
    return client, cm


def test_per_key_concurrency_limit(keyed, engine):
    with frozen_engine(engine):  # nothing generates: the first request stays in flight
        client, cm = _hold_stream(keyed, KEY_A)
        try:
            with pytest.raises(APIReachLimitError) as e:
                _sdk(keyed, KEY_A).chat.completions.create(model="glm-4-plus", messages=USER, max_tokens=1)
            assert e.value.status_code == 429 and _code(e) == "1302"
            assert "x-should-retry" not in e.value.response.headers  # a later retry may pass
        finally:
            cm.__exit__(None, None, None)  # the client leaves mid-stream
            client.close()
    _sdk(keyed, KEY_B).chat.completions.create(model="glm-4-plus", messages=USER, max_tokens=1)
    wait_idle(engine)  # the abandoned stream was aborted and its blocks freed
    deadline = time.monotonic() + 30
    while keyed.app.state.ctx.admission.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    _sdk(keyed, KEY_A).chat.completions.create(model="glm-4-plus", messages=USER, max_tokens=1)


def test_a_refused_request_costs_no_preparation(keyed, engine, monkeypatch):
    """A key over its limit gets its 429 before the server tokenizes the prompt or compiles a grammar (chat on
    both schemas, async chat, completions); and a request that fails to prepare (a 400) gives its slot back."""
    from glm_serve.api import common, routes_openai  # noqa: PLC0415

    prepared = []
    for module, name in ((common, "prepare_chat"), (routes_openai, "_prepare")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name: prepared.append(_name) or _real(*a))
    auth = {"Authorization": f"Bearer {KEY_A}"}
    chat = {"model": "glm-4-plus", "messages": USER, "max_tokens": 1,
            "response_format": {"type": "json_object"}}  # (a grammar to compile, were it prepared)
    with frozen_engine(engine):
        client, cm = _hold_stream(keyed, KEY_A)
        prepared.clear()
        try:
            for path, body in (("/v1/chat/completions", chat), ("/api/paas/v4/chat/completions", chat),
                               ("/api/paas/v4/async/chat/completions", chat),
                               ("/v1/completions", {"model": "glm-4-plus", "prompt": "x" * 5000, "max_tokens": 1})):
                r = httpx.post(keyed.url + path, json=body, headers=auth)
                assert r.status_code == 429 and r.json()["error"]["code"] in ("1302", "rate_limit_exceeded"), path
            assert prepared == []
        finally:
            cm.__exit__(None, None, None)
            client.close()
    wait_idle(engine)
    deadline = time.monotonic() + 30
    while keyed.app.state.ctx.admission.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    for path, bad in (("/v1/chat/completions", {**chat, "temperature": 7}),
                      ("/v1/completions", {"model": "glm-4-plus", "prompt": "x", "suffix": "y"})):
        assert httpx.post(keyed.url + path, json=bad, headers=auth).status_code == 400
    assert keyed.app.state.ctx.admission.in_flight == 0  # the 400s gave their slots back
    _sdk(keyed, KEY_A).chat.completions.create(model="glm-4-plus", messages=USER, max_tokens=1)


def test_queue_full(tiny_hf):
    small = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_hf), kv_cache_tokens=4096, max_num_seqs=1,
                                               max_batch_tokens=256)))
    srv, server, thread = start_server(small, ServerSettings(served_model_names=["glm-4-plus"], max_queue=0))
    try:
        with frozen_engine(small):
            client, cm = _hold_stream(srv, "x")
            try:
                with pytest.raises(APIReachLimitError) as e:
                    _sdk(srv, "a.b").chat.completions.create(model="glm-4-plus", messages=USER, max_tokens=1)
                assert _code(e) == "1305"
            finally:
                cm.__exit__(None, None, None)
                client.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        small.shutdown()


def test_request_ids_are_per_key(keyed, engine):
    """Key B may use a request_id that key A has in flight: one tenant's ids never block another's."""
    body = {"model": "glm-4-plus", "messages": USER, "max_tokens": 2, "request_id": "shared-id"}
    active = keyed.app.state.ctx.active_request_ids
    results = {}

    def post(key):
        results[key] = httpx.post(keyed.vendor_base + "chat/completions", json=body, timeout=30,
                                  headers={"Authorization": f"Bearer {key}"})

    with frozen_engine(engine):
        threads = []
        for key in (KEY_A, KEY_B):
            threads.append(threading.Thread(target=post, args=(key,)))
            threads[-1].start()
            deadline = time.monotonic() + 30
            while sum(rid == "shared-id" for _, rid in active) < len(threads) and time.monotonic() < deadline:
                time.sleep(0.01)
        assert sorted(k for k, rid in active if rid == "shared-id") == ["testida", "testidb"]
    for t in threads:
        t.join()
    for key in (KEY_A, KEY_B):
        assert results[key].status_code == 200 and results[key].json()["request_id"] == "shared-id"


def test_json_mode_without_xgrammar_is_a_400_naming_it(make_server, monkeypatch):
    # xgrammar is an optional extra ([structured]). Before: JSON mode or a forced tool call on a server without it
    # was a 500 "internal error: ValueError", which the SDKs retried three times; the fix was only in the log.
    import sys  # noqa: PLC0415

    srv = make_server()  # a fresh app: no constraint factory built yet
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar fails as if it were not installed
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for url, extra in [(srv.openai_base + "/chat/completions", {"response_format": {"type": "json_object"}}),
                       (srv.vendor_base + "chat/completions", {"tools": [tool], "tool_choice": "required"})]:
        r = httpx.post(url, json={"model": "glm-4-plus", "messages": USER, "max_tokens": 2, **extra})
        assert r.status_code == 400, r.text
        assert r.headers["x-should-retry"] == "false" and "glm-serve[structured]" in r.text
    body = {"model": "glm-4-plus", "messages": USER, "max_tokens": 2}
    assert httpx.post(srv.vendor_base + "chat/completions", json=body).status_code == 200  # the rest works


def test_an_async_result_is_fetched_with_its_own_key(keyed):
    """Key A's task id is unknown to key B (404 / 1214), whether A signs with a JWT or sends the raw key."""
    task = _sdk(keyed, KEY_A).chat.asyncCompletions.create(model="glm-4-plus", messages=USER, max_tokens=2)
    url = keyed.vendor_base + f"async-result/{task.id}"
    r = httpx.get(url, headers={"Authorization": f"Bearer {KEY_B}"})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "1214")
    deadline = time.monotonic() + 30
    while (r := httpx.get(url, headers={"Authorization": f"Bearer {KEY_A}"})).json()["task_status"] == "PROCESSING":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert r.status_code == 200 and r.json()["task_status"] == "SUCCESS"


class _PausedClock:
    """time.monotonic() that stands still until resume(), then runs on from where it stood."""

    def __init__(self):
        self._at, self._since = time.monotonic(), None

    def resume(self):
        self._since = time.monotonic()

    def __call__(self) -> float:
        return self._at if self._since is None else self._at + time.monotonic() - self._since


def test_request_rate_per_key(make_server):
    # --max-requests-per-minute-per-key 60: a burst of 60, then one a second. The 61st gets 429 / 1303 with
    # Retry-After in both schemas; another key is not limited by it; the openai SDK's retry waits for Retry-After
    # and then passes.
    from openai import OpenAI, RateLimitError  # noqa: PLC0415

    srv = make_server(api_keys=[KEY_A, KEY_B], max_requests_per_minute_per_key=60)
    # The bucket refills one request a second: on a loaded machine the 60 requests of the burst took over a
    # second, the 61st found a request earned back and passed (CI-style load failed this every time). The
    # limiter's clock stands still through the burst and the refusals, then runs again for the SDK's retry.
    clock = _PausedClock()
    srv.app.state.ctx.admission._rates._clock = clock
    body = {"model": "glm-4-plus", "messages": USER, "max_tokens": 1}
    auth = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(timeout=30) as http:
        for _ in range(60):
            assert http.post(srv.vendor_base + "chat/completions", json=body, headers=auth).status_code == 200
        r = http.post(srv.vendor_base + "chat/completions", json=body, headers=auth)
        assert r.status_code == 429 and r.json()["error"]["code"] == "1303", r.text
        assert r.headers["retry-after"] in ("1", "2") and "x-should-retry" not in r.headers
    with pytest.raises(RateLimitError) as e:
        OpenAI(api_key=KEY_A, base_url=srv.url + "/v1", max_retries=0).chat.completions.create(**body)
    err = e.value.response.json()["error"]
    assert (err["type"], err["code"]) == ("rate_limit_error", "1303") and "retry in" in err["message"]
    OpenAI(api_key=KEY_B, base_url=srv.url + "/v1", max_retries=0).chat.completions.create(**body)
    metrics = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY_B}"}).text
    refused = [line for line in metrics.splitlines() if line.startswith("glm_serve_key_refused_requests_total{")]
    assert refused == [f'glm_serve_key_refused_requests_total{{code="1303",key="{KEY_A.split(".")[0]}"}} 2.0']
    clock.resume()  # from here a request is earned back every second, in real time
    t0 = time.monotonic()
    out = OpenAI(api_key=KEY_A, base_url=srv.url + "/v1", max_retries=3).chat.completions.create(**body)
    assert out.choices[0].finish_reason in ("stop", "length") and time.monotonic() - t0 < 10


def _key_metrics(srv) -> dict[tuple[str, str], float]:
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY_A}"}).text
    out = {}
    for line in text.splitlines():
        if line.startswith("glm_serve_key_") and "_total{" in line:
            name, rest = line.split("{", 1)
            out[(name.removeprefix("glm_serve_key_").removesuffix("_total"), rest.split('"')[1])] = float(
                line.split()[-1])
    return out


def test_usage_per_key_in_metrics(make_server, engine):
    # Every way a key spends the model is counted for it: vendor chat, a /v1 stream, completions over two prompts,
    # a Responses call, an async task and a batch line; the tokens are the ones their usage reported. Another
    # key's stay apart.
    from openai import OpenAI  # noqa: PLC0415

    srv = make_server(api_keys=[KEY_A, KEY_B])
    auth = {"Authorization": f"Bearer {KEY_A}"}
    oa = OpenAI(api_key=KEY_A, base_url=srv.url + "/v1", max_retries=0)
    prompt = completion = 0

    def add(usage_prompt, usage_completion):
        nonlocal prompt, completion
        prompt, completion = prompt + usage_prompt, completion + usage_completion

    r = _sdk(srv, KEY_A).chat.completions.create(model="glm-4-plus", messages=USER, max_tokens=3)
    add(r.usage.prompt_tokens, r.usage.completion_tokens)
    chunks = list(oa.chat.completions.create(model="glm-4-plus", messages=USER, max_tokens=4, stream=True,
                                             stream_options={"include_usage": True}))
    add(chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens)
    r = oa.completions.create(model="glm-4-plus", prompt=["one", "two three"], max_tokens=2)
    add(r.usage.prompt_tokens, r.usage.completion_tokens)
    r = oa.responses.create(model="glm-4-plus", input="hi", max_output_tokens=3)
    add(r.usage.input_tokens, r.usage.output_tokens)
    task = httpx.post(srv.vendor_base + "async/chat/completions", headers=auth,
                      json={"model": "glm-4-plus", "messages": USER, "max_tokens": 3}).json()
    deadline = time.monotonic() + 60
    while (res := httpx.get(srv.vendor_base + f"async-result/{task['id']}", headers=auth).json())[
            "task_status"] == "PROCESSING" and time.monotonic() < deadline:
        time.sleep(0.05)
    add(res["usage"]["prompt_tokens"], res["usage"]["completion_tokens"])
    line = {"custom_id": "a", "method": "POST", "url": "/v4/chat/completions",
            "body": {"model": "glm-4-plus", "messages": USER, "max_tokens": 3}}
    f = httpx.post(srv.vendor_base + "files", headers=auth, data={"purpose": "batch"},
                   files={"file": ("in.jsonl", (json.dumps(line) + "\n").encode())}).json()
    b = httpx.post(srv.vendor_base + "batches", headers=auth, json={
        "input_file_id": f["id"], "endpoint": "/v4/chat/completions", "completion_window": "24h"}).json()
    while (b := httpx.get(srv.vendor_base + f"batches/{b['id']}", headers=auth).json())["status"] not in (
            "completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.05)
    out = httpx.get(srv.vendor_base + f"files/{b['output_file_id']}/content", headers=auth).text
    usage = json.loads(out)["response"]["body"]["usage"]
    add(usage["prompt_tokens"], usage["completion_tokens"])
    OpenAI(api_key=KEY_B, base_url=srv.url + "/v1", max_retries=0).chat.completions.create(
        model="glm-4-plus", messages=USER, max_tokens=2)
    wait_idle(engine)
    m = _key_metrics(srv)
    a, b_id = KEY_A.split(".")[0], KEY_B.split(".")[0]
    assert m[("requests", a)] == 5 and m[("requests", b_id)] == 1  # admitted requests (batch lines are not)
    assert (m[("prompt_tokens", a)], m[("generation_tokens", a)]) == (prompt, completion)
    assert m[("generation_tokens", b_id)] >= 1
