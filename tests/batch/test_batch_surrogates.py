"""Batch lines holding a lone UTF-16 surrogate (valid JSON syntax, not text) become 1210 error lines, and a batch
whose validation keeps raising fails after a few tries: before, either kind of input kept its batch in
`validating` for good, re-validated at once in a loop that logged a traceback each time."""

from __future__ import annotations

import json

from glm_serve.batch import worker as worker_mod

from .conftest import (
    batch_line,
    chat_body,
    content,
    create,
    read_jsonl,
    upload,
    wait_batch,
    write_jsonl,
)


def _line(custom_id: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v4/chat/completions", "body": body})


def test_lone_surrogate_lines_are_error_lines(server, tmp_path):
    base = server.vendor_base
    lines = [batch_line("ok", chat_body("hi", max_tokens=2)),
             _line("id\ud800", chat_body("hi", max_tokens=2)),  # json.dumps writes the \ud800 escape
             _line("content", chat_body("x\udc00", max_tokens=2)),
             _line("request_id", chat_body("hi", max_tokens=2, request_id="\ud800"))]
    fid = upload(base, write_jsonl(tmp_path / "in.jsonl", lines))
    b = wait_batch(base, create(base, fid)["id"], timeout=60)
    assert b["status"] == "completed", b
    assert b["request_counts"] == {"total": 4, "completed": 1, "failed": 3}
    assert [x["custom_id"] for x in read_jsonl(content(base, b["output_file_id"]))] == ["ok"]
    errors = read_jsonl(content(base, b["error_file_id"]))
    assert [(e["custom_id"], e["line"], e["error"]["code"]) for e in errors] == [
        (None, 2, "1210"), ("content", 3, "1210"), ("request_id", 4, "1210")]
    assert "surrogate" in errors[1]["error"]["message"]


def test_a_validation_that_keeps_raising_fails_the_batch(server, tmp_path, monkeypatch):
    calls = []

    def broken(ctx, data):
        calls.append(1)
        raise RuntimeError("a bug")

    monkeypatch.setattr(worker_mod, "check_input", broken)
    base = server.vendor_base
    fid = upload(base, write_jsonl(tmp_path / "in.jsonl", [batch_line("a", chat_body("hi", max_tokens=1))]))
    b = wait_batch(base, create(base, fid)["id"], timeout=30)
    assert b["status"] == "failed" and b["errors"]["data"][0]["code"] == "500", b
    assert "RuntimeError" in b["errors"]["data"][0]["message"]
    assert len(calls) == worker_mod.MAX_VALIDATION_ATTEMPTS
