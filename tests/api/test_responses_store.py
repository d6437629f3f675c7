"""Stored responses through the `openai` SDK: previous_response_id continues the stored conversation (the model
sees exactly the prompt of the whole conversation sent at once), retrieve returns what create returned,
input_items lists the items, delete removes, `store: false` keeps nothing, another key sees nothing, and a stored
response outlives a restart on its data dir (and not its 30 days)."""

from __future__ import annotations

import sqlite3

import httpx
import openai
import pytest
from openai.types.responses import ResponseItemList

from glm_serve.api import ServerSettings, common
from glm_serve.api.params import prepare_chat
from glm_serve.api.response_store import TTL_S, ResponseStore, StoredResponse

from .conftest import ALIASES, KEY_A, KEY_B, start_server, wait_idle
from .test_http import _FailingFactory
from .test_responses_api import TOOLS

M = "glm-4-tiny"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key="unused", base_url=server.openai_base, max_retries=0)


@pytest.fixture
def prompts(monkeypatch) -> list[list[int]]:
    """The prompt ids of each request, as the chat path prepared them."""
    seen: list[list[int]] = []

    def spy(*args):
        prep = prepare_chat(*args)
        seen.append(prep.prompt_ids)
        return prep

    monkeypatch.setattr(common, "prepare_chat", spy)
    return seen


def _as_input(output) -> list[dict]:
    """A response's output items sent back as input items (OpenAI's way of carrying a conversation by hand)."""
    return [item.model_dump(exclude_none=True) for item in output]


def test_a_chain_is_the_whole_conversation_sent_at_once(client, prompts):
    greedy = dict(model=M, temperature=0, max_output_tokens=8)
    r1 = client.responses.create(**greedy, instructions="be brief", input="tell me about GLM")
    assert r1.store is True and r1.previous_response_id is None
    # The second turn streamed: stored once complete, before its last event, so a follow-up sent at once finds it.
    events = list(client.responses.create(**greedy, previous_response_id=r1.id, instructions="answer in English",
                                          input=[{"role": "user", "content": "and its size?"}], stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    r2 = events[-1].response
    assert r2.previous_response_id == r1.id and r2.store is True and r2.instructions == "answer in English"
    r3 = client.responses.create(**greedy, previous_response_id=r2.id, input="thanks")
    # The same conversation sent whole: r1's instructions are not carried over (they applied to r1 only), r3 has none
    whole2 = client.responses.create(**greedy, instructions="answer in English", input=[
        {"role": "user", "content": "tell me about GLM"}, *_as_input(r1.output),
        {"role": "user", "content": "and its size?"}])
    whole3 = client.responses.create(**greedy, input=[
        {"role": "user", "content": "tell me about GLM"}, *_as_input(r1.output),
        {"role": "user", "content": "and its size?"}, *_as_input(r2.output), {"role": "user", "content": "thanks"}])
    first, second, third, want2, want3 = prompts
    assert second == want2 and third == want3 and len(first) < len(second) < len(third)
    assert (r2.output_text, r2.usage.input_tokens) == (whole2.output_text, whole2.usage.input_tokens)
    assert (r3.output_text, r3.usage.input_tokens) == (whole3.output_text, whole3.usage.input_tokens)
    assert r3.usage.input_tokens == len(third)


def test_retrieve_input_items_and_delete(client, server):
    base = server.openai_base
    body = {"model": M, "instructions": "be brief", "max_output_tokens": 3, "metadata": {"k": "v"},
            "input": [{"role": "user", "content": "hello"},
                      {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
                      {"role": "user", "content": [{"type": "input_text", "text": "how are you?"}], "id": "msg_mine"}]}
    created = httpx.post(base + "/responses", json=body, timeout=60).json()
    rid = created["id"]
    assert httpx.get(f"{base}/responses/{rid}").json() == created  # the Response as returned, byte for byte
    assert client.responses.retrieve(rid).output_text == created["output"][0]["content"][0]["text"]
    items = list(client.responses.input_items.list(rid, order="asc"))
    assert [(i.type, i.role) for i in items] == [("message", "user"), ("message", "assistant"), ("message", "user")]
    assert items[0].content[0].type == "input_text" and items[0].content[0].text == "hello"  # a string is a part
    assert items[1].content[0].text == "hi" and items[2].id == "msg_mine"  # an id sent is kept
    assert len({i.id for i in items}) == 3 and all(i.status == "completed" for i in items)
    assert [i.id for i in client.responses.input_items.list(rid)] == [i.id for i in reversed(items)]  # desc default
    # The SDK's iterator pages with `after`: one item a page gives every item once
    assert [i.id for i in client.responses.input_items.list(rid, limit=1, order="asc")] == [i.id for i in items]
    # as sent, the page is OpenAI's list of items (the SDK's models, validated strictly)
    listed = ResponseItemList.model_validate(httpx.get(f"{base}/responses/{rid}/input_items?order=asc").json())
    assert [type(i).__name__ for i in listed.data] == ["ResponseInputMessageItem", "ResponseOutputMessage",
                                                       "ResponseInputMessageItem"]
    page = httpx.get(f"{base}/responses/{rid}/input_items", params={"limit": 2}).json()
    assert (page["object"], page["has_more"], page["first_id"], page["last_id"]) == (
        "list", True, items[2].id, items[1].id)
    # A chained response lists the conversation before its output: r1's items, r1's output, then its own input.
    r2 = client.responses.create(model=M, previous_response_id=rid, input="bye", max_output_tokens=2)
    chained = list(client.responses.input_items.list(r2.id, order="asc"))
    assert [i.id for i in chained[:4]] == [i.id for i in items] + [created["output"][0]["id"]]
    assert len(chained) == 5 and chained[4].content[0].text == "bye"
    # Delete: OpenAI's answer, then every route 404s, chaining included
    deleted = httpx.delete(f"{base}/responses/{rid}").json()
    assert deleted == {"id": rid, "object": "response.deleted", "deleted": True}
    for call in (lambda: client.responses.retrieve(rid), lambda: client.responses.delete(rid),
                 lambda: list(client.responses.input_items.list(rid))):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.response.json()["error"]["param"] == "response_id"
    with pytest.raises(openai.BadRequestError) as e:  # OpenAI's status for this one: 400, not 404
        client.responses.create(model=M, previous_response_id=rid, input="again", max_output_tokens=2)
    assert e.value.code == "previous_response_not_found"
    assert client.responses.retrieve(r2.id).id == r2.id  # the follow-up is its own record, still there


def test_store_false_keeps_nothing(client):
    r = client.responses.create(model=M, input="hi", max_output_tokens=2, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=M, previous_response_id=r.id, input="and?", max_output_tokens=2)
    err = e.value.response.json()["error"]
    assert err == {"message": f"Previous response with id '{r.id}' not found.", "type": "invalid_request_error",
                   "param": "previous_response_id", "code": "previous_response_not_found"}
    # a streamed one neither
    events = list(client.responses.create(model=M, input="hi", max_output_tokens=2, store=False, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(events[-1].response.id)


@pytest.mark.parametrize("method, path", [("GET", ""), ("DELETE", ""), ("GET", "/input_items"),
                                          ("POST", "/cancel")])
def test_unknown_ids_are_404s_in_openai_shape(server, method, path):
    for rid in ("resp_nope", "x" * 300, "%E6%95%B0"):
        r = httpx.request(method, f"{server.openai_base}/responses/{rid}{path}")
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == "response_id" and "not found" in err["message"]


def test_bad_queries_and_combinations_are_400s(client, server):
    rid = client.responses.create(model=M, input="hi", max_output_tokens=2).id
    base = f"{server.openai_base}/responses/{rid}"
    for params, param in (({"limit": 0}, "limit"), ({"limit": "x"}, "limit"), ({"limit": 101}, "limit"),
                          ({"limit": "²"}, "limit"), ({"limit": "①"}, "limit"),  # digits to isdigit, not to int
                          ({"order": "up"}, "order"), ({"after": "msg_unknown"}, "after")):
        r = httpx.get(base + "/input_items", params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(base + "/cancel")  # a stored response is not a background one
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_id"
    with pytest.raises(openai.BadRequestError) as e:  # conversations are not served, previous_response_id or not
        client.responses.create(model=M, input="x", previous_response_id=rid, extra_body={"conversation": "conv_1"})
    assert e.value.response.json()["error"]["param"] == "conversation"


def test_a_failed_stream_is_stored_failed(client, server, monkeypatch):
    """As OpenAI keeps a failed response: retrievable with its status and error; a follow-up continues from its
    input (its partial output is not carried on). A non-streamed failure (a 500) has no Response to keep."""
    monkeypatch.setattr(server.app.state.ctx, "constraint_factory", lambda: _FailingFactory())
    kw = dict(model=M, input="hi", max_output_tokens=20, text={"format": {"type": "json_object"}})
    events = list(client.responses.create(**kw, stream=True))
    monkeypatch.undo()
    failed = events[-1].response
    assert events[-1].type == "response.failed" and failed.status == "failed"
    got = client.responses.retrieve(failed.id)
    assert got.status == "failed" and got.error.message == failed.error.message and got.output == failed.output
    follow = client.responses.create(model=M, previous_response_id=failed.id, input="again", max_output_tokens=2)
    items = list(client.responses.input_items.list(follow.id, order="asc"))
    assert [(i.type, i.role, i.content[0].text) for i in items] == [("message", "user", "hi"),
                                                                    ("message", "user", "again")]
    wait_idle(server.engine)


def test_a_function_call_output_continues_the_call(client, prompts):
    forced = dict(model=M, tools=TOOLS, temperature=0, max_output_tokens=60)
    r1 = client.responses.create(**forced, input="time?", tool_choice={"type": "function", "name": "get_time"})
    (call,) = r1.output
    assert call.type == "function_call"
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "12:00"}
    r2 = client.responses.create(**forced, previous_response_id=r1.id, input=[answer])
    whole = client.responses.create(**forced, input=[{"role": "user", "content": "time?"}, *_as_input(r1.output),
                                                     answer])
    assert prompts[1] == prompts[2] and r2.usage.input_tokens == whole.usage.input_tokens
    assert r2.output[0].model_dump(exclude={"id", "call_id"}) == whole.output[0].model_dump(exclude={"id", "call_id"})
    items = list(client.responses.input_items.list(r2.id, order="asc"))
    assert [i.type for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1].call_id == items[2].call_id == call.call_id


def test_truncation_auto_applies_to_the_chained_conversation(client, server):
    ctx = server.app.state.ctx
    # turns of different lengths: dropping the wrong ones would not give the same count by chance
    turns = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"turn {k}: " + "数据 中心 推理 " * (20 - k)}
             for k in range(15)]

    def prompt_len(messages):
        return len(httpx.post(server.url + "/tokenize", json={"model": M, "messages": messages}).json()["tokens"])

    first, second = turns[:7], turns[7:]
    assert prompt_len(first) < ctx.max_model_len
    r1 = client.responses.create(model=M, input=first, max_output_tokens=2)
    whole = first + [{"role": "assistant", "content": r1.output_text}] + second
    assert prompt_len(whole) > ctx.max_model_len
    with pytest.raises(openai.BadRequestError) as e:  # the whole chained conversation counts
        client.responses.create(model=M, previous_response_id=r1.id, input=second, max_output_tokens=2)
    assert e.value.code == "context_length_exceeded" and e.value.response.json()["error"]["param"] == "input"
    r2 = client.responses.create(model=M, previous_response_id=r1.id, input=second, max_output_tokens=2,
                                 truncation="auto")
    k = next(k for k in range(len(whole)) if prompt_len(whole[k:]) < ctx.max_model_len)  # the fewest to drop
    assert 0 < k < len(first) and r2.usage.input_tokens == prompt_len(whole[k:])
    # what is stored stays whole: truncation shortened this response's prompt only
    assert len(list(client.responses.input_items.list(r2.id, limit=100))) == len(whole)
    wait_idle(server.engine)


def test_a_response_is_its_keys_own(make_server):
    srv = make_server(api_keys=[KEY_A, KEY_B])
    a = openai.OpenAI(api_key=KEY_A, base_url=srv.openai_base, max_retries=0)
    b = openai.OpenAI(api_key=KEY_B, base_url=srv.openai_base, max_retries=0)
    r = a.responses.create(model=M, input="hi", max_output_tokens=2)
    for call in (lambda: b.responses.retrieve(r.id), lambda: b.responses.delete(r.id),
                 lambda: list(b.responses.input_items.list(r.id))):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as e:
        b.responses.create(model=M, input="x", max_output_tokens=2, previous_response_id=r.id)
    assert e.value.code == "previous_response_not_found"
    assert a.responses.retrieve(r.id).id == r.id  # b's delete did nothing
    assert a.responses.create(model=M, input="x", max_output_tokens=2, previous_response_id=r.id).id
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="nobody.secret", base_url=srv.openai_base, max_retries=0).responses.retrieve(r.id)


def _serve(engine, data):
    return start_server(engine, ServerSettings(served_model_names=ALIASES, data_dir=data))


def _stop(server, thread) -> None:
    server.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_stored_response_outlives_a_restart_but_not_its_30_days(engine, tmp_path):
    data = tmp_path / "data"
    srv, server, thread = _serve(engine, data)
    c = openai.OpenAI(api_key="unused", base_url=srv.openai_base, max_retries=0)
    r = c.responses.create(model=M, input="remember me", temperature=0, max_output_tokens=4)
    before = httpx.get(f"{srv.openai_base}/responses/{r.id}").json()
    _stop(server, thread)
    # A record written 31 days ago (as a past run of the store would have): purged when the server starts
    old = ResponseStore(data / "responses.sqlite3", clock=lambda: before["created_at"] - TTL_S - 86400)
    old.put(StoredResponse("resp_old", None, {**before, "id": "resp_old"}, None, [], []))
    old.close()
    srv, server, thread = _serve(engine, data)
    try:
        assert _stored_ids(data) == [r.id]  # purged as the server started (not only hidden)
        c = openai.OpenAI(api_key="unused", base_url=srv.openai_base, max_retries=0)
        assert httpx.get(f"{srv.openai_base}/responses/{r.id}").json() == before
        follow = c.responses.create(model=M, previous_response_id=r.id, input="and?", max_output_tokens=2)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve("resp_old")
    finally:
        _stop(server, thread)
    assert _stored_ids(data) == [r.id, follow.id]


def _stored_ids(data) -> list[str]:
    db = sqlite3.connect(data / "responses.sqlite3")  # (not a ResponseStore: opening one purges)
    try:
        return [row[0] for row in db.execute("SELECT id FROM responses ORDER BY created_at")]
    finally:
        db.close()


def test_the_store_expires_purges_and_hides(tmp_path):
    now = [1000.0]
    store = ResponseStore(tmp_path / "r.sqlite3", ttl_s=10, clock=lambda: now[0])
    rec = StoredResponse("resp_1", "a", {"id": "resp_1", "status": "completed", "output": [{"id": "msg_1"}]},
                         None, [{"id": "msg_0"}], [{"role": "user", "content": "x"}])
    store.put(rec)
    assert store.response("resp_1", "a") == rec.response and store.response("resp_1", None) == rec.response
    assert store.response("resp_1", "b") is None and not store.delete("resp_1", "b")
    assert store.continuation("resp_1", "a") == (rec.messages, [{"id": "msg_0"}, {"id": "msg_1"}])
    now[0] += 10  # its time is up: gone for every caller before any purge, then purged
    assert store.response("resp_1", "a") is None and store.purge() == 1
    failed = StoredResponse("resp_2", None, {"id": "resp_2", "status": "failed", "output": [{"id": "msg_2"}]},
                            None, [], [])
    store.put(failed)
    assert store.continuation("resp_2", "a") == ([], [])  # a failed response's partial output is not carried on
    store.close()
    store.put(rec)  # a stream that ends after shutdown closed the store: logged, not raised
    assert store.response("resp_1", None) is None


def test_a_reasoning_item_gets_a_listed_id_of_its_own(client, server):
    """A reasoning item sent back (another provider's output) is listed with an id like every item: its own when
    that is a fresh string, else a new one. Listed with the id it was sent with, a repeated one broke paging (the
    SDK's iterator, asking `after` it, went round forever) and one that is no string broke every follow-up (500)."""
    base = server.openai_base
    body = {"model": M, "max_output_tokens": 2, "input": [
        {"role": "user", "content": "a", "id": "msg_same"},
        {"type": "reasoning", "id": "msg_same", "summary": []},
        {"type": "reasoning", "id": {"not": "an id"}, "summary": []},
        {"type": "reasoning", "id": "rs_mine", "summary": []},
        {"role": "user", "content": "b"}]}
    created = httpx.post(base + "/responses", json=body, timeout=60)
    assert created.status_code == 200, created.text
    rid = created.json()["id"]
    items = httpx.get(f"{base}/responses/{rid}/input_items", params={"order": "asc"}).json()["data"]
    ids = [i["id"] for i in items]
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == len(ids) == 5, ids
    assert ids[0] == "msg_same" and ids[3] == "rs_mine" and [i["type"] for i in items][1:4] == ["reasoning"] * 3
    assert [i.id for i in client.responses.input_items.list(rid, limit=1, order="asc")] == ids  # pages end
    follow = client.responses.create(model=M, previous_response_id=rid, input="c", max_output_tokens=2)
    assert len(list(client.responses.input_items.list(follow.id, limit=100))) == 7
