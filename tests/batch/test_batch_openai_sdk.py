"""OpenAI's Batch API through the `openai` SDK against /v1/files and /v1/batches: a file of OpenAI-format lines
runs to completion with the /v1 chat endpoint's answers; listing pages to the end; cancel; errors in OpenAI's
shape; the same store as the vendor's routes."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest

from .conftest import MODEL, read_jsonl, wait_batch


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0)


def _line(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 5, **body}}


def _jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()


def test_openai_batch_roundtrip(client, server):
    lines = [_line(f"q{i}", f"question {i}", temperature=0) for i in range(5)]
    lines.append(_line("sampled", "tell me", temperature=1.6, seed=3, logprobs=True, top_logprobs=2))
    lines.append(_line("refused", "x", temperature=7))
    f = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(_jsonl(lines))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"run": "sdk"})
    assert b.endpoint == "/v1/chat/completions" and b.metadata == {"run": "sdk"}
    wait_batch(server.url + "/v1/", b.id)
    b = client.batches.retrieve(b.id)
    assert b.status == "completed" and (b.request_counts.completed, b.request_counts.failed) == (6, 1)
    out = {o["custom_id"]: o for o in read_jsonl(client.files.content(b.output_file_id).text)}
    assert set(out) == {f"q{i}" for i in range(5)} | {"sampled"}
    for cid, o in out.items():
        body = next(x["body"] for x in lines if x["custom_id"] == cid)
        want = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
        got = o["response"]["body"]
        assert got["object"] == "chat.completion" and got["choices"][0]["message"] == want["choices"][0]["message"]
    assert len(out["sampled"]["response"]["body"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    (err,) = read_jsonl(client.files.content(b.error_file_id).text)
    assert err["custom_id"] == "refused" and err["response"]["body"]["error"]["param"] == "temperature"
    # one store: the vendor's route sees the same batch
    assert httpx.get(server.vendor_base + f"batches/{b.id}", timeout=10).json()["status"] == "completed"


def test_listing_pages_to_the_end_and_cancel(client):
    f = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl([_line("a", "hi")]))), purpose="batch")
    made = [client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            for _ in range(3)]
    ids = [x.id for x in client.batches.list(limit=2)]  # the SDK's iterator follows `after` until a page is empty
    assert {m.id for m in made} <= set(ids) and len(ids) == len(set(ids))
    cancelled = client.batches.cancel(made[-1].id)
    assert cancelled.status in ("cancelling", "cancelled", "completed")
    assert f.id in {x.id for x in client.files.list()}
    assert client.files.delete(f.id).deleted


def test_errors_are_openais(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.batches.retrieve("batch_nope")
    err = e.value.response.json()["error"]
    assert err["type"] and err["param"] == "id" and "batch_nope" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert e.value.response.json()["error"]["param"] == "input_file_id"
