"""The `openai` SDK's Responses API (client.responses) against a real server's /v1/responses: the same answers as
chat for the same conversation, streamed events in the order the SDK expects, function calls both ways, JSON
schema output, max_output_tokens, and 400s in OpenAI's shape naming the Responses field."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response

from glm_serve.api import common
from glm_serve.api.params import prepare_chat

from .conftest import KEY_A, frozen_engine, wait_idle
from .test_http import _FailingFactory, _metric, _wait_admission_empty
from .test_vendor_sdk import TIME, WEATHER

M = "glm-4-tiny"
USER = "tell me about GLM"
# The tests' chat tools, in the Responses API's flat form
TOOLS = [{"type": "function", "strict": True, **t["function"]} for t in (WEATHER, TIME)]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
          "required": ["name", "ok"], "additionalProperties": False}
JSON_SCHEMA = {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key="unused", base_url=server.openai_base, max_retries=0)


def _raw(server, **body) -> dict:
    """The route's JSON as sent (the SDK builds its models without validating them): checked against the SDK's
    pydantic Response model strictly."""
    r = httpx.post(server.openai_base + "/responses", json={"model": M, **body}, timeout=60)
    assert r.status_code == 200, r.text
    Response.model_validate(r.json())
    return r.json()


def test_text_equals_chat_with_instructions_as_system(client, server):
    r = client.responses.create(model=M, instructions="be brief", input=USER, temperature=0, max_output_tokens=12)
    chat = client.chat.completions.create(model=M, temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": USER}])
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.id.startswith("resp_") and r.object == "response" and r.model == M and r.error is None
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert r.instructions == "be brief" and r.max_output_tokens == 12 and r.temperature == 0
    # A list of items (typed parts, the developer role) renders as the same conversation.
    items = [{"role": "developer", "content": "be brief"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": USER}]}]
    same = client.responses.create(model=M, input=items, temperature=0, max_output_tokens=12)
    assert same.output_text == r.output_text and same.usage.input_tokens == r.usage.input_tokens
    raw = _raw(server, input=USER, temperature=0, max_output_tokens=4, metadata={"k": "v"})
    assert raw["metadata"] == {"k": "v"} and raw["text"] == {"format": {"type": "text"}}


def test_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model=M, input=USER, temperature=0, max_output_tokens=3)
    chat = client.chat.completions.create(model=M, messages=[{"role": "user", "content": USER}], temperature=0,
                                          max_tokens=3)
    assert chat.choices[0].finish_reason == "length"  # (the tiny model does not stop within 3 tokens)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 3


def test_stream_events_concatenate_to_the_body(client, server):
    kw = dict(model=M, input=USER, temperature=0, max_output_tokens=16)
    body = client.responses.create(**kw)
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(e.delta for e in deltas) == body.output_text
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[:4] == head and kinds[-4:-1] == tail and kinds[4:-4] == ["response.output_text.delta"] * len(deltas)
    assert kinds[-1] == f"response.{body.status}"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == body.output_text and final.usage.output_tokens == body.usage.output_tokens
    assert events[-4].text == body.output_text and events[-2].item.id == events[2].item.id == final.output[0].id
    assert body.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    # The SDK's stream helper accumulates the same (its final response needs response.completed: an answer that
    # ends, here JSON held to a small schema, whose grammar ends it).
    kw["text"], kw["max_output_tokens"] = JSON_SCHEMA, 200
    body = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert body.status == "completed" and final.output_text == text == body.output_text
    assert final.usage.output_tokens == body.usage.output_tokens
    wait_idle(server.engine)


def test_forced_function_call(client, server):
    kw = dict(model=M, input="weather?", tools=TOOLS, tool_choice={"type": "function", "name": "get_time"},
              temperature=0, max_output_tokens=100)
    r = client.responses.create(**kw)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_time" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and r.status == "completed"
    jsonschema.validate(json.loads(call.arguments), TIME["function"]["parameters"])
    assert r.output_text == ""
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    assert events[2].item.type == "function_call" and events[2].item.name == "get_time"
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == events[-3].arguments == call.arguments == events[-1].response.output[0].arguments
    raw = _raw(server, **{k: v for k, v in kw.items() if k != "model"})
    assert raw["tools"] == TOOLS and raw["tool_choice"] == {"type": "function", "name": "get_time"}
    wait_idle(server.engine)


def test_function_call_items_render_as_chat_tool_turns(client, monkeypatch):
    """function_call and function_call_output input items are chat's assistant tool_calls and tool message: the
    same prompt ids, the same answer."""
    prompts = []  # the prompt ids of each request, as the chat path prepared them

    def spy(*args):
        prep = prepare_chat(*args)
        prompts.append(prep.prompt_ids)
        return prep

    monkeypatch.setattr(common, "prepare_chat", spy)
    args = '{"zone": "UTC"}'
    items = [{"role": "user", "content": "time?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": args},
             {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}]
    r = client.responses.create(model=M, input=items, tools=TOOLS, temperature=0, max_output_tokens=8)
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in (WEATHER, TIME)]  # as TOOLS are
    chat = client.chat.completions.create(model=M, tools=strict, temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}])
    assert prompts[0] == prompts[1] and r.usage.input_tokens == chat.usage.prompt_tokens == len(prompts[0])
    without = client.responses.create(model=M, input=items[:1], tools=TOOLS, temperature=0, max_output_tokens=1)
    assert r.usage.input_tokens > without.usage.input_tokens  # the call and its output are in the prompt
    (item,) = r.output
    answer = chat.choices[0].message
    if answer.tool_calls:  # (auto: the tiny model may answer with a call)
        assert (item.type, item.name, item.arguments) == ("function_call", answer.tool_calls[0].function.name,
                                                          answer.tool_calls[0].function.arguments)
    else:
        assert item.type == "message" and r.output_text == answer.content


def test_json_schema_format(client):
    r = client.responses.create(model=M, input=USER, temperature=0, max_output_tokens=200, text=JSON_SCHEMA)
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), SCHEMA)
    assert r.text.format.type == "json_schema" and r.text.format.schema_ == SCHEMA
    # json_object: held by the same grammar as chat's JSON mode (greedy, the tiny model's object does not end
    # within a few tokens: the same prefix), not free text
    obj = client.responses.create(model=M, input=USER, temperature=0, max_output_tokens=8,
                                  text={"format": {"type": "json_object"}})
    chat = client.chat.completions.create(model=M, messages=[{"role": "user", "content": USER}], temperature=0,
                                          max_tokens=8, response_format={"type": "json_object"})
    free = client.responses.create(model=M, input=USER, temperature=0, max_output_tokens=8)
    assert obj.output_text == chat.choices[0].message.content != free.output_text


def test_top_logprobs(client):
    # (extra_body: the SDK's own top_logprobs argument came after 1.66, the oldest version the tests run on)
    r = client.responses.create(model=M, input=USER, temperature=0, max_output_tokens=5,
                                include=["message.output_text.logprobs"], extra_body={"top_logprobs": 2})
    lps = r.output[0].content[0].to_dict()["logprobs"]
    assert len(lps) == r.usage.output_tokens == 5
    for lp in lps:
        assert len(lp["top_logprobs"]) == 2 and lp["top_logprobs"][0]["logprob"] == pytest.approx(lp["logprob"])
        assert lp["bytes"] == list(lp["token"].encode()) or "\ufffd" in lp["token"]
    plain = client.responses.create(model=M, input=USER, temperature=0, max_output_tokens=5)
    assert plain.output_text == r.output_text and plain.output[0].content[0].to_dict()["logprobs"] == []


@pytest.mark.parametrize("kwargs, param, code", [
    (dict(previous_response_id="resp_123"), "previous_response_id", "previous_response_not_found"),
    (dict(tools=[{"type": "web_search"}]), "tools[0].type", "1214"),
    (dict(temperature=3), "temperature", "1210"),
    (dict(temperature="hot"), "temperature", "1210"),
    (dict(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]), "input[0].content[0].type",
     "1214"),
    (dict(input=[{"role": "robot", "content": "x"}]), "input[0].role", "1214"),
    (dict(input=[]), "input", "1214"),
    (dict(input=5), "input", "1210"),
    (dict(truncation="sometimes"), "truncation", "1214"),
    (dict(max_output_tokens=0), "max_output_tokens", "1210"),
    (dict(text={"format": {"type": "xml"}}), "text.format.type", "1214"),
    (dict(text={"format": {"type": "json_schema", "name": "x"}}), "text.format.schema", "1214"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "name": "nope"}), "tool_choice.name", "1214"),
    (dict(tools=[{"type": "function", "name": "has space"}]), "tools[0].name", "1214"),
    (dict(tools=TOOLS, tool_choice="required", text={"format": {"type": "json_object"}}), "text.format", "1215"),
    (dict(input=[{"role": "user", "content": "x"}, {"type": "function_call", "call_id": "c", "name": "",
                                                   "arguments": "{}"}]), "input[1].name", "1214"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]), "input", "1214"),
    (dict(model="nope"), "model", "model_not_found"),
    (dict(input="x " * 3000), "input", "context_length_exceeded"),
])
def test_errors_name_the_field(client, kwargs, param, code):
    kwargs = {"model": M, "input": USER, "max_output_tokens": 2, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client.responses.create(**kwargs)
    assert e.value.status_code == 400
    err = e.value.response.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert "messages" not in err["message"] and "response_format" not in err["message"]  # no chat field names
    if code in ("1210", "1214", "1215") and param != "input":
        assert err["message"].startswith(param)
    if param == "previous_response_id":  # OpenAI's words
        assert err["message"] == "Previous response with id 'resp_123' not found."


def test_store_and_ignored_fields_are_accepted(server):
    raw = _raw(server, input=USER, max_output_tokens=2, store=True, reasoning={"effort": "low"}, user="u",
               parallel_tool_calls=False, truncation="disabled", include=["reasoning.encrypted_content"],
               some_future_field={"x": 1})
    assert raw["status"] in ("completed", "incomplete") and raw["parallel_tool_calls"] is False


def _requests(server, status: str) -> float:
    """/metrics' request count of the route, by HTTP status."""
    return sum(float(line.split()[-1]) for line in httpx.get(server.url + "/metrics").text.splitlines()
               if line.startswith("glm_serve_requests_total{") and 'route="/v1/responses"' in line
               and f'status="{status}"' in line)


def test_client_disconnect_aborts_and_frees(client, server):
    """A client that leaves (stream or body) aborts its engine request, as on chat; /metrics counts the route on
    its own label."""
    kw = dict(model=M, input="hello", temperature=0, max_output_tokens=300)
    ok, left = _requests(server, "200"), _requests(server, "499")
    control = client.responses.create(**kw)  # left alone, the request runs to its 300 tokens
    assert control.usage.output_tokens == 300 and _requests(server, "200") == ok + 1
    before = _metric(server, "glm_serve_generation_tokens_total")
    with frozen_engine(server.engine):
        with httpx.Client(timeout=10) as http:
            with http.stream("POST", server.openai_base + "/responses", json={**kw, "stream": True}) as r:
                assert next(r.iter_lines()) == "event: response.created"
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.openai_base + "/responses", json=kw, timeout=0.5)
        # The server notices both while the engine is held: the body's 499 is counted, and both slots are given
        # back, after their aborts went to the engine. (A fixed 0.2 s let a loaded machine release the engine first.)
        deadline = time.monotonic() + 30
        while _requests(server, "499") < left + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        _wait_admission_empty(server)
    wait_idle(server.engine)
    _wait_admission_empty(server)
    assert _metric(server, "glm_serve_generation_tokens_total") - before < 50  # aborted, not run to 300 each
    assert _requests(server, "499") == left + 1


def test_keys_and_per_key_limit(make_server):
    keyed = make_server(api_keys=[KEY_A], max_concurrency_per_key=1)
    kw = dict(model=M, input="hi", max_output_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="nobody.secret", base_url=keyed.openai_base, max_retries=0).responses.create(**kw)
    c = openai.OpenAI(api_key=KEY_A, base_url=keyed.openai_base, max_retries=0)
    assert c.responses.create(**kw).usage.output_tokens == 2
    with frozen_engine(keyed.engine):  # one stream of the key in flight: a second request is over its limit
        with c.responses.create(**kw, stream=True) as held:
            assert next(iter(held)).type == "response.created"
            with pytest.raises(openai.RateLimitError):
                c.responses.create(**kw)
    wait_idle(keyed.engine)


def test_a_failure_mid_stream_ends_with_response_failed(client, server, monkeypatch):
    monkeypatch.setattr(server.app.state.ctx, "constraint_factory", lambda: _FailingFactory())
    kw = dict(model=M, input=USER, max_output_tokens=20, text={"format": {"type": "json_object"}})
    events = list(client.responses.create(**kw, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.error.message
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.InternalServerError) as e:  # not streamed: the chat path's 500
        client.responses.create(**kw)
    assert e.value.response.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    wait_idle(server.engine)


def test_strict_reaches_the_chat_path(server):
    # `strict: true` on a flat tool is chat's strict function: held under tool_choice auto too, so a schema the
    # grammar cannot enforce is refused up front; without strict the same tool is served.
    tool = {"type": "function", "name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}
    body = {"model": "glm-4-tiny", "input": "hi", "max_output_tokens": 2}
    r = httpx.post(server.url + "/v1/responses", json={**body, "tools": [{**tool, "strict": True}]})
    assert r.status_code == 400 and "not" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"].startswith("tools")
    r = httpx.post(server.url + "/v1/responses", json={**body, "tools": [{**tool, "strict": False}]})
    assert r.status_code == 200, r.text


def test_truncation_auto_drops_the_oldest_items_to_fit(client, server):
    # A conversation longer than the context window (2048 here): with truncation auto, the fewest oldest items are
    # dropped (instructions and the last item stay) and it is answered; disabled (the default), a 400.
    ctx = server.app.state.ctx
    turns = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"turn {k}: " + "数据 中心 推理 " * 90}
             for k in range(14)]
    turns.append({"role": "user", "content": "and now?"})

    def prompt_len(items):
        msgs = [{"role": "system", "content": "Be brief."}] + items
        return len(httpx.post(server.url + "/tokenize", json={"model": M, "messages": msgs}).json()["tokens"])

    assert prompt_len(turns) > ctx.max_model_len
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=M, input=turns, instructions="Be brief.", max_output_tokens=2)
    assert e.value.code == "context_length_exceeded"
    r = client.responses.create(model=M, input=turns, instructions="Be brief.", max_output_tokens=2,
                                truncation="auto")
    k = next(k for k in range(len(turns)) if prompt_len(turns[k:]) < ctx.max_model_len)  # the fewest to drop
    assert k > 0 and r.usage.input_tokens == prompt_len(turns[k:]) and r.status in ("completed", "incomplete")
    assert r.truncation == "auto"  # echoed as sent (it used to read "disabled" whatever was asked)
    # one that fits is not cut
    short = client.responses.create(model=M, input=turns[-2:], instructions="Be brief.", max_output_tokens=2,
                                    truncation="auto")
    assert short.usage.input_tokens == prompt_len(turns[-2:])


def test_streamed_logprobs_add_up_when_text_was_held(client):
    # With (non-strict) tools the chat parser holds an answer's first text until it knows it is no call; the
    # logprobs of those tokens used to go out with no delta. They now ride on the next delta: the deltas' logprobs
    # are the done event's, token for token.
    loose = [{"type": "function", **t["function"]} for t in (WEATHER, TIME)]
    held = 0
    for text in ("time?", "weather in Paris", "hello"):
        events = list(client.responses.create(model=M, input=text, tools=loose, temperature=0, max_output_tokens=12,
                                              top_logprobs=2, stream=True))
        done = [e for e in events if e.type == "response.output_text.done"]
        if not done:
            continue  # the model called a function: no text, no text logprobs
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        streamed = [lp.token for e in deltas for lp in e.logprobs]
        assert streamed == [lp.token for lp in done[0].logprobs]
        held += len(deltas) < len(done[0].logprobs)
    assert held  # (at least one answer's first text was held back and came out with later tokens')
