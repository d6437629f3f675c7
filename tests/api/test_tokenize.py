"""vLLM's /tokenize and /detokenize: the ids are those the completion and chat endpoints give the model (their
usage counts agree), round trips, and errors in OpenAI's shape."""

from __future__ import annotations

import httpx
import pytest

from glm_serve.chat import encode_chat

USER = [{"role": "user", "content": "tell me about GLM 数学"}]


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_prompt_ids_and_count_are_the_completions(server):
    tok = server.engine.engine.tokenizer
    text = "The capital of France is [gMASK]<sop> 你好"
    r = _post(server, "/tokenize", {"model": "glm-4-tiny", "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens"] == tok.encode(text, allow_special=True) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] > 0 and len(out["token_strs"]) == out["count"]
    c = _post(server, "/v1/completions", {"model": "glm-4-tiny", "prompt": text, "max_tokens": 1})
    assert c.json()["usage"]["prompt_tokens"] == out["count"]
    back = _post(server, "/detokenize", {"model": "glm-4-tiny", "tokens": out["tokens"]})
    assert back.json() == {"prompt": text}


def test_messages_are_counted_as_chat_renders_them(server):
    tok = server.engine.engine.tokenizer
    out = _post(server, "/tokenize", {"messages": USER}).json()
    chat = _post(server, "/v1/chat/completions", {"model": "glm-4-tiny", "messages": USER, "max_tokens": 1}).json()
    vendor = httpx.post(server.vendor_base + "tokenizer", json={"model": "glm-4-tiny", "messages": USER}).json()
    assert out["count"] == chat["usage"]["prompt_tokens"] == vendor["usage"]["prompt_tokens"]
    start = USER + [{"role": "assistant", "content": "GLM is"}]
    cont = _post(server, "/tokenize", {"messages": start, "continue_final_message": True,
                                       "add_generation_prompt": False}).json()
    assert cont["tokens"] == encode_chat(tok, start, chat_template=tok.chat_template, continue_final=True)


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "a", "messages": USER}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"model": "nope", "prompt": "a"}, "model"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/detokenize", {"tokens": [1, 10 ** 9]}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
])
def test_errors_in_openai_shape(server, path, body, param):
    r = _post(server, path, body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and err["type"] and err["message"], err
