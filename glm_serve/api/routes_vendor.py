"""The vendor's v4 routes under /api/paas/v4: chat (JSON and SSE), async chat tasks, tokenizer.
Contract: /work/shared/docs/api.md ("Routes")."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from glm_serve.api.chat_service import Meta, chat_result
from glm_serve.api.common import (admit_and_prepare, authenticate, ctx_of, handle_chat, new_meta, prepare_off_loop,
                                  read_json, read_request)
from glm_serve.api.images import attach_image
from glm_serve.api.params import VENDOR, chat_prompt_ids
from glm_serve.api.schemas import TokenizerRequest, VendorChatRequest
from glm_serve.api.tasks import Task

PREFIX = "/api/paas/v4"
router = APIRouter(prefix=PREFIX)


@router.post("/chat/completions")
async def chat_completions(request: Request):
    return await handle_chat(request, VENDOR, VendorChatRequest, "vendor chat")


@router.post("/async/chat/completions")
async def async_chat_completions(request: Request):
    ctx = ctx_of(request)
    key_id = authenticate(request)
    body = await read_json(request)
    req = VendorChatRequest.model_validate(body)
    req.log_unknown("vendor async chat")
    admitted, prep = await admit_and_prepare(ctx, key_id, req.request_id, req, VENDOR)
    prep.stream = False  # a task's result is fetched whole
    meta = new_meta(ctx, VENDOR, req.model, req.request_id, owner=key_id)
    task = Task(meta.response_id, meta.request_id, req.model, owner=key_id)
    await request.app.state.tasks.submit(task, chat_result(ctx, prep, meta, meta.response_id), admitted.release, body)
    return JSONResponse(task.to_dict())


async def rerun_task(ctx, task: Task, body: dict) -> dict:
    """A task that was running when the server stopped, run again from its request (TaskStore.recover). What the
    route checked is checked again: a request this server would now refuse (another model name) fails the task."""
    req = VendorChatRequest.model_validate(body)
    prep = await prepare_off_loop(req, VENDOR, ctx)
    await attach_image(ctx, prep)
    prep.stream = False
    meta = Meta(VENDOR, task.id, task.request_id, int(time.time()), task.model, owner=task.owner)
    # A fresh engine request id: an engine that outlived the server (one process, a server built again over it)
    # may not have dropped the first run's request yet.
    return await chat_result(ctx, prep, meta, ctx.new_id("chatcmpl"))


@router.get("/async-result/{task_id}")
async def async_result(task_id: str, request: Request):
    caller = authenticate(request)
    return JSONResponse(request.app.state.tasks.get(task_id, caller).to_dict())


@router.post("/tokenizer")
async def tokenizer(request: Request):
    ctx, _, req = await read_request(request, TokenizerRequest, "vendor tokenizer")
    ctx.check_model(req.model)
    ids = chat_prompt_ids(ctx, req.messages, req.tools)
    rid = ctx.new_id("tok")
    return JSONResponse({"id": rid, "created": int(time.time()), "request_id": req.request_id or rid,
                         "usage": {"prompt_tokens": len(ids)}})
