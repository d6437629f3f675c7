"""Owns turning landed tokens into RequestOutputs: detokenization, stop (and blocked) strings, per-choice deltas,
the final report of each request. Mixed into LLMEngine, whose step calls `_emit` while the device runs the next step.

Reads the engine's `requests`; calls back its `_finish`, `_fail` and `_forget`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from glm_serve.engine.outputs import CompletionOutput, RequestOutput, RequestState

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """A landed step whose text and outputs are not emitted yet (see LLMEngine.step)."""

    tokens: list = field(default_factory=list)  # (request, its ChoiceState, token id, TokenLogprob | None)
    touched: list = field(default_factory=list)  # requests to report whole: failed, or finished by the scheduler


class OutputEmitter:
    """LLMEngine's output side (see the module docstring)."""

    def _emit(self, pending: Pending | None) -> list[RequestOutput]:
        """Detokenize, match stop strings and build the outputs of a landed step."""
        if pending is None:
            return []
        outputs: list[RequestOutput] = []
        # Requests with n > 1 or a failure: request id -> (request, {choice: (token ids, text, logprobs)}),
        # collected once at the end. Single-choice requests (the common case) are emitted directly.
        touched: dict[str, tuple[RequestState, dict]] = {r.request_id: (r, {}) for r in pending.touched}
        live = self.requests
        for req, c, token, lp in pending.tokens:
            if req.forgotten:
                continue  # aborted since: its final output has gone out already
            rid = req.request_id
            try:
                if c.finish_reason is None:  # still generating (the common case, inlined): text, stop strings
                    text = c.detok.add(token)
                    if c.stopper.active:
                        text, stopped = c.stopper.feed(text)
                        if stopped:  # "stop", or "content_filter" for a blocked string
                            self._finish(c, c.stopper.reason, stop_reason=c.stopper.matched)
                else:  # this token ended the choice
                    text = self._text(c, token)
            except Exception as e:  # noqa: BLE001
                log.exception("request %s failed while detokenizing", req.request_id)
                req.error = f"{type(e).__name__}: {e}"
                self._fail(req)
                touched.setdefault(req.request_id, (req, {}))
                continue
            # (with blocked strings, a token's logprob may wait for its text: ChoiceState.pass_logprob)
            lps = None if req.params.logprobs is None else c.pass_logprob(lp, len(text))
            if req.started and req.holds:  # held until the request finishes, or for stream_interval tokens
                held = c.held  # (token ids, text pieces, logprobs) since the last output
                if held is None:
                    held = c.held = ([], [], [])
                held[0].append(token)
                held[1].append(text)
                if lps:
                    held[2].extend(lps)
                if ((c.finish_reason is not None and req.finished)
                        or (not req.final_only and len(held[0]) >= self.config.stream_interval)):
                    touched.setdefault(rid, (req, {}))  # _collect sends what every choice holds
                continue
            if len(req.choices) == 1 and (not touched or rid not in touched):
                reason = c.finish_reason
                seq = c.seq
                outputs.append(RequestOutput(
                    rid, [CompletionOutput(0, text, [token], lps, reason, c.stop_reason, None)],
                    reason is not None, req.prompt_len, len(seq.output_token_ids), seq.num_cached_tokens,
                    req.prompt_logprobs))
                req.prompt_logprobs = None  # sent once
                req.started = True
                if reason is not None:
                    c.reported = True
                    self._forget(req)
                continue
            entry = touched.get(rid)
            if entry is None:
                entry = touched[rid] = (req, {})
            entry[1][c.index] = ([token], text, lps or [])
        for req, d in touched.values():
            if live.get(req.request_id) is req:
                out = self._collect(req, d)
                if out is not None:
                    outputs.append(out)
        return outputs

    def _text(self, c, token: int) -> str:
        """The text the token that finished choice c adds (stop token, length, constraint), after stop strings
        and with what they held back; a stop string found here still wins over the other reasons."""
        if c.stopper.stopped:
            return ""
        # The stop token itself is not text; release what was held back.
        text, stopped = ("", False) if c.stop_token else c.stopper.feed(c.detok.add(token))
        if not stopped:
            # The detokenizer's last bytes (an unfinished character, as U+FFFD) are text too: a stop string can
            # end in them, and then it cut the text, so the finish must name it as well.
            tail, stopped = c.stopper.feed(c.detok.flush(), token=False)
            text += tail + c.stopper.flush()
        if stopped:  # wins over a length or stop-id finish decided for the same token
            c.finish_reason, c.stop_reason = c.stopper.reason, c.stopper.matched
        return text

    def _collect(self, req: RequestState, deltas: dict) -> RequestOutput | None:
        """The step's RequestOutput for one request: its choices that changed (with what they held), or finished
        unreported. A final_only request that has started reports nothing until it finishes."""
        if req.final_only and req.started and not req.finished:
            return None  # (deltas is empty: a started holding request's tokens go to its choices' `held`)
        outs = []
        want_lp = req.params.logprobs is not None
        finished = True
        completion = 0
        for i, c in enumerate(req.choices):
            completion += len(c.seq.output_token_ids)
            reason = c.finish_reason
            if reason is None:
                finished = False
            d = deltas.get(i)
            if c.held is not None:
                d = _take_held(c, d)
            if d is None:
                if reason is None or c.reported:
                    continue
                d = ([], "", [])
            outs.append(CompletionOutput(c.index, d[1], d[0], d[2] if want_lp else None, reason, c.stop_reason,
                                         req.error if reason == "error" else None))
            if reason is not None:
                c.reported = True
            if d[0]:
                req.started = True
        if finished:
            self._forget(req)
        cached = req.choices[0].seq.num_cached_tokens
        prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None  # sent once
        return RequestOutput(req.request_id, outs, finished, req.prompt_len, completion, cached, prompt_logprobs)


def _take_held(c, delta: tuple | None) -> tuple[list[int], str, list]:
    """What choice c held, followed by this step's delta, as one delta (token ids, text, logprobs)."""
    ids, texts, lps = c.held
    c.held = None
    if delta is not None:
        ids, lps = ids + delta[0], lps + delta[2]
        texts.append(delta[1])
    return ids, "".join(texts), lps
