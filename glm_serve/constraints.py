"""Owns the per-choice constraint objects the engine masks its logits with (`TokenConstraint`,
glm_serve/engine/outputs.py) and their way across processes: a grammar travels serialized, without the vocabulary,
and is rebuilt against the one the receiving process registered (use_vocabulary). glm_serve/constrain.py builds
them (ConstraintFactory) from JSON schemas, tool lists and guided-decoding specs."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from glm_serve.tokenizer import GlmTokenizer

# Distinct schemas / tool sets kept compiled; compiling costs milliseconds to a second on the real vocabulary.
CACHE_SIZE = 256


def _import_xgrammar():
    try:
        import xgrammar  # noqa: PLC0415 (optional dependency, heavy: imports transformers)
    except ImportError as e:
        raise ValueError("constrained decoding needs xgrammar (JSON mode, JSON schemas, forced tool calls): "
                         f"pip install 'glm-serve[structured]' ({e})") from None
    return xgrammar


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
    whitespace); then whichever it picked, as GrammarConstraint or ContentConstraint do.

    on_hold: called once when the model starts a call (the engine's choice sets it: ChoiceState.grammar_holds):
    from then on the grammar alone ends the text, so a request's stop strings and extra stop ids, which may well
    occur inside the arguments, must not cut the call. (Where a grammar holds the whole answer, prepare_chat
    leaves them out of the request instead.)"""

    __slots__ = ("_call", "_first", "_rest", "_mode", "on_hold")

    def __init__(self, call: GrammarConstraint, first: torch.Tensor, rest: torch.Tensor):
        self._call = call
        self._first = first  # [ceil(V/32)] int32: regular tokens whose bytes start with "\n"
        self._rest = rest  # [ceil(V/32)] int32: every regular token and the stop ids
        self._mode = None  # None (first token to come) | "content" | "call"
        self.on_hold = None

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
        if self._mode is None and self.on_hold is not None:
            self.on_hold()
        self._mode = "call"

    def is_terminated(self) -> bool:
        return self._mode == "call" and self._call.is_terminated()


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
