"""vLLM's chat extras on /v1 through the `openai` SDK: continue_final_message (the answer goes on from the given
start of it) and add_generation_prompt false; the text comes back as generated (no separator dropped, no tool
call parsed), streamed or not; the combinations that cannot hold are 400s."""

from __future__ import annotations

import asyncio
import re
import uuid

import httpx
import openai
import pytest

from glm_serve.chat import encode_chat
from glm_serve.sampling_params import SamplingParams

from .test_vendor_sdk import WEATHER


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key="unused", base_url=server.openai_base, max_retries=0)


USER = [{"role": "user", "content": "tell me about GLM"}]
START = {"role": "assistant", "content": "Sure, GLM is"}


def _engine_text(engine, ids: list[int], max_tokens: int) -> str:
    async def run():
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return [o async for o in engine.generate(uuid.uuid4().hex, ids, sp)]

    return "".join(c.text for out in asyncio.run(run()) for c in out.outputs)


@pytest.mark.parametrize("stream", [False, True])
def test_continue_final_message_answers_on_from_the_given_start(client, server, stream):
    tok = server.engine.engine.tokenizer
    ids = encode_chat(tok, USER + [START], chat_template=tok.chat_template, continue_final=True)
    assert tok.decode(ids).endswith("<|assistant|>\nSure, GLM is")
    want = _engine_text(server.engine, ids, 12)
    kw = dict(model="glm-4-tiny", messages=USER + [START], temperature=0, max_tokens=12,
              extra_body={"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True})
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert chunks[-1].usage.prompt_tokens == len(ids)
    else:
        r = client.chat.completions.create(**kw)
        assert r.choices[0].message.content == want and r.usage.prompt_tokens == len(ids)
        assert r.choices[0].finish_reason == "length"


def test_no_generation_prompt_and_tools_give_raw_text(client, server):
    """Without <|assistant|> the model's text opens no answer: content as generated, never a parsed tool call,
    whatever tool_choice says (auto, none)."""
    tok = server.engine.engine.tokenizer
    ids = encode_chat(tok, USER, tools=[WEATHER], chat_template=tok.chat_template, add_generation_prompt=False)
    want = _engine_text(server.engine, ids, 10)
    for tool_choice in ("auto", "none"):
        r = client.chat.completions.create(model="glm-4-tiny", messages=USER, tools=[WEATHER], tool_choice=tool_choice,
                                           temperature=0, max_tokens=10,
                                           extra_body={"add_generation_prompt": False, "ignore_eos": True})
        assert r.choices[0].message.content == want and not r.choices[0].message.tool_calls
        assert r.usage.prompt_tokens == len(ids)


def test_a_guided_continuation_holds_the_text_written_on(client):
    r = client.chat.completions.create(model="glm-4-tiny", messages=USER + [START], temperature=1.0, seed=2, n=3,
                                       max_tokens=30, extra_body={"continue_final_message": True,
                                                                  "add_generation_prompt": False,
                                                                  "guided_regex": r" [a-z]{2,8}\."})
    assert all(re.fullmatch(r" [a-z]{2,8}\.", c.message.content) for c in r.choices)


@pytest.mark.parametrize("messages, extra, code, param", [
    (USER + [START], {"continue_final_message": True, "add_generation_prompt": True}, "1215",
     "continue_final_message"),
    (USER, {"continue_final_message": True}, "1214", "messages[0]"),
    (USER + [START], {"continue_final_message": True, "response_format": {"type": "json_object"}}, "1215",
     "continue_final_message"),
    (USER, {"add_generation_prompt": False, "tools": [WEATHER], "tool_choice": "required"}, "1215",
     "add_generation_prompt"),
])
def test_errors(client, messages, extra, code, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="glm-4-tiny", messages=messages, max_tokens=3, extra_body=extra)
    err = e.value.response.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err


def test_the_vendor_schema_has_neither_field(server):
    """Unknown there, so ignored like any other: the prompt is the usual one (with <|assistant|>)."""
    body = {"model": "glm-4-tiny", "messages": USER, "max_tokens": 2, "do_sample": False}
    plain = httpx.post(server.vendor_base + "chat/completions", json=body, timeout=60).json()
    odd = httpx.post(server.vendor_base + "chat/completions", timeout=60,
                     json={**body, "add_generation_prompt": False, "continue_final_message": True}).json()
    assert odd["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert odd["choices"][0]["message"] == plain["choices"][0]["message"]
