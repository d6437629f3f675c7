"""Request plumbing shared by the vendor and OpenAI routes: the context, authentication, reading a size-limited
JSON body, admission, and the chat handler both schemas (and the Responses route) use."""

from __future__ import annotations

import json
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from glm_serve.api.chat_service import Meta, chat_result, chat_stream, until_disconnect
from glm_serve.api.context import ServingContext
from glm_serve.api.errors import APIError, bad_param
from glm_serve.api.images import attach_image
from glm_serve.api.params import VENDOR, PreparedChat, prepare_chat
from glm_serve.engine.async_engine import EngineStoppedError


def ctx_of(request: Request) -> ServingContext:
    return request.app.state.ctx


def authenticate(request: Request) -> str | None:
    """The caller's key id, or None when the server has no keys. Raises APIError 1000-1004."""
    keys = ctx_of(request).keys
    if not keys.enabled:
        return None
    return keys.authenticate(request.headers.get("authorization"))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# A UTF-16 surrogate written as a JSON escape (\ud800) or as raw (CESU-8) bytes, which json.loads lets through.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
SURROGATE_MESSAGE = "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"


def lone_surrogate(raw: bytes, data) -> str | None:
    """Where parsed JSON holds a string with a lone UTF-16 surrogate (not Unicode text: it cannot be encoded,
    tokenized or answered), as a dotted path; None when it holds none. `raw` (the JSON text) lets the common
    case skip the walk."""
    if not _MAYBE_SURROGATE.search(raw):
        return None
    stack = [("", data)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                where = f"{path}.{k}" if path else str(k)
                if not _encodable(k):
                    return path or "body"
                stack.append((where, item))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v))
        elif isinstance(v, str) and not _encodable(v):
            return path or "body"
    return None


def _encodable(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def read_json(request: Request) -> dict:
    """The body as a JSON object; 413 beyond max_body_bytes, 1210 for anything that is not a JSON object."""
    limit = ctx_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError("1210", f"request body too large ({declared} bytes; the limit is {limit})", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError("1210", f"request body too large (the limit is {limit} bytes)", status=413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise APIError("1210", f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError("1210", f"the request body must be a JSON object, got {type(data).__name__}")
    where = lone_surrogate(raw, data)
    if where is not None:
        raise APIError("1210", f"{where}: {SURROGATE_MESSAGE}", where)
    return data


async def read_request(request: Request, model_cls, route: str):
    """Every JSON route's preamble: the key check, then the body as `model_cls` (its unknown fields logged under
    `route`). -> (ctx, the caller's key id or None, the validated request)."""
    ctx = ctx_of(request)
    key_id = authenticate(request)
    req = model_cls.model_validate(await read_json(request))
    req.log_unknown(route)
    return ctx, key_id, req


class Admitted:
    """A request's admission slot plus its client request_id reservation; `release()` is idempotent."""

    def __init__(self, ctx: ServingContext, key_id: str | None, client_request_id: str | None):
        if not ctx.engine.alive:  # a 503 before a stream's headers, rather than an error inside a 200 stream
            raise EngineStoppedError(ctx.engine.stopped_reason)
        # request_ids are the client's: one key's ids never collide with another key's
        rid = None if client_request_id is None else (key_id, client_request_id)
        if rid is not None and rid in ctx.active_request_ids:
            raise APIError("1231", f"request_id {client_request_id!r} is already in flight", "request_id")
        try:
            self._slot = ctx.admission.acquire(key_id)
        except APIError as e:  # who is being throttled, for the operator
            if key_id is not None:
                ctx.metrics.key_refused.labels(key=key_id, code=e.code).inc()
            raise
        if key_id is not None:
            ctx.metrics.key_requests.labels(key=key_id).inc()
        self._ctx, self._rid = ctx, rid
        if rid is not None:
            ctx.active_request_ids.add(rid)

    def release(self) -> None:
        self._slot.release()
        if self._rid is not None:
            self._ctx.active_request_ids.discard(self._rid)
            self._rid = None


def new_meta(ctx: ServingContext, flavor: str, model: str, client_request_id: str | None,
             owner: str | None = None) -> Meta:
    rid = ctx.new_id("chatcmpl")
    return Meta(flavor, rid, client_request_id or rid, int(time.time()), model, owner)


async def prepare_off_loop(req, flavor: str, ctx: ServingContext):
    """prepare_chat in a worker thread (ctx.off_loop): compiling a new schema's grammar takes up to seconds (a
    string with maxLength 2000: ~1 s), and on the event loop it would stall every other request and stream
    meanwhile. (xgrammar releases the GIL while it compiles; the rest of prepare_chat is thread-safe.)"""
    return await ctx.off_loop(prepare_chat, req, flavor, ctx)


async def admit_and_prepare(ctx: ServingContext, key_id: str | None, client_rid: str | None, req,
                            flavor: str) -> tuple[Admitted, PreparedChat]:
    """The chat's admission first (the key's limits, the queue, its request_id), so that a refused request costs
    the server no tokenizing, grammar compile or image fetch; then the request prepared. One that fails to
    prepare gives its slot back."""
    admitted = Admitted(ctx, key_id, client_rid)
    try:
        prep = await prepare_off_loop(req, flavor, ctx)
        await attach_image(ctx, prep)
    except BaseException:
        admitted.release()
        raise
    return admitted, prep


async def handle_chat(request: Request, flavor: str, model_cls, route: str):
    """Both chat routes: authenticate, parse, then answer_chat."""
    ctx, key_id, req = await read_request(request, model_cls, route)
    return await answer_chat(request, ctx, key_id, req, flavor)


# What answer_chat renders with: a prepared chat -> a JSON body, or SSE text (the last argument: release, idempotent,
# gives back the admission slot however the stream ends). Chat's own are chat_result and chat_stream; the Responses
# route (routes_responses.py) renders the same run as a Response object and its events.
BodyFn = Callable[[ServingContext, PreparedChat, Meta, str], Awaitable[dict]]
StreamFn = Callable[[ServingContext, PreparedChat, Meta, str, Callable[[], None]], AsyncIterator[str]]


async def answer_chat(request: Request, ctx: ServingContext, key_id: str | None, req, flavor: str,
                      body: BodyFn = chat_result, stream: StreamFn = chat_stream, meta: Meta | None = None):
    """A parsed chat request (either schema, or one translated into OpenAI's chat schema): validate, admit, then
    answer in JSON or as an SSE stream, aborting the engine request when the client leaves. meta: the response's
    identity when the route names it itself (default: a chatcmpl id)."""
    client_rid = getattr(req, "request_id", None) if flavor == VENDOR else None
    admitted, prep = await admit_and_prepare(ctx, key_id, client_rid, req, flavor)
    meta = meta or new_meta(ctx, flavor, req.model, client_rid, owner=key_id)
    engine_rid = meta.response_id
    if prep.stream:
        events = stream(ctx, prep, meta, engine_rid, admitted.release)
        weakref.finalize(events, admitted.release)  # a stream never started (client left at once) still frees
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        answer = await until_disconnect(request, body(ctx, prep, meta, engine_rid))
    finally:
        admitted.release()
    return JSONResponse(answer)


def query_limit(request: Request, default: int, most: int) -> int:
    """A list route's `limit` query parameter: an integer in [1, most], `default` when absent; else a 400 naming
    it. ASCII digits only: str.isdigit() also passes "²" and "①", which int() refuses (that was a 500)."""
    raw = request.query_params.get("limit")
    if raw is None or raw == "":
        return default
    digits = raw.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()) or not 1 <= int(raw) <= most:
        raise bad_param("limit", f"must be an integer in [1, {most}], got {raw!r}")
    return int(raw)
