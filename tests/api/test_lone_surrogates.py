"""A lone UTF-16 surrogate (U+D800-U+DFFF) is valid JSON syntax but not text: json.loads lets it through, and
the tokenizer, the JSON response encoder and SQLite then fail on it. Every route answers it with a 400 (1210) in
its own error format, never a 500, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import wait_idle

BAD = "x\ud800y"  # a string holding a lone high surrogate: json.dumps writes it as the escape \ud800


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: the surrogate goes out as a \u escape


def _chat(content=None, **kw) -> bytes:
    return _json({"model": "glm-4-tiny", "messages": [{"role": "user", "content": content or "hi"}],
                  "max_tokens": 2, **kw})


@pytest.mark.parametrize("path, body, param", [
    ("/api/paas/v4/chat/completions", _chat(BAD), "messages[0].content"),
    ("/api/paas/v4/chat/completions", _chat(stop=[BAD], stream=True), "stop[0]"),
    ("/api/paas/v4/chat/completions", _chat(request_id=BAD), "request_id"),
    ("/api/paas/v4/async/chat/completions", _chat(BAD), "messages[0].content"),
    ("/api/paas/v4/tokenizer", _json({"model": "glm-4-tiny", "messages": [{"role": "user", "content": BAD}]}),
     "messages[0].content"),
    ("/api/paas/v4/chat/completions", _chat("SURROGATE").replace(b"SURROGATE", b"x\xed\xa0\x80y"),
     "messages[0].content"),  # the surrogate as raw (CESU-8) bytes
    ("/v1/chat/completions", _chat(BAD), "messages[0].content"),
    ("/v1/completions", _json({"model": "glm-4-tiny", "prompt": BAD, "max_tokens": 2}), "prompt"),
    ("/api/paas/v4/batches", _json({"input_file_id": BAD, "endpoint": "/v4/chat/completions"}), "input_file_id"),
])
def test_lone_surrogates_are_a_400_not_a_500(server, path, body, param):
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "1210" and param in err["message"], err
    if path.startswith("/v1/"):
        assert err["param"] == param and err["type"] == "invalid_request_error"
    ok = httpx.post(server.url + "/api/paas/v4/chat/completions", content=_chat(),
                    headers={"content-type": "application/json"}, timeout=30)
    assert ok.status_code == 200, ok.text
    wait_idle(server.engine)


def test_paired_surrogate_escapes_are_text(server):
    """An emoji written as an escaped surrogate pair (json.dumps' default) is ordinary text."""
    r = httpx.post(server.url + "/api/paas/v4/chat/completions", content=_chat("\U0001f600 \u4f60"),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text


def test_lone_surrogate_finder():
    from glm_serve.api.common import lone_surrogate  # noqa: PLC0415

    assert lone_surrogate(b'{"a": "b"}', {"a": "b"}) is None
    assert lone_surrogate(b'\\ud83d\\ude00', {"a": ["\U0001f600"]}) is None
    assert lone_surrogate(b'\\ud800', {"a": [1, {"b": "\ud800"}]}) == "a[1].b"
    assert lone_surrogate(b'\\udc00', {"k\udc00": 1}) == "body"
