"""Checks for test_engine_fuzz.py that do not compare the engine with itself: the text a choice should have,
from a one-shot decode of its tokens and the documented stop rules (engine/stop.py), and greedy tokens from the
naive one-sequence loop (model/simple.py). A bug shared by the fuzzed engine and the run alone is invisible to
the differential check; these see it."""

from __future__ import annotations

import codecs

from glm_serve.engine.outputs import CompletionOutput
from glm_serve.model.simple import generate_simple
from glm_serve.sampling_params import SamplingParams
from glm_serve.tokenizer import GlmTokenizer


def _prompt_ends_clean(tok: GlmTokenizer, prompt: list[int], skip: bool) -> bool:
    """Whether the prompt's bytes end on a character boundary (else the output's first bytes complete its last
    character, and that character is output text: IncrementalDetokenizer)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(b"".join(tok._piece(t, skip) for t in prompt[-4:]))
    return not decoder.buffer


def expected_text(tok: GlmTokenizer, prompt: list[int], params: SamplingParams, c: CompletionOutput) -> str | None:
    """The text choice c must have, given its tokens and finish; None where this oracle does not apply (a
    prompt ending inside a character, a stop string under min_tokens, a constraint's end, an abort)."""
    skip = params.skip_special_tokens
    if not _prompt_ends_clean(tok, prompt, skip):
        return None
    ids = c.token_ids
    reason, why = c.finish_reason, c.stop_reason
    if reason == "length" or (reason == "stop" and why is None):  # max_tokens, window, or a constraint's end
        return tok.decode(ids, skip) if reason == "length" else None
    if reason == "stop" and isinstance(why, int):  # a stop id: everything before it, nothing of it
        return tok.decode(ids[:-1], skip)
    if reason == "stop" and isinstance(why, str):
        if params.min_tokens > 1:
            return None
        if ids and ids[-1] in _stop_ids(tok, params):  # the string ended in what the stop id's finish flushed
            ids = ids[:-1]
        full = tok.decode(ids, skip)
        # Where a stop string first ENDS in the text; ties to the longest (engine/stop.py).
        end, start, stop = min((full.find(s) + len(s), full.find(s), s) for s in params.stop if s in full)
        assert stop == why, f"stopped on {why!r}, but {stop!r} ends first in {full!r}"
        return full[:end] if params.include_stop_str else full[:start]
    return None


def check_text(tok: GlmTokenizer, rid: str, prompt: list[int], params: SamplingParams,
               choices: list[CompletionOutput]) -> int:
    """Each choice's text against expected_text; an aborted choice's text must begin the decode of its tokens.
    -> how many choices were checked."""
    checked = 0
    for c in choices:
        if c.finish_reason == "abort":
            if _prompt_ends_clean(tok, prompt, params.skip_special_tokens):
                full = tok.decode(c.token_ids, params.skip_special_tokens)
                assert full.startswith(c.text), f"{rid} choice {c.index}: {c.text!r} does not begin {full!r}"
            continue
        want = expected_text(tok, prompt, params, c)
        if want is not None:
            assert c.text == want, f"{rid} choice {c.index} ({c.finish_reason}, {c.stop_reason!r})"
            checked += 1
    return checked


def _stop_ids(tok: GlmTokenizer, params: SamplingParams) -> set[int]:
    """The ids that end a choice (outputs.make_choice)."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(tok.stop_token_ids))


def check_stop_ids(tok: GlmTokenizer, rid: str, params: SamplingParams, choices: list[CompletionOutput]) -> None:
    """A stop id ends its choice: it is never among the tokens but as the last one, with finish "stop" and that
    id as the reason; and never among the first min_tokens tokens (the sampler masks it). Not for constrained
    choices (a grammar may end on a stop id before min_tokens)."""
    stops = _stop_ids(tok, params)
    for c in choices:
        ids = c.token_ids
        at = [i for i, t in enumerate(ids) if t in stops]
        where = f"{rid} choice {c.index}: stop ids at {at} of {len(ids)} ({c.finish_reason}, {c.stop_reason!r})"
        if c.finish_reason == "stop" and isinstance(c.stop_reason, int):
            assert at and at[0] == len(ids) - 1 and c.stop_reason == ids[-1], where
            assert len(ids) > params.min_tokens, where
        elif c.finish_reason == "stop" and c.stop_reason is not None:  # a stop string, maybe ending in what a
            assert not at or at == [len(ids) - 1], where  # stop id's finish flushed (emit.py _text)
        else:  # a stop id would have ended the choice before the length or an abort did
            assert not at, where


def plain_greedy(params: SamplingParams, constrained: bool) -> bool:
    """Tokens that are the bare argmax of the model's logits: no penalties, min_tokens or constraint."""
    return (params.greedy and not params.uses_penalties and params.min_tokens == 0 and not params.logit_bias
            and not constrained)


def check_greedy(model, rid: str, prompt: list[int], choices: list[CompletionOutput]) -> None:
    """A plain greedy choice's tokens are the naive loop's, whatever ended it."""
    longest = max((len(c.token_ids) for c in choices), default=0)
    if not longest:
        return
    want = generate_simple(model, prompt, longest)
    for c in choices:
        assert c.token_ids == want[:len(c.token_ids)], f"{rid} choice {c.index}: not the naive loop's tokens"
