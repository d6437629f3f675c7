"""One batch line, end to end: parse and check it (JSON, custom_id, method, url, and the body through the chat
endpoint's own validation), run it through the same prepare_chat -> chat_result path as the chat endpoint its url
names (so a line gets the answer that endpoint gives; images are only checked at validation and decoded when the
line runs), and format its JSONL line. The url picks the schema, as the server's routes do: "/v4/chat/completions"
the vendor's, "/v1/chat/completions" OpenAI's (its request fields, its response and error shapes), so that a
batch file written for OpenAI's Batch API runs as written. Shared by the server's batch worker and `glm-serve batch`.

    output line: {"custom_id", "response": {"status_code": 200, "body": <chat response>}, "error": null}
    error line:  {"custom_id", "line", "response": {"status_code", "body": {"error": {code, message}}} | null,
                  "error": {"code", "message"}}

`response` is null on an error line when the line never was a request (bad JSON, no custom_id, wrong url).
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import ValidationError

from glm_serve.api.chat_service import chat_result
from glm_serve.api.common import SURROGATE_MESSAGE, lone_surrogate, new_meta
from glm_serve.api.context import ServingContext
from glm_serve.api.errors import APIError, error_body, from_validation_errors, is_openai_path
from glm_serve.api.images import attach_image
from glm_serve.api.params import OPENAI, VENDOR, PreparedChat, prepare_chat
from glm_serve.api.responses import one_line
from glm_serve.api.schemas import OpenAIChatRequest, VendorChatRequest
from glm_serve.batch.records import ENDPOINTS

log = logging.getLogger(__name__)

MAX_CUSTOM_ID = 512  # characters


@dataclass
class BatchLine:
    line: int  # 1-based line number in the input file
    custom_id: str | None  # None when the line carries none (or is not JSON)
    body: dict | None  # the request body, when the line can run
    error: str | None  # the error JSONL line, when it cannot
    url: str = ENDPOINTS[0]  # the endpoint it names: its schema (see the module docstring)

    @property
    def ok(self) -> bool:
        return self.error is None


def error_line(custom_id: str | None, line: int, code: str, message: str, status: int | None = None,
               body: dict | None = None) -> str:
    """An error-file line; `status` set = the request was refused or failed with this HTTP status, and `body` is
    what the endpoint answered (default: the vendor's error shape)."""
    response = None
    if status is not None:
        response = {"status_code": status, "body": body or {"error": {"code": code, "message": message}}}
    return one_line(json.dumps({"custom_id": custom_id, "line": line, "response": response,
                                "error": {"code": code, "message": message}}, ensure_ascii=False))


def output_line(custom_id: str, body: dict) -> str:
    """An output-file line. Text stays UTF-8, but the three characters str.splitlines() also ends lines at are
    escaped (responses.one_line), so that a reader splitting the file's text that way still gets one result per
    line."""
    return one_line(json.dumps({"custom_id": custom_id, "response": {"status_code": 200, "body": body},
                                "error": None}, ensure_ascii=False))


def iter_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for every non-blank line. A UTF-8 byte order mark at the start (editors on
    Windows write one) is no part of the first line."""
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if i == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if raw.strip():
            yield i, raw


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def flavor_of(url: str) -> str:
    return OPENAI if is_openai_path(url) else VENDOR


def _refused(custom_id: str | None, line: int, e: APIError, url: str) -> str:
    return error_line(custom_id, line, e.code, e.message, e.status, error_body(e, flavor_of(url) == OPENAI))


def _prepare(ctx: ServingContext, body: dict, url: str = ENDPOINTS[0]) -> PreparedChat:
    """The chat endpoint's own validation of a body; APIError when the endpoint would refuse it."""
    flavor = flavor_of(url)
    try:
        req = (OpenAIChatRequest if flavor == OPENAI else VendorChatRequest).model_validate(body)
    except ValidationError as e:
        raise from_validation_errors(e.errors()) from None
    req.log_unknown("batch line")
    prep = prepare_chat(req, flavor, ctx)
    prep.stream = False  # a batch line's answer is written whole
    return prep


def check_line(ctx: ServingContext, line: int, raw: bytes, seen: dict[str, int]) -> BatchLine:
    """Check one input line; `seen` (custom_id -> line) catches duplicates and is updated."""

    def bad(code: str, message: str, cid: str | None = None, status: int | None = None) -> BatchLine:
        return BatchLine(line, cid, None, error_line(cid, line, code, message, status))

    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return bad("1210", f"line {line} is not valid JSON: {str(e)[:200]}")
    if not isinstance(obj, dict):
        return bad("1210", f"line {line} must be a JSON object, got {type(obj).__name__}")
    where = lone_surrogate(raw, obj)
    if where is not None:  # not text: it could be neither stored nor tokenized
        cid = obj.get("custom_id") if where != "custom_id" else None
        return bad("1210", f"{where}: {SURROGATE_MESSAGE}", cid if isinstance(cid, str) else None)
    cid = obj.get("custom_id")
    if cid is None:
        return bad("1213", "custom_id: required field missing")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID:
        return bad("1214", f"custom_id: must be a non-empty string of at most {MAX_CUSTOM_ID} characters",
                   cid if isinstance(cid, str) else None)
    if cid in seen:
        return bad("1214", f"custom_id: {cid!r} is a duplicate of line {seen[cid]}", cid)
    seen[cid] = line
    method, url = obj.get("method", "POST"), obj.get("url", ENDPOINTS[0])
    if not isinstance(method, str) or method.upper() != "POST":
        return bad("1214", f"method: must be POST, got {method!r}", cid)
    if url not in ENDPOINTS:
        return bad("1214", f"url: must be one of {', '.join(ENDPOINTS)}, got {url!r}", cid)
    body = obj.get("body")
    if body is None:
        return bad("1213", "body: required field missing", cid)
    if not isinstance(body, dict):
        return bad("1210", f"body: must be a JSON object, got {type(body).__name__}", cid)
    try:
        _prepare(ctx, body, url)
    except APIError as e:
        return BatchLine(line, cid, None, _refused(cid, line, e, url))
    except Exception as e:  # noqa: BLE001 (a bug on one line must not sink the batch; it is reported there)
        log.exception("checking batch line %d failed", line)
        return bad("500", f"internal error: {type(e).__name__}", cid, 500)
    return BatchLine(line, cid, body, None, url)


def check_input(ctx: ServingContext, data: bytes) -> Iterator[BatchLine]:
    """Every non-blank line of an input file, checked, one at a time: the parsed bodies of a large input (several
    times its size in Python objects) never all live at once. ValueError at the end when it held no line."""
    seen: dict[str, int] = {}
    empty = True
    for i, raw in iter_lines(data):
        empty = False
        yield check_line(ctx, i, raw, seen)
    if empty:
        raise ValueError("the input file holds no request lines")


async def run_line(ctx: ServingContext, custom_id: str, line: int, body: dict,
                   url: str = ENDPOINTS[0], owner: str | None = None) -> tuple[bool, str, int]:
    """Answer one checked line as the chat endpoint its url names would: (ok, the output or error line, completion
    tokens). Cancelling the call aborts the engine request."""
    try:
        # In a worker thread, as the chat endpoints do: the line's grammar may compile again here (seconds for a new
        # schema no longer cached), which on the event loop would stall every other request and stream.
        prep = await ctx.off_loop(_prepare, ctx, body, url)
        await attach_image(ctx, prep)  # GLM-4V: decode (or fetch) the line's image, as the endpoint does
        req_id = body.get("request_id") if isinstance(body.get("request_id"), str) else None
        meta = new_meta(ctx, flavor_of(url), body["model"], req_id, owner=owner)  # (owner: the batch's key)
        answer = await chat_result(ctx, prep, meta, meta.response_id)
    except APIError as e:
        return False, _refused(custom_id, line, e, url), 0
    except Exception as e:  # noqa: BLE001 (one failed line is an error line, never a dead worker)
        log.exception("batch line %d (%s) failed", line, custom_id)
        return False, error_line(custom_id, line, "500", f"internal error: {type(e).__name__}", 500), 0
    return True, output_line(custom_id, answer), int(answer.get("usage", {}).get("completion_tokens", 0))


__all__ = ["BatchLine", "check_input", "check_line", "error_line", "iter_lines", "output_line", "run_line"]
