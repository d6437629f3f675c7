"""vLLM's guided decoding on /v1 through the `openai` SDK's extra_body: guided_choice, guided_regex, guided_json
and structured_outputs, on chat (content) and legacy completions (bare text), sampled so that the model's own
preference (random weights) would otherwise wander off; and the 400s for what is not served or contradicts."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from .test_vendor_sdk import WEATHER


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key="unused", base_url=server.openai_base, max_retries=0)


USER = [{"role": "user", "content": "classify this"}]
CHOICES = ["positive", "negative", "not sure at all"]
REGEX = r"[0-9]{3}-[a-z]{2}(!|\?)"
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
          "required": ["label", "n"], "additionalProperties": False}


def _chat(client, n=4, **extra):
    r = client.chat.completions.create(model="glm-4-tiny", messages=USER, temperature=1.0, seed=3, n=n,
                                       max_tokens=60, extra_body=extra)
    assert all(c.finish_reason == "stop" for c in r.choices), [c.finish_reason for c in r.choices]
    return [c.message.content for c in r.choices]


def test_chat_choice_regex_and_json(client):
    answers = _chat(client, guided_choice=CHOICES)
    assert set(answers) <= set(CHOICES)
    assert all(re.fullmatch(REGEX, a) for a in _chat(client, guided_regex=REGEX))
    for spec in (SCHEMA, json.dumps(SCHEMA)):  # vLLM takes the schema as an object or as JSON text
        for a in _chat(client, n=2, guided_json=spec):
            jsonschema.validate(json.loads(a), SCHEMA)
    assert set(_chat(client, structured_outputs={"choice": CHOICES})) <= set(CHOICES)
    for a in _chat(client, n=2, structured_outputs={"json": SCHEMA, "disable_any_whitespace": True}):
        jsonschema.validate(json.loads(a), SCHEMA)


def test_reading_the_fields():
    """What each spelling asks for (json_object is any object: with random weights it rarely ends, so it is
    checked here rather than generated), and the options that only tune vLLM's backends are ignored."""
    from types import SimpleNamespace

    from glm_serve.api.guided import Guided, read_guided

    assert read_guided(SimpleNamespace(structured_outputs={"json_object": True, "disable_fallback": True})) == \
        Guided("json", {"type": "object"}, "structured_outputs.json_object")
    assert read_guided(SimpleNamespace(structured_outputs={"json_object": False})) is None
    assert read_guided(SimpleNamespace(guided_choice=["a", "b", "a"], guided_decoding_backend="xgrammar")) == \
        Guided("choice", ["a", "b"], "guided_choice")
    assert read_guided(SimpleNamespace(guided_json='{"type": "integer"}')) == \
        Guided("json", {"type": "integer"}, "guided_json")


def test_chat_guided_beside_tools_answers_as_content(client):
    """tool_choice auto with a guided choice: the answer is held to the choice, so it is content, never a call."""
    r = client.chat.completions.create(model="glm-4-tiny", messages=USER, temperature=1.0, seed=5, n=3,
                                       max_tokens=30, tools=[WEATHER], extra_body={"guided_choice": CHOICES})
    assert all(c.message.content in CHOICES and not c.message.tool_calls for c in r.choices)


def test_stream_equals_the_body(client):
    kw = dict(model="glm-4-tiny", messages=USER, temperature=1.0, seed=9, max_tokens=40,
              extra_body={"guided_regex": REGEX})
    body = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == body and re.fullmatch(REGEX, body)


def test_completions_hold_each_prompts_choices_to_it(client):
    """Bare text (no chat content separator); two prompts x n=3, each choice with its own matcher; streamed too."""
    r = client.completions.create(model="glm-4-tiny", prompt=["The answer is", "Label:"], temperature=1.0, seed=1,
                                  n=3, max_tokens=40, extra_body={"guided_choice": CHOICES})
    assert len(r.choices) == 6 and all(c.text in CHOICES and c.finish_reason == "stop" for c in r.choices)
    r = client.completions.create(model="glm-4-tiny", prompt="Code:", temperature=1.0, seed=2, max_tokens=40,
                                  extra_body={"guided_regex": REGEX}, stream=True)
    assert re.fullmatch(REGEX, "".join(c.choices[0].text for c in r if c.choices))
    label = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}, "required": ["label"],
             "additionalProperties": False}
    r = client.completions.create(model="glm-4-tiny", prompt="JSON:", temperature=1.0, seed=4, max_tokens=120,
                                  extra_body={"guided_json": label})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), label)


@pytest.mark.parametrize("extra, code, param", [
    ({"guided_grammar": "root ::= \"a\""}, "1214", "guided_grammar"),
    ({"structured_outputs": {"grammar": "root ::= \"a\""}}, "1214", "structured_outputs.grammar"),
    ({"guided_choice": CHOICES, "guided_regex": REGEX}, "1215", "guided_choice"),
    ({"guided_choice": []}, "1214", "guided_choice"),
    ({"guided_choice": ["a", ""]}, "1214", "guided_choice"),
    ({"guided_choice": "yes"}, "1214", "guided_choice"),
    ({"guided_regex": "(?=a)b"}, "1214", "guided_regex"),
    ({"guided_regex": "(unclosed"}, "1214", "guided_regex"),
    ({"guided_json": "{not json"}, "1214", "guided_json"),
    ({"guided_json": {"type": "string", "not": {"const": "x"}}}, "1214", "guided_json"),
    ({"guided_choice": CHOICES, "response_format": {"type": "json_object"}}, "1215", "guided_choice"),
    ({"guided_choice": CHOICES, "tools": [WEATHER], "tool_choice": "required"}, "1215", "guided_choice"),
])
def test_errors_name_the_field(client, extra, code, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="glm-4-tiny", messages=USER, max_tokens=5, extra_body=extra)
    err = e.value.response.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err


def test_completion_errors_and_the_vendor_route_ignores_the_fields(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="glm-4-tiny", prompt="x", max_tokens=5, extra_body={"guided_regex": "("})
    assert e.value.response.json()["error"]["param"] == "guided_regex"
    # The vendor's schema has no guided decoding: like any unknown field, ignored (free text, no error).
    r = httpx.post(server.vendor_base + "chat/completions", timeout=60, json={
        "model": "glm-4-tiny", "messages": USER, "max_tokens": 3, "do_sample": False, "guided_choice": CHOICES})
    assert r.status_code == 200, r.text
