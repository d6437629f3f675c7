"""The content filter (`serve --blocked-words FILE`): input holding a term gets 400 / 1301 in each schema's shape;
an answer (streamed or not, content or tool-call arguments) ends just before a term with finish_reason `sensitive`
(vendor) / `content_filter` (/v1), through the real SDKs; user stop strings still stop; other requests, and a
server without a list, are untouched; batch lines and async tasks alike; the word file's start-up errors."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from zai import ZhipuAiClient

from glm_serve.api.content_filter import read_blocked_words
from glm_serve.batch.runner import check_line, run_line
from glm_serve.chat import encode_chat
from glm_serve.cli import main
from glm_serve.engine.stop import fold

from .conftest import engine_answer, wait_idle
from .test_vendor_sdk import WEATHER

POEM = [{"role": "user", "content": "写一首诗"}]
OTHER = [{"role": "user", "content": "tell me about GLM"}]
FIXED = ["禁词", "BadWord"]  # terms the input tests send
MAX = 30


def _swap_ascii_case(text: str) -> str:
    return "".join(c.swapcase() if c.isascii() else c for c in text)


def _term_across_tokens(tokenizer, token_ids, cjk: bool | None, avoid: str = ""):
    """A piece of a greedy answer spanning a token boundary after its 8th token (a stream of some length comes
    first), first occurring there, with a CJK character or without (`cjk`; None: either), and not in `avoid` (the
    request's own text) -> (term, where it starts in the text)."""
    pieces = [tokenizer.decode([t]) for t in token_ids]
    text, at = "".join(pieces), 0
    for k in range(1, len(pieces)):
        at += len(pieces[k - 1])
        a, b = pieces[k - 1], pieces[k]
        term = a[-2:] + b[:2]
        if (k >= min(8, len(pieces) - 2) and len(a) >= 2 and len(b) >= 2 and "\ufffd" not in term
                and term.strip() == term
                and cjk in (None, any("\u4e00" <= c <= "\u9fff" for c in term)) and fold(term) not in fold(avoid)
                and fold(text).find(fold(term)) == at - 2):
            return term, at - 2
    raise AssertionError(f"no term spanning two tokens in {pieces!r}")


@pytest.fixture(scope="module")
def found(server):
    """The unfiltered greedy answer to POEM, and a term (with Chinese) it writes across two tokens."""
    text, ids, _ = engine_answer(server.engine, POEM, MAX)
    term, at = _term_across_tokens(server.engine.engine.tokenizer, ids, cjk=True,
                                   avoid=json.dumps(POEM, ensure_ascii=False))
    return text, term, at


@pytest.fixture(scope="module")
def filtered(make_server, found):
    _, term, _ = found
    # The generated term as the operator wrote it: its ASCII letters in the other case (they match either way)
    return make_server(blocked_words=[*FIXED, _swap_ascii_case(term)])


def _content(raw: str) -> str:
    return raw.removeprefix("\n")


# ---- input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "please say badword now"}],  # ASCII: either case
    [{"role": "system", "content": "你是禁词助手"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": [{"type": "text", "text": "x BADWORD y"}]}],
    [{"role": "user", "content": "hi"},
     {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
         "name": "get_weather", "arguments": '{"city": "禁词"}'}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
    [{"role": "user", "content": "hi"},
     {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
         "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": "a badword result"}],
])
def test_input_with_a_term_is_refused_in_each_schema(filtered, messages):
    body = {"model": "glm-4-plus", "messages": messages, "max_tokens": 4, "tools": [WEATHER]}
    r = httpx.post(filtered.vendor_base + "chat/completions", json={**body, "stream": True})
    assert r.status_code == 400 and r.headers["x-should-retry"] == "false"
    err = r.json()["error"]
    assert err["code"] == "1301" and err["message"].startswith("content blocked")
    assert not any(fold(t) in fold(err["message"]) for t in FIXED)  # the term is not read back
    with pytest.raises(openai.BadRequestError) as e:
        openai.OpenAI(api_key="x", base_url=filtered.openai_base, max_retries=0).chat.completions.create(**body)
    assert e.value.code == "content_filter" and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["param"] == "messages"


def test_input_checks_on_other_routes_and_what_passes(filtered, server):
    client = ZhipuAiClient(api_key="a.b", base_url=filtered.vendor_base, max_retries=0)
    msgs = [{"role": "user", "content": "禁词"}]
    # The vendor's DISABLE does not turn the operator's list off
    r = httpx.post(filtered.vendor_base + "chat/completions", json={
        "model": "glm-4-plus", "messages": msgs, "sensitive_word_check": {"type": "ALL", "status": "DISABLE"}})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "1301")
    r = httpx.post(filtered.vendor_base + "async/chat/completions", json={"model": "glm-4-plus", "messages": msgs})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "1301")
    # /v1/completions: a text prompt, and token ids that spell a term
    tok = filtered.app.state.ctx.tokenizer
    for prompt in ("say BadWord", tok.encode("say 禁词"), ["fine", "also 禁词"]):
        r = httpx.post(filtered.openai_base + "/completions", json={"model": "glm-4-plus", "prompt": prompt,
                                                                     "max_tokens": 2})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "content_filter"), prompt
    # A term split over two messages is in neither; a text without one passes; no list: nothing is refused
    split = [{"role": "user", "content": "禁"}, {"role": "assistant", "content": "词"},
             {"role": "user", "content": "x"}]
    assert client.chat.completions.create(model="glm-4-plus", messages=split, max_tokens=2).choices
    plain = ZhipuAiClient(api_key="a.b", base_url=server.vendor_base, max_retries=0)
    assert plain.chat.completions.create(model="glm-4-plus", messages=msgs, max_tokens=2).choices


# ---- output ----------------------------------------------------------------------------------------------------

def test_streams_end_before_the_term_through_both_sdks(filtered, found):
    raw, term, at = found
    want = _content(raw[:at])
    assert want and fold(term) not in fold(want)
    oa = openai.OpenAI(api_key="x", base_url=filtered.openai_base, max_retries=0)
    body = dict(model="glm-4-plus", messages=POEM, temperature=0, max_tokens=MAX)
    full = oa.chat.completions.create(**body)
    assert (full.choices[0].message.content, full.choices[0].finish_reason) == (want, "content_filter")
    chunks = list(oa.chat.completions.create(**body, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    zc = ZhipuAiClient(api_key="a.b", base_url=filtered.vendor_base, max_retries=0)
    body = dict(model="glm-4-plus", messages=POEM, do_sample=False, max_tokens=MAX)
    full = zc.chat.completions.create(**body)
    assert (full.choices[0].message.content, full.choices[0].finish_reason) == (want, "sensitive")
    assert full.usage.completion_tokens < MAX  # generation stopped there, not only the text
    chunks = list(zc.chat.completions.create(**body, stream=True))
    assert len(chunks) > 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "sensitive" and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # /v1/completions over the chat's own prompt ids: the same text, cut at the same place
    ids = encode_chat(filtered.app.state.ctx.tokenizer, POEM)
    r = httpx.post(filtered.openai_base + "/completions", json={"model": "glm-4-plus", "prompt": ids,
                                                                 "temperature": 0, "max_tokens": MAX}).json()
    assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == (raw[:at], "content_filter")
    wait_idle(filtered.engine)


def test_other_requests_run_as_before(filtered, server, found):
    raw, term, at = found
    other_raw, _, _ = engine_answer(server.engine, OTHER, MAX)
    assert fold(term) not in fold(other_raw)
    oa = openai.OpenAI(api_key="x", base_url=filtered.openai_base, max_retries=0)
    results = {}

    def ask(name, messages):
        results[name] = oa.chat.completions.create(model="glm-4-plus", messages=messages, temperature=0,
                                                   max_tokens=MAX).choices[0]

    threads = [threading.Thread(target=ask, args=(name, m)) for name, m in (("poem", POEM), ("other", OTHER))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert (results["poem"].finish_reason, results["other"].finish_reason) == ("content_filter", "length")
    assert results["other"].message.content == _content(other_raw)
    # Without a list the poem is whole, as the engine writes it
    plain = openai.OpenAI(api_key="x", base_url=server.openai_base, max_retries=0)
    r = plain.chat.completions.create(model="glm-4-plus", messages=POEM, temperature=0, max_tokens=MAX)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (_content(raw), "length")


def test_user_stop_strings_still_stop_and_a_blocked_one_is_sensitive(filtered, found):
    raw, term, at = found
    zc = ZhipuAiClient(api_key="a.b", base_url=filtered.vendor_base, max_retries=0)
    content = _content(raw)
    early = content[max(0, at - 8):at - 5]  # a user stop string before the term
    assert early and early not in content[:content.index(early)]
    r = zc.chat.completions.create(model="glm-4-plus", messages=POEM, do_sample=False, max_tokens=MAX, stop=[early])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (content[:content.index(early)], "stop")
    # The blocked term also given as a stop string: the operator's rule wins (never emitted, even with
    # include_stop_str_in_output)
    oa = openai.OpenAI(api_key="x", base_url=filtered.openai_base, max_retries=0)
    r = oa.chat.completions.create(model="glm-4-plus", messages=POEM, temperature=0, max_tokens=MAX, stop=[term],
                                   extra_body={"include_stop_str_in_output": True})
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (_content(raw[:at]), "content_filter")


def test_tool_call_arguments_are_generated_text_too(make_server, server):
    oa = openai.OpenAI(api_key="x", base_url=server.openai_base, max_retries=0)
    body = dict(model="glm-4-plus", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=60)
    call = oa.chat.completions.create(**body).choices[0].message.tool_calls[0]
    args = call.function.arguments
    # three characters of the city the model wrote, in no part of the request (not even the tool's schema)
    city, avoid = json.loads(args)["city"], fold(json.dumps([body["messages"], WEATHER], ensure_ascii=False))
    term = next(t for t in (city[i:i + 3] for i in range(len(city) - 2))
                if "\ufffd" not in t and t.strip() == t and fold(t) not in avoid)
    srv = make_server(blocked_words=[term])
    r = openai.OpenAI(api_key="x", base_url=srv.openai_base, max_retries=0).chat.completions.create(**body)
    choice = r.choices[0]
    assert choice.finish_reason == "content_filter"
    cut = choice.message.tool_calls[0].function.arguments
    assert args.startswith(cut) and fold(term) not in fold(cut) and len(cut) < len(args)
    zc = ZhipuAiClient(api_key="a.b", base_url=srv.vendor_base, max_retries=0)
    body = {**body, "temperature": None, "do_sample": False}
    chunks = list(zc.chat.completions.create(**body, stream=True))
    streamed = "".join(tc.function.arguments or "" for c in chunks for tc in (c.choices[0].delta.tool_calls or []))
    assert streamed == cut and chunks[-1].choices[0].finish_reason == "sensitive"


def test_logprobs_never_spell_the_term(filtered, found):
    # A token's logprob carries its text and bytes: the tokens that make the cut term must not go out that way
    # either (they used to: the body's, the stream's and the Responses API's logprobs all spelled it). What goes
    # out is the logprobs of tokens whose text went out whole, the same streamed or not.
    raw, term, at = found
    oa = openai.OpenAI(api_key="x", base_url=filtered.openai_base, max_retries=0)
    kw = dict(model="glm-4-plus", messages=POEM, temperature=0, max_tokens=MAX, logprobs=True, top_logprobs=1)
    body = oa.chat.completions.create(**kw).choices[0]
    chunks = list(oa.chat.completions.create(**kw, stream=True))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    resp = oa.responses.create(model="glm-4-plus", input=POEM, temperature=0, max_output_tokens=MAX, top_logprobs=1)
    lists = [body.logprobs.content, streamed, resp.output[0].content[0].logprobs]
    assert body.finish_reason == "content_filter" and resp.incomplete_details.reason == "content_filter"
    for lps in lists:
        spelled = b"".join(bytes(lp.bytes) for lp in lps)
        assert term.encode() not in spelled and fold(term) not in fold(spelled.decode(errors="replace")), term
        assert len(lps) > 3 and len(spelled) <= len(raw[:at].encode())  # (the random model writes invalid UTF-8)
    assert [lp.token for lp in lists[1]] == [lp.token for lp in lists[0]] == [lp.token for lp in lists[2]]
    wait_idle(filtered.engine)


# ---- async tasks, batch lines, metrics ---------------------------------------------------------------------------

def test_async_task_and_batch_lines(filtered, found):
    raw, term, at = found
    zc = ZhipuAiClient(api_key="a.b", base_url=filtered.vendor_base, max_retries=0)
    task = zc.chat.asyncCompletions.create(model="glm-4-plus", messages=POEM, do_sample=False, max_tokens=MAX)
    deadline = time.monotonic() + 30
    while (res := zc.chat.asyncCompletions.retrieve_completion_result(id=task.id)).task_status == "PROCESSING":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (res.choices[0].message.content, res.choices[0].finish_reason) == (_content(raw[:at]), "sensitive")

    ctx = filtered.app.state.ctx
    line = {"custom_id": "a", "method": "POST", "url": "/v4/chat/completions",
            "body": {"model": "glm-4-plus", "messages": [{"role": "user", "content": "禁词"}]}}
    checked = check_line(ctx, 1, json.dumps(line).encode(), {})
    assert checked.error is not None and json.loads(checked.error)["error"]["code"] == "1301"
    body = {"model": "glm-4-plus", "messages": POEM, "do_sample": False, "max_tokens": MAX}
    ok, out, _ = asyncio.run(run_line(ctx, "b", 2, body))
    choice = json.loads(out)["response"]["body"]["choices"][0]
    assert ok and (choice["message"]["content"], choice["finish_reason"]) == (_content(raw[:at]), "sensitive")


def test_metrics_count_refused_inputs_and_cut_outputs(make_server, found):
    raw, term, at = found
    srv = make_server(blocked_words=["禁词", term])
    httpx.post(srv.vendor_base + "chat/completions", json={"model": "glm-4-plus", "messages": [
        {"role": "user", "content": "禁词"}]})
    r = httpx.post(srv.vendor_base + "chat/completions", json={"model": "glm-4-plus", "messages": POEM,
                                                                "do_sample": False, "max_tokens": MAX})
    assert r.json()["choices"][0]["finish_reason"] == "sensitive"
    text = httpx.get(srv.url + "/metrics").text
    assert 'glm_serve_content_filtered_total{stage="input"} 1.0' in text
    assert 'glm_serve_content_filtered_total{stage="output"} 1.0' in text
    assert 'glm_serve_finished_choices_total{reason="content_filter"} 1.0' in text


# ---- the word file -----------------------------------------------------------------------------------------------

def test_word_file_format(tmp_path):
    f = tmp_path / "w.txt"
    f.write_text("\ufeff# comment\n\n  禁词  \nBad Word\r\n#not a term\nBad Word\n", encoding="utf-8")
    assert read_blocked_words(f) == ["禁词", "Bad Word"]


@pytest.mark.parametrize("content,says", [(None, "does not exist"), ("# only comments\n\n", "holds no term"),
                                          (b"\xff\xfe bad", "not UTF-8"), ("dir", "cannot read")])
def test_bad_word_files_stop_the_server_before_loading(tmp_path, capsys, content, says):
    f = tmp_path / "w.txt"
    if content == "dir":
        f.mkdir()
    elif isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content, encoding="utf-8")
    argv = ["serve", "--model", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "d"), "--blocked-words", str(f)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--blocked-words" in err and says in err, err


def test_responses_route_refuses_and_cuts_too(filtered, found):
    # /v1/responses runs the chat path: input with a term is a 400 (content_filter), an answer cut before one is
    # an incomplete response with OpenAI's reason for it, streamed or not.
    raw, term, at = found
    want = _content(raw[:at])
    oa = openai.OpenAI(api_key="x", base_url=filtered.openai_base, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model="glm-4-plus", input="say 禁词", max_output_tokens=4)
    assert e.value.code == "content_filter"
    # the item that holds it is named as sent (instructions make it chat's messages[2]: no such name here)
    items = [{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "input_text", "text": "禁词"}]}]
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model="glm-4-plus", instructions="be brief", input=items, max_output_tokens=4)
    assert e.value.body["param"] == "input" and "input[1] holds" in e.value.body["message"]
    assert "messages" not in e.value.body["message"]
    kw = dict(model="glm-4-plus", input=POEM, temperature=0, max_output_tokens=MAX)
    r = oa.responses.create(**kw)
    assert (r.output_text, r.status, r.incomplete_details.reason) == (want, "incomplete", "content_filter")
    events = list(oa.responses.create(**kw, stream=True))
    assert events[-1].type == "response.incomplete"
    assert "".join(ev.delta for ev in events if ev.type == "response.output_text.delta") == want
    wait_idle(filtered.engine)
