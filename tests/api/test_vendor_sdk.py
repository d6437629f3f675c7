"""The vendor's own SDK (`zai-sdk`'s ZhipuAiClient) against a real server: sync and stream answers equal to
the engine's greedy output, exact usage, tool calls (named, required, streamed), JSON mode, async tasks."""

from __future__ import annotations

import json
import random
import time

import jsonschema
import pytest
from zai import ZhipuAiClient

from glm_serve.chat import encode_chat
from glm_serve.model.simple import generate_simple

from .conftest import engine_answer, wait_idle

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}},
                   "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(server):
    return ZhipuAiClient(api_key="anyid.anysecret", base_url=server.vendor_base, max_retries=0)


def _conversations(seed: int, k: int):
    rng = random.Random(seed)
    words = ["你好", "weather", "北京", "tell me", "a story", "数学", "please", "GLM", "？", "why"]
    convs = []
    for _ in range(k):
        msgs = [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randrange(1, 8)))}]
        if rng.random() < 0.5:
            msgs = [{"role": "system", "content": "Be brief."}, *msgs]
        convs.append(msgs)
    return convs


def test_sync_greedy_equals_engine_and_usage_is_exact(client, server):
    for msgs in _conversations(seed=11, k=3):
        r = client.chat.completions.create(model="glm-4-plus", messages=msgs, do_sample=False, max_tokens=20)
        text, token_ids, prompt_ids = engine_answer(server.engine, msgs, 20)
        # independent reference: the model's plain loop, no scheduler, no paged cache
        core = server.engine.engine
        assert token_ids == generate_simple(core.model, prompt_ids, 20, set(core.stop_ids))
        assert r.choices[0].message.content == text.removeprefix("\n")
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.model == "glm-4-plus"
        assert r.usage.prompt_tokens == len(prompt_ids)
        assert r.usage.completion_tokens == len(token_ids)
        assert r.usage.total_tokens == len(prompt_ids) + len(token_ids)


def test_sdk_temperature_zero_is_greedy(client):
    msgs = [{"role": "user", "content": "count"}]
    # the SDK rewrites temperature 0 into do_sample=false, temperature 0.01
    a = client.chat.completions.create(model="glm-4-flash", messages=msgs, temperature=0, max_tokens=12)
    b = client.chat.completions.create(model="glm-4-flash", messages=msgs, do_sample=False, max_tokens=12)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stream_concatenates_to_the_answer(client, server):
    msgs = [{"role": "user", "content": "写一首诗"}]
    full = client.chat.completions.create(model="glm-4-plus", messages=msgs, do_sample=False, max_tokens=30)
    chunks = list(client.chat.completions.create(model="glm-4-plus", messages=msgs, do_sample=False,
                                                 max_tokens=30, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    wait_idle(server.engine)


def test_named_tool_call_parses_and_validates(client, server):
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = client.chat.completions.create(model="glm-4-plus", messages=msgs, tools=[WEATHER, TIME], do_sample=False,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=120)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # streamed: tool-call deltas only, never the raw `name\n{...}` as content, and the same call
    chunks = list(client.chat.completions.create(
        model="glm-4-plus", messages=msgs, tools=[WEATHER, TIME], do_sample=False, max_tokens=120, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert all(not c.choices[0].delta.content for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in calls) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and chunks[-1].usage is not None


def test_required_tool_call_and_tool_history(client):
    msgs = [{"role": "user", "content": "time?"}]
    r = client.chat.completions.create(model="glm-4-plus", messages=msgs, tools=[WEATHER, TIME],
                                       tool_choice="required", temperature=0.9, seed=3, max_tokens=120)
    (call,) = r.choices[0].message.tool_calls
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    # the call and its result go back as history; tool_choice none keeps the next answer content
    history = [*msgs, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"ok": true}'}]
    r2 = client.chat.completions.create(model="glm-4-plus", messages=history, tools=[WEATHER, TIME],
                                        tool_choice="none", do_sample=False, max_tokens=10)
    assert r2.choices[0].message.tool_calls is None and isinstance(r2.choices[0].message.content, str)


def test_json_object_mode_content_parses(client):
    # A random model rarely closes an unbounded JSON string, so sample 8 choices and check every one that
    # finished; the seeds are fixed, so the run is deterministic (and some choice does finish).
    r = client.chat.completions.create(model="glm-4-plus", messages=[{"role": "user", "content": "json"}],
                                       response_format={"type": "json_object"}, temperature=0.99, top_p=0.99,
                                       seed=1, max_tokens=300, extra_body={"n": 8})
    finished = [c for c in r.choices if c.finish_reason == "stop"]
    assert len(r.choices) == 8 and finished
    for c in finished:
        assert isinstance(json.loads(c.message.content), dict)


def test_async_task_result_equals_sync(client):
    msgs = [{"role": "user", "content": "async please"}]
    sync = client.chat.completions.create(model="glm-4-plus", messages=msgs, do_sample=False, max_tokens=16)
    task = client.chat.asyncCompletions.create(model="glm-4-plus", messages=msgs, do_sample=False, max_tokens=16,
                                               request_id="my-async-1")
    assert task.task_status == "PROCESSING" and task.request_id == "my-async-1"
    deadline = time.monotonic() + 30
    while True:
        res = client.chat.asyncCompletions.retrieve_completion_result(id=task.id)
        if res.task_status != "PROCESSING" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert res.task_status == "SUCCESS"
    assert res.choices[0].message.content == sync.choices[0].message.content
    assert res.usage.completion_tokens == sync.usage.completion_tokens


def test_context_window_finish_reason(client, server):
    core = server.engine.engine
    tok, limit = core.tokenizer, core.max_model_len
    k = limit
    while True:  # the longest "x x x ..." prompt that leaves room for exactly one generated token
        msgs = [{"role": "user", "content": "x " * k}]
        n = len(encode_chat(tok, msgs, chat_template=tok.chat_template))
        if n == limit - 1:
            break
        k -= 1 if n > limit - 1 else -1
    r = client.chat.completions.create(model="glm-4-plus", messages=msgs, do_sample=False)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (limit - 1, 1)
    assert r.choices[0].finish_reason == "model_context_window_exceeded"


def test_stream_n_choices_usage_on_last_chunk(client):
    msgs = [{"role": "user", "content": "两个答案"}]
    full = client.chat.completions.create(model="glm-4-plus", messages=msgs, do_sample=False, max_tokens=10)
    chunks = list(client.chat.completions.create(model="glm-4-plus", messages=msgs, do_sample=False, max_tokens=10,
                                                 stream=True, extra_body={"n": 2}))
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert texts == {0: full.choices[0].message.content, 1: full.choices[0].message.content}
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage.completion_tokens == 2 * full.usage.completion_tokens
    assert sum(c.choices[0].finish_reason is not None for c in chunks) == 2


class _Scripted:
    """A constraint that allows exactly the next token of a script each step and ends the answer after the last:
    makes the random model say a chosen text."""

    def __init__(self, ids: list[int]):
        self.ids, self.i = ids, 0

    def fill_bitmask(self, bitmask, row):  # bitmask: int32 [N, ceil(V/32)], bit j of word w allows token 32w+j
        bitmask[row] = 0
        word, bit = divmod(self.ids[self.i], 32)
        bitmask[row, word] = (1 << bit) - (1 << 32 if bit == 31 else 0)  # bit 31 is int32's sign bit

    def accept(self, token_id):
        assert token_id == self.ids[self.i]
        self.i += 1

    def is_terminated(self):
        return self.i == len(self.ids)


def test_stream_text_with_unicode_line_separators(client, server, monkeypatch):
    # JSON leaves U+2028, U+2029 and U+0085 raw, and the SDK reads a stream with httpx's iter_lines, which splits
    # lines where str.splitlines does: at these too. A chunk holding one must still reach the SDK whole.
    text = "a\u2028b\u2029c\x85d 你好"
    ids = server.engine.engine.tokenizer.encode(text)

    class Factory:
        def json_object(self):
            return _Scripted(ids)

    monkeypatch.setattr(server.app.state.ctx, "constraint_factory", Factory)
    chunks = list(client.chat.completions.create(model="glm-4-plus", messages=[{"role": "user", "content": "hi"}],
                                                 response_format={"type": "json_object"}, stream=True,
                                                 max_tokens=len(ids) + 5))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streamed_tool_call_is_whole_unless_tool_stream(client):
    # The vendor's cloud streams a tool call in one delta (with the finish reason) unless the request asks for
    # tool_stream; code written for it json.loads the first tool_calls delta it sees.
    kw = dict(model="glm-4-plus", messages=[{"role": "user", "content": "Paris?"}], tools=[WEATHER, TIME],
              tool_choice={"type": "function", "function": {"name": "get_weather"}}, do_sample=False,
              max_tokens=120, stream=True)
    whole = list(client.chat.completions.create(**kw))
    with_calls = [c for c in whole if c.choices[0].delta.tool_calls]
    assert len(with_calls) == 1 and with_calls[0] is whole[-1]
    (call,) = whole[-1].choices[0].delta.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert whole[-1].choices[0].finish_reason == "tool_calls" and whole[-1].usage is not None
    assert all(not c.choices[0].delta.content for c in whole)
    # tool_stream: the arguments come as they are generated, and add up to the same call
    pieces = list(client.chat.completions.create(**kw, tool_stream=True))
    calls = [tc for c in pieces for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) > 1 and calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in calls) == call.function.arguments
    json.loads(call.function.arguments)
