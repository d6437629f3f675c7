"""Owns constrained decoding: the xgrammar grammars for JSON mode, JSON schemas and forced GLM-4 tool calls, and
the per-choice `TokenConstraint` objects (glm_serve/engine/outputs.py) the engine masks its logits with.

What each constraint makes the model write (the text after `<|assistant|>`, glm4.md "Chat format"):

    json_object()        "\\n" + any JSON object                  + a stop token   (content)
    json_schema(schema)  "\\n" + JSON valid under `schema`        + a stop token   (content)
    tool_call(tools)     "name\\n" + arguments valid under the
                         function's `parameters`                 + a stop token   (a GLM tool call)
    content_only()       "\\n..." then free text                  until a stop token
    call_or_content(tools)  either of the last two: the model picks (tool_choice auto with `strict` tools)
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

from glm_serve.schema_rules import check_enforceable, has_lookaround, strict_string_lengths
from glm_serve.tokenizer import GlmTokenizer

# Longest whitespace run allowed between JSON tokens. Unbounded runs let a model (a small or random one above
# all) spin on newlines forever; 32 still fits pretty-printed JSON indented 4 spaces at depth 7.
MAX_WHITESPACE = 32
# Distinct schemas / tool sets kept compiled; compiling costs milliseconds to a second on the real vocabulary.
CACHE_SIZE = 256

_XGR_LOCATION = re.compile(r"^\[[^\]]*\]\s*[^\s:]+:\d+:\s*")  # "[03:22:11] /project/cpp/x.cc:49: " prefix


def _import_xgrammar():
    try:
        import xgrammar  # noqa: PLC0415 (optional dependency, heavy: imports transformers)
    except ImportError as e:
        raise ValueError("constrained decoding needs xgrammar (JSON mode, JSON schemas, forced tool calls): "
                         f"pip install 'glm-serve[structured]' ({e})") from None
    return xgrammar


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


class GrammarConstraint:
    """One choice held to one compiled grammar: wraps an xgrammar GrammarMatcher. After the grammar is
    complete only the stop ids are allowed; accepting one terminates the matcher (and the choice).

    Picklable before its first token (`glm-serve serve --engine-process` sends it to the engine's process): it
    travels as the grammar's serialized form, which leaves out the vocabulary (megabytes for GLM-4's); the
    receiving process rebuilds it against the vocabulary registered there (use_vocabulary)."""

    __slots__ = ("_matcher", "_what", "_compiled")

    def __init__(self, matcher, what: str, compiled=None):
        self._matcher = matcher
        self._what = what  # for error messages: "JSON object", "JSON schema", "tool call"
        self._compiled = compiled  # the xgrammar CompiledGrammar the matcher runs (for pickling)

    def __reduce__(self):
        if self._compiled is None:
            raise TypeError("this GrammarConstraint was built without its compiled grammar: it cannot be sent")
        return _grammar_constraint, (self._compiled.serialize_json(), self._what)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        # bitmask: [N, ceil(V/32)] int32 on the host; xgrammar writes row `row` in place.
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(int(token_id)):
            raise ValueError(f"token {token_id} does not fit the {self._what} constraint")

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()


class ContentConstraint:
    """tool_choice "none": the first token must start with "\\n" (GLM's content separator, so the answer is
    content, not `name\\n{...}`); after it, free text. Two fixed rows copied per step: no grammar needed."""

    __slots__ = ("_first", "_rest", "_started")

    def __init__(self, first: torch.Tensor, rest: torch.Tensor):
        self._first = first  # [ceil(V/32)] int32: regular tokens whose bytes start with "\n"
        self._rest = rest  # [ceil(V/32)] int32: every regular token and the stop ids
        self._started = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].copy_(self._rest if self._started else self._first)

    def accept(self, token_id: int) -> None:
        mask = self._rest if self._started else self._first
        t = int(token_id)
        if not (0 <= t < mask.numel() * 32 and (int(mask[t >> 5]) >> (t & 31)) & 1):
            where = "after the content separator" if self._started else "as the first token of content"
            raise ValueError(f"token {token_id} is not allowed {where}")
        self._started = True

    def is_terminated(self) -> bool:
        return False  # free text ends at a stop id, which the engine handles


class CallOrContentConstraint:
    """tool_choice "auto" with `strict` function tools: the model still chooses between content and a call, by
    its first token, and a call it starts is held to its grammar (arguments valid under the function's schema).
    First token: the call grammar's allowed tokens or a "\\n"-led one (disjoint: a function name has no
    whitespace); then whichever it picked, as GrammarConstraint or ContentConstraint do."""

    __slots__ = ("_call", "_first", "_rest", "_mode")

    def __init__(self, call: GrammarConstraint, first: torch.Tensor, rest: torch.Tensor):
        self._call = call
        self._first = first  # [ceil(V/32)] int32: regular tokens whose bytes start with "\n"
        self._rest = rest  # [ceil(V/32)] int32: every regular token and the stop ids
        self._mode = None  # None (first token to come) | "content" | "call"

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self._mode == "content":
            bitmask[row].copy_(self._rest)
            return
        self._call.fill_bitmask(bitmask, row)
        if self._mode is None:
            bitmask[row].bitwise_or_(self._first)

    def accept(self, token_id: int) -> None:
        t = int(token_id)
        if self._mode is None and 0 <= t < self._first.numel() * 32 and (int(self._first[t >> 5]) >> (t & 31)) & 1:
            self._mode = "content"
            return
        if self._mode == "content":
            if not (0 <= t < self._rest.numel() * 32 and (int(self._rest[t >> 5]) >> (t & 31)) & 1):
                raise ValueError(f"token {token_id} is not allowed after the content separator")
            return
        self._call.accept(t)  # raises ValueError for a token neither branch allows
        self._mode = "call"

    def is_terminated(self) -> bool:
        return self._mode == "call" and self._call.is_terminated()


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


def _tokenizer_info(xgr, tokenizer: GlmTokenizer, vocab_size: int):
    """xgrammar's view of our vocabulary (see the module docstring). -> (TokenizerInfo, token bytes, stop ids)."""
    added = set(tokenizer.special_ids.values())
    stop_ids = sorted({t for t in tokenizer.stop_token_ids if 0 <= t < tokenizer.vocab_size})
    if not stop_ids:
        raise ValueError("the tokenizer has no stop token ids: constrained output could never end")
    vocab = [b"" if i in added else tokenizer.id_to_token_bytes(i) for i in range(tokenizer.vocab_size)]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop_ids)
    return info, vocab, stop_ids


class _Vocabulary:
    """This process's vocabulary for rebuilding grammars sent from another process (use_vocabulary), built on the
    first one; and the grammars rebuilt lately, by their serialized form (a schema repeats across requests)."""

    def __init__(self) -> None:
        self.source: tuple[GlmTokenizer, int] | None = None
        self.info = None
        self.grammars: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()


_VOCAB = _Vocabulary()


def use_vocabulary(tokenizer: GlmTokenizer, vocab_size: int) -> None:
    """Register the vocabulary that GrammarConstraints unpickled in this process run against (the engine's
    process calls it at start; the grammars' senders built theirs from the same checkpoint)."""
    with _VOCAB.lock:
        _VOCAB.source, _VOCAB.info = (tokenizer, vocab_size), None
        _VOCAB.grammars.clear()


def _grammar_constraint(serialized: str, what: str) -> GrammarConstraint:
    """Unpickling a GrammarConstraint: its grammar against this process's vocabulary, and a fresh matcher."""
    xgr = _import_xgrammar()
    with _VOCAB.lock:
        if _VOCAB.source is None:
            raise ValueError("no vocabulary registered in this process for constraints (constrain.use_vocabulary)")
        if _VOCAB.info is None:
            _VOCAB.info = _tokenizer_info(xgr, *_VOCAB.source)[0]
        compiled = _VOCAB.grammars.get(serialized)
        if compiled is None:
            compiled = _VOCAB.grammars[serialized] = xgr.CompiledGrammar.deserialize_json(serialized, _VOCAB.info)
            while len(_VOCAB.grammars) > CACHE_SIZE:
                _VOCAB.grammars.popitem(last=False)
        _VOCAB.grammars.move_to_end(serialized)
    return GrammarConstraint(xgr.GrammarMatcher(compiled), what, compiled)


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
            xgr = self._xgr
            calls = [xgr.Grammar.concat(xgr.Grammar.from_ebnf("root ::= " + _ebnf_literal(fn_name + "\n")),
                                        self._schema_grammar(params, f"tools[{i}].function.parameters"))
                     for i, fn_name, params in functions]
            return calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)

        compiled = self._compiled(key, build)
        return GrammarConstraint(self._xgr.GrammarMatcher(compiled), "tool call", compiled)

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
