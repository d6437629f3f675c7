"""The files and batches API through the vendor's own SDK (`zai-sdk`) against a real server: upload, create,
poll to completed, download output and errors; every custom_id exactly once; output lines equal to the chat
endpoint's answers for the same bodies; the SDK's list iterator terminates; a 1,000-line batch with 20
malformed lines."""

from __future__ import annotations

import json
import random

import httpx
import pytest
from zai import ZhipuAiClient
from zai.core import APIStatusError

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

WORDS = ["你好", "weather", "北京", "tell me", "a story", "数学", "please", "GLM", "？", "why", "batch"]


@pytest.fixture(scope="module")
def client(server):
    return ZhipuAiClient(api_key="anyid.anysecret", base_url=server.vendor_base, max_retries=0)


def _random_bodies(rng: random.Random, k: int) -> list[dict]:
    bodies = []
    for i in range(k):
        msgs = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randrange(1, 9)))}]
        if rng.random() < 0.4:
            msgs.insert(0, {"role": "system", "content": "Be brief."})
        body = chat_body("", max_tokens=rng.randrange(1, 12), model=rng.choice(["glm-4-plus", "glm-4-flash"]))
        body["messages"] = msgs
        if rng.random() < 0.3:
            body["request_id"] = f"req-{i}"
        if rng.random() < 0.3:  # the SDK's habit: temperature 0 becomes do_sample false + 0.01
            body.update(temperature=0.01, do_sample=False)
        bodies.append(body)
    return bodies


def _openai_body(rng: random.Random, body: dict) -> dict:
    """A vendor body as a client of OpenAI's Batch API writes it: greedy is temperature 0, and it may sample
    above the vendor's range (seeded), or name its length max_completion_tokens."""
    out = {k: v for k, v in body.items() if k not in ("do_sample", "request_id")}
    out.update(temperature=0)
    if rng.random() < 0.4:
        out.update(temperature=1.5, seed=rng.randrange(1000))  # a 400 under the vendor's schema
    if rng.random() < 0.4:
        out["max_completion_tokens"] = out.pop("max_tokens")
    return out


def _chat(server, body: dict, url: str = "/v4/chat/completions") -> dict:
    route = server.url + "/v1/chat/completions" if url.startswith("/v1/") else server.vendor_base + "chat/completions"
    r = httpx.post(route, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_sdk_batch_roundtrip_matches_the_chat_endpoint(client, server, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    urls = [rng.choice(["/v4/chat/completions", "/v1/chat/completions"]) for _ in range(12)]
    # Each line in the schema of the endpoint its url names (the vendor's, or OpenAI's Batch API format).
    bodies = [_openai_body(rng, b) if u.startswith("/v1/") else b for b, u in zip(_random_bodies(rng, 12), urls)]
    lines = [batch_line(f"req-{i}", b, url=u) for i, (b, u) in enumerate(zip(bodies, urls))]
    bad_at = sorted(rng.sample(range(len(lines) + 4), 4))  # where the four bad lines go
    bad = ["{not json", json.dumps({"method": "POST", "body": bodies[0]}),  # bad JSON, no custom_id
           batch_line("refused", chat_body("x", temperature=5.0, do_sample=True)),  # fails the chat endpoint's checks
           batch_line("refused-v1", {"model": "glm-4-plus", "messages": [{"role": "user", "content": "x"}],
                                     "temperature": 2.5}, url="/v1/chat/completions")]
    for pos, text in zip(bad_at, bad):
        lines.insert(pos, text)
    path = write_jsonl(tmp_path / "in.jsonl", lines)

    f = client.files.create(file=open(path, "rb"), purpose="batch")  # noqa: SIM115 (the SDK reads it)
    assert f.id and f.bytes == path.stat().st_size and f.purpose == "batch"
    b = client.batches.create(input_file_id=f.id, endpoint="/v4/chat/completions", completion_window="24h",
                              metadata={"job": "roundtrip"}, auto_delete_input_file=False)
    assert b.status == "validating" and b.metadata == {"job": "roundtrip"} and b.input_file_id == f.id
    wait_batch(server.vendor_base, b.id)
    b = client.batches.retrieve(b.id)
    assert b.status == "completed", f"seed {seed}"
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (16, 12, 4)
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.expires_at > b.created_at

    out = read_jsonl(client.files.content(b.output_file_id).content.decode())
    errs = read_jsonl(client.files.content(b.error_file_id).content.decode())
    # every custom_id exactly once, output in input order
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(12)]
    assert sorted((e["custom_id"] for e in errs), key=str) == sorted([None, None, "refused", "refused-v1"], key=str)
    assert [e["line"] for e in errs] == [p + 1 for p in bad_at]
    assert all(e["error"]["message"] for e in errs)
    refused = next(e for e in errs if e["custom_id"] == "refused")
    assert refused["response"]["status_code"] == 400 and refused["error"]["code"] == "1210"
    assert "temperature" in refused["error"]["message"]
    refused = next(e for e in errs if e["custom_id"] == "refused-v1")  # answered as /v1 answers: OpenAI's shape
    assert refused["response"]["status_code"] == 400 and refused["error"]["code"] == "1210"
    assert refused["response"]["body"]["error"]["param"] == "temperature"
    assert refused["response"]["body"]["error"]["type"] == "invalid_request_error"
    for o, body, url in zip(out, bodies, urls):
        assert o["error"] is None and o["response"]["status_code"] == 200
        got, want = o["response"]["body"], _chat(server, body, url)
        assert got["choices"] == want["choices"], f"seed {seed}, {o['custom_id']}"
        assert got.get("object") == ("chat.completion" if url.startswith("/v1/") else None)
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):  # cached_tokens: the prefix cache's
            assert got["usage"][key] == want["usage"][key]
        assert got["model"] == body["model"]
        if "request_id" in body:
            assert got["request_id"] == body["request_id"]

    # the input was kept (auto_delete_input_file=False); output files are listed with purpose batch_output
    files = client.files.list()
    ids = {x.id: x for x in files.data}
    assert f.id in ids and ids[b.output_file_id].purpose == "batch_output"
    assert client.files.delete(f.id).deleted
    with pytest.raises(APIStatusError) as e:
        client.files.content(f.id)
    assert e.value.status_code == 404


def test_sdk_list_iterator_terminates_and_pages_honour_after(client, server, tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", [batch_line("only", chat_body("hi", max_tokens=1))])
    fid = client.files.create(file=open(path, "rb"), purpose="batch").id  # noqa: SIM115
    made = [client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions",
                                  auto_delete_input_file=False, completion_window="24h").id for _ in range(5)]
    seen = [b.id for b in client.batches.list(limit=2)]  # the SDK follows `after` until a page is empty
    assert len(seen) == len(set(seen)) and set(made) <= set(seen)
    assert seen[:5] == made[::-1]  # newest first
    page = httpx.get(server.vendor_base + "batches", params={"limit": 2, "after": made[3]}).json()
    assert [x["id"] for x in page["data"]] == [made[2], made[1]] and page["has_more"]
    assert page["first_id"] == made[2] and page["last_id"] == made[1] and page["object"] == "list"
    for bid in made:
        wait_batch(server.vendor_base, bid)
    files = httpx.get(server.vendor_base + "files", params={"limit": 1, "order": "asc"}).json()
    nxt = httpx.get(server.vendor_base + "files", params={"limit": 1, "order": "asc",
                                                           "after": files["data"][0]["id"]}).json()
    assert files["has_more"] and nxt["data"][0]["id"] != files["data"][0]["id"]


def test_auto_delete_input_file(client, server, tmp_path):
    path = write_jsonl(tmp_path / "auto.jsonl", [batch_line("a", chat_body("hi", max_tokens=1))])
    fid = client.files.create(file=open(path, "rb"), purpose="batch").id  # noqa: SIM115
    b = client.batches.create(input_file_id=fid, endpoint="/v4/chat/completions", completion_window="24h")
    assert wait_batch(server.vendor_base, b.id)["status"] == "completed"
    assert httpx.get(f"{server.vendor_base}files/{fid}/content").status_code == 404  # the SDK's default: True
    assert read_jsonl(content(server.vendor_base, client.batches.retrieve(b.id).output_file_id))[0]["custom_id"] \
        == "a"


def test_thousand_lines_with_twenty_malformed(server, tmp_path):
    rng = random.Random(random.randrange(1 << 30))
    lines = [batch_line(f"id-{i}", chat_body(f"q {rng.choice(WORDS)} {i}", max_tokens=1)) for i in range(980)]
    good = chat_body("ok", max_tokens=1)
    malformed = [
        "{", "[1, 2]", '"just a string"', "\xff\xfe not utf8?",
        json.dumps({"method": "POST", "url": "/v4/chat/completions", "body": good}),  # no custom_id
        json.dumps({"custom_id": 7, "body": good}),  # custom_id not a string
        batch_line("id-3", good),  # duplicate custom_id
        json.dumps({"custom_id": "m-get", "method": "GET", "url": "/v4/chat/completions", "body": good}),
        batch_line("m-url", good, url="/v4/embeddings"),
        json.dumps({"custom_id": "m-nobody", "method": "POST", "url": "/v4/chat/completions"}),
        json.dumps({"custom_id": "m-bodylist", "body": [good]}),
        batch_line("m-model", chat_body("x", model="no-such-model")),
        batch_line("m-temp", chat_body("x", temperature=3, do_sample=True)),
        batch_line("m-topp", chat_body("x", top_p=0, do_sample=True)),
        batch_line("m-maxtok", chat_body("x", max_tokens=0)),
        batch_line("m-nomsg", {"model": "glm-4-plus", "messages": []}),
        batch_line("m-role", {"model": "glm-4-plus", "messages": [{"role": "robot", "content": "x"}]}),
        batch_line("m-type", {"model": "glm-4-plus", "messages": "hello"}),
        batch_line("m-tool", chat_body("x", tools=[{"type": "web_search", "web_search": {}}])),
        batch_line("m-long", chat_body("很长 " * 3000)),  # over the 2048-token context window
    ]
    assert len(malformed) == 20
    positions = sorted(rng.sample(range(1000), 20))
    for pos, text in zip(positions, malformed):
        lines.insert(pos, text)
    raw = "".join(line + "\n" for line in lines).encode("utf-8").replace("\xff\xfe".encode(), b"\xff\xfe")
    path = tmp_path / "big.jsonl"
    path.write_bytes(raw)
    b = create(server.vendor_base, upload(server.vendor_base, path))
    done = wait_batch(server.vendor_base, b["id"], timeout=240)
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 1000, "completed": 980, "failed": 20}
    out = read_jsonl(content(server.vendor_base, done["output_file_id"]))
    errs = read_jsonl(content(server.vendor_base, done["error_file_id"]))
    assert [o["custom_id"] for o in out] == [f"id-{i}" for i in range(980)]
    assert [e["line"] for e in errs] == [p + 1 for p in positions]
    assert all(e["error"]["code"] and len(e["error"]["message"]) > 5 for e in errs)
    reasons = {e["custom_id"]: e["error"]["message"] for e in errs if e["custom_id"]}
    assert "duplicate of line" in reasons["id-3"] and "method" in reasons["m-get"] and "url" in reasons["m-url"]
    assert "no-such-model" in reasons["m-model"] and "context window" in reasons["m-long"]
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 1 for o in out)
