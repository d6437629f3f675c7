"""Owns constrained decoding: the xgrammar grammars for JSON mode, JSON schemas and forced GLM-4 tool calls, and
the per-choice `TokenConstraint` objects (glm_serve/engine/outputs.py) the engine masks its logits with.

What each constraint makes the model write (the text after `<|assistant|>`, glm4.md "Chat format"):

    json_object()        "\\n" + any JSON object                  + a stop token   (content)
    json_schema(schema)  "\\n" + JSON valid under `schema`        + a stop token   (content)
    tool_call(tools)     "name\\n" + arguments valid under the
                         function's `parameters`                 + a stop token   (a GLM tool call)
    content_only()       "\\n..." then free text                  until a stop token
    call_or_content(tools)  either of the last two: the model picks (tool_choice auto with `strict` tools)
    call_or_json(tools, schema)  a tool call or JSON content: the model picks (tool_choice auto beside JSON mode)
    guided(kind, spec)   vLLM's guided decoding: text matching a JSON schema, a regex, or one of a list of
                         strings, + a stop token; as content ("\\n" first) or bare (/v1/completions)

xgrammar is optional: this module imports it only when a `ConstraintFactory` is built, so the engine and the
server run without it (requests that need a constraint then get a clear ValueError).

The xgrammar vocabulary is our own: each regular id maps to its raw token bytes, every added token (specials
such as <|user|>, [gMASK], image markers) maps to b"" so xgrammar treats it as a control token that no grammar
can produce, and the stop ids are the tokenizer's. Ids from the tokenizer's size up to the model's padded
logits width exist only in the mask, never in the vocabulary, so they are always disallowed.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import torch

from glm_serve.constraints import (
    CACHE_SIZE,
    CallOrContentConstraint,
    ContentConstraint,
    GrammarConstraint,
    _import_xgrammar,
    _tokenizer_info,
)
from glm_serve.schema_rules import check_enforceable, has_lookaround, strict_string_lengths
from glm_serve.tokenizer import GlmTokenizer

# Longest whitespace run allowed between JSON tokens. Unbounded runs let a model (a small or random one above
# all) spin on newlines forever; 32 still fits pretty-printed JSON indented 4 spaces at depth 7.
MAX_WHITESPACE = 32

_XGR_LOCATION = re.compile(r"^\[[^\]]*\]\s*[^\s:]+:\d+:\s*")  # "[03:22:11] /project/cpp/x.cc:49: " prefix


def _xgr_message(e: Exception) -> str:
    """xgrammar's C++ errors carry a timestamp and source location; keep the sentence a user can act on."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return _XGR_LOCATION.sub("", lines[0]) if lines else type(e).__name__


def _ebnf_literal(text: str) -> str:
    """`text` as a quoted EBNF (GBNF) string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """bool [V] -> int32 [ceil(V/32)] in xgrammar's layout: bit j of word w allows token 32w+j."""
    words = (allowed.numel() + 31) // 32
    padded = torch.zeros(words * 32, dtype=torch.int64)
    padded[:allowed.numel()] = allowed.to(torch.int64)
    packed = (padded.view(words, 32) << torch.arange(32, dtype=torch.int64)).sum(-1)  # [words], 0 .. 2^32-1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # same bits, two's complement


def _function_tools(tools: Any, name: str | None, strict_only: bool = False) -> list[tuple[int, str, dict]]:
    """(index in tools, name, parameters schema) of the function tools a forced call may use, validated.
    strict_only: a function without `strict: true` gets {"type": "object"} (any arguments object) as its schema."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools: a forced tool call needs a non-empty list of tools")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"tool_choice.function.name must be a non-empty string, got {name!r}")
    found: dict[str, tuple[int, str, dict]] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}] must be an object")
        if tool.get("type", "function") != "function":
            continue  # built-in tools (python, simple_browser...) do not answer in JSON arguments
        fn = tool.get("function")
        fn_name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(fn_name, str) or not fn_name:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        if any(c.isspace() for c in fn_name):  # the GLM call syntax `name\n{...}` cannot carry it back
            raise ValueError(f"tools[{i}].function.name must not contain whitespace, got {fn_name!r}")
        if fn_name in found:
            raise ValueError(f"tools[{i}].function.name: duplicate function name {fn_name!r}")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object"}
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        if params.get("type", "object") != "object":
            raise ValueError(f"tools[{i}].function.parameters must describe an object (type 'object'), "
                             f"got type {params.get('type')!r}")
        if strict_only and fn.get("strict") is not True:
            params = {"type": "object"}
        found[fn_name] = (i, fn_name, params)
    if not found:
        raise ValueError("tools: a forced tool call needs at least one tool of type 'function'")
    if name is not None:
        if name not in found:
            raise ValueError(f"tool_choice: no function named {name!r} in tools "
                             f"(have: {', '.join(sorted(found))})")
        return [found[name]]
    return list(found.values())


class ConstraintFactory:
    """Builds per-choice constraints for one checkpoint. Build once per engine (the vocabulary scan and the
    compiled grammars are shared); methods are thread-safe and return fresh objects, one per choice.

    vocab_size: the model's logits width (`model_config.vocab_size`, padded beyond the tokenizer)."""

    def __init__(self, tokenizer: GlmTokenizer, vocab_size: int, cache_size: int = CACHE_SIZE):
        self._xgr = xgr = _import_xgrammar()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < tokenizer.vocab_size:
            raise ValueError(f"vocab_size must be an integer >= the tokenizer's {tokenizer.vocab_size} tokens "
                             f"(the model's padded logits width), got {vocab_size!r}")
        self.vocab_size = vocab_size
        info, vocab, stop_ids = _tokenizer_info(xgr, tokenizer, vocab_size)
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)  # we cache whole grammars below
        self._cache: OrderedDict[str, Any] = OrderedDict()  # key -> CompiledGrammar, least recently used first
        self._cache_size = cache_size
        self._lock = threading.Lock()
        padding = [False] * (vocab_size - len(vocab))
        text = torch.tensor([bool(b) for b in vocab] + padding)  # [V] bool
        newline = torch.tensor([b.startswith(b"\n") for b in vocab] + padding)  # [V] bool
        text[stop_ids] = True
        self._content_first = _pack_bits(newline)  # [ceil(V/32)] int32
        self._content_rest = _pack_bits(text)  # [ceil(V/32)] int32

    # ---- per-choice constraints -------------------------------------------------------------------------

    def json_object(self) -> GrammarConstraint:
        """Content that is one JSON object: `json.loads(text[1:])` gives a dict."""
        compiled = self._compiled("json_object", lambda: self._content_grammar(
            self._schema_grammar({"type": "object"}, "schema")))
        return GrammarConstraint(self._xgr.GrammarMatcher(compiled), "JSON object", compiled)

    def json_schema(self, schema: dict) -> GrammarConstraint:
        """Content that is JSON valid under `schema` (OpenAI response_format json_schema.schema)."""
        if not isinstance(schema, dict):
            raise ValueError(f"schema must be a JSON schema object, got {type(schema).__name__}")
        key = "json_schema:" + self._dumps(schema, "schema")
        compiled = self._compiled(key, lambda: self._content_grammar(self._schema_grammar(schema, "schema")))
        return GrammarConstraint(self._xgr.GrammarMatcher(compiled), "JSON schema", compiled)

    def tool_call(self, tools: list[dict], name: str | None = None, strict_only: bool = False) -> GrammarConstraint:
        """A GLM tool call `name\\n{arguments}`: one of the function tools (exactly `name` when given), its
        arguments valid under the function's `parameters` ({"type": "object"} when missing, and with strict_only
        for a function without `strict: true`)."""
        functions = _function_tools(tools, name, strict_only)
        key = "tool_call:" + self._dumps([(fn_name, params) for _, fn_name, params in functions], "tools")

        def build():
            calls = self._call_grammars(functions)
            return calls[0] if len(calls) == 1 else self._xgr.Grammar.union(*calls)

        compiled = self._compiled(key, build)
        return GrammarConstraint(self._xgr.GrammarMatcher(compiled), "tool call", compiled)

    def call_or_json(self, tools: list[dict], schema: dict | None) -> GrammarConstraint:
        """tool_choice "auto" beside response_format JSON: the model may still call a function (as call_or_content
        holds one: a `strict` function's schema, any arguments object for the others), or answer with content that
        is JSON valid under `schema` (any object when None). Agent frameworks send both: tools, and the typed
        final answer they parse."""
        functions = _function_tools(tools, None, strict_only=True)
        body = {"type": "object"} if schema is None else schema
        key = "call_or_json:" + self._dumps([[(fn_name, params) for _, fn_name, params in functions], body], "schema")

        def build():
            content = self._content_grammar(self._schema_grammar(body, "schema"))
            return self._xgr.Grammar.union(*self._call_grammars(functions), content)

        compiled = self._compiled(key, build)
        return GrammarConstraint(self._xgr.GrammarMatcher(compiled), "tool call or JSON", compiled)

    def guided(self, kind: str, spec: Any, content: bool = True) -> GrammarConstraint:
        """vLLM's guided decoding (api/guided.py reads the request): kind "json" (spec: a JSON schema), "regex" (a
        pattern the whole text matches) or "choice" (a list of strings: exactly one of them). content: GLM chat
        content, which starts with "\\n"; False for a completion's bare text."""
        if kind == "json" and content:
            return self.json_schema(spec)
        if kind == "json":
            make = lambda: self._schema_grammar(spec, "schema")  # noqa: E731
            key = "json:" + self._dumps(spec, "schema")
        elif kind == "regex":
            if has_lookaround(spec):  # xgrammar would drop the lookahead and let anything through there
                raise ValueError("lookahead (?= or (?! cannot be enforced by constrained decoding")
            make = lambda: self._regex_grammar(spec)  # noqa: E731
            key = "regex:" + spec
        elif kind == "choice":
            make = lambda: self._xgr.Grammar.from_ebnf("root ::= " + " | ".join(map(_ebnf_literal, spec)))  # noqa: E731
            key = "choice:" + self._dumps(spec, "choice")
        else:
            raise ValueError(f"guided decoding kind must be json, regex or choice, got {kind!r}")
        compiled = self._compiled(f"{key}:{content}", lambda: self._content_grammar(make()) if content else make())
        return GrammarConstraint(self._xgr.GrammarMatcher(compiled), f"guided {kind}", compiled)

    def call_or_content(self, tools: list[dict]) -> CallOrContentConstraint:
        """tool_choice "auto" with `strict: true` function tools: content, or a call whose arguments are valid under
        its function's schema (a function without `strict` takes any arguments object)."""
        return CallOrContentConstraint(self.tool_call(tools, strict_only=True), self._content_first,
                                       self._content_rest)

    def content_only(self) -> ContentConstraint:
        """tool_choice "none": the answer is content (starts with "\\n"), never a call."""
        return ContentConstraint(self._content_first, self._content_rest)

    # ---- grammars ---------------------------------------------------------------------------------------

    @staticmethod
    def _dumps(value: Any, where: str) -> str:
        try:  # key order is kept: xgrammar emits properties in the schema's declared order
            return json.dumps(value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: not JSON-serialisable ({e})") from None

    def _call_grammars(self, functions: list[tuple[int, str, dict]]) -> list:
        """One grammar per function (_function_tools' triples): `name\n` then its arguments."""
        xgr = self._xgr
        return [xgr.Grammar.concat(xgr.Grammar.from_ebnf("root ::= " + _ebnf_literal(fn_name + "\n")),
                                   self._schema_grammar(params, f"tools[{i}].function.parameters"))
                for i, fn_name, params in functions]

    def _schema_grammar(self, schema: dict, where: str):
        check_enforceable(schema, where)
        text = self._dumps(strict_string_lengths(schema), where)
        try:
            return self._xgr.Grammar.from_json_schema(text, any_whitespace=True,
                                                      max_whitespace_cnt=MAX_WHITESPACE, strict_mode=True)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: invalid JSON schema: {_xgr_message(e)}") from None

    def _regex_grammar(self, pattern: str):
        try:
            return self._xgr.Grammar.from_regex(pattern)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"invalid regex: {_xgr_message(e)}") from None

    def _content_grammar(self, body):
        """GLM content: the "\\n" separator, then `body`."""
        xgr = self._xgr
        return xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= "\\n"'), body)

    def _compiled(self, key: str, build):
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        # Compile outside the lock: a slow schema must not hold up requests whose grammar is cached. Two
        # threads racing on one new key both compile; the result is the same.
        try:
            compiled = self._compiler.compile_grammar(build())
        except RuntimeError as e:
            raise ValueError(f"cannot compile the constraint grammar: {_xgr_message(e)}") from None
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    @property
    def num_cached(self) -> int:
        """Compiled grammars held (tests check that one schema compiles once)."""
        return len(self._cache)
