"""API errors: one typed error carrying the vendor code, rendered as the vendor body on /api/paas/v4 and in
OpenAI's shape on /v1, plus the exception handlers that guarantee bad input never becomes a 500.

Codes and HTTP statuses follow the table in /work/shared/docs/api.md ("Errors").
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from glm_serve.engine.async_engine import EngineStoppedError

log = logging.getLogger(__name__)

# vendor code -> (HTTP status, OpenAI error type)
CODES: dict[str, tuple[int, str]] = {
    "1000": (401, "authentication_error"),  # authentication failed
    "1001": (401, "authentication_error"),  # no Authorization header
    "1002": (401, "authentication_error"),  # invalid token
    "1003": (401, "authentication_error"),  # token expired
    "1004": (401, "authentication_error"),  # token verification failed
    "1210": (400, "invalid_request_error"),  # bad parameters (wrong type, out of range)
    "1211": (400, "invalid_request_error"),  # model does not exist
    "1212": (400, "invalid_request_error"),  # method not supported
    "1213": (400, "invalid_request_error"),  # required field missing
    "1214": (400, "invalid_request_error"),  # invalid field value
    "1215": (400, "invalid_request_error"),  # mutually exclusive fields
    "1231": (400, "invalid_request_error"),  # duplicate request_id
    "1261": (400, "invalid_request_error"),  # prompt too long
    "1301": (400, "invalid_request_error"),  # content blocked (the operator's content filter: api/content_filter.py)
    "1302": (429, "rate_limit_error"),  # too many concurrent requests for this key
    "1303": (429, "rate_limit_error"),  # request rate too high for this key
    "1305": (429, "rate_limit_error"),  # server overloaded (queue full)
    "500": (500, "server_error"),
}
# OpenAI clients switch on these `code` strings; the rest keep the vendor's number.
# "content_filter": what Azure OpenAI answers a prompt its content filter refuses (OpenAI names no such code).
_OPENAI_CODES = {"1211": "model_not_found", "1261": "context_length_exceeded", "1301": "content_filter",
                 "1001": "invalid_api_key", "1000": "invalid_api_key", "1002": "invalid_api_key",
                 "1003": "invalid_api_key", "1004": "invalid_api_key"}


class APIError(Exception):
    """A request the API refuses, with its vendor code. `param` names the offending field when there is one."""

    def __init__(self, code: str, message: str, param: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None, openai_code: str | None = None):
        super().__init__(message)
        if code not in CODES:
            raise ValueError(f"unknown API error code {code!r}")
        self.code = code
        self.message = message
        self.param = param
        self.status = status or CODES[code][0]
        self.headers = headers or {}  # extra response headers (Retry-After on 1303)
        # OpenAI's own `code` where it names one the vendor table has no row for (previous_response_not_found)
        self.openai_code = openai_code

    @property
    def should_retry(self) -> bool:
        # 400/401/404/413 repeat the same failure; 429 and 5xx may pass later, so the SDKs keep their retries.
        return self.status == 429 or self.status >= 500


def bad_param(param: str, message: str) -> APIError:
    return APIError("1210", f"{param}: {message}", param)


def chat_format_error(e) -> APIError:
    """A ChatFormatError (glm_serve.chat) as the API's error: 1213 for a missing field, else 1214."""
    if e.missing:
        return APIError("1213", str(e), e.field)  # "<field>: required ..."
    return invalid_value(e.field, str(e).split(": ", 1)[-1])


def invalid_value(param: str, message: str) -> APIError:
    return APIError("1214", f"{param}: {message}", param)


def is_openai_path(path: str) -> bool:
    # (vLLM's /tokenize and /detokenize answer in OpenAI's shape too: api/routes_tokenize.py)
    return path == "/v1" or path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


def error_body(err: APIError, openai: bool) -> dict:
    if openai:
        return {"error": {"message": err.message, "type": CODES[err.code][1], "param": err.param,
                          "code": err.openai_code or _OPENAI_CODES.get(err.code, err.code)}}
    return {"error": {"code": err.code, "message": err.message}}


def error_response(err: APIError, path: str) -> JSONResponse:
    headers = dict(err.headers) if err.should_retry else {**err.headers, "x-should-retry": "false"}
    return JSONResponse(error_body(err, is_openai_path(path)), status_code=err.status, headers=headers)


def from_validation_errors(errors: list[dict]) -> APIError:
    """Pydantic / FastAPI validation errors -> 1213 (a required field is missing) or 1210 (wrong type)."""
    first = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    loc = _field_loc(first)
    where = _dotted(loc) or "body"
    if first.get("type") == "missing":
        return APIError("1213", f"{where}: required field missing", where)
    if first.get("type") in ("json_invalid", "model_attributes_type", "dict_type", "model_type") and not loc:
        return APIError("1210", "the request body must be a JSON object", None)
    # A field of several accepted types fails once per type, each error tagged with it: say them all.
    msgs = list(dict.fromkeys(e.get("msg", "invalid value") for e in errors if _field_loc(e) == loc))
    forms = _union_forms(errors, loc)
    if forms and any(len(_field_loc(e)) > len(loc) and _field_loc(e)[:len(loc)] == loc for e in errors):
        # ...and some of them failed inside it (a list of mixed items): the first type's message alone would
        # mislead ("prompt: Input should be a valid string" for ["a", 1]); name the accepted forms instead
        return APIError("1210", f"{where}: must be one of {', '.join(forms)}; the value is none of them", where)
    return APIError("1210", f"{where}: {', or '.join(msgs)}", where)


def _union_forms(errors: list[dict], loc: list[str]) -> list[str]:
    """The union members (pydantic's tags: str, list[int], ...) tried for the field at `loc`, in order."""
    forms: dict[str, None] = {}
    for e in errors:
        raw = [p for p in e.get("loc", ()) if p != "body"]
        for i, p in enumerate(raw):
            if isinstance(p, str) and _UNION_TAG.match(p) and _field_loc({"loc": raw[:i]}) == loc:
                forms[p] = None
                break
    return list(forms) if len(forms) > 1 else []


# pydantic's tag for the member of a union that a value was tried against (str, list[int], function-after[...])
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[\w-]+\[.*\])$")


def _field_loc(error: dict) -> list[str]:
    """The error's field path without "body" and without pydantic's union-member tags."""
    return [str(p) for p in error.get("loc", ()) if p != "body" and not (isinstance(p, str) and _UNION_TAG.match(p))]


def _dotted(loc: list[str]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def internal_error_message(exc: BaseException) -> str:
    """What a client is told of an unexpected exception: its type only (a bug's details stay in the log), unless
    the engine has stopped, which the client should know."""
    return str(exc) if isinstance(exc, EngineStoppedError) else f"internal error: {type(exc).__name__}"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError):
        return error_response(from_validation_errors(list(exc.errors())), request.url.path)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError):
        return error_response(from_validation_errors(exc.errors()), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = "1212" if exc.status_code == 405 else "1214"
        err = APIError(code, str(exc.detail), status=exc.status_code)
        return error_response(err, request.url.path)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect):
        # The client left before its body ended (an upload cut short): no server fault, and nobody reads this.
        # Left to the catch-all below it was logged twice with a traceback and counted as a 500.
        log.info("client disconnected while sending %s %s", request.method, request.url.path)
        return error_response(APIError("500", "client disconnected", status=499), request.url.path)

    @app.exception_handler(EngineStoppedError)
    async def _engine_stopped(request: Request, exc: EngineStoppedError):
        # Not a bug in this request: the engine's process died (logged once when it did); /health says 503 too.
        return error_response(APIError("500", str(exc), status=503), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, not bad input: log it with its traceback, answer 500, keep serving.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(APIError("500", f"internal error: {type(exc).__name__}"), request.url.path)
