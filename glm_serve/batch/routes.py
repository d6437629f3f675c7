"""The files and batches routes under /api/paas/v4 (contract: /work/shared/docs/api.md "Routes", "Batch files";
objects: records.py), and the same under /v1 for the `openai` SDK's files and batches (OpenAI's Batch API: the
vendor's objects are OpenAI's; errors there take OpenAI's shape, as on every /v1 path), and BatchService, which
create_app uses to open the store, mount the routes and run the worker for the app's lifetime. Every route authenticates like the chat routes; errors are APIErrors (unknown
ids answer 404 with code 1214, as the async-result route does).

With API keys, files and batches belong to the key that made them (a batch's output files to the batch's key):
another key's ids answer 404 as unknown ones do, and lists show the caller's own (records.visible)."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from glm_serve.api.common import authenticate, query_limit, read_json
from glm_serve.api.context import ServingContext
from glm_serve.api.errors import APIError, bad_param, invalid_value
from glm_serve.batch.records import (
    CANCELLED,
    CANCELLING,
    ENDPOINTS,
    IN_PROGRESS,
    VALIDATING,
    BatchRecord,
    FileRecord,
    parse_window,
    visible,
)
from glm_serve.batch.store import Store
from glm_serve.batch.worker import BatchWorker

log = logging.getLogger(__name__)

PREFIXES = ("/api/paas/v4", "/v1")  # one store: a file uploaded through either is the same file
MAX_FILE_BYTES = 1 << 30  # one uploaded file at most
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
_ROUTES: list[tuple[str, str, object]] = []  # (method, path under a prefix, endpoint)


def _route(method: str, path: str):
    """Registers an endpoint for every prefix (routers(): one per prefix, each route with its full path, which
    is also its metrics label; FastAPI's include_router(prefix=...) would label both prefixes' routes alike)."""
    def register(fn):
        _ROUTES.append((method, path, fn))
        return fn
    return register


def routers() -> list[APIRouter]:
    out = []
    for prefix in PREFIXES:
        r = APIRouter(prefix=prefix)
        for method, path, fn in _ROUTES:
            r.add_api_route(path, fn, methods=[method])
        out.append(r)
    return out


class BatchService:
    """The batch store and worker of one app. Without settings.data_dir, state lives in a temporary folder
    removed at shutdown (programmatic servers and tests); `glm-serve serve` always passes a data dir."""

    def __init__(self, ctx: ServingContext):
        data_dir = ctx.settings.data_dir
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="glm-serve-data-")
            data_dir = self._tmp.name
            log.info("batch state in the temporary folder %s (set a data dir to keep it)", data_dir)
        self.store = Store(data_dir)
        self.data_dir = Path(data_dir).expanduser()  # created and locked by the Store
        self.worker = BatchWorker(self.store, ctx, ctx.settings.batch_concurrency)

    def mount(self, app: FastAPI) -> None:
        app.state.batches = self
        for r in routers():
            app.include_router(r)

    async def start(self) -> None:
        self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop()
        self.store.close()
        if self._tmp is not None:
            self._tmp.cleanup()


def _service(request: Request) -> tuple[BatchService, str | None]:
    """The app's batch service and the caller's key id (None: the server has no keys)."""
    caller = authenticate(request)
    return request.app.state.batches, caller


async def _own_file(svc: BatchService, file_id: str, caller: str | None) -> FileRecord:
    rec = await asyncio.to_thread(svc.store.get_file, file_id)
    if rec is None or not visible(rec.owner, caller):
        raise _not_found("file", file_id)
    return rec


async def _own_batch(svc: BatchService, batch_id: str, caller: str | None) -> BatchRecord:
    rec = await asyncio.to_thread(svc.store.get_batch, batch_id)
    if rec is None or not visible(rec.owner, caller):
        raise _not_found("batch", batch_id)
    return rec


def _not_found(kind: str, obj_id: str) -> APIError:
    return APIError("1214", f"no {kind} with id {obj_id!r}", "id", status=404)


def _page(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


# ---- files -------------------------------------------------------------------------------------------------

@_route("POST", "/files")
async def upload_file(request: Request):
    svc, caller = _service(request)
    most = MAX_FILE_BYTES + (1 << 20)  # the file and its multipart framing
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > most:
        raise APIError("1210", f"file too large ({declared} bytes; the limit is {MAX_FILE_BYTES})", status=413)
    received = 0

    async def receive():
        # A body sent without a Content-Length (chunked) is counted as it arrives: the form parser would
        # otherwise spool all of it to a temporary file before add_file could refuse it.
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > most:
            raise APIError("1210", f"file too large (the limit is {MAX_FILE_BYTES} bytes)", "file", status=413)
        return message

    async with Request(request.scope, receive).form(max_files=1, max_fields=16) as form:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose is None:
            raise APIError("1213", "purpose: required field missing", "purpose")
        if purpose != "batch":
            raise invalid_value("purpose", f"only 'batch' files are served here, got {purpose!r}")
        if not isinstance(upload, UploadFile):
            raise APIError("1213", "file: required field missing (send it as a multipart file part)", "file")
        try:
            rec = await asyncio.to_thread(svc.store.add_file, upload.file, upload.filename or "upload.jsonl",
                                          "batch", MAX_FILE_BYTES, caller)
        except ValueError as e:
            raise APIError("1210", str(e), "file", status=413) from None
    return JSONResponse(rec.to_dict())


@_route("GET", "/files")
async def list_files(request: Request):
    svc, caller = _service(request)
    q = request.query_params
    order = q.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise invalid_value("order", f"must be asc or desc, got {order!r}")
    try:
        recs, more = await asyncio.to_thread(svc.store.list_files, q.get("after") or None,
                                             query_limit(request, 10000, 10000), order, q.get("purpose") or None,
                                             caller)
    except KeyError:
        raise invalid_value("after", f"no file with id {q.get('after')!r}") from None
    return JSONResponse(_page([r.to_dict() for r in recs], more))


@_route("GET", "/files/{file_id}")
async def get_file(file_id: str, request: Request):
    svc, caller = _service(request)
    return JSONResponse((await _own_file(svc, file_id, caller)).to_dict())


@_route("GET", "/files/{file_id}/content")
async def file_content(file_id: str, request: Request):
    svc, caller = _service(request)
    rec = await _own_file(svc, file_id, caller)
    # Opened here and streamed from the open file: a DELETE (or a batch's auto-delete) landing after the lookup
    # answers 404, or lets this download finish, where a path handed to FileResponse would raise (500).
    try:
        f = await asyncio.to_thread(open, svc.store.file_path(file_id), "rb")
    except FileNotFoundError:
        raise _not_found("file", file_id) from None

    def chunks():
        with f:
            while chunk := f.read(1 << 20):
                yield chunk

    name = quote(rec.filename)
    disposition = f"attachment; filename*=utf-8''{name}" if name != rec.filename else \
        f'attachment; filename="{rec.filename}"'
    return StreamingResponse(chunks(), media_type="application/octet-stream", headers={
        "content-length": str(os.fstat(f.fileno()).st_size), "content-disposition": disposition})


@_route("DELETE", "/files/{file_id}")
async def delete_file(file_id: str, request: Request):
    svc, caller = _service(request)
    await _own_file(svc, file_id, caller)
    if not await asyncio.to_thread(svc.store.delete_file, file_id):
        raise _not_found("file", file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


# ---- batches -----------------------------------------------------------------------------------------------

def _required_str(body: dict, name: str) -> str:
    value = body.get(name)
    if value is None:
        raise APIError("1213", f"{name}: required field missing", name)
    if not isinstance(value, str):
        raise bad_param(name, f"must be a string, got {type(value).__name__}")
    return value


def _metadata(value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise bad_param("metadata", "must be an object of string values")
    if len(value) > MAX_METADATA_KEYS or any(len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE
                                             for k, v in value.items()):
        raise invalid_value("metadata", f"at most {MAX_METADATA_KEYS} keys of up to {MAX_METADATA_KEY} "
                                        f"characters, values up to {MAX_METADATA_VALUE}")
    return value


@_route("POST", "/batches")
async def create_batch(request: Request):
    svc, caller = _service(request)
    body = await read_json(request)
    unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata",
                                  "auto_delete_input_file"})
    if unknown:
        log.info("create batch: ignoring unknown fields %s", unknown)
    file_id, endpoint = _required_str(body, "input_file_id"), _required_str(body, "endpoint")
    if endpoint not in ENDPOINTS:
        raise invalid_value("endpoint", f"must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    window = body.get("completion_window")
    window = "24h" if window is None else window
    try:
        window_s = parse_window(window)
    except ValueError as e:
        raise invalid_value("completion_window", str(e).split(": ", 1)[-1]) from None
    metadata = _metadata(body.get("metadata"))
    auto_delete = body.get("auto_delete_input_file")
    if auto_delete is not None and not isinstance(auto_delete, bool):
        raise bad_param("auto_delete_input_file", "must be a boolean")
    rec = await asyncio.to_thread(svc.store.get_file, file_id)
    if rec is None or not visible(rec.owner, caller):
        raise invalid_value("input_file_id", f"no file with id {file_id!r}")
    if rec.purpose != "batch":
        raise invalid_value("input_file_id", f"file {file_id!r} has purpose {rec.purpose!r}, not 'batch'")
    now = int(time.time())
    batch = BatchRecord(id=f"batch_{uuid.uuid4().hex}", endpoint=endpoint, input_file_id=file_id,
                        completion_window=window, created_at=now, expires_at=now + window_s, metadata=metadata,
                        auto_delete_input_file=bool(auto_delete), owner=caller)
    await asyncio.to_thread(svc.store.create_batch, batch)
    svc.worker.wake()
    return JSONResponse(batch.to_dict())


@_route("GET", "/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request):
    svc, caller = _service(request)
    return JSONResponse((await _own_batch(svc, batch_id, caller)).to_dict())


@_route("GET", "/batches")
async def list_batches(request: Request):
    svc, caller = _service(request)
    after = request.query_params.get("after") or None
    try:
        recs, more = await asyncio.to_thread(svc.store.list_batches, after, query_limit(request, 20, 100), caller)
    except KeyError:
        raise invalid_value("after", f"no batch with id {after!r}") from None
    return JSONResponse(_page([r.to_dict() for r in recs], more))


@_route("POST", "/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request):
    svc, caller = _service(request)
    await _own_batch(svc, batch_id, caller)
    rec = await asyncio.to_thread(svc.store.set_status, batch_id, CANCELLING, (VALIDATING, IN_PROGRESS))
    if rec.status not in (CANCELLING, CANCELLED):
        raise invalid_value("id", f"batch {batch_id} is {rec.status}: only a validating or in_progress batch "
                                  "can be cancelled")
    svc.worker.wake()
    return JSONResponse(rec.to_dict())


__all__ = ["BatchService", "routers"]
