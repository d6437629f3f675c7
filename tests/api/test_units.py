"""Pieces of the API without a server: the streaming answer parser against glm_serve.chat's one-shot parser on
random chunkings, key and JWT checks against PyJWT-made tokens, admission limits, sampling-parameter mapping,
latency metrics of merged outputs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import threading
import time
from types import SimpleNamespace

import jwt
import pytest

from glm_serve.api.auth import Admission, KeyStore
from glm_serve.api.chat_service import api_finish_reason
from glm_serve.api.context import GenerationDefaults
from glm_serve.api.errors import APIError
from glm_serve.api.metrics import Metrics, RequestTimer
from glm_serve.api.params import OPENAI, VENDOR, sampling_params
from glm_serve.api.parser import ChoiceParser, assemble
from glm_serve.chat import parse_assistant_output

NAMES = frozenset({"get_weather", "get_time", "search"})


def _random_answer(rng: random.Random) -> str:
    kind = rng.randrange(6)
    args = json.dumps({"city": rng.choice(["北京", "Paris", "a b"]), "n": rng.randrange(100)},
                      indent=rng.choice([None, 2]))
    if kind == 0:
        return "\n" + rng.choice(["Hello", "你好，世界", "", "two\nlines", "get_weather\n{}"])
    if kind == 1:
        return f"{rng.choice(sorted(NAMES))}\n{args}"
    if kind == 2:
        return f"{rng.choice(sorted(NAMES))}\n  {args} \n"  # whitespace around the arguments
    if kind == 3:
        return f"get_wea ther\n{args}"  # a space: not a name
    if kind == 4:
        return f"unknown_fn\n{args}"
    return rng.choice(["plain text", "get_", "get_weather", "{\"a\": 1}"])  # no newline at all


def _chunks(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        k = rng.randrange(0, 5)
        out.append(text[i:i + k])
        i += k
    return out


def test_stream_parser_matches_one_shot_parser_on_random_chunkings():
    rng = random.Random(1234)
    for _ in range(400):
        text = _random_answer(rng)
        parser = ChoiceParser(NAMES)
        deltas = [d for piece in _chunks(text, rng) for d in parser.feed(piece)] + parser.finish()
        got = assemble(deltas)
        ref = parse_assistant_output(text, NAMES)
        if ref.tool_calls:
            assert got.content is None and len(got.tool_calls) == 1, text
            assert got.tool_calls[0]["function"]["name"] == ref.tool_calls[0].name
            assert got.tool_calls[0]["function"]["arguments"] == ref.tool_calls[0].arguments
            assert got.tool_calls[0]["id"].startswith("call_")
        elif text.startswith("\n") or not any(text.startswith(n + "\n") for n in NAMES):
            assert got.content == ref.content and not got.tool_calls, text


def test_stream_parser_never_leaks_a_call_into_content():
    parser = ChoiceParser(NAMES)
    deltas = []
    for piece in ["get", "_wea", "ther", "\n", "{\"city\"", ": \"x\"}"]:
        deltas += parser.feed(piece)
    assert all(d.content is None for d in deltas)
    assert deltas[0].name == "get_weather" and "".join(d.arguments or "" for d in deltas) == '{"city": "x"}'


def test_parser_without_tools_only_drops_the_leading_newline():
    p = ChoiceParser()
    assert [d.content for d in p.feed("\nget_weather\n{}")] == ["get_weather\n{}"]
    assert [d.content for d in ChoiceParser().feed("abc")] == ["abc"]


def test_raw_parser_keeps_everything_as_content():
    """An answer continued from the prompt (continue_final_message): its text is content as generated, its
    first newline included, even when it reads like a call to a known tool."""
    p = ChoiceParser(frozenset({"get_weather"}), raw=True)
    assert [d.content for d in p.feed("\nget_weather\n{}")] == ["\nget_weather\n{}"] and not p.is_call
    p = ChoiceParser(frozenset({"get_weather"}), raw=True)
    assert [d.content for d in p.feed("get_weather\n{}")] == ["get_weather\n{}"] and p.finish() == []


def test_finish_reason_of_a_tool_call_cut_short_is_not_tool_calls():
    """Only a call that ended by itself is "tool_calls": one cut by max_tokens (its arguments unfinished) is
    "length", and a failed one is an error, so a client never runs a truncated call."""
    for flavor in (VENDOR, OPENAI):
        assert api_finish_reason(flavor, "stop", True, False) == "tool_calls"
        assert api_finish_reason(flavor, "length", True, False) == "length"
        assert api_finish_reason(flavor, "stop", False, False) == "stop"
    assert api_finish_reason(VENDOR, "length", True, True) == "model_context_window_exceeded"
    assert api_finish_reason(OPENAI, "length", False, True) == "length"
    assert api_finish_reason(VENDOR, "error", True, False) == "network_error"
    assert api_finish_reason(OPENAI, "abort", True, False) == "error"


def test_parser_name_that_is_no_tool_is_content():
    """Only a known function name before the first newline opens a call: a prefix of one ("get_"), or any
    other word, followed by a newline is content, whether it arrives in pieces or in one delta."""
    for pieces in (["get_", "\n{}"], ["get", "_\n", "{}"], ["unknown_fn\n{}"], ["get_weather2\n{}"]):
        parser = ChoiceParser(NAMES)
        deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
        assert not parser.is_call and assemble(deltas).content == "".join(pieces), pieces
        assert all(d.call_id is None and d.arguments is None for d in deltas)


def test_parser_streams_content_as_soon_as_it_cannot_be_a_call():
    """Text that can no longer begin a tool name is content at once, not held until the answer ends."""
    parser = ChoiceParser(NAMES)
    assert [d.content for d in parser.feed("Hel")] == ["Hel"]
    assert [d.content for d in parser.feed("lo")] == ["lo"]
    parser = ChoiceParser(NAMES)
    assert parser.feed("get") == []  # might still become get_weather / get_time
    assert [d.content for d in parser.feed(" a")] == ["get a"]  # a space: no name any more


SECRET = "mysecret-mysecret-mysecret-mysecret"
KEY = f"myid.{SECRET}"


def _sdk_token(secret: str, exp_ms: int, key_id: str = "myid") -> str:
    now = int(time.time() * 1000)
    return jwt.encode({"api_key": key_id, "exp": exp_ms, "timestamp": now}, secret, algorithm="HS256",
                      headers={"alg": "HS256", "sign_type": "SIGN"})


def _code(store: KeyStore, header) -> str:
    with pytest.raises(APIError) as e:
        store.authenticate(header)
    return e.value.code


def test_a_key_without_a_dot_gets_an_id_that_is_neither_it_nor_another_keys():
    """A key without a dot is all secret: its id (what per-key limits count by and files, batches and async
    tasks are owned by, on disk) must not be the key itself, nor collide with the id of an `id.secret` key
    spelled like it."""
    store = KeyStore([KEY, "myid", "plain-secret-key"])
    raw = store.authenticate("Bearer plain-secret-key")
    assert "plain-secret-key" not in raw and raw == KeyStore(["plain-secret-key"]).authenticate("plain-secret-key")
    assert store.authenticate("Bearer myid") != store.authenticate(f"Bearer {KEY}") == "myid"


def test_two_keys_with_one_id_are_refused_at_start():
    """`myid.a` and `myid.b`: a JWT names the id, so only one secret could verify it, and the two keys would share
    files, batches, tasks and their concurrency limit. Refused, as is the same key given twice."""
    with pytest.raises(ValueError, match="two api keys have the id 'myid'"):
        KeyStore([KEY, "myid.another-secret-another-secret"])
    with pytest.raises(ValueError, match="the same api key is given twice"):
        KeyStore(["plain-secret-key", "plain-secret-key"])


def test_keys_raw_and_jwt():
    store = KeyStore([KEY, "plainkey"])
    assert store.authenticate(f"Bearer {KEY}") == "myid"
    plain = store.authenticate("Bearer plainkey")
    assert plain == store.authenticate("plainkey") and "plainkey" not in plain  # an id, not the secret itself
    now = int(time.time() * 1000)
    assert store.authenticate("Bearer " + _sdk_token(SECRET, now + 60_000)) == "myid"
    assert _code(store, None) == "1001"
    assert _code(store, "Bearer ") == "1001"
    assert _code(store, "Bearer nope") == "1000"
    assert _code(store, "Bearer " + _sdk_token(SECRET, now - 1000)) == "1003"
    assert _code(store, "Bearer " + _sdk_token("wrong-secret-wrong-secret-wrong-secret", now + 60_000)) == "1004"
    assert _code(store, "Bearer " + _sdk_token(SECRET, now + 60_000, key_id="other")) == "1002"
    assert _code(store, "Bearer a.b.c") == "1002"
    # exp in seconds (a stock JWT library) is read as seconds, not as a 1970 millisecond date
    assert store.authenticate("Bearer " + _sdk_token(SECRET, int(time.time()) + 60)) == "myid"


def _hs256(header: dict, payload: dict, secret: str) -> str:
    """A JWT written by hand (PyJWT would not sign a header that names another algorithm)."""
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing}.{b64(hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest())}"


def test_each_key_check_refuses_what_it_is_for():
    """Every check in KeyStore has a case that only it refuses (each passed every test when dropped)."""
    store = KeyStore([KEY, "plainkey"])
    exp = int(time.time() * 1000) + 60_000
    assert store.authenticate(f"bearer {KEY}") == "myid"  # the scheme is case-insensitive (RFC 7235)
    assert store.authenticate(KEY) == "myid"  # no scheme: the header is the key
    # a raw key is compared whole: a longer token that starts with it is no key
    assert _code(store, f"Bearer {KEY}x") == "1000"
    # three dots is neither a key nor a JWT: 1000, not a 500 from unpacking the split
    assert _code(store, "Bearer a.b.c.d") == "1000"
    # the header must say HS256, even when the HMAC-SHA256 signature is right
    assert _code(store, "Bearer " + _hs256({"alg": "none"}, {"api_key": "myid", "exp": exp}, SECRET)) == "1002"
    assert store.authenticate("Bearer " + _hs256({"alg": "HS256"}, {"api_key": "myid", "exp": exp}, SECRET)) == "myid"
    # a key without a secret cannot sign: a token naming it (signed with the empty secret) is refused
    assert _code(store, "Bearer " + _hs256({"alg": "HS256"}, {"api_key": "plainkey", "exp": exp}, "")) == "1002"
    # a signed token without a numeric exp never expires: refused as malformed (not a 500)
    for payload in ({"api_key": "myid"}, {"api_key": "myid", "exp": str(exp)}, {"api_key": "myid", "exp": True},
                    {"api_key": "myid", "exp": float("nan")}, {"api_key": "myid", "exp": float("inf")}):
        assert _code(store, "Bearer " + _hs256({"alg": "HS256"}, payload, SECRET)) == "1002", payload


def test_a_deeply_nested_jwt_part_is_a_malformed_token_not_a_500():
    # Before: json.loads raised RecursionError on a header or payload of 3000 "[", unauthenticated: a 500 with a
    # logged traceback, retried three times by the SDKs.
    store = KeyStore([KEY])
    nested = base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode()
    assert _code(store, f"Bearer {nested}.e30.c2ln") == "1002"
    assert _code(store, f"Bearer e30.{nested}.c2ln") == "1002"


def test_admission_does_not_limit_requests_without_a_key():
    # README: --max-concurrency-per-key counts per api key; without keys there is no key to count.
    adm = Admission(max_concurrency_per_key=1, max_in_flight=None)
    slots = [adm.acquire(None) for _ in range(3)]
    assert adm.in_flight == 3
    for s in slots:
        s.release()
    assert adm.in_flight == 0


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rate_limit_is_a_token_bucket_per_key():
    # 6 a minute: a burst of 6, then one every 10 s; another key has its own budget; without a key, no limit.
    clock = _Clock()
    adm = Admission(max_concurrency_per_key=None, max_in_flight=None, requests_per_minute_per_key=6, clock=clock)
    for _ in range(6):
        adm.acquire("a").release()
    with pytest.raises(APIError) as e:
        adm.acquire("a")
    assert (e.value.code, e.value.status, e.value.headers) == ("1303", 429, {"Retry-After": "10"})
    assert e.value.should_retry  # the SDKs retry a 429, after Retry-After
    adm.acquire("b").release()
    for _ in range(20):
        adm.acquire(None).release()
    clock.now += 7.5  # three quarters of a request earned: still refused, and the wait is what is left
    with pytest.raises(APIError) as e:
        adm.acquire("a")
    assert e.value.headers == {"Retry-After": "3"}  # 2.5 s, rounded up
    clock.now += 2.5
    adm.acquire("a").release()  # refusals spent nothing: the 10 s since the burst bought exactly one
    with pytest.raises(APIError):
        adm.acquire("a")
    clock.now += 3600  # an idle key refills to its minute, never beyond it
    for _ in range(6):
        adm.acquire("a").release()
    with pytest.raises(APIError):
        adm.acquire("a")


def test_rate_limit_is_not_spent_by_requests_refused_for_concurrency():
    clock = _Clock()
    adm = Admission(max_concurrency_per_key=1, max_in_flight=None, requests_per_minute_per_key=2, clock=clock)
    held = adm.acquire("a")
    for _ in range(5):
        with pytest.raises(APIError) as e:
            adm.acquire("a")
        assert e.value.code == "1302"
    held.release()
    adm.acquire("a").release()  # the second of its two: the five 1302s took none
    with pytest.raises(APIError) as e:
        adm.acquire("a")
    assert e.value.code == "1303"


def test_admission_limits():
    adm = Admission(max_concurrency_per_key=2, max_in_flight=3)
    a1, a2 = adm.acquire("a"), adm.acquire("a")
    with pytest.raises(APIError) as e:
        adm.acquire("a")
    assert e.value.code == "1302" and e.value.status == 429
    b = adm.acquire("b")
    with pytest.raises(APIError) as e:
        adm.acquire("c")
    assert e.value.code == "1305"
    a1.release()
    a1.release()  # idempotent
    assert adm.in_flight == 2
    adm.acquire("a")
    for s in (a2, b):
        s.release()


def _ctx(**defaults):
    return SimpleNamespace(defaults=GenerationDefaults(**defaults), max_n=8, max_model_len=1000, content_filter=None)


def _req(**fields):
    return SimpleNamespace(**fields)


def test_sampling_params_mapping():
    ctx = _ctx(temperature=0.8, top_p=0.7)
    p = sampling_params(_req(), VENDOR, ctx)
    assert (p.temperature, p.top_p, p.max_tokens) == (0.8, 0.7, None)  # checkpoint defaults, up to the context
    assert sampling_params(_req(do_sample=False, temperature=0.5), VENDOR, ctx).greedy
    ignored = sampling_params(_req(do_sample=False, temperature=1.5, top_p=0.0), VENDOR, ctx)  # ignored, not checked
    assert ignored.greedy and (ignored.temperature, ignored.top_p) == (0.0, 1.0)
    assert sampling_params(_req(temperature=0.0), VENDOR, ctx).greedy
    assert sampling_params(_req(temperature=1.7), OPENAI, ctx).temperature == 1.7
    assert sampling_params(_req(logprobs=True, top_logprobs=3), OPENAI, ctx).logprobs == 3
    assert sampling_params(_req(), VENDOR, _ctx(do_sample=False, temperature=0.8)).greedy
    for flavor, fields, code in [
        (VENDOR, dict(temperature=1.5), "1210"), (VENDOR, dict(top_p=0.0), "1210"),
        (OPENAI, dict(temperature=2.5), "1210"), (VENDOR, dict(n=9), "1210"),
        (VENDOR, dict(max_tokens=1001), "1210"), (VENDOR, dict(max_tokens=0), "1210"),
        (OPENAI, dict(top_logprobs=2), "1215"), (OPENAI, dict(logit_bias={"x": 5}), "1210"),
        (OPENAI, dict(presence_penalty=3.0), "1210"), (VENDOR, dict(stop=["ok", ""]), "1210"),
    ]:
        with pytest.raises(APIError) as e:
            sampling_params(_req(**fields), flavor, ctx)
        assert e.value.code == code, fields


def test_sampling_params_mapping_of_the_openai_fields():
    """Each request field reaches the engine's params: OpenAI's top_p 0 is greedy, a request that only sets
    top_p samples on a greedy-by-default checkpoint, max_completion_tokens beats the deprecated max_tokens,
    logprobs: true alone is the sampled token's logprob (0 alternatives), include_stop_str_in_output is kept."""
    ctx = _ctx(temperature=0.8, top_p=0.7)
    assert sampling_params(_req(top_p=0.0), OPENAI, ctx).greedy
    p = sampling_params(_req(top_p=0.5), VENDOR, _ctx(do_sample=False, temperature=0.8))
    assert not p.greedy and (p.temperature, p.top_p) == (0.8, 0.5)
    assert sampling_params(_req(max_completion_tokens=5, max_tokens=9), OPENAI, ctx).max_tokens == 5
    assert sampling_params(_req(max_tokens=9), OPENAI, ctx).max_tokens == 9
    assert sampling_params(_req(logprobs=True), OPENAI, ctx).logprobs == 0
    assert sampling_params(_req(logprobs=False), OPENAI, ctx).logprobs is None
    assert sampling_params(_req(stop=["x"], include_stop_str_in_output=True), OPENAI, ctx).include_stop_str
    assert not sampling_params(_req(stop=["x"]), OPENAI, ctx).include_stop_str


def test_a_bad_max_completion_tokens_is_named_as_sent():
    """The error names the field the client sent (it named max_tokens, which the request did not hold)."""
    with pytest.raises(APIError) as e:
        sampling_params(_req(max_completion_tokens=0), OPENAI, _ctx())
    assert e.value.param == "max_completion_tokens" and e.value.message.startswith("max_completion_tokens: ")
    with pytest.raises(APIError) as e:
        sampling_params(_req(max_tokens=0), OPENAI, _ctx())
    assert e.value.param == "max_tokens"


def test_request_timer_spreads_a_merged_arrival_over_its_steps(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    metrics = Metrics(SimpleNamespace(stats=dict))
    value = metrics.registry.get_sample_value

    def at(timer, t, tokens, steps=1):
        clock[0] = t
        timer.on_tokens(tokens, steps)

    one = RequestTimer(metrics)
    at(one, 100.5, 1)  # first token: 0.5 s to first token
    at(one, 100.6, 1)  # one step later: 0.1 s
    at(one, 101.2, 6, steps=3)  # three steps of two choices, merged: 0.2 s each
    assert value("glm_serve_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value("glm_serve_inter_token_latency_seconds_count") == 4
    assert value("glm_serve_inter_token_latency_seconds_sum") == pytest.approx(0.7)
    clock[0] = 101.2
    late = RequestTimer(metrics)
    at(late, 101.5, 3, steps=3)  # its first three steps came together: 0.3 s, then two gaps of 0
    assert value("glm_serve_time_to_first_token_seconds_count") == 2
    assert value("glm_serve_time_to_first_token_seconds_sum") == pytest.approx(0.8)
    assert value("glm_serve_inter_token_latency_seconds_count") == 6
    assert value("glm_serve_inter_token_latency_seconds_sum") == pytest.approx(0.7)
    assert value("glm_serve_generation_tokens_total") == 11
    clock[0] = 102.1  # an engine output with two choices of two tokens each: two steps of 0.3 s
    late.on_output(SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[1, 2], finish_reason=None),
                                            SimpleNamespace(index=1, token_ids=[3, 4], finish_reason=None)],
                                   prompt_tokens=3))
    assert value("glm_serve_inter_token_latency_seconds_count") == 8
    assert value("glm_serve_inter_token_latency_seconds_sum") == pytest.approx(1.3)
    assert value("glm_serve_generation_tokens_total") == 15


def test_request_timer_counts_an_ended_request_once_and_only_after_a_first_token():
    metrics = Metrics(SimpleNamespace(stats=lambda: {"num_preemptions": 3}))
    value = metrics.registry.get_sample_value
    never = RequestTimer(metrics)
    never.on_end(12)  # cancelled before any token: its prompt may never have run
    assert value("glm_serve_prompt_tokens_total") == 0 and value("glm_serve_e2e_request_latency_seconds_count") == 0
    dropped = RequestTimer(metrics)
    dropped.on_tokens(1)
    dropped.on_end(7)  # the client left after the first token
    done = RequestTimer(metrics)
    done.on_tokens(2)
    done.on_finish(5)
    done.on_end(5)  # the generator's finally after the finish: not twice
    assert value("glm_serve_prompt_tokens_total") == 12 and value("glm_serve_e2e_request_latency_seconds_count") == 2
    assert value("glm_serve_time_to_first_token_seconds_count") == 2
    assert value("glm_serve_num_preemptions_total") == 3  # a running total is a counter


def test_request_timer_counts_the_prompt_with_the_first_tokens():
    # The stats line's prompt tokens/s and rates over glm_serve_prompt_tokens_total see prefill when it is done, not
    # when a long answer ends (they used to count at the end); and still once, and per key.
    metrics = Metrics(SimpleNamespace(stats=lambda: {}))
    value = metrics.registry.get_sample_value
    t = RequestTimer(metrics, owner="team-a")
    t.on_output(SimpleNamespace(outputs=[], prompt_tokens=40))  # (prompt logprobs before any token: not yet)
    assert value("glm_serve_prompt_tokens_total") == 0
    first = SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[5], finish_reason=None)], prompt_tokens=40)
    t.on_output(first)
    assert value("glm_serve_prompt_tokens_total") == 40 and metrics.num_prompt_tokens == 40
    assert value("glm_serve_key_prompt_tokens_total", {"key": "team-a"}) == 40
    t.on_output(first)
    t.on_finish(40)
    t.on_end(40)
    assert value("glm_serve_prompt_tokens_total") == 40
    assert value("glm_serve_key_prompt_tokens_total", {"key": "team-a"}) == 40
    assert value("glm_serve_key_generation_tokens_total", {"key": "team-a"}) == 2
    echo = RequestTimer(metrics)  # max_tokens 0 (echo with prompt logprobs): no token, counted at its finish
    echo.on_finish(9)
    assert value("glm_serve_prompt_tokens_total") == 49


def _out(*choices):
    """A RequestOutput of (index, tokens, finish_reason) choices."""
    return SimpleNamespace(outputs=[SimpleNamespace(index=i, token_ids=[7] * k, finish_reason=r)
                                    for i, k, r in choices], prompt_tokens=3)


def test_request_timer_counts_each_choice_by_how_it_ended():
    # Before: only the HTTP status counted a request's outcome, and a stream's is 200 before it starts: a stream
    # that failed or whose client left was a 200 like any other.
    metrics = Metrics(SimpleNamespace(stats=dict))

    def finished(reason):
        return metrics.registry.get_sample_value("glm_serve_finished_choices_total", {"reason": reason}) or 0

    three = RequestTimer(metrics, n=3)
    three.on_output(_out((0, 1, None), (1, 1, "stop"), (2, 1, None)))
    three.on_output(_out((0, 2, "length"), (2, 1, None)))
    three.on_output(_out((1, 0, "stop")))  # a finish seen again (merged outputs) counts once
    three.on_end(5)  # choice 2 never finished: the client left
    three.on_end(5)
    failed = RequestTimer(metrics)
    failed.on_output(_out((0, 0, "error")))
    failed.on_end(5)
    queued = RequestTimer(metrics, n=2)
    queued.on_end(5)  # cancelled before any output
    assert (finished("stop"), finished("length"), finished("error"), finished("abort")) == (1, 1, 1, 3)


def test_prefix_cache_queries_and_hits_are_counters():
    # Before: only a lifetime hit-rate gauge, which hardly moves after a while: no recent hit rate to be had.
    metrics = Metrics(SimpleNamespace(stats=lambda: {"prefix_cache_queries": 120, "prefix_cache_hits": 48,
                                                     "prefix_cache_hit_rate": 0.4}))
    value = metrics.registry.get_sample_value
    assert value("glm_serve_prefix_cache_queries_total") == 120 and value("glm_serve_prefix_cache_hits_total") == 48


def test_validation_error_of_a_union_field_names_the_field_and_every_accepted_type():
    from pydantic import BaseModel, ValidationError

    from glm_serve.api.errors import from_validation_errors

    class Body(BaseModel):
        tool_choice: str | dict | None = None

    with pytest.raises(ValidationError) as e:
        Body.model_validate({"tool_choice": 5})
    err = from_validation_errors(e.value.errors())
    assert err.code == "1210" and err.param == "tool_choice"
    assert err.message == "tool_choice: Input should be a valid string, or Input should be a valid dictionary"


@pytest.mark.parametrize("prompt", [["a", 1], [[1, "a"]], [1, [2]]])
def test_validation_error_of_a_mixed_list_names_the_accepted_forms(prompt):
    # Before: only the first member's message, "prompt: Input should be a valid string", for ["a", 1]: a list
    # was clearly meant, and the message pointed away from the item that broke it.
    from pydantic import ValidationError

    from glm_serve.api.errors import from_validation_errors
    from glm_serve.api.schemas import OpenAICompletionRequest

    with pytest.raises(ValidationError) as e:
        OpenAICompletionRequest.model_validate({"model": "m", "prompt": prompt})
    err = from_validation_errors(e.value.errors())
    assert err.code == "1210" and err.param == "prompt"
    assert err.message == "prompt: must be one of str, list[str], list[int], list[list[int]]; the value is none of them"


def test_engine_thread_cpu_is_read_only_while_the_engine_thread_lives():
    # Before: a dead engine thread's id was still passed to pthread_getcpuclockid. Ids are reused: the next new
    # thread (a to_thread worker preparing a chat) got it, and its CPU time was reported as the engine's.
    from glm_serve.engine.async_engine import AsyncEngine

    def engine_cpu(alive: bool):
        # this test's thread stands for the one that now holds the old id
        thread = SimpleNamespace(ident=threading.get_ident(), is_alive=lambda: alive)
        fake = SimpleNamespace(_thread=thread, step_count=4, in_own_process=False)
        fake.engine_cpu_seconds = lambda: AsyncEngine.engine_cpu_seconds(fake)
        metrics = Metrics(SimpleNamespace(stats=dict), fake)
        value = metrics.registry.get_sample_value
        assert value("glm_serve_engine_steps_total") == 4
        assert value("glm_serve_thread_cpu_seconds_total", {"thread": "event_loop"}) is not None
        return value("glm_serve_thread_cpu_seconds_total", {"thread": "engine"})

    if hasattr(time, "pthread_getcpuclockid"):
        assert engine_cpu(alive=True) > 0
    assert engine_cpu(alive=False) is None  # the engine stopped: no sample, not another thread's


def test_loop_histogram_exposes_what_prometheus_clients_histogram_does():
    # Our lock-free histogram (observed on the event loop for every streamed token) against prometheus_client's
    # own on the same values: bounds hit exactly (le is inclusive), values past the last bound, n at once.
    import random

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from glm_serve.api.metrics import _LoopHistogram

    buckets = (0.001, 0.01, 0.1, 1.0)
    ours = _LoopHistogram("h_seconds", "doc", buckets)
    registry = CollectorRegistry()
    theirs = Histogram("h_seconds", "doc", buckets=buckets, registry=registry)
    rng = random.Random(3)
    values = [rng.choice([0.0, 0.001, 0.01, 0.1, 1.0, 5.0]) for _ in range(40)] + [rng.random() for _ in range(40)]
    for v in values:
        n = rng.randint(1, 3)
        ours.observe(v, n)
        for _ in range(n):
            theirs.observe(v)

    class One:
        def collect(self):
            yield ours.family()

    mine = CollectorRegistry()
    mine.register(One())

    def lines(reg):
        return sorted(line for line in generate_latest(reg).decode().splitlines()
                      if line.startswith("h_seconds_") and "_created" not in line)

    got, want = lines(mine), lines(registry)
    assert [line.rsplit(" ", 1)[0] for line in got] == [line.rsplit(" ", 1)[0] for line in want]
    for a, b in zip(got, want):
        assert float(a.rsplit(" ", 1)[1]) == pytest.approx(float(b.rsplit(" ", 1)[1]), rel=1e-9)
