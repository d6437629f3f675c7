"""OpenAI's Responses API: POST /v1/responses, and the stored responses' routes (GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items). The request is read as a chat (responses_request.py) and
runs on the chat path (prepare_chat, run_chat: sampling, constraints, GLM-4 tool-call parsing, admission, abort on
disconnect); this module renders that run as a Response object, or as the Responses stream events, and keeps the
finished response in the server's data dir (response_store.py) unless the request says `store: false`.

Spec: https://platform.openai.com/docs/api-reference/responses/object and .../responses-streaming.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request

from glm_serve.api.chat_service import Meta, chat_result, run_chat
from glm_serve.api.common import answer_chat, authenticate, query_limit, read_request
from glm_serve.api.context import ServingContext
from glm_serve.api.errors import APIError, internal_error_message, invalid_value
from glm_serve.api.params import OPENAI, PreparedChat
from glm_serve.api.parser import Delta, assemble
from glm_serve.api.response_store import ResponseStore, StoredResponse
from glm_serve.api.responses import Usage, chat_logprobs, one_line
from glm_serve.api.responses_request import (ChatView, check_request, fit_input, listed_items, output_messages,
                                             read_responses_request)
from glm_serve.api.schemas import ResponsesRequest
from glm_serve.engine.async_engine import EngineStoppedError, Interrupted

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")


@router.post("/responses")
async def create_response(request: Request):
    ctx, key_id, req = await read_request(request, ResponsesRequest, "openai responses")
    check_request(req)
    store: ResponseStore = request.app.state.responses
    previous, before = None, []
    if req.previous_response_id is not None:  # the stored conversation this request continues
        found = await asyncio.to_thread(store.continuation, req.previous_response_id, key_id)
        if found is None:  # unknown, expired, deleted, stored with store: false, or another key's. OpenAI answers
            # 400 here (clients such as Codex CLI key their recovery on the code), 404 on the retrieve routes
            raise APIError("1214", f"Previous response with id '{req.previous_response_id}' not found.",
                           "previous_response_id", status=400, openai_code="previous_response_not_found")
        previous, before = found
    view = read_responses_request(req, previous)
    keep = _Keep(store, key_id, req.previous_response_id, view, listed_items(req, {i["id"] for i in before}),
                 (previous or [], before)) if req.store is not False else None
    if req.truncation == "auto":
        view = await ctx.off_loop(fit_input, ctx, view)  # renders the conversation a few times: off the event loop
    shape = ResponseShape(req, keep)
    meta = Meta(OPENAI, shape.id, shape.id, shape.created_at, req.model, owner=key_id)
    try:
        return await answer_chat(request, ctx, key_id, view.chat, OPENAI, body=shape.body, stream=shape.stream,
                                 meta=meta)
    except APIError as e:  # raised by the chat path, naming chat fields: name the request's own
        raise view.rename(e) from None


def _not_found(response_id: str) -> APIError:
    return APIError("1214", f"Response with id '{response_id}' not found.", "response_id", status=404)


@router.get("/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str):
    caller = authenticate(request)
    if request.query_params.get("stream", "false").lower() != "false":
        raise invalid_value("stream", "replaying a stored response as events is not served: retrieve it whole")
    found = await asyncio.to_thread(request.app.state.responses.response, response_id, caller)
    if found is None:
        raise _not_found(response_id)
    return found


@router.delete("/responses/{response_id}")
async def delete_response(request: Request, response_id: str):
    caller = authenticate(request)
    if not await asyncio.to_thread(request.app.state.responses.delete, response_id, caller):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.post("/responses/{response_id}/cancel")
async def cancel_response(request: Request, response_id: str):
    caller = authenticate(request)
    if await asyncio.to_thread(request.app.state.responses.response, response_id, caller) is None:
        raise _not_found(response_id)
    raise invalid_value("response_id", "only background responses can be cancelled, and this server runs none: "
                                       "every response ends within its request")


@router.get("/responses/{response_id}/input_items")
async def list_input_items(request: Request, response_id: str):
    """A cursor page of the items before the response's output, newest first unless order=asc; `after` is an item
    id (the SDK's iterator sends the last one it got). `include` is accepted: the items are stored whole."""
    caller = authenticate(request)
    q = request.query_params
    limit = query_limit(request, 20, 100)
    order = q.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise invalid_value("order", f"must be 'asc' or 'desc', got {order!r}")
    items = await asyncio.to_thread(request.app.state.responses.input_items, response_id, caller)
    if items is None:
        raise _not_found(response_id)
    if order == "desc":
        items.reverse()
    after = q.get("after")
    if after:
        at = next((n for n, item in enumerate(items) if item.get("id") == after), None)
        if at is None:
            raise invalid_value("after", f"no input item with id {after!r} in response {response_id!r}")
        items = items[at + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)}


class _Keep:
    """What a stored response is made of, gathered before it runs; `save` writes the finished response."""

    def __init__(self, store: ResponseStore, owner: str | None, parent: str | None, view: ChatView,
                 items: list[dict], inherited: tuple[list[dict], list[dict]]):
        self.store, self.owner, self.parent, self.inherited = store, owner, parent, inherited
        self.messages = view.input_messages()  # untruncated: truncation only shortens this response's prompt
        self.items = items  # this input's items, ids given

    async def save(self, response: dict) -> None:
        """Store a response that reached its final status before the client hears of it, so that a follow-up sent
        the moment it arrives finds it. A failed one (a generation error, the shutdown grace running out) is stored
        failed, as OpenAI keeps failed responses; its conversation ends before its partial output. A response whose
        client left before it ended is never stored: its generation was aborted (as OpenAI stops one whose stream
        is closed) and it has no final status. A write that fails costs the client its stored copy, not its
        answer."""
        try:
            output = [] if response["status"] == "failed" else output_messages(response["output"])
            rec = StoredResponse(response["id"], self.owner, response, self.parent, self.items,
                                 self.messages + output, self.inherited)
            await asyncio.to_thread(self.store.put, rec)
        except Exception:  # noqa: BLE001 (sqlite: a full disk, a broken file; never the answer's failure)
            log.exception("response %s could not be stored", response["id"])


def _usage(prompt: int, completion: int, cached: int) -> dict:
    # cache_write_tokens (newer SDKs require it) is OpenAI's billed cache write; the prefix cache here has none: 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


# chat finish reason -> the Responses API's incomplete_details.reason (others complete)
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class ResponseShape:
    """One response's identity and the request fields it echoes; builds its output items and Response objects, the
    same for a body and a stream (the stream's events carry the very items its final response holds)."""

    def __init__(self, req: ResponsesRequest, keep: _Keep | None = None):
        self.id = "resp_" + uuid.uuid4().hex
        self.keep = keep  # None: `store: false`, nothing is kept
        self.msg_id = "msg_" + uuid.uuid4().hex
        self.created_at = int(time.time())
        self.model = req.model
        text = dict(req.text or {})
        text["format"] = text.get("format") or {"type": "text"}
        # The request fields a Response repeats (the SDK's Response model requires tools, tool_choice and
        # parallel_tool_calls). Flat tools as sent: only function tools get this far.
        self.echo = {
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "reasoning": None, "store": req.store is not False,
            "temperature": req.temperature, "text": text,
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": list(req.tools or []),
            "top_logprobs": req.top_logprobs, "top_p": req.top_p, "truncation": req.truncation or "disabled",
            "user": req.user,
            "background": False,
        }

    def response(self, status: str, output: list[dict], usage: dict | None = None, reason: str | None = None,
                 error: str | None = None) -> dict:
        """status: in_progress | completed | incomplete | failed; reason: why incomplete; error: why failed."""
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "error": {"code": "server_error", "message": error} if error is not None else None,
                "incomplete_details": {"reason": reason} if reason is not None else None,
                "model": self.model, "output": output, "usage": usage, **self.echo}

    def items(self, content: str | None, calls: list[dict], status: str, logprobs: list[dict] | None) -> list[dict]:
        """Output items of an answer: its tool call(s) as function_call items, else one message (text may be "")."""
        if calls:  # a call id "call_<hex>" gives its item the id "fc_<hex>": stable from the first event on
            return [{"type": "function_call", "id": "fc_" + c["id"].removeprefix("call_"), "call_id": c["id"],
                     "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": status}
                    for c in calls]
        return [{"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
                 "content": [_text_part(content or "", logprobs)]}]

    def finished(self, content, calls, finish_reason: str, logprobs, usage: dict) -> dict:
        """The final Response: "length" (max_output_tokens or the context window) or the operator's content filter
        (--blocked-words) makes it incomplete, with OpenAI's reason for each."""
        reason = _INCOMPLETE.get(finish_reason)
        status = "completed" if reason is None else "incomplete"
        return self.response(status, self.items(content, calls, status, logprobs), usage, reason=reason)

    async def body(self, ctx: ServingContext, prep: PreparedChat, meta: Meta, engine_rid: str) -> dict:
        """A non-streamed Response, from the chat path's own body (a failed generation is its 500)."""
        chat = await chat_result(ctx, prep, meta, engine_rid)
        (choice,) = chat["choices"]  # the Responses API has no n
        message, u = choice["message"], chat["usage"]
        usage = _usage(u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"])
        final = self.finished(message["content"], message.get("tool_calls") or [], choice["finish_reason"],
                              (choice["logprobs"] or {}).get("content"), usage)
        await self.save(final)
        return final

    async def save(self, final: dict) -> None:
        if self.keep is not None:
            await self.keep.save(final)

    def stream(self, ctx: ServingContext, prep: PreparedChat, meta: Meta, engine_rid: str,
               release: Callable[[], None]) -> AsyncIterator[str]:
        return _EventStream(self, ctx, prep).run(engine_rid, release, meta.owner)


def _text_part(text: str, logprobs: list[dict] | None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


class _EventStream:
    """The SSE events of one streamed response, from run_chat's parsed deltas: response.created and .in_progress;
    an output item (a message with one output_text part, or a function_call) opened with its first delta, its
    text or arguments as deltas, closed at the end; then response.completed, .incomplete, or .failed (a failure
    after the stream began ends it in-band, never a cut connection). Each event has its sequence_number."""

    def __init__(self, shape: ResponseShape, ctx: ServingContext, prep: PreparedChat):
        self.shape, self.ctx, self.prep = shape, ctx, prep
        self.seq = 0
        self.deltas: list[Delta] = []  # every delta so far: assemble() makes the final items of them
        self.logprobs: list = []  # every token's TokenLogprob, when asked for (the final output_text's)
        self.pending_lps: list = []  # logprobs of tokens whose text has not gone out in a delta yet
        self.opened: str | None = None  # None | "message" | "function_call": the output item open
        self.call_item_id = ""  # the function_call item's id, once a call opens

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return f"event: {kind}\ndata: {one_line(json.dumps(data, ensure_ascii=False, separators=(',', ':')))}\n\n"

    def _lps(self, lps) -> list[dict]:
        return (chat_logprobs(self.ctx.tokenizer, lps) or {}).get("content") or []

    def _open(self, kind: str, call_id: str | None = None, name: str | None = None) -> list[str]:
        self.opened = kind
        if kind == "function_call":
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
            (item,) = self.shape.items(None, [call], "in_progress", None)
            return [self.event("response.output_item.added", output_index=0, item=item)]
        item = {**self.shape.items("", [], "in_progress", None)[0], "content": []}
        return [self.event("response.output_item.added", output_index=0, item=item),
                self.event("response.content_part.added", item_id=self.shape.msg_id, output_index=0,
                           content_index=0, part=_text_part("", None))]

    def _step(self, deltas: list[Delta], lps) -> list[str]:
        """Events for one engine step's deltas of the answer (content and a call never mix: parser.py). The step's
        token logprobs ride on its text delta; those of steps whose text the parser held back (undecided between
        content and a call) wait for the next text delta, so the deltas' logprobs add up to the done event's."""
        out = []
        self.deltas += deltas
        if lps:
            self.pending_lps += lps
        text = "".join(d.content for d in deltas if d.content)
        if text:
            if self.opened is None:
                out += self._open("message")
            out.append(self.event("response.output_text.delta", item_id=self.shape.msg_id, output_index=0,
                                  content_index=0, delta=text, logprobs=self._lps(self.pending_lps)))
            self.pending_lps = []
        for d in deltas:
            if d.call_id is not None:
                out += self._open("function_call", d.call_id, d.name)
                self.call_item_id = "fc_" + d.call_id.removeprefix("call_")
            if d.arguments:
                out.append(self.event("response.function_call_arguments.delta", item_id=self.call_item_id,
                                      output_index=0, delta=d.arguments))
        return out

    def _close(self, final: dict) -> list[str]:
        """The done events of the output item, carrying what the final response holds."""
        if self.opened is None:  # nothing was written: the empty message a body would hold, opened and closed
            self._open("message")
        (item,) = final["output"]
        if item["type"] == "function_call":
            return [self.event("response.function_call_arguments.done", item_id=item["id"], output_index=0,
                               arguments=item["arguments"]),
                    self.event("response.output_item.done", output_index=0, item=item)]
        part = item["content"][0]
        return [self.event("response.output_text.done", item_id=item["id"], output_index=0, content_index=0,
                           text=part["text"], logprobs=part["logprobs"]),
                self.event("response.content_part.done", item_id=item["id"], output_index=0, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=0, item=item)]

    async def _failed(self, message: str) -> str:
        parsed = assemble(self.deltas)
        output = self.shape.items(parsed.content, parsed.tool_calls, "incomplete", None) if self.opened else []
        failed = self.shape.response("failed", output, error=message)
        await self.shape.save(failed)
        return self.event("response.failed", response=failed)

    async def run(self, engine_rid: str, release: Callable[[], None], owner: str | None = None) -> AsyncIterator[str]:
        usage, reason = Usage(), None
        # ctx.closing interrupts a stream still waiting for the engine when the shutdown grace runs out (as chat)
        steps = run_chat(self.ctx, self.prep, OPENAI, engine_rid, usage, interrupt=self.ctx.closing, owner=owner)
        try:
            yield self.event("response.created", response=self.shape.response("in_progress", []))
            yield self.event("response.in_progress", response=self.shape.response("in_progress", []))
            async for updates in steps:
                for u in updates:  # one choice: the Responses API has no n
                    if u.error is not None:
                        yield await self._failed(f"generation failed: {u.error}")
                        return
                    if u.logprobs:
                        self.logprobs += u.logprobs
                    for e in self._step(u.deltas, u.logprobs):
                        yield e
                    reason = u.finish_reason or reason
                if self.ctx.closing.is_set() and reason is None:  # the shutdown grace runs out
                    yield await self._failed(self.ctx.shutting_down_error().message)
                    return
            parsed = assemble(self.deltas)
            final = self.shape.finished(parsed.content, parsed.tool_calls, reason or "stop",
                                        self._lps(self.logprobs) if self.logprobs else None,
                                        _usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens))
            for e in self._close(final):
                yield e
            await self.shape.save(final)  # (stored before the client hears it ended: response_store.py)
            yield self.event(f"response.{final['status']}", response=final)
        except Interrupted:  # the shutdown grace ran out while the stream waited for the engine
            yield await self._failed(self.ctx.shutting_down_error().message)
        except Exception as e:  # noqa: BLE001 (headers are sent: report in-band and end the stream)
            if not isinstance(e, EngineStoppedError):
                log.exception("responses stream of %s failed", engine_rid)
            yield await self._failed(internal_error_message(e))
        finally:
            await steps.aclose()  # aborts the engine request if it is still running (client gone)
            release()
