"""LLM.generate(guided=...): offline structured output, held by the same grammars as the server's guided
decoding; a conversation's answer as content, a text or token-id prompt's generated text itself."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams

pytest.importorskip("xgrammar")

CHOICES = ["positive", "negative", "not sure"]
SAMPLED = dict(temperature=1.0, max_tokens=80, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_hf):
    return LLM(str(tiny_hf), kv_cache_tokens=8192, max_batch_tokens=512)


def test_each_kind_over_each_prompt_form(llm):
    chat = [{"role": "user", "content": "classify: great"}]
    (r,) = llm.generate([chat], SamplingParams(n=3, seed=1, **SAMPLED), guided={"choice": CHOICES}, use_tqdm=False)
    assert all(c.content in CHOICES and c.text == "\n" + c.content and c.finish_reason == "stop" for c in r.choices)
    (r,) = llm.generate("Code:", SamplingParams(seed=2, **SAMPLED), guided={"regex": r"[A-Z]{2}-[0-9]{3}"},
                        use_tqdm=False)
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", r.text)
    schema = {"type": "object", "properties": {"tag": {"enum": ["a", "b"]}}, "required": ["tag"],
              "additionalProperties": False}
    results = llm.generate([[5, 6, 7], chat], SamplingParams(seed=3, **SAMPLED), guided={"json": schema},
                           use_tqdm=False)
    jsonschema.validate(json.loads(results[0].text), schema)
    jsonschema.validate(json.loads(results[1].choices[0].content), schema)
    assert all(r.choices[0].finish_reason == "stop" for r in results)


def test_bad_guided_is_a_value_error_and_leaves_the_engine_empty(llm):
    for bad in ({"grammar": "x"}, {"choice": []}, {"regex": ""}, {"json": {"type": "string", "not": {}}},
                {"regex": "a", "choice": ["a"]}):
        with pytest.raises(ValueError):
            llm.generate("hi", SamplingParams(max_tokens=2), guided=bad, use_tqdm=False)
        assert not llm.engine.requests
