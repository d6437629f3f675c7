"""Fuzzing the chat routes and /v1/responses with hypothesis (bounded in examples and time, loopback only): bodies
that mix valid and absurd values of every schema field, in JSON and as streams. No answer may be a 500, every error
must be the API's error body, and nothing may hang (each request has a timeout); the server serves afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import wait_idle

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


_ABSENT = object()
roles = st.sampled_from(["system", "user", "assistant", "tool"])
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})
image_part = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
    {"url": st.sampled_from(["https://x/y.png", "aGVsbG8=", "data:image/png;base64,aGVsbG8="])})})
content = st.one_of(st.text(max_size=30), st.text(max_size=30), st.none(), st.lists(text_part, max_size=2))
tool_call = st.fixed_dictionaries({"id": st.text(max_size=5), "type": st.just("function"), "function":
                                   st.fixed_dictionaries({"name": st.sampled_from(["f", "get_x"]),
                                                          "arguments": st.sampled_from(["{}", '{"a": "b"}'])})})
message = st.fixed_dictionaries({"role": roles, "content": content},
                                optional={"tool_calls": st.lists(tool_call, max_size=1)})
user_last = st.fixed_dictionaries({"role": st.just("user"), "content": content})
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "get_x"]),
     "parameters": st.just({"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}},
                            "required": ["a"]})})})

# Plausible values for every field; a drawn body is valid-looking, then 0-3 fields are mutated into junk, an
# absurd value or nothing, so both the accepted paths and every rejection path get exercised.
VALID = {
    "model": st.sampled_from(["glm-4-plus", "glm-4-flash"]),
    "messages": st.builds(lambda h, last: h + [last], st.lists(message, max_size=2), user_last),
    "stream": st.booleans(),
    "max_tokens": st.integers(1, 4),
    "temperature": st.floats(0, 1),
    "top_p": st.floats(0.01, 1),
    "do_sample": st.booleans(),
    "n": st.integers(1, 3),
    "seed": st.integers(-2**66, 2**66),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "tools": st.lists(tool, max_size=2, unique_by=lambda t: t["function"]["name"]),
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "f"}}]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema",
                                        "json_schema": {"schema": {"type": "object", "properties": {
                                            "k": {"enum": [1, 2]}}, "required": ["k"]}}}]),
    "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5), "presence_penalty": st.floats(-2, 2),
    "request_id": st.text(max_size=8), "thinking": st.none(), "meta": st.none(), "unknown_field": junk,
}
ABSURD = st.one_of(junk, st.sampled_from([10**9, -1, 0, 2.5, 1e308, "", [], {}, "nope", True]),
                   st.lists(st.one_of(message, image_part, junk), max_size=2),
                   st.fixed_dictionaries({"type": st.sampled_from(["web_search", "retrieval", "python", "x"])}),
                   st.just(_ABSENT))


@st.composite
def body(draw):
    data = {k: draw(v) for k, v in VALID.items() if k in ("model", "messages", "max_tokens") or draw(st.booleans())}
    for key in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=3, unique=True)):
        data[key] = draw(ABSURD)
    return data


def _post(client: httpx.Client, path: str, data: dict):
    payload = {k: v for k, v in data.items() if v is not _ABSENT}
    if isinstance(payload.get("max_tokens"), int) and not 1 <= payload["max_tokens"] <= 4:
        payload["max_tokens"] = 4  # junk may draw a big int: keep every run short
    r = client.post(path, content=json.dumps(payload))
    assert r.status_code != 500, (payload, r.text)
    if r.status_code != 200:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
        assert r.status_code in (400, 401, 404, 413, 429), (payload, r.status_code)
    elif payload.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
        assert '"error"' not in r.text, (payload, r.text[-300:])
    else:
        assert "choices" in r.json()


@pytest.mark.parametrize("path", ["/api/paas/v4/chat/completions", "/v1/chat/completions"])
def test_fuzz_chat_routes(server, path):
    client = httpx.Client(base_url=server.url, timeout=30, headers={"content-type": "application/json"})

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body())
    def run(data):
        _post(client, path, data)

    run()
    wait_idle(server.engine)
    assert client.get("/health").json()["status"] == "ok"
    client.close()


# The Responses API's fields (/v1/responses): the same plausible-then-mutated bodies.
input_part = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text"]),
                                              "text": st.text(max_size=20)}),
                       st.fixed_dictionaries({"type": st.just("input_image"), "image_url": st.text(max_size=8)}))
input_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                       "content": st.one_of(st.text(max_size=30), st.lists(input_part, max_size=2))},
                                      optional={"type": st.just("message")})
call_item = st.fixed_dictionaries({"type": st.just("function_call"), "call_id": st.text(max_size=5),
                                   "name": st.sampled_from(["f", "get_x", ""]),
                                   "arguments": st.sampled_from(["{}", '{"a": "b"}', "not json"])})
output_item = st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": st.text(max_size=5),
                                     "output": st.one_of(st.text(max_size=10), st.lists(input_part, max_size=1))})
flat_tool = st.fixed_dictionaries({"type": st.just("function"), "name": st.sampled_from(["f", "get_x"]),
                                   "parameters": st.just({"type": "object", "properties": {
                                       "a": {"type": "string", "maxLength": 3}}, "required": ["a"]})},
                                  optional={"strict": st.booleans(), "description": st.text(max_size=8)})
RESPONSES_VALID = {
    "model": st.sampled_from(["glm-4-plus", "glm-4-flash"]),
    "input": st.one_of(st.text(max_size=30), st.lists(st.one_of(input_message, call_item, output_item),
                                                      min_size=1, max_size=3)),
    "max_output_tokens": st.integers(1, 4),
    "instructions": st.text(max_size=20),
    "stream": st.booleans(),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "tools": st.lists(flat_tool, max_size=2, unique_by=lambda t: t["name"]),
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "name": "f"},
                                    {"type": "allowed_tools"}]),
    "text": st.sampled_from([{"format": {"type": "text"}}, {"format": {"type": "json_object"}}, {"verbosity": "low"},
                             {"format": {"type": "json_schema", "name": "k", "schema": {
                                 "type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"]}}}]),
    "top_logprobs": st.integers(0, 5), "include": st.lists(st.text(max_size=30), max_size=2),
    "store": st.booleans(), "reasoning": st.none(), "truncation": st.sampled_from(["disabled", None]),
    "metadata": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    "previous_response_id": st.none(), "parallel_tool_calls": st.booleans(), "unknown_field": junk,
}


@st.composite
def responses_body(draw):
    data = {k: draw(v) for k, v in RESPONSES_VALID.items()
            if k in ("model", "input", "max_output_tokens") or draw(st.booleans())}
    for key in draw(st.lists(st.sampled_from(sorted(RESPONSES_VALID)), max_size=3, unique=True)):
        data[key] = draw(ABSURD)
    return data


def test_fuzz_responses_route(server):
    client = httpx.Client(base_url=server.url, timeout=30, headers={"content-type": "application/json"})

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(responses_body())
    def run(data):
        payload = {k: v for k, v in data.items() if v is not _ABSENT}
        if isinstance(payload.get("max_output_tokens"), int) and not 1 <= payload["max_output_tokens"] <= 4:
            payload["max_output_tokens"] = 4  # junk may draw a big int: keep every run short
        r = client.post("/v1/responses", content=json.dumps(payload))
        assert r.status_code != 500, (payload, r.text)
        if r.status_code != 200:
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"] and "param" in err
            assert r.status_code in (400, 401, 404, 413, 429), (payload, r.status_code)
        elif payload.get("stream") is True:
            last = [ln for ln in r.text.splitlines() if ln.startswith("event: ")][-1]
            assert last in ("event: response.completed", "event: response.incomplete"), (payload, r.text[-300:])
        else:
            assert r.json()["object"] == "response" and r.json()["status"] in ("completed", "incomplete")

    run()
    wait_idle(server.engine)
    assert client.get("/health").json()["status"] == "ok"
    client.close()
