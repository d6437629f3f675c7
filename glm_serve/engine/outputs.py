"""What the engine hands back: incremental outputs per request, and the per-choice state that produces them
(detokenizer, stop strings, stop ids, constraint, seeded generator)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from glm_serve.engine.sequence import Sequence
from glm_serve.engine.stop import StopChecker
from glm_serve.sampling_params import SamplingParams
from glm_serve.tokenizer import GlmTokenizer, IncrementalDetokenizer


class TokenConstraint(Protocol):
    """Constrained decoding for one choice (JSON, forced tool calls): the engine asks for the allowed tokens
    before each sample and reports the token it picked. Implemented with xgrammar in the API layer."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write row `row` of an int32 [N, ceil(V/32)] xgrammar-layout bitmask (host tensor)."""

    def accept(self, token_id: int) -> None:
        """The sampled token; raises ValueError if the constraint cannot accept it."""

    def is_terminated(self) -> bool:
        """The grammar is complete: the choice ends with finish_reason 'stop'."""


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), descending


@dataclass(slots=True)
class CompletionOutput:
    """One choice's progress in one step (a delta), or in total for `LLM.generate`."""

    index: int
    text: str  # new text since the last output (the whole text in final results)
    token_ids: list[int]  # new token ids since the last output
    logprobs: list[TokenLogprob] | None = None  # per new token, when requested
    # stop | length | content_filter (a SamplingParams.blocked_strings entry) | abort | error | None while running
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id, stop string or blocked string that ended it
    error: str | None = None  # set with finish_reason "error": this choice alone failed


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]  # choices that changed in this step
    finished: bool  # every choice is done
    prompt_tokens: int = 0
    completion_tokens: int = 0  # all choices, so far
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # [num_prompt_tokens] with SamplingParams.prompt_logprobs: entry i is prompt token i's logprob given the
    # tokens before it (entry 0 None). Sent once, in the request's first output after all are computed.
    prompt_logprobs: list[TokenLogprob | None] | None = None


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """One request's consecutive deltas as one: per choice, text, token ids and logprobs concatenated and the
    last finish; counts from the last; the prompt logprobs of the output that carries them. Linear in the
    output (text pieces are joined once)."""
    merged: dict[int, CompletionOutput] = {}
    texts: dict[int, list[str]] = {}
    prompt_logprobs = None
    for out in outputs:
        if out.prompt_logprobs is not None:
            prompt_logprobs = out.prompt_logprobs
        for o in out.outputs:
            m = merged.get(o.index)
            if m is None:
                m = merged[o.index] = CompletionOutput(o.index, "", [])
                texts[o.index] = []
            texts[o.index].append(o.text)
            m.token_ids += o.token_ids
            if o.logprobs is not None:
                if m.logprobs is None:
                    m.logprobs = []
                m.logprobs += o.logprobs
            m.finish_reason = o.finish_reason or m.finish_reason
            m.stop_reason = o.stop_reason if o.stop_reason is not None else m.stop_reason
            m.error = o.error or m.error
    for i, m in merged.items():
        m.text = "".join(texts[i])
    last = outputs[-1]
    return RequestOutput(last.request_id, [merged[i] for i in sorted(merged)], last.finished, last.prompt_tokens,
                         last.completion_tokens, last.cached_tokens, prompt_logprobs)


@dataclass(slots=True)
class ChoiceState:
    """Engine-side state of one choice (one Sequence)."""

    index: int
    seq: Sequence
    detok: IncrementalDetokenizer
    stopper: StopChecker
    stop_ids: frozenset[int]  # the checkpoint's stop ids (unless ignore_eos) plus params.stop_token_ids
    generator: torch.Generator | None
    constraint: TokenConstraint | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    reported: bool = False  # the final output for this choice was sent
    stop_token: bool = False  # finished by a stop token id (which is not text)
    # held requests (RequestState.holds): what was made since the last output, sent in one piece later
    held: tuple[list[int], list[str], list[TokenLogprob]] | None = None  # (token ids, text pieces, logprobs)
    # with blocked strings: logprobs whose token's text is not all out yet, as (characters taken by the stopper at
    # the token's end, lp), and the characters let out so far
    lp_wait: list[tuple[int, TokenLogprob]] | None = None
    lp_emitted: int = 0

    def pass_logprob(self, lp: TokenLogprob | None, emitted: int) -> list[TokenLogprob]:
        """The logprobs to send now, given the one of the token just fed to the stopper, whose text let out
        `emitted` characters. Without blocked strings: `lp` itself. With them, a logprob waits until all of its
        token's text has gone out: a token's text and bytes would otherwise spell out part of a term the stopper
        holds back, and a term it cuts never goes out at all, its tokens' logprobs included. (A stop string's
        tokens keep theirs, as without a filter.)"""
        stopper = self.stopper
        if stopper.blocked is None:
            return [] if lp is None else [lp]
        wait = self.lp_wait
        if wait is None:
            wait = self.lp_wait = []
        out_so_far = self.lp_emitted = self.lp_emitted + emitted
        if stopper.stopped:
            cut = stopper.reason == "content_filter"
            out = [w for end, w in wait if end <= out_so_far or not cut] + ([] if cut or lp is None else [lp])
            wait.clear()
            return out
        if lp is not None:
            wait.append((out_so_far + stopper.held_chars, lp))
        k = 0
        while k < len(wait) and wait[k][0] <= out_so_far:
            k += 1
        out = [w for _, w in wait[:k]]
        del wait[:k]
        return out

    def grammar_holds(self) -> None:
        """The constraint's grammar has taken hold of the text (a strict tool call begun): it alone ends it now.
        Stop strings and stop ids no longer apply (a grammar ends on a checkpoint stop id: LLMEngine._advance);
        blocked strings still do."""
        self.stopper.drop_stop_strings()
        self.stop_ids = frozenset()


@dataclass(slots=True)
class RequestState:
    request_id: str
    params: SamplingParams
    prompt_len: int
    choices: list[ChoiceState] = field(default_factory=list)
    error: str | None = None
    mm: object | None = None  # GLM-4V: the engine's MultiModalPrompt (pixels, span, cached embeddings)
    plain_greedy: bool = False  # sampling is a bare argmax (the sampler's fast path)
    needs_host_tokens: bool = False  # sampling reads the previous token on the host: no overlap scheduling
    # The caller wants the result, not a stream: after the first tokens (time to first token) the engine holds
    # every delta and sends it all in the request's final output (LLM.generate, non-streaming API requests).
    final_only: bool = False
    holds: bool = False  # after the first output, deltas are held: final_only, or a stream_interval above 1
    started: bool = False  # an output with tokens has gone out
    forgotten: bool = False  # its final output went out and the engine let go of it (LLMEngine._forget)
    # Complete prompt logprobs not sent yet (RequestOutput.prompt_logprobs): set by the engine when the last
    # of them lands, taken by the next output of the request.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> tuple[int, int, int]:
        completion = sum(c.seq.num_output_tokens for c in self.choices)
        cached = self.choices[0].seq.num_cached_tokens if self.choices else 0
        return self.prompt_len, completion, cached


def make_choice(index: int, seq: Sequence, tokenizer: GlmTokenizer, params: SamplingParams,
                checkpoint_stop_ids: list[int], generator: torch.Generator | None,
                constraint: TokenConstraint | None) -> ChoiceState:
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids.update(checkpoint_stop_ids)
    choice = ChoiceState(
        index=index,
        seq=seq,
        detok=IncrementalDetokenizer(tokenizer, seq.prompt_token_ids, params.skip_special_tokens),
        stopper=StopChecker(params.stop, params.include_stop_str, params.min_tokens, params.blocked_strings),
        stop_ids=frozenset(stop_ids),
        generator=generator,
        constraint=constraint,
    )
    if constraint is not None and hasattr(constraint, "on_hold"):  # a grammar that may take hold mid-answer
        constraint.on_hold = choice.grammar_holds
    return choice
