"""Constrained decoding (glm_serve/constrain.py) on a tiny random-weight checkpoint and the real engine: JSON
mode, JSON schemas, forced tool calls and tool_choice "none", checked against json / jsonschema / the chat
parser; plus random walks over the masks themselves, bad-input errors and the grammar cache."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("xgrammar")  # optional dependency: constrained decoding is off without it
jsonschema = pytest.importorskip("jsonschema")

from glm_serve.chat import encode_chat, parse_assistant_output  # noqa: E402
from glm_serve.constrain import MAX_WHITESPACE, ConstraintFactory  # noqa: E402
from glm_serve.engine.sampler import unpack_bitmask  # noqa: E402
from glm_serve.llm import LLM  # noqa: E402
from glm_serve.sampling_params import SamplingParams  # noqa: E402

SEEDS = range(8)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},  # length-bounded: exercises the control-character fix
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                     "vip": {"type": "boolean"}}, "required": ["zip"]},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
    },
    "required": ["name", "age"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Beijing"]},
                                         "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                         "b": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "send-msg", "parameters": {
        "type": "object", "properties": {"to": {"type": "string", "minLength": 1, "maxLength": 6}},
        "required": ["to"], "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def llm(tiny_hf):
    return LLM(str(tiny_hf), kv_cache_tokens=8192)


@pytest.fixture(scope="module")
def factory(llm):
    return ConstraintFactory(llm.tokenizer, llm.engine.model_config.vocab_size)


@pytest.fixture
def closing_bias(llm, monkeypatch):
    """Random weights pick uniformly among ~2,000 tokens, so a free JSON string almost never closes within
    max_tokens. A logit bias on tokens holding `"`, `}` or `]` (what a trained model does by itself) makes
    free-form JSON end; which tokens are allowed is still decided by the constraint alone."""
    tok, width = llm.tokenizer, llm.engine.model_config.vocab_size
    bias = torch.zeros(width)
    for i in range(tok.vocab_size):
        b = tok.id_to_token_bytes(i)
        if not tok.is_special(i) and any(c in b for c in (b'"', b"}", b"]")):
            bias[i] = 4.0
    execute = llm.engine.runner.execute
    monkeypatch.setattr(llm.engine.runner, "execute", lambda *a, **k: execute(*a, **k) + bias)


def _generate(llm, prompt_ids, make_constraint, max_tokens=300, seeds=SEEDS):
    """All seeds as concurrent requests at temperature 1 -> {seed: (text, token ids, finish, stop_reason)}."""
    engine = llm.engine
    for s in seeds:
        engine.add_request(f"c{s}", prompt_ids, SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens),
                           constraints=[make_constraint()])
    texts, ids, finish = {}, {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            s = int(out.request_id[1:])
            for c in out.outputs:
                texts[s] = texts.get(s, "") + c.text
                ids.setdefault(s, []).extend(c.token_ids)
                if c.finish_reason:
                    finish[s] = (c.finish_reason, c.stop_reason)
    return {s: (texts[s], ids[s], *finish[s]) for s in seeds}


def _prompt(llm, text, tools=None):
    return encode_chat(llm.tokenizer, [{"role": "user", "content": text}], tools)


def test_json_object_always_parses(llm, factory, closing_bias):
    stop_ids = set(llm.tokenizer.stop_token_ids)
    results = _generate(llm, _prompt(llm, "Reply with a JSON object."), factory.json_object, seeds=range(12))
    for text, ids, finish, stop_reason in results.values():
        assert finish == "stop" and stop_reason in stop_ids, (finish, text)
        assert text.startswith("\n") and ids[-1] in stop_ids
        assert isinstance(json.loads(text[1:]), dict), text


def test_json_schema_output_validates(llm, factory):
    results = _generate(llm, _prompt(llm, "A person as JSON."), lambda: factory.json_schema(PERSON))
    for text, _, finish, _ in results.values():
        assert finish == "stop", (finish, text)
        jsonschema.validate(json.loads(text[1:]), PERSON)


@pytest.mark.parametrize("named", [None, "add", "send-msg"])
def test_tool_call_parses_and_validates(llm, factory, named):
    names = [t["function"]["name"] for t in TOOLS]
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    prompt = _prompt(llm, "What is the weather in Paris?", TOOLS)
    results = _generate(llm, prompt, lambda: factory.tool_call(TOOLS, named))
    used = set()
    for text, _, finish, stop_reason in results.values():
        assert finish == "stop" and stop_reason in llm.tokenizer.stop_token_ids, (finish, text)
        parsed = parse_assistant_output(text, names)
        assert parsed.content is None and len(parsed.tool_calls) == 1, text
        call = parsed.tool_calls[0]
        assert call.name == named if named else call.name in names
        jsonschema.validate(json.loads(call.arguments), params[call.name])
        used.add(call.name)
    if named is None:
        assert len(used) > 1  # the union really offers every function


def test_tool_without_parameters_takes_any_object(llm, factory, closing_bias):
    tools = [{"type": "function", "function": {"name": "ping"}}]
    results = _generate(llm, _prompt(llm, "ping", tools), lambda: factory.tool_call(tools), seeds=range(4))
    for text, _, finish, _ in results.values():
        assert finish == "stop", (finish, text)
        call = parse_assistant_output(text, ["ping"]).tool_calls[0]
        assert isinstance(json.loads(call.arguments), dict)


def test_content_only_is_content(llm, factory):
    tok = llm.tokenizer
    stop_ids = set(tok.stop_token_ids)
    results = _generate(llm, _prompt(llm, "hello", TOOLS), factory.content_only, max_tokens=40)
    for text, ids, finish, _ in results.values():
        # Free text from random weights rarely meets a stop id: "length" is fine here, truncation cannot
        # turn content into a call.
        assert finish in ("stop", "length")
        assert tok.id_to_token_bytes(ids[0]).startswith(b"\n")
        assert all(i in stop_ids or (i < tok.vocab_size and not tok.is_special(i)) for i in ids), ids
        parsed = parse_assistant_output(text, [t["function"]["name"] for t in TOOLS])
        assert parsed.tool_calls == [] and parsed.content == text[1:]


# ---- the masks themselves: random walks checked against json / jsonschema ------------------------------

def _allowed(constraint, width: int) -> list[int]:
    bitmask = torch.full((3, (width + 31) // 32), -1, dtype=torch.int32)
    constraint.fill_bitmask(bitmask, 1)
    assert bitmask[0].eq(-1).all() and bitmask[2].eq(-1).all()  # only the given row is written
    return unpack_bitmask(bitmask, width)[1].nonzero().flatten().tolist()


def _walk(factory, tok, constraint, complete, rng, max_steps=200, data=b""):
    """Feed random allowed tokens (half the time one that closes something). At every step: no padding id and
    no special other than a stop id is allowed, and a stop id is allowed exactly when `complete(text)`.
    data: the bytes of the tokens the constraint has accepted already."""
    stop_ids = set(tok.stop_token_ids)
    for _ in range(max_steps):
        allowed = _allowed(constraint, factory.vocab_size)
        assert allowed and all(i in stop_ids or (i < tok.vocab_size and not tok.is_special(i)) for i in allowed)
        text = data.decode("utf-8", errors="strict") if _utf8_complete(data) else None
        can_stop = bool(stop_ids & set(allowed))
        assert can_stop == (text is not None and complete(text)), data
        if can_stop:
            constraint.accept(sorted(stop_ids & set(allowed))[0])
            assert constraint.is_terminated()
            return text
        closing = [i for i in allowed if any(c in tok.id_to_token_bytes(i) for c in (b'"', b"}", b"]"))]
        pick = rng.choice(closing if closing and rng.random() < 0.5 else allowed)
        constraint.accept(pick)
        data += tok.id_to_token_bytes(pick)
    return None


def _utf8_complete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def test_json_masks_follow_json(llm, factory):
    tok, rng, finished = llm.tokenizer, random.Random(1), 0
    for _ in range(6):
        first = _allowed(factory.json_object(), factory.vocab_size)
        assert first and all(tok.id_to_token_bytes(i).startswith(b"\n") for i in first)
        text = _walk(factory, tok, factory.json_object(),
                     lambda t: t.startswith("\n") and isinstance(_loads(t[1:]), dict), rng)
        finished += text is not None
        valid = lambda t: t.startswith("\n") and _loads(t[1:]) is not None and jsonschema.Draft202012Validator(
            PERSON).is_valid(_loads(t[1:]))
        finished += _walk(factory, tok, factory.json_schema(PERSON), valid, rng) is not None
    assert finished >= 6


def test_tool_call_masks_follow_the_parser(llm, factory):
    tok, rng = llm.tokenizer, random.Random(2)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

    def complete(text):
        calls = parse_assistant_output(text, list(params)).tool_calls
        return bool(calls) and text.split("\n", 1)[1] == calls[0].arguments and jsonschema.Draft202012Validator(
            params[calls[0].name]).is_valid(json.loads(calls[0].arguments))

    assert sum(_walk(factory, tok, factory.tool_call(TOOLS), complete, rng) is not None for _ in range(6)) >= 3


STRICT_TOOLS = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS[:2]] + [
    # not strict: any arguments object, even where its schema says otherwise
    {"type": "function", "function": {"name": "loose", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]


def _call_complete(tools):
    params = {t["function"]["name"]: (t["function"]["parameters"] if t["function"].get("strict") else
                                      {"type": "object"}) for t in tools}

    def complete(text):
        calls = parse_assistant_output(text, list(params)).tool_calls
        return bool(calls) and text.split("\n", 1)[1] == calls[0].arguments and jsonschema.Draft202012Validator(
            params[calls[0].name]).is_valid(json.loads(calls[0].arguments))
    return complete


def test_call_or_content_masks(llm, factory):
    # tool_choice auto with strict tools: the first token is content's ("\n"-led) or a call's, nothing else; after
    # a content token, free text (a stop id at any point); after a call's, the call grammar to its end, with
    # non-strict functions taking any object.
    tok, rng = llm.tokenizer, random.Random(3)
    first = set(_allowed(factory.call_or_content(STRICT_TOOLS), factory.vocab_size))
    content = set(_allowed(factory.content_only(), factory.vocab_size))
    call = set(_allowed(factory.tool_call(STRICT_TOOLS, strict_only=True), factory.vocab_size))
    assert first == content | call and not content & call and call
    complete = _call_complete(STRICT_TOOLS)
    finished, names = 0, set()
    for _ in range(9):
        c = factory.call_or_content(STRICT_TOOLS)
        pick = rng.choice(sorted(call))
        c.accept(pick)
        data = tok.id_to_token_bytes(pick)
        text = _walk(factory, tok, c, complete, rng, data=data)
        if text is not None:
            finished += 1
            names.add(text.split("\n", 1)[0])
    assert finished >= 5 and len(names) > 1
    c = factory.call_or_content(STRICT_TOOLS)
    c.accept(tok.encode("\n", allow_special=False)[0])
    assert set(_allowed(c, factory.vocab_size)) == set(_allowed(_started(factory.content_only(), tok),
                                                               factory.vocab_size))
    c.accept(tok.encode("{", allow_special=False)[0])  # free text
    assert not c.is_terminated()
    with pytest.raises(ValueError):
        factory.call_or_content(STRICT_TOOLS).accept(tok.encode("{", allow_special=False)[0])  # neither branch


def _started(content, tok):
    content.accept(tok.encode("\n", allow_special=False)[0])
    return content


def test_call_or_content_calls_hold_to_strict_schemas(llm, factory, monkeypatch):
    # The engine with the constraint: the model chooses content or a call, and every call parses and its arguments
    # validate. A bias on the first tokens of the function names (what a
    # trained model asked to call does by itself) makes every answer a call, of more than one function.
    tok, width = llm.tokenizer, llm.engine.model_config.vocab_size
    tools = STRICT_TOOLS[:2]  # (free-form arguments, the loose function's, rarely close under random weights)
    prompt = _prompt(llm, "What is the weather in Paris?", tools)
    names = [t["function"]["name"] for t in tools]
    complete = _call_complete(tools)
    plain = _generate(llm, prompt, lambda: factory.call_or_content(tools), seeds=range(8))
    contents = 0
    for text, ids, finish, _ in plain.values():
        if tok.id_to_token_bytes(ids[0]).startswith(b"\n"):  # content: free text, never parsed as a call
            contents += 1
            assert finish in ("stop", "length") and parse_assistant_output(text, names).tool_calls == []
        else:  # the model chose to call
            assert finish == "stop" and complete(text), (finish, text)
    assert contents
    bias = torch.zeros(width)
    for i in range(tok.vocab_size):
        b = tok.id_to_token_bytes(i)
        if b and not tok.is_special(i) and any(n.encode().startswith(b) for n in names):
            bias[i] = 30.0
    execute = llm.engine.runner.execute
    monkeypatch.setattr(llm.engine.runner, "execute", lambda *a, **k: execute(*a, **k) + bias)
    called = set()
    for text, _, finish, _ in _generate(llm, prompt, lambda: factory.call_or_content(tools),
                                       seeds=range(10)).values():
        assert finish == "stop" and complete(text), (finish, text)
        called.add(parse_assistant_output(text, names).tool_calls[0].name)
    assert len(called) > 1


@pytest.mark.parametrize("text, ok", [
    ('\n{"name": "ab", "age": 3}', True),
    ('\n{"name": "a\tb", "age": 3}', False),  # raw tab in a string: json.loads rejects it
    ('\n{"name": "abcdefghi", "age": 3}', False),  # maxLength 8
    ('\n{"name": "ab", "age": 151}', False),
    ('\n{"age": 3}', False),  # name is required
    ('\n{"name": "ab", "age": 3, "tags": ["a", "c"], "address": {"zip": "12345"}}', True),
    ('{"name": "ab", "age": 3}', False),  # content must start with the separator
])
def test_schema_constraint_agrees_with_jsonschema(llm, factory, text, ok):
    tok = llm.tokenizer
    valid = _loads(text[1:]) is not None and text.startswith("\n") and jsonschema.Draft202012Validator(
        PERSON).is_valid(_loads(text[1:]))
    assert valid == ok  # the reference agrees with the expectation written above
    constraint = factory.json_schema(PERSON)
    try:
        for i in [*tok.encode(text, allow_special=False), tok.stop_token_ids[0]]:
            constraint.accept(i)
        accepted = constraint.is_terminated()
    except ValueError:
        accepted = False
    assert accepted == ok


# ---- errors, cache, optional import ---------------------------------------------------------------------

@pytest.mark.parametrize("schema, words", [
    ({"type": "nonsense"}, "nonsense"),
    ({"type": "object", "properties": 5}, "properties"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
    ({"type": "string", "pattern": "(("}, "parenthesis"),
    ({"$ref": "#/$defs/missing"}, "$defs"),
    ({"enum": []}, "enum"),
    ([{"type": "object"}], "JSON schema object"),
    ({"type": "object", "default": {1, 2}}, "JSON-serialisable"),
])
def test_bad_schema_raises_value_error(factory, schema, words):
    with pytest.raises(ValueError, match="schema") as info:
        factory.json_schema(schema)
    assert words in str(info.value)


@pytest.mark.parametrize("schema, words", [
    ({"not": {"type": "integer"}}, "'not'"),
    ({"allOf": [{"type": "integer"}, {"minimum": 5}]}, "'allOf'"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}},
     "'dependentRequired'"),
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}}},
     "properties.s: 'minLength/maxLength together with pattern'"),
    ({"type": "string", "format": "email", "maxLength": 5}, "format"),
    # each of these compiled, and the grammar then let through output that breaks the schema (the comment)
    ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "'if'"),  # "abcdef"
    ({"type": "array", "contains": {"type": "integer"}}, "'contains'"),  # []
    ({"type": "number", "multipleOf": 0.5}, "multipleOf"),  # 0.3
    ({"multipleOf": 3}, "multipleOf"),  # 4
    ({"$ref": "https://example.com/s.json"}, "https://example.com/s.json"),  # "anything"
    ({"type": "string", "pattern": "^(?!a).$"}, "lookahead"),  # "a"
    ({"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["a"]}, "required a"),  # {"b": 1}
    ({"type": "object", "required": ["a"]}, "required a"),  # {}
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "anyOf": [{"required": ["a"]}]},
     "schema.anyOf[0]: 'required a"),  # {}
])
def test_schema_keywords_the_grammar_cannot_enforce_are_refused(factory, schema, words):
    with pytest.raises(ValueError, match="cannot be enforced") as info:
        factory.json_schema(schema)
    assert words in str(info.value)
    # names that look like keywords are fine as property names, and harmless values pass
    factory.json_schema({"type": "object", "properties": {"not": {"type": "integer"}, "allOf": {"type": "string"}},
                         "required": ["not"]})
    factory.json_schema({"type": "array", "items": {"type": "integer"}, "uniqueItems": False})
    # what the grammar does enforce stays accepted: multipleOf on integers, escaped or bracketed "(?=", '#' refs
    factory.json_schema({"type": ["integer", "null"], "multipleOf": 3})
    factory.json_schema({"type": "string", "pattern": r"^\(?=[(?!]$"})
    factory.json_schema({"$defs": {"p": {"type": "integer"}}, "type": "object",
                         "properties": {"p": {"$ref": "#/$defs/p"}}, "required": ["p"]})


def test_refused_keywords_did_let_broken_output_through(llm, monkeypatch):
    """Why the refusals above exist: with the check skipped these schemas compile, and their matcher takes text
    the schema rejects to the end (a stop token). Fails once xgrammar enforces them: the refusal can go then."""
    from glm_serve import constrain

    monkeypatch.setattr(constrain, "check_enforceable", lambda node, where: None)
    fresh = ConstraintFactory(llm.tokenizer, llm.engine.model_config.vocab_size)  # its cache never sees a refusal
    stop = min(llm.tokenizer.stop_token_ids)
    for schema, text in [({"if": {"type": "string"}, "then": {"maxLength": 2}}, '"abcdef"'),
                         ({"type": "array", "contains": {"type": "integer"}}, "[]"),
                         ({"type": "number", "multipleOf": 0.5}, "0.3"),
                         ({"$ref": "https://example.com/s.json"}, '"anything"'),
                         ({"type": "string", "pattern": "^(?!a).$"}, '"a"'),
                         ({"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["a"]}, '{"b": 1}')]:
        if "$ref" not in schema:  # (jsonschema would fetch the URL)
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(json.loads(text), schema)
        matcher = fresh.json_schema(schema)._matcher
        assert matcher.accept_string("\n" + text) and matcher.accept_token(stop), (schema, text)


@pytest.mark.parametrize("tools, name, words", [
    (TOOLS, "nope", "no function named 'nope'"),
    ([{"type": "python"}], None, "at least one tool of type 'function'"),
    ([], None, "non-empty list"),
    ([{"type": "function", "function": {"name": "a b"}}], None, "whitespace"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None, "object"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": 1}}}],
     None, "tools[0].function.parameters: invalid JSON schema"),
    ([TOOLS[0], TOOLS[0]], None, "duplicate"),
])
def test_bad_tools_raise_value_error(factory, tools, name, words):
    with pytest.raises(ValueError) as info:
        factory.tool_call(tools, name)
    assert words in str(info.value)


def test_accept_rejects_what_the_mask_forbids(llm, factory):
    tok = llm.tokenizer
    brace = tok.encode("{", allow_special=False)[0]
    with pytest.raises(ValueError, match="JSON object"):
        factory.json_object().accept(brace)  # no "\n" separator first
    with pytest.raises(ValueError, match="first token"):
        factory.content_only().accept(brace)
    with pytest.raises(ValueError):
        factory.json_object().accept(factory.vocab_size - 1)  # a padding id
    content = factory.content_only()
    content.accept(tok.encode("\n", allow_special=False)[0])
    content.accept(brace)  # free text after the separator
    with pytest.raises(ValueError):
        content.accept(tok.special_ids["<|assistant|>"])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grammar_that_ends_before_min_tokens_stops(llm, factory, temperature):
    # "\n1" is all the schema allows: then only a stop id fits, and min_tokens must not block it (that left no
    # token at all, and the request failed with "token 0 does not fit the JSON schema constraint").
    stop_ids = set(llm.tokenizer.stop_token_ids)
    params = SamplingParams(temperature=temperature, seed=0, min_tokens=6, max_tokens=20)
    results = _generate(llm, _prompt(llm, "one"), lambda: factory.json_schema({"enum": [1]}), seeds=[0])
    engine = llm.engine
    engine.add_request("min", _prompt(llm, "one"), params, constraints=[factory.json_schema({"enum": [1]})])
    outs = []
    while engine.has_unfinished():
        outs += [c for out in engine.step() for c in out.outputs]
    assert all(c.error is None for c in outs), outs
    ids = [t for c in outs for t in c.token_ids]
    text = "".join(c.text for c in outs)
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason in stop_ids and ids[-1] in stop_ids
    assert json.loads(text[1:]) == 1 and text == results[0][0]


def test_grammar_end_is_a_stop_token_with_ignore_eos(llm, factory):
    # ignore_eos drops the checkpoint's stop ids from the choice's own, but the grammar still ends on one of them:
    # that token is the end, not text. Rendered with skip_special_tokens=False it was appended to the JSON
    # ('{"k": 1}<|observation|>'), which then did not parse.
    stop_ids = set(llm.tokenizer.stop_token_ids)
    schema = {"type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"], "additionalProperties": False}
    engine = llm.engine
    for skip in (True, False):
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, skip_special_tokens=skip)
        engine.add_request(f"eos{skip}", _prompt(llm, "json"), params, constraints=[factory.json_schema(schema)])
        outs = []
        while engine.has_unfinished():
            outs += [c for out in engine.step() for c in out.outputs]
        text = "".join(c.text for c in outs)
        assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason in stop_ids, outs[-1]
        assert outs[-1].token_ids[-1] in stop_ids
        assert text.startswith("\n") and json.loads(text[1:])["k"] in (1, 2), text


def test_same_schema_compiles_once(factory):
    before = factory.num_cached
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}}
    factory.json_schema(schema)
    factory.json_schema(json.loads(json.dumps(schema)))  # equal, not identical
    factory.tool_call(TOOLS[:1])
    factory.tool_call(json.loads(json.dumps(TOOLS[:1])))
    factory.json_object()
    factory.json_object()
    assert factory.num_cached - before <= 3


def test_content_can_end_after_its_separator(llm, factory):
    # tool_choice "none": after the "\n" every text token and every stop id is allowed; without the stop ids
    # the answer could only end at max_tokens (random weights finish "length" anyway, so generation misses it).
    tok = llm.tokenizer
    content = factory.content_only()
    content.accept(tok.encode("\n", allow_special=False)[0])
    allowed = set(_allowed(content, factory.vocab_size))
    assert set(tok.stop_token_ids) <= allowed
    content.accept(tok.stop_token_ids[0])


def test_grammar_cache_keeps_the_most_recently_used(llm, factory, monkeypatch):
    """cache_size grammars stay compiled, and a hit makes its grammar the most recent: A, B, A, C with room
    for two evicts B, not A (each compile costs up to a second on the real vocabulary)."""
    small = ConstraintFactory(llm.tokenizer, factory.vocab_size, cache_size=2)
    compiled = []
    compile_grammar = small._compiler.compile_grammar
    monkeypatch.setattr(small._compiler, "compile_grammar", lambda g: compiled.append(g) or compile_grammar(g))
    schemas = [{"type": "object", "properties": {k: {"type": "integer"}}} for k in "abc"]
    for k in (0, 1, 0, 2, 0):
        small.json_schema(schemas[k])
    assert len(compiled) == 3 and small.num_cached == 2
    small.json_schema(schemas[1])  # B was the one evicted
    assert len(compiled) == 4


def test_whitespace_runs_are_bounded(llm, factory):
    # Without a bound a (random or small) model can spin on blanks until max_tokens, never closing the JSON.
    tok = llm.tokenizer
    space = tok.encode(" ", allow_special=False)
    assert len(space) == 1
    constraint = factory.json_object()
    for i in tok.encode("\n{", allow_special=False):
        constraint.accept(i)
    for _ in range(MAX_WHITESPACE):
        constraint.accept(space[0])
    assert space[0] not in _allowed(constraint, factory.vocab_size)
    with pytest.raises(ValueError):
        constraint.accept(space[0])


def test_factory_checks_vocab_size(llm):
    with pytest.raises(ValueError, match="vocab_size"):
        ConstraintFactory(llm.tokenizer, llm.tokenizer.vocab_size - 1)


def test_works_without_xgrammar(llm, monkeypatch):
    # The engine and this module import without xgrammar; asking for a constraint says what is missing.
    code = ("import sys; sys.modules['xgrammar'] = None; import glm_serve.constrain, glm_serve.engine.engine; "
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    with pytest.raises(ValueError, match="constrained decoding needs xgrammar"):
        ConstraintFactory(llm.tokenizer, llm.engine.model_config.vocab_size)
