"""OpenAI-compatible routes under /v1: chat completions, legacy completions (prompt strings or token ids, one
prompt or a list of them; `echo` with `logprobs` gives the prompt tokens' logprobs too, and `max_tokens: 0`
with `echo` only those: how evaluation harnesses score text), the model list and one model by name. Errors
answer in OpenAI's shape (errors.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import weakref
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from glm_serve.api.chat_service import until_disconnect
from glm_serve.api.common import Admitted, authenticate, ctx_of, handle_chat, read_request
from glm_serve.api.context import ServingContext
from glm_serve.api.errors import APIError, bad_param, internal_error_message, invalid_value
from glm_serve.api.guided import read_guided
from glm_serve.api.metrics import RequestTimer
from glm_serve.api.params import OPENAI, check_prompt, guided_constraints, response_format, sampling_params
from glm_serve.api.responses import (
    TextOffsets,
    Usage,
    completion_body,
    completion_chunk,
    completion_logprobs,
    echo_logprobs,
    sse,
    stream_error,
    usage_chunk,
)
from glm_serve.api.schemas import OpenAIChatRequest, OpenAICompletionRequest
from glm_serve.engine.async_engine import Interrupted
from glm_serve.sampling_params import SamplingParams

router = APIRouter(prefix="/v1")


@router.post("/chat/completions")
async def chat_completions(request: Request):
    return await handle_chat(request, OPENAI, OpenAIChatRequest, "openai chat")


def _model_card(ctx: ServingContext, name: str) -> dict:
    return {"id": name, "object": "model", "created": ctx.created, "owned_by": "glm-serve",
            "max_model_len": ctx.max_model_len}


@router.get("/models")
async def models(request: Request):
    ctx = ctx_of(request)
    authenticate(request)
    return JSONResponse({"object": "list", "data": [_model_card(ctx, name) for name in ctx.model_names]})


@router.get("/models/{model:path}")  # path: a served name may be a hub id with a slash (THUDM/glm-4-9b-chat)
async def model(request: Request, model: str):
    """The SDK's models.retrieve. An unknown name is OpenAI's 404 model_not_found, not the route's 404."""
    ctx = ctx_of(request)
    authenticate(request)
    return JSONResponse(_model_card(ctx, ctx.check_model(model, status=404)))


def _prompt_ids(prompt, tokenizer) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of those -> one id list per prompt."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise invalid_value("prompt", "must not be empty")
    if all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    # Special-token text ("[gMASK]<sop><|user|>") becomes its ids, so hand-written GLM prompts work.
    out = [tokenizer.encode(p, allow_special=True) if isinstance(p, str) else list(p) for p in prompt]
    for i, ids in enumerate(out):
        if not ids:
            raise invalid_value(f"prompt[{i}]", "must not be empty")
    return out


@router.post("/completions")
async def completions(request: Request):
    ctx, key_id, req = await read_request(request, OpenAICompletionRequest, "openai completions")
    # Admission first (as chat's: a refused request costs no tokenizing or grammar compile), then the request
    # prepared off the event loop (a new schema's grammar takes up to seconds to compile).
    admitted = Admitted(ctx, key_id, None)
    try:
        params, prompts, constraints = await ctx.off_loop(_prepare, ctx, req)
    except BaseException:
        admitted.release()
        raise
    run = _Completion(ctx, req, params, prompts, constraints, owner=key_id)
    if req.stream:
        stream = run.stream(admitted.release)
        weakref.finalize(stream, admitted.release)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return JSONResponse(await until_disconnect(request, run.body()))
    finally:
        admitted.release()


def _prepare(ctx: ServingContext, req: OpenAICompletionRequest) -> tuple[SamplingParams, list[list[int]], list | None]:
    """A completion request's sampling parameters, prompts as token ids and guided-decoding constraints (one list
    per prompt, or None); errors in the API's format."""
    ctx.check_model(req.model)
    if req.suffix:
        raise invalid_value("suffix", "is not supported (GLM-4 has no fill-in-the-middle format)")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise invalid_value("best_of", "only best_of == n is supported")
    # 16: OpenAI's default. With echo, max_tokens 0 returns the prompt alone (and its logprobs).
    params = sampling_params(req, OPENAI, ctx, default_max_tokens=16, min_max_tokens=0 if req.echo else 1)
    if req.echo and params.logprobs is not None:
        params = dataclasses.replace(params, prompt_logprobs=params.logprobs)
    prompts = _prompt_ids(req.prompt, ctx.tokenizer)
    if len(prompts) * params.n > ctx.max_n:
        raise bad_param("prompt", f"{len(prompts)} prompts x n={params.n} exceeds {ctx.max_n} choices")
    for k, ids in enumerate(prompts):
        check_prompt(ctx, ids, params, "prompt")
        if ctx.content_filter is not None:  # token ids too: decoded, they are the same text
            ctx.content_filter.check_prompt(ctx.tokenizer.decode(ids),
                                            "prompt" if len(prompts) == 1 else f"prompt[{k}]")
    # response_format (sent by clients written for vLLM) is one more spelling of guided JSON here: the completion's
    # text is the JSON (no chat content separator)
    guided = read_guided(req, response_format(req.response_format))
    constraints = None
    if guided is not None:  # every choice of every prompt gets its own matcher (they keep state); one compile
        constraints = [guided_constraints(ctx, guided, params.n, content=False) for _ in prompts]
        params.stop, params.stop_token_ids = [], []  # the grammar decides where the text ends (see prepare_chat)
    return params, prompts, constraints


class _Completion:
    """One /v1/completions request: every prompt x n choices, merged into one response or stream."""

    def __init__(self, ctx: ServingContext, req: OpenAICompletionRequest, params: SamplingParams,
                 prompts: list[list[int]], constraints: list[list] | None = None, owner: str | None = None):
        self.ctx, self.params, self.prompts = ctx, params, prompts
        self.owner = owner  # the api key id its usage counts for
        self.constraints = constraints  # [prompt][choice] guided decoding's constraints, or None
        self.model, self.id, self.created = req.model, ctx.new_id("cmpl"), int(time.time())
        self.echo = bool(req.echo)
        self.include_usage = bool((req.stream_options or {}).get("include_usage"))
        self.usage = [Usage() for _ in prompts]
        n = len(prompts) * params.n
        self.started = [False] * n  # echo prefix sent
        self.offsets: list[TextOffsets | None] = [None] * n  # per choice, from its first output (with logprobs)
        self.prompt_logprobs: list[list | None] = [None] * len(prompts)  # per prompt, from its first output

    async def _events(self, final_only: bool) -> AsyncIterator[tuple[int, object]]:
        """(global choice index, CompletionOutput) for every prompt, merged as they arrive. final_only: the
        engine sends each prompt's first tokens and then the rest at the end (a body, not a stream); otherwise
        (a stream) ctx.closing interrupts a prompt still waiting for the engine (see chat_service.chat_stream)."""
        interrupt = None if final_only else self.ctx.closing
        if len(self.prompts) == 1:  # the common case: read the engine directly, no merging task and queue between
            outputs = self._generate(0, self.prompts[0], final_only, interrupt)
            try:
                async for k, out in outputs:
                    for item in self._choices(k, out):
                        yield item
            finally:
                await outputs.aclose()  # left early (client gone, an error chunk): abort the engine request now
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int, ids: list[int]):
            try:
                async for item in self._generate(k, ids, final_only, interrupt):
                    await queue.put(item)
                await queue.put((k, None))
            except Exception as e:  # noqa: BLE001 (handed to the consumer)
                await queue.put((k, e))

        pumps = [asyncio.ensure_future(pump(k, ids)) for k, ids in enumerate(self.prompts)]
        try:
            done = 0
            while done < len(pumps):
                k, item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    for choice in self._choices(k, item):
                        yield choice
        finally:
            for p in pumps:
                p.cancel()  # a pump still running aborts its engine request

    async def _generate(self, k: int, ids: list[int], final_only: bool, interrupt) -> AsyncIterator[tuple[int, object]]:
        """Prompt k's engine outputs, (k, RequestOutput), with its usage and latency metrics kept."""
        timer = RequestTimer(self.ctx.metrics, self.params.n, self.owner)  # each prompt is a generation of its own, at its own pace
        try:
            constraints = self.constraints[k] if self.constraints is not None else None
            async for out in self.ctx.engine.generate(f"{self.id}-{k}", ids, self.params, constraints,
                                                      final_only=final_only, interrupt=interrupt):
                u = self.usage[k]
                u.prompt_tokens, u.completion_tokens = out.prompt_tokens, out.completion_tokens
                u.cached_tokens = out.cached_tokens
                timer.on_output(out)
                yield k, out
            timer.on_finish(self.usage[k].prompt_tokens)
        finally:
            timer.on_end(self.usage[k].prompt_tokens)  # cancelled (client gone) or failed: still counted

    def _choices(self, k: int, out) -> list[tuple[int, object]]:
        """(global choice index, CompletionOutput) of one engine output of prompt k."""
        if out.prompt_logprobs is not None:  # in the request's first output, before any choice's text
            self.prompt_logprobs[k] = out.prompt_logprobs
        return [(k * self.params.n + o.index, o) for o in out.outputs]

    def _piece(self, index: int, o) -> tuple[str, dict | None]:
        """This output's text (with the echoed prompt first) and its logprobs (the prompt's first, with echo)."""
        text, tok = o.text, self.ctx.tokenizer
        want_lp = self.params.logprobs is not None
        head = None  # the echoed prompt's logprobs
        if not self.started[index]:
            self.started[index] = True
            if self.echo:
                k = index // self.params.n
                echoed = tok.decode(self.prompts[k])
                if want_lp:
                    if self.prompt_logprobs[k] is None:
                        raise RuntimeError("the engine sent no prompt logprobs with the request's first output")
                    head = echo_logprobs(tok, self.prompts[k], self.prompt_logprobs[k])
                text = echoed + text
        lps = None
        if want_lp:
            if self.offsets[index] is None:  # generated text starts after the echoed prompt
                self.offsets[index] = TextOffsets(tok, self.prompts[index // self.params.n],
                                                  self.params.skip_special_tokens, len(text) - len(o.text))
            lps = completion_logprobs(tok, o.logprobs, self.offsets[index])
        if head is not None:
            lps = head if lps is None else {key: head[key] + lps[key] for key in head}
        return text, lps

    def _total(self) -> Usage:
        return Usage(sum(u.prompt_tokens for u in self.usage), sum(u.completion_tokens for u in self.usage),
                     sum(u.cached_tokens for u in self.usage))

    async def body(self) -> dict:
        n = len(self.prompts) * self.params.n
        # Pieces are collected and joined once: linear over a long answer.
        texts: list[list[str]] = [[] for _ in range(n)]
        lps: list[dict | None] = [None] * n
        reasons: list[str | None] = [None] * n
        async for i, o in self._events(final_only=True):
            if o.finish_reason in ("error", "abort"):
                raise APIError("500", f"generation failed: {o.error or o.finish_reason}")
            text, lp = self._piece(i, o)
            texts[i].append(text)
            if lp is not None:
                if lps[i] is None:
                    lps[i] = {key: [] for key in lp}
                for key, values in lp.items():
                    lps[i][key] += values
            reasons[i] = o.finish_reason or reasons[i]
        choices = [{"index": i, "text": "".join(texts[i]), "logprobs": lps[i], "finish_reason": reasons[i] or "stop"}
                   for i in range(n)]
        return completion_body(self.id, self.created, self.model, choices, self._total())

    async def stream(self, release) -> AsyncIterator[str]:
        events = self._events(final_only=False)
        n, done = len(self.prompts) * self.params.n, 0
        try:
            async for i, o in events:
                if o.finish_reason in ("error", "abort"):
                    yield sse(stream_error(OPENAI, f"generation failed: {o.error or o.finish_reason}"))
                    return
                text, lp = self._piece(i, o)
                if text or o.finish_reason or lp:
                    yield sse(completion_chunk(self.id, self.created, self.model, i, text, o.finish_reason, lp,
                                               self.include_usage))
                done += o.finish_reason is not None
                if self.ctx.closing.is_set() and done < n:  # the shutdown grace runs out: an end the SDKs understand
                    yield sse(stream_error(OPENAI, self.ctx.shutting_down_error().message))
                    yield sse("[DONE]")
                    return
            if self.include_usage:
                yield sse(usage_chunk(self.id, self.created, self.model, self._total(), "text_completion"))
            yield sse("[DONE]")
        except Interrupted:  # the shutdown grace ran out while a prompt waited for the engine
            yield sse(stream_error(OPENAI, self.ctx.shutting_down_error().message))
            yield sse("[DONE]")
        except Exception as e:  # noqa: BLE001 (headers are sent: report in-band)
            yield sse(stream_error(OPENAI, internal_error_message(e)))
            yield sse("[DONE]")
        finally:
            await events.aclose()
            release()
