"""The `openai` SDK against a real server's /v1: chat (sync, stream with usage, n>1, logprobs, seeds), JSON
schema output, forced tool calls (streamed), legacy completions (strings, ids, lists, echo, stream), logit_bias,
models, and errors in OpenAI's shape."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from .conftest import engine_answer, wait_idle
from .test_vendor_sdk import TIME, WEATHER


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key="unused", base_url=server.openai_base, max_retries=0)


USER = [{"role": "user", "content": "tell me about GLM"}]


def test_chat_greedy_equals_engine(client, server):
    r = client.chat.completions.create(model="glm-4-tiny", messages=USER, temperature=0, max_tokens=24)
    text, token_ids, prompt_ids = engine_answer(server.engine, USER, 24)
    assert r.choices[0].message.content == text.removeprefix("\n")
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(token_ids)
    assert r.object == "chat.completion" and r.model == "glm-4-tiny"


def test_stream_with_usage_and_n(client, server):
    full = client.chat.completions.create(model="glm-4-tiny", messages=USER, temperature=0, max_tokens=20)
    stream = client.chat.completions.create(model="glm-4-tiny", messages=USER, temperature=0, max_tokens=20, n=3,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    texts = ["", "", ""]
    for c in chunks[:-1]:
        (ch,) = c.choices
        texts[ch.index] += ch.delta.content or ""
    assert texts == [full.choices[0].message.content] * 3  # greedy: every choice is the same answer
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3 * full.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    wait_idle(server.engine)


def test_seeded_sampling_is_reproducible_and_choices_differ(client):
    kw = dict(model="glm-4-tiny", messages=USER, temperature=1.0, max_tokens=16, seed=7, n=4)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1


def test_logprobs(client):
    r = client.chat.completions.create(model="glm-4-tiny", messages=USER, temperature=0, max_tokens=6,
                                       logprobs=True, top_logprobs=3)
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens
    for lp in lps:
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0
        assert lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)  # greedy picks the most likely


def test_logit_bias(client, server):
    """OpenAI's logit_bias: +100 on one token makes it the whole answer (greedy, chat and completions); the
    reported logprobs stay the model's own; the engine's answer with the same bias is the same."""
    tok = server.engine.engine.tokenizer
    (word,) = tok.encode(" GLM")[:1]
    r = client.chat.completions.create(model="glm-4-tiny", messages=USER, temperature=0, max_tokens=4,
                                       logit_bias={str(word): 100}, logprobs=True)
    assert r.choices[0].message.content == tok.decode([word] * 4).removeprefix("\n")
    assert r.choices[0].finish_reason == "length"
    plain = client.chat.completions.create(model="glm-4-tiny", messages=USER, temperature=0, max_tokens=1,
                                           logprobs=True, top_logprobs=1)
    assert r.choices[0].logprobs.content[0].logprob <= plain.choices[0].logprobs.content[0].logprob
    text, ids, _ = engine_answer(server.engine, USER, 6, logit_bias={word: 3.0, 100: -100.0})
    r = client.chat.completions.create(model="glm-4-tiny", messages=USER, temperature=0, max_tokens=6,
                                       logit_bias={str(word): 3.0, "100": -100})
    assert r.choices[0].message.content == text.removeprefix("\n") and 100 not in ids
    c = client.completions.create(model="glm-4-tiny", prompt="hello", temperature=0, max_tokens=3,
                                  logit_bias={str(word): 100})
    assert c.choices[0].text == tok.decode([word] * 3)


@pytest.mark.parametrize("bias, code", [({"x": 1}, "1210"), ({"5": 101}, "1210"), ({"5": "high"}, "1210"),
                                        ({"-3": 1}, "1210"), ({"99999999": 1}, "1214")])
def test_logit_bias_errors_name_it(client, bias, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="glm-4-tiny", messages=USER, max_tokens=1, logit_bias=bias)
    err = e.value.response.json()["error"]
    assert err["code"] == code and err["param"] == "logit_bias" and err["message"].startswith("logit_bias")


def test_json_schema_output_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "ok": {"type": "boolean"}, "tag": {"enum": ["a", "b"]}},
              "required": ["name", "ok", "tag"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="glm-4-tiny", messages=USER, temperature=0, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_forced_tool_call_stream(client):
    kw = dict(model="glm-4-tiny", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER, TIME],
              tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0, max_tokens=100)
    full = client.chat.completions.create(**kw)
    (call,) = full.choices[0].message.tool_calls
    assert full.choices[0].finish_reason == "tool_calls" and call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_time" and deltas[0].id.startswith("call_")
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert not any(c.choices[0].delta.content for c in chunks)


def _strict(tool):
    return {**tool, "function": {**tool["function"], "strict": True}}


def test_strict_tools_hold_calls_the_model_chooses(client, server):
    # tool_choice auto (the default) with `strict: true` functions: the model still chooses whether to call, and a
    # call it makes holds to the schema. A logit bias on "get" (both names start with it) makes this random model
    # call; without `strict`, the same greedy request writes "get" over and over, which is no call at all.
    get = server.app.state.ctx.tokenizer.encode("get", allow_special=False)
    assert len(get) == 1
    kw = dict(model="glm-4-tiny", messages=[{"role": "user", "content": "weather?"}], temperature=0,
              max_tokens=100, logit_bias={str(get[0]): 30})
    loose = client.chat.completions.create(**kw, tools=[WEATHER, TIME])
    assert not loose.choices[0].message.tool_calls
    tools = [_strict(WEATHER), _strict(TIME)]
    full = client.chat.completions.create(**kw, tools=tools)
    (call,) = full.choices[0].message.tool_calls
    assert full.choices[0].finish_reason == "tool_calls" and call.function.name in ("get_weather", "get_time")
    # `strict` is for the server: the prompt shows the functions without it
    assert full.usage.prompt_tokens == loose.usage.prompt_tokens
    schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    chunks = list(client.chat.completions.create(**kw, tools=tools, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == call.function.name
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    # Unbiased, sampled: answers are content or valid calls, never a broken call (but one max_tokens cut)
    r = client.chat.completions.create(model="glm-4-tiny", messages=[{"role": "user", "content": "weather?"}],
                                       tools=tools, n=6, temperature=1, seed=1, max_tokens=40)
    for ch in r.choices:
        if ch.finish_reason == "length":
            continue
        for tc in ch.message.tool_calls or []:
            jsonschema.validate(json.loads(tc.function.arguments), {"get_weather": WEATHER, "get_time": TIME}[
                tc.function.name]["function"]["parameters"])
    # A strict schema the grammar cannot enforce is refused, as OpenAI's strict mode does
    bad = _strict({"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}})
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="glm-4-tiny", messages=[{"role": "user", "content": "x"}],
                                       tools=[bad], max_tokens=2)
    assert e.value.body["param"] == "tools" and "not" in e.value.body["message"]


def test_a_forced_call_cut_inside_its_name_leaves_no_content(client):
    """max_tokens ends a forced call before its name is whole: the answer is empty, finish "length" (the name's
    prefix used to come back as content, which forced calls never have)."""
    kw = dict(model="glm-4-tiny", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER, TIME],
              tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0, max_tokens=1)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "length"
    assert not r.choices[0].message.content and not r.choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert not any(c.choices[0].delta.content or c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_do_not_cut_constrained_json(client):
    # Every call and JSON answer holds "{": a stop string (or stop id) inside the grammar's output cut it, and a
    # cut call still came back as finish_reason "tool_calls" with arguments "" (not JSON).
    kw = dict(model="glm-4-tiny", messages=[{"role": "user", "content": "weather?"}], temperature=0, max_tokens=100,
              stop=["{", ":"])
    r = client.chat.completions.create(**kw, tools=[WEATHER, TIME], tool_choice="required")
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
    r = client.chat.completions.create(**kw, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert "{" in r.choices[0].message.content


def test_completions(client, server):
    tok = server.engine.engine.tokenizer
    ids = tok.encode("[gMASK]<sop><|user|>\nhello<|assistant|>")
    by_text = client.completions.create(model="glm-4-tiny", prompt="[gMASK]<sop><|user|>\nhello<|assistant|>",
                                        temperature=0, max_tokens=12)
    by_ids = client.completions.create(model="glm-4-tiny", prompt=ids, temperature=0, max_tokens=12)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    many = client.completions.create(model="glm-4-tiny", prompt=[ids, [5, 6, 7]], temperature=0, max_tokens=12,
                                     n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_ids.choices[0].text
    # Usage of a list of prompts: each prompt once, every choice's tokens (n = 2: four choices of 3 tokens).
    both = client.completions.create(model="glm-4-tiny", prompt=[ids, [5, 6, 7]], temperature=0, max_tokens=3,
                                     n=2, extra_body={"ignore_eos": True})
    assert (both.usage.prompt_tokens, both.usage.completion_tokens) == (len(ids) + 3, 12)
    assert both.usage.total_tokens == len(ids) + 15
    default = client.completions.create(model="glm-4-tiny", prompt="hi", temperature=0,
                                        extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens
    echo = client.completions.create(model="glm-4-tiny", prompt="hello there", temperature=0, max_tokens=4, echo=True)
    assert echo.choices[0].text.startswith("hello there")
    stream = list(client.completions.create(model="glm-4-tiny", prompt=ids, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in stream[:-1]) == by_ids.choices[0].text
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == by_ids.usage.completion_tokens
    lp = client.completions.create(model="glm-4-tiny", prompt=ids, temperature=0, max_tokens=5, logprobs=2)
    lps = lp.choices[0].logprobs
    assert len(lps.tokens) == 5 and "".join(lps.tokens) != ""
    assert len(lps.token_logprobs) == len(lps.top_logprobs) == 5
    assert lps.text_offset == [sum(len(t) for t in lps.tokens[:k]) for k in range(5)]
    pieces = [c.choices[0].logprobs for c in client.completions.create(
        model="glm-4-tiny", prompt=ids, temperature=0, max_tokens=5, logprobs=2, stream=True)]
    assert sum((p.tokens for p in pieces if p), []) == lps.tokens
    assert sum((p.token_logprobs for p in pieces if p), []) == pytest.approx(lps.token_logprobs)


def test_models(client):
    assert [m.id for m in client.models.list()] == ["glm-4-tiny", "glm-4-plus", "glm-4-flash"]


@pytest.mark.parametrize("kwargs, status, code", [
    (dict(model="nope", messages=USER), 400, "model_not_found"),
    (dict(model="glm-4-tiny", messages=USER, temperature=2.5), 400, "1210"),
    (dict(model="glm-4-tiny", messages=USER, n=1000), 400, "1210"),
    (dict(model="glm-4-tiny", messages=USER, logit_bias={"99999999": 10}), 400, "1214"),
    (dict(model="glm-4-tiny", messages=[{"role": "user", "content": "x " * 3000}]), 400, "context_length_exceeded"),
    (dict(model="glm-4-tiny", messages=USER, tools=[{"type": "web_search"}]), 400, "1214"),
])
def test_errors_in_openai_shape(client, kwargs, status, code):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**kwargs)
    assert e.value.status_code == status
    err = e.value.response.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]


def test_completions_prompt_too_long_names_the_prompt(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="glm-4-tiny", prompt="x " * 3000, max_tokens=1)
    err = e.value.response.json()["error"]
    assert e.value.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt"


def test_model_retrieve(client, server):
    """GET /v1/models/{id}: the SDK's models.retrieve; an unknown name is a 404 model_not_found (OpenAI's answer)."""
    m = client.models.retrieve("glm-4-plus")
    assert (m.id, m.object, m.owned_by) == ("glm-4-plus", "model", "glm-serve") and m.created > 0
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    err = e.value.response.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "nope" in err["message"]


def test_model_retrieve_by_a_hub_id(make_server):
    """A served name may hold a slash (the default name of a hub checkpoint): the SDK puts it in the path as is."""
    srv = make_server(served_model_names=["THUDM/glm-4-9b-chat"])
    c = openai.OpenAI(api_key="unused", base_url=srv.openai_base, max_retries=0)
    assert c.models.retrieve("THUDM/glm-4-9b-chat").id == "THUDM/glm-4-9b-chat"


def test_developer_role_is_the_system_prompt(client):
    """OpenAI's `developer` role (what newer clients send instead of `system`) is GLM-4's system turn on /v1."""
    kw = dict(model="glm-4-tiny", temperature=0, max_tokens=8)
    as_system = client.chat.completions.create(messages=[{"role": "system", "content": "be brief"}, *USER], **kw)
    as_developer = client.chat.completions.create(messages=[{"role": "developer", "content": "be brief"}, *USER],
                                                  **kw)
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens


@pytest.mark.parametrize("route, body", [("/chat/completions", {"messages": USER}), ("/completions", {"prompt": "hi"})])
def test_streams_are_not_buffered_by_a_proxy(server, route, body):
    """Both streaming routes ask a reverse proxy not to buffer (nginx holds an SSE stream back without this
    header; chat sent it, completions did not)."""
    with httpx.stream("POST", server.openai_base + route, timeout=30,
                      json={"model": "glm-4-tiny", "max_tokens": 2, "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accel-buffering"] == "no" and r.headers["cache-control"] == "no-cache"
        assert list(r.iter_lines())[-2:] == ["data: [DONE]", ""]


def test_completions_hold_their_text_to_response_format(client, server):
    # Clients written for vLLM send response_format to /v1/completions too. It was ignored as an unknown field
    # (free text with a 200), then refused; now the completion's text is the JSON, as with guided_json.
    kw = dict(model="glm-4-tiny", prompt="hi", max_tokens=120, temperature=1.0, seed=6)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.completions.create(**kw, extra_body={"response_format": {"type": "json_schema",
                                                                        "json_schema": {"schema": schema}}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    with pytest.raises(openai.BadRequestError) as e:  # two spellings of one thing: which one wins is not guessed
        client.completions.create(**kw, extra_body={"response_format": {"type": "json_object"},
                                                    "guided_regex": "[a-z]+"})
    assert e.value.response.json()["error"]["code"] == "1215"
    for fmt in (None, {"type": "text"}):
        r = client.completions.create(model="glm-4-tiny", prompt="hi", max_tokens=2, extra_body={"response_format": fmt})
        assert r.choices[0].finish_reason == "length"
    wait_idle(server.engine)


def test_stop_strings_do_not_cut_a_strict_call_but_still_stop_content(client, server):
    # Under tool_choice auto with strict tools the request keeps its stop strings (an answer may be content), but
    # once the model starts a call the grammar alone ends it: a stop string inside the arguments ('"' is in every
    # one) used to cut the call into arguments that do not parse.
    get = server.app.state.ctx.tokenizer.encode("get", allow_special=False)[0]
    tools = [_strict(WEATHER), _strict(TIME)]
    kw = dict(model="glm-4-tiny", messages=[{"role": "user", "content": "weather?"}], temperature=0, max_tokens=100,
              tools=tools)
    r = client.chat.completions.create(**kw, logit_bias={str(get): 30}, stop=['"', "city"])
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments),
                        {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"])
    # content: the same request unbiased answers in text, and a stop string from that text still cuts it
    free = client.chat.completions.create(**kw).choices[0]
    assert free.message.tool_calls is None and len(free.message.content) > 4
    cut = client.chat.completions.create(**kw, stop=[free.message.content[2:4]]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == free.message.content[:2]


def test_json_mode_beside_tools_still_lets_the_model_call(client, server):
    # tool_choice auto beside response_format JSON (agent frameworks send both: tools, and the typed final answer
    # they parse): the model may call a function, held to its strict schema, or answer with JSON under the format's
    # schema. The tools used to be dropped from the grammar and the parser, so no call could ever come back.
    get = server.app.state.ctx.tokenizer.encode("get", allow_special=False)[0]
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
              "required": ["name", "ok"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    kw = dict(model="glm-4-tiny", messages=[{"role": "user", "content": "weather?"}], temperature=0, max_tokens=200,
              tools=[_strict(WEATHER), _strict(TIME)], response_format=fmt)
    r = client.chat.completions.create(**kw, logit_bias={str(get): 30}).choices[0]
    (call,) = r.message.tool_calls
    assert r.finish_reason == "tool_calls" and r.message.content is None
    jsonschema.validate(json.loads(call.function.arguments),
                        {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"])
    # every token that could start a call (a prefix of a name and its newline) banned: the model answers, in JSON
    tok = server.app.state.ctx.tokenizer
    starts = {str(t) for t in range(tok.vocab_size) if t not in tok.special_ids.values()
              and (b := tok.id_to_token_bytes(t)) and any(n.startswith(b) for n in (b"get_weather\n", b"get_time\n"))}
    free = client.chat.completions.create(**kw, logit_bias=dict.fromkeys(starts, -100)).choices[0]
    assert free.message.tool_calls is None and free.finish_reason == "stop"
    jsonschema.validate(json.loads(free.message.content), schema)
    # tool_choice none beside JSON mode: JSON only, as before
    none = client.chat.completions.create(**kw, tool_choice="none", logit_bias={str(get): 30}).choices[0]
    assert none.message.tool_calls is None and isinstance(json.loads(none.message.content), dict)
    wait_idle(server.engine)
