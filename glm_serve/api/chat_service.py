"""Running a prepared chat on the AsyncEngine, for both schemas: engine deltas -> parsed choice updates ->
one JSON body, or an SSE stream. Also: aborting a request whose client went away, and finish-reason mapping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request

from glm_serve.api.context import ServingContext
from glm_serve.api.errors import APIError, internal_error_message
from glm_serve.api.metrics import RequestTimer
from glm_serve.api.params import PreparedChat
from glm_serve.api.parser import ChoiceParser, Delta, assemble
from glm_serve.api.responses import (
    VENDOR,
    ChoiceResult,
    Usage,
    chat_body,
    chat_chunk,
    chat_logprobs,
    delta_dict,
    sse,
    stream_error,
    usage_chunk,
)
from glm_serve.engine.async_engine import EngineStoppedError, Interrupted
from glm_serve.engine.outputs import TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class ChoiceUpdate:
    index: int
    deltas: list[Delta]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # the API's finish reason once the choice is done
    error: str | None = None  # the engine failed this choice


@dataclass
class Meta:
    """Identity of one API response."""

    flavor: str  # vendor | openai
    response_id: str
    request_id: str
    created: int
    model: str  # echoed as the client named it
    owner: str | None = None  # the api key id it is made for (per-key usage in /metrics); None without keys


def api_finish_reason(flavor: str, engine_reason: str, is_call: bool, context_full: bool) -> str:
    if engine_reason == "content_filter":  # a blocked string (--blocked-words), in a call's arguments too
        return "sensitive" if flavor == VENDOR else "content_filter"
    if engine_reason == "stop" and is_call:
        return "tool_calls"
    if engine_reason == "length" and context_full and flavor == VENDOR:
        return "model_context_window_exceeded"
    if engine_reason in ("error", "abort"):
        return "network_error" if flavor == VENDOR else "error"
    return engine_reason


async def run_chat(ctx: ServingContext, prep: PreparedChat, flavor: str, engine_rid: str,
                   usage: Usage, final_only: bool = False, interrupt: asyncio.Event | None = None,
                   owner: str | None = None) -> AsyncIterator[list[ChoiceUpdate]]:
    """Yield each engine step as parsed choice updates; `usage` is kept current. final_only: the engine sends
    the first tokens and then the rest at the end (a body, not a stream). interrupt: see AsyncEngine.generate.
    owner: the api key id its usage counts for."""
    parsers = [ChoiceParser(prep.tool_names, prep.forced_call, prep.raw) for _ in range(prep.params.n)]
    produced = [0] * prep.params.n
    timer = RequestTimer(ctx.metrics, prep.params.n, owner)
    try:
        async for out in ctx.engine.generate(engine_rid, prep.prompt_ids, prep.params, prep.constraints, prep.mm,
                                             final_only=final_only, interrupt=interrupt):
            updates = []
            for o in out.outputs:
                parser = parsers[o.index]
                deltas = parser.feed(o.text)
                produced[o.index] += len(o.token_ids)
                reason = None
                if o.finish_reason is not None:
                    deltas += parser.finish()
                    # out.prompt_tokens: the KV slots (a GLM-4V image counts n + 2, not its 3 placeholder ids)
                    full = out.prompt_tokens + produced[o.index] >= ctx.max_model_len
                    reason = api_finish_reason(flavor, o.finish_reason, parser.is_call, full)
                updates.append(ChoiceUpdate(o.index, deltas, o.logprobs, reason,
                                            (o.error or "generation failed") if o.finish_reason in ("error", "abort")
                                            else None))
            timer.on_output(out)
            usage.prompt_tokens, usage.completion_tokens = out.prompt_tokens, out.completion_tokens
            usage.cached_tokens = out.cached_tokens
            if out.finished:
                timer.on_finish(out.prompt_tokens)
            yield updates
    finally:
        timer.on_end(usage.prompt_tokens)  # aborted (client gone, shutdown) or failed: still counted


async def chat_result(ctx: ServingContext, prep: PreparedChat, meta: Meta, engine_rid: str) -> dict:
    """The non-streaming body. A choice the engine failed makes the whole answer a 500."""
    usage = Usage()
    deltas: list[list[Delta]] = [[] for _ in range(prep.params.n)]
    logprobs: list[list | None] = [None] * prep.params.n
    reasons: list[str | None] = [None] * prep.params.n
    async for updates in run_chat(ctx, prep, meta.flavor, engine_rid, usage, final_only=True, owner=meta.owner):
        for u in updates:
            if u.error is not None:
                raise APIError("500", f"generation failed: {u.error}")
            deltas[u.index] += u.deltas
            if u.logprobs is not None:
                logprobs[u.index] = logprobs[u.index] or []
                logprobs[u.index] += u.logprobs  # in place: linear over a long answer
            reasons[u.index] = u.finish_reason or reasons[u.index]
    choices = []
    for i in range(prep.params.n):
        parsed = assemble(deltas[i])
        choices.append(ChoiceResult(i, reasons[i] or "stop", parsed.content, parsed.tool_calls, logprobs[i]))
    return chat_body(meta.flavor, meta.response_id, meta.request_id, meta.created, meta.model, choices, usage,
                     ctx.tokenizer)


async def chat_stream(ctx: ServingContext, prep: PreparedChat, meta: Meta, engine_rid: str,
                      release: Callable[[], None]) -> AsyncIterator[str]:
    """SSE events of a chat. Leaving early (client gone) aborts the request through run_chat's generator.
    `release` (idempotent) gives back the request's admission slot however the stream ends."""
    flavor, usage, n = meta.flavor, Usage(), prep.params.n
    include_usage = prep.include_usage and flavor != VENDOR
    want_logprobs = prep.params.logprobs is not None
    done = 0
    held: dict[int, list[Delta]] = {}  # prep.whole_calls: each choice's tool-call deltas, until it finishes
    # ctx.closing interrupts a stream that has nothing to send when the grace runs out (queued, in a long prefill):
    # the check after each step below cannot see it, and the server would cut the stream off moments later.
    steps = run_chat(ctx, prep, flavor, engine_rid, usage, interrupt=ctx.closing, owner=meta.owner)

    def chunk(index, delta, reason=None, lps=None):
        return chat_chunk(flavor, meta.response_id, meta.created, meta.model, index, delta, reason,
                          chat_logprobs(ctx.tokenizer, lps) if want_logprobs else None, include_usage=include_usage)

    try:
        if flavor != VENDOR:  # OpenAI opens every choice with a role-only delta
            for i in range(n):
                yield sse(chunk(i, delta_dict(flavor, [], first=True)))
        async for updates in steps:
            chunks = []
            for u in updates:
                if u.error is not None and flavor != VENDOR:
                    yield sse(stream_error(flavor, f"generation failed: {u.error}"))
                    return
                deltas = _hold_calls(held, u) if prep.whole_calls else u.deltas
                if not deltas and u.finish_reason is None and not u.logprobs:
                    continue
                done += u.finish_reason is not None
                chunks.append(chunk(u.index, delta_dict(flavor, deltas, first=False), u.finish_reason,
                                    u.logprobs))
            if flavor == VENDOR and done == n and chunks:  # usage rides on the request's last chunk
                chunks[-1]["usage"] = usage.to_dict()
            for c in chunks:
                yield sse(c)
            if ctx.closing.is_set() and done < n:  # the shutdown grace runs out: an end the SDKs understand
                yield sse(stream_error(flavor, ctx.shutting_down_error().message))
                yield sse("[DONE]")
                return
        if include_usage:
            yield sse(usage_chunk(meta.response_id, meta.created, meta.model, usage, "chat.completion.chunk"))
        yield sse("[DONE]")
    except Interrupted:  # the shutdown grace ran out while the stream waited for the engine
        yield sse(stream_error(flavor, ctx.shutting_down_error().message))
        yield sse("[DONE]")
    except Exception as e:  # noqa: BLE001 (headers are sent: report in-band and end the stream)
        if not isinstance(e, EngineStoppedError):  # (that one was logged once, when the engine stopped)
            log.exception("stream of %s failed", engine_rid)
        yield sse(stream_error(flavor, internal_error_message(e)))
        yield sse("[DONE]")
    finally:
        await steps.aclose()  # aborts the engine request if it is still running
        release()


def _hold_calls(held: dict[int, list[Delta]], u: ChoiceUpdate) -> list[Delta]:
    """The deltas of `u` to send now: its content; its tool-call pieces wait in `held` and go out together with
    the choice's finish reason (one delta_dict merges them into one whole call)."""
    now = []
    for d in u.deltas:
        (now if d.content is not None else held.setdefault(u.index, [])).append(d)
    if u.finish_reason is not None:
        now += held.pop(u.index, [])
    return now


async def until_disconnect(request: Request, work: Awaitable):
    """Run `work` (a non-streaming generation); if the client disconnects first, cancel it, which aborts the
    engine request and frees its KV blocks. If the server's shutdown grace runs out first (ctx.closing), cancel
    it too and answer 503 in the API's format (uvicorn's own answer would be a plain-text 500)."""
    ctx: ServingContext = request.app.state.ctx
    task = asyncio.ensure_future(work)

    async def watch():
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    closing = asyncio.ensure_future(ctx.closing.wait())
    try:
        await asyncio.wait([task, watcher, closing], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        closing.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception) as e:  # noqa: BLE001 (nobody is left to answer)
            log.debug("request abandoned: %s", type(e).__name__)
        if ctx.closing.is_set():
            raise ctx.shutting_down_error()
        # Nobody reads this answer; its status is for /metrics, where a client that left is not a server fault
        # (499: nginx's "client closed request").
        raise APIError("500", "client disconnected", status=499)
    return task.result()
